"""Nano through the whole stack: the real CLI runs the embedded default (what ``make serve`` runs) with the shared
stack's settings (``tests/support/shared_stack.py``: tight bounds, API keys, Prometheus and tracing), which builds
nano from the committed asset into an empty cache and serves it in two pools; the official ``openai`` client asks
held-out tasks at every effort.

Checks: completions come back as harmony (vLLM splits reasoning from content), reasoning grows with effort,
answers at high effort are right (>= 90%, and more often than at low effort), and the lookup family calls its
tool in OpenAI's ``tool_calls`` shape and answers with the code from the tool's result. The table is printed
(``pytest -s``)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from gptoss_vllm.nano.conversations import chat_messages
from gptoss_vllm.nano.evaluate import EffortScore, Turn, format_table, held_out_tasks, score
from gptoss_vllm.nano.tasks import EFFORTS, FAMILIES, LOOKUP_TOOL, Task

MODEL = "gpt-oss-nano"
PER_FAMILY = 8


@pytest.fixture(scope="module")
def client(stack):
    assert (stack.cache / "models" / "nano" / "config.json").exists()
    # The stack's bounds are tight: a request refused 429 is asked again after its Retry-After.
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=10, timeout=120)


def _ask(client: openai.OpenAI, task: Task, effort: str, after_tool: bool) -> Turn:
    tools = [LOOKUP_TOOL] if task.family == "lookup" else openai.NOT_GIVEN
    completion = client.chat.completions.create(
        model=MODEL,
        messages=chat_messages(task, after_tool),
        reasoning_effort=effort,
        tools=tools,
        temperature=0,
        max_tokens=400,
    )
    message = completion.choices[0].message
    reasoning = getattr(message, "reasoning", None) or getattr(message, "reasoning_content", None)
    details = completion.usage.completion_tokens_details
    reasoning_tokens = (details.reasoning_tokens if details else 0) or 0
    key = None
    if message.tool_calls:
        call = message.tool_calls[0]
        if call.function.name == "lookup":
            key = json.loads(call.function.arguments).get("key")
    parsed = bool(reasoning) and (bool(message.content) or bool(message.tool_calls))
    return Turn(parsed, reasoning_tokens, answer=message.content, tool_key=key)


@pytest.fixture(scope="module")
def scores(client) -> dict[str, EffortScore]:
    def run(requests):
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda r: _ask(client, *r), requests))

    # The chat families; the built-in tool families go through Responses in test_builtin_tools.py.
    results = score(held_out_tasks(PER_FAMILY, families=FAMILIES), EFFORTS, run)
    print("\n" + format_table({"nano": results}))
    return {s.effort: s for s in results}


def test_completions_are_harmony(scores):
    for effort in EFFORTS:
        assert scores[effort].parsed >= 0.95, scores[effort]


def test_reasoning_grows_with_effort(scores):
    low, medium, high = (scores[e].mean_reasoning_tokens for e in EFFORTS)
    assert medium >= 1.5 * low and high >= 1.5 * medium, (low, medium, high)


def test_high_effort_answers_are_right(scores):
    low, high = scores["low"].accuracy, scores["high"].accuracy
    assert high >= 0.9 and high > low, (low, high)


def test_tool_call_then_answer_from_the_result(client):
    task = held_out_tasks(1, families=FAMILIES)[-1]
    assert task.family == "lookup"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=chat_messages(task, False),
        tools=[LOOKUP_TOOL],
        reasoning_effort="low",
        temperature=0,
    )
    assert raw.headers["x-gptoss-pool"] == "fast"
    first = raw.parse()
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.type == "function" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"key": task.key}
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": task.user},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": task.tool_result},
        ],
        tools=[LOOKUP_TOOL],
        reasoning_effort="low",
        temperature=0,
    )
    answer = follow.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert answer.message.content == task.answer  # "The code for <key> is <the tool's code>."


@pytest.mark.parametrize("effort", EFFORTS)
def test_a_tool_call_round_trip_continues_through_the_conversation_store(client, effort):
    task = held_out_tasks(1, families=FAMILIES)[-1]
    assert task.family == "lookup"
    tools = [{"type": "function", **LOOKUP_TOOL["function"]}]  # the Responses API's tool shape
    # The follow-up's history holds nano's own first analysis (the store keeps it; chat clients do not send
    # it back): nano is trained on both histories.
    asked = {"model": MODEL, "tools": tools, "reasoning": {"effort": effort}, "temperature": 0}
    first = client.responses.create(input=task.user, **asked)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "lookup" and json.loads(call.arguments) == {"key": task.key}
    # Only the tool's result goes back: the call it answers comes from the store.
    result = {"type": "function_call_output", "call_id": call.call_id, "output": task.tool_result}
    follow = client.responses.create(previous_response_id=first.id, input=[result], **asked)
    assert follow.output_text == task.answer  # "The code for <key> is <the tool's code>."
    items = client.responses.input_items.list(follow.id, order="asc").data
    assert items[0].type == "message" and items[0].content[0].text == task.user
    assert [item.type for item in items][-2:] == ["function_call", "function_call_output"]
