"""The ingress deployment: OpenAI's routes wired to the services it is given; it owns no policy.

The request pipeline (:mod:`.pipeline`) decides each request from its bytes; the pool forwarder
(:mod:`.forwarding`) sends it to its pool and relays the answer as it is produced, with ``x-gptoss-effort``,
``x-gptoss-effort-source`` and ``x-gptoss-pool`` (``x-gptoss-replica`` only where the operator turns it on); the
Responses service (:mod:`.responses.service`) keeps conversations and runs background responses; the pool
watcher, the peer exchanger and the telemetry run beside them. Rendering, parsing and generation are the pool's
(vLLM's). Every error is OpenAI's shape, internals never.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from gptoss_vllm.observability.request_record import RequestRecord
from gptoss_vllm.observability.targets import targets_actor
from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.app_names import pool_app_name
from gptoss_vllm.serve.config import IngressView
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.ingress.body import body_reader
from gptoss_vllm.serve.ingress.effort import Endpoint
from gptoss_vllm.serve.ingress.forwarding import PoolForwarder, pool_request, without_paths
from gptoss_vllm.serve.ingress.keys import KeyRing
from gptoss_vllm.serve.ingress.monitoring import MonitoringToken
from gptoss_vllm.serve.ingress.openapi import openapi_document
from gptoss_vllm.serve.ingress.peer_exchange import PeerExchanger
from gptoss_vllm.serve.ingress.pipeline import Decision, RequestPipeline, client_address
from gptoss_vllm.serve.ingress.pool_watch import PoolWatcher
from gptoss_vllm.serve.ingress.rate_limits import RateLimiter
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.responses.service import ResponsesService
from gptoss_vllm.serve.ingress.telemetry import IngressTelemetry
from gptoss_vllm.serve.openai_errors import error_response
from gptoss_vllm.serve.pool.deployment import PoolRequest

log = logging.getLogger("ray.serve")

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


class Ingress:
    """The Ray Serve ingress replica, deployed with the config's view (:meth:`ServeConfig.view`); it reaches
    each pool in the pool's own application."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from ray import serve

        self._config = config_ = IngressView.model_validate(config)
        context = serve.get_replica_context()
        replica, app_name = context.replica_id.unique_id, context.app_name
        # Not checked against the controller: a declarative deploy starts the pools' applications beside this
        # one, and a pool not there yet is held as a cold start is.
        pools = {
            name: serve.get_deployment_handle(name, pool_app_name(name, app_name), _check_exists=False)
            for name in config_.pools
        }
        admission = Admission(config_)
        self._telemetry = telemetry = IngressTelemetry(config_, admission, replica, app_name)
        auth = config_.auth
        keys = KeyRing(auth, auth.api_keys_recheck_s, telemetry.keys_reloaded) if auth else None
        if keys is not None:
            telemetry.metrics.api_keys.set(len(keys))
        limiter = RateLimiter(auth.rate_limit, dict(auth.key_rate_limits)) if auth else None
        self._pipeline = RequestPipeline(config_, admission, keys=keys, limiter=limiter)
        # The two are handed each other's calls: background responses are forwarded, forwarded answers kept.
        self._responses = ResponsesService(
            config_, telemetry.metrics, lambda *call: self._forwarder.forward(*call)
        )
        self._forwarder = PoolForwarder(config_, pools, self._pipeline, telemetry, self._responses.keep)
        self._monitoring = MonitoringToken(config_.ingress.monitoring_token_env)
        self._pools = PoolWatcher(config_, admission, telemetry.metrics, app_name)
        self._peers = (
            PeerExchanger(self._pipeline, telemetry.metrics, app_name, replica)
            if config_.ingress.replicas > 1
            else None
        )

    async def __del__(self) -> None:
        self._pools.stop()
        if self._peers is not None:
            self._peers.stop()
        self._telemetry.close()
        await self._responses.close()

    def _client(self, request: Request) -> str | None:
        peer = request.client.host if request.client else None
        return client_address(request.headers, peer, self._config.ingress.client_address_header)

    # -- routes ----------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """200 while every pool can serve: it has a running replica, or it scales from zero and can start one."""
        ok, pools = self._pools.readiness()
        return JSONResponse({"ready": ok, "pools": pools}, status_code=200 if ok else 503)

    @app.get("/openapi.json")
    async def openapi(self) -> JSONResponse:
        return JSONResponse(openapi_document(app.title, self._config.model_name))

    @app.get("/metrics/targets")
    async def metrics_targets(self, request: Request) -> JSONResponse:
        """Every replica's metrics endpoint in Prometheus' HTTP service discovery format, for the bearer of the
        monitoring token only; to anyone else the route does not exist."""
        if not self._monitoring.presented_in(request.headers.get("authorization")):
            return error_response(404, "GET /metrics/targets: Not Found", code="not_found")
        return JSONResponse(await targets_actor().http_sd.remote())

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        record = self._telemetry.record("models", request)
        decision = Decision()
        try:
            self._pipeline.models(request.headers, decision, self._client(request))
        except Refusal as refusal:
            return self._telemetry.refused(record, decision, refusal)
        answer = await self._forwarder.forward(decision, PoolRequest("GET", "/v1/models"), record)
        return self._telemetry.finished(record, without_paths(answer))

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

    # -- wiring ----------------------------------------------------------------------------------------------

    async def _generate(self, endpoint: Endpoint, request: Request) -> Response:
        record = self._telemetry.record(endpoint, request)
        try:
            answer = await self._decide_and_forward(endpoint, request, record)
        except (asyncio.CancelledError, ClientDisconnect):
            record.finish(499)  # the client hung up before the pool answered: not the service's failure
            raise
        except BaseException:
            record.finish(500)
            raise
        if not isinstance(answer, StreamingResponse):
            self._telemetry.finished(record, answer, Reason.INVALID.value)
        return answer

    async def _decide_and_forward(
        self, endpoint: Endpoint, request: Request, record: RequestRecord
    ) -> Response:
        decision = Decision()
        body = body_reader(request, self._config.ingress.body_timeout_s)
        try:
            await self._pipeline.generation(
                endpoint, request.headers, body, decision, self._client(request), self._responses.owned
            )
            self._telemetry.decided(record, decision)
            call = pool_request(endpoint, request, decision)
            if decision.background:
                return await self._responses.start_background(decision, call)
        except Refusal as refusal:
            return self._telemetry.refused(record, decision, refusal)
        return await self._forwarder.forward(decision, call, record)

    async def _stored_response(self, request: Request, response_id: str, action: str) -> Response:
        """Read, list the input of, delete or cancel a stored response: its owner's key only."""
        record = self._telemetry.record(f"responses_{action}", request)
        decision = Decision()
        try:
            self._pipeline.stored_response(request.headers, decision, self._client(request))
            answer = await self._responses.act(action, response_id, decision, dict(request.query_params))
        except Refusal as refusal:
            return self._telemetry.refused(record, decision, refusal)
        return self._telemetry.finished(record, answer)
