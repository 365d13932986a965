"""Two ingress replicas share one conversation store (a real ``redis-server``): a conversation begun through
one is continued, read and cancelled through the other, and a key's bound holds for the two together. (Scaling
a pool down under conversations and streams: tests/test_cluster_lifecycle.py.) Ray Serve's proxy picks the ingress replica of each
request, so the tests read each replica's own metrics to know which one served what, and repeat until both
sides were seen."""

from __future__ import annotations

import time

import openai
import pytest

from tests.support.admission import HOLD_ENV, HOLD_MAX_MODEL_LEN, HOLD_TOKENS, HeldRequest, samples_by_replica
from tests.support.redis_server import start_redis
from tests.support.stack import start_stack

MODEL = "gpt-oss-two-ingresses"
KEY = "sk-two-ingresses"
CAPPED_KEY = "sk-two-ingresses-capped"  # 2 sequences in flight, for the whole service
PASSWORD = "sk-two-ingresses-store"
TRIES = 30


@pytest.fixture(scope="module")
def stack(tiny_checkpoint_dirs, tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("two-ingresses")
    redis = start_redis(root, password=PASSWORD)
    keys = root / "keys"
    keys.write_text(f"tenant:{KEY}\ncapped:{CAPPED_KEY}\n")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "GPTOSS_VLLM_MOE_BACKEND": "cpu", **HOLD_ENV}
    config = {
        "model_name": MODEL,
        "pools": {
            "all": {
                "model": str(tiny_checkpoint_dirs["mxfp4"]),
                "efforts": ["low", "medium", "high"],
                "max_ongoing_requests": 4,
                "replicas": 1,
                "engine_args": {"max_model_len": HOLD_MAX_MODEL_LEN, "enforce_eager": True},
                "env": env,
                "drain_timeout_s": 30,
            }
        },
        "budgets": {"high": {"max_tokens": HOLD_TOKENS}},
        "auth": {"api_keys_file": str(keys), "key_rate_limits": {"capped": {"concurrent_requests": 2}}},
        "ingress": {"replicas": 2, "expose_replica_ids": True},
        "response_store": {"backend": "redis", "url": redis.url},
    }
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    try:
        running = start_stack(
            root / "serve.yaml", root / "serve.log", env={"GPTOSS_VLLM_RESPONSE_STORE_PASSWORD": PASSWORD}
        )
    except BaseException:
        redis.stop()
        raise
    yield running
    running.stop()
    redis.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _counter(samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, found), value in samples.items()
        if sample == name and all(dict(found).get(k) == v for k, v in labels.items())
    )


def _hits(stack) -> dict[str, float]:
    return {
        replica: _counter(samples, "gptoss_response_store_lookups_total", result="hit")
        for replica, samples in samples_by_replica(stack.url, "ingress").items()
    }


def test_a_conversation_continues_through_either_ingress_replica(stack, client):
    before = _hits(stack)
    assert len(before) == 2
    turns = [client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)]
    for _ in range(TRIES):
        # Each follow-up reads the previous turn, which the other replica may have stored.
        turns.append(
            client.responses.create(
                model=MODEL, input="More", previous_response_id=turns[-1].id, max_output_tokens=2
            )
        )
        read = {replica: hits - before[replica] for replica, hits in _hits(stack).items()}
        if all(read.values()):
            break
    assert all(read.values()), f"one ingress replica served every follow-up: {read}"
    # The last turn's input is the whole conversation: each turn's input, then its output, across both replicas.
    items = client.responses.input_items.list(turns[-1].id, limit=100, order="asc").data
    assert len(items) == len(turns) + sum(len(turn.output) for turn in turns[:-1])
    assert [item.content[0].text for item in items if getattr(item, "role", None) == "user"] == [
        "Hi", *["More"] * (len(turns) - 1),
    ]  # fmt: skip


def test_a_background_response_is_cancelled_through_the_other_ingress_replica(stack, client):
    for _ in range(TRIES):
        running = client.responses.create(
            model=MODEL, input="Hi", max_output_tokens=HOLD_TOKENS, background=True,
            reasoning={"effort": "high"}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            by_replica = samples_by_replica(stack.url, "ingress")
            owners = [r for r, s in by_replica.items() if _counter(s, "gptoss_in_flight_requests") > 0]
            if owners:
                break
            assert time.monotonic() < deadline, "the background response never reached its pool"
            time.sleep(0.2)
        (owner,) = owners
        cancels = {
            r: _counter(s, "gptoss_requests_total", endpoint="responses_cancel", status="200")
            for r, s in by_replica.items()
        }
        # A store call past its deadline on a loaded machine is 503 with Retry-After: a client retries it.
        assert client.with_options(max_retries=3).responses.cancel(running.id).status == "cancelled"
        after = samples_by_replica(stack.url, "ingress")
        (handled,) = [
            r
            for r, s in after.items()
            if _counter(s, "gptoss_requests_total", endpoint="responses_cancel", status="200") > cancels[r]
        ]
        # Stopped by the replica running it, whichever replica took the cancel.
        deadline = time.monotonic() + 30
        while _counter(samples_by_replica(stack.url, "ingress")[owner], "gptoss_in_flight_requests") > 0:
            assert time.monotonic() < deadline, "the cancelled response still holds its slot"
            time.sleep(0.2)
        assert client.with_options(max_retries=3).responses.retrieve(running.id).status == "cancelled"
        if handled != owner:
            return
    pytest.fail(f"every cancel of {TRIES} landed on the replica running the response")


def _by_replica(stack, name: str) -> dict[str, float]:
    return {
        replica: _counter(samples, name, pool="all")
        for replica, samples in samples_by_replica(stack.url, "ingress").items()
    }


def _wait_for(stack, name: str, expected: list[float], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while sorted((seen := _by_replica(stack, name)).values()) != expected:
        assert time.monotonic() < deadline, f"{name}: {seen}, expected {expected}"
        time.sleep(0.2)


def test_a_keys_concurrency_bound_holds_for_both_ingress_replicas_together(stack, client):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": HOLD_TOKENS - 100,
        "ignore_eos": True,
        "reasoning_effort": "high",
    }
    for _ in range(TRIES):
        held = []
        # From nothing in flight, as both replicas see it: a view lags by an exchange, and one still holding the
        # last test's or try's streams (another key's, say) would pass for these at the pool but not at the key.
        _wait_for(stack, "gptoss_in_flight_requests", [0, 0])
        _wait_for(stack, "gptoss_peer_in_flight_requests", [0, 0])
        try:
            # One held stream on each replica (the proxy gives the second to the replica without one, mostly).
            for count in (1, 2):
                held.append(HeldRequest(stack.url, "/v1/chat/completions", body, CAPPED_KEY))
                deadline = time.monotonic() + 60
                while sum(_by_replica(stack, "gptoss_in_flight_requests").values()) != count:
                    assert time.monotonic() < deadline, "a held request never reached its pool"
                    time.sleep(0.2)
            if sorted(_by_replica(stack, "gptoss_in_flight_requests").values()) != [1, 1]:
                continue  # both on one replica: that bound is one replica's own, try again
            # Each replica sees the other's stream, so each refuses the key's third, whichever takes it.
            _wait_for(stack, "gptoss_peer_in_flight_requests", [1, 1])
            capped = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=CAPPED_KEY, max_retries=0, timeout=120)
            for _ in range(TRIES):
                # Each try with both views fresh (losses counted from before that was seen).
                lost = _peers_lost(stack)
                _wait_for(stack, "gptoss_peer_in_flight_requests", [1, 1])
                try:
                    capped.chat.completions.with_raw_response.create(
                        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
                    )
                except openai.RateLimitError as refused:
                    assert refused.code == "rate_limit_exceeded", refused
                else:
                    # Only a replica that lost its peer meanwhile (an exchange stalled past the peers' TTL on a
                    # loaded machine) bounds alone, by design, and may admit it; it counts that loss.
                    assert _peers_lost(stack) > lost, "admitted beyond the key's bound with both views intact"
                    continue
                if len(_refusals(stack)) == 2:
                    break
            assert len(_refusals(stack)) == 2, f"every refusal came from one replica: {_refusals(stack)}"
            # Another key is not bounded by this one.
            assert client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            ).choices
            return
        finally:
            for request in held:
                request.release()
            _wait_for(stack, "gptoss_in_flight_requests", [0, 0])
    pytest.fail(f"in {TRIES} tries the two held streams never went to different ingress replicas")


def _peers_lost(stack) -> float:
    by_replica = samples_by_replica(stack.url, "ingress").values()
    assert all(("gptoss_ingress_peers_lost_total", frozenset()) in samples for samples in by_replica)
    return sum(samples[("gptoss_ingress_peers_lost_total", frozenset())] for samples in by_replica)


def _refusals(stack) -> dict[str, float]:
    return {
        replica: value
        for replica, samples in samples_by_replica(stack.url, "ingress").items()
        if (value := _counter(samples, "gptoss_rejections_total", reason="rate_limit"))
    }
