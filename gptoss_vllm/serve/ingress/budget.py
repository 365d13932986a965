"""Per-effort output budgets: the ``max_tokens`` ceiling of each effort, clamped or enforced with a 400.

A request without a limit gets the ceiling (Chat and Responses would otherwise run to the context length);
raw completions keep vLLM's default of 16 tokens when they give none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.config import Budget
from gptoss_vllm.serve.ingress.effort import Endpoint


class BudgetError(ServeError, ValueError):
    """A token limit that is malformed or above a rejecting budget; ``param`` names the field."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class BudgetOutcome:
    max_tokens: int | None  # what reaches the engine (None: the engine's default)
    clamped_from: int | None = None


def _limit_fields(endpoint: Endpoint) -> tuple[str, ...]:
    if endpoint == "chat":
        return ("max_completion_tokens", "max_tokens")  # the first one present wins, as in OpenAI's API
    if endpoint == "responses":
        return ("max_output_tokens",)
    return ("max_tokens",)


def apply_budget(
    endpoint: Endpoint, body: dict[str, Any], effort: str, budget: Budget | None
) -> BudgetOutcome:
    requested: int | None = None
    param = _limit_fields(endpoint)[0]
    for name in _limit_fields(endpoint):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BudgetError(
                f"Invalid '{name}': {value!r}; it must be a positive integer", name, "invalid_value"
            )
        if requested is None:
            requested, param = value, name
    if budget is None:
        return BudgetOutcome(requested)
    if requested is None:
        if endpoint == "completions":
            return BudgetOutcome(None)
        body[param] = budget.max_tokens
        return BudgetOutcome(budget.max_tokens)
    if requested <= budget.max_tokens:
        return BudgetOutcome(requested)
    if budget.over_budget == "reject":
        raise BudgetError(
            f"'{param}' is {requested}, above the {effort}-effort budget of {budget.max_tokens} tokens; "
            f"ask for at most {budget.max_tokens} or use another effort",
            param,
            "over_budget",
        )
    for name in _limit_fields(endpoint):
        if body.get(name) is not None:
            body[name] = budget.max_tokens
    return BudgetOutcome(budget.max_tokens, clamped_from=requested)
