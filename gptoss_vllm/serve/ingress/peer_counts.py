"""Bounds that hold across ingress replicas: each replica shares what it counts with the others.

Each ingress replica counts its own requests: sequences in flight per pool (admission's queue bound), sequences
in flight per API key (``concurrent_requests``), and what each key spent (requests of its
``requests_per_minute`` bucket, tokens of its ``tokens_per_minute`` bucket). With more than one ingress replica,
every ``EXCHANGE_S`` each replica reports its counts to one named Ray actor on the head, the :class:`Ledger`,
and gets back the sum of every other live replica's. Its checks then add the peers' in-flight sequences to its
own, and charge its buckets with what the peers spent since the last exchange, so every bound is the config's
number for the whole service, not per replica.

A replica that stops reporting (stopped, or lost with its node) is forgotten after ``PEER_TTL_S``: its requests
ended with it. Forgetting a peer loosens the bounds (each replica then bounds alone), so the TTL is long enough
that a busy node, whose actor calls stall for seconds, does not lose its peers: a dead replica's sequences
rather hold their slots a little longer (Ray Serve takes longer than that to replace it anyway). Each replica
counts the peers it lost (``gptoss_ingress_peers_lost_total``). The view of the peers lags by at most one
exchange, so replicas admitting at the same instant can each take the last slot (at most one request per
replica per ``EXCHANGE_S`` beyond a bound); Ray Serve's ``max_queued_requests`` on each pool handle stays the
hard backstop. The failed-authentication limit per client address stays per replica (a client that spreads its
failures over replicas gets replicas x the limit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

EXCHANGE_S = 0.25
PEER_TTL_S = 10.0
LEDGER_NAME = "gptoss-admission-ledger"


@dataclass
class Counts:
    """What one replica counts: in flight now, and spent since it started (cumulative, so that an exchange
    lost on the way loses nothing)."""

    pool_in_flight: dict[str, int] = field(default_factory=dict)
    key_in_flight: dict[str, int] = field(default_factory=dict)
    key_requests: dict[str, float] = field(default_factory=dict)
    key_tokens: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            "pool_in_flight": dict(self.pool_in_flight),
            "key_in_flight": dict(self.key_in_flight),
            "key_requests": dict(self.key_requests),
            "key_tokens": dict(self.key_tokens),
        }

    @classmethod
    def summed(cls, many: list[dict[str, dict[str, float]]]) -> Counts:
        total = cls()
        for counts in many:
            for part, values in counts.items():
                into = getattr(total, part)
                for name, value in values.items():
                    into[name] = into.get(name, 0) + value
        return total


class Ledger:
    """The Ray actor (one per app, on the head) the ingress replicas exchange their counts with."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[dict[str, dict[str, float]], float]] = {}  # replica -> (counts, when)

    def exchange(self, replica: str, counts: dict[str, dict[str, float]], now: float | None = None) -> dict:
        """Keep ``replica``'s counts; answer the others' summed (``Counts.as_dict`` shape) and how many there are."""
        now = time.monotonic() if now is None else now
        self._reports[replica] = (counts, now)
        self._reports = {r: seen for r, seen in self._reports.items() if now - seen[1] < PEER_TTL_S}
        others = [counts for r, (counts, _) in self._reports.items() if r != replica]
        return {"peers": len(others), "counts": Counts.summed(others).as_dict()}


@dataclass
class PeerView:
    """One replica's view of the others: their in-flight counts, and their spending turned into what to charge
    this replica's buckets with (the growth of their cumulative totals since the last exchange)."""

    peers: int = 0
    pool_in_flight: dict[str, int] = field(default_factory=dict)
    key_in_flight: dict[str, int] = field(default_factory=dict)
    _seen_requests: dict[str, float] = field(default_factory=dict)
    _seen_tokens: dict[str, float] = field(default_factory=dict)

    def update(self, answer: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
        """Take the ledger's answer; returns the peers' new spending (requests, tokens) per key."""
        counts = Counts(**answer["counts"])
        self.peers = int(answer["peers"])
        self.pool_in_flight = {k: int(v) for k, v in counts.pool_in_flight.items()}
        self.key_in_flight = {k: int(v) for k, v in counts.key_in_flight.items()}
        requests = _growth(counts.key_requests, self._seen_requests)
        tokens = _growth(counts.key_tokens, self._seen_tokens)
        self._seen_requests, self._seen_tokens = counts.key_requests, counts.key_tokens
        return requests, tokens


def ledger_actor(app_name: str) -> Any:
    """The app's ledger, created on first use (also after it was lost), on the head as the ingress is."""
    import ray
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    return (
        ray.remote(Ledger)
        .options(
            name=f"{LEDGER_NAME}-{app_name}",
            namespace="gptoss-vllm",
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={HEAD_NODE_RESOURCE_NAME: 0.001},
        )
        .remote()
    )


def _growth(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    # A total that fell (a peer forgotten, or restarted) charges nothing; the new level is the baseline.
    return {
        name: value - before.get(name, 0.0) for name, value in now.items() if value > before.get(name, 0.0)
    }
