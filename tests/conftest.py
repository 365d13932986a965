"""Shared fixtures: tiny gpt-oss checkpoints built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptoss_vllm.checkpoints.builder import write_checkpoint
from gptoss_vllm.checkpoints.config import build_config

TINY_SEED = 7


@pytest.fixture(scope="session")
def tiny_checkpoint_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset, seed ``TINY_SEED``, as an MXFP4 checkpoint and its bf16 twin."""
    root = tmp_path_factory.mktemp("checkpoints")
    config = build_config("tiny")
    return {
        dtype: write_checkpoint(root / f"tiny-{dtype}", config, seed=TINY_SEED, dtype=dtype, progress=False)
        for dtype in ("mxfp4", "bf16")
    }
