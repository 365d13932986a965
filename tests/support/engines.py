"""Start vLLM engines for tests in their own processes and collect what they print."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class OfflineRun:
    returncode: int
    result: dict | None
    log: str  # stdout and stderr together


def run_offline(job: dict, env: dict[str, str] | None = None, timeout: int = 900) -> OfflineRun:
    """Run ``tests.support.vllm_offline`` on ``job`` with extra environment ``env``."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.vllm_offline"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    return OfflineRun(proc.returncode, result, proc.stdout + proc.stderr)
