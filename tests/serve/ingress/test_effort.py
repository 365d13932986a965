"""The requested reasoning effort: its sources in order, bad values, and what is written into the body."""

from __future__ import annotations

import pytest

from gptoss_vllm.serve.ingress.effort import EffortError, ResolvedEffort, apply_effort, resolve_effort


def test_effort_order_of_sources():
    chat = {"messages": [{"role": "system", "content": "Reasoning: high"}], "reasoning_effort": "low"}
    resolved = resolve_effort("chat", chat, {"x-reasoning-effort": "medium"}, "medium")
    assert (resolved.effort, resolved.source) == ("low", "chat")
    del chat["reasoning_effort"]
    resolved = resolve_effort("chat", chat, {"x-reasoning-effort": "medium"}, "medium")
    assert (resolved.effort, resolved.source) == ("medium", "header")
    resolved = resolve_effort("chat", chat, {}, "medium")
    assert (resolved.effort, resolved.source) == ("high", "system")
    resolved = resolve_effort("chat", {"messages": []}, {}, "low")
    assert (resolved.effort, resolved.source) == ("low", "default")
    responses = {"reasoning": {"effort": "high"}, "instructions": "Reasoning: low"}
    resolved = resolve_effort("responses", responses, {"x-reasoning-effort": "low"}, "medium")
    assert (resolved.effort, resolved.source) == ("high", "responses")
    del responses["reasoning"]
    assert resolve_effort("responses", responses, {}, "medium").source == "system"
    # Chat's field means nothing to the Responses API and the other way round.
    assert resolve_effort("responses", {"reasoning_effort": "high"}, {}, "low").source == "default"
    assert resolve_effort("chat", {"reasoning": {"effort": "high"}}, {}, "low").source == "default"
    # A user message is not an instruction.
    user = {"messages": [{"role": "user", "content": "Reasoning: high"}]}
    assert resolve_effort("chat", user, {}, "low").source == "default"


@pytest.mark.parametrize(
    ("endpoint", "body", "headers", "param"),
    [
        ("chat", {"reasoning_effort": "ultra"}, {}, "reasoning_effort"),
        ("chat", {"reasoning_effort": 3}, {}, "reasoning_effort"),
        ("chat", {}, {"x-reasoning-effort": "minimal"}, "header X-Reasoning-Effort"),
        ("responses", {"reasoning": {"effort": "none"}}, {}, "reasoning.effort"),
    ],
)
def test_bad_effort_values(endpoint, body, headers, param):
    with pytest.raises(EffortError) as err:
        resolve_effort(endpoint, body, headers, "medium")
    assert err.value.param == param
    assert "allowed values are low, medium, high" in str(err.value)


def test_an_unknown_system_line_value_is_skipped_not_refused(caplog):
    body = {"messages": [{"role": "developer", "content": "Reasoning: thorough\nReasoning: high"}]}
    with caplog.at_level("INFO", logger="ray.serve"):
        assert resolve_effort("chat", body, {}, "medium") == ResolvedEffort("high", "system")
    assert "thorough" in caplog.text
    prose = {"messages": [{"role": "system", "content": "Reasoning: careful, step by step"}]}
    assert resolve_effort("chat", prose, {}, "low") == ResolvedEffort("low", "default")


def test_the_resolved_effort_is_written_into_the_body():
    chat, responses, completions = {}, {"reasoning": {"summary": "auto"}}, {"prompt": "x"}
    apply_effort("chat", chat, "high")
    apply_effort("responses", responses, "low")
    apply_effort("completions", completions, "high")
    assert chat == {"reasoning_effort": "high"}
    assert responses == {"reasoning": {"summary": "auto", "effort": "low"}}
    assert completions == {"prompt": "x"}
