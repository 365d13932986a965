"""The answers Ray Serve's proxy makes itself (its ``text/plain`` 503 at the ingress's queue bound, 408, 500),
rewritten into OpenAI's error shape: ``Retry-After`` is kept, Ray's exception text never reaches the client."""

from __future__ import annotations

import json

from gptoss_vllm.serve.asgi import Message, Send
from gptoss_vllm.serve.openai_errors import error_body

_MESSAGES = {
    408: "The request timed out before the server could answer it; retry",
    500: "The server failed to handle the request; retry, and report it if it persists",
    503: "The service is at capacity; retry after the time in Retry-After",
}


class OpenAIErrors:
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
