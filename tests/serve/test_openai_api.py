"""The OpenAI API through the whole stack (the shared ``stack``: real Ray, two pools of real vLLM engines on the tiny
MXFP4 model through the plugin's CPU kernel): the official ``openai`` client, raw HTTP streams relayed as produced,
OpenAI's errors, and vLLM's own benchmark client."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.support import http
from tests.support.admission import HOLD_TOKENS, engine_running, wait_for_in_flight
from tests.support.shared_stack import (
    AUTH,
    MAIN_KEY,
    MODEL,
    USER,
    post,
)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_stream_carries_headers(client):
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=USER,
        reasoning_effort="high",
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ) as raw:
        assert raw.headers["x-gptoss-pool"] == "deep"
        assert raw.headers["x-gptoss-effort"] == "high"
        assert raw.headers["content-type"].startswith("text/event-stream")
        chunks = list(raw.parse())
    assert chunks[-1].usage.completion_tokens == 48


def test_stream_is_relayed_as_produced(stack):
    # Raw completions have no reasoning parser holding text back: each engine step becomes an event. A held
    # slot's output (tens of thousands of tokens) takes any CPU far longer than the relay path: the first events
    # reach the client while the engine still generates the rest (a fast engine with a coalescing relay would
    # otherwise pass a whole short answer in one burst, which says nothing about buffering).
    wait_for_in_flight(stack.url, {"deep": 0})
    body = {"prompt": "Hello", "max_tokens": HOLD_TOKENS, "ignore_eos": True, "stream": True}
    headers = {**AUTH, "X-Reasoning-Effort": "high"}
    events = 0
    with http.stream(
        "POST", f"{stack.url}/v1/completions", json=body, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200 and response.headers["x-gptoss-pool"] == "deep"
        lines = response.iter_lines()  # read by hand: leaving a loop over it would close the stream
        while events < 3:
            events += next(lines).startswith("data: {")
        # vLLM's gauge follows the engine's steps with a lag; the request runs for much longer than that.
        deadline = time.monotonic() + 60
        while engine_running(stack.url, "deep") < 1:
            assert time.monotonic() < deadline, "the events came after the engine had finished"
            time.sleep(0.25)
    wait_for_in_flight(stack.url, {"deep": 0})  # the client hung up: the engine let the request go


def test_completions_stream_and_not(client):
    asked = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "temperature": 0}
    raw = client.completions.with_raw_response.create(**asked)
    whole = raw.parse()
    assert 1 <= whole.usage.completion_tokens <= 5
    assert raw.headers["x-gptoss-effort-source"] == "default"
    assert raw.headers["x-gptoss-pool"] == "fast"
    # The same greedy completion streamed: the same text (what nano writes after a bare "Hello" may be harmony's
    # special tokens, no text at all), tokens and end.
    pieces = list(client.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
    assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == whole.choices[0].finish_reason
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_responses_stream(client):
    with client.responses.with_streaming_response.create(
        model=MODEL,
        input="Hi",
        max_output_tokens=8,
        stream=True,
        extra_headers={"X-Reasoning-Effort": "high"},
    ) as raw:
        assert raw.headers["x-gptoss-pool"] == "deep"
        kinds = [event.type for event in raw.parse()]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def test_bad_requests(stack, client):
    malformed = post(stack, "/v1/chat/completions", b'{"messages": [')
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    not_object = post(stack, "/v1/chat/completions", b"[1, 2]")
    assert not_object.status_code == 400
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-5", messages=USER)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as negative:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=-1)
    assert negative.value.body["param"] == "max_tokens"
    # What the ingress lets through but vLLM refuses comes back as vLLM's 400, not a 500.
    vllm_refusal = post(stack, "/v1/chat/completions", {"messages": "not a list"})
    assert vllm_refusal.status_code == 400 and "error" in vllm_refusal.json()
    missing = http.get(f"{stack.url}/v1/nothing-here", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_vllm_bench_serve_has_no_failures(stack, tmp_path, monkeypatch):
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend", "openai-chat", "--base-url", stack.url, "--endpoint", "/v1/chat/completions",
            "--model", MODEL, "--tokenizer", str(stack.checkpoint),
            "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "16",
            "--num-prompts", "12", "--max-concurrency", "4", "--seed", "0",
            "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json",
        ]
    )  # fmt: skip
    monkeypatch.setenv("OPENAI_API_KEY", MAIN_KEY)
    result = main(args)
    assert result["completed"] == 12
    assert result.get("failed", 0) == 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["completed"] == 12
