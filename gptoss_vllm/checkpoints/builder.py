"""Build gpt-oss checkpoints locally, deterministic from a seed, in the exact HF layout of openai/gpt-oss-20b.

Weights are drawn in float32 in a fixed order and scaled so activations stay near unit size. Expert
weights are quantised to MXFP4 (OCP rule); the ``bf16`` twin stores the dequantised MXFP4 experts, so
the two checkpoints of one seed are the same model and ``quantize(bf16 twin) == mxfp4 checkpoint``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from gptoss_vllm.checkpoints.config import generation_config, quantized_config
from gptoss_vllm.checkpoints.layout import EXPERT_PROJECTIONS, checkpoint_specs, expert_out_in
from gptoss_vllm.checkpoints.safetensors_stream import write_streaming
from gptoss_vllm.quant import mxfp4
from gptoss_vllm.tokenizer.harmony import install_tokenizer

WEIGHTS_FILE = "model.safetensors"


def _init_std(name: str, config: dict[str, Any]) -> tuple[float, float]:
    """(mean, std) of the initial value of a tensor, by what it is."""
    h, i = config["hidden_size"], config["intermediate_size"]
    attn = config["num_attention_heads"] * config["head_dim"]
    depth = math.sqrt(2 * config["num_hidden_layers"])
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0, 0.1
    if name.endswith("sinks"):
        return 0.0, 1.0
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name == "lm_head.weight":
        return 0.0, 2.0 / math.sqrt(h)  # logits with a std of about 2: a peaked next-token distribution
    if name.endswith("o_proj.weight"):
        return 0.0, 1.0 / math.sqrt(attn) / depth
    if name.endswith("proj.weight"):  # q, k, v
        return 0.0, 1.0 / math.sqrt(h)
    if name.endswith("router.weight"):
        return 0.0, 2.0 / math.sqrt(h)  # decisive routing, so tokens spread over experts
    if name.endswith("experts.gate_up_proj"):
        return 0.0, 1.0 / math.sqrt(h)
    if name.endswith("experts.down_proj"):
        return 0.0, 1.0 / math.sqrt(i) / depth
    if name.endswith("router.bias"):
        return 0.0, 0.1
    if name.endswith("bias"):
        return 0.0, 0.02
    raise KeyError(f"no initialisation rule for {name}")


def _draw(gen: torch.Generator, shape: tuple[int, ...], name: str, config: dict[str, Any]) -> torch.Tensor:
    mean, std = _init_std(name, config)
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std).add_(mean)


def generate_tensors(config: dict[str, Any], seed: int, dtype: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the checkpoint's tensors in ``checkpoint_specs`` order; same seed, same model for both dtypes."""
    gen = torch.Generator().manual_seed(seed)
    specs = checkpoint_specs(config, dtype)
    pending = iter(specs)
    for spec in pending:
        name = spec.name
        proj = next((p for p in EXPERT_PROJECTIONS if name.endswith(f"experts.{p}_blocks")), None)
        if proj is None:
            proj = next((p for p in EXPERT_PROJECTIONS if name.endswith(f"experts.{p}")), None)
        if proj is None:
            yield name, _draw(gen, spec.shape, name, config).to(spec.dtype)
            continue
        # Experts: drawn as (E, out, in), the orientation MXFP4 blocks run along.
        base = name.rsplit(".", 1)[0] + f".{proj}"
        rows, k = expert_out_in(config, proj)
        master = _draw(gen, (config["num_local_experts"], rows, k), base, config)
        blocks, scales = mxfp4.quantize(master)
        if dtype == "mxfp4":
            yield f"{base}_blocks", blocks
            scales_spec = next(pending)
            yield scales_spec.name, scales
        else:
            yield base, mxfp4.dequantize(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_checkpoint(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    seed: int = 0,
    dtype: str = "mxfp4",
    force: bool = False,
    progress: bool = True,
    description: str = "",
    tensors: Iterator[tuple[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a complete checkpoint (config, generation config, tokenizer, weights) to ``out_dir``.

    The checkpoint is assembled beside ``out_dir`` and moved into place at the end, so an interrupted
    build never leaves a half-written model where a server would load it. An existing non-empty
    ``out_dir`` is replaced only with ``force``. ``tensors`` supplies trained weights in ``checkpoint_specs``
    order instead of seeded random ones.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} already exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be read by servers
    try:
        _write_json(staging / "config.json", quantized_config(config) if dtype == "mxfp4" else config)
        _write_json(staging / "generation_config.json", generation_config(config))
        install_tokenizer(staging, min(config["vocab_size"], 201088))
        specs = checkpoint_specs(config, dtype)
        bar = tqdm(
            total=len(specs), desc=description or f"building {out.name}", unit="tensor", disable=not progress
        )

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            for item in tensors if tensors is not None else generate_tensors(config, seed, dtype):
                bar.update(1)
                yield item

        write_streaming(
            staging / WEIGHTS_FILE,
            specs,
            counted(),
            metadata={"gptoss_vllm.seed": str(seed), "gptoss_vllm.dtype": dtype},
        )
        bar.close()
        if out.exists():
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(trash / out.name)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
