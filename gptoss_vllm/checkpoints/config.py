"""gpt-oss model configuration as it appears in HF ``config.json``: presets, overrides and validation.

The dict keeps the field names and layout of openai/gpt-oss-20b's published ``config.json`` (``rope_scaling``
and ``rope_theta``, ``experts_per_token`` beside ``num_experts_per_tok``), which both transformers and vLLM read.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import yaml

from gptoss_vllm.checkpoints import CheckpointsError

# What an MXFP4 checkpoint keeps in bf16: everything but the experts (the quantization config's key).
MODULES_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]

MXFP4_QUANTIZATION_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED}

GPT_OSS_20B: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "experts_per_token": 4,
    "num_experts_per_tok": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    # transformers reads this to tell old tokenizers apart; without it, it warns about a Mistral regex.
    "transformers_version": "4.55.0",
    "use_cache": True,
    "vocab_size": 201088,
}

PRESETS: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": {},
    "gpt-oss-120b": {"num_hidden_layers": 36, "num_local_experts": 128},
    # Small enough to build in seconds and run anywhere; head_dim 64 because vLLM's CPU attention
    # refuses smaller heads. The sliding window is short so that tests cross it with short prompts.
    "tiny": {
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "num_local_experts": 8,
        "experts_per_token": 4,
        "num_experts_per_tok": 4,
        "sliding_window": 32,
        "max_position_embeddings": 4096,
    },
}
# The trained canary (gptoss_vllm/nano): tiny's shapes, with a window that a task's tail fits in.
PRESETS["nano"] = {**PRESETS["tiny"], "sliding_window": 64}

LAYER_TYPES = ("sliding_attention", "full_attention")
# Keys of the published config.json that GptOssConfig's signature no longer lists.
_LEGACY_KEYS = {"rope_theta", "rope_scaling", "experts_per_token", "initial_context_length"}
_FIXED_KEYS = {"architectures", "model_type", "quantization_config", "transformers_version"}
MIN_VOCAB_SIZE = 200013  # room for every named harmony special token (up to <|call|> = 200012)


class ModelConfigError(CheckpointsError, ValueError):
    """A gpt-oss model configuration (config.json) value is unknown, mistyped or describes impossible shapes.
    (A serving config's errors are ``serve.config.ConfigError``.)"""


def settable_keys() -> set[str]:
    """Config keys ``--set`` may change: GptOssConfig's own fields plus the published legacy names."""
    from transformers import GptOssConfig

    params = inspect.signature(GptOssConfig.__init__).parameters.values()
    own = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return (own | _LEGACY_KEYS | set(GPT_OSS_20B)) - _FIXED_KEYS - {"rope_parameters"}


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``key=value`` (value as YAML: ``4``, ``1e-5``, ``null``, ``[a, b]``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ModelConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return key, value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ModelConfigError(message)


def build_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF config dict for ``preset`` with ``overrides`` applied and checked (no quantization_config)."""
    if preset not in PRESETS:
        raise ModelConfigError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    config = copy.deepcopy(GPT_OSS_20B)
    config.update(copy.deepcopy(PRESETS[preset]))
    overrides = dict(overrides or {})
    allowed = settable_keys()
    for key in overrides:
        if key not in allowed:
            raise ModelConfigError(
                f"unknown gpt-oss config key {key!r}; settable keys: {', '.join(sorted(allowed))}"
            )
    # The two spellings of top-k stay equal; setting either sets both.
    for a, b in (("num_experts_per_tok", "experts_per_token"), ("experts_per_token", "num_experts_per_tok")):
        if a in overrides and b not in overrides:
            overrides[b] = overrides[a]
    config.update(overrides)
    layers = config["num_hidden_layers"]
    if (
        ("layer_types" not in overrides or config.get("layer_types") is None)
        and _is_int(layers)
        and layers > 0
    ):
        # gpt-oss alternates sliding and full attention, starting with sliding at layer 0.
        config["layer_types"] = [LAYER_TYPES[i % 2] for i in range(layers)]
    validate_config(config)
    return config


def validate_config(c: dict[str, Any]) -> None:
    """Raise ModelConfigError naming the key when ``c`` cannot describe a gpt-oss model."""
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "num_local_experts",
        "num_experts_per_tok",
        "vocab_size",
        "max_position_embeddings",
    ):
        _require(_is_int(c.get(key)) and c[key] > 0, f"{key} must be a positive integer, got {c.get(key)!r}")
    for key in ("hidden_size", "intermediate_size"):
        _require(
            c[key] % 32 == 0,
            f"{key}={c[key]} must be a multiple of 32: MXFP4 experts are quantised in blocks of 32 along it",
        )
    _require(c["head_dim"] % 2 == 0, f"head_dim={c['head_dim']} must be even for rotary embeddings")
    _require(
        c["num_attention_heads"] % c["num_key_value_heads"] == 0,
        f"num_attention_heads={c['num_attention_heads']} must be a multiple of "
        f"num_key_value_heads={c['num_key_value_heads']}",
    )
    _require(
        c["num_experts_per_tok"] <= c["num_local_experts"],
        f"num_experts_per_tok={c['num_experts_per_tok']} exceeds num_local_experts={c['num_local_experts']}",
    )
    _require(
        c["experts_per_token"] == c["num_experts_per_tok"],
        f"experts_per_token={c['experts_per_token']} differs from num_experts_per_tok={c['num_experts_per_tok']}",
    )
    _require(
        c["vocab_size"] >= MIN_VOCAB_SIZE,
        f"vocab_size={c['vocab_size']} is too small for the harmony tokenizer (needs >= {MIN_VOCAB_SIZE})",
    )
    sw = c.get("sliding_window")
    _require(
        sw is None or (_is_int(sw) and sw > 0),
        f"sliding_window must be a positive integer or null, got {sw!r}",
    )
    lt = c["layer_types"]
    _require(
        isinstance(lt, list) and len(lt) == c["num_hidden_layers"] and all(t in LAYER_TYPES for t in lt),
        f"layer_types must list {c['num_hidden_layers']} entries (num_hidden_layers), each one of {LAYER_TYPES}",
    )
    _require(
        sw is not None or "sliding_attention" not in lt,
        "layer_types has sliding_attention layers but sliding_window is null",
    )
    for key in ("rms_norm_eps", "swiglu_limit", "rope_theta"):
        v = c.get(key)
        _require(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
            f"{key} must be a positive number, got {v!r}",
        )
    rs = c.get("rope_scaling")
    _require(
        rs is None or (isinstance(rs, dict) and "rope_type" in rs),
        f"rope_scaling must be null or a mapping with rope_type, got {rs!r}",
    )
    for key in ("attention_bias", "tie_word_embeddings"):
        _require(isinstance(c.get(key), bool), f"{key} must be true or false, got {c.get(key)!r}")
    _require(c["attention_bias"], "attention_bias=false is not a gpt-oss model: q/k/v/o carry biases")
    _require(
        not c["tie_word_embeddings"], "tie_word_embeddings=true is not a gpt-oss model: lm_head is separate"
    )


def quantized_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the MXFP4 ``quantization_config`` of the published checkpoints."""
    out = dict(config)
    out["quantization_config"] = copy.deepcopy(MXFP4_QUANTIZATION_CONFIG)
    return out


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json`` as published with gpt-oss: stop on <|return|>, <|endoftext|>, <|call|>."""
    return {
        "bos_token_id": 199998,
        "do_sample": True,
        "eos_token_id": [200002, 199999, 200012],
        "pad_token_id": config.get("pad_token_id", 199999),
    }
