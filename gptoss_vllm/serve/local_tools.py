"""The tool servers ``gptoss-vllm serve`` runs on its own machine, for pools that name a tool without a url.

Each is ``gptoss-vllm tools python|browser`` as a child process on a free loopback port, with the sandbox's
default limits; the browser searches the collection shipped in ``gptoss_vllm/tools/collection/``, indexed into
the user cache on first use (again when the collection changes). They start before the pools (vLLM lists a
tool server's tools when its engine starts) and stop after them.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gptoss_vllm.cache import cache_root
from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.config import ServeConfig, ToolServer
from gptoss_vllm.tools.search_index import SHIPPED_COLLECTION as COLLECTION
from gptoss_vllm.tools.search_index import build_index

log = logging.getLogger("gptoss_vllm.tools")

READY_TIMEOUT_S = 60.0


class ToolStartError(ServeError, RuntimeError):
    """A tool server that did not come up; the message has its log's tail."""


def collection_index() -> Path:
    """The shipped collection's index in the user cache, built unless it is there for this collection."""
    digest = hashlib.sha256()
    for path in sorted(COLLECTION.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(COLLECTION).as_posix().encode() + b"\0" + path.read_bytes())
    index = cache_root() / "tools" / f"collection-{digest.hexdigest()[:12]}.db"
    if not index.exists():
        build_index(COLLECTION, index, progress=False)
    return index


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalTools:
    """Starts the servers a config's pools need here, and stops them."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: dict[str, subprocess.Popen] = {}

    def resolve(self, config: ServeConfig) -> ServeConfig:
        """``config`` with every tool without a url pointed at a server started here."""
        needed = sorted({tool for pool in config.pools.values() for tool in pool.tools.without_url()})
        urls = {tool: self._start(tool) for tool in needed}
        pools = {}
        for name, pool in config.pools.items():
            tools = {t: ToolServer(url=urls[t]) for t in pool.tools.without_url()}
            pools[name] = pool.model_copy(update={"tools": pool.tools.model_copy(update=tools)})
        return config.model_copy(update={"pools": pools})

    def _start(self, tool: str) -> str:
        port = _free_port()
        args = ["--index", str(collection_index())] if tool == "browser" else []
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"tools-{tool}.log"
        command = [sys.executable, "-m", "gptoss_vllm.cli", "tools", tool, "--port", str(port), *args]
        with log_path.open("w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self._procs[tool] = proc
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=2) as client:
            while True:
                if proc.poll() is not None:
                    raise ToolStartError(
                        f"the {tool} tool server exited ({proc.returncode}):\n{_tail(log_path)}"
                    )
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ToolStartError(f"the {tool} tool server not ready in {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.2)
        log.info("%s tool server at 127.0.0.1:%d (log %s)", tool, port, log_path)
        return f"127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in self._procs.values():
            proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]
