"""Build the C++ CPU kernel on first use, into a cache keyed by sources, flags, compiler and torch.

No network: the user's own C++ compiler builds it (a minute on 2 cores, once). Each source file is
compiled with its own flags (the ISA files with their ``-m`` options, the rest for any CPU of the
machine's architecture) and linked into one library, which registers the ``torch.ops.gptoss_vllm_cpu``
namespace when loaded. Files for another architecture are left out.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch
from torch.utils import cpp_extension

from gptoss_vllm import envs
from gptoss_vllm.cache import cache_root
from gptoss_vllm.kernels import KernelError

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-shared", "-fopenmp"]
X86 = ("x86_64", "amd64")
# Source -> (machines it is built on, None for all; its own flags).
SOURCES: dict[str, tuple[tuple[str, ...] | None, list[str]]] = {
    "mxfp4_moe.cpp": (None, []),
    "generic.cpp": (None, []),
    "x86/avx2.cpp": (X86, ["-mavx2", "-mfma"]),
    "x86/avx512.cpp": (
        X86,
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni"],
    ),
}
LIBRARY = "gptoss_vllm_cpu.so"

_lock = threading.Lock()
_loaded = False


class KernelBuildError(KernelError, RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(
            f"the gpt-oss CPU MoE kernel is compiled on first use, but no C++ compiler ({cxx!r}) is on PATH: "
            "install one (Debian/Ubuntu: apt-get install g++) or set CXX, "
            f"or run with {envs.MOE_BACKEND.name}=reference (slow)"
        )
    return path


def sources(machine: str | None = None) -> dict[str, list[str]]:
    """The files built on this machine (or on ``machine``, as ``platform.machine()`` names it), with their
    own flags."""
    machine = (machine or platform.machine()).lower()
    return {
        name: flags for name, (machines, flags) in SOURCES.items() if machines is None or machine in machines
    }


def _torch_flags() -> tuple[list[str], list[str]]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_flags = [f"-I{path}" for path in cpp_extension.include_paths()] + [
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}"
    ]
    libs = cpp_extension.library_paths()
    link_flags = (
        [f"-L{path}" for path in libs] + [f"-Wl,-rpath,{path}" for path in libs] + ["-lc10", "-ltorch_cpu"]
    )
    return compile_flags, link_flags


def cache_dir() -> Path:
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    for name, flags in sorted(sources().items()):
        key.update(name.encode() + b"\0" + " ".join(flags).encode() + b"\0" + (CSRC / name).read_bytes())
    key.update((CSRC / "mxfp4_kernels.h").read_bytes())
    for part in (" ".join(CFLAGS + LDFLAGS).encode(), version.encode(), torch.__version__.encode()):
        key.update(part)
    return cache_root() / "kernels" / key.hexdigest()[:16]


def _build(build_dir: Path) -> Path:
    """Compile every source with its flags (in parallel), link, and move the library into place whole, so
    that a process building beside this one never loads half a file."""
    cxx = _compiler()
    torch_compile, torch_link = _torch_flags()
    work = build_dir / f"tmp-{os.getpid()}-{threading.get_ident()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        jobs = []
        for name, flags in sources().items():
            obj = work / object_file_name(name)
            command = [
                cxx,
                *CFLAGS,
                *flags,
                f"-I{CSRC}",
                *torch_compile,
                "-c",
                str(CSRC / name),
                "-o",
                str(obj),
            ]
            jobs.append(
                (
                    name,
                    obj,
                    subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                )
            )
        failed = []
        for name, _, proc in jobs:
            output, _ = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"{name}:\n{output[-4000:]}")
        if failed:
            raise KernelBuildError("compiling " + "\n".join(failed))
        library = work / LIBRARY
        link = subprocess.run(
            [cxx, *[str(obj) for _, obj, _ in jobs], *LDFLAGS, *torch_link, "-o", str(library)],
            capture_output=True,
            text=True,
            check=False,
        )
        if link.returncode != 0:
            raise KernelBuildError(f"linking {library}: {link.stdout[-2000:]}{link.stderr[-4000:]}")
        for _, obj, _ in jobs:  # kept beside the library: tests read their symbol tables
            os.replace(obj, build_dir / obj.name)
        target = build_dir / LIBRARY
        os.replace(library, target)
        return target
    finally:  # also after a failed compile or link
        shutil.rmtree(work, ignore_errors=True)


def object_file(source: str) -> Path:
    """The compiled object of ``source`` (a key of ``SOURCES``) in this machine's cache."""
    return cache_dir() / object_file_name(source)


def object_file_name(source: str) -> str:
    return source.replace("/", "_") + ".o"


def load_kernel() -> None:
    """Compile (once per cache key) and load the kernel library into this process."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        build_dir = cache_dir()
        library = build_dir / LIBRARY
        try:
            if not library.exists():
                library = _build(build_dir)
            torch.ops.load_library(str(library))
        except (KernelBuildError, OSError, RuntimeError) as exc:
            raise KernelBuildError(
                f"building the gpt-oss CPU MoE kernel in {build_dir} failed: {exc}. "
                f"Set {envs.MOE_BACKEND.name}=reference to run without it."
            ) from exc
        _loaded = True
