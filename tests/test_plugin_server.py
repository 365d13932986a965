"""vLLM's OpenAI server with the plugin serves the MXFP4 checkpoint: chat (every effort, streamed or not),
completions and responses, through the official ``openai`` client."""

from __future__ import annotations

import openai
import pytest

from gptoss_vllm.serve.process import start_vllm_server

pytestmark = pytest.mark.slow

EFFORTS = ("low", "medium", "high")


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dirs, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    argv = ["--model", str(tiny_checkpoint_dirs["mxfp4"]), "--served-model-name", "tiny"]
    argv += ["--max-model-len", "1024", "--enforce-eager"]
    env = {"GPTOSS_VLLM_MOE_BACKEND": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    running = start_vllm_server(argv, log_path, env=env, timeout_s=600)
    try:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused"), log_path
    finally:
        running.stop()


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
