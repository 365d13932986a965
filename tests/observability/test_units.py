"""Observability parts without a running stack: a request's record, the targets list, the tracing switch, and
the CLI's ``--prometheus`` checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gptoss_vllm.observability import targets, tracing
from gptoss_vllm.observability.local_prometheus import SD_REFRESH_INTERVAL, prometheus_config
from tests.support.ingress_metrics import new_record, samples


def test_a_record_is_written_once_with_its_rejection():
    record, registry = new_record()
    record.rejected = "queue_full"
    record.finish(429)
    record.finish(500)
    found = samples(registry)
    requests = {dict(k)["status"]: v for (name, k), v in found.items() if name == "gptoss_requests_total"}
    assert requests == {"429": 1}
    assert (
        found[("gptoss_rejections_total", frozenset({"reason": "queue_full", "pool": "deep"}.items()))] == 1
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
    with pytest.raises(ValueError, match="GPTOSS_VLLM_METRICS_PORT='nine'"):
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
