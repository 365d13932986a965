"""A real ``redis-server`` (Debian's, which ``make venv`` installs) on a free port, in memory only, stopped by
its process id."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support.stack import free_port


@dataclass
class RunningRedis:
    process: subprocess.Popen
    port: int
    password: str | None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(
    workdir: Path, password: str | None = None, port: int | None = None, tls: tuple[Path, Path] | None = None
) -> RunningRedis:
    """``tls``: (certificate chain, key) files; the server then speaks TLS only, on ``port``."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: `make venv` installs Debian's redis-server"
    port = port or free_port()
    argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    if tls is None:
        argv += ["--port", str(port)]
    else:
        argv += ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
        argv += ["--tls-cert-file", str(tls[0]), "--tls-key-file", str(tls[1])]
    if password:
        argv += ["--requirepass", password]
    log = open(workdir / f"redis-{port}.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    running = RunningRedis(process, port, password)
    deadline = time.monotonic() + 20
    while True:
        try:
            if tls is not None:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return running
            elif running.client().ping():
                return running
        except (redis.exceptions.ConnectionError, OSError):
            if process.poll() is not None or time.monotonic() > deadline:
                running.stop()
                raise RuntimeError(f"redis-server did not start: see {workdir}/redis-{port}.log") from None
            time.sleep(0.05)
