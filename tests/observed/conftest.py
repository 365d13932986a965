"""The observed stack: the modules of this folder share it, and it stops once the last of them is done (package
scope), so that it does not idle beside the stacks of later modules. Nano serving and the observability
checks run against it."""

from __future__ import annotations

import time

import httpx
import pytest
import yaml

from gptoss_vllm.serve.config import load_config
from tests.support.admission import HOLD_ENV, HOLD_MAX_MODEL_LEN, HOLD_TOKENS
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.stack import free_port, fresh_cache, start_stack

OBSERVED_KEY = "sk-observed"


@pytest.fixture(scope="package")
def otlp_receiver():
    running = OtlpReceiver()
    yield running
    running.close()


@pytest.fixture(scope="package")
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
