"""Reasoning budgets per effort: clamped, filled in, or refused."""

from __future__ import annotations

import pytest

from gptoss_vllm.serve.config import Budget
from gptoss_vllm.serve.ingress.budget import BudgetError, apply_budget


def test_budget_clamps_fills_and_rejects():
    clamp, reject = Budget(max_tokens=100), Budget(max_tokens=100, over_budget="reject")
    body = {"max_tokens": 500}
    assert apply_budget("chat", body, "low", clamp).clamped_from == 500 and body["max_tokens"] == 100
    body = {}
    assert apply_budget("chat", body, "low", clamp).max_tokens == 100 and body == {
        "max_completion_tokens": 100
    }
    body = {}
    assert apply_budget("responses", body, "low", clamp).max_tokens == 100 and body == {
        "max_output_tokens": 100
    }
    body = {}
    assert apply_budget("completions", body, "low", clamp).max_tokens is None and body == {}
    body = {"max_tokens": 50}
    assert apply_budget("chat", body, "low", reject).clamped_from is None and body == {"max_tokens": 50}
    with pytest.raises(BudgetError) as err:
        apply_budget("chat", {"max_completion_tokens": 101, "max_tokens": 5}, "high", reject)
    assert (err.value.param, err.value.code) == ("max_completion_tokens", "over_budget")
    for bad in (-1, 0, "10", 2.5, True):
        with pytest.raises(BudgetError) as err:
            apply_budget("chat", {"max_tokens": bad}, "low", None)
        assert err.value.code == "invalid_value"
