"""The project's user cache directory (built tokenizer, compiled kernels, built models).

``GPTOSS_VLLM_CACHE`` sets it; otherwise ``$XDG_CACHE_HOME/gptoss-vllm`` or ``~/.cache/gptoss-vllm``.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptoss_vllm import envs


def cache_root() -> Path:
    explicit = envs.CACHE.get()
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "gptoss-vllm"
