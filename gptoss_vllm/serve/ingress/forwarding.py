"""The pool call: a decided request sent to its pool's handle, and the answer relayed as it is produced.

Ray Serve routes the call and counts it until the answer is done; the answer's bytes come over the answer channel
(:mod:`gptoss_vllm.serve.pool.answer_channel`). A pool that cannot take the call in time, is at its queue bound,
or loses the replica is answered in OpenAI's shape with ``Retry-After``; a client that hangs up frees the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.request_record import RequestRecord
from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.config import IngressView
from gptoss_vllm.serve.ingress.effort import Endpoint
from gptoss_vllm.serve.ingress.pipeline import Decision, RequestPipeline
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.telemetry import IngressTelemetry
from gptoss_vllm.serve.openai_errors import sse_error_event
from gptoss_vllm.serve.pool.answer_channel import (
    AnswerLost,
    AnswerReader,
    FinishedResponse,
    PoolAnswerEnd,
    PoolAnswerStart,
)
from gptoss_vllm.serve.pool.deployment import PoolRequest

log = logging.getLogger("ray.serve")

# Headers that travel from the client into vLLM (trace context, request ids); never Authorization.
_FORWARDED_HEADERS = ("traceparent", "tracestate", "baggage", "x-request-id")
_PASSED_BACK_HEADERS = ("content-type", "x-request-id")

# Stores a finished Responses object of a decided request (its owner, whole input, output).
Keep = Callable[[Decision, bytes], Awaitable[None]]


def pool_request(endpoint: Endpoint, request: Request, decision: Decision) -> PoolRequest:
    """What the pool is sent for a decided generating request."""
    forwarded = [(k, v) for k, v in request.headers.items() if k in _FORWARDED_HEADERS]
    forwarded.append(("content-type", "application/json"))  # the body is re-encoded JSON whatever was sent
    assert decision.encoded is not None
    return PoolRequest(
        "POST",
        request.url.path,
        decision.encoded,
        headers=forwarded,
        payload=decision.body,
        endpoint=endpoint,
        strip_usage=decision.strip_usage,
        response_fields=decision.response_fields,
    )


def _tokens(record: RequestRecord) -> int:
    """What the answer used, for the key's tokens per minute (reasoning is part of the output)."""
    return (record.prompt_tokens or 0) + (record.output_tokens or 0)


def without_paths(answer: Response) -> Response:
    """``/v1/models`` as clients get it: vLLM's ``root`` is the checkpoint's path on the server."""
    if answer.status_code != 200:
        return answer
    try:
        listing = json.loads(answer.body)
        for model in listing.get("data", []):
            model["root"] = model.get("id")
            model.pop("parent", None)
    except (ValueError, AttributeError, TypeError):
        return answer
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(listing, status_code=200, headers=headers)


class PoolForwarder:
    """Sends decided requests to the pools' handles (``pools``: name -> deployment handle)."""

    def __init__(
        self,
        config: IngressView,
        pools: dict[str, Any],
        pipeline: RequestPipeline,
        telemetry: IngressTelemetry,
        keep: Keep,
    ) -> None:
        self._config = config
        self._handles = {name: handle.options(stream=True) for name, handle in pools.items()}
        self._pipeline = pipeline
        self._telemetry = telemetry
        self._metrics: IngressMetrics = telemetry.metrics
        self._keep = keep

    async def _claim(
        self, pool: str, pool_request: PoolRequest, route_timeout_s: float | None
    ) -> tuple[PoolCall, PoolAnswerStart | None, BaseException | None]:
        """The call and its answer's start, or the call and why there is none. A call whose replica was lost
        before it answered goes once more where the pool runs another replica: nothing reached the client, and
        Ray's router drops the dead replica on that error, so a node loss the pool rides out is not a 503."""
        for attempt in range(2):
            # Ray Serve routes the call and counts it until the answer is done; the answer comes over the channel.
            answer = PoolCall(self._handles[pool].handle_request.remote(pool_request))
            try:
                return answer, await answer.claim(route_timeout_s=route_timeout_s), None
            except BaseException as exc:
                hung_up = False
                try:
                    # A cancelled call's channel can close before Ray's cancellation arrives: that answer was
                    # lost to the client hanging up, not to the replica (asked before hang_up stops the watch).
                    hung_up = isinstance(exc, AnswerLost) and await answer.was_cancelled()
                except asyncio.CancelledError:
                    hung_up = True  # this request itself was cancelled meanwhile: its client hung up
                finally:
                    answer.hang_up()
                if hung_up:  # returned, not raised: the caller gives the admission slot back first
                    return answer, None, asyncio.CancelledError("the client hung up")
                # Only where another replica runs: with none, a resend would wait for a replacement to start.
                if attempt == 0 and _replica_lost(exc) and self._pipeline.admission.running[pool] > 1:
                    log.warning(
                        "pool %s lost the replica before it answered (%s); sending it again", pool, exc
                    )
                    self._metrics.resends.labels(pool).inc()
                    continue
                return answer, None, exc
        raise AssertionError("unreachable: the second attempt returns")

    async def forward(self, decision: Decision, pool_request: PoolRequest, record: RequestRecord) -> Response:
        from ray.exceptions import RayError, TaskCancelledError
        from ray.serve.exceptions import BackPressureError

        assert decision.pool is not None
        pool = record.pool = decision.pool
        headers = {**decision.headers, "x-gptoss-pool": pool}
        if decision.spilled_from:
            headers["x-gptoss-spilled-from"] = record.spilled_from = decision.spilled_from
            self._metrics.spillovers.labels(decision.spilled_from, pool).inc()
        self._telemetry.start_engine_span(record, pool_request)
        self._pipeline.started(decision)
        started = time.monotonic()
        cold_start_timeout = self._config.pools[pool].cold_start_timeout_s if decision.cold_start else None
        answer, start, exc = await self._claim(pool, pool_request, cold_start_timeout)
        if start is None:
            self._pipeline.finished(decision)
            if isinstance(exc, (asyncio.CancelledError, TaskCancelledError)):
                # The client hung up while the pool worked (Ray cancels the pool's call with the ingress's, and
                # that call may end first): a 499, not the replica failure that a RayError would say.
                raise asyncio.CancelledError from exc
            retry = self._config.ingress.retry_after_s
            if isinstance(exc, TimeoutError) and answer.routed_at is None:
                self._metrics.cold_start_hold.labels(pool, "timed_out").observe(time.monotonic() - started)
                message = (
                    f"Pool '{pool}' is starting a replica (it was scaled to zero) and none took the request "
                    f"within its cold_start_timeout_s ({cold_start_timeout:g} s); retry in {retry} s"
                )
                refusal = Refusal.retry_later(Reason.NO_REPLICA, 503, message, retry)
            elif isinstance(exc, BackPressureError):
                message = f"Pool '{pool}' is at its queue bound; retry in {retry} s"
                refusal = Refusal.retry_later(Reason.QUEUE_FULL, 429, message, retry)
            elif isinstance(exc, (RayError, StopAsyncIteration, AnswerLost)):
                log.warning("pool %s failed before answering: %s", pool, exc)
                message = f"Pool '{pool}' failed to answer (replica lost); retry in {retry} s"
                refusal = Refusal.retry_later(Reason.REPLICA_FAILED, 503, message, retry)
            else:
                raise exc
            return self._telemetry.refused(record, Decision(headers=headers), refusal)
        started_at = time.monotonic()  # the replica's observation counts from its first item's arrival
        if decision.cold_start:
            assert answer.routed_at is not None
            self._metrics.cold_start_hold.labels(pool, "served").observe(answer.routed_at - started)
        record.replica = start.replica_id
        if self._config.ingress.expose_replica_ids:
            headers["x-gptoss-replica"] = start.replica_id
        headers |= {k: v for k, v in start.headers if k.lower() in _PASSED_BACK_HEADERS}
        streaming = (
            dict((k.lower(), v) for k, v in start.headers)
            .get("content-type", "")
            .startswith("text/event-stream")
        )
        if not streaming:
            chunks = []
            try:
                async for item in answer.reader:
                    if isinstance(item, bytes):
                        chunks.append(item)
                    elif isinstance(item, FinishedResponse) and start.status == 200:
                        await self._keep(decision, item.document)
                    elif isinstance(item, PoolAnswerEnd) and item.seen is not None:
                        record.take(item.seen, started_at)
            except AnswerLost as exc:
                if await answer.was_cancelled():
                    record.finish(499)
                    raise asyncio.CancelledError from exc
                log.warning("pool %s failed while answering: %s", pool, exc)
                refusal = Refusal(Reason.REPLICA_FAILED, 503, f"Pool '{pool}' failed while answering")
                return self._telemetry.refused(record, Decision(headers=headers), refusal)
            except Refusal as refusal:  # the store could not keep the answer: the client asks again
                answer.hang_up()
                return self._telemetry.refused(record, Decision(headers=headers), refusal)
            except BaseException:
                answer.hang_up()
                raise
            finally:
                self._pipeline.finished(decision, _tokens(record))
            log.debug(
                "%s %s -> %s in %.3f s", pool, pool_request.path, start.status, time.monotonic() - started
            )
            return Response(b"".join(chunks), status_code=start.status, headers=headers)
        return StreamingResponse(
            self._relay(answer, decision, start.replica_id, record, start.status, started_at),
            status_code=start.status,
            headers=headers,
        )

    async def _relay(
        self,
        answer: PoolCall,
        decision: Decision,
        replica_id: str,
        record: RequestRecord,
        status: int,
        started_at: float,
    ) -> AsyncIterator[bytes]:
        """Forward the pool's bytes as they come; the replica observed them and says what it saw at the end."""
        assert decision.pool is not None
        pool = decision.pool
        finished = False
        record.status = status
        try:
            async for item in answer.reader:
                if isinstance(item, bytes):
                    yield item
                elif isinstance(item, PoolAnswerEnd) and item.seen is not None:
                    record.take(item.seen, started_at)
                elif isinstance(item, FinishedResponse) and status == 200:
                    # Stored before the client sees the end, so that its follow-up finds it.
                    try:
                        await self._keep(decision, item.document)
                    except Refusal as refusal:
                        record.status, record.rejected = refusal.status, refusal.reason.value
                        yield sse_error_event(refusal.status, refusal.message, refusal.code or "")
                        answer.hang_up()
                        break
            finished = True
        except AnswerLost as exc:
            message = f"Pool '{pool}' lost the replica serving this stream; retry"
            if await answer.was_cancelled():
                # Ray cancelled the call: its client hung up (499 below), not a replica failure. The stream still
                # ends with the error: a client that is there after all must not take a cut stream for a whole one.
                log.info("pool %s replica %s: stream cancelled mid-way: %s", pool, replica_id, exc)
                yield sse_error_event(503, message, "replica_failed")
                return
            log.warning("pool %s replica %s failed mid-stream: %s", pool, replica_id, exc)
            record.status, record.rejected = 503, Reason.REPLICA_FAILED.value
            yield sse_error_event(503, message, "replica_failed")
            finished = True
        finally:
            if not finished:
                answer.hang_up()  # the client went away: free the engine
                record.status = 499  # nginx's "client closed request": not the server's failure
            # Recorded before the request stops counting in flight: whoever sees it gone sees its record.
            record.finish()
            self._pipeline.finished(decision, _tokens(record))


def _replica_lost(exc: BaseException) -> bool:
    """The replica (or its node) died under the call: not the client leaving, not the pool's bounds."""
    from ray.exceptions import RayError, TaskCancelledError
    from ray.serve.exceptions import BackPressureError

    lost = isinstance(exc, (RayError, StopAsyncIteration, AnswerLost))
    return lost and not isinstance(exc, (TaskCancelledError, BackPressureError))


class PoolCall:
    """One pool call in flight: the Ray call that routed it and the answer channel its bytes come over."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.reader: AnswerReader | None = None
        self._watcher: asyncio.Future | None = None
        self.cancelled = False  # Ray cancelled the call: this request's client hung up, the pool is fine
        self.routed_at: float | None = None  # when a replica took the call

    async def claim(self, route_timeout_s: float | None = None) -> PoolAnswerStart:
        """Wait (at most ``route_timeout_s``: TimeoutError) for a replica to take the call and send its
        ticket, connect, and read the answer's start."""
        async with asyncio.timeout(route_timeout_s):
            ticket = await self.call.__anext__()
        self.routed_at = time.monotonic()
        self.reader = await AnswerReader.claim(ticket)
        self._watcher = asyncio.ensure_future(self._watch())
        start = await self.reader.__anext__()
        if not isinstance(start, PoolAnswerStart):
            raise AnswerLost(f"the answer began with {type(start).__name__}, not its start")
        return start

    async def _watch(self) -> None:
        """Follow the Ray call: if it fails (replica or node lost), so does the answer."""
        from ray.exceptions import RayError, TaskCancelledError

        try:
            async for _ in self.call:
                pass
        except TaskCancelledError:
            self.cancelled = True
            if self.reader is not None:
                self.reader.lose(AnswerLost("the request was cancelled: its client hung up"))
        except RayError as exc:
            if self.reader is not None:
                self.reader.lose(AnswerLost(f"the pool call failed: {exc}"))

    async def was_cancelled(self, settle_s: float = 2.0) -> bool:
        """Whether Ray cancelled the call (its client hung up) rather than the replica failing. A cancelled call's
        answer channel can close before Ray's cancellation reaches :meth:`_watch`: wait (at most ``settle_s``)
        for the call's own outcome before a lost answer is taken for a replica failure."""
        if not self.cancelled and self._watcher is not None and not self._watcher.done():
            await asyncio.wait({self._watcher}, timeout=settle_s)
        return self.cancelled

    def hang_up(self) -> None:
        """Stop the answer: the replica cancels it (and vLLM aborts the request) when its connection closes."""
        if self.reader is not None:
            self.reader.close()
        if self._watcher is not None:
            self._watcher.cancel()
        self.call.cancel()
