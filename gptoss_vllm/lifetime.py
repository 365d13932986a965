"""Engine processes that die with the process that started them.

vLLM's engine core is a child process that does not notice its parent dying: when a pool replica is killed
(OOM killer, ``kill -9``, a crashed Ray worker) the engine core lives on, holding its KV cache and, on GPUs,
the device memory the replacement replica needs. A pool replica sets ``GPTOSS_VLLM_EXIT_WITH_PARENT=1``; the
plugin, which vLLM loads in every process it starts, then asks Linux to kill such a child with its parent.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

from gptoss_vllm import envs

EXIT_WITH_PARENT_ENV = envs.EXIT_WITH_PARENT.name
_PR_SET_PDEATHSIG = 1


def exit_with_parent_if_requested() -> bool:
    """In a multiprocessing child with the variable set: SIGKILL when the parent exits. True when armed."""
    if not envs.EXIT_WITH_PARENT.get() or not sys.platform.startswith("linux"):
        return False
    parent = multiprocessing.parent_process()
    if parent is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent.pid:  # the parent was already gone before the guard was set
        os._exit(1)
    return True
