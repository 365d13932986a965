"""A discrete-event simulation of effort-routed pools of continuously batching replicas.

What it models, and what it leaves out:

- **A replica** is one engine with a service curve (``Curve``). It runs in steps: every running sequence gets
  one token per step, and sequences admitted at a step's start are prefilled in it (their first token comes at
  its end). A step takes ``tpot_s(decoding)`` plus ``prefill_s(tokens prefilled)``, as vLLM's chunked prefill
  mixes both into one batch. At most ``max_num_seqs`` sequences run, and only while their prompts and outputs
  fit the KV cache (reserved whole at admission, as vLLM does not preempt here); the rest wait, first come first
  served.
- **A pool** holds replicas and one queue, as Ray Serve's router does: a request goes to the replica with the
  fewest ongoing requests while one has fewer than ``max_ongoing`` (its replicas' ``max_ongoing_requests``),
  else it waits in the pool's queue.
- **Spillover:** a request whose pool already queues more than ``queue_above`` goes to the spillover pool, as
  the ingress does (``serve/ingress/admission.py``).
- Left out: network and ingress time, preemption, prefix caching, replica start and stop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gptoss_vllm.capacity.curve import Curve


@dataclass
class Request:
    """One request of the workload, and what happened to it."""

    arrival_s: float
    effort: str
    prompt_tokens: int
    output_tokens: int
    pool: str = ""
    first_token_s: float | None = None
    done_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.done_s is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.done_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class PoolSpec:
    """A pool as the simulation sees it: which efforts, how many replicas of which curve, and its routing."""

    name: str
    efforts: tuple[str, ...]
    replicas: int
    curve: Curve
    max_ongoing: int = 0  # per replica; 0: the curve's max_num_seqs
    spill_to: str | None = None
    queue_above: int = 0

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing or self.curve.max_num_seqs


@dataclass
class _Running:
    request: Request
    left: int  # tokens still to produce
    prefilled: bool = False


@dataclass
class _Replica:
    curve: Curve
    waiting: deque[Request] = field(default_factory=deque)
    running: list[_Running] = field(default_factory=list)
    busy: bool = False
    kv_used: int = 0
    # The steps in progress: ``steps`` steps of ``step_s`` each from ``started_s`` (several only while the batch
    # stays the same: decode only, until the first sequence ends); ``version`` voids a rescheduled end.
    started_s: float = 0.0
    step_s: float = 0.0
    steps: int = 1
    prefill: bool = False
    version: int = 0

    @property
    def ongoing(self) -> int:
        return len(self.waiting) + len(self.running)


class _Pool:
    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.replicas = [_Replica(spec.curve) for _ in range(spec.replicas)]
        self.queue: deque[Request] = deque()


def simulate(
    requests: Iterable[Request],
    pools: list[PoolSpec],
    follow: Callable[[Request], Request | None] | None = None,
) -> list[Request]:
    """Run ``requests`` (any order) through ``pools``; returns them with their times filled in (a request
    that cannot ever fit a replica's KV cache keeps ``first_token_s`` None). ``follow``, for a closed loop of
    users, gives the request a user sends once one of theirs is done (or None), with its arrival time set."""
    by_name = {spec.name: _Pool(spec) for spec in pools}
    owner = {effort: by_name[spec.name] for spec in pools for effort in spec.efforts}
    order = itertools.count()
    events: list[tuple[float, int, str, object]] = []
    todo = sorted(requests, key=lambda r: r.arrival_s)
    for request in todo:
        heapq.heappush(events, (request.arrival_s, next(order), "arrive", request))

    def start_step(replica: _Replica, now: float) -> None:
        curve = replica.curve
        while replica.waiting and len(replica.running) < curve.max_num_seqs:
            head = replica.waiting[0]
            need = head.prompt_tokens + head.output_tokens
            if need > curve.kv_capacity_tokens:
                replica.waiting.popleft()  # never fits: left unserved
                continue
            if replica.kv_used + need > curve.kv_capacity_tokens:
                break  # waits for room
            replica.waiting.popleft()
            replica.kv_used += need
            replica.running.append(_Running(head, head.output_tokens))
        if not replica.running:
            replica.busy = False
            return
        new = [r for r in replica.running if not r.prefilled]
        decoding = len(replica.running) - len(new)
        replica.step_s = (curve.tpot_s(decoding) if decoding else 0.0) + (
            curve.prefill_s(sum(r.request.prompt_tokens for r in new)) if new else 0.0
        )
        replica.prefill = bool(new)
        # Decode only: the batch holds until its first sequence ends or a request arrives (which cuts it short).
        replica.steps = 1 if new else min(r.left for r in replica.running)
        replica.started_s, replica.busy = now, True
        replica.version += 1
        heapq.heappush(
            events, (now + replica.steps * replica.step_s, next(order), "step", (replica, replica.version))
        )

    def cut(replica: _Replica, now: float) -> None:
        """A request joined a replica mid-way through decode-only steps: end them at the step under way."""
        if not replica.busy or replica.steps == 1 or replica.step_s <= 0:
            return
        steps = min(int((now - replica.started_s) / replica.step_s) + 1, replica.steps)
        if steps < replica.steps:
            replica.steps = steps
            replica.version += 1
            end = replica.started_s + steps * replica.step_s
            heapq.heappush(events, (end, next(order), "step", (replica, replica.version)))

    def dispatch(pool: _Pool, now: float) -> None:
        limit = pool.spec.ongoing_limit
        while pool.queue:
            replica = min(pool.replicas, key=lambda r: r.ongoing, default=None)
            if replica is None or replica.ongoing >= limit:
                return
            replica.waiting.append(pool.queue.popleft())
            if replica.busy:
                cut(replica, now)
            else:
                start_step(replica, now)

    pool_of_replica = {id(r): pool for pool in by_name.values() for r in pool.replicas}
    while events:
        now, _, kind, item = heapq.heappop(events)
        if kind == "arrive":
            request = item
            pool = owner[request.effort]
            spill = pool.spec.spill_to
            if spill and len(pool.queue) > pool.spec.queue_above:
                pool = by_name[spill]
            request.pool = pool.spec.name
            pool.queue.append(request)
            dispatch(pool, now)
            continue
        replica, version = item
        if version != replica.version:
            continue  # an end moved earlier by ``cut``
        done = []
        for running in replica.running:
            if not running.prefilled:
                running.prefilled = True
                running.request.first_token_s = now
            running.left -= replica.steps
            if running.left <= 0:
                running.request.done_s = now
                done.append(running)
        for running in done:
            replica.running.remove(running)
            replica.kv_used -= running.request.prompt_tokens + running.request.output_tokens
            following = follow(running.request) if follow else None
            if following is not None:
                todo.append(following)
                heapq.heappush(events, (following.arrival_s, next(order), "arrive", following))
        start_step(replica, now)
        if done:
            dispatch(pool_of_replica[id(replica)], now)
    return todo
