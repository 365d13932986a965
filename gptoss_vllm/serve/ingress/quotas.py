"""Per-key quotas: sequences in flight and tokens per minute, charged with what each answer used."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gptoss_vllm.serve.config import RateLimit


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
