"""The gate in Ray Serve's HTTP proxy: what must be decided before a request costs the ingress anything.

Ray Serve's proxy loads ASGI middlewares from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (set to
:data:`CALLBACK` on every Ray node; ``serve`` does it for its own Ray, the chart for its pods). This one:

- drops Ray Serve's per-request control headers (``x-request-timeout-seconds``, ``x-request-disconnect-disabled``,
  the session-affinity header): a client must not lift its own timeout or disconnect handling;
- answers 431 to headers over ``GPTOSS_MAX_HEADER_BYTES``, 413 to a body over ``GPTOSS_MAX_BODY_BYTES`` (at once
  when ``Content-Length`` says so, when the limit is passed otherwise), 408 to a body that is not whole within
  ``GPTOSS_BODY_TIMEOUT_S``; the body is read here, asynchronously, and handed on whole, so a stalled or trickling
  upload never holds an ingress slot;
- rewrites the answers Ray's proxy makes itself (its ``text/plain`` 503 at the ingress's queue bound, 408, 500)
  into OpenAI's error shape, keeping ``Retry-After`` and never Ray's exception text.

Requests it refuses and uploads a client abandons (499) are counted in ``gptoss_requests_total`` with the
endpoint ``upload``, from a metrics endpoint of the proxy process (``component=proxy``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gptoss_vllm.serve.asgi_stream import whole_body
from gptoss_vllm.serve.openai_errors import error_body

log = logging.getLogger("ray.serve")

CALLBACK = "gptoss_vllm.serve.proxy_gate:middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
MAX_BODY_ENV = "GPTOSS_MAX_BODY_BYTES"
MAX_HEADER_ENV = "GPTOSS_MAX_HEADER_BYTES"
BODY_TIMEOUT_ENV = "GPTOSS_BODY_TIMEOUT_S"
DEFAULT_MAX_BODY_BYTES = (1 << 20) + 32 * 131072  # the serving config's default for a 128k-token context
DEFAULT_MAX_HEADER_BYTES = 32768
DEFAULT_BODY_TIMEOUT_S = 30.0
# Ray Serve's per-request controls (ray.serve._private.constants), and its session-affinity header.
CONTROL_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_MESSAGES = {
    408: "The request timed out before the server could answer it; retry",
    500: "The server failed to handle the request; retry, and report it if it persists",
    503: "The service is at capacity; retry after the time in Retry-After",
}


def too_large(limit: int) -> str:
    return f"Request body is over the limit of {limit} bytes"


def too_slow(timeout_s: float) -> str:
    return f"The request body did not arrive within {timeout_s:g} s; send it whole"


class GateError(ValueError):
    """A proxy gate setting that cannot be used; the message names the environment variable."""


def _env_number(name: str, default: float, kind: type) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise GateError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value <= 0:
        raise GateError(f"{name}={raw!r} must be positive")
    return value


def _control_headers() -> frozenset[bytes]:
    session = os.environ.get(SESSION_HEADER_ENV, "x-session-id").lower()
    return CONTROL_HEADERS | {session.encode(), session.replace("-", "_").encode()}


class ProxyGate:
    """The ASGI middleware (one per proxy process)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int | None = None,
        max_header_bytes: int | None = None,
        body_timeout_s: float | None = None,
        count: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes or _env_number(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES, int)
        self.max_header_bytes = max_header_bytes or _env_number(MAX_HEADER_ENV, DEFAULT_MAX_HEADER_BYTES, int)
        self.body_timeout_s = body_timeout_s or _env_number(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_S, float)
        self._control = _control_headers()
        self._count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in self._control]
        scope["headers"] = headers
        size = sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self.max_header_bytes:
            await self._refuse(
                send, 431, f"Request headers are {size} bytes; the limit is {self.max_header_bytes}"
            )
            return
        declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await self._refuse(send, 400, f"Content-Length {declared[:40]!r} is not a number")
                return
            if length > self.max_body_bytes:
                await self._refuse(
                    send, 413, f"Request body is {length} bytes; the limit is {self.max_body_bytes}"
                )
                return
        body = await self._read_body(receive, send)
        if body is None:
            return
        # After the body, the client's own receive: its disconnect is what Ray's proxy watches for.
        await self.app(scope, whole_body(body, receive), _OpenAIErrors(send))

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once the request has been answered (or the client left)."""
        chunks: list[bytes] = []
        total = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await self._refuse(
                    send,
                    408,
                    too_slow(self.body_timeout_s),
                )
                return None
            if message["type"] == "http.disconnect":
                self._counted(499)  # the client left mid-upload: not the service's failure
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                await self._refuse(send, 413, too_large(self.max_body_bytes))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        code = {
            400: "invalid_request",
            408: "request_timeout",
            413: "body_too_large",
            431: "headers_too_large",
        }
        payload = json.dumps(error_body(status, message, code=code.get(status))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        self._counted(status)

    def _counted(self, status: int) -> None:
        if self._count is not None:
            try:
                self._count(status)
            except Exception as exc:  # metrics must never fail a request
                log.warning("proxy gate: could not count a %d: %s", status, exc)


class _OpenAIErrors:
    """``send`` that turns Ray's own plain-text error answers into OpenAI's error shape."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: Message | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message.get("status", 200) >= 400:
            content_type = next(
                (v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b""
            )
            if not content_type.startswith(b"application/json"):
                self._held = message
                return
        if self._held is not None and message["type"] == "http.response.body":
            if message.get("more_body", False):
                return  # Ray's text, dropped: it may carry an exception's internals
            status = self._held["status"]
            kept = [(k, v) for k, v in self._held.get("headers", []) if k.lower() == b"retry-after"]
            payload = json.dumps(error_body(status, _MESSAGES.get(status, f"HTTP {status}"))).encode()
            self._held = None
            await self._send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                        *kept,
                    ],
                }
            )
            await self._send({"type": "http.response.body", "body": payload})
            return
        await self._send(message)


def _proxy_counter() -> Callable[[int], None] | None:
    """``gptoss_requests_total`` of this proxy process, on its own announced metrics endpoint (lazily: the
    endpoint needs the proxy's running event loop)."""
    from prometheus_client import CollectorRegistry

    from gptoss_vllm.observability.metrics import NONE, IngressMetrics

    registry = CollectorRegistry()
    metrics = IngressMetrics(registry)
    started: list[Any] = []

    def count(status: int) -> None:
        if not started:
            import ray

            from gptoss_vllm.observability.targets import MetricsEndpoint

            node = ray.get_runtime_context().get_node_id()[:12]
            started.append(MetricsEndpoint({"component": "proxy", "replica": f"proxy-{node}"}, registry))
        metrics.requests.labels("upload", NONE, NONE, NONE, str(status)).inc()

    return count


def middlewares() -> list[Any]:
    """Ray Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    gate = Middleware(ProxyGate, count=_proxy_counter())
    probe = ProxyGate(lambda *_: None)  # settings errors surface in the proxy's log at start, by name
    log.info(
        "gptoss proxy gate: bodies up to %d bytes within %g s, headers up to %d bytes",
        probe.max_body_bytes,
        probe.body_timeout_s,
        probe.max_header_bytes,
    )
    return [gate]


def gate_env(max_body_bytes: int, max_header_bytes: int, body_timeout_s: float) -> dict[str, str]:
    """The environment every Ray node's proxy needs for the gate with these bounds."""
    return {
        CALLBACK_ENV: CALLBACK,
        MAX_BODY_ENV: str(max_body_bytes),
        MAX_HEADER_ENV: str(max_header_bytes),
        BODY_TIMEOUT_ENV: f"{body_timeout_s:g}",
    }
