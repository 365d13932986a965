"""Offline vLLM engines for tests: a batch of jobs runs in one process (``tests.support.vllm_offline``), and each
job's outcome and log are read back apart."""

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
    returncode: int  # 0 when the job's engine ran every phase, 1 when it failed (its traceback is in the log)
    result: dict | None
    log: str  # the job's own part of the process's output


def run_offline_batch(
    jobs: list[dict], env: dict[str, str] | None = None, timeout: int = 1800
) -> dict[str, OfflineRun]:
    """Run ``jobs`` (each with a unique ``name``) one after another in one process with extra environment
    ``env``; a job the process never reached (it died) is a failed run carrying the process's last output."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.vllm_offline"],
        input=json.dumps({"jobs": jobs}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in order: the job markers split it
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})},
        cwd=REPO,
    )
    logs: dict[str, list[str]] = {}
    results: dict[str, dict] = {}
    current: list[str] = []  # what comes before the first job (imports, plugin registration) goes to all
    preamble = current
    for line in proc.stdout.splitlines(keepends=True):
        if line.startswith("JOB "):
            current = logs.setdefault(line[4:].strip(), list(preamble))
        elif line.startswith("RESULT "):
            name, payload = line[len("RESULT ") :].split(" ", 1)
            results[name] = json.loads(payload)
        else:
            current.append(line)
    runs = {}
    for job in jobs:
        name = job["name"]
        log = "".join(logs.get(name, [])) or f"(never started; the process exited {proc.returncode})\n"
        if name not in results and proc.returncode != 0:
            log += f"\n(the batch's process exited {proc.returncode})\n" + proc.stdout[-5000:]
        runs[name] = OfflineRun(0 if name in results else 1, results.get(name), log)
    return runs


def run_offline(job: dict, env: dict[str, str] | None = None, timeout: int = 900) -> OfflineRun:
    """One job alone in its process."""
    return run_offline_batch([{"name": "job", **job}], env, timeout)["job"]
