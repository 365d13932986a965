"""A pool's autoscaling policy on what its engines feel, as the Serve controller runs it.

Ray Serve's default policy counts ongoing requests per replica (a pool's ``policy: ongoing``). For an LLM that
count says little: four 30,000-token conversations fill a replica's KV cache while forty one-line questions do
not. The other policies read the engines' own figures, which each replica reports through Ray Serve's
``record_autoscaling_stats`` (:mod:`.engine_signals`) and Ray averages per replica over ``look_back_period_s``:

- ``queue``: the requests the engines' schedulers hold waiting, per replica, against ``target``;
- ``kv_cache``: the KV cache's use (0..1), per replica, against ``target``;
- ``ttft``: the pool's time to first token at a percentile over a window (the slowest replica's), against
  ``target`` seconds (the pool's SLO).

Each scales up as soon as its figure is above the target, to the replicas that bring it back to the target, and
down only when one replica fewer would still keep it under ``target * (1 - hysteresis)``: a load near the target
does not flap. Ray wraps the policy with the pool's ``min_replicas``/``max_replicas``, ``upscale_delay_s``/
``downscale_delay_s`` and scaling factors, as it does its own. Without reports yet (replicas starting) the target
stays where it is.

Ray pickles this module by value into the controller: it imports nothing from the package and nothing heavy.
"""

from __future__ import annotations

import math
from typing import Any

# The figures' keys, as :mod:`.engine_signals` reports them (repeated here: this module must stand alone).
_WAITING = "engine_waiting"
_RUNNING = "engine_running"
_KV_CACHE = "kv_cache_usage"
_TTFT = "ttft_s"
_TTFT_SAMPLES = "ttft_samples"

SIGNALS = ("queue", "kv_cache", "ttft")


class EngineSignalPolicy:
    """``signal`` (one of :data:`SIGNALS`) against ``target``, with ``hysteresis`` (0..1) below it."""

    def __init__(self, signal: str, target: float, hysteresis: float = 0.2) -> None:
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
        if target <= 0:
            raise ValueError(f"target must be above 0, got {target}")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        self.signal, self.target, self.hysteresis = signal, float(target), float(hysteresis)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """``ctx`` is Ray's ``AutoscalingContext``; returns the desired replicas and the policy's state."""
        metrics = ctx.aggregated_metrics or {}
        current = ctx.current_num_replicas
        reported = metrics.get(_WAITING) or {}
        if not reported or current == 0:
            return ctx.target_num_replicas, ctx.policy_state
        idle = ctx.total_num_requests == 0 and not any(
            sum((metrics.get(key) or {}).values()) for key in (_WAITING, _RUNNING)
        )
        # Idle: as few as Ray allows (min_replicas, zero included), after the pool's downscale delays.
        desired = 0 if idle else self.desired(current, metrics)
        return desired, {**ctx.policy_state, "gptoss_signal": self.signal, "gptoss_desired": desired}

    def desired(self, current: int, metrics: dict[str, dict[Any, float]]) -> int:
        """The replicas this signal asks for, ``current`` running, from the replicas' averaged figures."""
        low = self.target * (1 - self.hysteresis)
        if self.signal == "ttft":
            return self._for_latency(current, metrics, low)
        key = _WAITING if self.signal == "queue" else _KV_CACHE
        load = sum((metrics.get(key) or {}).values())
        if load / current > self.target:
            return max(current + 1, math.ceil(load / self.target - 1e-9))
        if current > 1 and load / (current - 1) < low:
            return max(1, current - 1, math.ceil(load / low - 1e-9) if low > 0 else 1)
        return current

    def _for_latency(self, current: int, metrics: dict[str, dict[Any, float]], low: float) -> int:
        """TTFT has no per-replica sum: one more replica while the slowest is over the target, one fewer while
        every replica is under the band and nothing waits; an idle window (no first token) counts as under."""
        samples = metrics.get(_TTFT_SAMPLES) or {}
        ttft = [value for replica, value in (metrics.get(_TTFT) or {}).items() if samples.get(replica, 0) > 0]
        waiting = sum((metrics.get(_WAITING) or {}).values())
        if ttft and max(ttft) > self.target:
            # Proportional to how far over, at most doubling in one step (TTFT is not linear in replicas).
            return min(2 * current, max(current + 1, math.ceil(current * max(ttft) / self.target)))
        if current > 1 and waiting == 0 and all(value < low for value in ttft):
            return current - 1
        return current
