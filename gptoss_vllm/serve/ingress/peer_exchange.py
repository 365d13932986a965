"""The loop that shares this ingress replica's counts with the others through the ledger
(:mod:`~gptoss_vllm.serve.ingress.peer_counts`), so that every bound holds for the whole service."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.serve.ingress.peer_counts import EXCHANGE_S, PEER_TTL_S, PeerView, ledger_actor
from gptoss_vllm.serve.ingress.pipeline import RequestPipeline

log = logging.getLogger("ray.serve")


class PeerExchanger:
    """Every ``EXCHANGE_S``: report ``pipeline``'s own counts, bound with the peers' from then on. If the ledger
    cannot be reached, the peers are forgotten after ``PEER_TTL_S`` (the replica then bounds alone) until it
    can."""

    def __init__(
        self,
        pipeline: RequestPipeline,
        metrics: IngressMetrics,
        app_name: str,
        replica: str,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._connect = connect or (lambda: ledger_actor(app_name))  # the ledger's actor handle
        self._replica = replica
        self._peers = PeerView()
        self._task = asyncio.get_running_loop().create_task(self._exchange())

    async def _exchange(self) -> None:
        ledger = None
        last_heard = time.monotonic()
        while True:
            try:
                ledger = ledger or self._connect()
                counts = self._pipeline.own_counts().as_dict()
                answer = await asyncio.wait_for(ledger.exchange.remote(self._replica, counts), PEER_TTL_S)
                before = self._peers.peers
                requests, tokens = self._peers.update(answer)
                self._pipeline.take_peers(self._peers, requests, tokens)
                if lost := self._heard(before):
                    log.warning(
                        "%d other ingress replica(s) stopped reporting for %.0f s (stopped, or stalled): "
                        "bounding without their counts until they report again",
                        lost,
                        PEER_TTL_S,
                    )
                last_heard = time.monotonic()
            except Exception as exc:
                ledger = None
                if time.monotonic() - last_heard > PEER_TTL_S and self._peers.peers:
                    log.warning(
                        "lost the other ingress replicas' counts (%s): bounding alone until back", exc
                    )
                    before, self._peers = self._peers.peers, PeerView()
                    self._pipeline.take_peers(self._peers, {}, {})
                    self._heard(before)
            await asyncio.sleep(EXCHANGE_S)

    def _heard(self, before: int) -> int:
        """Export the peers now heard of; count and return how many of the ``before`` were lost."""
        self._metrics.ingress_peers.set(self._peers.peers)
        lost = max(0, before - self._peers.peers)
        if lost:
            self._metrics.ingress_peers_lost.inc(lost)
        return lost

    def stop(self) -> None:
        self._task.cancel()
