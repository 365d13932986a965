"""The answer channel between a pool replica and the ingress, over real sockets and without Ray: the items
arrive in order and intact, body frames that arrived together are joined, a hang-up cancels the answer in the
replica, a replica that dies mid-answer is an :class:`AnswerLost`, and a ticket works once, for its holder."""

from __future__ import annotations

import asyncio

import pytest

from gptoss_vllm.observability.request_record import Observation
from gptoss_vllm.serve.pool.answer_channel import (
    AnswerChannel,
    AnswerLost,
    AnswerReader,
    AnswerTicket,
    FinishedResponse,
    PoolAnswerEnd,
    PoolAnswerStart,
)

START = PoolAnswerStart(200, [("content-type", "text/event-stream"), ("x-request-id", "r-1")], "replica-a")


async def _collect(reader: AnswerReader) -> list:
    return [item async for item in reader]


async def _call(channel: AnswerChannel, items) -> tuple[AnswerTicket, asyncio.Future]:
    """What Ray does with a pool call's stream: take the ticket, then keep driving the generator (which sends
    the answer) until it ends; the future holds that end."""
    answer = channel.answer(items)
    ticket = await answer.__anext__()
    assert isinstance(ticket, AnswerTicket)
    return ticket, asyncio.ensure_future(answer.__anext__())


async def _started(channel: AnswerChannel, items) -> tuple[AnswerReader, asyncio.Future]:
    """The ingress's side: claim the ticket and read the answer's start."""
    ticket, rest_of_call = await _call(channel, items)
    reader = await AnswerReader.claim(ticket)
    assert await reader.__anext__() == START
    return reader, rest_of_call


async def _ended(rest: asyncio.Future) -> None:
    """The call's stream ends with no second item once the answer is sent."""
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(rest, 5)


def test_items_arrive_in_order_with_body_frames_joined() -> None:
    seen = Observation(first_token_s=0.01, gaps_s=[0.002, 0.003], prompt_tokens=7, output_tokens=3)
    release = asyncio.Event()

    async def items():
        yield START
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"  # sent together with the first: read as one chunk
        await release.wait()
        yield FinishedResponse(b'{"id": "resp_1"}')
        yield b"data: 3\n\n"
        yield PoolAnswerEnd(seen)

    async def scenario():
        channel = await AnswerChannel.open("127.0.0.1")
        try:
            ticket, rest_of_call = await _call(channel, items())
            reader = await AnswerReader.claim(ticket)
            first = await reader.__anext__()
            for _ in range(50):  # let both body frames land before reading them
                await asyncio.sleep(0.01)
            body = await reader.__anext__()
            release.set()
            rest = await _collect(reader)
            await _ended(rest_of_call)
            return first, body, rest
        finally:
            channel.close()

    first, body, rest = asyncio.run(scenario())
    assert first == START
    assert body == b"data: 1\n\ndata: 2\n\n"
    assert rest == [FinishedResponse(b'{"id": "resp_1"}'), b"data: 3\n\n", PoolAnswerEnd(seen)]


def test_an_answer_without_an_observation_ends_with_an_empty_end() -> None:
    async def items():
        yield PoolAnswerStart(404, [("content-type", "application/json")], "replica-a")
        yield b'{"error": {}}'
        yield PoolAnswerEnd()

    async def scenario():
        channel = await AnswerChannel.open("127.0.0.1")
        try:
            ticket, rest_of_call = await _call(channel, items())
            got = await _collect(await AnswerReader.claim(ticket))
            await _ended(rest_of_call)
            return got
        finally:
            channel.close()

    start, body, end = asyncio.run(scenario())
    assert start.status == 404 and body == b'{"error": {}}' and end == PoolAnswerEnd(None)


def test_hanging_up_cancels_the_answer_in_the_replica() -> None:
    state = {"sent": 0, "cancelled": False}

    async def items():
        yield START
        try:
            while True:
                yield b"data: token\n\n"
                state["sent"] += 1
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            state["cancelled"] = True  # where vLLM's app would see http.disconnect and abort
            raise

    async def scenario():
        channel = await AnswerChannel.open("127.0.0.1")
        try:
            reader, rest_of_call = await _started(channel, items())
            assert isinstance(await reader.__anext__(), bytes)
            reader.close()
            await _ended(rest_of_call)
        finally:
            channel.close()

    asyncio.run(scenario())
    assert state["cancelled"] and state["sent"] >= 1


def test_a_replica_that_dies_mid_answer_is_an_answer_lost() -> None:
    async def items():
        yield START
        yield b"data: 1\n\n"
        raise RuntimeError("engine core died")

    async def scenario():
        channel = await AnswerChannel.open("127.0.0.1")
        try:
            ticket, rest_of_call = await _call(channel, items())
            got = []
            with pytest.raises(AnswerLost):
                async for item in await AnswerReader.claim(ticket):
                    got.append(item)
            with pytest.raises(RuntimeError, match="engine core died"):  # and the Ray call fails with it
                await asyncio.wait_for(rest_of_call, 5)
            return got
        finally:
            channel.close()

    assert asyncio.run(scenario()) == [START, b"data: 1\n\n"]


def test_a_lost_call_ends_the_answer_even_if_the_connection_stays_up() -> None:
    async def items():
        yield START
        await asyncio.sleep(30)  # a replica on a node that vanished: no FIN ever arrives
        yield PoolAnswerEnd()

    async def scenario():
        channel = await AnswerChannel.open("127.0.0.1")
        try:
            reader, rest_of_call = await _started(channel, items())
            reader.lose(AnswerLost("the pool call failed: node lost"))
            with pytest.raises(AnswerLost, match="node lost"):
                await asyncio.wait_for(reader.__anext__(), 5)
            await _ended(rest_of_call)  # the replica saw the hang-up and stopped
        finally:
            channel.close()

    asyncio.run(scenario())


def test_a_ticket_works_once_and_a_forged_one_not_at_all() -> None:
    async def items():
        yield START
        yield PoolAnswerEnd()

    async def scenario():
        channel = await AnswerChannel.open("127.0.0.1")
        try:
            ticket, rest_of_call = await _call(channel, items())
            forged = AnswerTicket(ticket.host, ticket.port, "0" * len(ticket.token))
            with pytest.raises(AnswerLost):
                await _collect(await AnswerReader.claim(forged))
            assert await _collect(await AnswerReader.claim(ticket)) == [START, PoolAnswerEnd()]
            await _ended(rest_of_call)
            with pytest.raises(AnswerLost):  # the same ticket again: the replica closes the connection
                await _collect(await AnswerReader.claim(ticket))
            closed_port = AnswerTicket(ticket.host, ticket.port, ticket.token)
            channel.close()
            await asyncio.sleep(0.05)
            with pytest.raises(AnswerLost, match="could not reach"):
                await AnswerReader.claim(closed_port)
        finally:
            channel.close()

    asyncio.run(scenario())


def test_an_unclaimed_ticket_expires(monkeypatch) -> None:
    import gptoss_vllm.serve.pool.answer_channel as answer_channel

    monkeypatch.setattr(answer_channel, "CONNECT_TIMEOUT_S", 0.2)
    started = []

    async def items():
        started.append(True)
        yield START

    async def scenario():
        channel = await AnswerChannel.open("127.0.0.1")
        try:
            _, rest_of_call = await _call(channel, items())
            await _ended(rest_of_call)
        finally:
            channel.close()

    asyncio.run(scenario())
    assert started == []  # nothing was generated for an answer nobody came for
