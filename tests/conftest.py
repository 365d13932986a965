"""Shared fixtures: tiny gpt-oss checkpoints and the shared ``stack`` (once per session; tests marked
``stops_stack`` run last); the observed stack (nano served with a local Prometheus and tracing, once per session:
the observability and nano serving modules share it). Every stack started here gets ``MONITORING_TOKEN`` for its service discovery route."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gptoss_vllm.checkpoints.builder import write_checkpoint
from gptoss_vllm.checkpoints.config import build_config
from gptoss_vllm.serve.config import load_config
from tests.support.admission import HOLD_ENV, HOLD_MAX_MODEL_LEN, HOLD_TOKENS
from tests.support.cli import run_cli
from tests.support.engines import run_offline_batch
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.shared_stack import start_shared_stack
from tests.support.stack import free_port, fresh_cache, start_stack

TINY_SEED = 7
OBSERVED_KEY = "sk-observed"
# The stacks' processes inherit it (serve keeps a token it finds); tests present it to GET /metrics/targets.
MONITORING_TOKEN = os.environ.setdefault("GPTOSS_MONITORING_TOKEN", secrets.token_urlsafe(18))


# Fixtures that start a vLLM engine, Ray or a stack, and the markers a test that uses one (itself or through
# another fixture) gets: `make test-fast` (-m "not slow") leaves them out. A test that starts such a thing
# does it through one of these fixtures, never in its body, so that its markers follow from what it uses.
HEAVY_FIXTURES: dict[str, tuple[str, ...]] = {
    "stack": ("slow",),  # the shared stack, or a module's own (two ingresses)
    "observed_stack": ("slow",),
    "plugin_server": ("slow",),
    "plugin_runs": ("slow",),
    "stock_runs": ("slow",),
    "offline_engines": ("slow",),
    "bench_cli": ("slow",),
    "cluster": ("slow", "cluster"),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers from the heavy fixtures each test uses; tests that stop or break the shared stack run after all
    others (a stable sort keeps the rest in order)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for marker in {m for name in names & HEAVY_FIXTURES.keys() for m in HEAVY_FIXTURES[name]}:
            item.add_marker(marker)
    items.sort(key=lambda item: item.get_closest_marker("stops_stack") is not None)


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


@pytest.fixture(scope="session")
def stack(tiny_checkpoint_dirs, tmp_path_factory):
    """The shared stack (``tests/support/shared_stack.py``)."""
    running = start_shared_stack(tiny_checkpoint_dirs["mxfp4"], tmp_path_factory.mktemp("stack"))
    yield running
    running.stop()
    running.redis.stop()


@pytest.fixture(scope="session")
def otlp_receiver():
    running = OtlpReceiver()
    yield running
    running.close()


@pytest.fixture(scope="session")
def observed_stack(tmp_path_factory, otlp_receiver):
    """The embedded default (nano in two pools, built into an empty cache: ``.cache``) with tight bounds (a few
    requests spill over and get refused), API key ``OBSERVED_KEY``, ``--prometheus`` (``.prometheus_url``) and
    OTLP tracing into ``otlp_receiver``; otherwise as the default, replica ids kept from clients included."""
    root = tmp_path_factory.mktemp("observed")
    (root / "keys").write_text(f"observer:{OBSERVED_KEY}\n")
    config = load_config(None).model_dump(exclude_none=True)
    # Tight bounds, so that a handful of requests spill over and get refused.
    config["pools"]["fast"] |= {"max_ongoing_requests": 1, "max_queued_requests": 2}
    config["pools"]["fast"]["spillover"] = {"to": "deep", "queue_above": 0}
    config["pools"]["deep"] |= {"max_ongoing_requests": 2, "max_queued_requests": 1}
    # Held slots (tests.support.admission) need a long context and budgets that allow their outputs.
    for pool in config["pools"].values():
        pool["engine_args"]["max_model_len"] = HOLD_MAX_MODEL_LEN
        pool["env"] |= HOLD_ENV
    config["budgets"]["medium"] = {"max_tokens": HOLD_TOKENS}
    config["budgets"]["high"] = {"max_tokens": HOLD_TOKENS, "over_budget": "reject"}
    config["auth"] = {"api_keys_file": str(root / "keys")}
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    prometheus_port = free_port()
    env = {
        "GPTOSS_VLLM_CACHE": str(fresh_cache(root / "cache")),
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    args = ["--prometheus", "--prometheus-port", str(prometheus_port)]
    running = start_stack(root / "serve.yaml", root / "serve.log", env=env, args=args)
    running.cache = root / "cache"
    running.prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    running.api_key = OBSERVED_KEY
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{running.prometheus_url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        running.stop()
        pytest.fail(f"the local Prometheus did not come up:\n{running.log_tail()}")
    yield running
    assert running.stop() == 0
    with pytest.raises(httpx.HTTPError):  # Ctrl-C stopped Prometheus too
        httpx.get(f"{running.prometheus_url}/-/ready", timeout=2)
