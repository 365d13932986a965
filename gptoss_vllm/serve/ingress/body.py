"""The request body as the ingress reads it: whole, within its size bound and its deadline.

Bodies normally arrive whole from the proxy gate (:mod:`gptoss_vllm.serve.proxy.gate`); the ingress still holds
them to the same bounds, for paths that bypass the gate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.requests import Request

from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.body_bounds import too_large, too_slow
from gptoss_vllm.serve.ingress.refusal import Refusal


def body_reader(request: Request, timeout_s: float) -> Callable[[int], Awaitable[bytes]]:
    """What the pipeline calls, once the request passed the checks before its body, with the body's limit."""

    async def read(limit: int) -> bytes:
        return await read_body(request, limit, timeout_s)

    return read


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
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
