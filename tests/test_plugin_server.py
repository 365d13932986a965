"""vLLM's OpenAI server with the plugin serves the MXFP4 checkpoint: chat (every effort, streamed or not),
completions and responses, through the official ``openai`` client."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.support.stack import free_port

pytestmark = pytest.mark.slow

EFFORTS = ("low", "medium", "high")


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dirs, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    env = {**os.environ, "GPTOSS_VLLM_MOE_BACKEND": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_checkpoint_dirs["mxfp4"]),
    ]
    cmd += ["--served-model-name", "tiny", "--port", str(port), "--max-model-len", "1024", "--enforce-eager"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()[-5000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            else:
                pytest.fail("vLLM's server did not become ready in 600 s:\n" + log_path.read_text()[-5000:])
            yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused"), log_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_the_plugin_serves_the_mxfp4_checkpoint(server) -> None:
    _, log_path = server
    log = log_path.read_text()
    assert "gpt-oss MoE backend: cpu" in log
    assert "gpt-oss expert weights resident" in log


@pytest.mark.parametrize("effort", EFFORTS)
def test_chat_completions_for_each_effort(server, effort: str) -> None:
    client, _ = server
    reply = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        reasoning_effort=effort,
        max_tokens=24,
    )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert (
        reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10
    )  # harmony system + user prompt


@pytest.mark.parametrize("effort", EFFORTS)
def test_streamed_chat_completions_for_each_effort(server, effort: str) -> None:
    client, _ = server
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to three."}],
        reasoning_effort=effort,
        max_tokens=24,
        stream=True,
    )
    chunks = list(stream)
    assert len(chunks) > 1
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason in ("length", "stop", None)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completions(server) -> None:
    client, _ = server
    reply = client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens == 8 and reply.choices[0].text


def test_responses(server) -> None:
    client, _ = server
    reply = client.responses.create(
        model="tiny", input="Say hi.", reasoning={"effort": "low"}, max_output_tokens=24
    )
    assert reply.status in ("completed", "incomplete")
    assert reply.usage.output_tokens > 0
