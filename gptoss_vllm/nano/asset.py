"""The committed nano weights, and their expansion into a full gpt-oss checkpoint (vocab 201088).

The asset holds what training produced over the ~1.3k-token sub-vocabulary: every non-expert tensor in
bf16, the experts as MXFP4 blocks/scales, and ``vocab_ids`` (the full-vocabulary id of each row). Expansion
scatters the embedding and unembedding rows to their ids and leaves every other row zero, so every token the
model never saw has logit 0, far below the trained ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gptoss_vllm.checkpoints.config import build_config
from gptoss_vllm.checkpoints.layout import checkpoint_specs
from gptoss_vllm.nano import NanoError
from gptoss_vllm.quant import mxfp4

ASSET_PATH = Path(__file__).with_name("assets") / "nano.safetensors"
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


class AssetError(NanoError, RuntimeError):
    """The nano asset is missing or does not fit the nano preset."""


def load_asset(path: str | os.PathLike[str] = ASSET_PATH) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise AssetError(
            f"nano weights not found at {path}; train them with `gptoss-vllm train-nano --out {path}`"
        )
    tensors = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensors[name] = handle.get_tensor(name)
        metadata = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    return tensors, metadata


def nano_config() -> dict[str, Any]:
    return build_config("nano")


def expanded_tensors(
    config: dict[str, Any], dtype: str, asset: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The full checkpoint's tensors in ``checkpoint_specs`` order, from the committed asset by default."""
    if asset is None:
        asset, _ = load_asset()
    vocab_ids = asset["vocab_ids"]
    for spec in checkpoint_specs(config, dtype):
        name = spec.name
        if name in _VOCAB_ROWS:
            rows = asset[name]
            if rows.shape != (len(vocab_ids), spec.shape[1]):
                raise AssetError(
                    f"{name} in the asset has shape {tuple(rows.shape)}; the nano preset needs width {spec.shape[1]}"
                )
            full = torch.zeros(spec.shape, dtype=spec.dtype)
            full[vocab_ids] = rows.to(spec.dtype)
            yield name, full
        elif name in asset:
            yield name, asset[name].to(spec.dtype)
        elif dtype == "bf16" and f"{name}_blocks" in asset:
            weight = mxfp4.dequantize(asset[f"{name}_blocks"], asset[f"{name}_scales"], torch.bfloat16)
            yield name, weight.transpose(1, 2).contiguous()
        else:
            raise AssetError(f"the nano asset has no tensor for {name}")
