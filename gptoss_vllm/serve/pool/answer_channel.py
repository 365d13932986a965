"""The byte channel a pool replica answers through: a TCP connection from the ingress, outside Ray's streaming.

Ray Serve still routes every request (the pool's request router picks the replica, ``max_ongoing_requests``
and the queue bound hold, the autoscaler counts it, a drain waits for it): the ingress calls the pool's
handle, and the call stays open until the answer is done. But the call's stream carries one item, an
:class:`AnswerTicket`; the answer itself (:class:`PoolAnswerStart`, body bytes, :class:`FinishedResponse`,
:class:`PoolAnswerEnd`) goes over a plain socket to the replica's :class:`AnswerChannel`, framed as
``kind (1 byte) + length (4 bytes) + payload``. Ray Serve's streaming costs a few hundred microseconds of CPU
per item on both ends; a framed write and read cost a few. The ticket is a random one-time token that only
the routed ingress learns (through Ray), so nothing else can read an answer.

The ingress side, :class:`AnswerReader`, joins the body frames that have arrived by the time it is read, and
raises :class:`AnswerLost` when the connection ends before :class:`PoolAnswerEnd` (the replica died, or the
ingress closed it because the Ray call failed). Closing the connection from the ingress (client gone) cancels
the answer in the replica, which aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import struct
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gptoss_vllm.observability.request_record import Observation
from gptoss_vllm.serve import ServeError

log = logging.getLogger("ray.serve")

# How long a replica keeps an answer's ticket waiting for the ingress to connect.
CONNECT_TIMEOUT_S = 30.0
_HEADER = struct.Struct("!BI")
_START, _BODY, _FINISHED, _END = 1, 2, 3, 4
_TOKEN_BYTES = 16


@dataclass(frozen=True)
class PoolAnswerStart:
    """First item of every pool answer: the HTTP status and headers, and who served it."""

    status: int
    headers: list[tuple[str, str]]
    replica_id: str


@dataclass(frozen=True)
class FinishedResponse:
    """A Responses answer's final response object (JSON), sent before the bytes that carry it to the client,
    so that the ingress stores the conversation before the client can ask for a follow-up."""

    document: bytes


@dataclass(frozen=True)
class PoolAnswerEnd:
    """Last item of every answer: what the replica observed of it (``None`` unless it was a generation)."""

    seen: Observation | None = None


AnswerItem = PoolAnswerStart | bytes | FinishedResponse | PoolAnswerEnd


@dataclass(frozen=True)
class AnswerTicket:
    """The only item of a pool call's Ray stream: where to read the answer, and the token that claims it."""

    host: str
    port: int
    token: str


class AnswerLost(ServeError, ConnectionError):
    """The answer's connection ended before its :class:`PoolAnswerEnd`."""


def _frame(item: AnswerItem) -> bytes:
    if isinstance(item, bytes):
        return _HEADER.pack(_BODY, len(item)) + item
    if isinstance(item, PoolAnswerStart):
        kind, payload = _START, json.dumps([item.status, item.headers, item.replica_id]).encode()
    elif isinstance(item, FinishedResponse):
        kind, payload = _FINISHED, item.document
    elif isinstance(item, PoolAnswerEnd):
        seen = None if item.seen is None else dataclasses.asdict(item.seen)
        kind, payload = _END, json.dumps(seen).encode()
    else:
        raise TypeError(f"not an answer item: {type(item).__name__}")
    return _HEADER.pack(kind, len(payload)) + payload


def _item(kind: int, payload: bytes) -> AnswerItem:
    if kind == _BODY:
        return payload
    if kind == _START:
        status, headers, replica_id = json.loads(payload)
        return PoolAnswerStart(status, [(k, v) for k, v in headers], replica_id)
    if kind == _FINISHED:
        return FinishedResponse(payload)
    if kind == _END:
        seen = json.loads(payload)
        return PoolAnswerEnd(None if seen is None else Observation(**seen))
    raise AnswerLost(f"unknown frame kind {kind} on an answer channel")


class AnswerChannel:
    """The replica's side: a TCP server on the node's address; each answer waits there for its ticket."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._waiting: dict[str, asyncio.Future] = {}

    @classmethod
    async def open(cls, host: str) -> AnswerChannel:
        """Listen on ``host`` (the node's address, so that an ingress on another node reaches it)."""
        channel = cls(host)
        channel._server = await asyncio.start_server(channel._claimed, host, 0)
        channel.port = channel._server.sockets[0].getsockname()[1]
        return channel

    async def _claimed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = (await asyncio.wait_for(reader.readexactly(2 * _TOKEN_BYTES), 10)).decode("ascii")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, UnicodeDecodeError, OSError):
            writer.close()
            return
        future = self._waiting.pop(token, None)
        if future is None or future.done():
            writer.close()  # not a ticket this replica handed out, or one already claimed
            return
        future.set_result((reader, writer))

    async def answer(self, items: AsyncIterator[AnswerItem]) -> AsyncIterator[AnswerTicket]:
        """A pool call's Ray stream: the ticket, then (no more items) the answer sent over the connection that
        claims it. Returns when the answer is done, so that Ray Serve counts the request until then."""
        token = secrets.token_hex(_TOKEN_BYTES)
        claimed = asyncio.get_running_loop().create_future()
        self._waiting[token] = claimed
        try:
            yield AnswerTicket(self.host, self.port, token)
            reader, writer = await asyncio.wait_for(claimed, CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("no ingress claimed an answer within %.0f s; dropping it", CONNECT_TIMEOUT_S)
            return
        finally:
            self._waiting.pop(token, None)
        with contextlib.closing(writer):
            sending = asyncio.ensure_future(self._send(items, writer))
            hung_up = asyncio.ensure_future(reader.read(1))  # the ingress closes the connection to cancel
            try:
                await asyncio.wait((sending, hung_up), return_when=asyncio.FIRST_COMPLETED)
            finally:
                hung_up.cancel()
                if not sending.done():
                    sending.cancel()  # cancels the answer: vLLM's app sees the disconnect and aborts
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await sending

    @staticmethod
    async def _send(items: AsyncIterator[AnswerItem], writer: asyncio.StreamWriter) -> None:
        async for item in items:
            writer.write(_frame(item))
            await writer.drain()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class _Frames(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.items: deque[AnswerItem] = deque()
        self.closed: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            kind, length = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[start + _HEADER.size : end])
            items = self.items
            if kind == _BODY and items and isinstance(items[-1], bytes):
                items[-1] += payload  # what has arrived goes out as one chunk
            else:
                items.append(_item(kind, payload))
            start = end
        del buffer[:start]
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            self.closed = exc or AnswerLost("the replica's answer ended before it was complete")
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class AnswerReader:
    """The ingress's side of one answer: the items, in order, body frames that arrived together joined."""

    def __init__(self, frames: _Frames) -> None:
        self._frames = frames
        self._ended = False

    @classmethod
    async def claim(cls, ticket: AnswerTicket) -> AnswerReader:
        """Connect to the replica and present the ticket; :class:`AnswerLost` if the replica is gone."""
        loop = asyncio.get_running_loop()
        try:
            transport, frames = await loop.create_connection(_Frames, ticket.host, ticket.port)
        except OSError as exc:
            where = f"{ticket.host}:{ticket.port}"
            raise AnswerLost(f"could not reach the replica's answer channel at {where}: {exc}") from exc
        transport.write(ticket.token.encode("ascii"))
        return cls(frames)

    def __aiter__(self) -> AnswerReader:
        return self

    async def __anext__(self) -> AnswerItem:
        frames = self._frames
        while not frames.items:
            if self._ended:
                raise StopAsyncIteration
            if isinstance(frames.closed, AnswerLost):
                raise frames.closed
            if frames.closed is not None:
                raise AnswerLost("the replica's answer ended before it was complete") from frames.closed
            frames.waiter = asyncio.get_running_loop().create_future()
            await frames.waiter
        item = frames.items.popleft()
        if isinstance(item, PoolAnswerEnd):
            self._ended = True
            self.close()
        return item

    def close(self) -> None:
        """Hang up (when the client went away, the replica cancels the answer)."""
        if self._frames.transport is not None:
            self._frames.transport.close()

    def lose(self, reason: BaseException) -> None:
        """End the answer with :class:`AnswerLost` (the Ray call that routed it failed)."""
        if self._frames.closed is None:
            self._frames.closed = reason
        self.close()
        self._frames._wake()
