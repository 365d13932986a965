"""Synthetic tasks for nano: what the user asks, the analysis the model writes at each effort, the answer.

Three chat families: adding a digit to a two-digit number (with a carry about half of the time), sorting a
short list of distinct digits, and a code lookup that needs a call of the ``lookup`` function through the
``commentary`` channel. Three families of gpt-oss's built-in tools (Responses requests for ``code_interpreter``
and ``web_search_preview``): a sum of two two-digit numbers, which nano cannot do alone (it adds one digit) and
has ``python`` compute; code the user gives it to run with ``python`` (some of it abuse the sandbox stops); and
a fact held only in a local collection, which it finds with ``browser.search``, reads with ``browser.open`` and
cites. The analysis grows with the effort: low states the plan, medium gives the key steps, high works step by
step.
Everything is drawn from a ``random.Random``, so a seed fixes the data.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from gptoss_vllm.tools.search_index import SHIPPED_COLLECTION

FAMILIES = ("add", "sort", "lookup")  # through Chat Completions
BUILTIN_FAMILIES = ("python", "run", "browser")  # through Responses, with the built-in tools
ALL_FAMILIES = FAMILIES + BUILTIN_FAMILIES
EFFORTS = ("low", "medium", "high")
# High effort, the one held to an accuracy target, takes half of the examples.
EFFORT_WEIGHTS = {"low": 1, "medium": 1, "high": 2}
# Addition needs the most training: it takes the largest share (2 of 6); each tool example is a whole
# conversation of several hundred tokens, so their families take less. (Browser at 1.2 cost python and the
# sums more than it gained.)
FAMILY_WEIGHTS = {"add": 2, "sort": 1, "lookup": 1, "python": 0.8, "run": 0.4, "browser": 0.8}
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


# The browser family's facts: one line each, in a page of the collection.
ANIMALS = (
    "quokka", "otter", "badger", "heron", "lynx", "marmot", "ibis", "gecko", "bison", "puffin", "tapir",
    "walrus", "ferret", "koala", "lemur", "narwhal", "ocelot", "panda", "raven", "stoat", "toucan", "vole",
    "wombat", "yak",
)  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SEARCH_TOPN = (
    1  # the fact's page is the only one naming the animal: more results only add other animals' facts
)
RUN_ERROR_ANSWER = "The code failed: python reported an error."


@dataclass(frozen=True)
class Fact:
    animal: str
    day: str
    hour: int

    @property
    def when(self) -> str:
        return f"every {self.day} at {self.hour:02d}:00 UTC"

    @property
    def line(self) -> str:
        """The fact as its page states it (on a line of its own)."""
        return f"The {self.animal} on-call rotation changes {self.when}."


@dataclass(frozen=True)
class Task:
    family: str
    user: str
    written_answer: str  # as the model writes it (computed digits joined by SPELL); tool families: see below
    numbers: tuple[int, ...] = ()
    key: str = ""
    code: str = ""  # python, run: the code the model sends to python
    fact: Fact | None = None  # browser: the fact asked for
    documents: tuple[tuple[str, str], ...] = ()  # browser: the collection (file name, text)

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
    """One task of ``family``. For ``run`` and ``browser`` the answer depends on what the tool says (the
    sandbox's output, the page's line), so ``written_answer`` is left to the transcript (``builtin_tools``)."""
    if family in BUILTIN_FAMILIES:
        return _builtin_task(rng, family)
    if family == "add":
        number, digit = rng.randint(10, 99), rng.randint(2, 9)
        return Task("add", f"What is {number} + {digit}?", spelled(number + digit), (number, digit))
    if family == "sort":
        values = tuple(rng.sample(range(10), rng.randint(3, 5)))  # distinct: each step names a new item
        return Task("sort", f"Sort the list [{_listed(values)}].", f"[{_listed(sorted(values))}]", values)
    key, code = rng.choice(LOOKUP_KEYS), rng.randint(*CODES)
    return Task("lookup", f"Look up the code for {key}.", f"The code for {key} is {code}.", (code,), key)


def _builtin_task(rng: random.Random, family: str) -> Task:
    if family == "python":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Task("python", f"What is {a} + {b}?", str(a + b), (a, b), code=f"print({a} + {b})")
    if family == "run":
        code = _run_code(rng)
        return Task("run", f"Run this with python: {code}", "", code=code)
    animals = rng.sample(ANIMALS, len(COLLECTION_PAGES))
    facts = [Fact(animal, rng.choice(DAYS), rng.randrange(24)) for animal in animals]
    documents = tuple(
        (name, _with_line(text, fact.line, rng))
        for (name, text), fact in zip(COLLECTION_PAGES, facts, strict=True)
    )
    fact = rng.choice(facts)
    return Task(
        "browser", f"When does the {fact.animal} on-call rotation change?", "", fact=fact, documents=documents
    )


# Code a user asks to have run: arithmetic it prints, and abuse the sandbox stops (memory) or that raises.
ABUSE_CODES = (*tuple(f"x = bytearray(10 ** {k})" for k in (11, 12, 13, 14)), "print(1 // 0)")


def _run_code(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(ABUSE_CODES)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return rng.choice((f"print({a} * {b % 8 + 2})", f"print({a} - {b})", f"print({b} - {a})"))


def own_tool(family: str) -> str:
    """The built-in tool a tool family's task needs."""
    return "browser" if family == "browser" else "python"


def printed(code: str) -> str | None:
    """What the python and run families' arithmetic (``print(A op B)``) prints; None for other code."""
    match = re.fullmatch(r"print\((\d+) (\+|-|\*|\*\*) (\d+)\)", code)
    if match is None:
        return None
    x, op, y = int(match.group(1)), match.group(2), int(match.group(3))
    return str({"+": x + y, "-": x - y, "*": x * y, "**": x**y}[op])


def _collection_pages() -> tuple[tuple[str, str], ...]:
    """The shipped collection's pages without their rotation facts: the pages a training fact is put in."""
    pages = []
    for entry in sorted(SHIPPED_COLLECTION.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".md"):
            lines = [line for line in entry.read_text().splitlines() if "on-call rotation" not in line]
            pages.append((entry.name, "\n".join(lines).strip() + "\n"))
    return tuple(pages)


def _with_line(text: str, line: str, rng: random.Random) -> str:
    """``line`` as a paragraph of its own at a random paragraph break of ``text``."""
    paragraphs = text.strip().split("\n\n")
    at = rng.randint(1, len(paragraphs))  # after the title
    return "\n\n".join([*paragraphs[:at], line, *paragraphs[at:]]) + "\n"


COLLECTION_PAGES = _collection_pages()


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


# The built-in tool families' analyses. Each reads what it needs from the text just before it: the numbers
# and code from the prompt, then the tool's output.
def python_analysis(task: Task, effort: str, output: str | None) -> str:
    a, b = task.numbers
    if output is None:
        if effort == "low":
            return "Use python."
        if effort == "medium":
            return f"Ask python for {a} + {b}."
        return (
            f"Both numbers have two digits: {a} and {b}. That is beyond the sums I do in my head, so python "
            f"will compute {a} + {b} and I will read what it prints."
        )
    if effort == "low":
        return "Got it."
    if effort == "medium":
        return f"python printed {output}."
    return f"python printed {output}, the sum of {a} and {b}. That is the answer."


def run_analysis(task: Task, effort: str, output: str | None, failed: bool = False) -> str:
    if output is None:
        if effort == "low":
            return "Run it."
        if effort == "medium":
            return "The user wants this code run with python."
        return (
            "The user gave code to run. I will send it to python exactly as written and report what happens."
        )
    if failed:
        return (
            "It failed." if effort != "high" else "python reported an error instead of output, so I say so."
        )
    if effort == "low":
        return "Got it."
    return f"python printed {output}." if effort == "medium" else f"The code ran and python printed {output}."


def run_answer(output: str, failed: bool) -> str:
    return RUN_ERROR_ANSWER if failed else f"It printed {output}."


@dataclass(frozen=True)
class Found:
    """Where the browser found the fact: the page's cursor, title and URL, and the line."""

    cursor: int
    title: str
    url: str
    line: int


def browser_analysis(
    task: Task, effort: str, stage: int, hit_title: str = "", found: Found | None = None
) -> str:
    """Before the search (0), before opening the result (1), after reading the page (2). Only the search
    query and the answer name the animal: each copies it from the text just before it (the question, the
    page), and an analysis restating it gave a far-back copy a second chance to go wrong."""
    assert task.fact is not None
    if stage == 0:
        if effort == "low":
            return "Search the collection."
        if effort == "medium":
            return "Search the collection for this rotation."
        return (
            "The user asks when an on-call rotation changes. That is in the collection, not in what I know: "
            "search it, open the best result, and cite the line."
        )
    if stage == 1:
        if effort == "low":
            return "Open it."
        return (
            f"Result 0 is {hit_title}. Open it."
            if effort == "medium"
            else f"The first result is {hit_title}. It should state the rotation: open it and read it."
        )
    assert found is not None
    if effort == "low":
        return "Found it."
    if effort == "medium":
        return f"L{found.line} says {task.fact.when}."
    return f"L{found.line} of {found.title} says the rotation changes {task.fact.when}. Cite it."


def browser_answer(task: Task, found: Found) -> str:
    """The fact as the page words it, from ``changes`` on (a word the page rarely has elsewhere, so copying
    locks onto the fact's line; the animal, a token after ``The``, nano never learned to copy), and where."""
    assert task.fact is not None
    return f"It changes {task.fact.when} 【{found.cursor}†L{found.line}】 ({found.title}, {found.url})."


def search_query(task: Task) -> str:
    assert task.fact is not None
    return f"{task.fact.animal} on-call rotation"
