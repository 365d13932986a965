"""A fresh bubblewrap sandbox per call, for code the model writes.

Each call runs ``python3 -I`` on the code in its own namespaces (``bwrap --unshare-all``): no network but a
loopback that is down, no view of the host's processes, a read-only ``/usr`` and nothing else of the host's
files (no ``/etc``, no ``/home``, no environment: it is cleared), a root that is read-only, and a private
``/tmp`` (a tmpfs of bounded size) that goes with the call. Resource limits are rlimits set on the sandbox's
first process and inherited by everything it starts: CPU seconds, address space (memory) per process, the
number of processes, file size, open files, no core files; a wall-clock timeout kills the whole sandbox, as does
output beyond its bound. A server running as root starts each concurrent call as its own unprivileged user
(``uid_base + slot``), so the process limit counts that call's processes alone; a server that is not root runs
every call as itself, and the limit counts all of them together.

What the sandbox does not do: it bounds memory per process, so the whole of a call may take up to processes x
memory; on Kubernetes the tool server's own pod (its memory limit) bounds the sum, and a sandboxed process is
the first the OOM killer takes (``oom_score_adj`` 1000). Nor does it bound CPU shares between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptoss_vllm.tools import ToolsError

Reason = Literal["ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit"]
SERVER_THREADS = (
    64  # room for the server's own threads under a shared process limit (a server not run as root)
)
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora/RHEL: dnf install bubblewrap)"
)


class SandboxUnavailable(ToolsError, RuntimeError):
    """bubblewrap is missing, or it cannot make namespaces here; the message says what to do."""


@dataclass(frozen=True)
class Limits:
    """What one call may use."""

    cpu_seconds: int = 10
    wall_seconds: float = 30.0
    memory_bytes: int = 512 << 20  # address space per process
    processes: int = 16
    output_bytes: int = 64 << 10  # stdout and stderr together
    file_bytes: int = 16 << 20  # the largest file it may write
    tmp_bytes: int = 64 << 20  # its /tmp
    open_files: int = 64


@dataclass(frozen=True)
class Outcome:
    """How a call ended: ``ok`` (exit 0), ``error`` (the code raised or exited non-zero), or a limit."""

    reason: Reason
    output: str
    exit_code: int | None
    seconds: float

    def message(self, limits: Limits) -> str:
        """The text the model reads: the output, and why the sandbox stopped the code where it did."""
        why = {
            "timeout": f"[the sandbox stopped the code: wall time limit of {limits.wall_seconds:g} s]",
            "cpu_limit": f"[the sandbox stopped the code: CPU time limit of {limits.cpu_seconds} s]",
            "memory_limit": f"[the code ran out of memory: limit {limits.memory_bytes >> 20} MiB per process]",
            "output_limit": f"[the sandbox stopped the code: output beyond {limits.output_bytes} bytes]",
        }.get(self.reason)
        if self.reason == "error" and self.exit_code is not None and self.exit_code != 1:
            why = f"[exit code {self.exit_code}]"
        return "\n".join(part for part in (self.output.rstrip("\n"), why) if part) or "[no output]"


def _host_root_entries() -> list[str]:
    """bwrap arguments that give the sandbox ``/usr`` read-only and the merged-/usr links (or binds) beside it."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def find_bwrap() -> str:
    """bwrap's path, checked to make namespaces here; :class:`SandboxUnavailable` says what is missing."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bwrap not found on PATH: {INSTALL_HINT}")
    probe = subprocess.run(
        [bwrap, "--unshare-all", *_host_root_entries(), "--", "/usr/bin/true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bwrap cannot create its namespaces here ({probe.stderr.strip()}): allow unprivileged user "
            "namespaces (sysctl user.max_user_namespaces > 0; kernel.apparmor_restrict_unprivileged_userns=0 "
            "on Ubuntu), or run the tool server where they are allowed"
        )
    return bwrap


class Sandbox:
    """Runs code in a fresh sandbox, ``slots`` calls at a time (more wait for a slot)."""

    def __init__(
        self,
        limits: Limits = Limits(),
        python: str = "/usr/bin/python3",
        slots: int = 4,
        uid_base: int = 61000,
    ) -> None:
        self.limits = limits
        self._bwrap = find_bwrap()
        if not Path(python).is_file() or not python.startswith("/usr/"):
            raise SandboxUnavailable(
                f"python {python!r}: the sandbox's interpreter must be a file under /usr"
            )
        self._python = python
        self._slots = slots
        self._free = asyncio.Queue[int]()
        for slot in range(slots):
            self._free.put_nowait(slot)
        self._uid_base = uid_base if os.geteuid() == 0 else None

    def _command(self, code_file: Path, session_dir: Path | None) -> list[str]:
        limits = self.limits
        args = [
            self._bwrap,
            "--unshare-all",  # user, ipc, pid, net, uts, cgroup: no network, no host processes
            "--die-with-parent",  # the sandbox goes with the call that started it (and with the server)
            "--new-session",  # no terminal to inject keystrokes into
            "--cap-drop",
            "ALL",
            *_host_root_entries(),
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(limits.tmp_bytes),
            "--tmpfs",
            "/tmp",
            "--ro-bind",
            str(code_file),
            "/sandbox/main.py",
        ]
        if session_dir is not None:
            args += ["--bind", str(session_dir), "/session"]
        args += [
            "--remount-ro",
            "/",
            "--chdir",
            "/session" if session_dir is not None else "/tmp",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "HOME",
            "/tmp",
            "--setenv",
            "PYTHONDONTWRITEBYTECODE",
            "1",
            "--setenv",
            "PYTHONUNBUFFERED",
            "1",
            "--",
            self._python,
            "-I",
            "/sandbox/main.py",
        ]
        return args

    def _limit(self, uid: int | None) -> None:
        """In the sandbox's first process, before bwrap: its own user (a server running as root), then rlimits
        everything it starts inherits (the process limit counts that user's processes)."""
        limits = self.limits
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            processes = limits.processes
        else:
            # The server's own user: its threads and every slot's sandbox count together.
            processes = limits.processes * self._slots + SERVER_THREADS
        for which, value in (
            (resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1)),
            (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
            (resource.RLIMIT_NPROC, (processes, processes)),
            (resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes)),
            (resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files)),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(which, value)
        with contextlib.suppress(OSError):
            Path("/proc/self/oom_score_adj").write_text("1000")

    async def run(self, code: str, session_dir: Path | None = None) -> Outcome:
        """Run ``code``; ``session_dir`` (a host directory, or none) is the call's writable ``/session``."""
        slot = await self._free.get()
        try:
            with tempfile.TemporaryDirectory(prefix="gptoss-sandbox-") as scratch:
                code_file = Path(scratch) / "main.py"
                code_file.write_text(code)
                code_file.chmod(0o644)
                os.chmod(scratch, 0o755)
                uid = None if self._uid_base is None else self._uid_base + slot
                if uid is not None and session_dir is not None:
                    _own(session_dir, uid)
                return await self._run(self._command(code_file, session_dir), uid)
        finally:
            self._free.put_nowait(slot)

    async def _run(self, command: list[str], uid: int | None) -> Outcome:
        limits = self.limits
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream, in the order the code wrote it
            preexec_fn=lambda: self._limit(uid),  # uvloop (uvicorn's) takes no user=/group=
            start_new_session=True,
            # Not the server's environment, where its keys are: bwrap's own pid-1 helper keeps the environment
            # it was started with, and the code can read it at /proc/1/environ (--clearenv is the code's alone).
            env={"PATH": "/usr/bin:/bin"},
        )
        output = bytearray()
        reason: Reason | None = None

        async def read() -> None:
            nonlocal reason
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                room = limits.output_bytes - len(output)
                output.extend(chunk[: max(room, 0)])
                if len(chunk) > room:
                    reason = "output_limit"
                    _kill(proc)
                    return

        try:
            await asyncio.wait_for(asyncio.gather(read(), proc.wait()), limits.wall_seconds)
        except TimeoutError:
            reason = reason or "timeout"
            _kill(proc)
        exit_code = await proc.wait()
        text = output.decode("utf-8", errors="replace")
        if reason is None:
            if exit_code == 0:
                reason = "ok"
            elif exit_code in (
                -signal.SIGXCPU,
                128 + signal.SIGXCPU,
                -signal.SIGKILL,
                128 + signal.SIGKILL,
            ) and ("MemoryError" not in text):
                # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one.
                reason = "cpu_limit"
            elif "MemoryError" in text:
                reason = "memory_limit"
            else:
                reason = "error"
        return Outcome(reason, text, exit_code, round(time.monotonic() - started, 3))


def _own(directory: Path, uid: int) -> None:
    """The session's files to this call's user (the session's earlier calls may have run in another slot)."""
    for path in [directory, *directory.rglob("*")]:
        os.lchown(path, uid, uid)


def _kill(proc: asyncio.subprocess.Process) -> None:
    # bwrap started the sandbox's pid 1 with a parent-death signal: killing bwrap's group takes the
    # sandbox's whole pid namespace with it, whatever the code forked or setsid'd.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
