"""Token-bucket rate limits per name: an API key's requests per minute, or a client address's failed
authentications."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gptoss_vllm.serve.config import RateLimit


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
