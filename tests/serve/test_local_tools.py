"""The tool servers ``gptoss-vllm serve`` starts on its own machine for pools that name a tool without a url:
started before the pools and named in their config, the browser over the shipped collection, stopped after.
A pool whose tool has no url and no server is refused, as is ``--address`` with such a pool."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from gptoss_vllm.serve.config import ConfigError
from gptoss_vllm.serve.config_load import load_config, parse_config
from tests.support.serving_config import serving_config


def test_serve_starts_the_tools_a_pool_names_without_a_url_and_stops_them(tmp_path, monkeypatch):
    from gptoss_vllm.serve.local_tools import LocalTools
    from gptoss_vllm.serve.pool.engine_args import server_argv

    monkeypatch.setenv("GPTOSS_VLLM_CACHE", str(tmp_path / "cache"))  # the collection's index is built afresh
    config = load_config(None)
    assert config.pools["deep"].tools.without_url() == ["python", "browser"]
    tools = LocalTools(tmp_path / "logs")
    try:
        resolved = tools.resolve(config)
        deep = resolved.pools["deep"].tools
        assert deep.without_url() == [] and resolved.pools["fast"].tools.offered() == []
        for server in (deep.python, deep.browser):
            assert httpx.get(f"http://{server.url}/health", timeout=5).text == "ok"
        argv = server_argv(resolved.pools["deep"], resolved.model_name)
        assert argv[argv.index("--tool-server") + 1] == f"{deep.python.url},{deep.browser.url}"
        assert list((tmp_path / "cache" / "tools").glob("collection-*.db"))  # the shipped collection, indexed
    finally:
        tools.stop()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{deep.python.url}/health", timeout=2)


def test_a_pool_whose_tool_has_no_server_is_refused():
    from gptoss_vllm.serve.app import build_pool_application

    config = parse_config(serving_config(pools__deep__tools={"python": {}}))
    with pytest.raises(ConfigError, match=r"pools\.deep\.tools\.python: no url, and nothing started one"):
        build_pool_application(config.model_name, "deep", config.pools["deep"])


def test_serve_address_refuses_a_tool_without_a_url():
    refused = subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "serve", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "--address: pools.deep.tools.python has no url" in refused.stderr
