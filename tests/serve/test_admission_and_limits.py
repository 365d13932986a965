"""Admission through the whole stack: API keys, a key's rate limit, a full queue answered 429 while the service
goes on, and spillover to the named pool."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import http
from tests.support.admission import holding
from tests.support.shared_stack import (
    AUTH,
    LIMITED_KEY,
    MAIN_KEY,
    USER,
    held_chat,
    post,
)


def test_api_keys(stack):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {MAIN_KEY}"}):
        response = http.post(f"{stack.url}/v1/chat/completions", json={"messages": USER}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert http.get(f"{stack.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-nope", max_retries=0).models.list()
    # Probes need no key.
    assert http.get(f"{stack.url}/health").status_code == 200
    assert http.get(f"{stack.url}/ready").status_code == 200
    assert MAIN_KEY not in stack.log_tail(10**7) and LIMITED_KEY not in stack.log_tail(10**7)


def test_per_key_rate_limit(stack):
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    codes = [http.get(f"{stack.url}/v1/models", headers=headers).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[2:] == [429, 429]
    limited = http.get(f"{stack.url}/v1/models", headers=headers)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert http.get(f"{stack.url}/v1/models", headers=AUTH).status_code == 200  # other keys unaffected


def _long_request(stack, effort: str, tokens: int = 256) -> httpx.Response:
    body = {"messages": USER, "max_tokens": tokens, "ignore_eos": True, "reasoning_effort": effort}
    return post(stack, "/v1/chat/completions", body)


def test_full_queue_is_429_with_retry_after_and_service_continues(stack):
    # deep admits 2 running + 1 queued at the ingress; with those held, the next one is refused at once.
    with holding(stack.url, "/v1/chat/completions", {"deep": [held_chat("high")] * 3}, MAIN_KEY):
        refused = _long_request(stack, "high", 4)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-gptoss-pool"] == "deep"
    assert refused.json()["error"]["code"] == "queue_full"
    # The held requests' client hung up: deep's slots are free again.
    assert _long_request(stack, "high", 4).status_code == 200


def test_spillover_to_the_named_pool(stack):
    # fast runs 1 and spills to deep as soon as one waits: with one running and one waiting held, it spills.
    with holding(stack.url, "/v1/chat/completions", {"fast": [held_chat("medium")] * 2}, MAIN_KEY):
        spilled = _long_request(stack, "medium", 4)
    assert spilled.status_code == 200, spilled.text
    assert spilled.headers["x-gptoss-spilled-from"] == "fast" and spilled.headers["x-gptoss-pool"] == "deep"
    # With fast free again, the same request stays in its own pool.
    unspilled = _long_request(stack, "medium", 4)
    assert unspilled.headers["x-gptoss-pool"] == "fast" and "x-gptoss-spilled-from" not in unspilled.headers
