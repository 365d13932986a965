"""MXFP4 MoE expert computation: the reference implementation and the CPU implementation behind a torch op."""


class KernelError(Exception):
    """Every error of ``gptoss_vllm.kernels``: the CPU kernel could not be built or run."""
