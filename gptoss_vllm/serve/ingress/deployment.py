"""The ingress deployment: OpenAI routes wired to the request pipeline, then to a pool's handle.

The checks (key, rate limit, body, model, effort, budget, pool, admission) are :mod:`.pipeline`'s; this class
only reads the HTTP request, runs them, answers a :class:`~gptoss_vllm.serve.ingress.refusal.Refusal`, and relays the
pool's answer as it is produced with ``x-gptoss-effort``, ``x-gptoss-effort-source`` and ``x-gptoss-pool``
(``x-gptoss-replica`` only where the operator turns it on). Rendering, parsing and generation are the pool's
(vLLM's). Bodies normally arrive whole from the proxy gate (:mod:`gptoss_vllm.serve.proxy.gate`); the ingress still holds them to
its own limit and deadline, for paths that bypass the gate. Every error is OpenAI's shape, internals never.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.request_record import RequestRecord
from gptoss_vllm.observability.targets import MetricsEndpoint, targets_actor
from gptoss_vllm.observability.tracing import ingress_tracer
from gptoss_vllm.refusal_reasons import SERVICE_REASONS, Reason
from gptoss_vllm.serve.body_bounds import too_large, too_slow
from gptoss_vllm.serve.config import ServeConfig
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.ingress.effort import Endpoint
from gptoss_vllm.serve.ingress.keys import KeyRing, bearer_token
from gptoss_vllm.serve.ingress.openapi import openapi_document
from gptoss_vllm.serve.ingress.peer_counts import EXCHANGE_S, PEER_TTL_S, PeerView, ledger_actor
from gptoss_vllm.serve.ingress.pipeline import Decision, RequestPipeline, client_address
from gptoss_vllm.serve.ingress.rate_limits import RateLimiter
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.responses.conversation import (
    ListingError,
    deleted,
    input_items_page,
    queued_response,
    with_status,
)
from gptoss_vllm.serve.ingress.responses.store import StoredConversation, StoreUnavailable, open_store
from gptoss_vllm.serve.openai_errors import error_response, sse_error_event
from gptoss_vllm.serve.pool.answer_channel import (
    AnswerLost,
    AnswerReader,
    FinishedResponse,
    PoolAnswerEnd,
    PoolAnswerStart,
)
from gptoss_vllm.serve.pool.deployment import PoolRequest
from gptoss_vllm.serve.pool.router import routable_replicas

log = logging.getLogger("ray.serve")

# Headers that travel from the client into vLLM (trace context, request ids); never Authorization.
_FORWARDED_HEADERS = ("traceparent", "tracestate", "baggage", "x-request-id")
_PASSED_BACK_HEADERS = ("content-type", "x-request-id")
POOL_STATUS_PERIOD_S = 1.0
ROUTER_READ_PERIOD_S = 0.2  # a dict read: cheap
STORE_SIZE_PERIOD_S = 10.0
# Background responses: how often the ingress running one checks for a cancel (from any ingress replica) and
# renews its lease; a response whose lease ran out is shown as failed (its ingress stopped).
BACKGROUND_POLL_S = 1.0
BACKGROUND_LEASE_S = 15.0

app = FastAPI(title="gptoss-vllm", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path[:200]}: {exc.detail}"
    return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)


def _client_gone(exc: BaseException) -> bool:
    """Ray's proxy cancels the receive of a request whose client hung up (or starlette saw it leave)."""
    from ray.exceptions import TaskCancelledError

    return isinstance(exc, (ClientDisconnect, TaskCancelledError))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The operator gets the traceback in the log; the client a request id to quote, never the internals.
    request_id = request.headers.get("x-request-id", "")
    if _client_gone(exc):
        log.info("client of %s %s left (x-request-id %s)", request.method, request.url.path[:200], request_id)
        return error_response(499, "The client closed the request", code="client_closed")
    log.exception(
        "unexpected error in %s %s (x-request-id %s)", request.method, request.url.path[:200], request_id
    )
    message = (
        "The server failed to handle this request; retry, and report it with its x-request-id if it persists"
    )
    return error_response(500, message, code="internal_error")


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes (beyond: 413), within ``timeout_s`` (beyond: 408); a client that
    leaves raises ClientDisconnect."""

    def oversized() -> Refusal:
        return Refusal(Reason.INVALID, 413, too_large(limit), code="body_too_large")

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise oversized()
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise oversized()
                chunks.append(chunk)
    except TimeoutError:
        raise Refusal(Reason.INVALID, 408, too_slow(timeout_s), code="request_timeout") from None
    return b"".join(chunks)


def _tokens(record: RequestRecord) -> int:
    """What the answer used, for the key's tokens per minute (reasoning is part of the output)."""
    return (record.prompt_tokens or 0) + (record.output_tokens or 0)


def _without_paths(answer: Response) -> Response:
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


class Ingress:
    """The Ray Serve ingress replica; ``pools`` are the pool deployments' handles."""

    async def __init__(self, config: dict[str, Any], pools: dict[str, Any]) -> None:
        from ray import serve

        self._config = ServeConfig.model_validate(config)
        self._handles = {name: handle.options(stream=True) for name, handle in pools.items()}
        self._admission = Admission(self._config)
        registry = CollectorRegistry()
        self._metrics = IngressMetrics(registry)
        auth = self._config.auth
        keys = KeyRing(auth, auth.api_keys_recheck_s, self._keys_reloaded) if auth else None
        if keys is not None:
            self._metrics.api_keys.set(len(keys))
        self._pipeline = RequestPipeline(
            self._config,
            self._admission,
            keys=keys,
            limiter=RateLimiter(auth.rate_limit, dict(auth.key_rate_limits)) if auth else None,
        )
        token_env = self._config.ingress.monitoring_token_env
        self._monitoring_token = os.environ.get(token_env, "").strip().encode() or None
        if self._monitoring_token is None:
            log.warning("GET /metrics/targets is off: set $%s to the token Prometheus sends", token_env)
        backend = self._store_backend = self._config.response_store.backend
        self._store = open_store(
            self._config.response_store,
            on_evict=lambda reason, count: self._metrics.store_evictions.labels(backend, reason).inc(count),
        )
        # Every series from the start (at 0): a store that never failed still has a failure rate of 0.
        for result in ("hit", "miss"):
            self._metrics.store_lookups.labels(backend, result)
        for reason in ("ttl", "size"):
            self._metrics.store_evictions.labels(backend, reason)
        for operation in ("get", "put", "delete", "count"):
            self._metrics.store_errors.labels(backend, operation)
        self._background: dict[str, asyncio.Task] = {}
        if backend == "embedded" and self._config.ingress.replicas > 1:
            log.warning(
                "response_store.backend is embedded with %d ingress replicas: replicas on one node share %s, "
                "but on a multi-node cluster each node keeps its own conversations; use backend: redis",
                self._config.ingress.replicas,
                self._config.response_store.embedded_path(),
            )
        context = serve.get_replica_context()
        self._app_name = context.app_name
        self._heard: set[str] = set()
        self._seen_at_zero: set[str] = set()  # pools this replica has seen idle at zero (after they ran)
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch_pools())
        self._store_watcher = loop.create_task(self._watch_store())
        self._replica = context.replica_id.unique_id
        self._peers = PeerView()
        self._exchanger = (
            loop.create_task(self._exchange_counts()) if self._config.ingress.replicas > 1 else None
        )
        for name, pool in self._config.pools.items():
            # Read at scrape time, so the gauges never lag the admission counts.
            self._metrics.in_flight.labels(name).set_function(lambda n=name: self._admission.in_flight[n])
            self._metrics.queue_depth.labels(name).set_function(lambda n=name: self._admission.queue_depth(n))
            self._metrics.running_replicas.labels(name).set_function(
                lambda n=name: self._admission.running[n]
            )
            self._metrics.peer_in_flight.labels(name).set_function(
                lambda n=name: self._admission.peer_in_flight.get(n, 0)
            )
            self._metrics.queue_limit.labels(name).set(pool.max_queued_requests)
            self._metrics.min_replicas.labels(name).set(pool.min_replicas)
            # Every pool's series from the start (0 for a pool that never scales to zero): panels and alerts
            # read a series that exists.
            self._metrics.cold_starts.labels(name)
            for outcome in ("served", "timed_out"):
                self._metrics.cold_start_hold.labels(name, outcome)
        labels = {"component": "ingress", "replica": self._replica, "app": self._app_name}
        self._metrics_endpoint = MetricsEndpoint(labels, registry)
        self._tracer = ingress_tracer(self._replica)

    def _client(self, request: Request) -> str | None:
        peer = request.client.host if request.client else None
        return client_address(request.headers, peer, self._config.ingress.client_address_header)

    def _keys_reloaded(self, loaded: bool, in_force: int) -> None:
        self._metrics.api_keys.set(in_force)
        if not loaded:
            self._metrics.api_keys_reload_failures.inc()

    # -- pool readiness --------------------------------------------------------------------------------------

    async def _watch_pools(self) -> None:
        """Keep admission's running-replica counts: from the pools' routers in this process once they have
        heard from Ray Serve's long poll; until then (a router is built on its handle's first use) from the
        Serve controller, whose full status is costly to build and read."""
        from ray import serve

        while True:
            unheard = []
            for name in self._config.pools:
                count = routable_replicas(self._app_name, name)
                if count is None:
                    unheard.append(name)
                else:
                    self._set_running(name, count)
                    if name not in self._heard:
                        self._heard.add(name)
                        log.info("pool %s: running replicas now read from its router (%d)", name, count)
            if unheard:
                try:
                    status = await asyncio.to_thread(serve.status)
                    deployments = status.applications[self._app_name].deployments
                    for name in unheard:
                        states = deployments[name].replica_states if name in deployments else {}
                        self._set_running(name, int(states.get("RUNNING", 0)))
                except Exception as exc:  # the controller restarting: keep the last known counts
                    log.warning("could not read pool status from the Serve controller: %s", exc)
            await asyncio.sleep(POOL_STATUS_PERIOD_S if unheard else ROUTER_READ_PERIOD_S)

    def _set_running(self, pool: str, count: int) -> None:
        previous = self._admission.running[pool]
        self._admission.running[pool] = count
        # Seen at zero first: a pool's first replicas at the deploy are not a cold start.
        if previous == 0 and count > 0 and pool in self._seen_at_zero:
            self._metrics.cold_starts.labels(pool).inc()
            log.info("pool %s: cold start, %d replica(s) running", pool, count)
        if count == 0 and self._config.pools[pool].scales_from_zero:
            self._seen_at_zero.add(pool)

    async def _exchange_counts(self) -> None:
        """Share this replica's counts with the other ingress replicas (``peer_counts``), so that every bound
        holds for the whole service; if the ledger cannot be reached, the peers are forgotten after PEER_TTL_S
        (each replica then bounds alone) until it can."""
        ledger = None
        last_heard = time.monotonic()
        while True:
            try:
                ledger = ledger or ledger_actor(self._app_name)
                counts = self._pipeline.own_counts().as_dict()
                answer = await asyncio.wait_for(ledger.exchange.remote(self._replica, counts), PEER_TTL_S)
                requests, tokens = self._peers.update(answer)
                self._pipeline.take_peers(self._peers, requests, tokens)
                self._metrics.ingress_peers.set(self._peers.peers)
                last_heard = time.monotonic()
            except Exception as exc:
                ledger = None
                if time.monotonic() - last_heard > PEER_TTL_S and self._peers.peers:
                    log.warning(
                        "lost the other ingress replicas' counts (%s): bounding alone until back", exc
                    )
                    self._peers = PeerView()
                    self._pipeline.take_peers(self._peers, {}, {})
                    self._metrics.ingress_peers.set(0)
            await asyncio.sleep(EXCHANGE_S)

    async def _watch_store(self) -> None:
        """Keep the store's size gauge (and let retention run when nothing is written)."""
        while True:
            try:
                self._metrics.stored_responses.labels(self._store_backend).set(await self._store.count())
            except StoreUnavailable as exc:
                self._store_failed(exc)
            await asyncio.sleep(STORE_SIZE_PERIOD_S)

    # -- the response store ----------------------------------------------------------------------------------

    def _store_failed(self, exc: StoreUnavailable, consequence: str = "") -> None:
        self._metrics.store_errors.labels(self._store_backend, exc.operation).inc()
        log.warning("%s%s", exc, consequence)

    async def _stored(self, call: Any) -> Any:
        """Await a store call; a failure is counted and answered 503 with Retry-After, never ignored."""
        try:
            return await call
        except StoreUnavailable as exc:
            self._store_failed(exc)
            retry = self._config.ingress.retry_after_s
            message = f"The response store is unavailable; retry in {retry} s"
            raise Refusal.retry_later(
                Reason.STORE_UNAVAILABLE, 503, message, retry, code="store_unavailable"
            ) from None

    async def _owned(
        self, response_id: Any, decision: Decision, param: str | None = None
    ) -> StoredConversation:
        """The stored response, if the request's key owns it (else 404)."""
        found = await self._stored(self._store.get(response_id)) if isinstance(response_id, str) else None
        try:
            conversation = self._pipeline.owned(response_id, found, decision, param)
        except Refusal:
            self._metrics.store_lookups.labels(self._store_backend, "miss").inc()
            raise
        self._metrics.store_lookups.labels(self._store_backend, "hit").inc()
        lease = conversation.lease_until
        if lease is not None and lease < time.time() and conversation.status in ("queued", "in_progress"):
            error = {
                "code": "server_error",
                "message": "The server running this response stopped; create it again",
            }
            conversation.response = with_status(conversation.response, "failed", error)
        return conversation

    async def _keep(self, decision: Decision, document: bytes) -> None:
        """Store the finished response of ``decision`` (its owner, whole input, output)."""
        if not decision.store:
            return
        assert decision.response_id is not None and decision.key_name is not None
        if decision.background:
            current = await self._stored(self._store.get(decision.response_id))
            if current is None or current.cancel_requested:
                return  # deleted or cancelled while it ran: that answer stands
        conversation = StoredConversation(
            id=decision.response_id,
            owner=decision.key_name,
            created_at=time.time(),
            input_items=decision.input_items or [],
            response=json.loads(document),
        )
        await self._stored(self._store.put(conversation))

    # -- routes ----------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """200 while every pool can serve: it has a running replica, or it scales from zero and can start one."""
        admission = self._admission
        pools = {
            name: {
                "state": admission.pool_state(name),
                "running_replicas": admission.running[name],
                "min_replicas": pool.min_replicas,
            }
            for name, pool in self._config.pools.items()
        }
        ok = all(pool["state"] != "no_replica" for pool in pools.values())
        return JSONResponse({"ready": ok, "pools": pools}, status_code=200 if ok else 503)

    @app.get("/openapi.json")
    async def openapi(self) -> JSONResponse:
        return JSONResponse(openapi_document(app.title, self._config.model_name))

    @app.get("/metrics/targets")
    async def metrics_targets(self, request: Request) -> JSONResponse:
        """Every replica's metrics endpoint, in Prometheus' HTTP service discovery format: for the bearer of
        the monitoring token only (it lists internal addresses); to anyone else the route does not exist."""
        token = bearer_token(request.headers.get("authorization"))
        if (
            self._monitoring_token is None
            or token is None
            or not hmac.compare_digest(token.encode("latin-1", "replace"), self._monitoring_token)
        ):
            return error_response(404, "GET /metrics/targets: Not Found", code="not_found")
        return JSONResponse(await targets_actor().http_sd.remote())

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        record = self._record("models", request)
        decision = Decision()
        try:
            self._pipeline.models(request.headers, decision, self._client(request))
        except Refusal as refusal:
            return self._refused(record, decision, refusal)
        answer = await self._forward(decision, PoolRequest("GET", "/v1/models"), record)
        return self._finished(record, _without_paths(answer))

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._generate("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate("completions", request)

    @app.post("/v1/responses")
    async def responses(self, request: Request) -> Response:
        return await self._generate("responses", request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(self, response_id: str, request: Request) -> Response:
        return await self._stored_response(request, response_id, "get")

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(self, response_id: str, request: Request) -> Response:
        return await self._stored_response(request, response_id, "input_items")

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(self, response_id: str, request: Request) -> Response:
        return await self._stored_response(request, response_id, "delete")

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(self, response_id: str, request: Request) -> Response:
        return await self._stored_response(request, response_id, "cancel")

    # -- request handling ------------------------------------------------------------------------------------

    def _record(self, endpoint: str, request: Request) -> RequestRecord:
        """Start observing a request: its metrics record and, when tracing is on, its server span."""
        if self._tracer is None:
            return RequestRecord(self._metrics, endpoint)
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(dict(request.headers))
        span = self._tracer.start_span(
            f"{request.method} {request.url.path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.url.path},
        )
        record = RequestRecord(self._metrics, endpoint, span)
        # Auth, effort, budget and the queue decision; ends when the pool is called or the request refused.
        record.admission_span = self._tracer.start_span("admission", context=set_span_in_context(span))
        return record

    @staticmethod
    def _finished(record: RequestRecord, response: Response, client_error: str | None = None) -> Response:
        """Close the record of a request answered without a stream; a 4xx the ingress did not classify
        (vLLM's own validation) counts as the ``client_error`` rejection reason."""
        status = response.status_code
        if status < 400:
            record.rejected = None
        elif record.rejected is None and status < 500:
            record.rejected = client_error
        record.finish(status)
        return response

    @staticmethod
    def _refused(record: RequestRecord, decision: Decision, refusal: Refusal) -> Response:
        """Answer and record a refusal, where the pipeline got to (effort, pool) before it."""
        if decision.effort is not None:
            record.effort, record.effort_source = decision.effort.effort, decision.effort.source
        record.pool = decision.pool or record.pool
        record.rejected = refusal.reason.value
        if refusal.reason in SERVICE_REASONS:
            log.info("refused %s request (pool %s): %s", record.endpoint, record.pool, refusal.reason)
        answer = error_response(
            refusal.status,
            refusal.message,
            param=refusal.param,
            code=refusal.code,
            headers=decision.headers | refusal.headers,
        )
        record.finish(refusal.status)
        return answer

    async def _generate(self, endpoint: Endpoint, request: Request) -> Response:
        record = self._record(endpoint, request)
        try:
            answer = await self._admit_and_forward(endpoint, request, record)
        except (asyncio.CancelledError, ClientDisconnect):
            record.finish(499)  # the client hung up before the pool answered: not the service's failure
            raise
        except BaseException:
            record.finish(500)
            raise
        if not isinstance(answer, StreamingResponse):
            self._finished(record, answer, Reason.INVALID.value)
        return answer

    async def _admit_and_forward(
        self, endpoint: Endpoint, request: Request, record: RequestRecord
    ) -> Response:
        decision = Decision()
        try:
            self._pipeline.before_body(request.headers, decision, self._client(request))
            raw = await _read_body(request, self._pipeline.body_limit, self._config.ingress.body_timeout_s)
            # Parsing megabytes here would stall every stream on this event loop.
            if len(raw) > 1 << 20:
                parsed = await asyncio.to_thread(self._pipeline.parse_json, raw)
            else:
                parsed = self._pipeline.parse_json(raw)
            previous = None
            previous_id = parsed.get("previous_response_id") if isinstance(parsed, dict) else None
            if endpoint == "responses" and previous_id is not None:
                previous = await self._owned(previous_id, decision, "previous_response_id")
            self._pipeline.with_body(endpoint, request.headers, raw, decision, parsed, previous)
        except Refusal as refusal:
            return self._refused(record, decision, refusal)
        assert decision.encoded is not None and decision.effort is not None
        record.effort, record.effort_source = decision.effort.effort, decision.effort.source
        if decision.clamped_from is not None:
            self._metrics.budget_clamps.labels(decision.effort.effort).inc()
        forwarded = [(k, v) for k, v in request.headers.items() if k in _FORWARDED_HEADERS]
        forwarded.append(
            ("content-type", "application/json")
        )  # the body is re-encoded JSON whatever was sent
        pool_request = PoolRequest(
            "POST",
            request.url.path,
            decision.encoded,
            headers=forwarded,
            payload=decision.body,
            endpoint=endpoint,
            strip_usage=decision.strip_usage,
            response_fields=decision.response_fields,
        )
        if decision.background:
            return await self._start_background(decision, pool_request, record)
        return await self._forward(decision, pool_request, record)

    async def _stored_response(self, request: Request, response_id: str, action: str) -> Response:
        """Read, list the input of, delete or cancel a stored response: its owner's key only."""
        record = self._record(f"responses_{action}", request)
        decision = Decision()
        try:
            self._pipeline.stored_response(request.headers, decision, self._client(request))
            if action == "get" and request.query_params.get("stream") in ("true", "1"):
                raise Refusal(
                    Reason.INVALID,
                    400,
                    "Streaming a stored response is not supported: GET it without 'stream'",
                    param="stream",
                    code="invalid_value",
                )
            conversation = await self._owned(response_id, decision)
            if action == "get":
                answer: Response = JSONResponse(conversation.response)
            elif action == "input_items":
                try:
                    answer = JSONResponse(input_items_page(conversation, dict(request.query_params)))
                except ListingError as exc:
                    raise Refusal(
                        Reason.INVALID, 400, str(exc), param=exc.param, code="invalid_value"
                    ) from None
            elif action == "delete":
                await self._stored(self._store.delete(conversation.id))
                answer = JSONResponse(deleted(conversation.id))
            else:
                answer = JSONResponse(await self._cancel(conversation))
        except Refusal as refusal:
            return self._refused(record, decision, refusal)
        return self._finished(record, answer)

    async def _cancel(self, conversation: StoredConversation) -> dict[str, Any]:
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
            await self._stored(self._store.put(conversation))
        return conversation.response

    async def _start_background(
        self, decision: Decision, pool_request: PoolRequest, record: RequestRecord
    ) -> Response:
        """Answer ``queued`` at once and run the response here, counted in admission until it ends."""
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
        try:
            await self._stored(self._store.put(conversation))
        except Refusal as refusal:
            return self._refused(record, decision, refusal)
        task = asyncio.get_running_loop().create_task(
            self._run_background(decision, pool_request, conversation)
        )
        self._background[conversation.id] = task
        task.add_done_callback(lambda _: self._background.pop(conversation.id, None))
        return JSONResponse(queued, headers={**decision.headers, "x-gptoss-pool": decision.pool or ""})

    async def _run_background(
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

    async def __del__(self) -> None:
        self._watcher.cancel()
        self._store_watcher.cancel()
        if self._exchanger is not None:
            self._exchanger.cancel()
        for task in list(self._background.values()):
            task.cancel()  # their leases run out: other replicas show them as failed
        self._metrics_endpoint.close()
        await self._store.close()

    def _start_engine_span(self, record: RequestRecord, pool_request: PoolRequest) -> None:
        """A child span for the pool call, whose context vLLM's engine span continues (``traceparent``)."""
        if record.span is None:
            return
        from opentelemetry.trace import SpanKind, set_span_in_context

        record.end_admission()
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        record.engine_span = self._tracer.start_span(
            "engine", context=set_span_in_context(record.span), kind=SpanKind.CLIENT,
            attributes={"gptoss.pool": record.pool},
        )  # fmt: skip
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(record.engine_span))
        kept = [(k, v) for k, v in pool_request.headers if k not in ("traceparent", "tracestate")]
        pool_request.headers = kept + list(carrier.items())

    async def _forward(
        self, decision: Decision, pool_request: PoolRequest, record: RequestRecord
    ) -> Response:
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError

        assert decision.pool is not None
        pool = record.pool = decision.pool
        headers = {**decision.headers, "x-gptoss-pool": pool}
        if decision.spilled_from:
            headers["x-gptoss-spilled-from"] = record.spilled_from = decision.spilled_from
            self._metrics.spillovers.labels(decision.spilled_from, pool).inc()
        self._start_engine_span(record, pool_request)
        self._pipeline.started(decision)
        started = time.monotonic()
        # Ray Serve routes the call and counts it until the answer is done; the answer comes over the channel.
        answer = _Answer(self._handles[pool].handle_request.remote(pool_request))
        cold_start_timeout = self._config.pools[pool].cold_start_timeout_s if decision.cold_start else None
        try:
            start = await answer.claim(route_timeout_s=cold_start_timeout)
        except BaseException as exc:
            self._pipeline.finished(decision)
            answer.hang_up()
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
                raise
            return self._refused(record, Decision(headers=headers), refusal)
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
                if answer.cancelled:
                    record.finish(499)
                    raise asyncio.CancelledError from exc
                log.warning("pool %s failed while answering: %s", pool, exc)
                refusal = Refusal(Reason.REPLICA_FAILED, 503, f"Pool '{pool}' failed while answering")
                return self._refused(record, Decision(headers=headers), refusal)
            except Refusal as refusal:  # the store could not keep the answer: the client asks again
                answer.hang_up()
                return self._refused(record, Decision(headers=headers), refusal)
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
        answer: _Answer,
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
            if answer.cancelled:
                return  # the client hung up (499 below), not a replica failure
            log.warning("pool %s replica %s failed mid-stream: %s", pool, replica_id, exc)
            record.status, record.rejected = 503, Reason.REPLICA_FAILED.value
            yield sse_error_event(
                503, f"Pool '{pool}' lost the replica serving this stream; retry", "replica_failed"
            )
            finished = True
        finally:
            self._pipeline.finished(decision, _tokens(record))
            if not finished:
                answer.hang_up()  # the client went away: free the engine
                record.status = 499  # nginx's "client closed request": not the server's failure
            record.finish()


class _Answer:
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

    def hang_up(self) -> None:
        """Stop the answer: the replica cancels it (and vLLM aborts the request) when its connection closes."""
        if self.reader is not None:
            self.reader.close()
        if self._watcher is not None:
            self._watcher.cancel()
        self.call.cancel()
