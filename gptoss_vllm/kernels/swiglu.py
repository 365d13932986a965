"""The gpt-oss SwiGLU variant, shared by every expert implementation in Python."""

from __future__ import annotations

import torch


def gpt_oss_swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """``h`` holds interleaved (gate, linear) pairs along the last dim; returns half as many features.

    ``g = min(g, limit); l = clamp(l, -limit, limit); out = g * sigmoid(alpha * g) * (l + 1)``.
    """
    gate = h[..., 0::2].clamp(max=limit)
    linear = h[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)
