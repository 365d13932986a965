"""Build the checkpoint of a named preset: seeded random weights, or the trained nano weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gptoss_vllm.checkpoints.builder import write_checkpoint
from gptoss_vllm.checkpoints.config import ModelConfigError, build_config

TRAINED_PRESETS = ("nano",)


def build_preset(
    preset: str,
    out: str | os.PathLike[str],
    seed: int = 0,
    dtype: str = "mxfp4",
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    config = build_config(preset, overrides or {})
    if preset not in TRAINED_PRESETS:
        return write_checkpoint(out, config, seed=seed, dtype=dtype, force=force, progress=progress)
    if overrides:
        raise ModelConfigError(
            f"the {preset} preset is a trained model: its shape cannot be changed with --set"
        )
    from gptoss_vllm.nano.asset import expanded_tensors

    return write_checkpoint(
        out, config, dtype=dtype, force=force, progress=progress, tensors=expanded_tensors(config, dtype),
        description=f"expanding {preset}",
    )  # fmt: skip
