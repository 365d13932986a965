"""The Ray Serve app end to end: the real CLI starts real Ray and two pools of real vLLM engines (tiny MXFP4
model through the plugin's CPU kernel, the session's shared ``stack``); requests go through the official
``openai`` client, raw HTTP, and vLLM's own benchmark client. The destructive tests (replica kill, Ctrl-C drain)
are marked ``stops_stack``: they run after every other test of the session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from transformers import AutoTokenizer

from tests.support.admission import HOLD_TOKENS, HeldRequest, holding, target_samples, wait_for_in_flight
from tests.support.shared_stack import LIMITED_KEY, MAIN_KEY, METRICS_PORT_COUNT, MODEL
from tests.support.stack import replica_processes, wait_ready

AUTH = {"Authorization": f"Bearer {MAIN_KEY}"}
POOL_OF = {"low": "fast", "medium": "fast", "high": "deep"}
USER = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=MAIN_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint_dirs):
    return AutoTokenizer.from_pretrained(tiny_checkpoint_dirs["mxfp4"])


def _post(stack, path: str, body, headers=None, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{stack.url}{path}", content=content, headers={**AUTH, **(headers or {})}, timeout=120, **kw
    )


def _rendered_effort(tokenizer, response: httpx.Response) -> str:
    """The `Reasoning:` line of the prompt the engine actually rendered (from vLLM's returned token ids)."""
    text = tokenizer.decode(response.json()["prompt_token_ids"])
    line = next(line for line in text.splitlines() if line.startswith("Reasoning:"))
    return line.split(":", 1)[1].strip()


# -- the official client -------------------------------------------------------------------------------------


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_chat_lands_in_the_pool_of_its_effort(client, effort):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, reasoning_effort=effort, max_tokens=8
    )
    completion = raw.parse()
    assert raw.headers["x-gptoss-effort"] == effort
    assert raw.headers["x-gptoss-effort-source"] == "chat"
    assert raw.headers["x-gptoss-pool"] == POOL_OF[effort]
    assert raw.headers["x-gptoss-replica"]
    assert completion.usage.completion_tokens == 8


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
    # Raw completions have no reasoning parser holding text back: each engine step becomes an event.
    body = {"prompt": "Hello", "max_tokens": 64, "ignore_eos": True, "stream": True}
    arrivals = []
    with httpx.stream(
        "POST", f"{stack.url}/v1/completions", json=body, headers=AUTH, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) > 8
    # Not buffered: the events came over the generation's lifetime, not in one burst at its end.
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 0.01


def test_completions_stream_and_not(client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert raw.parse().usage.completion_tokens == 5
    assert raw.headers["x-gptoss-effort-source"] == "default"
    assert raw.headers["x-gptoss-pool"] == "fast"
    pieces = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices)


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


# -- effort resolution ------------------------------------------------------------------------------------------


def test_every_effort_source_and_what_the_engine_renders(stack, tokenizer):
    cases = [
        ({"reasoning_effort": "low"}, {"X-Reasoning-Effort": "high"}, "low", "chat"),
        ({}, {"X-Reasoning-Effort": "HIGH"}, "high", "header"),
        (
            {"messages": [{"role": "system", "content": "Be brief.\nReasoning: high"}, *USER]},
            {},
            "high",
            "system",
        ),
        (
            {
                "messages": [
                    {"role": "developer", "content": [{"type": "text", "text": "reasoning: low"}]},
                    *USER,
                ]
            },
            {},
            "low",
            "system",
        ),
        ({}, {}, "medium", "default"),
    ]
    for extra, headers, effort, source in cases:
        body = {"model": MODEL, "messages": USER, "max_tokens": 2, "return_token_ids": True, **extra}
        response = _post(stack, "/v1/chat/completions", body, headers)
        assert response.status_code == 200, response.text
        assert (response.headers["x-gptoss-effort"], response.headers["x-gptoss-effort-source"]) == (
            effort,
            source,
        )
        assert response.headers["x-gptoss-pool"] == POOL_OF[effort]
        assert _rendered_effort(tokenizer, response) == effort


def test_bad_effort_is_400_listing_the_allowed_values(stack, client):
    bad = [
        ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "ultra"}, {}, "reasoning_effort"),
        (
            "/v1/chat/completions",
            {"messages": USER},
            {"X-Reasoning-Effort": "max"},
            "header X-Reasoning-Effort",
        ),
        ("/v1/responses", {"input": "hi", "reasoning": {"effort": "ultra"}}, {}, "reasoning.effort"),
    ]
    for path, body, headers, param in bad:
        response = _post(stack, path, body, headers)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_reasoning_effort"
        assert "low, medium, high" in error["message"]
        if param:
            assert error["param"] == param
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="ultra")
    # A system line is the lowest-priority source: an unknown value there is skipped (and logged), not refused.
    prose = [{"role": "system", "content": "Reasoning: extreme"}, *USER]
    skipped = _post(stack, "/v1/chat/completions", {"messages": prose, "max_tokens": 2})
    assert skipped.status_code == 200 and skipped.headers["x-gptoss-effort-source"] == "default"


# -- bad input, auth, limits ----------------------------------------------------------------------------------


def test_bad_requests(stack, client):
    malformed = _post(stack, "/v1/chat/completions", b'{"messages": [')
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    not_object = _post(stack, "/v1/chat/completions", b"[1, 2]")
    assert not_object.status_code == 400
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-5", messages=USER)
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as negative:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=-1)
    assert negative.value.body["param"] == "max_tokens"
    # What the ingress lets through but vLLM refuses comes back as vLLM's 400, not a 500.
    vllm_refusal = _post(stack, "/v1/chat/completions", {"messages": "not a list"})
    assert vllm_refusal.status_code == 400 and "error" in vllm_refusal.json()
    missing = httpx.get(f"{stack.url}/v1/nothing-here", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_api_keys(stack):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {MAIN_KEY}"}):
        response = httpx.post(f"{stack.url}/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-nope", max_retries=0).models.list()
    # Probes need no key.
    assert httpx.get(f"{stack.url}/health").status_code == 200
    assert httpx.get(f"{stack.url}/ready").status_code == 200
    assert MAIN_KEY not in stack.log_tail(10**7) and LIMITED_KEY not in stack.log_tail(10**7)


def test_per_key_rate_limit(stack):
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    codes = [httpx.get(f"{stack.url}/v1/models", headers=headers).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[2:] == [429, 429]
    limited = httpx.get(f"{stack.url}/v1/models", headers=headers)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.get(f"{stack.url}/v1/models", headers=AUTH).status_code == 200  # other keys unaffected


def test_budgets_clamp_or_reject(stack):
    clamped = _post(
        stack,
        "/v1/chat/completions",
        {"messages": USER, "reasoning_effort": "low", "max_tokens": 1000, "ignore_eos": True},
    )
    assert clamped.status_code == 200
    assert clamped.headers["x-gptoss-budget-clamped-from"] == "1000"
    assert clamped.json()["usage"]["completion_tokens"] == 64
    unlimited = _post(
        stack, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "low", "ignore_eos": True}
    )
    assert unlimited.json()["usage"]["completion_tokens"] == 64
    rejected = _post(
        stack,
        "/v1/chat/completions",
        {"messages": USER, "reasoning_effort": "high", "max_completion_tokens": HOLD_TOKENS + 1},
    )
    assert rejected.status_code == 400
    assert rejected.json()["error"]["code"] == "over_budget"
    assert rejected.json()["error"]["param"] == "max_completion_tokens"


def _long_request(stack, effort: str, tokens: int = 256) -> httpx.Response:
    body = {"messages": USER, "max_tokens": tokens, "ignore_eos": True, "reasoning_effort": effort}
    return _post(stack, "/v1/chat/completions", body)


def _hold(effort: str) -> dict:
    """A held slot (tests.support.admission): the longest output the effort's budget allows."""
    return {
        "messages": USER,
        "max_tokens": HOLD_TOKENS,
        "ignore_eos": True,
        "reasoning_effort": effort,
    }


def test_full_queue_is_429_with_retry_after_and_service_continues(stack):
    # deep admits 2 running + 1 queued at the ingress; with those held, the next one is refused at once.
    with holding(stack.url, "/v1/chat/completions", {"deep": [_hold("high")] * 3}, MAIN_KEY):
        refused = _long_request(stack, "high", 4)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-gptoss-pool"] == "deep"
    assert refused.json()["error"]["code"] == "queue_full"
    # The held requests' client hung up: deep's slots are free again.
    assert _long_request(stack, "high", 4).status_code == 200


def test_spillover_to_the_named_pool(stack):
    # fast runs 1 and spills to deep as soon as one waits: with one running and one waiting held, it spills.
    with holding(stack.url, "/v1/chat/completions", {"fast": [_hold("medium")] * 2}, MAIN_KEY):
        spilled = _long_request(stack, "medium", 4)
    assert spilled.status_code == 200, spilled.text
    assert spilled.headers["x-gptoss-spilled-from"] == "fast" and spilled.headers["x-gptoss-pool"] == "deep"
    # With fast free again, the same request stays in its own pool.
    unspilled = _long_request(stack, "medium", 4)
    assert unspilled.headers["x-gptoss-pool"] == "fast" and "x-gptoss-spilled-from" not in unspilled.headers


# -- a client this project did not write ------------------------------------------------------------------------


def test_vllm_bench_serve_has_no_failures(stack, tiny_checkpoint_dirs, tmp_path, monkeypatch):
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend", "openai-chat", "--base-url", stack.url, "--endpoint", "/v1/chat/completions",
            "--model", MODEL, "--tokenizer", str(tiny_checkpoint_dirs["mxfp4"]),
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


DRAIN_HOOK = Path(__file__).resolve().parent.parent / "helm" / "gptoss-vllm" / "files" / "drain.py"


def test_the_prestop_hook_waits_for_a_long_stream_to_finish(stack):
    # The chart's hook as a pod runs it, scanning the metrics ports of this machine's replicas.
    env = {
        **os.environ,
        "GPTOSS_METRICS_PORT": str(stack.metrics_port),
        "GPTOSS_METRICS_PORT_COUNT": str(METRICS_PORT_COUNT),
        "GPTOSS_DRAIN_POLL_S": "0.5",
    }
    wait_for_in_flight(stack.url, {"deep": 0})
    (replica,) = replica_processes("deep")
    held = HeldRequest(stack.url, "/v1/chat/completions", _hold("high"), MAIN_KEY)
    engine: list[psutil.Process] = []
    looks: list[str] = []
    try:
        wait_for_in_flight(stack.url, {"deep": 1})
        deadline = time.monotonic() + 60
        while _engine_running(stack, "deep") < 1:
            assert time.monotonic() < deadline, "the held stream never ran in deep's engine"
            time.sleep(0.25)
        # Deep's engine processes stop where they are: the stream stays in flight (the ingress counts it, the
        # engine's last counts show it running) until the test lets it go, however fast this CPU generates.
        engine = replica.children(recursive=True)
        for proc in engine:
            proc.suspend()
        hook = subprocess.Popen(
            [sys.executable, str(DRAIN_HOOK)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        looks = [hook.stdout.readline() for _ in range(3)]  # three looks, each finding the stream in flight
        assert hook.poll() is None, f"the hook returned with a stream in flight: {''.join(looks)}"
    finally:
        for proc in engine:
            proc.resume()
        held.release()
    rest, _ = hook.communicate(timeout=60)
    output = "".join(looks) + rest
    assert hook.returncode == 0, output
    counts = [int(line.split()[1]) for line in output.splitlines() if line.startswith("drain: ")]
    # The stream was seen (the ingress's in-flight count and the engine's running request), then nothing.
    assert counts[0] >= 2 and counts[-2:] == [0, 0], output


def _engine_running(stack, pool: str) -> float:
    samples = target_samples(stack.url, "pool", pool=pool)
    return sum(value for (name, _), value in samples.items() if name == "vllm:num_requests_running")


# -- failures and shutdown (last: they disturb the stack) -------------------------------------------------------


@pytest.mark.stops_stack
def test_killed_replica_gives_a_clean_error_and_is_replaced(stack, client):
    (victim,) = replica_processes("deep")
    before = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, reasoning_effort="high", max_tokens=2
    )
    old_replica = before.headers["x-gptoss-replica"]
    kept = client.responses.create(model=MODEL, input="Hi", reasoning={"effort": "high"}, max_output_tokens=8)
    received, error = [], []

    def consume():
        try:
            # Raw completions: one event per engine step, so the stream is surely mid-way when the kill lands.
            stream = client.completions.create(
                model=MODEL, prompt="Hello", max_tokens=900, stream=True, extra_body={"ignore_eos": True},
                extra_headers={"X-Reasoning-Effort": "high"},
            )  # fmt: skip
            for chunk in stream:
                received.append(chunk)
        except Exception as exc:  # what a client sees
            error.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 60
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    engine_processes = victim.children(recursive=True)
    assert engine_processes, "the replica has no engine core child"
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=120)
    # The engine core died with its replica instead of holding its memory as an orphan.
    _, alive = psutil.wait_procs(engine_processes, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert not thread.is_alive()
    assert error, "the stream ended as if complete although its replica was killed"
    assert isinstance(error[0], openai.APIError)
    # Until Ray Serve replaces it, deep answers at once (503 + Retry-After), then serves again.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        answer = _post(
            stack, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "high", "max_tokens": 2}
        )
        if answer.status_code == 200:
            break
        assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text
        time.sleep(2)
    assert answer.status_code == 200, stack.log_tail()
    assert answer.headers["x-gptoss-replica"] != old_replica
    assert victim.pid not in [p.pid for p in replica_processes("deep")]
    # The conversation deep's dead replica answered lives on: its follow-up runs on the new replica.
    follow = client.responses.with_raw_response.create(
        model=MODEL, input="More", previous_response_id=kept.id, max_output_tokens=4,
        reasoning={"effort": "high"},
    )  # fmt: skip
    assert follow.headers["x-gptoss-replica"] != old_replica
    assert follow.parse().usage.input_tokens > kept.usage.input_tokens + kept.usage.output_tokens
    # The other pool never noticed.
    assert (
        _post(
            stack, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "low", "max_tokens": 2}
        ).status_code
        == 200
    )


@pytest.mark.stops_stack
def test_ctrl_c_drains_in_flight_streams_then_exits(stack):
    wait_ready(stack)
    lines: list[str] = []
    streaming = threading.Event()

    def consume():
        body = {
            "messages": USER,
            "max_tokens": 600,
            "ignore_eos": True,
            "stream": True,
            "reasoning_effort": "high",
        }
        with httpx.stream(
            "POST", f"{stack.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120
        ) as response:
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith("data: {"):
                    streaming.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert streaming.wait(timeout=120), "the stream never started"
    assert "data: [DONE]" not in lines  # Ctrl-C lands mid-stream
    assert stack.stop(timeout_s=180) == 0, stack.log_tail()
    thread.join(timeout=60)
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "data: [DONE]" in lines, lines[-3:]
    assert not any("error" in event for event in events)
    generated = sum(
        len(tokens)
        for e in events
        for c in e.get("choices", [])
        if (tokens := c.get("delta", {}).get("content"))
    )
    assert generated > 0
    assert replica_processes("deep") == [] and replica_processes("fast") == []
