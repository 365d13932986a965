"""Draining and recovery on the whole stack: the pre-stop hook waits for a long stream, a killed replica gives a
clean error and is replaced, Ctrl-C drains in-flight streams. The last two are marked ``stops_stack``: they run
after every other test of ``tests/serve/``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.support import http
from tests.support.admission import HeldRequest, engine_running, wait_for_in_flight
from tests.support.shared_stack import (
    AUTH,
    MAIN_KEY,
    METRICS_PORT_COUNT,
    MODEL,
    USER,
    held_chat,
    post,
)
from tests.support.stack import replica_processes, wait_ready

DRAIN_HOOK = Path(__file__).resolve().parents[2] / "helm" / "gptoss-vllm" / "files" / "drain.py"


def test_the_prestop_hook_waits_for_a_long_stream_to_finish(stack):
    # The chart's hook as a pod runs it, scanning the metrics ports of this machine's replicas.
    env = {
        **os.environ,
        "GPTOSS_VLLM_METRICS_PORT": str(stack.metrics_port),
        "GPTOSS_VLLM_METRICS_PORT_COUNT": str(METRICS_PORT_COUNT),
        "GPTOSS_VLLM_DRAIN_POLL_S": "0.5",
    }
    wait_for_in_flight(stack.url, {"deep": 0})
    (replica,) = replica_processes("deep")
    held = HeldRequest(stack.url, "/v1/chat/completions", held_chat("high"), MAIN_KEY)
    engine: list[psutil.Process] = []
    looks: list[str] = []
    try:
        wait_for_in_flight(stack.url, {"deep": 1})
        deadline = time.monotonic() + 60
        while engine_running(stack.url, "deep") < 1:
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
    assert error, (
        f"the stream ended as if complete although its replica was killed ({len(received)} events, the last "
        f"{received[-1] if received else None})"
    )
    assert isinstance(error[0], openai.APIError)
    # Until Ray Serve replaces it, deep answers at once (503 + Retry-After), then serves again.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        answer = post(
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
        post(
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
        with http.stream(
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
