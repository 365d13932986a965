"""The Responses API's conversation store: each stored response's owner, what went in and what came out.

The ingress keeps conversations, not the engines: a follow-up (``previous_response_id``) is expanded into the
whole conversation and runs in the pool of its own effort on any replica, and a replica that dies, drains or is
scaled down loses nothing. Two backends behind :class:`ResponseStore`:

- ``embedded`` (default): a SQLite file on the ingress's node; nothing else to run, shared by the ingress
  replicas of one node and kept across their restarts.
- ``redis``: every ingress replica of a cluster shares it; a real ``redis-server`` in the tests.

Retention is a TTL and a bound on the number of responses (oldest first); both count as evictions. Every
backend failure raises :class:`StoreUnavailable`, which the ingress answers 503 with Retry-After: a response
is never silently lost or silently unstored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptoss_vllm import envs
from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.config import ResponseStoreConfig

log = logging.getLogger("ray.serve")

# (reason, how many): "ttl" or "size".
EvictionCallback = Callable[[str, int], None]


class StoreUnavailable(ServeError, RuntimeError):
    """The store could not be read or written; the message says which operation and why."""

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"response store {operation} failed: {detail}")
        self.operation = operation


@dataclass
class StoredConversation:
    """One stored response: ``input_items`` is the whole conversation it was generated from (earlier turns
    expanded), ``response`` the response object as its owner got it (its ``output`` are the output items)."""

    id: str
    owner: str
    created_at: float
    input_items: list[Any]
    response: dict[str, Any]
    cancel_requested: bool = False
    lease_until: float | None = None  # background work: the ingress running it renews this

    @property
    def output_items(self) -> list[Any]:
        output = self.response.get("output")
        return output if isinstance(output, list) else []

    @property
    def status(self) -> str | None:
        return self.response.get("status")

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredConversation:
        return cls(**json.loads(text))


class ResponseStore(ABC):
    """Where conversations live; every method raises :class:`StoreUnavailable` on a backend failure."""

    def __init__(self, config: ResponseStoreConfig, on_evict: EvictionCallback | None = None) -> None:
        self.ttl_s = config.ttl_s
        self.max_responses = config.max_responses
        self._on_evict = on_evict or (lambda reason, count: None)

    def _evicted(self, reason: str, count: int) -> None:
        if count > 0:
            self._on_evict(reason, count)

    @abstractmethod
    async def get(self, response_id: str) -> StoredConversation | None: ...

    @abstractmethod
    async def put(self, conversation: StoredConversation) -> None:
        """Store (or replace) a conversation, then apply retention."""

    @abstractmethod
    async def delete(self, response_id: str) -> bool: ...

    @abstractmethod
    async def count(self) -> int: ...

    async def close(self) -> None:  # noqa: B027 - a backend without connections has nothing to close
        pass


class EmbeddedStore(ResponseStore):
    """SQLite in WAL mode (several ingress processes of one node share the file); calls run in threads."""

    def __init__(self, config: ResponseStoreConfig, on_evict: EvictionCallback | None = None) -> None:
        super().__init__(config, on_evict)
        self.path = Path(config.embedded_path())
        self._timeout_s = config.timeout_s
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        # Counting rows costs a scan: the size bound is applied every ~1% of max_responses puts (so it may be
        # passed by that much), every put for small bounds.
        self._bound_every = max(1, min(100, config.max_responses // 100))
        self._puts = 0

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self._timeout_s, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses "
                "(id TEXT PRIMARY KEY, created REAL NOT NULL, expires REAL NOT NULL, document TEXT NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS responses_by_created ON responses (created)")
            db.execute("CREATE INDEX IF NOT EXISTS responses_by_expiry ON responses (expires)")
            db.commit()
            self._db = db
        return self._db

    async def _run(self, operation: str, work: Callable[[sqlite3.Connection], Any]) -> Any:
        def locked() -> Any:
            with self._lock:
                db = self._connection()
                try:
                    result = work(db)
                    db.commit()
                    return result
                except BaseException:
                    db.rollback()
                    raise

        try:
            return await asyncio.to_thread(locked)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(operation, f"{self.path}: {exc}") from exc

    async def get(self, response_id: str) -> StoredConversation | None:
        def read(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT document FROM responses WHERE id = ? AND expires > ?", (response_id, time.time())
            ).fetchone()
            return None if row is None else row[0]

        document = await self._run("get", read)
        return None if document is None else StoredConversation.from_json(document)

    async def put(self, conversation: StoredConversation) -> None:
        expires = conversation.created_at + self.ttl_s
        self._puts += 1
        bound = self._puts % self._bound_every == 0

        def write(db: sqlite3.Connection) -> tuple[int, int]:
            db.execute(
                "INSERT OR REPLACE INTO responses (id, created, expires, document) VALUES (?, ?, ?, ?)",
                (conversation.id, conversation.created_at, expires, conversation.to_json()),
            )
            expired = db.execute("DELETE FROM responses WHERE expires <= ?", (time.time(),)).rowcount
            if not bound:
                return expired, 0
            over = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] - self.max_responses
            if over > 0:
                db.execute(
                    "DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created LIMIT ?)",
                    (over,),
                )
            return expired, max(over, 0)

        expired, dropped = await self._run("put", write)
        self._evicted("ttl", expired)
        self._evicted("size", dropped)

    async def delete(self, response_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

        return await self._run("delete", remove)

    async def count(self) -> int:
        def counted(db: sqlite3.Connection) -> tuple[int, int]:
            expired = db.execute("DELETE FROM responses WHERE expires <= ?", (time.time(),)).rowcount
            return expired, db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

        expired, total = await self._run("count", counted)
        self._evicted("ttl", expired)
        return total

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class RedisStore(ResponseStore):
    """One key per response (expiring with the TTL) and a sorted set by creation time for the size bound."""

    def __init__(
        self,
        config: ResponseStoreConfig,
        on_evict: EvictionCallback | None = None,
        password: str | None = None,
    ) -> None:
        import redis.asyncio as redis

        super().__init__(config, on_evict)
        assert config.url is not None
        self.url = config.url
        options: dict[str, Any] = {
            "socket_timeout": config.timeout_s,
            "socket_connect_timeout": config.timeout_s,
            "decode_responses": False,
        }
        if password:
            options["password"] = password
        if config.tls_ca_file:
            options["ssl_ca_certs"] = config.tls_ca_file
        self._client = redis.from_url(config.url, **options)
        self._prefix = config.key_prefix
        self._index = f"{config.key_prefix}responses"

    def _key(self, response_id: str) -> str:
        return f"{self._prefix}response:{response_id}"

    async def _run(self, operation: str, work: Callable[[], Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await work()
        except (RedisError, OSError, TimeoutError) as exc:
            # The URL may hold a password: name only where it points.
            where = self.url.split("@")[-1]
            raise StoreUnavailable(operation, f"Redis at {where}: {exc}") from exc

    async def get(self, response_id: str) -> StoredConversation | None:
        document = await self._run("get", lambda: self._client.get(self._key(response_id)))
        return None if document is None else StoredConversation.from_json(document)

    async def put(self, conversation: StoredConversation) -> None:
        remaining_ms = int((conversation.created_at + self.ttl_s - time.time()) * 1000)
        if remaining_ms <= 0:
            self._evicted("ttl", 1)
            return

        async def write() -> tuple[int, int]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key(conversation.id), conversation.to_json(), px=remaining_ms)
                pipe.zadd(self._index, {conversation.id: conversation.created_at})
                # Keys Redis expired leave their index entries behind; they count as TTL evictions here.
                pipe.zremrangebyscore(self._index, "-inf", time.time() - self.ttl_s)
                pipe.zcard(self._index)
                _, _, expired, total = await pipe.execute()
            dropped = 0
            if total > self.max_responses:
                oldest = await self._client.zpopmin(self._index, total - self.max_responses)
                if oldest:
                    await self._client.delete(*(self._key(member.decode()) for member, _ in oldest))
                dropped = len(oldest)
            return expired, dropped

        expired, dropped = await self._run("put", write)
        self._evicted("ttl", expired)
        self._evicted("size", dropped)

    async def delete(self, response_id: str) -> bool:
        async def remove() -> bool:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(response_id))
                pipe.zrem(self._index, response_id)
                deleted, _ = await pipe.execute()
            return deleted > 0

        return await self._run("delete", remove)

    async def count(self) -> int:
        async def counted() -> tuple[int, int]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._index, "-inf", time.time() - self.ttl_s)
                pipe.zcard(self._index)
                return tuple(await pipe.execute())

        expired, total = await self._run("count", counted)
        self._evicted("ttl", expired)
        return total

    async def close(self) -> None:
        await self._client.aclose()


def open_store(config: ResponseStoreConfig, on_evict: EvictionCallback | None = None) -> ResponseStore:
    """The configured backend; Redis's password comes from ``config.password_env`` (never the config)."""
    if config.backend == "redis":
        password = envs.lookup(config.password_env) or None
        return RedisStore(config, on_evict, password=password)
    return EmbeddedStore(config, on_evict)
