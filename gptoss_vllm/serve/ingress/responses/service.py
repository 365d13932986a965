"""The Responses API's stored side at the ingress: conversations looked up for their owner, finished responses
kept, stored responses read, listed, deleted and cancelled, and background runs (handed the forward call).

A store that cannot be reached is answered 503 with ``Retry-After`` and counted, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any

from starlette.responses import JSONResponse, Response

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.config import IngressView
from gptoss_vllm.serve.ingress.pipeline import Decision
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.responses.background import BackgroundRuns, Forward, shown_status
from gptoss_vllm.serve.ingress.responses.conversation import (
    ListingError,
    deleted,
    input_items_page,
    owned_by,
)
from gptoss_vllm.serve.ingress.responses.store import StoredConversation, StoreUnavailable, open_store
from gptoss_vllm.serve.pool.deployment import PoolRequest

log = logging.getLogger("ray.serve")

STORE_SIZE_PERIOD_S = 10.0


class ResponsesService:
    """One ingress replica's view of the response store; ``forward`` runs background responses."""

    def __init__(self, config: IngressView, metrics: IngressMetrics, forward: Forward) -> None:
        self._config = config
        self._metrics = metrics
        self._backend = backend = config.response_store.backend
        self._store = open_store(
            config.response_store,
            on_evict=lambda reason, count: metrics.store_evictions.labels(backend, reason).inc(count),
        )
        if backend == "embedded" and config.ingress.replicas > 1:
            log.warning(
                "response_store.backend is embedded with %d ingress replicas: replicas on one node share %s, "
                "but on a multi-node cluster each node keeps its own conversations; use backend: redis",
                config.ingress.replicas,
                config.response_store.embedded_path(),
            )
        self._background = BackgroundRuns(self._store, self._guarded, self._store_failed, forward, metrics)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_size())

    async def owned(
        self, response_id: Any, decision: Decision, param: str | None = None
    ) -> StoredConversation:
        """The stored response, if the request's key owns it (else 404)."""
        found = await self._guarded(self._store.get(response_id)) if isinstance(response_id, str) else None
        try:
            conversation = owned_by(response_id, found, decision.key_name, param)
        except Refusal:
            self._metrics.store_lookups.labels(self._backend, "miss").inc()
            raise
        self._metrics.store_lookups.labels(self._backend, "hit").inc()
        return shown_status(conversation)

    async def keep(self, decision: Decision, document: bytes) -> None:
        """Store the finished response of ``decision`` (its owner, whole input, output)."""
        if not decision.store:
            return
        assert decision.response_id is not None and decision.key_name is not None
        if decision.background:
            current = await self._guarded(self._store.get(decision.response_id))
            if current is None or current.cancel_requested:
                return  # deleted or cancelled while it ran: that answer stands
        conversation = StoredConversation(
            id=decision.response_id,
            owner=decision.key_name,
            created_at=time.time(),
            input_items=decision.input_items or [],
            response=json.loads(document),
        )
        await self._guarded(self._store.put(conversation))

    async def act(self, action: str, response_id: str, decision: Decision, query: dict[str, str]) -> Response:
        """``get``, ``input_items``, ``delete`` or ``cancel`` a stored response, for its owner's key."""
        if action == "get" and query.get("stream") in ("true", "1"):
            raise Refusal(
                Reason.INVALID,
                400,
                "Streaming a stored response is not supported: GET it without 'stream'",
                param="stream",
                code="invalid_value",
            )
        conversation = await self.owned(response_id, decision)
        if action == "get":
            return JSONResponse(conversation.response)
        if action == "input_items":
            try:
                return JSONResponse(input_items_page(conversation, query))
            except ListingError as exc:
                raise Refusal(Reason.INVALID, 400, str(exc), param=exc.param, code="invalid_value") from None
        if action == "delete":
            await self._guarded(self._store.delete(conversation.id))
            return JSONResponse(deleted(conversation.id))
        return JSONResponse(await self._background.cancel(conversation))

    async def start_background(self, decision: Decision, pool_request: PoolRequest) -> Response:
        return await self._background.start(decision, pool_request)

    async def _guarded(self, call: Awaitable[Any]) -> Any:
        """Await a store call; a failure is counted and answered 503 with Retry-After."""
        try:
            return await call
        except StoreUnavailable as exc:
            self._store_failed(exc)
            retry = self._config.ingress.retry_after_s
            message = f"The response store is unavailable; retry in {retry} s"
            raise Refusal.retry_later(
                Reason.STORE_UNAVAILABLE, 503, message, retry, code="store_unavailable"
            ) from None

    def _store_failed(self, exc: StoreUnavailable, consequence: str = "") -> None:
        self._metrics.store_errors.labels(self._backend, exc.operation).inc()
        log.warning("%s%s", exc, consequence)

    async def _watch_size(self) -> None:
        """Keep the store's size gauge (and let retention run when nothing is written)."""
        while True:
            try:
                self._metrics.stored_responses.labels(self._backend).set(await self._store.count())
            except StoreUnavailable as exc:
                self._store_failed(exc)
            await asyncio.sleep(STORE_SIZE_PERIOD_S)

    async def close(self) -> None:
        self._watcher.cancel()
        self._background.stop()
        await self._store.close()
