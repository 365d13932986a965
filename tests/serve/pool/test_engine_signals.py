"""What a pool replica reports to Ray Serve's autoscaler, read from metrics named and shaped as vLLM registers
them (a registry of the test's own; ``prometheus_client`` is the real library vLLM uses)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram

from gptoss_vllm.serve.pool.engine_signals import EngineSignals, histogram_percentile

BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0)


def _vllm_metrics(registry: CollectorRegistry):
    labels = ["model_name", "engine"]
    waiting = Gauge("vllm:num_requests_waiting", "waiting", labels, registry=registry)
    running = Gauge("vllm:num_requests_running", "running", labels, registry=registry)
    kv = Gauge("vllm:kv_cache_usage_perc", "kv", labels, registry=registry)
    ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", labels, buckets=BUCKETS, registry=registry)
    return waiting, running, kv, ttft


def test_percentile_interpolates_inside_its_bucket_as_prometheus_does():
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_percentile(buckets, 50) == pytest.approx(0.5)
    assert histogram_percentile(buckets, 75) == pytest.approx(0.75)
    assert histogram_percentile([(1.0, 0.0), (float("inf"), 0.0)], 95) is None
    assert histogram_percentile([(1.0, 0.0), (float("inf"), 4.0)], 95) == 1.0  # all above the last bound


def test_the_figures_of_two_engines_and_a_sliding_ttft_window():
    registry = CollectorRegistry()
    waiting, running, kv, ttft = _vllm_metrics(registry)
    for engine, (w, r, use) in enumerate([(3, 4, 0.25), (1, 2, 0.75)]):
        waiting.labels("m", str(engine)).set(w)
        running.labels("m", str(engine)).set(r)
        kv.labels("m", str(engine)).set(use)
    signals = EngineSignals(ttft_percentile=90, ttft_window_s=30, registry=registry)
    first = signals.read(now=0.0)
    assert (first["engine_waiting"], first["engine_running"], first["kv_cache_usage"]) == (4, 6, 0.75)
    assert (first["ttft_s"], first["ttft_samples"]) == (0.0, 0.0)  # nothing in the window yet
    for _ in range(10):
        ttft.labels("m", "0").observe(0.05)  # fast first tokens, before the window
    signals.read(now=10.0)
    for _ in range(10):
        ttft.labels("m", "1").observe(3.0)
    within = signals.read(now=35.0)  # the window starts at the read of t=0: all 20 are in it
    assert within["ttft_samples"] == 20 and within["ttft_s"] == pytest.approx(4.4)
    later = signals.read(now=45.0)  # from t=10 on: the slow ten only
    assert later["ttft_samples"] == 10 and 2.0 < later["ttft_s"] <= 5.0
    assert set(later) == {"engine_waiting", "engine_running", "kv_cache_usage", "ttft_s", "ttft_samples"}
    assert all(isinstance(value, float) for value in later.values())  # Ray wants numbers
