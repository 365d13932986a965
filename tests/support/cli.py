"""The real ``gptoss-vllm`` command as a subprocess."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", *args], capture_output=True, text=True, timeout=timeout
    )
