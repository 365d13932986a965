"""vLLM general plugin: registers the plugin's ``GptOssForCausalLM`` with vLLM's model registry.

vLLM calls ``register`` in every process it starts (API server, engine core, workers), possibly more
than once; registering the same lazy ``module:Class`` string again is harmless. The string form keeps
torch and vLLM's model code out of processes that never build a model. Turn the plugin off like any
vLLM plugin, with ``VLLM_PLUGINS`` naming the plugins to load (e.g. ``VLLM_PLUGINS=`` for none).
"""

from __future__ import annotations

ARCHITECTURE = "GptOssForCausalLM"
MODEL_CLASS = "gptoss_vllm.model.gpt_oss:GptOssForCausalLM"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from vllm import ModelRegistry

    from gptoss_vllm.lifetime import exit_with_parent_if_requested
    from gptoss_vllm.model import cpu_eager  # noqa: F401  (its norm provider must exist before vLLM sets priorities)

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    exit_with_parent_if_requested()
