"""The serving config: the embedded default, the GPU examples, and errors that name the file and the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from gptoss_vllm.serve.config import ConfigError
from gptoss_vllm.serve.config_load import load_config, parse_config
from gptoss_vllm.serve.pool.engine_args import server_argv
from tests.support.serving_config import BASE, serving_config


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
    "path", sorted((Path(__file__).parents[2] / "deploy").glob("gpt-oss-*.yaml")), ids=str
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
            {"ingress__body_shape__max_depth": 1000},
            "ingress.body_shape.max_depth: Input should be less than or equal to 256",
        ),
        ({"ingress__body_shape__max_keys": 5}, "ingress.body_shape.max_keys: Extra inputs are not permitted"),
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
        ({"pools__fast__autoscaling": {"policy": "vibes"}}, "pools.fast.autoscaling.policy"),
        ({"pools__fast__autoscaling": {"policy": "queue", "target": 0}}, "pools.fast.autoscaling.target"),
        ({"pools__fast__autoscaling": {"policy": "kv_cache", "target": 70}}, "target: KV-cache use is 0..1"),
        ({"pools__fast__autoscaling": {"hysteresis": 1}}, "pools.fast.autoscaling.hysteresis"),
        (
            {"pools__fast__autoscaling": {"policy": "queue", "target_ongoing_requests": 4}},
            "target_ongoing_requests is policy ongoing's",
        ),
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
    path.write_text(yaml.safe_dump(serving_config(**changes)))
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
        serving_config(pools__fast__model="builtin:nano", pools__deep__model="openai/gpt-oss-120b")
    )
    assert config.pools["fast"].resolved_model() == str(tmp_path / "models" / "nano")
    assert config.pools["deep"].resolved_model() == "openai/gpt-oss-120b"
    assert parse_config(serving_config(pools__deep__model="~/m")).pools[
        "deep"
    ].resolved_model() == os.path.expanduser("~/m")


def test_a_pools_tools_become_vllms_tool_server_and_the_ingress_sees_their_names():
    tools = {"python": {"url": "127.0.0.1:8765"}, "browser": {"url": "tools-browser.gptoss:8766"}}
    config = parse_config(serving_config(pools__deep__tools=tools))
    argv = server_argv(config.pools["deep"], config.model_name)
    assert argv[argv.index("--tool-server") + 1] == "127.0.0.1:8765,tools-browser.gptoss:8766"
    assert "--tool-server" not in server_argv(config.pools["fast"], config.model_name)
    assert (
        config.view().pools["deep"].tools == ["python", "browser"] and config.view().pools["fast"].tools == []
    )
    with pytest.raises(ConfigError, match=r"pools\.deep\.tools\.python\.url: .*expected host:port"):
        parse_config(serving_config(pools__deep__tools={"python": {"url": "http://x:1/sse"}}))
    with pytest.raises(ConfigError, match=r"pools\.deep\.tools\.shell"):
        parse_config(serving_config(pools__deep__tools={"shell": {"url": "x:1"}}))
    with pytest.raises(ConfigError, match=r"tool_server: not an engine argument here .*pool's `tools`"):
        parse_config(serving_config(pools__deep__engine_args={"tool_server": "x:1"}))
    # fast spills over to deep: deep must offer what fast offers.
    with pytest.raises(ConfigError, match=r"spillover\.to: deep does not offer the tool\(s\) python"):
        parse_config(serving_config(pools__fast__tools={"python": {"url": "x:1"}}))
