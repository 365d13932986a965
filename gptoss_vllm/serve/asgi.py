"""ASGI's types as the proxy gate and the pool replica use them, and the ``receive`` that hands an app a body
read whole beforehand."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def whole_body(body: bytes, then: Receive) -> Receive:
    """An ASGI ``receive`` that hands over ``body`` in one message, then answers with ``then`` (what says the
    client left)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive
