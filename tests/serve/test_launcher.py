"""The ``serve`` command: its argument errors, and the environment it hands its Ray (proxy gate, token)."""

from __future__ import annotations

import socket
import subprocess
import sys

import yaml

from gptoss_vllm.serve.config_load import parse_config
from tests.support.serving_config import serving_config


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "serve", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_command_argument_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(serving_config(pools__fast__replicas=-1)))
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


def test_serve_hands_its_ray_the_proxy_gate_and_a_monitoring_token(monkeypatch):
    from gptoss_vllm.serve.launcher import proxy_environment

    monkeypatch.delenv("GPTOSS_VLLM_MONITORING_TOKEN", raising=False)
    config = parse_config(serving_config(ingress={"max_header_bytes": 4096, "body_timeout_s": 7}))
    env = proxy_environment(config)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "gptoss_vllm.serve.proxy.callback:middlewares"
    assert env["GPTOSS_VLLM_MAX_BODY_BYTES"] == str(config.body_limit())
    assert (env["GPTOSS_VLLM_MAX_HEADER_BYTES"], env["GPTOSS_VLLM_BODY_TIMEOUT_S"]) == ("4096", "7")
    assert len(env["GPTOSS_VLLM_MONITORING_TOKEN"]) >= 24 and env != proxy_environment(
        config
    )  # fresh each time
    monkeypatch.setenv("GPTOSS_VLLM_MONITORING_TOKEN", "operator-chosen")
    assert proxy_environment(config)["GPTOSS_VLLM_MONITORING_TOKEN"] == "operator-chosen"


def test_the_ready_message_shows_a_python_tool_call_where_a_pool_offers_python():
    import json
    import shlex

    from gptoss_vllm.serve.config_load import load_config
    from gptoss_vllm.serve.launcher import curl_examples

    default = load_config(None)
    chat, tool = curl_examples(default, "http://127.0.0.1:8000")
    assert "/v1/chat/completions" in chat
    words = shlex.split(tool)
    body = json.loads(words[words.index("-d") + 1])
    assert words[2] == "http://127.0.0.1:8000/v1/responses"
    assert body["tools"] == [{"type": "code_interpreter", "container": {"type": "auto"}}]
    assert body["reasoning"]["effort"] in default.pools["deep"].efforts  # the pool that offers python
    no_tools = parse_config(serving_config(), source="test")
    assert len(curl_examples(no_tools, "http://h:1")) == 1
