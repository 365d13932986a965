"""What a pool replica's engine feels, as it reports it to Ray Serve's autoscaler (``record_autoscaling_stats``).

Read from vLLM's own metrics in the replica's process (its Prometheus registry): the requests its scheduler holds
waiting (``vllm:num_requests_waiting``) and running, the KV cache's use (``vllm:kv_cache_usage_perc``, 0..1), and
a percentile of the time to first token over a sliding window, from the deltas of vLLM's TTFT histogram
(``vllm:time_to_first_token_seconds``). Ray averages each figure per replica over the pool's
``look_back_period_s`` and hands them to the pool's policy (:mod:`.scaling_policy`) in the Serve controller.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

WAITING = "engine_waiting"
RUNNING = "engine_running"
KV_CACHE = "kv_cache_usage"
TTFT = "ttft_s"
TTFT_SAMPLES = "ttft_samples"

_WAITING_GAUGE = "vllm:num_requests_waiting"
_RUNNING_GAUGE = "vllm:num_requests_running"
_KV_GAUGE = "vllm:kv_cache_usage_perc"
_TTFT_HISTOGRAM = "vllm:time_to_first_token_seconds"


def histogram_percentile(buckets: list[tuple[float, float]], percentile: float) -> float | None:
    """The ``percentile`` (0..100) of a cumulative histogram's ``(upper bound, count)`` buckets, interpolated
    linearly inside its bucket as Prometheus' ``histogram_quantile`` does; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = buckets[-1][1] * percentile / 100
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # above the highest finite bucket: its bound is what is known
            inside = count - lower_count
            share = (rank - lower_count) / inside if inside > 0 else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


class EngineSignals:
    """The figures of one replica; ``registry`` is where vLLM registers its metrics (the process's default)."""

    def __init__(
        self, ttft_percentile: float = 95.0, ttft_window_s: float = 30.0, registry: Any = None
    ) -> None:
        self._percentile = ttft_percentile
        self._window_s = ttft_window_s
        self._registry = registry
        # (time, cumulative TTFT buckets) snapshots: the window's histogram is the newest minus the oldest kept.
        self._snapshots: deque[tuple[float, list[tuple[float, float]]]] = deque()

    def read(self, now: float | None = None) -> dict[str, float]:
        """The replica's figures now (every key present: Ray wants numbers; ``ttft_s`` is 0 when the window
        holds no first token, and ``ttft_samples`` says how many it holds)."""
        registry = self._registry
        if registry is None:
            from prometheus_client import REGISTRY as registry
        figures = {WAITING: 0.0, RUNNING: 0.0, KV_CACHE: 0.0}
        ttft: dict[float, float] = {}
        for family in registry.collect():
            if family.name == _WAITING_GAUGE:
                figures[WAITING] += sum(s.value for s in family.samples)
            elif family.name == _RUNNING_GAUGE:
                figures[RUNNING] += sum(s.value for s in family.samples)
            elif family.name == _KV_GAUGE:
                figures[KV_CACHE] = max([figures[KV_CACHE], *(s.value for s in family.samples)])
            elif family.name == _TTFT_HISTOGRAM:
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        bound = float(sample.labels["le"])
                        ttft[bound] = ttft.get(bound, 0.0) + sample.value  # summed over engines
        window = self._window(sorted(ttft.items()), time.monotonic() if now is None else now)
        figures[TTFT_SAMPLES] = window[-1][1] if window else 0.0
        figures[TTFT] = histogram_percentile(window, self._percentile) or 0.0
        return figures

    def _window(self, buckets: list[tuple[float, float]], now: float) -> list[tuple[float, float]]:
        self._snapshots.append((now, buckets))
        while len(self._snapshots) > 1 and now - self._snapshots[1][0] >= self._window_s:
            self._snapshots.popleft()
        oldest = dict(self._snapshots[0][1])
        return [(bound, count - oldest.get(bound, 0.0)) for bound, count in buckets]
