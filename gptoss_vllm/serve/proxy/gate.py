"""The gate in Ray Serve's HTTP proxy: what must be decided before a request costs the ingress anything.

Ray Serve's proxy loads ASGI middlewares from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (set to
:data:`~.settings.CALLBACK` on every Ray node; ``serve`` does it for its own Ray, the chart for its pods). This one:

- drops Ray Serve's per-request control headers (``x-request-timeout-seconds``, ``x-request-disconnect-disabled``,
  the session-affinity header): a client must not lift its own timeout or disconnect handling;
- answers 431 to headers over ``GPTOSS_VLLM_MAX_HEADER_BYTES``, 413 to a body over ``GPTOSS_VLLM_MAX_BODY_BYTES`` (at once
  when ``Content-Length`` says so, when the limit is passed otherwise), 408 to a body that is not whole within
  ``GPTOSS_VLLM_BODY_TIMEOUT_S``; the body is read here, asynchronously, and handed on whole, so a stalled or trickling
  upload never holds an ingress slot;
- answers 400 to a body over its shape bounds (nesting depth, members per object, items per array, string
  length: :mod:`gptoss_vllm.serve.body_shape`, ``GPTOSS_VLLM_MAX_JSON_*``), naming the bound and the JSON path, before
  anything parses it;
- has the answers Ray's proxy makes itself (:mod:`.ray_errors`) (its ``text/plain`` 503 at the ingress's queue bound, 408, 500)
  rewritten into OpenAI's error shape.

Requests it refuses and uploads a client abandons (499) are counted in ``gptoss_requests_total`` with the
endpoint ``upload`` (:mod:`.metrics`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from gptoss_vllm.serve.asgi import ASGIApp, Receive, Scope, Send, whole_body
from gptoss_vllm.serve.body_bounds import too_large, too_slow
from gptoss_vllm.serve.body_shape import ShapeLimits, shape_error
from gptoss_vllm.serve.openai_errors import error_body
from gptoss_vllm.serve.proxy.ray_errors import OpenAIErrors
from gptoss_vllm.serve.proxy.settings import (
    BODY_TIMEOUT_ENV,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    MAX_BODY_ENV,
    MAX_HEADER_ENV,
    control_headers,
    env_number,
    shape_limits,
)

log = logging.getLogger("ray.serve")


class ProxyGate:
    """The ASGI middleware (one per proxy process)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int | None = None,
        max_header_bytes: int | None = None,
        body_timeout_s: float | None = None,
        count: Callable[[int], None] | None = None,
        shape: ShapeLimits | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes or env_number(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES, int)
        self.max_header_bytes = max_header_bytes or env_number(MAX_HEADER_ENV, DEFAULT_MAX_HEADER_BYTES, int)
        self.body_timeout_s = body_timeout_s or env_number(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT_S, float)
        self.shape = shape or shape_limits()
        self._control = control_headers()
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
        if (error := shape_error(body, self.shape)) is not None:
            await self._refuse(send, 400, str(error), code="body_shape", param=error.path)
            return
        # After the body, the client's own receive: its disconnect is what Ray's proxy watches for.
        await self.app(scope, whole_body(body, receive), OpenAIErrors(send))

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

    async def _refuse(
        self, send: Send, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        codes = {
            400: "invalid_request",
            408: "request_timeout",
            413: "body_too_large",
            431: "headers_too_large",
        }
        payload = json.dumps(
            error_body(status, message, param=param, code=code or codes.get(status))
        ).encode()
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
