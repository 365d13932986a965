"""The conversation store's backends against the real thing: SQLite files and a real ``redis-server``.

Both behave the same behind :class:`ResponseStore`: round trips, sharing between two ingress processes,
retention by TTL and by size (counted as evictions), and every failure raised as :class:`StoreUnavailable`
(which the ingress answers 503), never a silent loss."""

from __future__ import annotations

import asyncio
import time

import pytest

from gptoss_vllm.serve.config import ConfigError, ResponseStoreConfig
from gptoss_vllm.serve.config_load import parse_config
from gptoss_vllm.serve.ingress.responses.store import (
    EmbeddedStore,
    RedisStore,
    StoredConversation,
    StoreUnavailable,
    open_store,
)
from tests.support.redis_server import start_redis

PASSWORD = "store-secret"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"), password=PASSWORD)
    yield server
    server.stop()


@pytest.fixture(params=["embedded", "redis"])
def make_store(request, tmp_path, redis_server, monkeypatch):
    """Builds stores of one backend (all on the same data, as two ingress processes would be)."""
    evictions: list[tuple[str, int]] = []
    prefix = f"test-{request.node.name}-{time.monotonic_ns()}:"
    monkeypatch.setenv("GPTOSS_VLLM_RESPONSE_STORE_PASSWORD", PASSWORD)

    def make(**settings):
        if request.param == "embedded":
            config = ResponseStoreConfig(path=str(tmp_path / "responses.sqlite3"), **settings)
        else:
            config = ResponseStoreConfig(backend="redis", url=redis_server.url, key_prefix=prefix, **settings)
        return open_store(config, on_evict=lambda reason, count: evictions.append((reason, count)))

    make.evictions = evictions
    make.backend = request.param
    return make


def _conversation(
    response_id: str, owner: str = "tenant", created_at: float | None = None
) -> StoredConversation:
    return StoredConversation(
        id=response_id,
        owner=owner,
        created_at=time.time() if created_at is None else created_at,
        input_items=[{"type": "message", "role": "user", "content": "Hi ✓"}],
        response={
            "id": response_id,
            "object": "response",
            "status": "completed",
            "output": [{"type": "message"}],
        },
    )


def test_a_conversation_round_trips_and_is_shared_by_two_ingress_processes(make_store):
    async def scenario():
        one, two = make_store(), make_store()
        try:
            stored = _conversation("resp_a")
            await one.put(stored)
            seen = await two.get("resp_a")
            assert seen == stored and seen.output_items == [{"type": "message"}]
            assert await two.get("resp_unknown") is None
            assert await two.count() == 1
            assert await two.delete("resp_a") is True
            assert await one.get("resp_a") is None
            assert await one.delete("resp_a") is False
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())


def test_retention_evicts_past_the_ttl_and_the_oldest_past_the_size_bound(make_store):
    async def scenario():
        store = make_store(ttl_s=1.0, max_responses=3)
        try:
            await store.put(_conversation("resp_old"))
            await asyncio.sleep(1.3)
            assert await store.get("resp_old") is None  # expired, whether or not it was dropped yet
            now = time.time()
            for index in range(5):
                await store.put(_conversation(f"resp_{index}", created_at=now + index * 0.01))
            assert [await store.get(f"resp_{index}") is not None for index in range(5)] == [
                False, False, True, True, True,
            ]  # fmt: skip
            assert await store.count() == 3
        finally:
            await store.close()

    asyncio.run(scenario())
    totals: dict[str, int] = {}
    for reason, count in make_store.evictions:
        totals[reason] = totals.get(reason, 0) + count
    assert totals == {"ttl": 1, "size": 2}


def test_a_store_that_cannot_be_reached_raises_store_unavailable(tmp_path, redis_server, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    embedded = EmbeddedStore(ResponseStoreConfig(path=str(blocker / "responses.sqlite3")))
    stopped = start_redis(tmp_path)
    stopped.stop()
    gone = RedisStore(ResponseStoreConfig(backend="redis", url=stopped.url, timeout_s=0.5))
    monkeypatch.delenv("GPTOSS_VLLM_RESPONSE_STORE_PASSWORD", raising=False)
    unauthenticated = open_store(ResponseStoreConfig(backend="redis", url=redis_server.url))

    async def failures(store):
        seen = []
        for call in (store.get("resp_a"), store.put(_conversation("resp_a")), store.delete("resp_a")):
            with pytest.raises(StoreUnavailable) as failed:
                await call
            seen.append(str(failed.value))
        await store.close()
        return seen

    messages = asyncio.run(failures(embedded))
    assert messages[0].startswith("response store get failed: ") and str(blocker) in messages[0]
    messages = asyncio.run(failures(gone))
    assert all(f"Redis at redis://127.0.0.1:{stopped.port}/0" in message for message in messages), messages
    messages = asyncio.run(failures(unauthenticated))
    assert "auth" in messages[0].lower() and PASSWORD not in messages[0]


def test_store_settings_are_checked_with_the_key_named(tmp_path):
    base = {"model_name": "m", "pools": {"p": {"model": "/x", "efforts": ["low", "medium", "high"]}}}
    for store, message in [
        ({"backend": "redis"}, "response_store: url: the redis backend needs url"),
        ({"backend": "redis", "url": "http://cache:6379"}, "is not a redis:// or rediss:// URL"),
        ({"url": "redis://cache:6379"}, "only the redis backend takes a url"),
        ({"ttl_s": 0}, "response_store.ttl_s"),
        ({"max_responses": 0}, "response_store.max_responses"),
        ({"backend": "memcached"}, "response_store.backend"),
    ]:
        with pytest.raises(ConfigError) as bad:
            parse_config({**base, "response_store": store}, "serve.yaml")
        assert str(bad.value).startswith("serve.yaml: ") and message in str(bad.value), bad.value
    config = parse_config({**base, "response_store": {"backend": "redis", "url": "rediss://cache:6380/1"}})
    assert config.response_store.ttl_s == 30 * 86400


def test_redis_over_tls_verifies_the_server_against_the_configured_ca(tmp_path):
    import trustme

    authority, stranger = trustme.CA(), trustme.CA()
    server_cert = authority.issue_cert("127.0.0.1")
    chain, key, ca, other_ca = (tmp_path / name for name in ("chain.pem", "key.pem", "ca.pem", "other.pem"))
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    server_cert.private_key_pem.write_to_path(str(key))
    authority.cert_pem.write_to_path(str(ca))
    stranger.cert_pem.write_to_path(str(other_ca))
    server = start_redis(tmp_path, password=PASSWORD, tls=(chain, key))
    url = f"rediss://127.0.0.1:{server.port}/0"

    async def scenario(ca_file):
        store = RedisStore(
            ResponseStoreConfig(backend="redis", url=url, tls_ca_file=str(ca_file)), password=PASSWORD
        )
        try:
            await store.put(_conversation("resp_tls"))
            return (await store.get("resp_tls")).id
        finally:
            await store.close()

    try:
        assert asyncio.run(scenario(ca)) == "resp_tls"
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            asyncio.run(scenario(other_ca))
    finally:
        server.stop()
