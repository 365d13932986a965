"""Every environment variable gptoss-vllm reads, declared once: its name, type, default and what it does.

One prefix, ``GPTOSS_VLLM_``. Names the project used before (``GPTOSS_METRICS_PORT``, ...) are still read, with
a warning naming the new one, when the new one is not set. Modules read a variable through its declaration
(``envs.METRICS_PORT.get()``), or through ``lookup(name)`` where a config key names the variable
(``ingress.monitoring_token_env``); no other module reads a ``GPTOSS_`` variable (``tests/test_envs.py``).
The README's table of variables is ``table()``'s output, checked by the same test.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "GPTOSS_VLLM_"
log = logging.getLogger(__name__)
_warned: set[str] = set()


class EnvError(ValueError):
    """A variable set to a value its type cannot take; the message names the variable and the value."""


@dataclass(frozen=True)
class EnvVar:
    name: str
    type: type
    default: Any
    doc: str
    old: tuple[str, ...] = field(default=())  # names read before, still accepted

    def raw(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The variable's text (in ``environ``, default this process's): its own name's, else a former name's
        (with a warning once), else None."""
        environ = os.environ if environ is None else environ
        value = environ.get(self.name)
        if value is not None:
            return value
        for old in self.old:
            value = environ.get(old)
            if value is not None:
                if old not in _warned:
                    _warned.add(old)
                    log.warning("%s is deprecated: set %s instead (read it this time)", old, self.name)
                return value
        return None

    def get(self) -> Any:
        """The typed value, or the default when unset or empty."""
        text = self.raw()
        if text is None or text.strip() == "":
            return self.default
        if self.type is str:
            return text.strip()
        if self.type is bool:
            if text.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if text.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise EnvError(f"{self.name}={text!r}: expected 1 or 0")
        try:
            return self.type(text.strip())
        except ValueError:
            raise EnvError(f"{self.name}={text!r}: expected {self.type.__name__}") from None

    def is_set(self) -> bool:
        return self.raw() is not None


def _var(suffix: str, kind: type, default: Any, doc: str, *old: str) -> EnvVar:
    return EnvVar(PREFIX + suffix, kind, default, doc, old)


# ---------------------------------------------------------------------------------------------- the plugin
MOE_BACKEND = _var(
    "MOE_BACKEND", str, "auto", "MoE backend: auto, native (vLLM's), cpu (the plugin's kernel) or reference"
)
CPU_ISA = _var("CPU_ISA", str, "auto", "caps the CPU kernel's instruction set: avx512, avx2 or portable")
CPU_GEMM_MIN_TOKENS = _var(
    "CPU_GEMM_MIN_TOKENS",
    int,
    24,
    "tokens per expert from which the CPU kernel decodes tiles for ATen's GEMM; 0: never",
)
CPU_GEMM = _var(
    "CPU_GEMM", str, "packed", "bf16 linears on CPU: packed (vLLM's weight_packed_linear) or onednn"
)
CACHE = _var(
    "CACHE", str, "", "cache of built models, kernels and llama.cpp (default $XDG_CACHE_HOME/gptoss-vllm)"
)
EXIT_WITH_PARENT = _var("EXIT_WITH_PARENT", bool, False, "1: a started process dies with its parent (Linux)")

# ------------------------------------------------------------------------------------------------- serving
METRICS_PORT = _var(
    "METRICS_PORT",
    int,
    None,
    "first port tried for each replica's metrics (unset: an ephemeral port)",
    "GPTOSS_METRICS_PORT",
)
METRICS_PORT_COUNT = _var(
    "METRICS_PORT_COUNT", int, 16, "ports from METRICS_PORT the drain hook reads", "GPTOSS_METRICS_PORT_COUNT"
)
DRAIN_POLL_S = _var(
    "DRAIN_POLL_S", float, 5.0, "seconds between the drain hook's reads", "GPTOSS_DRAIN_POLL_S"
)
MAX_BODY_BYTES = _var(
    "MAX_BODY_BYTES", int, (1 << 20) + 32 * 131072, "the proxy gate's largest request body (413); serve sets it from the pools' max_model_len",
    "GPTOSS_MAX_BODY_BYTES",
)  # fmt: skip
MAX_HEADER_BYTES = _var(
    "MAX_HEADER_BYTES", int, 32768, "the proxy gate's largest header block (431)", "GPTOSS_MAX_HEADER_BYTES"
)
BODY_TIMEOUT_S = _var(
    "BODY_TIMEOUT_S",
    float,
    30.0,
    "the proxy gate: seconds a client may take to send its body (408)",
    "GPTOSS_BODY_TIMEOUT_S",
)
MAX_JSON_DEPTH = _var(
    "MAX_JSON_DEPTH",
    int,
    64,
    "the proxy gate's JSON body: nesting depth (serve sets it from ingress.body_shape)",
    "GPTOSS_MAX_JSON_DEPTH",
)
MAX_JSON_OBJECT_MEMBERS = _var(
    "MAX_JSON_OBJECT_MEMBERS",
    int,
    10_000,
    "the proxy gate's JSON body: members per object (serve sets it from ingress.body_shape)",
    "GPTOSS_MAX_JSON_OBJECT_MEMBERS",
)
MAX_JSON_ARRAY_ITEMS = _var(
    "MAX_JSON_ARRAY_ITEMS",
    int,
    262_144,
    "the proxy gate's JSON body: items per array (serve sets it from ingress.body_shape)",
    "GPTOSS_MAX_JSON_ARRAY_ITEMS",
)
MAX_JSON_STRING_BYTES = _var(
    "MAX_JSON_STRING_BYTES",
    int,
    1 << 20,
    "the proxy gate's JSON body: bytes of one string (serve sets it from ingress.body_shape)",
    "GPTOSS_MAX_JSON_STRING_BYTES",
)
MAX_JSON_WORD_BYTES = _var(
    "MAX_JSON_WORD_BYTES",
    int,
    32768,
    "the proxy gate's JSON body: bytes of one run of letters (serve sets it from ingress.body_shape)",
    "GPTOSS_MAX_JSON_WORD_BYTES",
)
MONITORING_TOKEN = _var(
    "MONITORING_TOKEN", str, "", "bearer token of GET /metrics/targets (ingress.monitoring_token_env's default)",
    "GPTOSS_MONITORING_TOKEN",
)  # fmt: skip
RESPONSE_STORE_PASSWORD = _var(
    "RESPONSE_STORE_PASSWORD", str, "", "redis password of the response store (response_store.password_env's default)",
    "GPTOSS_RESPONSE_STORE_PASSWORD",
)  # fmt: skip

# ---------------------------------------------------------------------------------------------- load tests
PROFILE = _var(
    "PROFILE",
    str,
    "interactive",
    "gptoss_vllm/loadtest/locustfile.py: the workload profile",
    "GPTOSS_PROFILE",
)
MODEL = _var(
    "MODEL",
    str,
    "gpt-oss-nano",
    "gptoss_vllm/loadtest/locustfile.py: the served model's name",
    "GPTOSS_MODEL",
)

ALL: tuple[EnvVar, ...] = tuple(v for v in globals().values() if isinstance(v, EnvVar))
_BY_NAME = {v.name: v for v in ALL} | {old: v for v in ALL for old in v.old}


def lookup(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The text of a variable a config key (or a former name) names: a declared one with its former names,
    else as set. ``environ``: where to look (default this process's environment)."""
    declared = _BY_NAME.get(name)
    if declared is not None:
        return declared.raw(environ)
    return (os.environ if environ is None else environ).get(name)


def table() -> str:
    """The README's table of variables (Markdown)."""
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    for var in ALL:
        default = "" if var.default in ("", None) else f"`{var.default}`"
        formerly = f" (formerly `{'`, `'.join(var.old)}`)" if var.old else ""
        rows.append(f"| `{var.name}` | {var.type.__name__} | {default} | {var.doc}{formerly} |")
    return "\n".join(rows)
