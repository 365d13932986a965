"""The python tool's MCP server, driven by MCP's own client over SSE as vLLM drives it: it computes, and each abuse
ends as a tool error the model reads while the server and the other calls carry on.

The server runs as a process of its own (``gptoss-vllm tools python``) with small limits, once for the module;
each call is a fresh bubblewrap sandbox (real namespaces, real rlimits: nothing here is faked).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from gptoss_vllm.bench.process import RunningToolServer, free_port, start_tool_server
from tests.support.otlp_receiver import OtlpReceiver

SECRET = "gptoss-test-secret-6f1c"
LIMITS = ["--cpu-seconds", "2", "--wall-seconds", "4", "--memory-mib", "256", "--processes", "16"]
OUTPUT_KIB = 8

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap: `make venv` installs it")


class ToolServer:
    def __init__(self, running: RunningToolServer, secret_file: Path, receiver: OtlpReceiver) -> None:
        self.running, self.url, self.secret_file, self.receiver = running, running.url, secret_file, receiver

    def call(self, code: str, session: str = "s-1", tool: str = "python") -> Any:
        return asyncio.run(self.acall(code, session, tool))

    async def acall(self, code: str, session: str = "s-1", tool: str = "python") -> Any:
        from mcp import ClientSession
        from mcp.client.sse import sse_client

        args = {"code": code} if tool == "python" else {}
        async with (
            sse_client(url=f"{self.url}/sse", headers={"x-session-id": session}) as streams,
            ClientSession(*streams) as client,
        ):
            await client.initialize()
            return await client.call_tool(tool, args)

    def healthy(self) -> None:
        """The server still answers, and still runs code."""
        assert self.running.proc.poll() is None, self.running.log_tail()
        assert httpx.get(f"{self.url}/health", timeout=5).text == "ok"
        result = self.call("print(6 * 7)")
        assert not result.is_error and text(result) == "42"


def text(result: Any) -> str:
    return result.content[0].text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolServer]:
    root = tmp_path_factory.mktemp("python-tool")
    secret_file = root / "secret.txt"
    secret_file.write_text(SECRET)
    args = [*LIMITS, "--output-kib", str(OUTPUT_KIB), "--slots", "2", "--session-files-mib", "1"]
    receiver = OtlpReceiver()
    tracing = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    running = start_tool_server("python", root / "server.log", args, env={"SECRET": SECRET, **tracing})
    yield ToolServer(running, secret_file, receiver)
    running.stop(timeout_s=30)
    receiver.close()


def test_python_computes_and_the_call_is_counted(server):
    result = server.call("import math\nprint(sum(range(10)), math.factorial(20))")
    assert not result.is_error and text(result) == "45 2432902008176640000"
    failed = server.call("1 / 0")
    assert failed.is_error and "ZeroDivisionError" in text(failed)
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'gptoss_tool_calls_total{outcome="ok",tool="python"}' in metrics
    assert 'gptoss_tool_calls_total{outcome="error",tool="python"}' in metrics
    assert 'gptoss_tool_call_seconds_count{outcome="ok",tool="python"}' in metrics
    # And a span per call, with its outcome.
    deadline = time.monotonic() + 30
    while not {"ok", "error"} <= {
        s.attributes.get("gptoss.tool.outcome") for s in server.receiver.spans if s.name == "tool python"
    }:
        assert time.monotonic() < deadline, server.receiver.spans
        time.sleep(0.2)


def test_the_sandbox_has_no_network(server):
    code = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)"
    result = server.call(code)
    assert result.is_error and "Network is unreachable" in text(result)
    resolved = server.call("import socket\nsocket.getaddrinfo('pypi.org', 443)")
    assert resolved.is_error and "gaierror" in text(resolved)
    server.healthy()


def test_writing_outside_the_sandbox_fails_and_reaches_nothing_of_the_hosts(server, tmp_path):
    for target in ("/usr/lib/gptoss-escape", "/gptoss-escape", "/sandbox/main.py", str(tmp_path / "escape")):
        result = server.call(f"open({target!r}, 'w').write('x')")
        assert result.is_error and (
            "Read-only file system" in text(result) or "No such file" in text(result)
        ), (
            target,
            text(result),
        )
    assert not (tmp_path / "escape").exists() and not Path("/usr/lib/gptoss-escape").exists()
    # Its own /tmp is writable, and private: the next call's /tmp is empty.
    assert (
        text(server.call("open('/tmp/mine', 'w').write('x'); import os; print(os.listdir('/tmp'))"))
        == "['mine']"
    )
    assert text(server.call("import os; print(os.listdir('/tmp'))")) == "[]"
    server.healthy()


def test_the_hosts_files_and_environment_are_out_of_sight(server):
    result = server.call(f"print(open({str(server.secret_file)!r}).read())")
    assert result.is_error and "No such file" in text(result) and SECRET not in text(result)
    for path in ("/etc/passwd", "/root/.bashrc", "/proc/1/environ"):
        seen = server.call(f"print(open({path!r}).read())")
        assert SECRET not in text(seen)
        assert path == "/proc/1/environ" or seen.is_error, (path, text(seen))
    env = server.call("import os\nprint(dict(os.environ)); print(sorted(os.listdir('/')))")
    assert not env.is_error and SECRET not in text(env) and "SECRET" not in text(env)
    assert "home" not in text(env) and "etc" not in text(env)
    # The host's processes are out of sight too: the sandbox's own pid namespace.
    pids = server.call("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert max(eval(text(pids))) < 10
    server.healthy()


def test_a_fork_bomb_is_bounded_and_leaves_nothing_behind(server):
    result = server.call(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    )
    assert result.is_error and "wall time limit of 4 s" in text(result)
    time.sleep(0.5)
    # Nothing of the sandbox is left under the server (bwrap's pid namespace went with it).
    left = psutil.Process(server.running.proc.pid).children(recursive=True)
    assert left == [], [p.cmdline() for p in left]
    server.healthy()


def test_a_memory_bomb_ends_as_out_of_memory(server):
    result = server.call("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))")
    assert result.is_error and "ran out of memory: limit 256 MiB" in text(result)
    big = server.call("x = bytearray(8 << 30)")
    assert big.is_error and "MemoryError" in text(big)
    server.healthy()


def test_an_infinite_loop_ends_at_the_cpu_limit_and_a_sleeper_at_the_wall(server):
    result = server.call("while True:\n    pass")
    assert result.is_error and "CPU time limit of 2 s" in text(result)
    sleeper = server.call("import time\ntime.sleep(60)")
    assert sleeper.is_error and "wall time limit of 4 s" in text(sleeper)
    server.healthy()


def test_a_huge_output_is_cut_at_its_bound(server):
    result = server.call("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert result.is_error and "output beyond 8192 bytes" in text(result)
    assert len(text(result)) < OUTPUT_KIB * 1024 + 200
    server.healthy()


def test_an_abusive_call_does_not_hold_up_the_others(server):
    async def run() -> tuple[Any, Any, bool]:
        bomb = asyncio.create_task(server.acall("while True:\n    pass", session="bomb"))
        await asyncio.sleep(0.3)
        fine = await server.acall("print('still here')", session="other")
        bomb_running = not bomb.done()  # the loop has 2 s of CPU to burn: the other call ran beside it
        return await bomb, fine, bomb_running

    bomb, fine, bomb_running = asyncio.run(run())
    assert bomb.is_error and not fine.is_error and text(fine) == "still here"
    assert bomb_running


def test_session_files_stay_within_their_session_and_go_with_it(server):
    assert not server.call("open('/session/notes.txt', 'w').write('kept')", session="a").is_error
    assert text(server.call("print(open('/session/notes.txt').read())", session="a")) == "kept"
    other = server.call("print(open('/session/notes.txt').read())", session="b")
    assert other.is_error and "No such file" in text(other)
    # Past the bound (1 MiB here) the session's files go.
    over = server.call("open('/session/big', 'wb').write(b'x' * (2 << 20))", session="a")
    assert "were removed" in text(over)
    assert server.call("import os; print(os.listdir('/session'))", session="a").content[0].text == "[]"
    server.call("open('/session/notes.txt', 'w').write('again')", session="a")
    assert not server.call("", session="a", tool="cleanup_session").is_error
    gone = server.call("print(open('/session/notes.txt').read())", session="a")
    assert gone.is_error and "No such file" in text(gone)


def test_without_bubblewrap_the_server_refuses_to_start_and_says_what_to_install(tmp_path):
    python_only = tmp_path / "bin"
    python_only.mkdir()
    (python_only / "python3").symlink_to(sys.executable)
    refused = subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "tools", "python", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": str(python_only)},
    )
    assert refused.returncode == 1
    assert "bwrap not found" in refused.stderr and "apt-get install bubblewrap" in refused.stderr
