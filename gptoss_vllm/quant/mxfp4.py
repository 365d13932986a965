"""MXFP4 (OCP Microscaling v1.0, E2M1 elements + E8M0 block scales) in the HF gpt-oss layout.

Layout, as in the openai/gpt-oss checkpoints: a float tensor ``[..., K]`` becomes
``blocks`` uint8 ``[..., K/32, 16]`` (two E2M1 codes per byte, the even element in the low nibble)
and ``scales`` uint8 ``[..., K/32]`` (E8M0: value ``2**(byte - 127)``, ``0xFF`` = NaN).

Quantisation follows the OCP MX v1.0 rule: the block's shared exponent is
``floor(log2(amax)) - 2`` (2 is the largest exponent of E2M1), elements divided by
``2**shared_exp`` are rounded to the nearest E2M1 value (ties to the even code) and saturated at
+-6. We keep the OCP rule rather than the round-the-scale-up rule of triton_kernels' downcast because
it is the published standard and it makes the round trip ``quantize(dequantize(q)) == q`` byte-exact
(the block maximum always lands on code 4 or 6), which checkpoint conversion relies on.
"""

from __future__ import annotations

import torch

from gptoss_vllm.quant import QuantError

BLOCK_SIZE = 32
"""Elements sharing one E8M0 scale."""

BYTES_PER_BLOCK = BLOCK_SIZE // 2
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E2M1_EMAX = 2
E2M1_MAX = 6.0

# E2M1 value of each 4-bit code; bit 3 is the sign.
FP4_VALUES = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

# Midpoints between consecutive E2M1 magnitudes, and whether a tie there rounds up
# (round half to even: the upper neighbour's code is even).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_ROUNDS_UP = (False, True, False, True, False, True, False)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class MXFP4FormatError(QuantError, ValueError):
    """A tensor does not have the shape or dtype the MXFP4 layout requires."""


def _check_quantizable(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise MXFP4FormatError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise MXFP4FormatError(
            f"MXFP4 quantisation needs a floating-point tensor (float32, float16, bfloat16, float64), "
            f"got {x.dtype}"
        )
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        last = x.shape[-1] if x.dim() else "a scalar"
        raise MXFP4FormatError(
            f"MXFP4 quantises along the last dimension in blocks of {BLOCK_SIZE}; "
            f"shape {tuple(x.shape)} has last dimension {last}, which is not a positive multiple of {BLOCK_SIZE}"
        )


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Round float32 values (already divided by the block scale) to E2M1 codes (uint8, 0..15)."""
    mag = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for mid, up in zip(_MIDPOINTS, _TIE_ROUNDS_UP, strict=True):
        code += (mag >= mid if up else mag > mid).to(torch.uint8)
    # Saturation is implicit: everything above 5 is code 7 (6.0). NaN compares false: code 0.
    # signbit, not v < 0: -0.0 keeps its sign, so quantize(dequantize(q)) reproduces q byte for byte.
    code |= torch.signbit(v).to(torch.uint8) << 3
    return code


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` along its last dimension; returns ``(blocks, scales)`` in the HF gpt-oss layout.

    A block holding NaN or +-inf gets the NaN scale (0xFF), as the OCP spec prescribes; an all-zero
    block gets the smallest scale (byte 0).
    """
    _check_quantizable(x)
    *prefix, k = x.shape
    xb = x.detach().to(torch.float32).reshape(*prefix, k // BLOCK_SIZE, BLOCK_SIZE)
    amax = xb.abs().amax(dim=-1)
    finite = torch.isfinite(amax)
    safe_amax = torch.where(finite & (amax > 0), amax, torch.ones_like(amax))
    # frexp gives amax = m * 2**e with m in [0.5, 1): floor(log2(amax)) = e - 1, exact for subnormals too.
    _, exp = torch.frexp(safe_amax)
    shared_exp = (exp.to(torch.int32) - 1 - E2M1_EMAX).clamp(-E8M0_BIAS, E8M0_BIAS)
    shared_exp = torch.where(amax > 0, shared_exp, torch.full_like(shared_exp, -E8M0_BIAS))
    # 2**-shared_exp is exact in float32 over the whole E8M0 range [-127, 127].
    scaled = torch.ldexp(xb, -shared_exp.unsqueeze(-1))
    codes = e2m1_codes(scaled)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (shared_exp + E8M0_BIAS).to(torch.uint8)
    scales = torch.where(finite, scales, torch.full_like(scales, E8M0_NAN))
    return blocks.contiguous(), scales.contiguous()


def _check_packed(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    for name, t in (("blocks", blocks), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise MXFP4FormatError(f"MXFP4 {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise MXFP4FormatError(f"MXFP4 {name} must be uint8, got {t.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise MXFP4FormatError(
            f"MXFP4 blocks must have shape [..., K/{BLOCK_SIZE}, {BYTES_PER_BLOCK}], got {tuple(blocks.shape)}"
        )
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise MXFP4FormatError(
            f"MXFP4 scales shape {tuple(scales.shape)} does not match blocks shape {tuple(blocks.shape)}: "
            f"expected {tuple(blocks.shape[:-1])}"
        )


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantise ``(blocks, scales)`` to ``[..., K]`` in ``dtype``; a 0xFF scale gives NaN.

    Values are formed exactly in float32 (an E2M1 value times a power of two), then cast, so the result
    is bit-identical to transformers' ``convert_moe_packed_tensors`` for every finite scale.
    """
    _check_packed(blocks, scales)
    if dtype not in _FLOAT_DTYPES:
        raise MXFP4FormatError(
            f"cannot dequantise MXFP4 to {dtype}; use float32, bfloat16, float16 or float64"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    *prefix, groups, _ = blocks.shape
    values = torch.empty(*prefix, groups, BLOCK_SIZE, dtype=torch.float32, device=blocks.device)
    values[..., 0::2] = lut[(blocks & 0x0F).long()]
    values[..., 1::2] = lut[(blocks >> 4).long()]
    exp = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(values, exp.unsqueeze(-1))
    values = torch.where((scales == E8M0_NAN).unsqueeze(-1), torch.nan, values)
    return values.reshape(*prefix, groups * BLOCK_SIZE).to(dtype)


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``(blocks, scales)`` for a float tensor of ``shape``."""
    *prefix, k = shape
    if k % BLOCK_SIZE:
        raise MXFP4FormatError(
            f"last dimension {k} of shape {tuple(shape)} is not a multiple of {BLOCK_SIZE}"
        )
    return (*prefix, k // BLOCK_SIZE, BYTES_PER_BLOCK), (*prefix, k // BLOCK_SIZE)
