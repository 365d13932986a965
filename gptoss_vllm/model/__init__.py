"""The gpt-oss model for vLLM: model class, MoE block with MXFP4 experts, backend choice."""
