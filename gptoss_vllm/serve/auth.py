"""API keys, per-key limits and the failed-authentication guard at the ingress.

Keys come from an environment variable (comma-separated) and/or a mounted file (one per line), each either
``name:key`` or a bare key (named ``key-<sha256 prefix>``). ``name`` is letters, digits, ``_.-`` (at most 64),
and the key after it has no further ``:``; any other entry is a bare key, whole, so a key containing ``:`` is never
cut (``:KEY`` says "bare" explicitly). Only names reach logs and metrics; keys are kept as SHA-256 digests and
compared in constant time. A mounted file is re-read when it changes (Secret rotation): a file emptied on
purpose denies everyone; one that cannot be read or parsed keeps the keys in force and is reported.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gptoss_vllm.serve.config import Auth, RateLimit

log = logging.getLogger("ray.serve")
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeyConfigError(ValueError):
    """Keys that cannot be loaded (missing file, no keys at all)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse_entries(entries: list[str], origin: str) -> dict[bytes, str]:
    keys: dict[bytes, str] = {}
    for number, raw in enumerate(entries, 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, key = entry.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not _KEY_NAME.match(name) or ":" in key:
            bare = entry[1:].strip() if entry.startswith(":") else entry
            name, key = "key-" + hashlib.sha256(bare.encode()).hexdigest()[:8], bare
        if not key:
            raise KeyConfigError(f"{origin}: entry {number} is not 'name:key' or 'key'")
        keys[_digest(key)] = name
    return keys


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyRing:
    """The accepted keys, looked up by the bearer token a request presents."""

    def __init__(
        self, auth: Auth, recheck_s: float = 10.0, on_reload: Callable[[bool, int], None] | None = None
    ) -> None:
        self._auth = auth
        self._recheck_s = recheck_s
        self._on_reload = on_reload  # (loaded, number of keys in force) after each reload attempt
        self._lock = threading.Lock()
        self._file_mtime: float | None = None
        self._checked_at = 0.0
        self._keys = self._load()
        if not self._keys:
            raise KeyConfigError(
                f"auth is configured but {self._sources()} hold no API key: refusing to run open"
            )

    def __len__(self) -> int:
        return len(self._keys)

    def _sources(self) -> str:
        env, path = self._auth.api_keys_env, self._auth.api_keys_file
        return " and ".join(s for s in (env and f"${env}", path) if s)

    def _load(self) -> dict[bytes, str]:
        keys: dict[bytes, str] = {}
        if self._auth.api_keys_env:
            value = os.environ.get(self._auth.api_keys_env, "")
            keys.update(_parse_entries(value.split(","), f"environment variable {self._auth.api_keys_env}"))
        if self._auth.api_keys_file:
            path = self._auth.api_keys_file
            try:
                self._file_mtime = os.stat(path).st_mtime
                with open(path) as handle:
                    keys.update(_parse_entries(handle.read().splitlines(), path))
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise KeyConfigError(f"auth.api_keys_file: cannot read {path}: {why}") from None
        return keys

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self._auth.api_keys_file or now - self._checked_at < self._recheck_s:
            return
        self._checked_at = now
        try:
            if os.stat(self._auth.api_keys_file).st_mtime == self._file_mtime:
                return
            keys = self._load()
        except (OSError, KeyConfigError) as exc:
            # A rotation in progress or a broken file: keep serving with the keys in force, and say so.
            log.error("API keys not reloaded, the %d in force stay: %s", len(self._keys), exc)
            self._reported(False)
            return
        if not keys:
            log.warning(
                "API keys: %s now hold no key: every request is refused until keys return", self._sources()
            )
        else:
            log.info("API keys reloaded: %d in force", len(keys))
        with self._lock:
            self._keys = keys
        self._reported(True)

    def _reported(self, loaded: bool) -> None:
        if self._on_reload is not None:
            self._on_reload(loaded, len(self._keys))

    def name_of(self, authorization: str | None) -> str | None:
        """The key's name for an ``Authorization: Bearer <key>`` header, or None if it is not a valid key."""
        token = bearer_token(authorization)
        if token is None:
            return None
        self._maybe_reload()
        presented = _digest(token)
        found = None
        for digest, name in self._keys.items():
            if hmac.compare_digest(digest, presented):
                found = name
        return found


@dataclass
class _Bucket:
    tokens: float
    updated: float


MAX_BUCKETS = 100_000  # per limiter: past it, the buckets that have refilled are forgotten


class RateLimiter:
    """Token buckets per name (a key's, or a client address): ``burst`` at once, refilled at
    ``requests_per_minute``. Limits without ``requests_per_minute`` do not limit the rate."""

    def __init__(self, default: RateLimit | None, per_key: dict[str, RateLimit] | None = None) -> None:
        self._default = default
        self._per_key = per_key or {}
        self._buckets: dict[str, _Bucket] = {}
        self.taken: dict[str, float] = {}  # per name, since start: what other ingress replicas are charged

    def _bucket(self, name: str, now: float) -> tuple[_Bucket, float] | None:
        limit = self._per_key.get(name, self._default)
        if limit is None or limit.requests_per_minute is None:
            return None
        rate = limit.requests_per_minute / 60.0
        if len(self._buckets) >= MAX_BUCKETS and name not in self._buckets:
            self._forget_full(now)
        bucket = self._buckets.setdefault(name, _Bucket(float(limit.burst), now))
        bucket.tokens = min(float(limit.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        return bucket, rate

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that would be full by now (remembering them changes nothing)."""
        for name, bucket in list(self._buckets.items()):
            limit = self._per_key.get(name, self._default)
            if limit is None or limit.requests_per_minute is None:
                continue
            if bucket.tokens + (now - bucket.updated) * limit.requests_per_minute / 60.0 >= limit.burst:
                del self._buckets[name]

    def acquire(self, name: str, now: float | None = None) -> float | None:
        """Take one from the bucket; returns None, or the seconds to wait when it is empty."""
        found = self._bucket(name, time.monotonic() if now is None else now)
        if found is None:
            return None
        bucket, rate = found
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            self.taken[name] = self.taken.get(name, 0.0) + 1.0
            return None
        return (1.0 - bucket.tokens) / rate

    def charge(self, name: str, count: float, now: float | None = None) -> None:
        """Take ``count`` that other ingress replicas took for ``name`` (the bucket may go below zero, down to
        minus its burst: the wait then covers what they took)."""
        found = self._bucket(name, time.monotonic() if now is None else now)
        if found is not None:
            limit = self._per_key.get(name, self._default)
            assert limit is not None
            found[0].tokens = max(-float(limit.burst), found[0].tokens - count)

    def wait(self, name: str, now: float | None = None) -> float | None:
        """The seconds until the bucket holds one again (None: it does now), taking nothing."""
        found = self._bucket(name, time.monotonic() if now is None else now)
        if found is None or found[0].tokens >= 1.0:
            return None
        return (1.0 - found[0].tokens) / found[1]


@dataclass
class _Usage:
    in_flight: int = 0  # sequences
    tokens: float = 0.0  # the tokens-per-minute bucket (may go below zero: it is charged after the fact)
    updated: float = 0.0


class TenantUsage:
    """Per key name: sequences in flight and a tokens-per-minute bucket charged with each answer's usage
    (prompt and output, reasoning included), as the key's :class:`RateLimit` bounds them."""

    def __init__(self, default: RateLimit | None, per_key: dict[str, RateLimit] | None = None) -> None:
        self._default = default
        self._per_key = per_key or {}
        self._usage: dict[str, _Usage] = {}
        # For peer_counts: the other ingress replicas' sequences per key, and what this replica's answers spent
        # per key since start (what the other replicas are charged).
        self.peer_in_flight: dict[str, int] = {}
        self.tokens_spent: dict[str, float] = {}

    def limit_of(self, name: str) -> RateLimit | None:
        return self._per_key.get(name, self._default)

    def _refilled(self, name: str, limit: RateLimit, now: float) -> _Usage:
        usage = self._usage.setdefault(name, _Usage(tokens=float(limit.tokens_per_minute or 0), updated=now))
        if limit.tokens_per_minute:
            usage.tokens = min(
                float(limit.tokens_per_minute),
                usage.tokens + (now - usage.updated) * limit.tokens_per_minute / 60,
            )
        usage.updated = now
        return usage

    def admit(self, name: str, sequences: int, now: float | None = None) -> tuple[str, float] | None:
        """None if the key may start ``sequences`` more now; else (which bound, seconds to wait)."""
        limit = self.limit_of(name)
        if limit is None:
            return None
        usage = self._refilled(name, limit, time.monotonic() if now is None else now)
        in_flight = usage.in_flight + self.peer_in_flight.get(name, 0)
        if limit.concurrent_requests is not None and in_flight + sequences > limit.concurrent_requests:
            return "concurrent_requests", 1.0
        if limit.tokens_per_minute and usage.tokens <= 0:
            return "tokens_per_minute", (1.0 - usage.tokens) * 60 / limit.tokens_per_minute
        return None

    def started(self, name: str, sequences: int) -> None:
        limit = self.limit_of(name)
        if limit is not None:
            self._refilled(name, limit, time.monotonic()).in_flight += sequences

    def finished(self, name: str, sequences: int, tokens: int, now: float | None = None) -> None:
        limit = self.limit_of(name)
        if limit is None:
            return
        usage = self._refilled(name, limit, time.monotonic() if now is None else now)
        usage.in_flight = max(0, usage.in_flight - sequences)
        if limit.tokens_per_minute:
            usage.tokens -= tokens
            self.tokens_spent[name] = self.tokens_spent.get(name, 0.0) + tokens

    def charge(self, name: str, tokens: float, now: float | None = None) -> None:
        """Charge the key's tokens-per-minute bucket with ``tokens`` other ingress replicas' answers used."""
        limit = self.limit_of(name)
        if limit is not None and limit.tokens_per_minute:
            self._refilled(name, limit, time.monotonic() if now is None else now).tokens -= tokens

    def in_flight_by_key(self) -> dict[str, int]:
        """This replica's sequences in flight, for the keys that have any."""
        return {name: usage.in_flight for name, usage in self._usage.items() if usage.in_flight}

    def in_flight(self, name: str) -> int:
        usage = self._usage.get(name)
        return usage.in_flight if usage else 0
