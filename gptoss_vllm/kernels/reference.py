"""Reference MXFP4 MoE: dequantise each used expert to float32 and multiply. Slow and plain, for tests."""

from __future__ import annotations

import torch

from gptoss_vllm.kernels.swiglu import gpt_oss_swiglu
from gptoss_vllm.quant import mxfp4


@torch.library.custom_op("gptoss_vllm::mxfp4_moe_reference", mutates_args=())
def mxfp4_moe_reference(
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
    """Routing-weighted sum over each token's top-k experts, all arithmetic in float32.

    Shapes: x (T, H); topk_ids/topk_weights (T, k); w13_blocks (E, 2I, H/32, 16), w13_scales (E, 2I, H/32),
    w13_bias (E, 2I); w2_blocks (E, H, I/32, 16), w2_scales (E, H, I/32), w2_bias (E, H).
    """
    xf = x.float()
    out = torch.zeros(x.shape[0], w2_blocks.shape[1], dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        tokens, slot = (topk_ids == e).nonzero(as_tuple=True)
        w13 = mxfp4.dequantize(w13_blocks[e], w13_scales[e])
        w2 = mxfp4.dequantize(w2_blocks[e], w2_scales[e])
        h = xf[tokens] @ w13.T + w13_bias[e].float()
        y = gpt_oss_swiglu(h, alpha, limit) @ w2.T + w2_bias[e].float()
        out.index_add_(0, tokens, y * topk_weights[tokens, slot].float().unsqueeze(1))
    return out.to(x.dtype)


@mxfp4_moe_reference.register_fake
def _fake(
    x, topk_ids, topk_weights, w13_blocks, w13_scales, w13_bias, w2_blocks, w2_scales, w2_bias, alpha, limit
):
    return x.new_empty((x.shape[0], w2_blocks.shape[1]))
