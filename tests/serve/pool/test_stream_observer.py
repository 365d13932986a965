"""The pool replica's stream observer: streams split anywhere relayed intact and timed, usage the client asked
for kept, Responses events and whole answers read."""

from __future__ import annotations

import json

import pytest

from gptoss_vllm.serve.pool.stream_observer import StreamObserver
from tests.support.ingress_metrics import new_record, samples


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chat_chunk(**delta: str) -> bytes:
    return _event({"choices": [{"index": 0, "delta": delta}]})


USAGE = {"prompt_tokens": 70, "completion_tokens": 12, "completion_tokens_details": {"reasoning_tokens": 9}}


def test_a_chat_stream_split_anywhere_is_relayed_intact_and_timed():
    record, registry = new_record()
    observer = StreamObserver("chat", strip_usage=True)
    stream = (
        _chat_chunk(role="assistant")
        + _chat_chunk(reasoning="We")
        + _chat_chunk(reasoning=" add")
        + _chat_chunk(content="4")
        + _event({"choices": [], "usage": USAGE})
        + b"data: [DONE]\n\n"
    )
    relayed = b""
    for i in range(0, len(stream), 7):  # events cut at arbitrary points
        relayed += observer.relay(stream[i : i + 7])
    relayed += observer.flush()
    assert b'"usage"' not in relayed
    assert relayed == stream.replace(_event({"choices": [], "usage": USAGE}), b"")
    seen = observer.seen
    assert len(seen.gaps_s) == 2 and 0 <= seen.first_token_s <= seen.first_answer_s
    # The observation was made elsewhere (the pool replica): its times count from when its answer arrived.
    record.take(seen, origin=record.started + 0.5)
    assert record.time_to_first_token_s == pytest.approx(0.5 + seen.first_token_s)
    assert record.time_to_first_answer_token_s == pytest.approx(0.5 + seen.first_answer_s)
    record.finish()
    found = samples(registry)
    labels = frozenset({"endpoint": "chat", "effort": "high", "pool": "deep"}.items())
    assert found[("gptoss_time_to_first_token_seconds_count", labels)] == 1
    assert found[("gptoss_time_to_first_token_seconds_sum", labels)] == pytest.approx(
        0.5 + seen.first_token_s
    )
    assert found[("gptoss_time_to_first_answer_token_seconds_count", labels)] == 1
    assert found[("gptoss_inter_token_latency_seconds_count", labels)] == 2  # three token events
    tokens = {k: v for (name, k), v in found.items() if name == "gptoss_output_tokens_total"}
    assert tokens[frozenset({"effort": "high", "pool": "deep", "kind": "reasoning"}.items())] == 9
    assert tokens[frozenset({"effort": "high", "pool": "deep", "kind": "answer"}.items())] == 3


def test_usage_the_client_asked_for_is_kept():
    observer = StreamObserver("chat")
    usage_event = _event({"choices": [], "usage": USAGE})
    assert observer.relay(usage_event) == usage_event
    assert observer.seen.output_tokens == 12


def test_responses_events_and_a_whole_answer():
    observer = StreamObserver("responses")
    observer.relay(_event({"type": "response.created", "response": {"id": "resp_1", "status": "queued"}}))
    assert observer.seen.response_id == "resp_1"  # known before the answer ends (cancel, follow-ups)
    observer.relay(_event({"type": "response.reasoning_text.delta", "delta": "x"}))
    assert observer.seen.first_answer_s is None
    observer.relay(_event({"type": "response.output_text.delta", "delta": "y"}))
    usage = {"input_tokens": 5, "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 1}}
    observer.relay(_event({"type": "response.completed", "response": {"id": "resp_1", "usage": usage}}))
    seen = observer.seen
    assert seen.first_answer_s >= seen.first_token_s
    assert (seen.prompt_tokens, seen.output_tokens, seen.reasoning_tokens) == (5, 4, 1)
    whole = StreamObserver("responses")
    whole.observe_body(json.dumps({"id": "resp_2", "usage": USAGE}).encode())
    assert (whole.seen.prompt_tokens, whole.seen.output_tokens, whole.seen.reasoning_tokens) == (70, 12, 9)
    assert whole.seen.response_id == "resp_2"
    whole.observe_body(b"not json")  # an error page passes through without breaking the observation
    chat = StreamObserver("chat")
    chat.observe_body(json.dumps({"id": "chatcmpl-1", "usage": USAGE}).encode())
    assert chat.seen.response_id is None  # only Responses are stored
