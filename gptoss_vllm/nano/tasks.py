"""Synthetic tasks for nano: what the user asks, the analysis the model writes at each effort, the answer.

Four families: two-digit addition with carries, reversing and sorting short digit lists, and a code lookup
that needs a call of the ``lookup`` function through the ``commentary`` channel. The analysis grows with the
effort: low states the plan, medium gives the key steps, high works step by step and restates the result.
Everything is drawn from a ``random.Random``, so a seed fixes the data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

FAMILIES = ("add", "reverse", "sort", "lookup")
EFFORTS = ("low", "medium", "high")

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
    answer: str
    numbers: tuple[int, ...] = ()
    key: str = ""

    @property
    def tool_result(self) -> str:
        """What the lookup function returns for this task (lookup family only)."""
        return json.dumps({"code": self.numbers[0]})


def _listed(values: list[int] | tuple[int, ...]) -> str:
    return ", ".join(map(str, values))


def make_task(rng: random.Random, family: str) -> Task:
    if family == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Task("add", f"What is {a} + {b}?", str(a + b), (a, b))
    if family in ("reverse", "sort"):
        values = tuple(rng.randint(0, 9) for _ in range(rng.randint(3, 5)))
        result = values[::-1] if family == "reverse" else tuple(sorted(values))
        verb = "Reverse" if family == "reverse" else "Sort"
        return Task(family, f"{verb} the list [{_listed(values)}].", f"[{_listed(result)}]", values)
    key, code = rng.choice(LOOKUP_KEYS), rng.randint(100, 999)
    return Task("lookup", f"Look up the code for {key}.", f"The code for {key} is {code}.", (code,), key)


def analysis(task: Task, effort: str, after_tool: bool = False) -> str:
    """The ``analysis`` message at ``effort`` (for lookup: before the call, or after the tool answered)."""
    if task.family == "add":
        return _add_analysis(task, effort)
    if task.family in ("reverse", "sort"):
        return _list_analysis(task, effort)
    return _lookup_analysis(task, effort, after_tool)


def _add_analysis(task: Task, effort: str) -> str:
    a, b = task.numbers
    total = a + b
    if effort == "low":
        return "Add the two numbers."
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    if effort == "medium":
        return (
            f"Ones: {a % 10} + {b % 10} = {ones}. Tens: {a // 10} + {b // 10} + {carry} = {tens}. So {total}."
        )
    steps = [
        f"We need {a} + {b}.",
        f"Ones place: {a % 10} + {b % 10} = {ones}, write {ones % 10} and carry {carry}.",
        f"Tens place: {a // 10} + {b // 10} + {carry} = {tens}, write {tens % 10} and carry {tens // 10}.",
    ]
    if tens >= 10:
        steps.append(f"Hundreds place: the carry gives {tens // 10}.")
    steps.append(f"Reading the written digits gives {total}. So {a} + {b} = {total}.")
    return " ".join(steps)


def _list_analysis(task: Task, effort: str) -> str:
    values = list(task.numbers)
    if task.family == "reverse":
        if effort == "low":
            return "Reverse the order."
        result = values[::-1]
        if effort == "medium":
            return f"From the end: {_listed(result)}."
        steps = [f"The list has {len(values)} items: {_listed(values)}.", f"The last item is {values[-1]}."]
        steps += [f"Before it comes {v}." for v in values[-2::-1]]
        steps.append(f"Reading from the end gives {_listed(result)}.")
        return " ".join(steps)
    if effort == "low":
        return "Sort in ascending order."
    result = sorted(values)
    if effort == "medium":
        return f"In order: {_listed(result)}."
    steps, left = [f"Items: {_listed(values)}."], list(values)
    while len(left) > 1:
        smallest = min(left)
        left.remove(smallest)
        steps.append(f"Smallest is {smallest}, leaving {_listed(left)}.")
    steps.append(f"Last is {left[0]}. Sorted: {_listed(result)}.")
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
