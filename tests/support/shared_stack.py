"""The shared stack of ``tests/serve/``: the embedded default (nano in two pools, built from the committed asset
into an empty cache: ``stack.cache``) with tight bounds (a few requests spill over and get refused), API keys
and per-key limits, its conversations in a real ``redis-server`` with a password (``stack.redis``),
``--prometheus`` (``stack.prometheus_url``), OTLP tracing into the test's receiver, and the python tool's server
(``stack.python_tool``), which ``deep`` offers beside the browser ``serve`` starts.

One stack serves every test module of ``tests/serve/`` that asks for the ``stack`` fixture
(``tests/serve/conftest.py``); tests that stop or break it are marked ``stops_stack`` and run last there.
``keys_path`` is its API keys file (tests rotate it).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path

import httpx
import yaml

from gptoss_vllm.serve.config_load import load_config
from tests.support import http
from tests.support.admission import HOLD_ENV, HOLD_MAX_MODEL_LEN, HOLD_TOKENS
from tests.support.redis_server import RunningRedis, start_redis
from tests.support.stack import RunningStack, free_port, fresh_cache, start_stack, start_tool_server

MODEL = "gpt-oss-nano"  # the embedded default's
MAIN_KEY = "sk-test-main"
LIMITED_KEY = "sk-test-limited"
CAPPED_KEY = "sk-test-capped"  # one sequence in flight, few tokens per minute
TPM_KEY = "sk-test-tpm"
LOW_BUDGET = 256  # the embedded default's
CAPPED_TOKENS_PER_MINUTE = 120
KEYS_RECHECK_S = 1.0  # the rotation tests wait for it
BODY_TIMEOUT_S = 3  # short, so that a stalled upload's 408 comes soon
STORE_PASSWORD = "sk-store-secret"
METRICS_PORT_COUNT = 16  # the chart's metricsPortCount, and how far a metrics endpoint looks for a free port


AUTH = {"Authorization": f"Bearer {MAIN_KEY}"}
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def post(stack: RunningStack, path: str, body, headers=None, **kw) -> httpx.Response:
    """POST ``body`` (JSON unless bytes or text) with the main key, and ``headers`` on top."""
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return http.post(
        f"{stack.url}{path}", content=content, headers={**AUTH, **(headers or {})}, timeout=120, **kw
    )


def held_chat(effort: str) -> dict:
    """A held slot's chat body (``tests.support.admission``): the longest output the effort's budget allows."""
    return {
        "messages": USER,
        "max_tokens": HOLD_TOKENS,
        "ignore_eos": True,
        "reasoning_effort": effort,
    }


def keys_file_text() -> str:
    return f"# tenants\nmain:{MAIN_KEY}\nlimited:{LIMITED_KEY}\ncapped:{CAPPED_KEY}\ntpm:{TPM_KEY}\n"


def serve_config(keys: Path) -> dict:
    """The embedded default with this stack's bounds, keys, limits and budgets (the store comes later)."""
    config = load_config(None).model_dump(exclude_none=True)
    pools = config["pools"]
    # One request at a time, so that two overlapping ones already make fast spill over.
    pools["fast"] |= {"max_ongoing_requests": 1, "max_queued_requests": 2, "drain_timeout_s": 60}
    pools["fast"]["spillover"] = {"to": "deep", "queue_above": 0}
    pools["deep"] |= {"max_ongoing_requests": 2, "max_queued_requests": 1, "drain_timeout_s": 60}
    for pool in pools.values():
        # Held slots need long outputs; the plugin's own CPU kernel on every CPU (auto picks vLLM's on AMX).
        pool["engine_args"]["max_model_len"] = HOLD_MAX_MODEL_LEN
        pool["env"] |= {"GPTOSS_VLLM_MOE_BACKEND": "cpu", **HOLD_ENV}
    config["budgets"]["low"] = {"max_tokens": LOW_BUDGET}
    config["budgets"]["medium"] = {"max_tokens": HOLD_TOKENS}
    config["budgets"]["high"] = {"max_tokens": HOLD_TOKENS, "over_budget": "reject"}
    config["auth"] = {
        "api_keys_file": str(keys),
        "api_keys_recheck_s": KEYS_RECHECK_S,
        "key_rate_limits": {
            "limited": {"requests_per_minute": 6, "burst": 2},
            "capped": {"concurrent_requests": 1},
            "tpm": {"tokens_per_minute": CAPPED_TOKENS_PER_MINUTE},
        },
    }
    # Pinning and kill tests compare replicas; the default keeps replica ids from clients.
    config["ingress"] = {"expose_replica_ids": True, "body_timeout_s": BODY_TIMEOUT_S}
    return config


def start_shared_stack(root: Path, otlp_endpoint: str) -> RunningStack:
    keys = root / "keys"
    keys.write_text(keys_file_text())
    config = serve_config(keys)
    # Metrics on fixed ports, as the chart runs them: the preStop hook scans this range.
    metrics_port = free_port_range(METRICS_PORT_COUNT)
    prometheus_port = free_port()
    redis = start_redis(root, password=STORE_PASSWORD)
    config["response_store"] = {"backend": "redis", "url": redis.url, "timeout_s": 1.0}
    # deep offers the python tool of this test's server, and the browser `serve` starts (the embedded default's).
    try:
        python_tool = start_tool_server("python", root / "python-tool.log")
    except BaseException:
        redis.stop()
        raise
    config["pools"]["deep"]["tools"]["python"] = {"url": python_tool.address}
    config_path = root / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        "GPTOSS_VLLM_CACHE": str(fresh_cache(root / "cache")),
        "GPTOSS_VLLM_RESPONSE_STORE_PASSWORD": STORE_PASSWORD,
        "GPTOSS_VLLM_METRICS_PORT": str(metrics_port),
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp_endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    try:
        running = start_stack(
            config_path,
            root / "serve.log",
            env=env,
            args=["--prometheus", "--prometheus-port", str(prometheus_port)],
        )
    except BaseException:
        redis.stop()
        python_tool.stop()
        raise
    running.keys_path = keys
    running.redis = redis
    running.python_tool = python_tool
    running.metrics_port = metrics_port
    running.cache = root / "cache"
    running.checkpoint = root / "cache" / "models" / "nano"
    running.api_key = MAIN_KEY
    running.prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    try:
        _wait_for_prometheus(running.prometheus_url)
    except BaseException:
        running.stop()
        redis.stop()
        python_tool.stop()
        raise
    return running


def _wait_for_prometheus(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the stack's Prometheus at {url} was not ready after {timeout_s} s")


def free_port_range(count: int) -> int:
    """The first of ``count`` free consecutive ports, below the ephemeral range that other stacks draw from."""
    for base in range(20000, 30000, count):
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} free consecutive ports in 20000-30000")


def restart_redis(running: RunningRedis, workdir: Path) -> RunningRedis:
    """The same server again, on its port (empty: it keeps nothing on disk)."""
    running.stop()
    return start_redis(workdir, password=running.password, port=running.port)
