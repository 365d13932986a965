"""What an eager (uncompiled) run on CPU skips: costs vLLM pays per layer for a torch.compile that is not running.

**RMSNorm on vLLM's fused kernels.** vLLM routes RMSNorm through its IR ops (``vllm.ir.ops.rms_norm``,
``fused_add_rms_norm``). On CUDA an eager run dispatches them to the ``vllm_c`` kernels and a compiled run to
``native`` (which Inductor fuses); on CPU only ``native`` is offered, so an eager step runs each of gpt-oss's 49
norms as about ten ATen ops. vLLM's CPU build ships the fused kernels all the same (``torch.ops._C.rms_norm``,
``torch.ops._C.fused_add_rms_norm``): one token of gpt-oss's 2880, 44 us native against 6.5 us fused (2-core
AMD EPYC). They are registered as the IR provider ``gptoss_cpu`` (the plugin imports this module, so that the
provider exists before vLLM sets each op's priority in the worker) and put first where the priority is vLLM's
CPU default, ``native`` alone (vLLM's filtering leaves an explicit ``--ir-op-priority native`` the same list;
a compiled run, where Inductor fuses the native norms, is left alone).

**Attention called, not dispatched.** On CPU vLLM registers attention and its KV-cache write as opaque custom
ops so that torch.compile does not trace into them; an eager run still goes through the dispatcher for both, in
every layer. With nothing compiled, the layers call the same functions directly (``Attention.use_direct_call``,
what vLLM does on platforms whose attention is not opaque).

Together, on gpt-oss-20b's decode step (2-core AMD EPYC, CPU time outside the weight kernels under the
profiler, median of three): 15.8 ms, 12.5 with the norms, 13.0 with direct attention, 9.0 with both.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from vllm import ir
from vllm.platforms import current_platform

log = logging.getLogger("vllm." + __name__)

PROVIDER = "gptoss_cpu"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED = current_platform.is_cpu()  # registered by the plugin, before vLLM has loaded its kernels


def _kernels_loaded() -> bool:
    return all(hasattr(torch.ops._C, name) for name in ("rms_norm", "fused_add_rms_norm"))


def _fits(x: Tensor, weight: Tensor | None, variance_size: int | None) -> bool:
    return (
        variance_size is None
        and weight is not None
        and weight.dtype == x.dtype
        and x.dtype in _DTYPES
        and x.is_contiguous()
        and x.shape[-1] == weight.shape[0]
    )


@ir.ops.rms_norm.register_impl(
    PROVIDER,
    supported=_SUPPORTED,
    supports_args=lambda x, weight, epsilon, variance_size=None: _fits(x, weight, variance_size),
)
def rms_norm(x: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None) -> Tensor:
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


@ir.ops.fused_add_rms_norm.register_impl(
    PROVIDER,
    supported=_SUPPORTED,
    supports_args=lambda x, x_residual, weight, epsilon, variance_size=None: (
        _fits(x, weight, variance_size)
        and x_residual.dtype == x.dtype
        and x_residual.is_contiguous()
        and x_residual.shape == x.shape
    ),
    inplace=True,
)
def fused_add_rms_norm(
    x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float, variance_size: int | None = None
) -> tuple[Tensor, Tensor]:
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)  # x_residual += x; x = norm(x_residual)
    return x, x_residual


def is_eager_cpu(vllm_config) -> bool:
    """Whether this engine runs on CPU with nothing compiled."""
    from vllm.config import CompilationMode

    return current_platform.is_cpu() and vllm_config.compilation_config.mode == CompilationMode.NONE


def prefer_fused_norms() -> bool:
    """Make ``gptoss_cpu`` the norms' first choice where the priority is still the platform's default
    (``native`` alone); True where it changed anything."""
    if not _SUPPORTED or not _kernels_loaded():
        return False
    changed = False
    for op in (ir.ops.rms_norm, ir.ops.fused_add_rms_norm):
        if op.get_priority() == ["native"]:
            op.set_default([PROVIDER, "native"])
            changed = True
    return changed


def call_attention_directly(model: nn.Module) -> int:
    """Every vLLM attention layer of ``model`` calls its kernels without the dispatcher; returns how many."""
    # vLLM's model code: imported here, not when the plugin imports this module in every process.
    from vllm.model_executor.layers.attention.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.use_direct_call = True
    return len(layers)


def skip_compile_dispatch(model: nn.Module, vllm_config) -> None:
    """On CPU with nothing compiled: the fused norms and direct attention calls (elsewhere nothing changes)."""
    if not is_eager_cpu(vllm_config):
        return
    norms = prefer_fused_norms()
    direct = call_attention_directly(model)
    log.info(
        "gpt-oss on CPU, eager: RMSNorm on %s, %d attention layers called directly (model/cpu_eager.py)",
        "vLLM's fused CPU kernels" if norms else f"{ir.ops.rms_norm.get_priority()}",
        direct,
    )
