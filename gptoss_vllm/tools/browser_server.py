"""gpt-oss's ``browser`` tool as an MCP server over SSE: ``search``, ``open`` and ``find`` over a search backend.

The tools take the arguments of harmony's built-in browser (``search(query, topn)``, ``open(id, cursor, loc,
num_lines)``, ``find(pattern, cursor)``) and answer in its display: each page the session opens gets a cursor,
``[cursor] title (url)``, a line range, and lines numbered ``L0:``; a search result page lists its links as
``【id†title†url】``, which ``open(id)`` follows. A session's pages (vLLM's ``x-session-id``, one per request)
live until ``cleanup_session`` or until it idles out.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from gptoss_vllm.tools.mcp_app import mcp_app, run_app
from gptoss_vllm.tools.search_index import Document, SearchBackend
from gptoss_vllm.tools.telemetry import ToolTelemetry

log = logging.getLogger("gptoss_vllm.tools.browser")

VIEW_LINES = 40
LINE_WIDTH = 100
MAX_PAGES = 64  # per session; the oldest go first
SESSION_IDLE_S = 900.0


def _instructions() -> str:
    from openai_harmony import ToolNamespaceConfig

    # The built-in browser's own description: the one gpt-oss was trained to read.
    return ToolNamespaceConfig.browser().description


@dataclass
class Page:
    url: str
    title: str
    lines: list[str]
    links: dict[int, str] = field(default_factory=dict)


def page_of(document: Document) -> Page:
    lines: list[str] = []
    for paragraph in document.text.splitlines():
        lines += textwrap.wrap(paragraph, LINE_WIDTH) or [""]
    return Page(document.url, document.title, lines)


@dataclass
class Session:
    pages: list[Page] = field(default_factory=list)
    used: float = field(default_factory=time.monotonic)

    def add(self, page: Page) -> int:
        self.pages.append(page)
        if len(self.pages) > MAX_PAGES:
            self.pages[0] = Page("", "(closed)", [])  # cursors stay stable; the page's text goes
        return len(self.pages) - 1

    def get(self, cursor: int) -> tuple[int, Page]:
        if not self.pages:
            raise LookupError("no page is open yet: search first")
        cursor = len(self.pages) - 1 if cursor < 0 else cursor
        if cursor >= len(self.pages):
            raise LookupError(f"no page at cursor {cursor} (open: 0..{len(self.pages) - 1})")
        return cursor, self.pages[cursor]


def display(cursor: int, page: Page, loc: int = 0, num_lines: int = -1) -> str:
    total = len(page.lines)
    start = max(0, min(loc, max(total - 1, 0)))
    end = min(total, start + (num_lines if num_lines > 0 else VIEW_LINES))
    header = f"[{cursor}] {page.title}" + (f" ({page.url})" if page.url else "")
    body = "\n".join(f"L{n}: {page.lines[n]}" for n in range(start, end))
    return f"{header}\n**viewing lines [{start} - {max(end - 1, start)}] of {max(total - 1, 0)}**\n\n{body}"


class Browser:
    """The sessions' pages over one backend."""

    def __init__(self, backend: SearchBackend) -> None:
        self._backend = backend
        self._sessions: dict[str, Session] = {}

    def session(self, key: str) -> Session:
        now = time.monotonic()
        for stale in [k for k, s in self._sessions.items() if now - s.used > SESSION_IDLE_S]:
            del self._sessions[stale]
        session = self._sessions.setdefault(key, Session())
        session.used = now
        return session

    def drop(self, key: str) -> None:
        self._sessions.pop(key, None)

    def search(self, key: str, query: str, topn: int) -> str:
        hits = self._backend.search(query, max(1, min(int(topn), 50)))
        lines: list[str] = []
        links: dict[int, str] = {}
        for i, hit in enumerate(hits):
            links[i] = hit.url
            lines += [f"* 【{i}†{hit.title}†{hit.url}】", *textwrap.wrap(hit.snippet, LINE_WIDTH), ""]
        if not hits:
            lines = [f"No results for {query!r}."]
        page = Page("", f"Search results for `{query}`", lines, links)
        session = self.session(key)
        return display(session.add(page), page, 0, len(lines))

    def open(self, key: str, id: int | str, cursor: int, loc: int, num_lines: int) -> str:
        session = self.session(key)
        if isinstance(id, str) and id not in ("", "-1"):
            url = id
        elif int(id) >= 0:
            _, origin = session.get(int(cursor))
            if int(id) not in origin.links:
                raise LookupError(f"no link {id} on that page (links: {sorted(origin.links)})")
            url = origin.links[int(id)]
        else:  # no id: scroll the page at cursor
            at, page = session.get(int(cursor))
            return display(at, page, max(int(loc), 0), int(num_lines))
        document = self._backend.document(url)
        if document is None:
            raise LookupError(f"{url}: no such document")
        page = page_of(document)
        return display(session.add(page), page, max(int(loc), 0), int(num_lines))

    def find(self, key: str, pattern: str, cursor: int) -> str:
        session = self.session(key)
        _, page = session.get(int(cursor))
        needle = pattern.lower()
        matches = [n for n, line in enumerate(page.lines) if needle in line.lower()]
        lines: list[str] = []
        for i, n in enumerate(matches[:50]):
            lines += [f"# 【{i}†match at L{n}】", *page.lines[n : n + 3], ""]
        if not matches:
            lines = [f"No `find` results for pattern: `{pattern}`"]
        result = Page(page.url, f"Find results for text: `{pattern}` in `{page.title}`", lines)
        result.links = {i: page.url for i in range(len(matches[:50]))}
        return display(session.add(result), result, 0, len(lines))


def _session_of(ctx: Any) -> str:
    request = getattr(ctx.request_context, "request", None)
    return (request.headers.get("x-session-id") if request is not None else None) or "default"


def build_server(browser: Browser, telemetry: ToolTelemetry) -> Any:
    """The MCP server with ``search``, ``open``, ``find`` and ``cleanup_session``."""
    server = MCPServer(name="browser", instructions=_instructions())

    async def run(tool: str, call: Any) -> str:
        with telemetry.call(tool) as record:
            try:
                text = await asyncio.to_thread(call)
            except LookupError as exc:
                record.outcome = "not_found"
                raise ToolError(str(exc).strip("'\"")) from None
            except Exception as exc:  # the backend failing: the model reads it, the operator gets the log
                record.outcome = "backend_error"
                log.exception("browser %s failed", tool)
                raise ToolError(f"the search backend failed: {type(exc).__name__}") from None
            record.outcome = "ok"
            return text

    @server.tool(
        name="search", description="Searches for information related to `query` and displays `topn` results."
    )
    async def search(query: str, ctx: Context, topn: int = 10, source: str | None = None) -> str:
        return await run("search", lambda: browser.search(_session_of(ctx), query, topn))

    @server.tool(
        name="open",
        description="Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, "
        "showing `num_lines` lines. If `id` is a string, it is treated as a URL. Without `id`, scrolls the page "
        "at `cursor` to `loc`.",
    )
    async def open_(
        ctx: Context,
        id: int | str = -1,
        cursor: int = -1,
        loc: int = -1,
        num_lines: int = -1,
        view_source: bool = False,
        source: str | None = None,
    ) -> str:
        return await run("open", lambda: browser.open(_session_of(ctx), id, cursor, loc, num_lines))

    @server.tool(
        name="find",
        description="Finds exact matches of `pattern` in the current page, or the page given by `cursor`.",
    )
    async def find(pattern: str, ctx: Context, cursor: int = -1) -> str:
        return await run("find", lambda: browser.find(_session_of(ctx), pattern, cursor))

    @server.tool(name="cleanup_session", description="End a session", meta={"include_in_prompt": False})
    async def cleanup_session(ctx: Context) -> str:
        browser.drop(_session_of(ctx))
        return "ok"

    return server


def serve(host: str, port: int, backend: SearchBackend) -> None:
    """Run the server until interrupted (``gptoss-vllm tools browser``)."""
    telemetry = ToolTelemetry("browser")
    app = mcp_app(build_server(Browser(backend), telemetry), telemetry, host)
    print(f"browser tool server (MCP over SSE) at http://{host}:{port}/sse", flush=True)
    run_app(app, host, port)
