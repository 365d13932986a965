"""Checkpoints: gpt-oss configs, their tensors' layout, building and quantising safetensors checkpoints."""


class CheckpointsError(Exception):
    """Every error of ``gptoss_vllm.checkpoints``: a checkpoint or its config that cannot be built, read or converted."""
