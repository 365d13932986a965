"""Call an ASGI app in-process and stream its answer as it is produced.

The pool replica runs vLLM's own OpenAI FastAPI app without a socket: the ingress hands it the HTTP request
and relays the ``http.response.start`` message and each body chunk as they come. (httpx's ASGITransport would
buffer the whole body, which breaks SSE.) When the caller stops reading (client gone, replica shutting down),
the app sees ``http.disconnect`` and vLLM aborts the request in the engine. Chunks the app has already sent
when the caller asks for the next are joined into one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from gptoss_vllm.serve.asgi import ASGIApp, whole_body


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: list[tuple[str, str]]


async def stream_asgi(
    app: ASGIApp,
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
) -> AsyncIterator[ResponseStart | bytes]:
    """Yield one :class:`ResponseStart`, then the body chunks, as the app sends them."""
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()

    async def gone() -> dict:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    receive = whole_body(body, gone)

    async def send(message: dict) -> None:
        await messages.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while True:
            # Whatever the app has sent by now goes out as one item: under load, fewer and larger stream items.
            batch = [await messages.get()]
            while not messages.empty():
                batch.append(messages.get_nowait())
            body = b""
            for message in batch:
                if message is None:
                    if body:
                        yield body
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    return
                if message["type"] == "http.response.start":
                    yield ResponseStart(
                        status=message["status"],
                        headers=[
                            (k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
                        ],
                    )
                elif message["type"] == "http.response.body":
                    body += message.get("body", b"")
                    if not message.get("more_body", False):
                        if body:
                            yield body
                        return
            if body:
                yield body
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
