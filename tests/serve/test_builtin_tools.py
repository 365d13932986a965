"""Built-in tools through the stack: deep offers python (the shared stack's tool server) and the browser
(started by serve, as the embedded default says), fast offers none. A
Responses request for code_interpreter reaches deep's engine, whose harmony system message declares the tool
(checked on the rendered token ids); the same request at an effort fast
serves is refused with 400 naming the tool; a function tool works in both.
``test_nano_tools.py`` has nano call them."""

from __future__ import annotations

import openai
import pytest
from openai_harmony import HarmonyEncodingName, Message, load_harmony_encoding

PYTHON = {"type": "code_interpreter", "container": {"type": "auto"}}
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "description": "Look a word up in the glossary",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
}


def _rendered(reply) -> str:
    from vllm.entrypoints.openai.parser.harmony_utils import render_for_completion

    messages = [Message.from_dict(m) for m in reply.model_extra["input_messages"]]
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS).decode(render_for_completion(messages))


def test_code_interpreter_reaches_the_pool_that_offers_python_and_is_refused_elsewhere(client, stack):
    asked = {"model": "gpt-oss-nano", "input": "What is 2**100?", "max_output_tokens": 16}
    show = {"enable_response_messages": True}
    reply = client.responses.with_raw_response.create(
        tools=[PYTHON, LOOKUP], reasoning={"effort": "high"}, extra_body=show, **asked
    )
    assert reply.headers["x-gptoss-pool"] == "deep"
    prompt = _rendered(reply.parse())
    system = prompt.split("<|end|>")[0]
    assert "## python" in system and "fresh sandbox" in system and "## browser" not in system
    assert "type lookup = (_: {" in prompt
    # The browser that serve started for deep (the embedded default's), over the shipped collection.
    browse = client.responses.create(
        tools=[{"type": "web_search_preview"}], reasoning={"effort": "high"}, extra_body=show, **asked
    )
    browsing = _rendered(browse).split("<|end|>")[0]
    assert "## browser" in browsing and "Tool for browsing." in browsing and "## python" not in browsing
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(tools=[PYTHON], reasoning={"effort": "low"}, **asked)
    error = refused.value.body.get("error", refused.value.body)
    assert error["code"] == "tool_not_offered" and error["param"] == "tools[0].type"
    assert "code_interpreter (the python tool)" in error["message"] and "'fast'" in error["message"]
    # A function tool needs no server: fast takes it.
    plain = client.responses.with_raw_response.create(tools=[LOOKUP], reasoning={"effort": "low"}, **asked)
    assert plain.headers["x-gptoss-pool"] == "fast" and plain.parse().status in ("completed", "incomplete")
