"""API keys at the ingress: loaded, rotated, and looked up by the bearer token a request presents.

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

from gptoss_vllm import envs
from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.config import Auth

log = logging.getLogger("ray.serve")
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeyConfigError(ServeError, ValueError):
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
            value = envs.lookup(self._auth.api_keys_env) or ""
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
