"""Token-bucket rate limits per key."""

from __future__ import annotations

import pytest

from gptoss_vllm.serve.config import RateLimit
from gptoss_vllm.serve.ingress.rate_limits import RateLimiter


def test_rate_limiter_buckets_per_key():
    limiter = RateLimiter(
        RateLimit(requests_per_minute=60, burst=2), {"vip": RateLimit(requests_per_minute=600, burst=5)}
    )
    assert [limiter.acquire("a", now=0.0) for _ in range(2)] == [None, None]
    assert limiter.acquire("a", now=0.0) == pytest.approx(1.0)
    assert limiter.acquire("a", now=0.5) == pytest.approx(0.5)
    assert limiter.acquire("a", now=1.0) is None
    assert limiter.acquire("b", now=0.0) is None  # keys do not share buckets
    assert all(limiter.acquire("vip", now=0.0) is None for _ in range(5))
    assert RateLimiter(None, {}).acquire("anyone") is None
