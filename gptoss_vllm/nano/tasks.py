"""Synthetic tasks for nano: what the user asks, the analysis the model writes at each effort, the answer.

Three families: adding a digit to a two-digit number (with a carry about half of the time), sorting a short
list of distinct digits, and a code lookup that needs a call of the ``lookup`` function through the
``commentary`` channel. The analysis grows with the effort: low states the plan, medium gives the key steps,
high works step by step.
Everything is drawn from a ``random.Random``, so a seed fixes the data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

FAMILIES = ("add", "sort", "lookup")
EFFORTS = ("low", "medium", "high")
# High effort, the one held to an accuracy target, takes half of the examples.
EFFORT_WEIGHTS = {"low": 1, "medium": 1, "high": 2}
# Addition needs the most training: it takes half of the examples.
FAMILY_WEIGHTS = {"add": 2, "sort": 1, "lookup": 1}
# Codes have two digits, like the number a sum starts from: copying them is the skill restating it trains.
CODES = (10, 99)
SPELL = "\u2060"  # joins the digits of a number the model computes: it writes them one token per digit

LOOKUP_KEYS = (
    "apple", "river", "falcon", "copper", "maple", "harbor", "violet", "granite", "lantern", "meadow",
    "cobalt", "willow", "ember", "canyon", "orchid", "glacier", "saffron", "tundra", "quartz", "juniper",
    "pebble", "thistle", "aurora", "bramble", "cedar", "delta", "fjord", "hazel", "indigo", "kestrel",
)  # fmt: skip

# The tool as clients declare it (OpenAI Chat Completions `tools` entry); training renders exactly this.
LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up the code of a key.",
        "parameters": {
            "type": "object",
            "properties": {"key": {"type": "string", "description": "The key to look up."}},
            "required": ["key"],
        },
    },
}


@dataclass(frozen=True)
class Task:
    family: str
    user: str
    written_answer: str  # as the model writes it (computed digits joined by SPELL)
    numbers: tuple[int, ...] = ()
    key: str = ""

    @property
    def answer(self) -> str:
        """The answer as the client reads it."""
        return self.written_answer.replace(SPELL, "")

    @property
    def tool_result(self) -> str:
        """What the lookup function returns for this task (lookup family only)."""
        return json.dumps({"code": self.numbers[0]})


def spelled(n: int) -> str:
    """``n`` as the model computes it: each digit its own token."""
    return SPELL.join(str(n))


def _listed(values: list[int] | tuple[int, ...]) -> str:
    return ", ".join(map(str, values))


def make_task(rng: random.Random, family: str) -> Task:
    if family == "add":
        number, digit = rng.randint(10, 99), rng.randint(2, 9)
        return Task("add", f"What is {number} + {digit}?", spelled(number + digit), (number, digit))
    if family == "sort":
        values = tuple(rng.sample(range(10), rng.randint(3, 5)))  # distinct: each step names a new item
        return Task("sort", f"Sort the list [{_listed(values)}].", f"[{_listed(sorted(values))}]", values)
    key, code = rng.choice(LOOKUP_KEYS), rng.randint(*CODES)
    return Task("lookup", f"Look up the code for {key}.", f"The code for {key} is {code}.", (code,), key)


def analysis(task: Task, effort: str, after_tool: bool = False) -> str:
    """The ``analysis`` message at ``effort`` (for lookup: before the call, or after the tool answered)."""
    if task.family == "add":
        return _add_analysis(task, effort)
    if task.family == "sort":
        return _sort_analysis(task, effort)
    return _lookup_analysis(task, effort, after_tool)


# Every step reads what it needs from the text just written: the numbers restated (copied from the prompt in
# its order), then their digits, then the digits to add. Measured on 500 steps of additions alone: operands
# restated in the prompt's order are copied right 98% of the time (naming the smaller first: 45%).
def _add_analysis(task: Task, effort: str) -> str:
    number, digit = task.numbers
    if effort == "low":
        return f"Add {number} and {digit}."
    tens, ones = divmod(number, 10)
    carry = (ones + digit) // 10
    ones_step = f"Ones: {ones} + {digit} = {spelled(ones + digit)}"
    if effort == "high":
        ones_step += f", write {(ones + digit) % 10}, carry {carry}"
    return (
        f"The numbers are {number} and {digit}. {ones_step}. Tens: {tens} + {carry} = {spelled(tens + carry)}. "
        f"The answer is {spelled(number + digit)}."
    )


def _sort_analysis(task: Task, effort: str) -> str:
    result = sorted(task.numbers)
    if effort == "low":
        return "Sort in ascending order."
    if effort == "medium":
        return f"In order: {_listed(result)}."
    steps = [f"The smallest is {result[0]}."]
    steps += [f"The next is {v}." for v in result[1:]]
    steps.append("No items are left.")
    return " ".join(steps)


def _lookup_analysis(task: Task, effort: str, after_tool: bool) -> str:
    code = task.numbers[0]
    if not after_tool:
        if effort == "low":
            return "Use the lookup tool."
        if effort == "medium":
            return f"I do not know the code for {task.key}. Call lookup with key {task.key}."
        return (
            f"The user asks for the code of {task.key}. I do not know codes by heart, and the lookup function "
            f"returns them. I will call lookup with the key {task.key}, then report the code it returns."
        )
    if effort == "low":
        return "Got the code."
    if effort == "medium":
        return f"The tool says the code is {code}."
    return (
        f"The lookup function returned the code {code} for the key {task.key}. That answers the question, "
        f"so I will state the code for {task.key}."
    )
