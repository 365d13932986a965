"""The gpt-oss model for vLLM: model class, MoE block with MXFP4 experts, backend choice."""


class ModelError(Exception):
    """Every error of ``gptoss_vllm.model``: the model cannot run as configured on this platform."""
