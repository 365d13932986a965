"""Admission control and spillover at the ingress: per-pool queue bounds, never an unbounded wait.

The ingress counts the sequences it has in flight to each pool (a request is ``n`` times its prompts, so one
request with ``n: 64`` is not one slot). Whatever exceeds the pool's running capacity
(running replicas x ``max_ongoing_requests``) is that pool's queue. Past ``spillover.queue_above`` a request goes
to the named other pool if that one has room; past ``max_queued_requests`` it is refused with 429 and
Retry-After (a :class:`Refusal`).

A pool with no running replica spills over, or answers 503 at once instead of holding the request, unless it
scales from zero (``autoscaling.min_replicas: 0``): then the request is admitted as a cold start (up to the
queue bound, and never spilled, as Ray Serve starts a replica only for requests sent to the pool) and the
ingress waits for a replica for at most the pool's ``cold_start_timeout_s``. Counts are per ingress replica
and, with several ingress replicas, the others' counts are added (``peer_counts``); Ray Serve's own
``max_queued_requests`` on the pool handle is the backstop.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.config import IngressView
from gptoss_vllm.serve.ingress.refusal import Refusal


@dataclass(frozen=True)
class Admitted:
    pool: str
    spilled_from: str | None = None
    cold_start: bool = False  # the pool has no replica yet and is starting one


class Admission:
    def __init__(self, config: IngressView) -> None:
        self._config = config
        self.in_flight = {name: 0 for name in config.pools}  # this replica's
        self.peer_in_flight = {name: 0 for name in config.pools}  # the other ingress replicas' (peer_counts)
        self.running = {name: 0 for name in config.pools}

    def total_in_flight(self, pool: str) -> int:
        return self.in_flight[pool] + self.peer_in_flight.get(pool, 0)

    def queue_depth(self, pool: str) -> int:
        capacity = self.running[pool] * self._config.pools[pool].max_ongoing_requests
        return max(0, self.total_in_flight(pool) - capacity)

    def pool_state(self, pool: str) -> str:
        """``serving``, ``scaled_to_zero`` (idle, can start a replica), ``cold_start`` (starting one for
        waiting requests) or ``no_replica`` (cannot serve: not started yet, or every replica lost)."""
        if self.running[pool] > 0:
            return "serving"
        if self._config.pools[pool].scales_from_zero:
            return "cold_start" if self.total_in_flight(pool) > 0 else "scaled_to_zero"
        return "no_replica"

    def _is_full(self, pool: str, sequences: int = 1) -> bool:
        settings = self._config.pools[pool]
        bound = self.running[pool] * settings.max_ongoing_requests + settings.max_queued_requests
        return self.total_in_flight(pool) + sequences > bound

    def _has_room(self, pool: str, sequences: int = 1) -> bool:
        return self.running[pool] > 0 and not self._is_full(pool, sequences)

    def admit(self, pool: str, sequences: int = 1) -> Admitted:
        """Choose where a request of ``sequences`` for ``pool`` runs."""
        settings = self._config.pools[pool]
        retry = self._config.ingress.retry_after_s
        spill = settings.spillover
        cold = self.running[pool] == 0 and settings.scales_from_zero
        overflowing = (self.running[pool] == 0 and not cold) or (
            spill is not None and self.queue_depth(pool) > spill.queue_above
        )
        if spill is not None and overflowing and self._has_room(spill.to, sequences):
            return Admitted(spill.to, spilled_from=pool)
        if self.running[pool] == 0 and not cold:
            raise Refusal.retry_later(
                Reason.NO_REPLICA, 503, f"Pool '{pool}' has no running replica yet; retry in {retry} s", retry
            )
        if self._is_full(pool, sequences):
            raise Refusal.retry_later(
                Reason.QUEUE_FULL,
                429,
                f"Pool '{pool}' is at its queue bound ({settings.max_queued_requests} waiting); retry in {retry} s",
                retry,
            )
        return Admitted(pool, cold_start=cold)

    def started(self, pool: str, sequences: int = 1) -> None:
        self.in_flight[pool] += sequences

    def finished(self, pool: str, sequences: int = 1) -> None:
        self.in_flight[pool] -= sequences
