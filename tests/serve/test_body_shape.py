"""The body shape scan (``gptoss_vllm.serve.body_shape``) against a reference that parses the body and walks it:
for any JSON value Hypothesis makes, the lexical scan finds a bound passed exactly when the parsed value passes
one, and names one that the value does pass; the paths it reports, and the escapes and brackets inside strings
that must not count."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_vllm.serve.body_shape import ShapeLimits, shape_error

# The word bound is a heuristic of the tokenizer's splitting: it has explicit cases below, not the reference.
SMALL = ShapeLimits(
    max_depth=4, max_object_members=3, max_array_items=3, max_string_bytes=8, max_word_bytes=1000
)


def _string_bounds(text: str, limits: ShapeLimits) -> set[str]:
    too_long = len(json.dumps(text, ensure_ascii=False).encode()) - 2 > limits.max_string_bytes
    return {"string length in bytes"} if too_long else set()


def _passed(value, limits: ShapeLimits, depth: int = 0) -> set[str]:
    """The bounds a parsed value passes, by walking it (the reference)."""
    found: set[str] = set()
    if isinstance(value, (dict, list)):
        if depth + 1 > limits.max_depth:
            found.add("nesting depth")
        if isinstance(value, dict):
            if len(value) > limits.max_object_members:
                found.add("members per object")
            children = [*value.values()]
            keys = list(value)
        else:
            if len(value) > limits.max_array_items:
                found.add("items per array")
            children, keys = value, []
        for key in keys:
            found |= _string_bounds(key, limits)
        for child in children:
            found |= _passed(child, limits, depth + 1)
    elif isinstance(value, str):
        found |= _string_bounds(value, limits)
    return found


tricky_text = st.text(alphabet=st.sampled_from('ab"\\{}[],:é\n 1'), max_size=12)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(tricky_text, children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_the_scan_agrees_with_a_walk_of_the_parsed_value(value):
    body = json.dumps(value, ensure_ascii=False).encode()
    passed = _passed(value, SMALL)
    error = shape_error(body, SMALL)
    if not passed:
        assert error is None, (body, error)
    else:
        assert error is not None and error.bound in passed, (body, passed, error)


def _deep_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_300_deep_schema_is_refused_naming_the_bound_and_where():
    body = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _deep_schema(300)}}
    }
    error = shape_error(json.dumps(body).encode(), ShapeLimits())
    assert error is not None and error.bound == "nesting depth" and error.limit == 64
    assert error.path.startswith("$.response_format.json_schema.schema.properties.a.properties")
    assert "more)" in error.path  # a long path keeps its ends and says how much it left out
    assert "nesting depth bound (64)" in str(error) and error.path in str(error)


@pytest.mark.parametrize(
    ("body", "bound", "path"),
    [
        ({"messages": [{"content": "x" * 9}]}, "string length in bytes", "$.messages[0].content"),
        ({"a": [1, 2, 3, 4]}, "items per array", "$.a[3]"),
        (
            {"tools": [{"p": {"k1": 1, "k2": 2, "k3": 3, "k 4": 4}}]},
            "members per object",
            "$.tools[0].p['k 4']",
        ),
        ({"a": {"b": [[{}]]}}, "nesting depth", "$.a.b[0][0]"),
    ],
)
def test_each_bound_names_the_path_where_it_was_passed(body, bound, path):
    error = shape_error(json.dumps(body).encode(), SMALL)
    assert error is not None and (error.bound, error.path) == (bound, path)


def test_brackets_commas_and_escaped_quotes_inside_strings_do_not_count():
    body = json.dumps({"a": '[[[[{{{{,,,,\\"]]]', "b": ["\\", '"', "]"]}).encode()
    assert shape_error(body, ShapeLimits(max_depth=2, max_array_items=3)) is None


@pytest.mark.parametrize(
    ("text", "over"),
    [
        ("x" * 11, True),
        ("x" * 10, False),
        ("Ünïcödé" * 2, True),  # 14 letters, 19 bytes
        ("!" * 11, True),
        (" " * 11, True),
        ("\n" * 11, True),
        ("words of a sentence, as many as you like " * 50, False),
        ("a1" * 100, False),  # digits break a run of letters
        ('"' * 5, False),  # each one sent as two bytes (\"): ten
    ],
)
def test_a_word_over_its_bound_is_refused_wherever_it_is(text, over):
    limits = ShapeLimits(max_word_bytes=10)
    for body in ({"m": text}, {text: 1}, [["a", text]]):
        error = shape_error(json.dumps(body, ensure_ascii=False).encode(), limits)
        assert (error is not None) == over, (text, body, error)
        assert error is None or error.bound == "word length in bytes"


def test_real_bodies_pass_the_defaults():
    limits = ShapeLimits()
    conversation = {"messages": [{"role": "user", "content": "word " * 200} for _ in range(2000)]}
    token_ids = {"prompt": list(range(131072))}
    schema = {"type": "json_schema", "json_schema": {"name": "deep", "schema": _deep_schema(20)}}
    for body in (conversation, token_ids, {"response_format": schema}):
        assert shape_error(json.dumps(body).encode(), limits) is None
