"""gpt-oss's ``python`` tool as an MCP server over SSE (what ``vllm serve --tool-server HOST:PORT`` reaches).

vLLM names the tool's harmony namespace after the server (``python``) and its description after the server's
instructions; it calls the tool ``python`` with ``{"code": ...}`` for each of the model's messages to
``python``, with the request's id as the session (``x-session-id``), and ``cleanup_session`` at the end. Each
call runs in a fresh :class:`~gptoss_vllm.tools.sandbox.Sandbox`; the output, or why the sandbox stopped the
code, goes back to the model, and a call the sandbox stopped is a tool error (``isError``). Nothing is kept
between calls unless the server keeps session files (``session_files_bytes`` > 0): then ``/session`` holds a
session's files across its calls, up to that size, until the session ends or idles out.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from gptoss_vllm.tools.mcp_app import mcp_app, run_app
from gptoss_vllm.tools.sandbox import Limits, Outcome, Sandbox
from gptoss_vllm.tools.telemetry import ToolTelemetry

log = logging.getLogger("gptoss_vllm.tools.python")

INSTRUCTIONS = """Use this tool to execute Python code in your chain of thought. The code will not be shown to \
the user. This tool should be used for internal reasoning, but not for code that is intended to be visible to \
the user (e.g. when creating plots, tables, or files).

When you send a message containing Python code to python, it will be executed in a fresh sandbox: print what you \
want to see; variables do not carry over to the next message{files}. python will respond with the output of the \
execution or time out after {wall:g} seconds. The standard library only; internet access for this session is \
disabled."""


class SessionFiles:
    """Each session's ``/session`` directory on the host, bounded in size, dropped at the session's end or after
    ``idle_s`` without a call."""

    def __init__(self, max_bytes: int, idle_s: float = 600.0) -> None:
        self.max_bytes = max_bytes
        self._idle_s = idle_s
        self._root = Path(tempfile.mkdtemp(prefix="gptoss-python-sessions-"))
        self._root.chmod(0o711)  # the sandboxes' users reach their own session's directory, and list none
        self._used: dict[str, float] = {}

    def directory(self, session: str) -> Path:
        self._expire()
        path = self._root / _safe(session)
        path.mkdir(mode=0o700, exist_ok=True)
        self._used[session] = time.monotonic()
        return path

    def check(self, session: str) -> str | None:
        """After a call: a note for the model when the session's files went over the bound (they are dropped)."""
        path = self._root / _safe(session)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        if size <= self.max_bytes:
            return None
        shutil.rmtree(path, ignore_errors=True)
        return f"[the session's files in /session passed {self.max_bytes >> 20} MiB and were removed]"

    def drop(self, session: str) -> None:
        self._used.pop(session, None)
        shutil.rmtree(self._root / _safe(session), ignore_errors=True)

    def _expire(self) -> None:
        now = time.monotonic()
        for session in [s for s, used in self._used.items() if now - used > self._idle_s]:
            self.drop(session)

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)


def _safe(session: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in session)[:128] or "_"


def _session_of(ctx: Any) -> str | None:
    request = getattr(ctx.request_context, "request", None)
    return request.headers.get("x-session-id") if request is not None else None


def build_server(sandbox: Sandbox, telemetry: ToolTelemetry, files: SessionFiles | None = None) -> Any:
    """The MCP server (``mcp``'s MCPServer) with the ``python`` and ``cleanup_session`` tools."""
    limits = sandbox.limits
    note = ", but files you write to /session stay for your next messages" if files else "; nor do files"
    server = MCPServer(name="python", instructions=INSTRUCTIONS.format(files=note, wall=limits.wall_seconds))

    # Not in the prompt: the namespace's description is the whole of what the model is told (as for the
    # built-in python tool), and vLLM sends the message's text as ``code``.
    @server.tool(
        name="python", description="Run Python code in a fresh sandbox", meta={"include_in_prompt": False}
    )
    async def python(code: str, ctx: Context) -> str:
        session = _session_of(ctx)
        with telemetry.call("python") as call:
            directory = files.directory(session) if files and session else None
            outcome: Outcome = await sandbox.run(code, directory)
            call.outcome = outcome.reason
            message = outcome.message(limits)
            if directory is not None and (over := files.check(session)):  # type: ignore[union-attr,arg-type]
                message = f"{message}\n{over}"
            log.info("python call (session %s): %s in %.2f s", session, outcome.reason, outcome.seconds)
        if outcome.reason != "ok":
            raise ToolError(message)
        return message

    @server.tool(name="cleanup_session", description="End a session", meta={"include_in_prompt": False})
    async def cleanup_session(ctx: Context) -> str:
        session = _session_of(ctx)
        if files and session:
            await asyncio.to_thread(files.drop, session)
        return "ok"

    return server


def serve(host: str, port: int, limits: Limits, slots: int, session_files_bytes: int) -> None:
    """Run the server until interrupted (``gptoss-vllm tools python``)."""
    sandbox = Sandbox(limits, slots=slots)  # refuses to start without a working bwrap
    telemetry = ToolTelemetry("python")
    files = SessionFiles(session_files_bytes) if session_files_bytes > 0 else None
    try:
        app = mcp_app(build_server(sandbox, telemetry, files), telemetry, host)
        print(f"python tool server (MCP over SSE) at http://{host}:{port}/sse", flush=True)
        run_app(app, host, port)
    finally:
        if files is not None:
            files.close()
