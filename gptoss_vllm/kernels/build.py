"""Build the C++ CPU kernel on first use, into a cache keyed by source, flags, compiler and torch.

No network: the user's own C++ compiler builds it (a minute on 2 cores, once). The library registers
the ``torch.ops.gptoss_vllm_cpu`` namespace when loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from gptoss_vllm import envs
from gptoss_vllm.cache import cache_root
from gptoss_vllm.kernels import KernelError

SOURCE = Path(__file__).parent / "csrc" / "mxfp4_moe.cpp"
CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]

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


def cache_dir() -> Path:
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(CFLAGS + LDFLAGS).encode(),
        version.encode(),
        torch.__version__.encode(),
    ):
        key.update(part)
    return cache_root() / "kernels" / key.hexdigest()[:16]


def load_kernel() -> None:
    """Compile (once per cache key) and load the kernel library into this process."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        from torch.utils.cpp_extension import load

        build_dir = cache_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            load(
                name=f"gptoss_vllm_cpu_{build_dir.name}",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
            raise KernelBuildError(
                f"building the gpt-oss CPU MoE kernel in {build_dir} failed: {exc}. "
                f"Set {envs.MOE_BACKEND.name}=reference to run without it."
            ) from exc
        _loaded = True
