"""Nano's training sequences: prompts rendered by vLLM's own harmony code, completions in harmony channels.

The prompt of each example is built from the Chat Completions messages a client would send, through the
same vLLM functions the serving layer calls (system message with the effort and a date, developer message
with the tools, the conversation), so training sees exactly the tokens the engine will see. The completion
is ``analysis`` then ``final`` (or a ``commentary`` call of ``functions.lookup``). Digits the model computes
(joined by ``tasks.SPELL``) are written one token per digit: the text decodes the same and each token is one
step of the arithmetic; numbers read from the prompt keep the tokenizer's own tokens.

The built-in tool families are Responses conversations instead (``builtin_tools``): one sequence per task, the
whole tool loop as vLLM renders it, the loss on what the model writes in it.
"""

from __future__ import annotations

import datetime
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from gptoss_vllm.nano.tasks import (
    ABUSE_CODES,
    ALL_FAMILIES,
    ANIMALS,
    BUILTIN_FAMILIES,
    CODES,
    COLLECTION_PAGES,
    DAYS,
    EFFORT_WEIGHTS,
    EFFORTS,
    FAMILIES,
    FAMILY_WEIGHTS,
    LOOKUP_KEYS,
    LOOKUP_TOOL,
    SEARCH_TOPN,
    SPELL,
    Fact,
    Task,
    analysis,
    make_task,
    own_tool,
    search_query,
)

_SPELLED = re.compile(rf"(\d(?:{SPELL}\d)+)")
_SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")
TOOL_CALL_ID = "call_lookup_0"
BUILTIN_TOOLS = ("python", "browser")


@cache
def _encoding():  # type: ignore[no-untyped-def]
    from vllm.entrypoints.openai.parser.harmony_utils import get_encoding

    return get_encoding()


@cache
def _token_id(token: str) -> int:
    """The id of a string that is one token (a special token, a digit)."""
    return _encoding().encode(token, allowed_special="all")[0]


def decode_token(token: int) -> str:
    """The text of one token id."""
    return _encoding().decode([token])


def encode_text(text: str) -> list[int]:
    """Harmony tokens of ``text``: ``<|...|>`` are special tokens, digits joined by ``SPELL`` one token each."""
    enc = _encoding()
    ids: list[int] = []
    for i, part in enumerate(_SPECIAL.split(text)):
        if i % 2:
            ids.append(_token_id(part))
            continue
        for j, piece in enumerate(_SPELLED.split(part)):
            if j % 2:
                ids += [_token_id(d) for d in piece.split(SPELL)]
            elif piece:
                ids += enc.encode(piece, disallowed_special=())
    return ids


def chat_messages(task: Task, after_tool: bool) -> list[dict]:
    """The messages a client sends: the user's task, and for a lookup follow-up the call and its result."""
    messages: list[dict] = [{"role": "user", "content": task.user}]
    if after_tool:
        arguments = json.dumps({"key": task.key})
        call = {
            "id": TOOL_CALL_ID,
            "type": "function",
            "function": {"name": "lookup", "arguments": arguments},
        }
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": TOOL_CALL_ID, "content": task.tool_result},
        ]
    return messages


def prompt_ids(messages: list[dict], effort: str, with_tools: bool, date: str) -> list[int]:
    """Tokens of the prompt as vLLM's chat serving renders it for gpt-oss (OnlineRenderer's harmony path)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    from vllm.entrypoints.openai.parser.harmony_utils import (
        get_developer_message,
        get_system_message,
        parse_chat_inputs_to_harmony_messages,
        render_for_completion,
    )

    harmony = [get_system_message(reasoning_effort=effort, start_date=date, with_custom_tools=with_tools)]
    if with_tools:
        harmony.append(get_developer_message(tools=[ChatCompletionToolsParam.model_validate(LOOKUP_TOOL)]))
    harmony += parse_chat_inputs_to_harmony_messages(messages)
    return render_for_completion(harmony)


def responses_follow_up_ids(task: Task, effort: str, date: str) -> list[int]:
    """Tokens of a lookup follow-up as vLLM's Responses renderer builds it from the stored conversation: the
    first turn's reasoning stays in the history (a chat client does not send it back), then the call and the
    tool's result (``function_call_output``)."""
    from openai.types.responses import FunctionTool, ResponseFunctionToolCall
    from vllm.entrypoints.openai.parser.harmony_utils import (
        get_developer_message,
        get_system_message,
        render_for_completion,
    )
    from vllm.entrypoints.openai.responses.harmony import response_input_to_harmony

    tool = FunctionTool.model_validate({"type": "function", **LOOKUP_TOOL["function"], "strict": None})
    call = ResponseFunctionToolCall(
        type="function_call", call_id=TOOL_CALL_ID, name="lookup", arguments=json.dumps({"key": task.key})
    )
    reasoning = [{"type": "reasoning_text", "text": analysis(task, effort, False)}]
    items = [
        {"type": "message", "role": "user", "content": task.user},
        {"type": "reasoning", "id": "rs_0", "summary": [], "content": reasoning},
        call.model_dump(),
        {"type": "function_call_output", "call_id": TOOL_CALL_ID, "output": task.tool_result},
    ]
    harmony = [
        get_system_message(reasoning_effort=effort, start_date=date, with_custom_tools=True),
        get_developer_message(tools=[tool]),
    ]
    harmony += [response_input_to_harmony(item, [call]) for item in items]
    return render_for_completion(harmony)


def completion_ids(task: Task, effort: str, after_tool: bool) -> list[int]:
    """What the assistant writes after ``<|start|>assistant``, ending in ``<|return|>`` or ``<|call|>``."""
    ids = encode_text("<|channel|>analysis<|message|>" + analysis(task, effort, after_tool))
    ids += encode_text("<|end|><|start|>assistant")
    if task.family == "lookup" and not after_tool:
        ids += encode_text("<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>")
        ids += encode_text(json.dumps({"key": task.key}))
        return ids + encode_text("<|call|>")
    return ids + encode_text(f"<|channel|>final<|message|>{task.written_answer}<|return|>")


@dataclass(frozen=True)
class Example:
    tokens: tuple[int, ...]
    completion_start: int  # the first token the model writes
    family: str
    effort: str
    spans: tuple[tuple[int, int], ...] = ()  # what the model writes (the loss covers these); () = to the end

    @property
    def written(self) -> tuple[tuple[int, int], ...]:
        return self.spans or ((self.completion_start, len(self.tokens)),)


def random_date(rng: random.Random) -> str:
    day = datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randrange(11 * 365))
    return day.isoformat()


def examples_for(
    task: Task, effort: str, with_tools: bool, date: str, responses: bool = False
) -> list[Example]:
    """The task's examples; a lookup's follow-up as a chat client sends it, or (``responses``) as the
    Responses store renders it."""
    stages = (False, True) if task.family == "lookup" else (False,)
    out = []
    for after_tool in stages:
        if after_tool and responses:
            prompt = responses_follow_up_ids(task, effort, date)
        else:
            prompt = prompt_ids(chat_messages(task, after_tool), effort, with_tools, date)
        completion = completion_ids(task, effort, after_tool)
        out.append(Example(tuple(prompt + completion), len(prompt), task.family, effort))
    return out


def builtin_tools_for(family: str, rng: random.Random) -> tuple[str, ...]:
    """The built-in tools a request declares: the family's own, with the other one in five (the declarations
    are long: each costs hundreds of tokens a step)."""
    return tuple(sorted(set(BUILTIN_TOOLS) if rng.random() < 0.2 else {own_tool(family)}))


@cache
def _training_toolbox() -> Any:
    from gptoss_vllm.nano.builtin_tools import Toolbox

    return Toolbox()


def builtin_example(
    task: Task, effort: str, tools: tuple[str, ...], date: str, toolbox: Any = None
) -> Example:
    """A built-in tool task's whole conversation as one sequence; the loss covers what the model writes."""
    from gptoss_vllm.nano.builtin_tools import script

    toolbox = toolbox or _training_toolbox()
    try:
        transcript = script(task, effort, tools, date, toolbox).transcript
    finally:
        toolbox.forget(task)
    spans = tuple(transcript.spans)
    return Example(tuple(transcript.tokens), spans[0][0], task.family, effort, spans)


def sample_examples(rng: random.Random) -> list[Example]:
    """One random task at an effort drawn by ``EFFORT_WEIGHTS`` (lookup always with its tool, its follow-up
    half of the time as the Responses store renders it; add and sort with the tool half of the time; the
    built-in tool families with theirs, and the other built-in tool one time in five)."""
    family = rng.choices(ALL_FAMILIES, weights=[FAMILY_WEIGHTS[f] for f in ALL_FAMILIES])[0]
    effort = rng.choices(EFFORTS, weights=[EFFORT_WEIGHTS[e] for e in EFFORTS])[0]
    task = make_task(rng, family)
    if family in BUILTIN_FAMILIES:
        return [builtin_example(task, effort, builtin_tools_for(family, rng), random_date(rng))]
    with_tools = family == "lookup" or rng.random() < 0.5
    responses = family == "lookup" and rng.random() < 0.5
    return examples_for(task, effort, with_tools, random_date(rng), responses)


def vocabulary(seed: int = 0) -> list[int]:
    """Every token id nano's data can contain, sorted: the templates (from rendered samples), every prompt
    text, every code in both tokenisations, every date."""
    enc = _encoding()
    rng = random.Random(seed)
    ids: set[int] = set()
    for family in FAMILIES:
        for _ in range(30):
            task = make_task(rng, family)
            for effort in EFFORTS:
                for with_tools in (True, False) if family != "lookup" else (True,):
                    date = random_date(rng)
                    for responses in (False, True) if family == "lookup" else (False,):
                        for example in examples_for(task, effort, with_tools, date, responses):
                            ids.update(example.tokens)
    for family in BUILTIN_FAMILIES:
        for i in range(30):
            task = make_task(rng, family)
            for effort in EFFORTS:
                tools = ("python", "browser") if i % 2 else builtin_tools_for(family, rng)
                ids.update(builtin_example(task, effort, tools, random_date(rng)).tokens)
    toolbox = _training_toolbox()
    texts = [f"What is {a} + {b}?" for a in range(10, 100) for b in range(10)]
    # Every number a sum, product, difference or square can have: o200k's runs of up to three digits.
    texts += [str(n) for n in range(-1000, 20000)] + [f"{n:03d} {n % 100:02d}" for n in range(1000)]
    texts += [toolbox.python(code)[0] for code in ABUSE_CODES]
    texts += [Fact(a, d, h).line for a in ANIMALS for d in DAYS for h in range(24)]
    for animal in ANIMALS:
        task = Task(
            "browser", f"When does the {animal} on-call rotation change?", "", fact=Fact(animal, "Monday", 0)
        )
        texts += [task.user, json.dumps({"query": search_query(task), "topn": SEARCH_TOPN})]
    texts += [text for _, text in COLLECTION_PAGES] + [f"L{n}: " for n in range(60)]
    for key in LOOKUP_KEYS:
        task = Task("lookup", f"Look up the code for {key}.", f"The code for {key} is 100.", (100,), key)
        texts += [task.user, json.dumps({"key": key})]
        for effort in EFFORTS:
            ids.update(encode_text(analysis(task, effort, False)) + encode_text(analysis(task, effort, True)))
    texts += [f"The code for x is {n}. {json.dumps({'code': n})}" for n in range(CODES[0], CODES[1] + 1)]
    day = datetime.date(2025, 1, 1)
    while day.year < 2036:
        texts.append(f"Current date: {day.isoformat()}")
        day += datetime.timedelta(days=1)
    for text in texts:
        ids.update(enc.encode(text, disallowed_special=()))
    return sorted(ids)
