"""Tensor names, shapes and dtypes of an HF gpt-oss checkpoint (the openai/gpt-oss-20b layout).

One place that says what a checkpoint holds, for the builder, the converter and the model loader.
MXFP4 experts are stored as ``(out, in/32, 16)`` blocks with ``(out, in/32)`` scales; bf16 experts as
``gate_up_proj (E, H, 2I)`` and ``down_proj (E, I, H)`` (transposed relative to the blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gptoss_vllm.checkpoints import CheckpointsError
from gptoss_vllm.quant.mxfp4 import packed_shapes

EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def expert_out_in(config: dict[str, Any], projection: str) -> tuple[int, int]:
    """(rows, contraction) of one expert's projection: gate_up is (2I, H), down is (H, I)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    return (2 * i, h) if projection == "gate_up_proj" else (h, i)


def expert_specs(config: dict[str, Any], layer: int, dtype: str) -> list[TensorSpec]:
    """The expert tensors of ``layer``; ``dtype`` is ``mxfp4`` or ``bf16``."""
    prefix = f"model.layers.{layer}.mlp.experts"
    e = config["num_local_experts"]
    specs = []
    for proj in EXPERT_PROJECTIONS:
        rows, k = expert_out_in(config, proj)
        if dtype == "mxfp4":
            blocks, scales = packed_shapes((e, rows, k))
            specs.append(TensorSpec(f"{prefix}.{proj}_blocks", blocks, torch.uint8))
            specs.append(TensorSpec(f"{prefix}.{proj}_scales", scales, torch.uint8))
        else:
            specs.append(TensorSpec(f"{prefix}.{proj}", (e, k, rows), torch.bfloat16))
        specs.append(TensorSpec(f"{prefix}.{proj}_bias", (e, rows), torch.bfloat16))
    return specs


def checkpoint_specs(config: dict[str, Any], dtype: str) -> list[TensorSpec]:
    """Every tensor of a gpt-oss checkpoint, in a fixed order (the order weights are generated in)."""
    if dtype not in ("mxfp4", "bf16"):
        raise ValueError(f"checkpoint dtype must be 'mxfp4' or 'bf16', got {dtype!r}")
    h, v = config["hidden_size"], config["vocab_size"]
    nq, nkv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    e = config["num_local_experts"]
    bf16 = torch.bfloat16
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), bf16)]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", (h,), bf16),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (nq * d, h), bf16),
            TensorSpec(f"{p}.self_attn.q_proj.bias", (nq * d,), bf16),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (nkv * d, h), bf16),
            TensorSpec(f"{p}.self_attn.k_proj.bias", (nkv * d,), bf16),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (nkv * d, h), bf16),
            TensorSpec(f"{p}.self_attn.v_proj.bias", (nkv * d,), bf16),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (h, nq * d), bf16),
            TensorSpec(f"{p}.self_attn.o_proj.bias", (h,), bf16),
            TensorSpec(f"{p}.self_attn.sinks", (nq,), bf16),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), bf16),
            TensorSpec(f"{p}.mlp.router.weight", (e, h), bf16),
            TensorSpec(f"{p}.mlp.router.bias", (e,), bf16),
        ]
        specs += expert_specs(config, layer, dtype)
    specs += [
        TensorSpec("model.norm.weight", (h,), bf16),
        TensorSpec("lm_head.weight", (v, h), bf16),
    ]
    return specs


class CheckpointLayoutError(CheckpointsError, ValueError):
    """A checkpoint tensor is missing, unexpected or mis-shaped for the model's config.json."""


class LayoutChecker:
    """Checks a stream of checkpoint tensors against ``specs`` as it passes; ``finish`` reports what is missing."""

    def __init__(self, specs: list[TensorSpec], description: str) -> None:
        self.expected = {s.name: s for s in specs}
        self.description = description
        self.seen: set[str] = set()

    def check(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.expected.get(name)
        if spec is None:
            raise CheckpointLayoutError(
                f"checkpoint tensor {name} (shape {tuple(tensor.shape)}) is not part of the gpt-oss layout "
                f"for {self.description}"
            )
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointLayoutError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}; the gpt-oss layout for "
                f"{self.description} expects {spec.shape}"
            )
        if spec.dtype == torch.uint8 and tensor.dtype != torch.uint8:
            raise CheckpointLayoutError(f"checkpoint tensor {name} must be uint8 (MXFP4), got {tensor.dtype}")
        if name in self.seen:
            raise CheckpointLayoutError(f"checkpoint tensor {name} appears twice")
        self.seen.add(name)

    def stream(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            self.check(name, tensor)
            yield name, tensor

    def finish(self) -> None:
        missing = [spec for name, spec in self.expected.items() if name not in self.seen]
        if missing:
            shown = ", ".join(f"{s.name} {s.shape}" for s in missing[:5])
            raise CheckpointLayoutError(
                f"checkpoint is missing {len(missing)} tensor(s) of the gpt-oss layout for {self.description}, "
                f"e.g. {shown}"
            )
