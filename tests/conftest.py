"""Shared fixtures: tiny gpt-oss checkpoints and the engine runners; the stacks live where their tests are (the
shared ``stack`` in ``tests/serve/conftest.py``). Every stack of the session gets ``MONITORING_TOKEN`` for its
service discovery route. The markers of the fast and slow tiers follow from
the fixtures each test uses."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from gptoss_vllm.checkpoints.builder import write_checkpoint
from gptoss_vllm.checkpoints.config import build_config
from tests.support.cli import run_cli
from tests.support.engines import run_offline_batch

TINY_SEED = 7
# The stacks' processes inherit it (serve keeps a token it finds); tests present it to GET /metrics/targets.
MONITORING_TOKEN = os.environ.setdefault("GPTOSS_VLLM_MONITORING_TOKEN", secrets.token_urlsafe(18))


# Fixtures that start a vLLM engine, Ray or a stack, and the markers a test that uses one (itself or through
# another fixture) gets: `make test-fast` (-m "not slow") leaves them out. A test that starts such a thing
# does it through one of these fixtures, never in its body, so that its markers follow from what it uses.
HEAVY_FIXTURES: dict[str, tuple[str, ...]] = {
    "stack": ("slow",),  # the shared stack, or a module's own (two ingresses)
    "plugin_server": ("slow",),
    "plugin_runs": ("slow",),
    "stock_runs": ("slow",),
    "offline_engines": ("slow",),
    "bench_cli": ("slow",),
    "cluster": ("slow", "cluster"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers from the heavy fixtures each test uses; tests that stop or break a folder's stack run after all
    others of that folder, which stays where it was in the run (its stack is the folder's, stopped when the
    folder is done). A stable sort keeps the rest in order."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker in {m for name in names & HEAVY_FIXTURES.keys() for m in HEAVY_FIXTURES[name]}:
            item.add_marker(marker)
    folders: dict[Path, int] = {}
    for item in items:
        folders.setdefault(_top_folder(item), len(folders))
    items.sort(
        key=lambda item: (folders[_top_folder(item)], item.get_closest_marker("stops_stack") is not None)
    )


def _top_folder(item: pytest.Item) -> Path:
    """The folder right under ``tests/`` that holds the item's module (``tests/`` itself for its own modules)."""
    path = Path(item.path).resolve()
    tests = Path(__file__).resolve().parent
    relative = path.relative_to(tests).parts
    return tests / relative[0] if len(relative) > 1 else tests


@pytest.fixture(scope="session")
def offline_engines():
    """Runs offline vLLM engines (``tests.support.engines.run_offline_batch``)."""
    return run_offline_batch


@pytest.fixture(scope="session")
def bench_cli():
    """Runs ``gptoss-vllm bench ...`` (each bench starts its own engines or Ray) as a subprocess."""

    def run(*args: str, timeout: float = 1200):
        return run_cli("bench", *args, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset, seed ``TINY_SEED``, as an MXFP4 checkpoint and its bf16 twin."""
    root = tmp_path_factory.mktemp("checkpoints")
    config = build_config("tiny")
    return {
        dtype: write_checkpoint(root / f"tiny-{dtype}", config, seed=TINY_SEED, dtype=dtype, progress=False)
        for dtype in ("mxfp4", "bf16")
    }
