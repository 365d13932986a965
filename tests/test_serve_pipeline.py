"""The ingress's request pipeline without Ray: every refusal with its status, code, reason and headers, and
what the pipeline decides for the requests it lets through."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from gptoss_vllm.observability.local_prometheus import RULES
from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.rules import SERVICE_REJECTION_REASONS
from gptoss_vllm.serve.admission import Admission
from gptoss_vllm.serve.auth import KeyRing, RateLimiter
from gptoss_vllm.serve.config import RateLimit, parse_config
from gptoss_vllm.serve.pipeline import MAX_BODY_BYTES, Decision, RequestPipeline, ResponseRoutes
from gptoss_vllm.serve.refusal import Reason, Refusal

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
        ResponseRoutes(8),
        keys=KeyRing(auth),
        limiter=RateLimiter(auth.rate_limit, dict(auth.key_rate_limits)),
    )


def _chat(pipeline: RequestPipeline, body, headers=AUTH, endpoint="chat") -> Decision:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return pipeline.generation(endpoint, headers, raw, Decision())


def _refusal(pipeline: RequestPipeline, body, headers=AUTH, endpoint="chat") -> tuple[Refusal, Decision]:
    decision = Decision()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(Refusal) as refused:
        pipeline.generation(endpoint, headers, raw, decision)
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
    refusal, _ = _refusal(_pipeline(tmp_path), b" " * (MAX_BODY_BYTES + 1))
    assert (refusal.status, refusal.reason) == (413, Reason.INVALID)


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
    assert (decision.pool, decision.spilled_from, decision.replica_id) == ("fast", None, None)
    assert decision.headers == {
        "x-gptoss-effort": "low",
        "x-gptoss-effort-source": "chat",
        "x-gptoss-budget-clamped-from": "500",
    }
    assert decision.clamped_from == 500 and decision.body["max_tokens"] == 64
    assert decision.body["model"] == "m" and decision.body["reasoning_effort"] == "low"
    # The ingress asked for the usage event it counts tokens from; the client did not, so it is dropped later.
    assert decision.strip_usage and decision.body["stream_options"] == {"include_usage": True}
    assert not decision.remember
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


def test_follow_ups_and_stored_responses_go_to_the_replica_that_stored_them(tmp_path):
    pipeline = _pipeline(tmp_path)
    first = _chat(pipeline, {"input": "Hi", "reasoning": {"effort": "high"}}, endpoint="responses")
    assert first.remember and first.pool == "deep"
    pipeline.routes.remember("resp_1", "deep", "replica-a")
    follow = _chat(
        pipeline,
        {"input": "More", "previous_response_id": "resp_1", "reasoning": {"effort": "low"}},
        endpoint="responses",
    )
    assert (follow.pool, follow.replica_id, follow.effort.effort) == ("deep", "replica-a", "low")
    stored = pipeline.stored_response(AUTH, "resp_1", Decision())
    assert (stored.pool, stored.replica_id) == ("deep", "replica-a")
    with pytest.raises(Refusal) as missing:
        pipeline.stored_response(AUTH, "resp_unknown", Decision())
    assert (missing.value.status, missing.value.reason) == (404, Reason.NOT_FOUND)
    with pytest.raises(Refusal) as anonymous:
        pipeline.stored_response({}, "resp_1", Decision())
    assert anonymous.value.reason is Reason.AUTH


def test_the_alert_rules_and_metrics_speak_the_reasons_of_the_one_enum():
    assert SERVICE_REJECTION_REASONS == ("queue_full", "no_replica", "replica_failed")
    assert 'reason=~"queue_full|no_replica|replica_failed"' in RULES.read_text()
    help_text = IngressMetrics(CollectorRegistry()).rejections._documentation
    assert all(reason.value in help_text for reason in Reason)
