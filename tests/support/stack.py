"""The tests start the stack the way the benchmarks do, and find its parts the way an operator would."""

import time
from pathlib import Path

import psutil

from gptoss_vllm.bench.process import RunningStack, free_port, start_stack, start_tool_server
from gptoss_vllm.kernels.build import cache_dir as kernel_cache_dir
from gptoss_vllm.serve.app_names import app_of
from tests.support import http

__all__ = [
    "RunningStack",
    "free_port",
    "fresh_cache",
    "replica_processes",
    "start_stack",
    "start_tool_server",
    "wait_ready",
]


def fresh_cache(path: Path) -> Path:
    """An empty cache for a stack that must build its models from nothing, sharing only the compiled CPU
    kernel with the session's own cache (``~/.cache/gptoss-vllm``): the kernel is compiled once per run, not
    once per fresh cache (a minute on 2 cores each time)."""
    (path / "kernels").mkdir(parents=True)
    shared = kernel_cache_dir()
    shared.parent.mkdir(parents=True, exist_ok=True)
    (path / "kernels" / shared.name).symlink_to(shared, target_is_directory=True)
    shared.mkdir(exist_ok=True)
    return path


def wait_ready(stack: RunningStack, timeout_s: float = 300) -> None:
    """Until ``/ready`` is 200 (after a test replaced a replica)."""
    deadline = time.monotonic() + timeout_s
    while http.get(f"{stack.url}/ready").status_code != 200:
        assert time.monotonic() < deadline, stack.log_tail()
        time.sleep(1)


def replica_processes(deployment: str) -> list[psutil.Process]:
    """The processes of a deployment's Ray Serve replicas (a pool's name, or ``ingress``)."""
    app = app_of(deployment)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{app}:{deployment}" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found
