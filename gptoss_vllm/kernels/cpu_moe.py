"""CPU MXFP4 MoE in portable PyTorch, exposed as the torch op ``gptoss_vllm::mxfp4_moe``.

Tokens are grouped by expert; each active expert's MXFP4 weights are decoded to bf16 just before its two
matmuls and dropped after, so memory holds MXFP4 weights plus one expert in bf16 at most, never all of
them. Decoding uses a 256-entry table (one byte -> its two E2M1 values), one gather per byte.

The op is opaque to torch.compile (a fake implementation gives the output shape), so vLLM's compiled
graph keeps the data-dependent grouping out of tracing.
"""

from __future__ import annotations

import torch

from gptoss_vllm.kernels.swiglu import gpt_oss_swiglu
from gptoss_vllm.quant.mxfp4 import E8M0_BIAS, E8M0_NAN, FP4_VALUES

_TABLES: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def _table(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``pairs`` (256, 2): the (even, odd) E2M1 values of each byte; ``scales`` (256,): each E8M0 value."""
    key = (kind, device, dtype)
    if key not in _TABLES:
        byte = torch.arange(256)
        if kind == "pairs":
            values = torch.tensor(FP4_VALUES, dtype=torch.float32)
            table = torch.stack([values[byte & 0x0F], values[byte >> 4]], dim=1)
        else:
            table = torch.ldexp(torch.ones(256), byte - E8M0_BIAS)
            table[E8M0_NAN] = torch.nan
        _TABLES[key] = table.to(device, dtype)
    return _TABLES[key]


def decode_expert(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """One expert's (rows, K/32, 16) blocks and (rows, K/32) scales -> (rows, K) in ``dtype``."""
    rows, groups, _ = blocks.shape
    values = _table("pairs", blocks.device, dtype)[blocks.long()].reshape(rows, groups, 32)
    scale = _table("scales", blocks.device, dtype)[scales.long()]
    return (values * scale.unsqueeze(-1)).reshape(rows, groups * 32)


@torch.library.custom_op("gptoss_vllm::mxfp4_moe", mutates_args=())
def mxfp4_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_blocks: torch.Tensor,
    w13_scales: torch.Tensor,
    w13_bias: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_bias: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Routing-weighted sum of each token's top-k MXFP4 experts (shapes as in the reference)."""
    num_tokens, k = topk_ids.shape
    compute = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
    xc = x.to(compute)
    out = torch.zeros(num_tokens, w2_blocks.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13_blocks.shape[0]).tolist()
    tokens_sorted = order // k
    weights_sorted = topk_weights.reshape(-1)[order].float()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = tokens_sorted[start : start + n]
        w13 = decode_expert(w13_blocks[e], w13_scales[e], compute)
        h = torch.addmm(w13_bias[e].to(compute), xc[tokens], w13.T)
        act = gpt_oss_swiglu(h.float(), alpha, limit).to(compute)
        del w13
        w2 = decode_expert(w2_blocks[e], w2_scales[e], compute)
        y = torch.addmm(w2_bias[e].to(compute), act, w2.T)
        out.index_add_(0, tokens, y.float() * weights_sorted[start : start + n].unsqueeze(1))
        start += n
    return out.to(x.dtype)


@mxfp4_moe.register_fake
def _mxfp4_moe_fake(
    x, topk_ids, topk_weights, w13_blocks, w13_scales, w13_bias, w2_blocks, w2_scales, w2_bias, alpha, limit
):
    return x.new_empty((x.shape[0], w2_blocks.shape[1]))
