"""The ingress deployment: OpenAI routes, API keys, effort resolution, budgets, admission, then a pool.

Everything here happens before a request reaches an engine and costs microseconds; rendering, parsing and
generation are the pool's (vLLM's). Answers stream through as the pool produces them and carry
``x-gptoss-effort``, ``x-gptoss-effort-source`` and ``x-gptoss-pool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.request_record import RequestRecord, request_usage
from gptoss_vllm.observability.targets import MetricsEndpoint, targets_actor
from gptoss_vllm.observability.tracing import ingress_tracer
from gptoss_vllm.serve.admission import Admission, Admitted, Rejected
from gptoss_vllm.serve.auth import KeyRing, RateLimiter
from gptoss_vllm.serve.budget import BudgetError, apply_budget
from gptoss_vllm.serve.config import ServeConfig
from gptoss_vllm.serve.effort import EffortError, Endpoint, ResolvedEffort, apply_effort, resolve_effort
from gptoss_vllm.serve.openai_errors import error_response, sse_error_event
from gptoss_vllm.serve.pool import PoolAnswerStart, PoolRequest

log = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024
# Headers that travel from the client into vLLM (trace context, request ids); never Authorization.
_FORWARDED_HEADERS = ("traceparent", "tracestate", "baggage", "x-request-id")
_PASSED_BACK_HEADERS = ("content-type", "x-request-id")
POOL_STATUS_PERIOD_S = 1.0

app = FastAPI(title="gptoss-vllm", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)


class _ResponseRoutes:
    """Where each stored Response lives (pool, replica), bounded LRU."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._routes: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def remember(self, response_id: str, pool: str, replica_id: str) -> None:
        self._routes[response_id] = (pool, replica_id)
        self._routes.move_to_end(response_id)
        while len(self._routes) > self._capacity:
            self._routes.popitem(last=False)

    def find(self, response_id: str) -> tuple[str, str] | None:
        return self._routes.get(response_id)


def _response_id_in_sse(buffer: bytes) -> str | None:
    for line in buffer.split(b"\n"):
        if line.startswith(b"data: {"):
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            if isinstance(event.get("response"), dict) and event["response"].get("id"):
                return event["response"]["id"]
    return None


class Ingress:
    """The Ray Serve ingress replica; ``pools`` are the pool deployments' handles."""

    async def __init__(self, config: dict[str, Any], pools: dict[str, Any]) -> None:
        from ray import serve

        self._config = ServeConfig.model_validate(config)
        self._handles = {name: handle.options(stream=True) for name, handle in pools.items()}
        self._admission = Admission(self._config)
        self._keys = KeyRing(self._config.auth) if self._config.auth else None
        auth = self._config.auth
        self._limiter = RateLimiter(auth.rate_limit, dict(auth.key_rate_limits)) if auth else None
        self._routes = _ResponseRoutes(self._config.ingress.response_routes)
        context = serve.get_replica_context()
        self._app_name = context.app_name
        self._watcher = asyncio.get_running_loop().create_task(self._watch_pools())
        registry = CollectorRegistry()
        self._metrics = IngressMetrics(registry)
        for name, pool in self._config.pools.items():
            # Read at scrape time, so the gauges never lag the admission counts.
            self._metrics.in_flight.labels(name).set_function(lambda n=name: self._admission.in_flight[n])
            self._metrics.queue_depth.labels(name).set_function(lambda n=name: self._admission.queue_depth(n))
            self._metrics.running_replicas.labels(name).set_function(
                lambda n=name: self._admission.running[n]
            )
            self._metrics.queue_limit.labels(name).set(pool.max_queued_requests)
        replica = context.replica_id.unique_id
        labels = {"component": "ingress", "replica": replica, "app": self._app_name}
        self._metrics_endpoint = MetricsEndpoint(labels, registry)
        self._tracer = ingress_tracer(replica)

    # -- pool readiness --------------------------------------------------------------------------------------

    async def _watch_pools(self) -> None:
        from ray import serve

        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[self._app_name].deployments
                for name in self._config.pools:
                    states = deployments[name].replica_states if name in deployments else {}
                    self._admission.running[name] = int(states.get("RUNNING", 0))
            except Exception as exc:  # the controller restarting: keep the last known counts
                log.warning("could not read pool status from the Serve controller: %s", exc)
            await asyncio.sleep(POOL_STATUS_PERIOD_S)

    # -- routes ----------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        running = dict(self._admission.running)
        ok = all(count > 0 for count in running.values())
        return JSONResponse({"ready": ok, "pools": running}, status_code=200 if ok else 503)

    @app.get("/metrics/targets")
    async def metrics_targets(self) -> JSONResponse:
        """Every replica's metrics endpoint, in Prometheus' HTTP service discovery format."""
        return JSONResponse(await targets_actor().http_sd.remote())

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        record = self._record("models", request)
        denied = self._authorize(request, record)
        if isinstance(denied, Response):
            return self._finished(record, denied)
        record.pool = self._config.pool_for(self._config.default_effort)
        try:
            admitted = self._admission.admit(record.pool)  # no running replica: 503 at once, not a hang
        except Rejected as exc:
            record.rejected = exc.reason
            answer = error_response(
                exc.status, str(exc), code=exc.reason, headers={"Retry-After": str(exc.retry_after_s)}
            )
            return self._finished(record, answer)
        answer = await self._forward(admitted, PoolRequest("GET", "/v1/models"), {}, None, record)
        return self._finished(record, answer)

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
        return await self._stored_response(request, response_id, "GET", f"/v1/responses/{response_id}")

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(self, response_id: str, request: Request) -> Response:
        return await self._stored_response(
            request, response_id, "POST", f"/v1/responses/{response_id}/cancel"
        )

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
        (vLLM's own validation, an unknown model) counts as the ``client_error`` rejection reason."""
        status = response.status_code
        if status < 400:
            record.rejected = None
        elif record.rejected is None and status < 500:
            record.rejected = client_error
        record.finish(status)
        return response

    def _authorize(self, request: Request, record: RequestRecord) -> str | Response:
        """The caller's key name (``anonymous`` without auth), or the 401/429 answer."""
        name = "anonymous"
        if self._keys is not None:
            found = self._keys.name_of(request.headers.get("authorization"))
            if found is None:
                record.rejected = "auth"
                return error_response(
                    401,
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            name = found
        if self._limiter is not None:
            wait = self._limiter.acquire(name)
            if wait is not None:
                retry = max(1, int(wait + 0.999))
                record.rejected = "rate_limit"
                return error_response(
                    429,
                    f"Rate limit of API key '{name}' exceeded; retry in {retry} s",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)},
                )
        return name

    async def _generate(self, endpoint: Endpoint, request: Request) -> Response:
        record = self._record(endpoint, request)
        try:
            answer = await self._admit_and_forward(endpoint, request, record)
        except asyncio.CancelledError:
            record.finish(499)  # the client hung up before the pool answered: not the service's failure
            raise
        except BaseException:
            record.finish(500)
            raise
        if not isinstance(answer, StreamingResponse):
            self._finished(record, answer, "invalid")
        return answer

    async def _admit_and_forward(
        self, endpoint: Endpoint, request: Request, record: RequestRecord
    ) -> Response:
        denied = self._authorize(request, record)
        if isinstance(denied, Response):
            return denied
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error_response(413, f"Request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error_response(400, f"Request body is not valid JSON: {exc}", code="invalid_json")
        if not isinstance(body, dict):
            return error_response(400, "Request body must be a JSON object", code="invalid_json")
        model = body.setdefault("model", self._config.model_name)
        if model != self._config.model_name:
            return error_response(
                404,
                f"The model '{model}' does not exist; this server serves '{self._config.model_name}'",
                param="model",
                code="model_not_found",
            )
        try:
            effort = resolve_effort(endpoint, body, request.headers, self._config.default_effort)
            apply_effort(endpoint, body, effort.effort)
        except EffortError as exc:
            return error_response(400, str(exc), param=exc.param, code="invalid_reasoning_effort")
        pool = self._config.pool_for(effort.effort)
        record.effort, record.effort_source, record.pool = effort.effort, effort.source, pool
        try:
            budget = apply_budget(endpoint, body, effort.effort, self._config.budgets.get(effort.effort))
        except BudgetError as exc:
            record.rejected = "budget"
            return error_response(400, str(exc), param=exc.param, code=exc.code)
        if budget.clamped_from is not None:
            self._metrics.budget_clamps.labels(effort.effort).inc()
        record.strip_usage = request_usage(endpoint, body)
        replica_id = None
        previous = body.get("previous_response_id") if endpoint == "responses" else None
        if isinstance(previous, str) and (where := self._routes.find(previous)) is not None:
            pool, replica_id = where
        headers = _effort_headers(effort)
        if budget.clamped_from is not None:
            headers["x-gptoss-budget-clamped-from"] = str(budget.clamped_from)
        try:
            admitted = self._admission.admit(pool, pinned=replica_id is not None)
        except Rejected as exc:
            log.info(
                "rejected %s request (effort %s, pool %s): %s", endpoint, effort.effort, pool, exc.reason
            )
            record.rejected = exc.reason
            headers |= {"x-gptoss-pool": pool, "Retry-After": str(exc.retry_after_s)}
            return error_response(exc.status, str(exc), code=exc.reason, headers=headers)
        forwarded = [(k, v) for k, v in request.headers.items() if k in _FORWARDED_HEADERS]
        forwarded.append(
            ("content-type", "application/json")
        )  # the body is re-encoded JSON whatever was sent
        pool_request = PoolRequest(
            "POST",
            request.url.path,
            json.dumps(body).encode(),
            headers=forwarded,
            payload=body,
            replica_id=replica_id,
        )
        remember = endpoint == "responses" and body.get("store", True) is not False
        return await self._forward(admitted, pool_request, headers, remember, record)

    async def _stored_response(self, request: Request, response_id: str, method: str, path: str) -> Response:
        record = self._record("responses_get" if method == "GET" else "responses_cancel", request)
        denied = self._authorize(request, record)
        if isinstance(denied, Response):
            return self._finished(record, denied)
        where = self._routes.find(response_id)
        if where is None:
            answer = error_response(404, f"Response '{response_id}' not found", code="response_not_found")
            return self._finished(record, answer)
        record.pool, replica_id = where
        pool_request = PoolRequest(method, path, query=request.url.query, replica_id=replica_id)
        answer = await self._forward(Admitted(record.pool), pool_request, {}, False, record)
        return answer if isinstance(answer, StreamingResponse) else self._finished(record, answer)

    async def __del__(self) -> None:
        self._watcher.cancel()
        self._metrics_endpoint.close()

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
        self,
        admitted: Admitted,
        pool_request: PoolRequest,
        headers: dict[str, str],
        remember: bool | None,
        record: RequestRecord,
    ) -> Response:
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError

        pool = admitted.pool
        record.pool = pool
        headers = {**headers, "x-gptoss-pool": pool}
        if admitted.spilled_from:
            headers["x-gptoss-spilled-from"] = admitted.spilled_from
            record.spilled_from = admitted.spilled_from
            self._metrics.spillovers.labels(admitted.spilled_from, pool).inc()
        self._start_engine_span(record, pool_request)
        self._admission.started(pool)
        started = time.monotonic()
        answer = self._handles[pool].handle_request.remote(pool_request)
        try:
            start = await answer.__anext__()
            assert isinstance(start, PoolAnswerStart)
        except BaseException as exc:
            self._admission.finished(pool)
            answer.cancel()
            retry = str(self._config.ingress.retry_after_s)
            if isinstance(exc, BackPressureError):
                record.rejected = "queue_full"
                return error_response(
                    429,
                    f"Pool '{pool}' is at its queue bound",
                    code="queue_full",
                    headers=headers | {"Retry-After": retry},
                )
            if isinstance(exc, (RayError, StopAsyncIteration)):
                log.warning("pool %s failed before answering: %s", pool, exc)
                record.rejected = "replica_failed"
                return error_response(
                    503,
                    f"Pool '{pool}' failed to answer (replica lost); retry in {retry} s",
                    code="replica_failed",
                    headers=headers | {"Retry-After": retry},
                )
            raise
        headers["x-gptoss-replica"] = record.replica = start.replica_id
        headers |= {k: v for k, v in start.headers if k.lower() in _PASSED_BACK_HEADERS}
        streaming = (
            dict((k.lower(), v) for k, v in start.headers)
            .get("content-type", "")
            .startswith("text/event-stream")
        )
        if not streaming:
            try:
                content = b"".join([chunk async for chunk in answer])
            except RayError as exc:
                log.warning("pool %s failed while answering: %s", pool, exc)
                record.rejected = "replica_failed"
                return error_response(
                    503, f"Pool '{pool}' failed while answering", code="replica_failed", headers=headers
                )
            finally:
                self._admission.finished(pool)
            record.observe_body(content)
            if remember and start.status == 200:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    self._routes.remember(json.loads(content)["id"], pool, start.replica_id)
            log.debug(
                "%s %s -> %s in %.3f s", pool, pool_request.path, start.status, time.monotonic() - started
            )
            return Response(content, status_code=start.status, headers=headers)
        return StreamingResponse(
            self._relay(answer, pool, start.replica_id, bool(remember), record, start.status),
            status_code=start.status,
            headers=headers,
        )

    async def _relay(
        self, answer: Any, pool: str, replica_id: str, remember: bool, record: RequestRecord, status: int
    ) -> AsyncIterator[bytes]:
        from ray.exceptions import RayError

        seen = b""
        finished = False
        record.status = status
        try:
            async for chunk in answer:
                if remember:
                    seen += chunk
                    response_id = _response_id_in_sse(seen)
                    if response_id is not None or len(seen) > 1 << 16:
                        if response_id is not None:
                            self._routes.remember(response_id, pool, replica_id)
                        remember, seen = False, b""
                if relayed := record.relay(chunk):
                    yield relayed
            if rest := record.flush():
                yield rest
            finished = True
        except RayError as exc:
            log.warning("pool %s replica %s failed mid-stream: %s", pool, replica_id, exc)
            record.status, record.rejected = 503, "replica_failed"
            yield sse_error_event(
                503, f"Pool '{pool}' lost the replica serving this stream; retry", "replica_failed"
            )
            finished = True
        finally:
            self._admission.finished(pool)
            if not finished:
                answer.cancel()  # the client went away: free the engine
                record.status = 499  # nginx's "client closed request": not the server's failure
            record.finish()


def _effort_headers(effort: ResolvedEffort) -> dict[str, str]:
    return {"x-gptoss-effort": effort.effort, "x-gptoss-effort-source": effort.source}
