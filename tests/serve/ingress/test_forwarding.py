"""The ingress's pool call (``PoolCall``): a lost answer is a client's hang-up when Ray cancelled the call,
even when the answer channel closed before Ray's cancellation arrived (the order differs run to run).

The Ray call here is a stand-in (an async iterator that ends as Ray's would): the stack tests drive the real one."""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import RequestCancelledError

from gptoss_vllm.serve.ingress.forwarding import PoolCall


class _Call:
    """A Ray streaming call that ends with ``outcome`` (an exception, or None for a normal end) after ``delay_s``."""

    def __init__(self, outcome: BaseException | None, delay_s: float) -> None:
        self.outcome, self.delay_s = outcome, delay_s

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(self.delay_s)
        if self.outcome is not None:
            raise self.outcome
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


async def _settled(outcome: BaseException | None, delay_s: float, settle_s: float = 2.0) -> bool:
    call = PoolCall(_Call(outcome, delay_s))
    call._watcher = asyncio.ensure_future(call._watch())
    return await call.was_cancelled(settle_s)


def test_a_cancellation_that_arrives_after_the_answer_closed_is_still_a_hang_up():
    assert asyncio.run(_settled(RequestCancelledError("r1"), delay_s=0.2)) is True


def test_a_replica_failure_or_a_normal_end_is_not_a_hang_up_and_the_wait_is_bounded():
    assert asyncio.run(_settled(ActorDiedError(), delay_s=0.05)) is False
    assert asyncio.run(_settled(None, delay_s=0.05)) is False
    late = asyncio.run(asyncio.wait_for(_settled(RequestCancelledError("r2"), delay_s=30, settle_s=0.2), 5))
    assert late is False  # no outcome within the settle time: taken as the replica's failure


def test_only_a_lost_replica_sends_a_request_again():
    from ray.exceptions import TaskCancelledError
    from ray.serve.exceptions import BackPressureError

    from gptoss_vllm.serve.ingress.forwarding import _replica_lost
    from gptoss_vllm.serve.pool.answer_channel import AnswerLost

    assert (
        _replica_lost(ActorDiedError())
        and _replica_lost(AnswerLost("closed"))
        and _replica_lost(StopAsyncIteration())
    )
    # The client left, the pool is full, the cold start timed out: the answer stands.
    assert not _replica_lost(TaskCancelledError())
    assert not _replica_lost(BackPressureError(num_queued_requests=3, max_queued_requests=3))
    assert not _replica_lost(TimeoutError()) and not _replica_lost(asyncio.CancelledError())
    assert not _replica_lost(RequestCancelledError("r-1"))
