"""Write a safetensors file one tensor at a time, so memory stays bounded by the largest tensor.

``safetensors.torch.save_file`` needs every tensor in memory at once; a checkpoint of a real gpt-oss size
does not fit that way. The header only needs shapes and dtypes, which are known before any data exists.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from gptoss_vllm.checkpoints.layout import TensorSpec

_DTYPE_NAMES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def _nbytes(spec: TensorSpec) -> int:
    n = 1
    for s in spec.shape:
        n *= s
    return n * torch.empty((), dtype=spec.dtype).element_size()


def write_streaming(
    path: str | os.PathLike,
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``tensors`` (yielded in the order of ``specs``, each matching its spec) to ``path``.

    Returns the number of bytes written. Raises ValueError naming the tensor on any mismatch; the
    partial file is removed.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors here")
        size = _nbytes(spec)
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    path = Path(path)
    try:
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            produced = iter(tensors)
            for spec in specs:
                name, tensor = next(produced, (None, None))
                if name != spec.name:
                    raise ValueError(f"expected tensor {spec.name} next, got {name}")
                if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
                    raise ValueError(
                        f"{spec.name}: expected shape {tuple(spec.shape)} {spec.dtype}, "
                        f"got {tuple(tensor.shape)} {tensor.dtype}"
                    )
                f.write(memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
            leftover = next(produced, None)
            if leftover is not None:
                raise ValueError(f"tensor {leftover[0]} is not in the header")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return 8 + len(blob) + offset
