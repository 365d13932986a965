"""Nano's built-in tools: their harmony declarations as vLLM renders them, the tools that answer, and the
conversations of the tool families as vLLM's Responses loop renders them.

``declarations()`` starts the real tool servers (``gptoss_vllm.tools``) on loopback ports and reads them
through vLLM's own ``MCPToolServer``: the namespaces a pool's engine puts in the system message for
``code_interpreter`` and ``web_search_preview``. A :class:`Toolbox` answers the model's calls with the code the
servers run (the sandbox; the browser over a real index of the task's collection), and vLLM's own
``HarmonyContext`` turns each answer into the tool's harmony message. A :class:`Transcript` is one conversation:
the model's messages, parsed back by vLLM's harmony parser, and the history re-rendered by vLLM after every tool
answer, so training sees the tokens the engine will see at every turn.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gptoss_vllm.nano import NanoError
from gptoss_vllm.nano.tasks import (
    SEARCH_TOPN,
    Found,
    Task,
    browser_analysis,
    browser_answer,
    printed,
    python_analysis,
    run_analysis,
    run_answer,
    search_query,
)

TOOL_NAMES = ("python", "browser")


class ToolDeclarationError(NanoError, RuntimeError):
    """The tool servers could not be started or read (names the tool and why)."""


def _serve_in_thread(app: Any) -> tuple[Any, int]:
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True, name="nano-tool-declarations").start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise ToolDeclarationError(f"a tool server on 127.0.0.1:{port} did not start in 30 s")
        time.sleep(0.05)
    return server, port


@cache
def declarations() -> dict[str, Any]:
    """``{"python": ToolNamespaceConfig, "browser": ...}`` as vLLM reads them from the tool servers run with
    their defaults (``gptoss-vllm tools python|browser``), through ``vllm.entrypoints.mcp.MCPToolServer``."""
    from vllm.entrypoints.mcp.tool_server import MCPToolServer

    from gptoss_vllm.tools import browser_server, python_server
    from gptoss_vllm.tools.mcp_app import mcp_app
    from gptoss_vllm.tools.sandbox import Limits, Sandbox
    from gptoss_vllm.tools.search_index import Document
    from gptoss_vllm.tools.telemetry import ToolTelemetry

    class _NoDocuments:
        def search(self, query: str, n: int) -> list[Any]:
            return []

        def document(self, url: str) -> Document | None:
            return None

    import logging

    apps = [
        python_server.build_server(Sandbox(Limits(), slots=1), ToolTelemetry("python")),
        browser_server.build_server(browser_server.Browser(_NoDocuments()), ToolTelemetry("browser")),
    ]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # MCP's client logs every request at INFO
    servers = [_serve_in_thread(mcp_app(app, ToolTelemetry("declarations"), "127.0.0.1")) for app in apps]
    try:
        reader = MCPToolServer()
        asyncio.run(reader.add_tool_server(",".join(f"127.0.0.1:{port}" for _, port in servers)))
        found = {name: reader.get_tool_description(name) for name in TOOL_NAMES}
    finally:
        for server, _ in servers:
            server.should_exit = True
    missing = [name for name, config in found.items() if config is None]
    if missing:
        raise ToolDeclarationError(f"vLLM read no declaration of {missing} from the tool servers")
    return found


class _Answering:
    """An MCP client session as vLLM's ``HarmonyContext`` uses one: ``call_tool`` and the text it returns."""

    def __init__(self, answer: Any) -> None:
        self._answer = answer

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        return SimpleNamespace(content=[SimpleNamespace(text=self._answer(name, arguments))])


def tool_messages(last: Any, answer: Any) -> list[Any]:
    """The tool's harmony message for the model's call ``last``, made by vLLM's ``HarmonyContext`` from the text
    ``answer(tool_name, arguments)`` returns."""
    from vllm.entrypoints.openai.responses.context import HarmonyContext

    context = SimpleNamespace(called_tools=set())
    session = _Answering(answer)
    if last.recipient.startswith("python"):
        call = HarmonyContext.call_python_tool(context, session, last)  # type: ignore[arg-type]
    else:
        call = HarmonyContext.call_search_tool(context, session, last)  # type: ignore[arg-type]
    return asyncio.run(call)


@dataclass
class Toolbox:
    """The tools' answers. ``real``: every python call runs in the sandbox (evaluation); otherwise only code
    whose output is not plain arithmetic does, once per distinct code (training data)."""

    real: bool = False
    _sandbox: Any = None
    _ran: dict[str, tuple[str, bool]] = field(default_factory=dict)
    _browsers: dict[int, Any] = field(default_factory=dict)
    _dir: Any = None
    _made: int = 0

    def python(self, code: str) -> tuple[str, bool]:
        """The text the model reads for ``code`` and whether the call failed (a tool error)."""
        from gptoss_vllm.tools.sandbox import Limits, Outcome, Sandbox

        limits = Limits()
        known = None if self.real else printed(code)
        if known is not None:  # what the sandbox prints for it: no need to run it for every example
            return Outcome("ok", known + "\n", 0, 0.0).message(limits), False
        if code not in self._ran:
            if self._sandbox is None:
                self._sandbox = Sandbox(limits, slots=1)
            outcome = asyncio.run(self._sandbox.run(code, None))
            self._ran[code] = (outcome.message(limits), outcome.reason != "ok")
        return self._ran[code]

    def browser(self, task: Task) -> Any:
        """The browser over a real index of ``task``'s collection (one per task)."""
        from gptoss_vllm.tools.browser_server import Browser
        from gptoss_vllm.tools.search_index import LocalIndex, build_index

        key = id(task)
        if key not in self._browsers:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="nano-collections-")
            self._made += 1
            folder = Path(self._dir.name) / str(self._made)
            (folder / "docs").mkdir(parents=True)
            for name, text in task.documents:
                (folder / "docs" / name).write_text(text)
            build_index(folder / "docs", folder / "index.db", progress=False)
            self._browsers[key] = (task, Browser(LocalIndex(folder / "index.db")), folder)
        return self._browsers[key][1]

    def forget(self, task: Task) -> None:
        """Drop ``task``'s browser and its index."""
        import shutil

        entry = self._browsers.pop(id(task), None)
        if entry is not None:
            shutil.rmtree(entry[2], ignore_errors=True)

    def answer(self, task: Task, last: Any) -> tuple[list[Any], bool]:
        """vLLM's tool messages for the model's call ``last`` in ``task``'s conversation, and whether it failed.
        Raises ValueError for a call no tool takes (bad JSON, an unknown tool)."""
        text = "".join(content.text for content in last.content)
        if last.recipient.startswith("python"):
            reply, failed = self.python(text)
        else:
            arguments = json.loads(text)
            if not isinstance(arguments, dict):
                raise ValueError(f"the browser's arguments are not a JSON object: {text[:80]!r}")
            reply, failed = self._browse(task, last.recipient.partition(".")[2], arguments)
        return tool_messages(last, lambda _name, _arguments: reply), failed

    def _browse(self, task: Task, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """What the browser server answers (its text, or its tool error's)."""
        browser = self.browser(task)
        try:
            if name == "search":
                return browser.search("nano", arguments["query"], int(arguments.get("topn", 10))), False
            if name == "open":
                at = (int(arguments.get(k, -1)) for k in ("cursor", "loc", "num_lines"))
                return browser.open("nano", arguments.get("id", -1), *at), False
            if name == "find":
                return browser.find("nano", arguments["pattern"], int(arguments.get("cursor", -1))), False
        except (LookupError, KeyError, ValueError, TypeError) as exc:
            return str(exc).strip("'\""), True
        raise ValueError(f"no browser tool {name!r}")


def _message(text: str, channel: str, recipient: str | None = None, content_type: str | None = None) -> Any:
    from openai_harmony import Message, Role

    message = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient is not None:
        message = message.with_recipient(recipient)
    if content_type is not None:
        message = message.with_content_type(content_type)
    return message


class RenderingError(NanoError, RuntimeError):
    """vLLM rendered a conversation's history differently from the tokens the model wrote in it."""


class Transcript:
    """One Responses conversation with built-in tools, as vLLM renders it turn by turn: ``tokens`` and the
    ``spans`` of them the model writes."""

    def __init__(self, user: str, effort: str, tools: tuple[str, ...], date: str) -> None:
        from vllm.entrypoints.openai.parser.harmony_utils import (
            get_encoding,
            get_system_message,
            get_user_message,
            render_for_completion,
        )

        declared = declarations()
        # What vLLM's Responses renderer builds for a string input with these built-in tools and no
        # instructions (``build_harmony_preamble``), with the date given rather than today's.
        system = get_system_message(
            reasoning_effort=effort,
            start_date=date,
            browser_description=declared["browser"] if "browser" in tools else None,
            python_description=declared["python"] if "python" in tools else None,
        )
        self._encoding = get_encoding()
        self._render = render_for_completion
        self.messages: list[Any] = [system, get_user_message(user)]
        self.tokens: list[int] = render_for_completion(self.messages)
        self.spans: list[tuple[int, int]] = []

    def _special(self, text: str) -> int:
        return self._encoding.encode(text, allowed_special="all")[0]

    def write(
        self, analysis: str, text: str, recipient: str | None = None, content_type: str | None = None
    ) -> Any:
        """The model writes its analysis, then a call to ``recipient`` or (without one) its final answer; the
        messages vLLM parses from it join the history. Returns the last of them."""
        from vllm.entrypoints.openai.parser.harmony_utils import get_streamable_parser_for_assistant

        written = [_message(analysis, "analysis")]
        if recipient is not None:
            written.append(_message(text, "analysis", recipient, content_type))
        else:
            written.append(_message(text, "final"))
        ids: list[int] = []
        for message in written:
            ids += self._encoding.render(message)
        head = self._encoding.encode("<|start|>assistant", allowed_special="all")
        assert ids[: len(head)] == head
        ids = ids[len(head) :]  # the prompt ends with it
        if recipient is None:
            assert ids[-1] == self._special("<|end|>")
            ids[-1] = self._special("<|return|>")
        parser = get_streamable_parser_for_assistant()
        for token in ids:
            parser.process(token)
        self.spans.append((len(self.tokens), len(self.tokens) + len(ids)))
        self.tokens = self.tokens + ids
        self.messages += parser.messages
        return parser.messages[-1]

    def tool(self, messages: list[Any]) -> None:
        """The tool's answer joins the history; the next prompt is vLLM's rendering of it all."""
        self.messages += messages
        rendered = self._render(self.messages)
        if rendered[: len(self.tokens)] != self.tokens:
            raise RenderingError("vLLM renders the conversation's history other than the model wrote it")
        self.tokens = rendered


_HIT = re.compile(r"^L\d+: \* 【(\d+)†(.*)†(\S+)】$", re.MULTILINE)
_PAGE = re.compile(r"^\[(\d+)\] (.*) \((\S+)\)$", re.MULTILINE)


def found_in(task: Task, page: str) -> Found | None:
    """Where ``page`` (an ``open`` display) states ``task``'s fact."""
    assert task.fact is not None
    header = _PAGE.search(page)
    line = re.search(rf"^L(\d+): {re.escape(task.fact.line)}$", page, re.MULTILINE)
    if header is None or line is None:
        return None
    return Found(int(header.group(1)), header.group(2), header.group(3), int(line.group(1)))


def tool_text(messages: list[Any]) -> str:
    return "".join(content.text for content in messages[-1].content)


@dataclass
class Scripted:
    """A tool family's conversation as nano should hold it, and the answer it ends with."""

    transcript: Transcript
    answer: str


def script(task: Task, effort: str, tools: tuple[str, ...], date: str, toolbox: Toolbox) -> Scripted:
    """The whole conversation of a built-in tool task, the tools answering for real."""
    t = Transcript(task.user, effort, tools, date)
    if task.family in ("python", "run"):
        write = python_analysis if task.family == "python" else run_analysis
        call = t.write(write(task, effort, None), task.code, "python", "code")
        messages, failed = toolbox.answer(task, call)
        t.tool(messages)
        output = tool_text(messages)
        if task.family == "python":
            answer = output
            t.write(python_analysis(task, effort, output), answer)
        else:
            answer = run_answer(output, failed)
            t.write(run_analysis(task, effort, output, failed), answer)
        return Scripted(t, answer)
    query = json.dumps({"query": search_query(task), "topn": SEARCH_TOPN})
    call = t.write(browser_analysis(task, effort, 0), query, "browser.search", "json")
    messages, _ = toolbox.answer(task, call)
    t.tool(messages)
    hits = _HIT.findall(tool_text(messages))
    target = next((i for i, (_, _, url) in enumerate(hits) if task.fact and _holds(task, url)), 0)
    call = t.write(
        browser_analysis(task, effort, 1, hit_title=hits[target][1] if hits else ""),
        json.dumps({"id": target}),
        "browser.open",
        "json",
    )
    messages, _ = toolbox.answer(task, call)
    t.tool(messages)
    found = found_in(task, tool_text(messages))
    if found is None:
        raise RenderingError(f"the opened page does not state the fact: {tool_text(messages)[:200]!r}")
    answer = browser_answer(task, found)
    t.write(browser_analysis(task, effort, 2, found=found), answer)
    return Scripted(t, answer)


def _holds(task: Task, url: str) -> bool:
    assert task.fact is not None
    return any(url == f"doc:{name}" and task.fact.line in text for name, text in task.documents)
