"""``gptoss-vllm serve`` as a child process, as a user would run it, waited on until ready (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningStack:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 180) -> int:
        """Ctrl-C, as an operator would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_stack(
    config_path: Path | None,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
    args: list[str] | None = None,
) -> RunningStack:
    """``config_path`` None: the embedded default; ``args`` are more ``serve`` arguments."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptoss_vllm.cli", "serve", "--port", str(port), *(args or [])]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    log = log_path.open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
    )
    stack = RunningStack(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gptoss-vllm serve exited with {proc.returncode}:\n{stack.log_tail()}")
        try:
            if httpx.get(f"{stack.url}/ready", timeout=2).status_code == 200:
                return stack
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stack.stop()
    raise RuntimeError(f"gptoss-vllm serve not ready after {timeout_s} s:\n{stack.log_tail()}")
