"""Responses conversations kept by the ingress, through the official ``openai`` client against the shared stack
(whose store is a real ``redis-server``): follow-ups run in the pool of their own effort with the whole
conversation, a response exists only for the key that made it, ids are the server's, background work is
admitted until it ends and cancels, a failing store answers 503, and conversations outlive an ingress restart.
The replica kill that conversations survive is in ``test_drain_and_recovery.py``'s killed-replica test."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.support import http
from tests.support.admission import HOLD_TOKENS, in_flight, ingress_samples
from tests.support.shared_stack import MAIN_KEY, MODEL, TPM_KEY, restart_redis
from tests.support.stack import replica_processes, wait_ready

USER_ITEM = {"type": "message", "role": "user"}


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=MAIN_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stranger(stack):
    """Another tenant's key."""
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=TPM_KEY, max_retries=0, timeout=120)


def _headers(key: str = MAIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _store_samples(stack) -> dict[tuple[str, str], float]:
    return {
        (name, dict(labels).get("result") or dict(labels).get("operation") or ""): value
        for (name, labels), value in ingress_samples(stack.url).items()
        if name.startswith("gptoss_response_store")
    }


def test_a_follow_up_at_another_effort_runs_in_its_pool_with_the_whole_conversation(client):
    first = client.responses.with_raw_response.create(
        model=MODEL, input="Hi", reasoning={"effort": "high"}, max_output_tokens=16
    )
    assert (first.headers["x-gptoss-pool"], first.headers["x-gptoss-effort-source"]) == ("deep", "responses")
    stored = first.parse()
    assert stored.store is True and stored.id.startswith("resp_") and stored.output
    follow = client.responses.with_raw_response.create(
        model=MODEL,
        input="More",
        previous_response_id=stored.id,
        max_output_tokens=8,
        extra_headers={"X-Reasoning-Effort": "low"},
    )
    # Low effort runs in fast, not in deep where the first turn ran: no replica holds the conversation.
    assert (follow.headers["x-gptoss-pool"], follow.headers["x-gptoss-effort"]) == ("fast", "low")
    second = follow.parse()
    assert second.previous_response_id == stored.id
    # The engine got the whole conversation: its prompt holds the first exchange.
    assert second.usage.input_tokens > stored.usage.input_tokens + stored.usage.output_tokens
    items = client.responses.input_items.list(second.id, order="asc").data
    assert items[0].type == "message" and items[0].content[0].text == "Hi"
    assert items[-1].content[0].text == "More"
    assert [item.id for item in items[1:-1]] == [item.id for item in stored.output]
    assert client.responses.retrieve(stored.id).output[-1].id == stored.output[-1].id
    page = client.responses.input_items.list(second.id, limit=1)  # newest first, by default
    assert page.data[0].content[0].text == "More" and page.has_more


def test_a_streamed_response_is_stored_before_its_end_reaches_the_client(client):
    with client.responses.stream(model=MODEL, input="Hi", max_output_tokens=8) as stream:
        events = list(stream)
        finished = stream.get_final_response()
    assert events[0].response.store is True
    # Asked the moment the stream ended: the store already has it.
    follow = client.responses.create(
        model=MODEL, input="More", previous_response_id=finished.id, max_output_tokens=4
    )
    assert follow.usage.input_tokens > finished.usage.input_tokens


def test_a_response_exists_only_for_the_key_that_made_it(stack, client, stranger):
    mine = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    for attempt in (
        lambda: stranger.responses.retrieve(mine.id),
        lambda: stranger.responses.input_items.list(mine.id),
        lambda: stranger.responses.delete(mine.id),
        lambda: stranger.responses.cancel(mine.id),
        lambda: stranger.responses.create(
            model=MODEL, input="More", previous_response_id=mine.id, max_output_tokens=4
        ),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            attempt()
        assert missing.value.body["code"] == "response_not_found"
    # The same answer as for an id that never existed: nothing tells the stranger that it does.
    with pytest.raises(openai.NotFoundError) as unknown:
        stranger.responses.retrieve("resp_" + "0" * 32)
    assert unknown.value.body["message"].replace("0" * 32, mine.id[5:]) == missing.value.body["message"]
    assert client.responses.retrieve(mine.id).id == mine.id  # the stranger's DELETE did nothing
    anonymous = http.get(f"{stack.url}/v1/responses/{mine.id}")
    assert anonymous.status_code == 401


def test_ids_are_made_by_the_server_and_delete_removes_a_response(stack, client):
    refused = http.post(
        f"{stack.url}/v1/responses",
        json={"input": "Hi", "request_id": "resp_chosen", "max_output_tokens": 4},
        headers=_headers(),
        timeout=60,
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "request_id"
    one = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    two = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    assert one.id != two.id
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    gone = httpx.delete(f"{stack.url}/v1/responses/{one.id}", headers=_headers(), timeout=30)
    assert gone.json() == {"id": one.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(one.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="More", previous_response_id=one.id, max_output_tokens=4)
    bad = http.get(f"{stack.url}/v1/responses/{two.id}/input_items?limit=0", headers=_headers(), timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    samples = _store_samples(stack)
    assert samples[("gptoss_response_store_lookups_total", "hit")] > 0
    assert samples[("gptoss_response_store_lookups_total", "miss")] > 0


def _poll(client: openai.OpenAI, response_id: str, until: tuple[str, ...], timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    # A store call past its deadline on a loaded machine is 503 with Retry-After: a client retries it.
    retrying = client.with_options(max_retries=3)
    while True:
        response = retrying.responses.retrieve(response_id)
        if response.status in until or time.monotonic() > deadline:
            return response
        time.sleep(0.3)


def test_background_responses_run_counted_in_admission_and_cancel(stack, client):
    queued = client.responses.create(model=MODEL, input="Hi", max_output_tokens=8, background=True)
    assert (queued.status, queued.background) == ("queued", True)
    done = _poll(client, queued.id, ("completed", "incomplete", "failed"))
    assert done.status in ("completed", "incomplete") and done.output and done.background
    # A long one holds its slot in deep until it is cancelled; the engine then stops it.
    long = client.responses.create(
        model=MODEL,
        input="Hi",
        max_output_tokens=HOLD_TOKENS,
        background=True,
        reasoning={"effort": "high"},
        extra_body={"ignore_eos": True},
    )
    deadline = time.monotonic() + 60
    while in_flight(stack.url).get("deep", 0) < 1:
        assert time.monotonic() < deadline, "the background response never reached its pool"
        time.sleep(0.2)
    assert _poll(client, long.id, ("in_progress",), 30).status == "in_progress"
    cancelled = client.with_options(max_retries=3).responses.cancel(long.id)  # as _poll: 503 is retried
    assert cancelled.status == "cancelled"
    deadline = time.monotonic() + 30
    while in_flight(stack.url).get("deep", 0) > 0:
        assert time.monotonic() < deadline, "the cancelled response still holds its slot"
        time.sleep(0.2)
    assert client.responses.retrieve(long.id).status == "cancelled"
    foreground = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(foreground.id)


def test_a_store_that_fails_answers_503_and_chat_goes_on(stack, client, tmp_path):
    stack.redis.stop()
    try:
        down = http.post(
            f"{stack.url}/v1/responses",
            json={"input": "Hi", "max_output_tokens": 4},
            headers=_headers(),
            timeout=60,
        )
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "store_unavailable" and "Retry-After" in down.headers
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert chat.choices
        errors = _store_samples(stack)
        assert errors[("gptoss_response_store_errors_total", "put")] >= 1
    finally:
        stack.redis = restart_redis(stack.redis, tmp_path)
    again = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    assert client.responses.retrieve(again.id).id == again.id


@pytest.mark.stops_stack
def test_conversations_outlive_an_ingress_restart(stack, client):
    wait_ready(stack)
    before = client.responses.create(model=MODEL, input="Hi", max_output_tokens=8)
    (ingress,) = replica_processes("ingress")
    ingress.kill()
    ingress.wait(timeout=30)
    deadline = time.monotonic() + 300
    while True:
        try:
            found = client.responses.retrieve(before.id)
            break
        except (openai.APIConnectionError, openai.InternalServerError, openai.NotFoundError) as exc:
            assert not isinstance(exc, openai.NotFoundError), "the restarted ingress lost the conversation"
            assert time.monotonic() < deadline, stack.log_tail()
            time.sleep(1)
    assert found.id == before.id and [p.pid for p in replica_processes("ingress")] != [ingress.pid]
    follow = client.responses.create(
        model=MODEL, input="More", previous_response_id=before.id, max_output_tokens=4
    )
    assert follow.usage.input_tokens > before.usage.input_tokens + before.usage.output_tokens
