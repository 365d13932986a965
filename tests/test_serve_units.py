"""The serving policy without engines: config validation, effort resolution, budgets, keys, rate limits,
admission and spillover, and the ``serve`` command's argument errors."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gptoss_vllm.serve.config import Auth, Budget, ConfigError, RateLimit, load_config, parse_config
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.ingress.budget import BudgetError, apply_budget
from gptoss_vllm.serve.ingress.effort import EffortError, ResolvedEffort, apply_effort, resolve_effort
from gptoss_vllm.serve.ingress.keys import KeyConfigError, KeyRing
from gptoss_vllm.serve.ingress.rate_limits import RateLimiter
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.pool.engine_args import server_argv

BASE = {
    "model_name": "m",
    "pools": {
        "fast": {
            "model": "/models/x",
            "efforts": ["low", "medium"],
            "spillover": {"to": "deep", "queue_above": 1},
        },
        "deep": {"model": "/models/x", "efforts": ["high"]},
    },
}


def _config(**changes) -> dict:
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


# -- config ----------------------------------------------------------------------------------------------------


def test_embedded_default_is_two_cpu_pools_of_nano():
    config = load_config()
    assert {name: pool.efforts for name, pool in config.pools.items()} == {
        "fast": ["low", "medium"],
        "deep": ["high"],
    }
    assert all(pool.model == "builtin:nano" for pool in config.pools.values())
    assert config.default_effort == "medium"
    argv = server_argv(config.pools["fast"], config.model_name)
    assert argv[argv.index("--reasoning-parser") + 1] == "openai_gptoss"
    assert "--enable-auto-tool-choice" in argv and "--enforce-eager" in argv


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "deploy").glob("gpt-oss-*.yaml")), ids=str
)
def test_gpu_examples_load(path):
    config = load_config(path)
    assert config.model_name.startswith("gpt-oss-")
    assert all(pool.ray_actor_options.get("num_gpus", 0) >= 1 for pool in config.pools.values())
    for pool in config.pools.values():
        argv = server_argv(pool, config.model_name)
        tp = int(argv[argv.index("--tensor-parallel-size") + 1]) if "--tensor-parallel-size" in argv else 1
        assert pool.ray_actor_options["num_gpus"] == tp  # one GPU per tensor-parallel rank


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"pools__fast__replicas": 0}, "pools.fast.replicas: Input should be greater than or equal to 1"),
        ({"pools__fast__colour": "red"}, "pools.fast.colour: Extra inputs are not permitted"),
        (
            {"pools__deep__efforts": ["high", "ultra"]},
            "pools.deep.efforts.1: Input should be 'low', 'medium' or 'high'",
        ),
        (
            {"pools__deep__efforts": ["medium", "high"]},
            "effort 'medium' is served by two pools",
        ),
        (
            {"pools__fast__efforts": ["low"], "pools__deep__efforts": ["medium"]},
            "no pool serves effort(s) high",
        ),
        (
            {"pools__fast__spillover": {"to": "nowhere", "queue_above": 1}},
            "pools.fast.spillover.to: no pool named 'nowhere'",
        ),
        (
            {"pools__fast__autoscaling": {"min_replicas": 1, "max_replicas": 2}, "pools__fast__replicas": 1},
            "either replicas or autoscaling",
        ),
        ({"pools__fast__autoscaling": {"max_replicas": "many"}}, "pools.fast.autoscaling"),
        (
            {"pools__fast__engine_args": {"max_model_lenght": 4096}},
            "pools.fast.engine_args: max_model_lenght: vLLM has no such argument",
        ),
        (
            {"pools__fast__engine_args": {"max_model_len": "huge"}},
            "pools.fast.engine_args: argument --max-model-len",
        ),
        (
            {"pools__fast__engine_args": {"enforce_eager": "yes"}},
            "pools.fast.engine_args: enforce_eager: expected true or false",
        ),
        ({"pools__fast__engine_args": {"served_model_name": "x"}}, "set the top-level `model_name`"),
        (
            {"budgets__high": {"max_tokens": 0}},
            "budgets.high.max_tokens: Input should be greater than or equal to 1",
        ),
        ({"budgets__ultra": {"max_tokens": 5}}, "budgets.ultra.[key]"),
        ({"auth": {}}, "auth: auth needs api_keys_env or api_keys_file"),
        ({"pools": {"Fast_Pool": BASE["pools"]["fast"]}}, "pool name 'Fast_Pool'"),
    ],
)
def test_config_errors_name_the_file_and_the_key(tmp_path, changes, expected):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(_config(**changes)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("pools: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_model_references(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_VLLM_CACHE", str(tmp_path))
    config = parse_config(
        _config(pools__fast__model="builtin:nano", pools__deep__model="openai/gpt-oss-120b")
    )
    assert config.pools["fast"].resolved_model() == str(tmp_path / "models" / "nano")
    assert config.pools["deep"].resolved_model() == "openai/gpt-oss-120b"
    assert parse_config(_config(pools__deep__model="~/m")).pools[
        "deep"
    ].resolved_model() == os.path.expanduser("~/m")


def test_engine_args_become_vllm_flags():
    config = parse_config(
        _config(
            pools__deep__engine_args={
                "tensor-parallel-size": 2,
                "enable_prefix_caching": False,
                "gpu_memory_utilization": 0.9,
            }
        )
    )
    argv = server_argv(config.pools["deep"], "m")
    assert argv[:4] == ["--model", "/models/x", "--served-model-name", "m"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.9"


# -- effort ----------------------------------------------------------------------------------------------------


def test_effort_order_of_sources():
    chat = {"messages": [{"role": "system", "content": "Reasoning: high"}], "reasoning_effort": "low"}
    resolved = resolve_effort("chat", chat, {"x-reasoning-effort": "medium"}, "medium")
    assert (resolved.effort, resolved.source) == ("low", "chat")
    del chat["reasoning_effort"]
    resolved = resolve_effort("chat", chat, {"x-reasoning-effort": "medium"}, "medium")
    assert (resolved.effort, resolved.source) == ("medium", "header")
    resolved = resolve_effort("chat", chat, {}, "medium")
    assert (resolved.effort, resolved.source) == ("high", "system")
    resolved = resolve_effort("chat", {"messages": []}, {}, "low")
    assert (resolved.effort, resolved.source) == ("low", "default")
    responses = {"reasoning": {"effort": "high"}, "instructions": "Reasoning: low"}
    resolved = resolve_effort("responses", responses, {"x-reasoning-effort": "low"}, "medium")
    assert (resolved.effort, resolved.source) == ("high", "responses")
    del responses["reasoning"]
    assert resolve_effort("responses", responses, {}, "medium").source == "system"
    # Chat's field means nothing to the Responses API and the other way round.
    assert resolve_effort("responses", {"reasoning_effort": "high"}, {}, "low").source == "default"
    assert resolve_effort("chat", {"reasoning": {"effort": "high"}}, {}, "low").source == "default"
    # A user message is not an instruction.
    user = {"messages": [{"role": "user", "content": "Reasoning: high"}]}
    assert resolve_effort("chat", user, {}, "low").source == "default"


@pytest.mark.parametrize(
    ("endpoint", "body", "headers", "param"),
    [
        ("chat", {"reasoning_effort": "ultra"}, {}, "reasoning_effort"),
        ("chat", {"reasoning_effort": 3}, {}, "reasoning_effort"),
        ("chat", {}, {"x-reasoning-effort": "minimal"}, "header X-Reasoning-Effort"),
        ("responses", {"reasoning": {"effort": "none"}}, {}, "reasoning.effort"),
    ],
)
def test_bad_effort_values(endpoint, body, headers, param):
    with pytest.raises(EffortError) as err:
        resolve_effort(endpoint, body, headers, "medium")
    assert err.value.param == param
    assert "allowed values are low, medium, high" in str(err.value)


def test_an_unknown_system_line_value_is_skipped_not_refused(caplog):
    body = {"messages": [{"role": "developer", "content": "Reasoning: thorough\nReasoning: high"}]}
    with caplog.at_level("INFO", logger="ray.serve"):
        assert resolve_effort("chat", body, {}, "medium") == ResolvedEffort("high", "system")
    assert "thorough" in caplog.text
    prose = {"messages": [{"role": "system", "content": "Reasoning: careful, step by step"}]}
    assert resolve_effort("chat", prose, {}, "low") == ResolvedEffort("low", "default")


def test_the_resolved_effort_is_written_into_the_body():
    chat, responses, completions = {}, {"reasoning": {"summary": "auto"}}, {"prompt": "x"}
    apply_effort("chat", chat, "high")
    apply_effort("responses", responses, "low")
    apply_effort("completions", completions, "high")
    assert chat == {"reasoning_effort": "high"}
    assert responses == {"reasoning": {"summary": "auto", "effort": "low"}}
    assert completions == {"prompt": "x"}


# -- budgets ---------------------------------------------------------------------------------------------------


def test_budget_clamps_fills_and_rejects():
    clamp, reject = Budget(max_tokens=100), Budget(max_tokens=100, over_budget="reject")
    body = {"max_tokens": 500}
    assert apply_budget("chat", body, "low", clamp).clamped_from == 500 and body["max_tokens"] == 100
    body = {}
    assert apply_budget("chat", body, "low", clamp).max_tokens == 100 and body == {
        "max_completion_tokens": 100
    }
    body = {}
    assert apply_budget("responses", body, "low", clamp).max_tokens == 100 and body == {
        "max_output_tokens": 100
    }
    body = {}
    assert apply_budget("completions", body, "low", clamp).max_tokens is None and body == {}
    body = {"max_tokens": 50}
    assert apply_budget("chat", body, "low", reject).clamped_from is None and body == {"max_tokens": 50}
    with pytest.raises(BudgetError) as err:
        apply_budget("chat", {"max_completion_tokens": 101, "max_tokens": 5}, "high", reject)
    assert (err.value.param, err.value.code) == ("max_completion_tokens", "over_budget")
    for bad in (-1, 0, "10", 2.5, True):
        with pytest.raises(BudgetError) as err:
            apply_budget("chat", {"max_tokens": bad}, "low", None)
        assert err.value.code == "invalid_value"


# -- keys and rate limits ----------------------------------------------------------------------------------------


def test_key_ring_from_file_and_env(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nalice:sk-a\n\nsk-bare\n")
    monkeypatch.setenv("TEST_KEYS", "bob:sk-b, sk-env")
    ring = KeyRing(Auth(api_keys_env="TEST_KEYS", api_keys_file=str(keys)), recheck_s=0)
    assert ring.name_of("Bearer sk-a") == "alice"
    assert ring.name_of("bearer  sk-b") == "bob"
    assert ring.name_of("Bearer sk-bare").startswith("key-")
    assert ring.name_of("Bearer sk-env").startswith("key-")
    for bad in (None, "", "Bearer", "Bearer sk-x", "Basic sk-a", "sk-a"):
        assert ring.name_of(bad) is None
    # Rotation: a changed file is picked up; one that cannot be read keeps the keys in force and is
    # reported; one emptied on purpose (Secret updates are atomic) denies everyone.
    reloads = []
    ring = KeyRing(Auth(api_keys_file=str(keys)), recheck_s=0, on_reload=lambda *seen: reloads.append(seen))
    keys.write_text("carol:sk-c\n")
    os.utime(keys, (time.time() + 5, time.time() + 5))
    assert ring.name_of("Bearer sk-c") == "carol" and ring.name_of("Bearer sk-a") is None
    keys.write_bytes(b"\xff\xfe not text")
    os.utime(keys, (time.time() + 10, time.time() + 10))
    assert ring.name_of("Bearer sk-c") == "carol"
    keys.write_text("")
    os.utime(keys, (time.time() + 15, time.time() + 15))
    assert ring.name_of("Bearer sk-c") is None and len(ring) == 0
    assert reloads == [(True, 1), (False, 1), (True, 0)]


def test_a_bare_key_with_colons_is_never_cut(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ops:sk-ops\nsk-proj:a:b\n:sk:explicit\nuser@example.com:pass\n")
    ring = KeyRing(Auth(api_keys_file=str(keys)))
    assert ring.name_of("Bearer sk-ops") == "ops"
    assert ring.name_of("Bearer sk-proj:a:b").startswith("key-")  # two colons: bare, whole
    assert ring.name_of("Bearer a:b") is None
    assert ring.name_of("Bearer sk:explicit").startswith("key-")  # ':KEY' says bare
    assert ring.name_of("Bearer user@example.com:pass").startswith("key-")  # not a valid name: bare
    assert ring.name_of("Bearer pass") is None


def test_key_ring_refuses_to_run_open(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEYS", raising=False)
    with pytest.raises(KeyConfigError, match="hold no API key"):
        KeyRing(Auth(api_keys_env="NO_SUCH_KEYS"))
    with pytest.raises(KeyConfigError, match="cannot read"):
        KeyRing(Auth(api_keys_file=str(tmp_path / "absent")))
    (tmp_path / "bad").write_text("name:\n")
    with pytest.raises(KeyConfigError, match="entry 1"):
        KeyRing(Auth(api_keys_file=str(tmp_path / "bad")))


def test_rate_limiter_buckets_per_key():
    limiter = RateLimiter(
        RateLimit(requests_per_minute=60, burst=2), {"vip": RateLimit(requests_per_minute=600, burst=5)}
    )
    assert [limiter.acquire("a", now=0.0) for _ in range(2)] == [None, None]
    assert limiter.acquire("a", now=0.0) == pytest.approx(1.0)
    assert limiter.acquire("a", now=0.5) == pytest.approx(0.5)
    assert limiter.acquire("a", now=1.0) is None
    assert limiter.acquire("b", now=0.0) is None  # keys do not share buckets
    assert all(limiter.acquire("vip", now=0.0) is None for _ in range(5))
    assert RateLimiter(None, {}).acquire("anyone") is None


# -- admission -----------------------------------------------------------------------------------------------------


def test_admission_queue_bound_spillover_and_no_replica():
    config = parse_config(
        _config(
            pools__fast__max_ongoing_requests=2,
            pools__fast__max_queued_requests=2,
            pools__deep__max_ongoing_requests=1,
            pools__deep__max_queued_requests=0,
        )
    )
    admission = Admission(config)
    with pytest.raises(Refusal) as err:
        admission.admit("deep")
    assert (err.value.status, err.value.reason) == (503, "no_replica")
    admission.running.update(fast=1, deep=1)
    placed = []
    for _ in range(6):
        try:
            decision = admission.admit("fast")
        except Refusal as exc:
            placed.append(exc.reason)
            continue
        admission.started(decision.pool)
        placed.append(f"{decision.pool}<-{decision.spilled_from}" if decision.spilled_from else decision.pool)
    # 2 run, 2 wait (the second passes queue_above 1), the next spills to deep (1 slot), then fast is full.
    assert placed == ["fast", "fast", "fast", "fast", "deep<-fast", "queue_full"]
    assert admission.queue_depth("fast") == 2
    admission.finished("fast")
    # With no running replica, a pool spills if it can, else refuses at once.
    admission.running["fast"] = 0
    admission.finished("deep")
    assert admission.admit("fast").spilled_from == "fast"


def test_a_pool_scaled_to_zero_holds_its_requests_up_to_its_queue_bound_and_stays_ready():
    config = parse_config(
        _config(
            pools__fast__replicas=None,
            pools__fast__autoscaling={"min_replicas": 0, "max_replicas": 2},
            pools__fast__max_queued_requests=2,
            pools__fast__spillover={"to": "deep", "queue_above": 1},
        )
    )
    fast = config.pools["fast"]
    assert (fast.min_replicas, fast.scales_from_zero) == (0, True)
    assert (config.pools["deep"].min_replicas, config.pools["deep"].scales_from_zero) == (1, False)
    admission = Admission(config)
    admission.running["deep"] = 1
    assert admission.pool_state("fast") == "scaled_to_zero"
    assert admission.pool_state("deep") == "serving"
    # Not spilled although deep has room: Ray Serve starts a replica only for requests sent to the pool.
    first = admission.admit("fast")
    assert (first.pool, first.spilled_from, first.cold_start) == ("fast", None, True)
    admission.started("fast")
    assert admission.pool_state("fast") == "cold_start"
    admission.admit("fast")
    admission.started("fast")
    # Past queue_above the rest spills while the replica starts; with no room there, the queue bound holds.
    assert admission.admit("fast").spilled_from == "fast"
    admission.running["deep"] = 0
    with pytest.raises(Refusal) as err:
        admission.admit("fast")
    assert (err.value.status, err.value.reason) == (429, "queue_full")
    assert admission.pool_state("deep") == "no_replica"
    # Once a replica runs, requests are ordinary ones again.
    admission.running["fast"] = 1
    assert admission.admit("fast").cold_start is False
    assert admission.pool_state("fast") == "serving"


# -- the command ------------------------------------------------------------------------------------------------------


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "serve", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_command_argument_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_config(pools__fast__replicas=-1)))
    result = _serve_cli("--config", str(bad))
    assert result.returncode == 2
    assert (
        "--config" in result.stderr and "pools.fast.replicas" in result.stderr and str(bad) in result.stderr
    )
    result = _serve_cli("--port", "70000")
    assert result.returncode == 2 and "--port" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = _serve_cli("--port", str(busy.getsockname()[1]))
    assert result.returncode == 2 and "already in use" in result.stderr


# -- deployments and routing -----------------------------------------------------------------------------------------


def test_pool_deployment_options():
    from ray.serve._private.utils import import_attr

    from gptoss_vllm.lifetime import EXIT_WITH_PARENT_ENV
    from gptoss_vllm.serve.app import pool_deployment_options

    config = parse_config(
        _config(
            pools__fast__autoscaling={"min_replicas": 1, "max_replicas": 3},
            pools__fast__env={"A": "1"},
            pools__fast__ray_actor_options={"num_gpus": 1, "runtime_env": {"env_vars": {"B": "2"}}},
            pools__deep__router="prefix_aware",
            pools__deep__replicas=2,
        )
    )
    fast = pool_deployment_options("fast", config.pools["fast"])
    assert fast["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3} and "num_replicas" not in fast
    assert fast["ray_actor_options"]["num_gpus"] == 1
    assert fast["ray_actor_options"]["runtime_env"]["env_vars"] == {
        EXIT_WITH_PARENT_ENV: "1",
        "B": "2",
        "A": "1",
    }
    deep = pool_deployment_options("deep", config.pools["deep"])
    assert deep["num_replicas"] == 2
    router = import_attr(deep["request_router_config"].request_router_class)
    assert router.__name__ == "CountingPrefixAwareRouter"
    assert (
        import_attr(fast["request_router_config"].request_router_class).__name__ == "CountingPowerOfTwoRouter"
    )


def test_pool_requests_show_their_prompt_to_the_prefix_aware_router():
    from gptoss_vllm.serve.pool.deployment import PoolRequest

    # Ray Serve LLM's prefix-aware router reads the prompt from these attributes.
    chat = PoolRequest(
        "POST", "/v1/chat/completions", payload={"messages": [{"role": "user", "content": "x"}]}
    )
    assert chat.messages == [{"role": "user", "content": "x"}]
    assert PoolRequest("POST", "/v1/completions", payload={"prompt": "p"}).prompt == "p"


def test_build_app_takes_the_config_inline_as_the_helm_chart_writes_it():
    from ray.serve import Application

    from gptoss_vllm.serve.app import build_app
    from gptoss_vllm.serve.config import ConfigError, load_config

    inline = load_config(None).model_dump(exclude_none=True)
    assert isinstance(build_app({"serve": inline}), Application)
    inline["pools"]["fast"]["efforts"] = ["low"]  # medium is served by no pool now
    with pytest.raises(ConfigError, match=r"^serveConfigV2 args\.serve: .*medium"):
        build_app({"serve": inline})


def test_the_ingress_queue_is_bounded_and_answers_503_with_retry_after():
    from gptoss_vllm.serve.app import build_application

    config = parse_config(_config(ingress={"max_queued_requests": 50, "retry_after_s": 3}))
    ingress = build_application(config)._bound_deployment
    assert ingress.name == "ingress" and ingress.max_queued_requests == 50
    assert ingress.backpressure_config.status_code == 503 and ingress.backpressure_config.retry_after_s == 3
    # Ray's default (-1) would hold every connection of a flood.
    assert build_application(parse_config(_config()))._bound_deployment.max_queued_requests == 1000


def test_serve_hands_its_ray_the_proxy_gate_and_a_monitoring_token(monkeypatch):
    from gptoss_vllm.serve.launcher import proxy_environment

    monkeypatch.delenv("GPTOSS_MONITORING_TOKEN", raising=False)
    config = parse_config(_config(ingress={"max_header_bytes": 4096, "body_timeout_s": 7}))
    env = proxy_environment(config)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "gptoss_vllm.serve.proxy.callback:middlewares"
    assert env["GPTOSS_MAX_BODY_BYTES"] == str(config.body_limit())
    assert (env["GPTOSS_MAX_HEADER_BYTES"], env["GPTOSS_BODY_TIMEOUT_S"]) == ("4096", "7")
    assert len(env["GPTOSS_MONITORING_TOKEN"]) >= 24 and env != proxy_environment(config)  # fresh each time
    monkeypatch.setenv("GPTOSS_MONITORING_TOKEN", "operator-chosen")
    assert proxy_environment(config)["GPTOSS_MONITORING_TOKEN"] == "operator-chosen"
