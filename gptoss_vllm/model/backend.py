"""Which implementation computes the gpt-oss experts, chosen once at model load.

- ``native``: vLLM's own MoE layer (its MXFP4 kernels on CUDA, ROCm, XPU and AMX CPUs; its bf16 MoE for
  bf16 checkpoints, everywhere). The plugin then steps aside entirely.
- ``cpu``: the plugin's CPU MXFP4 MoE (``torch.ops.gptoss_vllm.mxfp4_moe``), on any CPU.
- ``reference``: dequantise-and-matmul in float32, for tests.

``auto`` picks native where vLLM has it, else cpu. ``GPTOSS_VLLM_MOE_BACKEND`` overrides.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass

from gptoss_vllm import envs
from gptoss_vllm.model import ModelError

ENV_VAR = envs.MOE_BACKEND.name
BACKENDS = ("native", "cpu", "reference")
CHOICES = ("auto", *BACKENDS)

log = logging.getLogger("vllm." + __name__)  # under vLLM's logger: its handler, level and format
_announced: set[tuple[str, str]] = set()


class BackendUnavailableError(ModelError, RuntimeError):
    """The requested MoE backend cannot run on this platform or configuration."""


@dataclass(frozen=True)
class Platform:
    """What the backend choice depends on."""

    device: str  # "cpu", "cuda", "rocm", "xpu", ...
    cpu_has_amx: bool
    mxfp4_checkpoint: bool
    expert_parallel: bool = False

    def describe(self) -> str:
        if self.device == "cpu":
            arch = platform.machine() or "unknown CPU"
            return f"{arch} CPU {'with' if self.cpu_has_amx else 'without'} Intel AMX"
        return self.device.upper()


def current_platform_info(mxfp4_checkpoint: bool, expert_parallel: bool = False) -> Platform:
    """Read the platform from vLLM (call inside a vLLM process)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        device = "cuda"
    elif current_platform.is_rocm():
        device = "rocm"
    elif current_platform.is_xpu():
        device = "xpu"
    elif current_platform.is_cpu():
        device = "cpu"
    else:
        device = str(current_platform.device_type or "unknown")
    amx = False
    if device == "cpu":
        # The same test vLLM's CPU MXFP4 experts apply (x86 and AMX tiles).
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsMxfp4

        amx = bool(CPUExpertsMxfp4._supports_current_device())
    return Platform(device, amx, mxfp4_checkpoint, expert_parallel)


def unavailable_reason(backend: str, p: Platform) -> str | None:
    """Why ``backend`` cannot run on ``p``; None when it can."""
    if backend == "native":
        if not p.mxfp4_checkpoint or p.device in ("cuda", "rocm", "xpu"):
            return None
        if p.device == "cpu" and p.cpu_has_amx:
            return None
        return "vLLM's MXFP4 MoE on CPU needs Intel AMX (Sapphire Rapids or newer)"
    if p.expert_parallel:
        return "the plugin's experts do not support expert parallelism; use the native backend"
    if backend == "cpu" and p.device != "cpu":
        return f"the cpu backend runs on CPUs, not {p.device.upper()}"
    if backend == "reference" and p.device != "cpu":
        return f"the reference backend runs on CPUs, not {p.device.upper()}"
    return None


def choose_backend(p: Platform, requested: str | None = None) -> str:
    """Resolve ``requested`` (or the environment, or auto) to a backend that runs on ``p``."""
    requested = (requested if requested is not None else envs.MOE_BACKEND.get()).strip().lower() or "auto"
    if requested not in CHOICES:
        raise BackendUnavailableError(
            f"{ENV_VAR}={requested!r} is not a gpt-oss MoE backend; choose one of {', '.join(CHOICES)}"
        )
    if requested == "auto":
        for backend in ("native", "cpu"):
            if unavailable_reason(backend, p) is None:
                return backend
    elif unavailable_reason(requested, p) is None:
        return requested
    working = [b for b in BACKENDS if unavailable_reason(b, p) is None]
    reasons = "; ".join(f"{b}: {unavailable_reason(b, p)}" for b in BACKENDS if b not in working)
    raise BackendUnavailableError(
        f"gpt-oss MoE backend {requested!r} cannot run on this platform ({p.describe()}, "
        f"{'MXFP4' if p.mxfp4_checkpoint else 'bf16'} checkpoint): {reasons}. "
        f"Backends that work here: {', '.join(working) or 'none'} (set {ENV_VAR})."
    )


def announce(backend: str, p: Platform) -> None:
    """Log the choice once per process."""
    key = (backend, p.describe())
    if key in _announced:
        return
    _announced.add(key)
    why = {
        "native": "vLLM's own MoE kernels",
        "cpu": "the plugin's CPU MXFP4 kernel, weights stay MXFP4",
        "reference": "float32 dequantise-and-matmul, for tests only",
    }[backend]
    log.info("gpt-oss MoE backend: %s (%s) on %s", backend, why, p.describe())


def resolve_for_vllm(vllm_config) -> tuple[str, Platform]:
    """The backend for the model ``vllm_config`` describes (deterministic: every layer gets the same)."""
    hf_config = vllm_config.model_config.hf_config
    quant = getattr(hf_config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    p = current_platform_info(
        mxfp4_checkpoint=method in ("mxfp4", "gpt_oss_mxfp4"),
        expert_parallel=bool(getattr(vllm_config.parallel_config, "enable_expert_parallel", False)),
    )
    return choose_backend(p), p
