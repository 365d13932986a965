"""MXFP4 MoE expert computation: the reference implementation and the CPU implementation behind a torch op."""
