"""MXFP4 format: bit-exactness against transformers, OCP rounding rule, round trips and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_vllm.quant import mxfp4

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so NaN and -0.0 compare by their bit patterns."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_is_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (4, 48, 6, 16), generator=gen, dtype=torch.uint8)
    # Every finite E8M0 scale, extremes included (overflow to inf, subnormal results).
    scales = torch.randint(0, 255, (4, 48, 6), generator=gen, dtype=torch.uint8)
    scales[0, 0, :] = torch.tensor([0, 1, 127, 200, 253, 254], dtype=torch.uint8)
    ours = mxfp4.dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, K, rows): transposed
    assert theirs.shape == ours.transpose(1, 2).shape
    assert torch.equal(_bits(ours.transpose(1, 2).contiguous()), _bits(theirs))


def test_nan_scale_gives_nan() -> None:
    blocks = torch.randint(0, 256, (3, 2, 16), dtype=torch.uint8)
    scales = torch.tensor([[127, 255], [255, 0], [1, 2]], dtype=torch.uint8)
    out = mxfp4.dequantize(blocks, scales)
    assert out.shape == (3, 64)
    nan_blocks = out.reshape(3, 2, 32).isnan().all(dim=-1)
    assert nan_blocks.tolist() == [[False, True], [True, False], [False, False]]
    assert not out.reshape(3, 2, 32)[~nan_blocks].isnan().any()


def test_nibble_order_and_value_table() -> None:
    # Byte 0x71: low nibble 1 (+0.5) is element 0, high nibble 7 (+6.0) is element 1.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x71
    blocks[0, 0, 1] = 0xF8  # -0.0 then -6.0
    out = mxfp4.dequantize(blocks, torch.tensor([[127]], dtype=torch.uint8))
    assert out[0, :4].tolist() == [0.5, 6.0, -0.0, -6.0]
    assert math.copysign(1.0, out[0, 2].item()) == -1.0
    scaled = mxfp4.dequantize(blocks, torch.tensor([[130]], dtype=torch.uint8))
    assert scaled[0, :2].tolist() == [4.0, 48.0]


def _reference_shared_exp(block: torch.Tensor) -> int:
    amax = block.abs().max().item()
    return min(max(math.floor(math.log2(amax)) - 2, -127), 127) if amax > 0 else -127


finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=300, deadline=None)
@given(st.lists(finite_floats, min_size=32, max_size=32), st.integers(min_value=-60, max_value=60))
def test_quantize_follows_the_ocp_rule(values: list[float], shift: int) -> None:
    x = torch.ldexp(torch.tensor(values, dtype=torch.float32), torch.tensor(shift)).reshape(1, 32)
    blocks, scales = mxfp4.quantize(x)
    assert blocks.shape == (1, 1, 16) and scales.shape == (1, 1)
    shared = _reference_shared_exp(x[0])
    assert scales.item() == shared + 127
    q = mxfp4.dequantize(blocks, scales, torch.float64)[0]
    v = x[0].double() / 2.0**shared
    grid = torch.cat([-GRID.flip(0), GRID]) * 2.0**shared
    err = (x[0].double() - q).abs()
    best = (x[0].double().unsqueeze(1) - grid.unsqueeze(0)).abs().min(dim=1).values
    # Nearest grid value (saturation at +-6 included) ...
    assert torch.all(err <= best + 1e-12 * 2.0**shared)
    # ... within half a grid step of the element's magnitude, or clipped by less than 2 steps.
    bound = torch.where(
        v.abs() <= 2, 0.25, torch.where(v.abs() <= 4, 0.5, torch.where(v.abs() <= 6, 1.0, 2.0))
    )
    assert torch.all(err <= bound * 2.0**shared)
    # Error relative to the block maximum stays under a quarter of it (the worst case is saturation).
    assert torch.all(err <= x[0].abs().max().double() / 4 + 1e-30)


def test_ties_round_to_even_code() -> None:
    # Scale 2**0: a block maximum of 4 keeps the shared exponent at 0, so elements land on the grid directly.
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]
    x = torch.zeros(1, 32)
    x[0, : len(ties)] = torch.tensor(ties)
    x[0, 31] = 4.0
    blocks, scales = mxfp4.quantize(x)
    assert scales.item() == 127
    q = mxfp4.dequantize(blocks, scales)[0]
    assert q[: len(ties)].tolist() == expected


def test_saturation_and_specials() -> None:
    x = torch.zeros(4, 32)
    x[0, 0], x[0, 1] = 7.9, -7.9  # amax in [4, 8): scale 1, saturates to +-6
    x[1, 0] = float("nan")
    x[2, 0] = float("inf")
    blocks, scales = mxfp4.quantize(x)
    assert scales.reshape(-1).tolist() == [127, 255, 255, 0]
    q = mxfp4.dequantize(blocks, scales)
    assert q[0, :2].tolist() == [6.0, -6.0]
    assert q[1].isnan().all() and q[2].isnan().all()
    assert torch.equal(q[3], torch.zeros(32))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=15), min_size=32, max_size=32),
    st.sampled_from([4.0, 6.0, -4.0, -6.0]),
    st.integers(min_value=-120, max_value=120),
)
def test_representable_values_round_trip_exactly(codes: list[int], peak: float, exp: int) -> None:
    values = torch.tensor([mxfp4.FP4_VALUES[c] for c in codes], dtype=torch.float32)
    values[7] = peak  # a block whose maximum is 4 or 6 keeps its scale under the OCP rule
    x = torch.ldexp(values, torch.tensor(exp)).reshape(1, 32)
    blocks, scales = mxfp4.quantize(x)
    assert scales.item() == exp + 127
    codes[7] = mxfp4.FP4_VALUES.index(peak)
    expected = [codes[i] | (codes[i + 1] << 4) for i in range(0, 32, 2)]
    assert blocks.reshape(-1).tolist() == expected  # byte for byte, -0.0 included
    assert torch.equal(mxfp4.dequantize(blocks, scales), x)
    again = mxfp4.quantize(mxfp4.dequantize(blocks, scales))
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_quantize_accepts_every_float_dtype_and_leading_dims() -> None:
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    ref = mxfp4.quantize(x)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        b, s = mxfp4.quantize(x.to(dtype).float().to(dtype))
        assert b.shape == (2, 3, 2, 16) and s.shape == (2, 3, 2)
    assert ref[0].dtype == torch.uint8 and ref[1].dtype == torch.uint8


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(4, 33), "not a positive multiple of 32"),
        (torch.zeros(4, 0), "not a positive multiple of 32"),
        (torch.tensor(1.0), "a scalar"),
        (torch.zeros(4, 32, dtype=torch.int32), "floating-point"),
    ],
)
def test_quantize_rejects_bad_input(tensor: torch.Tensor, message: str) -> None:
    with pytest.raises(mxfp4.MXFP4FormatError, match=message):
        mxfp4.quantize(tensor)


def test_dequantize_rejects_bad_input() -> None:
    blocks = torch.zeros(2, 3, 16, dtype=torch.uint8)
    with pytest.raises(mxfp4.MXFP4FormatError, match=r"scales shape \(2, 4\) does not match"):
        mxfp4.dequantize(blocks, torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(mxfp4.MXFP4FormatError, match="scales must be uint8"):
        mxfp4.dequantize(blocks, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(mxfp4.MXFP4FormatError, match=r"\[\.\.\., K/32, 16\]"):
        mxfp4.dequantize(torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(mxfp4.MXFP4FormatError, match=r"cannot dequantise MXFP4 to torch\.int8"):
        mxfp4.dequantize(blocks, torch.zeros(2, 3, dtype=torch.uint8), torch.int8)
