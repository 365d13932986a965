"""The real ``gptoss-vllm`` command as a subprocess."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_argument_errors(command: list[str], cases: list[tuple[list[str], str]]) -> None:
    """Each of ``cases`` (arguments, the argument the message must name) exits 2 naming it."""
    for args, named in cases:
        answer = run_cli(*command, *args)
        assert answer.returncode == 2, (args, answer.stderr)
        assert named in answer.stderr, (args, answer.stderr)
