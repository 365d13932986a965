"""API keys and per-key rate limits at the ingress.

Keys come from an environment variable (comma-separated) and/or a mounted file (one per line), each either
``name:key`` or a bare key (named ``key-<sha256 prefix>``). Only names reach logs and metrics; keys are kept as
SHA-256 digests and compared in constant time. A mounted file is re-read when it changes (Secret rotation).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass

from gptoss_vllm.serve.config import Auth, RateLimit


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
        if not sep:
            name, key = "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
        name, key = name.strip(), key.strip()
        if not name or not key:
            raise KeyConfigError(f"{origin}: entry {number} is not 'name:key' or 'key'")
        keys[_digest(key)] = name
    return keys


class KeyRing:
    """The accepted keys, looked up by the bearer token a request presents."""

    def __init__(self, auth: Auth, recheck_s: float = 10.0) -> None:
        self._auth = auth
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._file_mtime: float | None = None
        self._checked_at = 0.0
        self._keys = self._load()

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
            except OSError as exc:
                raise KeyConfigError(f"auth.api_keys_file: cannot read {path}: {exc.strerror}") from None
        if not keys:
            sources = " and ".join(
                s
                for s in (
                    self._auth.api_keys_env and f"${self._auth.api_keys_env}",
                    self._auth.api_keys_file,
                )
                if s
            )
            raise KeyConfigError(f"auth is configured but {sources} hold no API key: refusing to run open")
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
        except (OSError, KeyConfigError):
            return  # a rotation in progress: keep serving with the keys we have
        with self._lock:
            self._keys = keys

    def name_of(self, authorization: str | None) -> str | None:
        """The key's name for an ``Authorization: Bearer <key>`` header, or None if it is not a valid key."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        self._maybe_reload()
        presented = _digest(token.strip())
        found = None
        for digest, name in self._keys.items():
            if hmac.compare_digest(digest, presented):
                found = name
        return found


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets per key name: ``burst`` requests at once, refilled at ``requests_per_minute``."""

    def __init__(self, default: RateLimit | None, per_key: dict[str, RateLimit]) -> None:
        self._default = default
        self._per_key = per_key
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key_name: str, now: float | None = None) -> float | None:
        """Take one request from the key's bucket; returns None, or the seconds to wait when it is empty."""
        limit = self._per_key.get(key_name, self._default)
        if limit is None:
            return None
        now = time.monotonic() if now is None else now
        rate = limit.requests_per_minute / 60.0
        bucket = self._buckets.setdefault(key_name, _Bucket(float(limit.burst), now))
        bucket.tokens = min(float(limit.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / rate
