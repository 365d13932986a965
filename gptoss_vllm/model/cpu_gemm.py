"""The GEMM behind the model's bf16 linears on CPUs: vLLM's VNNI-packed kernel instead of its oneDNN handle.

On a CPU, vLLM gives every unquantized linear (attention's qkv and o, the router, an untied lm_head) a oneDNN
matmul on a packed copy of the weight, and keeps its own VNNI-packed kernel (``weight_packed_linear``, from
SGLang's CPU kernels) for small weights on AMX machines only. At decode's batch sizes these layers read their
weights once per step and nothing else: the faster weight stream wins. Measured side by side on a 2-core AMD
EPYC (AVX-512 BF16, no AMX), cold caches, gpt-oss-20b's shapes: the packed kernel is 1.34x oneDNN on qkv at
one token, 1.72x on o, 1.33x on the lm_head, 1.25-1.29x at four tokens, and within 5% of it at 64 and 512.
So every bf16 linear whose shape the packed kernel takes is packed for it, and the oneDNN copy is never made;
the original weight is dropped as vLLM drops it for its own packed paths. The packed copy is moved onto 2 MB
pages (``huge_pages``).

``GPTOSS_VLLM_CPU_GEMM=onednn`` keeps vLLM's choice (for side-by-side runs).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.platforms import current_platform

from gptoss_vllm import envs
from gptoss_vllm.model import ModelError
from gptoss_vllm.model.huge_pages import back_with_huge_pages

ENV_VAR = envs.CPU_GEMM.name
CHOICES = ("packed", "onednn")
_BLOCK = 32  # the packed layout's row block, and the K granule of its kernel


class CpuGemmError(ModelError, ValueError):
    """An unknown ``GPTOSS_VLLM_CPU_GEMM``; the message names the choices."""


def requested() -> str:
    choice = envs.CPU_GEMM.get().lower()
    if choice not in CHOICES:
        raise CpuGemmError(f"{ENV_VAR}={choice!r}: use one of {', '.join(CHOICES)}")
    return choice


def packed_kernel_fits(layer: nn.Module) -> bool:
    """Whether vLLM's packed kernel can take this layer's weight on this CPU."""
    weight = getattr(layer, "weight", None)
    if weight is None or weight.is_meta or weight.ndim != 2 or weight.dtype != torch.bfloat16:
        return False
    n, k = weight.shape
    if n % _BLOCK or k % _BLOCK:
        return False
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    return hasattr(torch.ops._C, "convert_weight_packed") and hasattr(torch.ops._C, "weight_packed_linear")


def pack_for_cpu(layer: nn.Module) -> bool:
    """Give ``layer`` vLLM's packed kernel (its weight replaced by the packed copy), as vLLM's own dispatch
    does for small weights on AMX; False, and nothing changed, where the kernel does not fit or is not asked."""
    if requested() != "packed" or not packed_kernel_fits(layer):
        return False
    from vllm import _custom_ops as ops

    n = layer.weight.shape[0]
    packed = torch.ops._C.convert_weight_packed(layer.weight)
    back_with_huge_pages(packed)  # streamed whole on every decode step
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias.data = bias.data.to(torch.float32)  # the kernel adds an fp32 bias
    layer.cpu_linear = lambda x, weight, bias: ops.weight_packed_linear_cpu(x, packed, n, bias)
    layer.weight = nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
    return True


class PackedLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear, with the packed kernel on CPU where it fits (else vLLM's dispatch)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if current_platform.is_cpu() and pack_for_cpu(layer):
            return
        super().process_weights_after_loading(layer)


def pack_linears(model: nn.Module) -> int:
    """On CPU, every unquantized linear of ``model`` takes ``PackedLinearMethod``; returns how many."""
    if not current_platform.is_cpu() or requested() != "packed":
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, LinearBase) and type(module.quant_method) is UnquantizedLinearMethod:
            module.quant_method = PackedLinearMethod()
            count += 1
    return count
