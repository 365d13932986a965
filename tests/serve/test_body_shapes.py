"""Bodies of every shape against the shared stack (the real proxy gate, ingress and engines): generated bodies
around each shape bound (nesting depth, members per object, items per array, string length) on every
generating route get a 2xx or a 4xx in OpenAI's error shape, never a 5xx and never a hang; a 300-deep value in
any field that vLLM walks is 400 naming the bound and where; real-world large bodies (a tool set with big
schemas, a deep structured-output schema, a long conversation) still pass. Strings go where the tokenizer reads
them: a string at its bound is words, a word at its bound one run of a letter. The shape scan itself:
``test_body_shape.py``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gptoss_vllm.serve.body_shape import ShapeLimits
from tests.support import http
from tests.support.shared_stack import AUTH, USER

BOUNDS = ShapeLimits()  # the shared stack runs the defaults
CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
BASES = {
    CHAT: {"messages": USER, "max_tokens": 1, "reasoning_effort": "low"},
    COMPLETIONS: {"prompt": "2 + 2 =", "max_tokens": 1},
    RESPONSES: {"input": "Hi", "max_output_tokens": 1, "reasoning": {"effort": "low"}, "store": False},
}
# Where each kind of shape goes on each route: fields vLLM reads (and walks, for depth), cheap to refuse or
# to serve in one token.
Place = Callable[[Any], dict[str, Any]]
PLACES: dict[str, dict[str, Place]] = {
    CHAT: {
        "depth": lambda v: {"tools": [{"type": "function", "function": {"name": "f", "parameters": v}}]},
        "members": lambda v: {"logit_bias": v},
        "items": lambda v: {"stop": v},
        "string": lambda v: {"messages": [{"role": "user", "content": v}]},
        "word": lambda v: {"messages": [{"role": "user", "content": v}]},
    },
    COMPLETIONS: {
        "depth": lambda v: {
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": v}}
        },
        "members": lambda v: {"logit_bias": v},
        "items": lambda v: {"stop": v},
        "string": lambda v: {"prompt": v},
        "word": lambda v: {"prompt": v},
    },
    RESPONSES: {
        "depth": lambda v: {"metadata": {"k": v}},
        "members": lambda v: {"metadata": v},
        "items": lambda v: {"include": v},
        "string": lambda v: {"instructions": v},
        "word": lambda v: {"instructions": v},
    },
}
BOUND_NAMES = {
    "depth": "nesting depth",
    "members": "members per object",
    "items": "items per array",
    "string": "string length in bytes",
    "word": "word length in bytes",
}


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _nested(levels: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def _body(route: str, kind: str, size: int, filler: str) -> dict[str, Any]:
    """The route's base body with a value of ``size`` (depth, members, items or bytes) in its field for ``kind``;
    for depth, ``size`` is the whole body's."""
    place = PLACES[route][kind]
    if kind == "depth":
        around = _depth({**BASES[route], **place(0)})  # the containers the placed value sits in
        value: Any = _nested(size - around, filler)
    elif kind == "members":
        value = (
            {str(i): 0 for i in range(size)} if route != RESPONSES else {f"k{i}": filler for i in range(size)}
        )
    elif kind == "items":
        # At most 6 bytes an item with its separator: the array past its bound stays under the body byte limit.
        item = filler[:2] or "x"
        value = [item if len(json.dumps(item)) <= 4 else "x"] * size
    elif kind == "string":
        value = ("a sentence of words " * (size // 20 + 1))[
            :size
        ]  # tokenized in a second, whatever its length
    else:
        value = "x" * size  # one run: tokenizing it costs the square of its length
    body = {**BASES[route], **place(value)}
    if kind == "depth":
        assert _depth(body) == size
    return body


def _limit(kind: str) -> int:
    return {
        "depth": BOUNDS.max_depth,
        "members": BOUNDS.max_object_members,
        "items": BOUNDS.max_array_items,
        "string": BOUNDS.max_string_bytes,
        "word": BOUNDS.max_word_bytes,
    }[kind]


def _send(stack, route: str, body: dict[str, Any]) -> httpx.Response:
    started = time.monotonic()
    answer = http.post(f"{stack.url}{route}", content=json.dumps(body), headers=AUTH, timeout=120)
    assert time.monotonic() - started < 100, f"{route}: no answer for {time.monotonic() - started:.0f} s"
    return answer


def _assert_openai_answer(answer: httpx.Response, context: str) -> None:
    assert answer.status_code < 500, (context, answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        error = answer.json()["error"]
        assert error["message"] and error["type"], (context, error)


@pytest.mark.parametrize("kind", sorted(BOUND_NAMES))
@pytest.mark.parametrize("route", [CHAT, COMPLETIONS, RESPONSES])
@settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(offset=st.sampled_from([-1, 0, 1]), filler=st.text(alphabet='ab"\\{[,é', max_size=6))
@example(offset=1, filler="")
@example(offset=0, filler="")
def test_generated_bodies_around_every_bound_get_an_answer_in_openais_shape(
    stack, route, kind, offset, filler
):
    size = _limit(kind) + offset
    answer = _send(stack, route, _body(route, kind, size, filler))
    context = f"{route} {kind} {size}"
    _assert_openai_answer(answer, context)
    if offset > 0:
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["code"] == "body_shape", (context, error)
        assert BOUND_NAMES[kind] in error["message"] and error["param"].startswith("$."), (context, error)
    else:
        # Within the bounds the gate lets it through: whatever the ingress or vLLM make of it, not this.
        assert answer.status_code == 200 or answer.json()["error"].get("code") != "body_shape", (
            context,
            answer.text,
        )


DEEP = _nested(300, "x")
DEEP_SCHEMA = {"type": "string"}
for _ in range(150):  # 300 levels: an object and its properties per step
    DEEP_SCHEMA = {"type": "object", "properties": {"a": DEEP_SCHEMA}}


@pytest.mark.parametrize(
    ("route", "field", "where"),
    [
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": DEEP_SCHEMA}}},
         "$.response_format.json_schema.schema"),
        (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP_SCHEMA}}]},
         "$.tools[0].function.parameters"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "extra": DEEP}]}]},
         "$.messages[0].content[0].extra"),
        (COMPLETIONS, {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": DEEP_SCHEMA}}},
         "$.response_format.json_schema.schema"),
        (RESPONSES, {"metadata": {"k": DEEP}}, "$.metadata.k"),
        (RESPONSES, {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi", "x": DEEP}]}]},
         "$.input[0].content[0].x"),
        (RESPONSES, {"tools": [{"type": "function", "name": "f", "parameters": DEEP_SCHEMA}]}, "$.tools[0].parameters"),
        (RESPONSES, {"text": {"format": {"type": "json_schema", "name": "s", "schema": DEEP_SCHEMA}}},
         "$.text.format.schema"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("$") else None,
)  # fmt: skip
def test_a_300_deep_value_in_any_field_is_400_naming_the_bound_and_where(stack, route, field, where):
    answer = _send(stack, route, {**BASES[route], **field})
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert error["code"] == "body_shape" and error["type"] == "invalid_request_error"
    assert "nesting depth bound (64)" in error["message"] and error["param"].startswith(where), error


def _tool(index: int) -> dict[str, Any]:
    """A tool as large as real agents send: 25 typed properties, enums, arrays of objects three levels down."""
    properties: dict[str, Any] = {
        f"option_{i}": {"type": "string", "description": f"Option {i} of tool {index}, " + "detail " * 10}
        for i in range(20)
    }
    properties["mode"] = {"type": "string", "enum": [f"mode_{i}" for i in range(30)]}
    properties["filters"] = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "field": {"type": "string"},
                "op": {"type": "string", "enum": ["eq", "ne", "lt", "gt", "in"]},
                "value": {
                    "type": "object",
                    "properties": {"text": {"type": "string"}, "n": {"type": "number"}},
                },
            },
            "required": ["field", "op"],
        },
    }
    return {
        "type": "function",
        "function": {
            "name": f"tool_{index}",
            "description": f"Tool number {index}. " + "It does a thing. " * 20,
            "parameters": {"type": "object", "properties": properties, "required": ["mode"]},
        },
    }


def _schema(levels: int) -> dict[str, Any]:
    """A structured-output schema nested ``levels`` objects down (each with an array beside it)."""
    schema: dict[str, Any] = {"type": "string"}
    for i in range(levels):
        schema = {
            "type": "object",
            "properties": {"child": schema, f"tags_{i}": {"type": "array", "items": {"type": "string"}}},
            "required": ["child"],
        }
    return schema


LARGE = {
    "twelve tools with large schemas": {"messages": USER, "tools": [_tool(i) for i in range(12)]},
    "a structured-output schema twelve objects deep": {
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": _schema(12)}},
    },
    "a conversation of 400 turns": {
        "messages": [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: what is {i} + {i}?"}
            for i in range(400)
        ]
    },
}


@pytest.mark.parametrize("case", sorted(LARGE))
def test_real_world_large_bodies_pass(stack, case):
    answer = _send(stack, CHAT, {**LARGE[case], "max_tokens": 4, "reasoning_effort": "low"})
    assert answer.status_code == 200, (case, answer.text[:500])
    assert answer.json()["choices"][0]["message"] is not None
