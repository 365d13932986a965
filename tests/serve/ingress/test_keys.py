"""API keys: loaded from a file and the environment, bare keys, and no key at all."""

from __future__ import annotations

import os
import time

import pytest

from gptoss_vllm.serve.config import Auth
from gptoss_vllm.serve.ingress.keys import KeyConfigError, KeyRing


def test_key_ring_from_file_and_env(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nalice:sk-a\n\nsk-bare\n")
    monkeypatch.setenv("TEST_KEYS", "bob:sk-b, sk-env")
    ring = KeyRing(Auth(api_keys_env="TEST_KEYS", api_keys_file=str(keys)), recheck_s=0)
    assert ring.name_of("Bearer sk-a") == "alice"
    assert ring.name_of("bearer  sk-b") == "bob"
    assert ring.name_of("Bearer sk-bare").startswith("key-")
    assert ring.name_of("Bearer sk-env").startswith("key-")
    for bad in (None, "", "Bearer", "Bearer sk-x", "Basic sk-a", "sk-a"):
        assert ring.name_of(bad) is None
    # Rotation: a changed file is picked up; one that cannot be read keeps the keys in force and is
    # reported; one emptied on purpose (Secret updates are atomic) denies everyone.
    reloads = []
    ring = KeyRing(Auth(api_keys_file=str(keys)), recheck_s=0, on_reload=lambda *seen: reloads.append(seen))
    keys.write_text("carol:sk-c\n")
    os.utime(keys, (time.time() + 5, time.time() + 5))
    assert ring.name_of("Bearer sk-c") == "carol" and ring.name_of("Bearer sk-a") is None
    keys.write_bytes(b"\xff\xfe not text")
    os.utime(keys, (time.time() + 10, time.time() + 10))
    assert ring.name_of("Bearer sk-c") == "carol"
    keys.write_text("")
    os.utime(keys, (time.time() + 15, time.time() + 15))
    assert ring.name_of("Bearer sk-c") is None and len(ring) == 0
    assert reloads == [(True, 1), (False, 1), (True, 0)]


def test_a_bare_key_with_colons_is_never_cut(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ops:sk-ops\nsk-proj:a:b\n:sk:explicit\nuser@example.com:pass\n")
    ring = KeyRing(Auth(api_keys_file=str(keys)))
    assert ring.name_of("Bearer sk-ops") == "ops"
    assert ring.name_of("Bearer sk-proj:a:b").startswith("key-")  # two colons: bare, whole
    assert ring.name_of("Bearer a:b") is None
    assert ring.name_of("Bearer sk:explicit").startswith("key-")  # ':KEY' says bare
    assert ring.name_of("Bearer user@example.com:pass").startswith("key-")  # not a valid name: bare
    assert ring.name_of("Bearer pass") is None


def test_key_ring_refuses_to_run_open(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEYS", raising=False)
    with pytest.raises(KeyConfigError, match="hold no API key"):
        KeyRing(Auth(api_keys_env="NO_SUCH_KEYS"))
    with pytest.raises(KeyConfigError, match="cannot read"):
        KeyRing(Auth(api_keys_file=str(tmp_path / "absent")))
    (tmp_path / "bad").write_text("name:\n")
    with pytest.raises(KeyConfigError, match="entry 1"):
        KeyRing(Auth(api_keys_file=str(tmp_path / "bad")))
