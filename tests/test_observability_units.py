"""Observability parts without a running stack: what the ingress reads from answers, the targets list, the
tracing switch, and the CLI's ``--prometheus`` checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gptoss_vllm.observability import targets, tracing
from gptoss_vllm.observability.local_prometheus import SD_REFRESH_INTERVAL, prometheus_config
from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.request_record import RequestRecord
from gptoss_vllm.serve.ingress.usage_event import request_usage
from gptoss_vllm.serve.pool.stream_observer import StreamObserver


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chat_chunk(**delta: str) -> bytes:
    return _event({"choices": [{"index": 0, "delta": delta}]})


USAGE = {"prompt_tokens": 70, "completion_tokens": 12, "completion_tokens_details": {"reasoning_tokens": 9}}


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    from prometheus_client import generate_latest

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def _record(endpoint: str = "chat") -> tuple[RequestRecord, CollectorRegistry]:
    registry = CollectorRegistry()
    record = RequestRecord(IngressMetrics(registry), endpoint)
    record.effort, record.effort_source, record.pool = "high", "chat", "deep"
    return record, registry


def test_request_usage_is_forced_on_streams_and_remembered():
    body = {"stream": True}
    assert request_usage("chat", body) and body["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert not request_usage("chat", asked)
    assert not request_usage("chat", {"stream": False})
    assert not request_usage("responses", {"stream": True})  # its completed event always carries usage


def test_a_chat_stream_split_anywhere_is_relayed_intact_and_timed():
    record, registry = _record()
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
    samples = _samples(registry)
    labels = frozenset({"endpoint": "chat", "effort": "high", "pool": "deep"}.items())
    assert samples[("gptoss_time_to_first_token_seconds_count", labels)] == 1
    assert samples[("gptoss_time_to_first_token_seconds_sum", labels)] == pytest.approx(
        0.5 + seen.first_token_s
    )
    assert samples[("gptoss_time_to_first_answer_token_seconds_count", labels)] == 1
    assert samples[("gptoss_inter_token_latency_seconds_count", labels)] == 2  # three token events
    tokens = {k: v for (name, k), v in samples.items() if name == "gptoss_output_tokens_total"}
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


def test_a_record_is_written_once_with_its_rejection():
    record, registry = _record()
    record.rejected = "queue_full"
    record.finish(429)
    record.finish(500)
    samples = _samples(registry)
    requests = {dict(k)["status"]: v for (name, k), v in samples.items() if name == "gptoss_requests_total"}
    assert requests == {"429": 1}
    assert (
        samples[("gptoss_rejections_total", frozenset({"reason": "queue_full", "pool": "deep"}.items()))] == 1
    )


def test_targets_expire_when_a_replica_stops_announcing(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(targets.time, "monotonic", lambda: clock[0])
    actor = targets.MetricsTargets()
    actor.announce("10.0.0.1:9000", {"component": "ingress"})
    actor.announce("10.0.0.2:9001", {"component": "pool", "pool": "fast"})
    assert [t["targets"] for t in actor.http_sd()] == [["10.0.0.1:9000"], ["10.0.0.2:9001"]]
    clock[0] += targets.TTL_S - 1
    actor.announce("10.0.0.2:9001", {"component": "pool", "pool": "fast"})
    clock[0] += 2
    assert actor.http_sd() == [
        {"targets": ["10.0.0.2:9001"], "labels": {"component": "pool", "pool": "fast"}}
    ]
    actor.forget("10.0.0.2:9001")
    assert actor.http_sd() == []


def test_metrics_port_env(monkeypatch):
    monkeypatch.delenv(targets.PORT_ENV, raising=False)
    assert targets._port_candidates() == [0]
    monkeypatch.setenv(targets.PORT_ENV, "9500")
    assert targets._port_candidates()[:2] == [9500, 9501]
    monkeypatch.setenv(targets.PORT_ENV, "nine")
    with pytest.raises(ValueError, match="GPTOSS_METRICS_PORT='nine'"):
        targets._port_candidates()


@pytest.fixture
def otel_env(monkeypatch):
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_tracing_is_off_without_an_endpoint(otel_env):
    assert tracing.traces_endpoint() is None
    assert tracing.ingress_tracer("r1") is None
    assert tracing.engine_tracing_env() == {}


def test_tracing_endpoints_follow_the_otel_variables(otel_env):
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert tracing.traces_endpoint() == "http://collector:4318/"  # gRPC by default: used as is
    otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert tracing.traces_endpoint() == "http://collector:4318/v1/traces"
    assert tracing.engine_tracing_env() == {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318/v1/traces")
    assert tracing.traces_endpoint() == "http://traces:4318/v1/traces"
    assert tracing.ingress_tracer("r1") is not None
    otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.traces_endpoint() is None


def test_a_bad_protocol_names_the_variable(otel_env):
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4318")
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon")
    with pytest.raises(
        tracing.TracingConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='carrier-pigeon'"
    ):
        tracing.ingress_tracer("r1")


def test_local_prometheus_discovers_targets_through_the_ingress():
    config = prometheus_config("http://127.0.0.1:8000", ["/x/rules.yaml"])
    (job,) = config["scrape_configs"]
    assert job["http_sd_configs"] == [
        {"url": "http://127.0.0.1:8000/metrics/targets", "refresh_interval": SD_REFRESH_INTERVAL}
    ]
    assert config["rule_files"] == ["/x/rules.yaml"]
    (job,) = prometheus_config("http://h:8000", [], monitoring_token="tok")["scrape_configs"]
    assert job["http_sd_configs"][0]["authorization"] == {"type": "Bearer", "credentials": "tok"}


def test_service_discovery_keeps_only_safe_target_labels():
    listing = targets.MetricsTargets()
    listing.announce("10.0.0.1:9500", {"component": "pool", "__address__": "evil:80", "__scheme__": "https",
                                       "bad-name": "x", "pool": "fast"})  # fmt: skip
    listing.announce("not an address", {"component": "pool"})
    (entry,) = listing.http_sd()
    assert entry == {"targets": ["10.0.0.1:9500"], "labels": {"component": "pool", "pool": "fast"}}


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_prometheus_port_needs_prometheus():
    answer = _serve("--prometheus-port", "9999")
    assert answer.returncode == 2 and "--prometheus-port: only meaningful with --prometheus" in answer.stderr


def test_cli_prometheus_without_the_binary_says_how_to_install(tmp_path):
    import os

    env = {**os.environ, "PATH": str(tmp_path)}
    answer = _serve("--prometheus", env=env)
    assert answer.returncode == 2
    assert (
        "--prometheus: the prometheus binary is not on PATH" in answer.stderr and "make venv" in answer.stderr
    )
