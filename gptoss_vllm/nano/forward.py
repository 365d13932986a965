"""A training-only forward of ``GptOssForCausalLM`` in plain torch: the same math, a fraction of the overhead.

HF's eager forward is built for big models: a python loop over the experts with gathers and scatters, masks
built per call, attention through a generic interface. At nano's sizes that overhead dominates a step. This
forward reads the very parameters of an HF model (so the state dict, the asset and its expansion are
unchanged, and ``quantised_experts`` swaps work as before) and computes

* the top-k experts of every token with one gather, one matmul per expert on a contiguous slice and one
  scatter (HF gathers and scatters per expert; computing all experts densely was slower, measured);
* attention through torch's fused scaled-dot-product kernel, the sink as an extra key, causal and
  sliding-window masks as HF draws them (a key is visible when ``q - window < k <= q``);
* YaRN rope from HF's own rotary module.

It takes right-padded batches without a padding mask: with right padding a real token never sees a pad (they
come after it), so its logits are HF's; the pads' own logits are garbage that the loss ignores.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gptoss_vllm.kernels.swiglu import gpt_oss_swiglu


def _rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    x = x.float()
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _attention(
    attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    batch, length, _ = x.shape
    heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    q = attn.q_proj(x).view(batch, length, heads, dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, kv_heads, dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, length, kv_heads, dim).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    # The sink as one more key that every query sees, with a zero value and the logit sinks[head]: one extra
    # dimension carries it (the query's is the head's sink, the sink key's 1/scale, every real key's 0), so
    # torch's fused attention (which needs equal q/k/v widths: v gets the zero dimension too) does the rest.
    q = torch.cat([q, attn.sinks.view(1, heads, 1, 1).expand(batch, heads, length, 1)], dim=-1)
    sink_key = F.pad(torch.ones(1, 1, 1, 1) / attn.scaling, (dim, 0)).expand(batch, kv_heads, 1, dim + 1)
    k = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)
    v = F.pad(v, (0, 1, 1, 0))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=F.pad(visible, (1, 0), value=True), scale=attn.scaling, enable_gqa=True
    )
    out = out[..., :dim].transpose(1, 2).reshape(batch, length, heads * dim)
    return attn.o_proj(out)


def _experts(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    router, experts = mlp.router, mlp.experts
    flat = x.reshape(-1, x.shape[-1])
    logits = F.linear(flat, router.weight, router.bias)
    top, chosen = torch.topk(logits, router.top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    # Each (token, expert) pair once, grouped by expert: one matmul per expert on a contiguous slice.
    order = chosen.reshape(-1).argsort(stable=True)
    token = order // router.top_k
    counts = torch.bincount(chosen.reshape(-1), minlength=experts.num_experts).tolist()
    gate_up = torch.cat(
        [
            rows @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            for e, rows in enumerate(flat[token].split(counts))
        ]
    )
    hidden = gpt_oss_swiglu(gate_up, experts.alpha, experts.limit)
    out = torch.cat(
        [
            rows @ experts.down_proj[e] + experts.down_proj_bias[e]
            for e, rows in enumerate(hidden.split(counts))
        ]
    )
    return torch.zeros_like(flat).index_add(0, token, out * weights.reshape(-1)[order, None]).view_as(x)


def _visible(length: int, window: int | None) -> torch.Tensor:
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    visible = k <= q
    if window is not None:
        visible &= k > q - window
    return visible


def forward_logits(model: Any, input_ids: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
    """``model(input_ids).logits`` of an HF ``GptOssForCausalLM`` (fp32 weights), for right-padded batches;
    with the boolean mask ``at`` (batch, length), only those positions' logits, in order (2-d)."""
    inner, config = model.model, model.config
    length = input_ids.shape[1]
    x = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(x, torch.arange(length)[None])
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    masks = {
        "full_attention": _visible(length, None),
        "sliding_attention": _visible(length, config.sliding_window),
    }
    for layer, kind in zip(inner.layers, config.layer_types, strict=True):
        x = x + _attention(layer.self_attn, _rms_norm(x, layer.input_layernorm), cos, sin, masks[kind])
        x = x + _experts(layer.mlp, _rms_norm(x, layer.post_attention_layernorm))
    hidden = _rms_norm(x, inner.norm)
    return model.lm_head(hidden if at is None else hidden[at])
