"""vLLM's OpenAI server with the plugin serves the MXFP4 checkpoint: chat (every effort, streamed or not),
completions and responses, through the official ``openai`` client; and a follow-up expanded from the ingress's
conversation store renders, token for token, the prompt vLLM's own store renders for it."""

from __future__ import annotations

import openai
import pytest

from gptoss_vllm.bench.process import start_tool_server, start_vllm_server
from gptoss_vllm.serve.ingress.responses.conversation import as_items, follow_up_input
from gptoss_vllm.serve.ingress.responses.store import StoredConversation

EFFORTS = ("low", "medium", "high")


@pytest.fixture(scope="module")
def python_tool(tmp_path_factory):
    """The python tool's MCP server, which vLLM connects to at its start (``--tool-server``)."""
    running = start_tool_server("python", tmp_path_factory.mktemp("python-tool") / "server.log")
    yield running.address
    running.stop(timeout_s=30)


@pytest.fixture(scope="module")
def plugin_server(tiny_checkpoint_dirs, tmp_path_factory, python_tool):
    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    argv = ["--model", str(tiny_checkpoint_dirs["mxfp4"]), "--served-model-name", "tiny"]
    argv += ["--max-model-len", "1024", "--enforce-eager", "--tool-server", python_tool]
    # vLLM's own Responses store: the baseline the ingress's conversation store is compared with.
    env = {
        "GPTOSS_VLLM_MOE_BACKEND": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_RESPONSES_API_STORE": "1",
    }
    running = start_vllm_server(argv, log_path, env=env, timeout_s=600)
    try:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused"), log_path
    finally:
        running.stop()


def test_the_plugin_serves_the_mxfp4_checkpoint(plugin_server) -> None:
    _, log_path = plugin_server
    log = log_path.read_text()
    assert "gpt-oss MoE backend: cpu" in log
    assert "gpt-oss expert weights resident" in log


@pytest.mark.parametrize("effort", EFFORTS)
def test_chat_completions_for_each_effort(plugin_server, effort: str) -> None:
    client, _ = plugin_server
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
def test_streamed_chat_completions_for_each_effort(plugin_server, effort: str) -> None:
    client, _ = plugin_server
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


def test_completions(plugin_server) -> None:
    client, _ = plugin_server
    reply = client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=8, temperature=0)
    assert reply.usage.completion_tokens == 8 and reply.choices[0].text


def test_responses(plugin_server) -> None:
    client, _ = plugin_server
    reply = client.responses.create(
        model="tiny", input="Say hi.", reasoning={"effort": "low"}, max_output_tokens=24
    )
    assert reply.status in ("completed", "incomplete")
    assert reply.usage.output_tokens > 0


def _prompt_tokens(messages: list[dict]) -> list[int]:
    from openai_harmony import Message
    from vllm.entrypoints.openai.parser.harmony_utils import render_for_completion

    return render_for_completion([Message.from_dict(message) for message in messages])


@pytest.mark.parametrize("effort", ["low", "high"])
def test_a_follow_up_expanded_from_the_store_renders_as_vllms_own_store_renders_it(plugin_server, effort):
    client, _ = plugin_server
    asked = {"model": "tiny", "reasoning": {"effort": effort}, "temperature": 0}
    show = {"enable_response_messages": True}
    first = client.responses.create(input="Say hi.", max_output_tokens=40, store=True, **asked)
    assert first.output, "the first turn produced no output items to carry"
    # vLLM's own store: the engine that answered keeps the conversation.
    own = client.responses.create(
        input="And then?", previous_response_id=first.id, max_output_tokens=1, extra_body=show, **asked
    )
    # The ingress's store: what it keeps of the first turn, expanded into the follow-up's input.
    kept = StoredConversation(
        id=first.id,
        owner="tenant",
        created_at=0.0,
        input_items=as_items("Say hi."),
        response=first.model_dump(mode="json"),
    )
    expanded = client.responses.create(
        input=follow_up_input(kept, "And then?"), max_output_tokens=1, store=False, extra_body=show, **asked
    )
    own_messages, our_messages = own.model_extra["input_messages"], expanded.model_extra["input_messages"]
    assert len(own_messages) > 3  # system, developer, the first exchange, the follow-up
    assert our_messages == own_messages
    assert _prompt_tokens(our_messages) == _prompt_tokens(own_messages)
    assert expanded.usage.input_tokens == own.usage.input_tokens


def test_a_code_interpreter_request_renders_the_python_tool_beside_a_function(plugin_server):
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    client, _ = plugin_server
    lookup = {
        "type": "function",
        "name": "lookup",
        "description": "Look a word up in the glossary",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
    }
    python = {"type": "code_interpreter", "container": {"type": "auto"}}
    asked = {
        "model": "tiny",
        "input": "What is 2**100?",
        "reasoning": {"effort": "low"},
        "max_output_tokens": 1,
    }
    show = {"enable_response_messages": True}
    encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)

    def prompt(tools: list[dict]) -> str:
        reply = client.responses.create(tools=tools, extra_body=show, **asked)
        return encoding.decode(_prompt_tokens(reply.model_extra["input_messages"]))

    both = prompt([python, lookup])
    # The python namespace from the tool server (its instructions), in the system message's tools.
    system = both.split("<|end|>")[0]
    assert "# Tools" in system and "## python" in system and "fresh sandbox" in system
    # The function beside it, in the developer message, as without the tool.
    assert "namespace functions" in both and "type lookup = (_: {" in both
    alone = prompt([lookup])
    assert "## python" not in alone and "type lookup = (_: {" in alone


def test_bench_curves_measures_the_server_and_plan_reads_it(plugin_server, tmp_path) -> None:
    """``bench curves`` against this real vLLM server (tiny settings), then the curve through ``plan``."""
    import json
    import subprocess
    import sys

    from gptoss_vllm.capacity.curve import Curve

    client, _ = plugin_server
    url = str(client.base_url).rstrip("/").removesuffix("/v1")
    path = tmp_path / "curve.json"
    done = subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "bench", "curves", "--url", url, "--concurrency", "1,3",
         "--prompt-tokens", "16,128", "--output-tokens", "6", "--json", str(path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["model"] == "tiny" and url in data["source"]
    assert [p["concurrency"] for p in data["decode"]] == [1, 3] and all(
        p["tpot_s"] > 0 for p in data["decode"]
    )
    assert [p["prompt_tokens"] for p in data["prefill"]] == [16, 128] and all(
        p["ttft_s"] > 0 for p in data["prefill"]
    )
    assert data["max_num_seqs"] == 3  # the highest concurrency measured
    assert data["kv_capacity_tokens"] >= 1024  # from vLLM's /metrics: the server holds a 1024-token context
    curve = Curve.load(path)
    assert curve.saturation_tokens_per_s() > 0
    # A pool of two replicas (this one server stands for it): twice the streams, figures per replica.
    pooled = subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "bench", "curves", "--url", url, "--concurrency", "2",
         "--prompt-tokens", "16", "--output-tokens", "4", "--replicas", "2", "--json", str(tmp_path / "pool.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pooled.returncode == 0, pooled.stderr[-2000:]
    pool = json.loads((tmp_path / "pool.json").read_text())
    assert "2 replicas loaded alike" in pool["source"] and [p["concurrency"] for p in pool["decode"]] == [2]
    refused = subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "bench", "curves", "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "127.0.0.1:9" in refused.stderr, refused.stderr
