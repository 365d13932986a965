"""Routing by reasoning effort through the whole stack: each effort lands in its pool, every source of the effort
reaches what the engine renders, bad efforts are refused, and budgets clamp or reject."""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.support.admission import HOLD_TOKENS
from tests.support.shared_stack import LOW_BUDGET, MODEL, USER, post

POOL_OF = {"low": "fast", "medium": "fast", "high": "deep"}


@pytest.fixture(scope="module")
def tokenizer(stack):
    return AutoTokenizer.from_pretrained(stack.checkpoint)


def _rendered_effort(tokenizer, response: httpx.Response) -> str:
    """The `Reasoning:` line of the prompt the engine actually rendered (from vLLM's returned token ids)."""
    text = tokenizer.decode(response.json()["prompt_token_ids"])
    line = next(line for line in text.splitlines() if line.startswith("Reasoning:"))
    return line.split(":", 1)[1].strip()


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_chat_lands_in_the_pool_of_its_effort(client, effort):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, reasoning_effort=effort, max_tokens=8, extra_body={"ignore_eos": True}
    )
    completion = raw.parse()
    assert raw.headers["x-gptoss-effort"] == effort
    assert raw.headers["x-gptoss-effort-source"] == "chat"
    assert raw.headers["x-gptoss-pool"] == POOL_OF[effort]
    assert raw.headers["x-gptoss-replica"]
    assert completion.usage.completion_tokens == 8


def test_every_effort_source_and_what_the_engine_renders(stack, tokenizer):
    cases = [
        ({"reasoning_effort": "low"}, {"X-Reasoning-Effort": "high"}, "low", "chat"),
        ({}, {"X-Reasoning-Effort": "HIGH"}, "high", "header"),
        (
            {"messages": [{"role": "system", "content": "Be brief.\nReasoning: high"}, *USER]},
            {},
            "high",
            "system",
        ),
        (
            {
                "messages": [
                    {"role": "developer", "content": [{"type": "text", "text": "reasoning: low"}]},
                    *USER,
                ]
            },
            {},
            "low",
            "system",
        ),
        ({}, {}, "medium", "default"),
    ]
    for extra, headers, effort, source in cases:
        body = {"model": MODEL, "messages": USER, "max_tokens": 2, "return_token_ids": True, **extra}
        response = post(stack, "/v1/chat/completions", body, headers)
        assert response.status_code == 200, response.text
        assert (response.headers["x-gptoss-effort"], response.headers["x-gptoss-effort-source"]) == (
            effort,
            source,
        )
        assert response.headers["x-gptoss-pool"] == POOL_OF[effort]
        assert _rendered_effort(tokenizer, response) == effort


def test_bad_effort_is_400_listing_the_allowed_values(stack, client):
    bad = [
        ("/v1/chat/completions", {"messages": USER, "reasoning_effort": "ultra"}, {}, "reasoning_effort"),
        (
            "/v1/chat/completions",
            {"messages": USER},
            {"X-Reasoning-Effort": "max"},
            "header X-Reasoning-Effort",
        ),
        ("/v1/responses", {"input": "hi", "reasoning": {"effort": "ultra"}}, {}, "reasoning.effort"),
    ]
    for path, body, headers, param in bad:
        response = post(stack, path, body, headers)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_reasoning_effort"
        assert "low, medium, high" in error["message"]
        if param:
            assert error["param"] == param
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="ultra")
    # A system line is the lowest-priority source: an unknown value there is skipped (and logged), not refused.
    prose = [{"role": "system", "content": "Reasoning: extreme"}, *USER]
    skipped = post(stack, "/v1/chat/completions", {"messages": prose, "max_tokens": 2})
    assert skipped.status_code == 200 and skipped.headers["x-gptoss-effort-source"] == "default"


def test_budgets_clamp_or_reject(stack):
    clamped = post(
        stack,
        "/v1/chat/completions",
        {"messages": USER, "reasoning_effort": "low", "max_tokens": 1000, "ignore_eos": True},
    )
    assert clamped.status_code == 200
    assert clamped.headers["x-gptoss-budget-clamped-from"] == "1000"
    assert clamped.json()["usage"]["completion_tokens"] == LOW_BUDGET
    unlimited = post(
        stack, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "low", "ignore_eos": True}
    )
    assert unlimited.json()["usage"]["completion_tokens"] == LOW_BUDGET
    rejected = post(
        stack,
        "/v1/chat/completions",
        {"messages": USER, "reasoning_effort": "high", "max_completion_tokens": HOLD_TOKENS + 1},
    )
    assert rejected.status_code == 400
    assert rejected.json()["error"]["code"] == "over_budget"
    assert rejected.json()["error"]["param"] == "max_completion_tokens"
