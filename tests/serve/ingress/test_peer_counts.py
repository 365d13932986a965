"""Bounds across ingress replicas (``serve/ingress/peer_counts.py``): two pipelines, as two ingress replicas have, share
their counts through one ledger, and every bound (a pool's queue, a key's concurrency, its requests and tokens
per minute) holds for the two together. The ledger is the Ray actor's class, called directly here; the
two-ingress stack test runs it as the actor."""

from __future__ import annotations

import asyncio
import time

import pytest

from gptoss_vllm.serve.config_load import parse_config
from gptoss_vllm.serve.ingress.peer_counts import PEER_TTL_S, Ledger, PeerView
from gptoss_vllm.serve.ingress.pipeline import Decision, RequestPipeline
from gptoss_vllm.serve.ingress.refusal import Refusal

CONFIG = {
    "model_name": "m",
    "pools": {
        "all": {
            "model": "/models/x",
            "efforts": ["low", "medium", "high"],
            "max_ongoing_requests": 2,
            "max_queued_requests": 1,
        }
    },
    "auth": {
        "api_keys_env": "UNUSED_IN_THIS_TEST",
        "key_rate_limits": {
            "few": {"concurrent_requests": 2},
            "slow": {"requests_per_minute": 6, "burst": 2},
            "thrifty": {"tokens_per_minute": 100},
        },
    },
}


class Replica:
    """One ingress replica's pipeline and view of its peers, exchanging through ``ledger``."""

    def __init__(self, name: str, ledger: Ledger) -> None:
        from gptoss_vllm.serve.ingress.admission import Admission
        from gptoss_vllm.serve.ingress.rate_limits import RateLimiter

        config = parse_config(CONFIG)
        auth = config.auth
        self.name, self.ledger, self.view = name, ledger, PeerView()
        self.pipeline = RequestPipeline(
            config, Admission(config), limiter=RateLimiter(auth.rate_limit, dict(auth.key_rate_limits))
        )
        self.pipeline.admission.running["all"] = 1

    def exchange(self, now: float = 0.0) -> None:
        answer = self.ledger.exchange(self.name, self.pipeline.own_counts().as_dict(), now=now)
        self.pipeline.take_peers(self.view, *self.view.update(answer))

    def start(self, key: str) -> Decision:
        decision = Decision(key_name=key, pool="all")
        self.pipeline.admit(decision)
        self.pipeline.started(decision)
        return decision

    def take_rate(self, key: str) -> float | None:
        assert self.pipeline._limiter is not None
        return self.pipeline._limiter.acquire(key)


@pytest.fixture
def replicas():
    ledger = Ledger()
    return Replica("a", ledger), Replica("b", ledger)


def _refused(replica: Replica, key: str) -> Refusal:
    with pytest.raises(Refusal) as raised:
        replica.start(key)
    return raised.value


def test_the_pool_queue_bound_holds_for_both_replicas(replicas):
    a, b = replicas
    # Capacity 2 running + 1 queued: two on a, one on b fill it once they have exchanged.
    a.start("few"), a.start("slow"), b.start("thrifty")
    a.exchange(), b.exchange(), a.exchange()
    assert (a.pipeline.admission.total_in_flight("all"), b.pipeline.admission.total_in_flight("all")) == (
        3,
        3,
    )
    for replica in (a, b):
        refusal = _refused(replica, "slow")
        assert (refusal.status, refusal.reason) == (429, "queue_full")
    # A replica that stops reporting is forgotten: its requests ended with it.
    answer = b.ledger.exchange("b", b.pipeline.own_counts().as_dict(), now=PEER_TTL_S + 1)
    b.pipeline.take_peers(b.view, *b.view.update(answer))
    assert b.view.peers == 0 and b.pipeline.admission.total_in_flight("all") == 1


def test_a_keys_concurrency_holds_for_both_replicas(replicas):
    a, b = replicas
    first = a.start("few")
    b.start("few")
    a.exchange(), b.exchange(), a.exchange()
    for replica in (a, b):
        refusal = _refused(replica, "few")
        assert (refusal.status, refusal.code) == (429, "rate_limit_exceeded")
    a.pipeline.finished(first)
    a.exchange(), b.exchange()
    b.pipeline.admission.running["all"] = 2  # room in the pool: only the key's bound is in question
    assert b.start("few").started


def test_requests_and_tokens_per_minute_hold_for_both_replicas(replicas):
    a, b = replicas
    # Burst 2: one request on each replica spends the key's whole burst, once they have exchanged.
    assert a.take_rate("slow") is None and b.take_rate("slow") is None
    a.exchange(), b.exchange(), a.exchange()
    for replica in (a, b):
        wait = replica.take_rate("slow")
        assert wait is not None and wait > 0
    # Tokens: what one replica's answers used is charged on the other's bucket too.
    spent = a.start("thrifty")
    a.pipeline.finished(spent, tokens=150)
    a.exchange(), b.exchange()
    assert _refused(b, "thrifty").code == "rate_limit_exceeded"
    # Charged once: a second exchange with nothing new spent changes nothing.
    b.exchange(), b.exchange()
    assert b.view.update(b.ledger.exchange("b", b.pipeline.own_counts().as_dict())) == ({}, {})


class _LedgerHandle:
    """The ledger's actor handle as the exchange loop calls it (``exchange.remote(...)``, awaited), over the real
    :class:`Ledger`, with a clock the test moves (the stack test runs the real actor)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger, self.exchange, self.skew_s = ledger, self, 0.0

    def remote(self, replica: str, counts: dict):
        async def call():
            return self.ledger.exchange(replica, counts, now=time.monotonic() + self.skew_s)

        return call()


def test_a_replica_counts_the_peers_it_stops_hearing_of():
    from prometheus_client import CollectorRegistry

    from gptoss_vllm.observability.metrics import IngressMetrics
    from gptoss_vllm.serve.ingress.peer_exchange import PeerExchanger

    def value(registry: CollectorRegistry, name: str) -> float | None:
        return registry.get_sample_value(name)

    async def scenario() -> tuple[list[float | None], list[float | None]]:
        handle = _LedgerHandle(Ledger())
        registries = {name: CollectorRegistry() for name in ("a", "b")}
        exchangers = {
            name: PeerExchanger(
                Replica(name, handle.ledger).pipeline, IngressMetrics(registry), "app", name, lambda: handle
            )
            for name, registry in registries.items()
        }
        b = registries["b"]
        await _until(lambda: value(b, "gptoss_ingress_peers") == 1)
        heard = [value(b, "gptoss_ingress_peers"), value(b, "gptoss_ingress_peers_lost_total")]
        exchangers["a"].stop()
        handle.skew_s = PEER_TTL_S + 1  # a's last report is now older than the TTL: the ledger forgets it
        await _until(lambda: value(b, "gptoss_ingress_peers") == 0)
        lost = [value(b, "gptoss_ingress_peers"), value(b, "gptoss_ingress_peers_lost_total")]
        exchangers["b"].stop()
        return heard, lost

    heard, lost = asyncio.run(scenario())
    assert heard == [1, 0] and lost == [0, 1]


async def _until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the exchange loop never got there"
        await asyncio.sleep(0.05)
