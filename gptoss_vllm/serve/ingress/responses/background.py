"""Responses created with ``background: true``: answered ``queued`` at once, run by the ingress replica that took
them, under a lease in the store.

The replica running one renews its lease every ``BACKGROUND_POLL_S`` and checks for a cancel or a delete (made
through any ingress replica); a response whose lease ran out is shown as failed (its ingress stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import JSONResponse, Response

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.request_record import RequestRecord
from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.ingress.pipeline import Decision
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.responses.conversation import queued_response, with_status
from gptoss_vllm.serve.ingress.responses.store import ResponseStore, StoredConversation, StoreUnavailable
from gptoss_vllm.serve.pool.deployment import PoolRequest

log = logging.getLogger("ray.serve")

BACKGROUND_POLL_S = 1.0
BACKGROUND_LEASE_S = 15.0

# Sends a decided request to its pool and answers it (the pool forwarder's call).
Forward = Callable[[Decision, PoolRequest, RequestRecord], Awaitable[Response]]
# Awaits a store call, answering a failure 503 (the Responses service's guard).
Guarded = Callable[[Awaitable[Any]], Awaitable[Any]]


def shown_status(conversation: StoredConversation) -> StoredConversation:
    """A running response whose lease ran out is shown as failed: the ingress running it stopped."""
    lease = conversation.lease_until
    if lease is not None and lease < time.time() and conversation.status in ("queued", "in_progress"):
        error = {
            "code": "server_error",
            "message": "The server running this response stopped; create it again",
        }
        conversation.response = with_status(conversation.response, "failed", error)
    return conversation


class BackgroundRuns:
    """The background responses this ingress replica runs."""

    def __init__(
        self,
        store: ResponseStore,
        guarded: Guarded,
        store_failed: Callable[[StoreUnavailable, str], None],
        forward: Forward,
        metrics: IngressMetrics,
    ) -> None:
        self._store = store
        self._guarded = guarded
        self._store_failed = store_failed
        self._forward = forward
        self._metrics = metrics
        self._running: dict[str, asyncio.Task] = {}

    async def start(self, decision: Decision, pool_request: PoolRequest) -> Response:
        """Answer ``queued`` at once and run the response here, counted in admission until it ends; a store
        that cannot take it is a refusal (503)."""
        assert decision.response_id is not None and decision.key_name is not None
        assert decision.body is not None and decision.response_fields is not None
        queued = queued_response(decision.response_id, decision.body, decision.response_fields)
        conversation = StoredConversation(
            id=decision.response_id,
            owner=decision.key_name,
            created_at=time.time(),
            input_items=decision.input_items or [],
            response=queued,
            lease_until=time.time() + BACKGROUND_LEASE_S,
        )
        await self._guarded(self._store.put(conversation))
        task = asyncio.get_running_loop().create_task(self._run(decision, pool_request, conversation))
        self._running[conversation.id] = task
        task.add_done_callback(lambda _: self._running.pop(conversation.id, None))
        return JSONResponse(queued, headers={**decision.headers, "x-gptoss-pool": decision.pool or ""})

    async def cancel(self, conversation: StoredConversation) -> dict[str, Any]:
        """Mark a background response cancelled; the ingress running it (any replica) stops it within
        ``BACKGROUND_POLL_S``, and the engine aborts it."""
        if not conversation.response.get("background"):
            raise Refusal(
                Reason.INVALID,
                400,
                "Only a response created with 'background: true' can be cancelled",
                code="invalid_value",
            )
        if conversation.status in ("queued", "in_progress"):
            conversation.cancel_requested = True
            conversation.lease_until = None
            conversation.response = with_status(conversation.response, "cancelled")
            await self._guarded(self._store.put(conversation))
        return conversation.response

    async def _run(
        self, decision: Decision, pool_request: PoolRequest, conversation: StoredConversation
    ) -> None:
        record = RequestRecord(self._metrics, "responses")
        work = asyncio.ensure_future(self._forward(decision, pool_request, record))
        try:
            while not (await asyncio.wait({work}, timeout=BACKGROUND_POLL_S))[0]:
                if not await self._renew(conversation.id):
                    work.cancel()
                    return
            answer = work.result()
            if answer.status_code != 200:
                # The engine refused it, or the store failed at the end: the stored response says so.
                kind = "server_error" if answer.status_code >= 500 else "invalid_request"
                await self._fail(conversation, kind, bytes(answer.body).decode(errors="replace")[:2000])
        except asyncio.CancelledError:
            work.cancel()
            raise
        except Exception:
            log.exception("background response %s failed", conversation.id)
            with contextlib.suppress(Exception):
                await self._fail(
                    conversation, "server_error", "The server failed while running this response"
                )

    async def _renew(self, response_id: str) -> bool:
        """Renew a running background response's lease; False once it was cancelled or deleted (from any
        ingress replica). A store that cannot be reached stops nothing."""
        try:
            current = await self._store.get(response_id)
            if current is None or current.cancel_requested:
                state = "deleted" if current is None else "cancelled"
                log.info("background response %s was %s: stopping it", response_id, state)
                return False
            current.lease_until = time.time() + BACKGROUND_LEASE_S
            if current.status == "queued":
                current.response = with_status(current.response, "in_progress")
            await self._store.put(current)
        except StoreUnavailable as exc:
            self._store_failed(exc, f" (background response {response_id} keeps running)")
        return True

    async def _fail(self, conversation: StoredConversation, code: str, message: str) -> None:
        conversation.lease_until = None
        conversation.response = with_status(
            conversation.response, "failed", {"code": code, "message": message}
        )
        await self._store.put(conversation)

    def stop(self) -> None:
        for task in list(self._running.values()):
            task.cancel()  # their leases run out: other replicas show them as failed
