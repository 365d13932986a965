"""The ingress's request pipeline without Ray: every refusal with its status, code, reason and headers, and
what the pipeline decides for the requests it lets through."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from gptoss_vllm.observability.local_prometheus import RULES
from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.rules import SERVICE_REJECTION_REASONS
from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.config import RateLimit
from gptoss_vllm.serve.config_load import parse_config
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.ingress.keys import KeyRing
from gptoss_vllm.serve.ingress.pipeline import MAX_N, Decision, RequestPipeline, client_address
from gptoss_vllm.serve.ingress.rate_limits import RateLimiter
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.responses.store import StoredConversation
from gptoss_vllm.serve.openai_errors import error_response

KEY = "sk-pipeline"
AUTH = {"authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "What is 47 + 8?"}]


def _pipeline(tmp_path, running: dict[str, int] | None = None, **config) -> RequestPipeline:
    keys = tmp_path / "keys"
    keys.write_text(f"tenant:{KEY}\n")
    serve = parse_config(
        {
            "model_name": "m",
            "pools": {
                "fast": {
                    "model": "/models/x",
                    "efforts": ["low", "medium"],
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 1,
                    "spillover": {"to": "deep", "queue_above": 0},
                },
                "deep": {
                    "model": "/models/x",
                    "efforts": ["high"],
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 0,
                },
            },
            "budgets": {"low": {"max_tokens": 64}, "high": {"max_tokens": 100, "over_budget": "reject"}},
            "auth": {
                "api_keys_file": str(keys),
                "key_rate_limits": {"tenant": {"requests_per_minute": 60, "burst": 100}},
            },
            **config,
        }
    )
    admission = Admission(serve)
    admission.running.update(running if running is not None else {"fast": 1, "deep": 1})
    auth = serve.auth
    return RequestPipeline(
        serve,
        admission,
        keys=KeyRing(auth),
        limiter=RateLimiter(auth.rate_limit, dict(auth.key_rate_limits)),
    )


def _decide(pipeline: RequestPipeline, endpoint, headers, body, decision, client=None, conversations=None):
    """The pipeline's one call, as the ingress deployment makes it (a body reader that is given the limit)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def read(limit: int) -> bytes:
        return raw

    return asyncio.run(pipeline.generation(endpoint, headers, read, decision, client, conversations))


def _chat(pipeline: RequestPipeline, body, headers=AUTH, endpoint="chat") -> Decision:
    return _decide(pipeline, endpoint, headers, body, Decision())


def _refusal(pipeline: RequestPipeline, body, headers=AUTH, endpoint="chat") -> tuple[Refusal, Decision]:
    decision = Decision()
    with pytest.raises(Refusal) as refused:
        _decide(pipeline, endpoint, headers, body, decision)
    return refused.value, decision


@pytest.mark.parametrize(
    ("headers", "body", "status", "reason", "code", "param"),
    [
        ({}, {"messages": USER}, 401, Reason.AUTH, "invalid_api_key", None),
        ({"authorization": "Bearer sk-other"}, {"messages": USER}, 401, Reason.AUTH, "invalid_api_key", None),
        ({"authorization": f"Basic {KEY}"}, {"messages": USER}, 401, Reason.AUTH, "invalid_api_key", None),
        (AUTH, b"{not json", 400, Reason.INVALID, "invalid_json", None),
        (AUTH, b"[1, 2]", 400, Reason.INVALID, "invalid_json", None),
        (AUTH, {"model": "gpt-5", "messages": USER}, 404, Reason.INVALID, "model_not_found", "model"),
        (
            AUTH,
            {"messages": USER, "reasoning_effort": "huge"},
            400,
            Reason.INVALID,
            "invalid_reasoning_effort",
            "reasoning_effort",
        ),
        (
            AUTH,
            {"messages": USER, "reasoning_effort": "high", "max_tokens": 101},
            400,
            Reason.BUDGET,
            "over_budget",
            "max_tokens",
        ),
        (AUTH, {"messages": USER, "max_tokens": -1}, 400, Reason.BUDGET, "invalid_value", "max_tokens"),
    ],
)
def test_refusals_carry_status_code_reason_and_param(tmp_path, headers, body, status, reason, code, param):
    refusal, _ = _refusal(_pipeline(tmp_path), body, headers)
    assert (refusal.status, refusal.reason, refusal.code, refusal.param) == (status, reason, code, param)
    assert refusal.message
    if reason is Reason.AUTH:
        assert refusal.headers == {"WWW-Authenticate": "Bearer"}


def test_a_body_over_the_limit_is_413(tmp_path):
    pipeline = _pipeline(tmp_path)
    # No max_model_len in the pools: gpt-oss's 131072 tokens as JSON text, and a MiB for the structure.
    assert pipeline.body_limit == 131072 * 32 + (1 << 20)
    refusal, _ = _refusal(pipeline, b" " * (pipeline.body_limit + 1))
    assert (refusal.status, refusal.reason, refusal.code) == (413, Reason.INVALID, "body_too_large")
    small = _pipeline(tmp_path, ingress={"max_body_bytes": 4096})
    assert small.body_limit == 4096
    assert _refusal(small, {"messages": [{"role": "user", "content": "x" * 5000}]})[0].status == 413


def test_a_refusal_keeps_what_the_steps_before_it_learnt(tmp_path):
    pipeline = _pipeline(tmp_path)
    refusal, decision = _refusal(pipeline, {"messages": USER, "reasoning_effort": "high", "max_tokens": 500})
    assert refusal.reason is Reason.BUDGET
    assert (decision.key_name, decision.effort.effort, decision.pool) == ("tenant", "high", "deep")
    _, early = _refusal(pipeline, {"messages": USER, "reasoning_effort": "huge"})
    assert early.effort is None and early.pool is None and early.key_name == "tenant"


def test_rate_limit_is_429_with_retry_after(tmp_path):
    pipeline = _pipeline(tmp_path)
    pipeline._limiter = RateLimiter(None, {"tenant": RateLimit(requests_per_minute=6, burst=1)})
    assert _chat(pipeline, {"messages": USER}).pool == "fast"
    refusal, _ = _refusal(pipeline, {"messages": USER})
    assert (refusal.status, refusal.reason, refusal.code) == (429, Reason.RATE_LIMIT, "rate_limit_exceeded")
    assert int(refusal.headers["Retry-After"]) >= 1


def test_an_admitted_request_is_decided_whole(tmp_path):
    pipeline = _pipeline(tmp_path)
    decision = _chat(
        pipeline, {"messages": USER, "reasoning_effort": "low", "max_tokens": 500, "stream": True}
    )
    assert (decision.pool, decision.spilled_from) == ("fast", None)
    assert decision.headers == {
        "x-gptoss-effort": "low",
        "x-gptoss-effort-source": "chat",
        "x-gptoss-budget-clamped-from": "500",
    }
    assert decision.clamped_from == 500 and decision.body["max_tokens"] == 64
    assert decision.body["model"] == "m" and decision.body["reasoning_effort"] == "low"
    # The ingress asked for the usage event it counts tokens from; the client did not, so it is dropped later.
    assert decision.strip_usage and decision.body["stream_options"] == {"include_usage": True}
    assert decision.response_id is None and decision.response_fields is None
    header = _chat(pipeline, {"messages": USER}, headers=AUTH | {"x-reasoning-effort": "high"})
    assert (header.effort.effort, header.effort.source, header.pool) == ("high", "header", "deep")


def test_admission_spills_then_refuses_with_the_pool_and_retry_after(tmp_path):
    pipeline = _pipeline(tmp_path)
    placed = []
    for _ in range(4):
        try:
            decision = _chat(pipeline, {"messages": USER, "reasoning_effort": "medium"})
        except Refusal as refusal:
            placed.append(refusal)
            continue
        pipeline.admission.started(decision.pool)
        placed.append((decision.pool, decision.spilled_from))
    # fast: one running, one queued; then one spills to deep (its only slot); then fast is full.
    assert placed[:3] == [("fast", None), ("fast", None), ("deep", "fast")]
    full = placed[3]
    assert (full.status, full.reason, full.code) == (429, Reason.QUEUE_FULL, "queue_full")
    assert full.headers["x-gptoss-pool"] == "fast" and full.headers["x-gptoss-effort"] == "medium"
    assert full.headers["Retry-After"] == "1"


def test_a_pool_without_replicas_is_503_at_once(tmp_path):
    pipeline = _pipeline(tmp_path, running={"fast": 1, "deep": 0})
    refusal, decision = _refusal(pipeline, {"messages": USER, "reasoning_effort": "high"})
    assert (refusal.status, refusal.reason, refusal.code) == (503, Reason.NO_REPLICA, "no_replica")
    assert refusal.headers["Retry-After"] == "1" and decision.pool == "deep"
    models = Decision()
    pipeline.models(AUTH, models)
    assert models.pool == "fast"
    down = _pipeline(tmp_path, running={"fast": 0, "deep": 0})
    with pytest.raises(Refusal) as refused:
        down.models(AUTH, Decision())
    assert refused.value.reason is Reason.NO_REPLICA


REASONING = {
    "type": "reasoning",
    "id": "rs_1",
    "summary": [],
    "content": [{"type": "reasoning_text", "text": "Greet."}],
}
ANSWER = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
          "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]}  # fmt: skip


def _stored(owner: str = "tenant") -> StoredConversation:
    return StoredConversation(
        id="resp_1",
        owner=owner,
        created_at=0.0,
        input_items=[{"type": "message", "role": "user", "content": "Hi"}],
        response={"id": "resp_1", "object": "response", "status": "completed", "output": [REASONING, ANSWER]},
    )


def test_responses_get_server_made_ids_and_the_engine_stores_nothing(tmp_path):
    pipeline = _pipeline(tmp_path)
    first = _chat(pipeline, {"input": "Hi", "reasoning": {"effort": "high"}}, endpoint="responses")
    assert first.pool == "deep" and first.store and not first.background
    assert first.response_id.startswith("resp_") and len(first.response_id) == 37
    assert first.body["request_id"] == first.response_id and first.body["store"] is False
    assert first.input_items == [{"type": "message", "role": "user", "content": "Hi"}]
    assert first.response_fields == {"store": True, "previous_response_id": None, "background": False}
    again = _chat(pipeline, {"input": "Hi", "store": False}, endpoint="responses")
    assert again.response_id != first.response_id and not again.store
    cases = [
        ({"input": "Hi", "request_id": "resp_mine"}, "request_id"),
        ({"input": {"text": "Hi"}}, "input"),
        ({"input": "Hi", "background": True, "store": False}, "background"),
        ({"input": "Hi", "background": True, "stream": True}, "stream"),
    ]
    for body, param in cases:
        refusal, _ = _refusal(pipeline, body, endpoint="responses")
        assert (refusal.status, refusal.reason, refusal.param) == (400, Reason.INVALID, param), body


def test_a_follow_up_carries_its_whole_conversation_and_runs_in_its_own_effort_pool(tmp_path):
    pipeline = _pipeline(tmp_path)
    looked_up = []

    async def conversations(response_id, decision, param):
        looked_up.append((response_id, decision.key_name, param))
        return pipeline.owned(response_id, _stored(), decision, param)

    body = {"input": "More", "previous_response_id": "resp_1", "reasoning": {"effort": "low"}}
    follow = _decide(pipeline, "responses", AUTH, body, Decision(), conversations=conversations)
    assert looked_up == [("resp_1", "tenant", "previous_response_id")]
    assert (follow.pool, follow.effort.effort) == ("fast", "low")
    expected = [
        *_stored().input_items,
        REASONING,
        ANSWER,
        {"type": "message", "role": "user", "content": "More"},
    ]
    assert follow.body["input"] == expected == follow.input_items
    assert "previous_response_id" not in follow.body
    assert follow.response_fields["previous_response_id"] == "resp_1"


def test_a_stored_response_exists_only_for_the_key_that_made_it(tmp_path):
    pipeline = _pipeline(tmp_path)
    decision = pipeline.stored_response(AUTH, Decision())
    assert pipeline.owned("resp_1", _stored(), decision).id == "resp_1"
    for found in (_stored(owner="someone-else"), None):
        with pytest.raises(Refusal) as missing:
            pipeline.owned("resp_1", found, decision, "previous_response_id")
        refusal = missing.value
        assert (refusal.status, refusal.reason, refusal.code) == (404, Reason.NOT_FOUND, "response_not_found")
        assert refusal.param == "previous_response_id"
    with pytest.raises(Refusal) as anonymous:
        pipeline.stored_response({}, Decision())
    assert anonymous.value.reason is Reason.AUTH
    # A follow-up whose conversation was not looked up (or is another one) is not run without it.
    refusal, _ = _refusal(pipeline, {"input": "More", "previous_response_id": "resp_1"}, endpoint="responses")
    assert (refusal.status, refusal.param) == (404, "previous_response_id")


def test_the_alert_rules_and_metrics_speak_the_reasons_of_the_one_enum():
    assert SERVICE_REJECTION_REASONS == ("queue_full", "no_replica", "replica_failed", "store_unavailable")
    assert 'reason=~"queue_full|no_replica|replica_failed|store_unavailable"' in RULES.read_text()
    help_text = IngressMetrics(CollectorRegistry()).rejections._documentation
    assert all(reason.value in help_text for reason in Reason)


# -- hostile input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_a_body_a_cross_site_form_can_send_is_415(tmp_path, content_type):
    refusal, _ = _refusal(_pipeline(tmp_path), {"messages": USER}, AUTH | {"content-type": content_type})
    assert (refusal.status, refusal.code) == (415, "unsupported_media_type")


def test_json_media_types_pass(tmp_path):
    pipeline = _pipeline(tmp_path)
    for content_type in ("application/json", "application/json; charset=utf-8", "application/vnd.x+json"):
        assert _chat(pipeline, {"messages": USER}, AUTH | {"content-type": content_type}).pool == "fast"


def test_deep_nesting_and_lone_surrogates_are_400_and_echo_safely(tmp_path):
    pipeline = _pipeline(tmp_path)
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refusal, _ = _refusal(pipeline, deep)
    assert (refusal.status, refusal.code) == (400, "body_shape")
    assert (
        refusal.param == "$.messages" + "[0]" * 5 + "...(52 more)..." + "[0]" * 6
    )  # 64 levels, middle elided
    assert "nesting depth bound (64)" in refusal.message
    lone = b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    refusal, _ = _refusal(pipeline, lone)
    assert (refusal.status, refusal.code) == (400, "invalid_encoding")
    paired = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert _chat(pipeline, paired).encoded.decode().count("\U0001f600") == 1
    # A refusal that echoes a lone surrogate still renders (as ASCII JSON).
    refusal, _ = _refusal(pipeline, b'{"model": "\\udfff", "messages": []}')
    assert refusal.status == 404
    rendered = error_response(refusal.status, refusal.message, code=refusal.code)
    assert json.loads(rendered.body)["error"]["code"] == "model_not_found"


def test_the_body_shape_is_the_configured_one_and_named_where_it_was_passed(tmp_path):
    pipeline = _pipeline(tmp_path, ingress={"body_shape": {"max_depth": 8, "max_string_bytes": 2048}})
    schema: dict = {"type": "string"}
    for _ in range(4):
        schema = {"type": "object", "properties": {"a": schema}}
    body = {
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    refusal, _ = _refusal(pipeline, body)
    assert (refusal.status, refusal.reason, refusal.code) == (400, Reason.INVALID, "body_shape")
    assert refusal.param == "$.response_format.json_schema.schema.properties.a.properties.a.properties"
    refusal, _ = _refusal(pipeline, {"messages": [{"role": "user", "content": "x" * 2049}]})
    assert (refusal.code, refusal.param) == ("body_shape", "$.messages[0].content")
    assert _chat(pipeline, {"messages": [{"role": "user", "content": "x" * 2048}]}).pool == "fast"


def test_n_is_capped_and_counts_as_sequences(tmp_path):
    pipeline = _pipeline(tmp_path)
    for bad in (MAX_N + 1, 0, -3, "2", 1.5, True):
        refusal, _ = _refusal(pipeline, {"messages": USER, "n": bad})
        assert (refusal.status, refusal.param, refusal.code) == (400, "n", "invalid_value"), bad
    # fast runs one sequence at a time per replica: n=2 would take more than a whole batch.
    refusal, _ = _refusal(pipeline, {"messages": USER, "n": 2})
    assert (refusal.status, refusal.code) == (400, "too_many_sequences")
    assert "2 sequences" in refusal.message and "'fast'" in refusal.message
    refusal, _ = _refusal(pipeline, {"prompt": ["a", "b"]}, endpoint="completions")
    assert refusal.code == "too_many_sequences"
    assert _chat(pipeline, {"prompt": [1, 2, 3]}, endpoint="completions").sequences == 1  # token ids: one


def test_admission_counts_sequences_not_requests(tmp_path):
    pipeline = _pipeline(
        tmp_path,
        pools={
            "all": {
                "model": "/m",
                "efforts": ["low", "medium", "high"],
                "max_ongoing_requests": 8,
                "max_queued_requests": 4,
            }
        },
        budgets={},
    )
    pipeline.admission.running["all"] = 1
    first = _chat(pipeline, {"messages": USER, "n": 8})
    pipeline.started(first)
    assert pipeline.admission.in_flight["all"] == 8
    second = _chat(pipeline, {"messages": USER, "n": 4})
    pipeline.started(second)
    refusal, _ = _refusal(pipeline, {"messages": USER})  # 12 sequences: at the bound of 8 + 4
    assert (refusal.status, refusal.reason) == (429, Reason.QUEUE_FULL)
    pipeline.finished(first)
    pipeline.finished(first)  # once only
    assert pipeline.admission.in_flight["all"] == 4


def _tenant_pipeline(tmp_path, **limit) -> RequestPipeline:
    return _pipeline(
        tmp_path,
        pools={"all": {"model": "/m", "efforts": ["low", "medium", "high"], "max_ongoing_requests": 8}},
        budgets={},
        auth={"api_keys_file": str(tmp_path / "keys"), "key_rate_limits": {"tenant": limit}},
    )


def test_a_key_is_capped_in_sequences_in_flight(tmp_path):
    pipeline = _tenant_pipeline(tmp_path, concurrent_requests=3)
    pipeline.admission.running["all"] = 4
    held = _chat(pipeline, {"messages": USER, "n": 2})
    pipeline.started(held)
    refusal, _ = _refusal(pipeline, {"messages": USER, "n": 2})
    assert (refusal.status, refusal.reason, refusal.code) == (429, Reason.RATE_LIMIT, "rate_limit_exceeded")
    assert "3 sequences in flight" in refusal.message and refusal.headers["Retry-After"] == "1"
    pipeline.started(_chat(pipeline, {"messages": USER}))  # one more fits
    pipeline.finished(held)
    assert _chat(pipeline, {"messages": USER, "n": 2}).key_name == "tenant"


def test_a_key_is_capped_in_tokens_per_minute(tmp_path):
    pipeline = _tenant_pipeline(tmp_path, tokens_per_minute=600)
    pipeline.admission.running["all"] = 1
    answer = _chat(pipeline, {"messages": USER})
    pipeline.started(answer)
    pipeline.finished(answer, tokens=900)  # prompt and output, reasoning included: 300 over the minute's 600
    refusal, _ = _refusal(pipeline, {"messages": USER})
    assert (refusal.status, refusal.reason) == (429, Reason.RATE_LIMIT)
    assert "600 tokens per minute" in refusal.message
    assert 25 <= int(refusal.headers["Retry-After"]) <= 31  # 300 tokens back at 10 per second


def test_failed_authentication_is_limited_per_address(tmp_path):
    pipeline = _pipeline(tmp_path, auth={"api_keys_file": str(tmp_path / "keys"), "failed_auth_per_address": {
        "requests_per_minute": 6, "burst": 3}})  # fmt: skip
    wrong = {"authorization": "Bearer sk-guess"}
    for _ in range(3):
        with pytest.raises(Refusal) as failed:
            _decide(pipeline, "chat", wrong, b"{}", Decision(), client="10.0.0.9")
        assert failed.value.status == 401
    # Now every request of that address is 429, a valid key included: no oracle for guesses.
    for headers in (wrong, AUTH):
        with pytest.raises(Refusal) as throttled:
            _decide(pipeline, "chat", headers, {"messages": USER}, Decision(), "10.0.0.9")
        assert (throttled.value.status, throttled.value.reason) == (429, Reason.AUTH_THROTTLED)
        assert int(throttled.value.headers["Retry-After"]) >= 1
    assert _decide(pipeline, "chat", AUTH, {"messages": USER}, Decision(), client="10.0.0.10").pool == "fast"


def test_the_client_address_behind_a_load_balancer_is_the_entry_it_appended():
    forwarded = {
        "x-forwarded-for": "6.6.6.6, 203.0.113.7"
    }  # the client wrote the first, the balancer the last
    assert client_address(forwarded, "10.1.0.4", "x-forwarded-for") == "203.0.113.7"
    assert client_address({}, "10.1.0.4", "x-forwarded-for") == "10.1.0.4"
    assert client_address(forwarded, "10.1.0.4", None) == "10.1.0.4"  # not configured: never trusted


def test_a_built_in_tool_its_pool_does_not_offer_is_refused_with_400_naming_it():
    serve = parse_config(
        {
            "model_name": "m",
            "pools": {
                "fast": {"model": "/models/x", "efforts": ["low", "medium"]},
                "deep": {
                    "model": "/models/x",
                    "efforts": ["high"],
                    "tools": {"python": {"url": "tools-python:8765"}},
                },
            },
        }
    ).view()  # what the ingress is deployed with
    admission = Admission(serve)
    admission.running.update({"fast": 1, "deep": 1})
    pipeline = RequestPipeline(serve, admission)
    python = {"type": "code_interpreter", "container": {"type": "auto"}}
    lookup = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    body = {"input": "What is 2**100?", "tools": [lookup, python], "reasoning": {"effort": "low"}}
    refusal, _ = _refusal(pipeline, body, headers={}, endpoint="responses")
    assert (refusal.status, refusal.reason, refusal.code) == (400, Reason.INVALID, "tool_not_offered")
    assert refusal.param == "tools[1].type"
    assert "code_interpreter (the python tool)" in refusal.message and "pool 'fast' offers no built-in" in (
        refusal.message
    )
    # The pool that offers it takes it, and a function tool needs no built-in tool anywhere.
    assert (
        _chat(pipeline, {**body, "reasoning": {"effort": "high"}}, headers={}, endpoint="responses").pool
        == "deep"
    )
    assert _chat(pipeline, {**body, "tools": [lookup]}, headers={}, endpoint="responses").pool == "fast"
    browse, _ = _refusal(
        pipeline,
        {**body, "tools": [{"type": "web_search_preview"}], "reasoning": {"effort": "high"}},
        {},
        "responses",
    )
    assert browse.code == "tool_not_offered" and "pool 'deep' offers python" in browse.message
