"""Convert a bf16 HF gpt-oss checkpoint to the MXFP4 layout of openai/gpt-oss, tensor by tensor.

Expert projections (``experts.gate_up_proj`` (E, H, 2I), ``experts.down_proj`` (E, I, H)) become
``_blocks``/``_scales`` along their contraction dimension; every other tensor is copied as it is. Each
input shard becomes one output shard, written as a stream, so memory is bounded by the largest tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from gptoss_vllm.checkpoints import CheckpointsError
from gptoss_vllm.checkpoints.config import MXFP4_QUANTIZATION_CONFIG
from gptoss_vllm.checkpoints.layout import EXPERT_PROJECTIONS, TensorSpec
from gptoss_vllm.checkpoints.safetensors_stream import DTYPES_BY_NAME, write_streaming
from gptoss_vllm.quant import mxfp4

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(CheckpointsError, ValueError):
    """The source checkpoint is not a bf16 gpt-oss checkpoint this converter understands."""


def _expert_projection(name: str) -> str | None:
    return next((p for p in EXPERT_PROJECTIONS if name.endswith(f".mlp.experts.{p}")), None)


def _shards(src: Path) -> list[str]:
    index = src / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted(set(weight_map.values()))
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{src} holds no *.safetensors file")
    return shards


def _read_header(path: Path) -> dict[str, dict]:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _output_specs(path: Path) -> list[TensorSpec]:
    specs = []
    for name, meta in _read_header(path).items():
        shape = tuple(meta["shape"])
        if _expert_projection(name) is None:
            specs.append(TensorSpec(name, shape, DTYPES_BY_NAME[meta["dtype"]]))
            continue
        if len(shape) != 3:
            raise CheckpointError(f"{path.name}: {name} has shape {shape}; expected (experts, in, out)")
        e, k, rows = shape
        if k % mxfp4.BLOCK_SIZE:
            raise CheckpointError(
                f"{path.name}: {name} contracts over {k} elements, not a multiple of {mxfp4.BLOCK_SIZE}"
            )
        blocks, scales = mxfp4.packed_shapes((e, rows, k))
        specs.append(TensorSpec(f"{name}_blocks", blocks, torch.uint8))
        specs.append(TensorSpec(f"{name}_scales", scales, torch.uint8))
    return specs


def _converted(path: Path, bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        for name in _read_header(path):
            tensor = f.get_tensor(name)
            if _expert_projection(name) is None:
                yield name, tensor
            else:
                if not torch.isfinite(tensor).all():
                    raise CheckpointError(f"{path.name}: {name} holds NaN or inf; refusing to quantise it")
                blocks, scales = mxfp4.quantize(tensor.transpose(1, 2))
                yield f"{name}_blocks", blocks
                yield f"{name}_scales", scales
            bar.update(tensor.numel() * tensor.element_size())
            del tensor


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = True) -> Path:
    """Write the MXFP4 version of the bf16 checkpoint ``src`` into the new directory ``dst``."""
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{src} is not a checkpoint directory: {config_path} is missing")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "gpt_oss":
        raise CheckpointError(
            f"{config_path}: model_type is {config.get('model_type')!r}, expected 'gpt_oss'"
        )
    if config.get("quantization_config"):
        raise CheckpointError(
            f"{config_path}: already quantised ({config['quantization_config'].get('quant_method')}); "
            "quantize takes a bf16 checkpoint"
        )
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not empty; choose a new directory")
    shards = _shards(src)
    found = [name for shard in shards for name in _read_header(src / shard) if _expert_projection(name)]
    if not found:
        raise CheckpointError(f"{src}: no bf16 expert tensors (*.mlp.experts.gate_up_proj / down_proj) found")
    total = sum((src / s).stat().st_size for s in shards)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.partial-"))
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be read by servers
    try:
        weight_map: dict[str, str] = {}
        with tqdm(
            total=total, unit="B", unit_scale=True, desc=f"quantizing {src.name}", disable=not progress
        ) as bar:
            for shard in shards:
                specs = _output_specs(src / shard)
                write_streaming(staging / shard, specs, _converted(src / shard, bar))
                weight_map.update({s.name: shard for s in specs})
        for item in src.iterdir():
            if (
                item.is_file()
                and not item.name.endswith(".safetensors")
                and item.name not in (INDEX_FILE, "config.json")
            ):
                shutil.copy2(item, staging / item.name)
        if (src / INDEX_FILE).is_file():
            size = sum((staging / s).stat().st_size for s in shards)
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config["quantization_config"] = dict(MXFP4_QUANTIZATION_CONFIG)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst
