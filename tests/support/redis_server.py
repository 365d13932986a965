"""A real ``redis-server`` (Debian's, which ``make venv`` installs) on a free port, in memory only, stopped by
its process id."""

from __future__ import annotations

import shutil
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


def start_redis(workdir: Path, password: str | None = None, port: int | None = None) -> RunningRedis:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: `make venv` installs Debian's redis-server"
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir)]
    if password:
        argv += ["--requirepass", password]
    log = open(workdir / f"redis-{port}.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    running = RunningRedis(process, port, password)
    deadline = time.monotonic() + 20
    while True:
        try:
            if running.client().ping():
                return running
        except redis.exceptions.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                running.stop()
                raise RuntimeError(f"redis-server did not start: see {workdir}/redis-{port}.log") from None
            time.sleep(0.05)
