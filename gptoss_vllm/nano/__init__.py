"""Nano gpt-oss: a few-MB canary model of the real architecture that speaks harmony and honours effort.

``tasks`` (synthetic task families and effort-dependent analyses) -> ``conversations`` (harmony token
sequences, rendered by vLLM's own harmony code) -> ``train`` (from scratch on CPU, MXFP4-aware) ->
``asset`` (the committed weights, expanded into a full checkpoint by ``make-model --preset nano``).
"""


class NanoError(Exception):
    """Every error of ``gptoss_vllm.nano``: the nano model's asset, training state or tools cannot be used."""
