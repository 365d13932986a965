"""The C++ CPU MXFP4 MoE kernel against the float32 reference, on every ISA path this CPU can run.

The kernel reads weights pre-packed by ``cpu_moe.prepack``; the reference reads the checkpoint layout.

Bounds. The portable and AVX2 paths compute in fp32 from fp32 activations: sums of up to 2880 products
round at 2**-24 each, so they stay within 1e-3 of the output's largest magnitude (a generous multiple of
K * 2**-24). The AVX-512 path quantises the activations and the SwiGLU output to int8 per 32-element block
at small batches (each element off by at most 1/254 of its block's largest magnitude) and to bf16 (2**-9
relative) on the GEMM path, before fp32-accumulated dot products, so its bound is 2**-5 of the largest
magnitude.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess

import pytest
import torch

from gptoss_vllm.kernels import cpu_moe
from gptoss_vllm.kernels.reference import mxfp4_moe_reference

BOUNDS = {"portable": 1e-3, "avx2": 1e-3, "avx512": 2**-5}


@functools.cache
def _best_isa() -> str:
    """The best path this CPU runs, whatever the environment caps it to."""
    saved = os.environ.pop(cpu_moe.ISA_ENV, None)
    try:
        return cpu_moe.kernel_isa()
    finally:
        if saved is not None:
            os.environ[cpu_moe.ISA_ENV] = saved


# The kernel's own list (it is compiled here, while collecting, on the first run against a fresh cache).
ISAS = cpu_moe.isa_names()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    if ISAS.index(request.param) > ISAS.index(_best_isa()):
        pytest.skip(f"this CPU has no {request.param} (its best path is {_best_isa()})")
    monkeypatch.setenv(cpu_moe.ISA_ENV, request.param)
    assert cpu_moe.kernel_isa() == request.param
    return request.param


def _problem(m: int, e: int, k: int, h: int, i: int, seed: int, scale_range=(118, 127)):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randint(0, 256, (e, 2 * i, h // 32, 16), generator=g, dtype=torch.uint8)
    s13 = torch.randint(*scale_range, (e, 2 * i, h // 32), generator=g, dtype=torch.uint8)
    w2 = torch.randint(0, 256, (e, h, i // 32, 16), generator=g, dtype=torch.uint8)
    s2 = torch.randint(*scale_range, (e, h, i // 32), generator=g, dtype=torch.uint8)
    b13, b2 = torch.randn(e, 2 * i, generator=g) * 0.1, torch.randn(e, h, generator=g) * 0.1
    x = torch.randn(m, h, generator=g)
    logits = torch.randn(m, e, generator=g)
    top, ids = logits.topk(k, dim=-1)
    return x, ids, top.softmax(-1), [w13, s13, b13, w2, s2, b2]


def _packed(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    w13, s13, b13, w2, s2, b2 = weights
    return [*cpu_moe.prepack(w13, s13), b13, *cpu_moe.prepack(w2, s2), b2]


def _compare(x, ids, tw, weights, isa: str) -> None:
    # fp32 paths get fp32 activations; the AVX-512 path gets bf16 ones, as vLLM gives it.
    xin = x.bfloat16() if isa == "avx512" else x
    got = cpu_moe.mxfp4_moe(xin, ids, tw, *_packed(weights), 1.702, 7.0).float()
    want = mxfp4_moe_reference(xin.float(), ids, tw, *weights, 1.702, 7.0)
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    scale = want[finite].abs().max().clamp(min=1e-6)
    err = (got[finite] - want[finite]).abs().max()
    assert err <= BOUNDS[isa] * scale, f"{isa}: max error {err:.3g} vs bound {BOUNDS[isa] * scale:.3g}"


@pytest.mark.parametrize(
    ("m", "e", "k", "h", "i"),
    [
        (1, 4, 1, 64, 32),
        (2, 8, 2, 96, 64),
        (7, 16, 4, 128, 96),
        (13, 32, 4, 160, 128),
        (97, 128, 4, 64, 64),
        (600, 8, 3, 64, 32),
        (5, 4, 4, 2880, 2880),
    ],
)
def test_random_shapes(isa: str, m: int, e: int, k: int, h: int, i: int) -> None:
    _compare(*_problem(m, e, k, h, i, seed=m * 1000 + e), isa)


def test_all_zero_blocks_give_the_bias_path(isa: str) -> None:
    x, ids, tw, weights = _problem(9, 4, 2, 64, 64, seed=1)
    weights[0].zero_()
    weights[3].zero_()
    _compare(x, ids, tw, weights, isa)


def test_nan_scales_poison_exactly_the_tokens_that_use_them(isa: str) -> None:
    x, ids, tw, weights = _problem(11, 8, 2, 64, 64, seed=2)
    weights[1][3, 5, 1] = 0xFF  # one gate_up block of expert 3
    _compare(x, ids, tw, weights, isa)
    users = (ids == 3).any(dim=1)
    out = cpu_moe.mxfp4_moe(x, ids, tw, *_packed(weights), 1.702, 7.0)
    assert out[users].isnan().all() and not out[~users].isnan().any()


def test_extreme_scales(isa: str) -> None:
    x, ids, tw, weights = _problem(6, 4, 2, 96, 64, seed=3)
    # Tiny (2**-127, 2**-126) and huge (2**100) blocks in the same rows; SwiGLU's clamps keep outputs finite.
    weights[1][:, :, 0] = 0
    weights[1][:, :, 1] = 1
    weights[1][:, ::7, 2] = 227
    _compare(x, ids, tw, weights, isa)


def test_prepack_layout_and_padding() -> None:
    """Packed: rows in groups of 4, one step (superblock of 128 elements) of a group after another; a step's
    codes are 4 vectors of 64 bytes, byte 16 r + m of vector L holding row r's kernel-order positions
    32 L + m (low nibble) and 32 L + 16 + m (high); kernel position 16 i + 4 j + b is element 32 j + 4 i + b.
    Scales: 16 bytes per step, row r's block j at 4 r + j. K padded with zero codes (scale 1.0) to a multiple
    of 128; 4.25 bits per weight."""
    g = torch.Generator().manual_seed(7)
    blocks = torch.randint(0, 256, (3, 8, 7, 16), generator=g, dtype=torch.uint8)  # K = 224 -> 256
    scales = torch.randint(0, 256, (3, 8, 7), generator=g, dtype=torch.uint8)
    packed, packed_scales = cpu_moe.prepack(blocks, scales)
    assert packed.shape == (3, 2, 2, 4, 64) and packed_scales.shape == (3, 2, 2, 4, 4)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-2)  # (E, G, S, L, h, 64)
    by_row = nibbles.view(3, 2, 2, 4, 2, 4, 16).permute(0, 1, 5, 2, 3, 4, 6)  # (E, G, r, S, L, h, m)
    kernel_order = by_row.reshape(3, 8, 2, 8, 4, 4)  # (E, row, S, i, j, b)
    unpacked = kernel_order.transpose(3, 4).reshape(3, 8, 256)  # (E, row, S, j, i, b): element order
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(3, 8, 224)  # even element low
    assert torch.equal(unpacked[..., :224], codes) and not unpacked[..., 224:].any()
    row_scales = packed_scales.permute(0, 1, 3, 2, 4).reshape(3, 8, 8)
    assert torch.equal(row_scales[..., :7], scales) and (row_scales[..., 7] == 127).all()
    assert (packed.numel() + packed_scales.numel()) * 8 / (3 * 8 * 256) == 4.25  # bits per (padded) weight
    with pytest.raises(RuntimeError, match=r"rows \(5\) must be a multiple of 4"):
        cpu_moe.prepack(blocks[:, :5], scales[:, :5])


def test_unpacked_weights_are_refused() -> None:
    x, ids, tw, weights = _problem(2, 4, 2, 64, 32, seed=8)
    with pytest.raises(RuntimeError, match="pre-packed"):
        cpu_moe.mxfp4_moe(x, ids, tw, *weights, 1.702, 7.0)


def test_bad_isa_name_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv(cpu_moe.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=r"GPTOSS_VLLM_CPU_ISA='sse9'.*portable, avx2, avx512"):
        cpu_moe.requested_isa()


def test_op_passes_torch_library_checks() -> None:
    x, ids, tw, weights = _problem(5, 4, 2, 64, 32, seed=4)
    torch.library.opcheck(
        torch.ops.gptoss_vllm.mxfp4_moe.default, (x.bfloat16(), ids, tw, *_packed(weights), 1.702, 7.0)
    )


def test_missing_compiler_is_reported(monkeypatch, tmp_path) -> None:
    from gptoss_vllm.kernels import build

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler"):
        build.cache_dir()


# Each ISA file's entry points, as mxfp4_kernels.h declares them.
ENTRY_POINTS = {
    "generic.cpp": {"decode_rows_f32_generic", "dot_f32_generic"},
    "x86/avx2.cpp": {"decode_rows_f32_avx2", "dot_f32_avx2"},
    "x86/avx512.cpp": {"decode_rows_bf16_avx512", "quantise_rows_avx512", "project_vnni_avx512"},
}


@pytest.mark.parametrize("source", list(ENTRY_POINTS))
def test_isa_files_export_only_their_entry_points(source: str) -> None:
    """Each ISA file is compiled with its own -m flags. Any other symbol it exported (an inline or template
    function, which the linker may keep from any one file for all of them) could run AVX-512 code on a CPU
    without it."""
    from gptoss_vllm.kernels import build

    if source not in build.sources():
        pytest.skip(f"{source} is not built on {platform.machine()}")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) on PATH to read the symbol table")
    cpu_moe.load_kernel()
    listing = subprocess.run(
        [nm, "-C", "-g", "--defined-only", str(build.object_file(source))],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    exported = {line.split(" ", 2)[2].split("(")[0] for line in listing.splitlines() if line.strip()}
    assert exported == {f"gptoss_cpu::{name}" for name in ENTRY_POINTS[source]}


def test_without_the_gemm_path_results_do_not_depend_on_the_batch(monkeypatch) -> None:
    """GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS=0: a token's output is bit-identical alone or among 40 others."""
    monkeypatch.setenv("GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS", "0")
    x, ids, tw, weights = _problem(41, 4, 2, 128, 64, seed=5)
    weights = _packed(weights)
    xb = x.bfloat16()
    together = cpu_moe.mxfp4_moe(xb, ids, tw, *weights, 1.702, 7.0)
    for t in (0, 17, 40):
        alone = cpu_moe.mxfp4_moe(xb[t : t + 1], ids[t : t + 1], tw[t : t + 1], *weights, 1.702, 7.0)
        assert torch.equal(alone[0], together[t])


def test_gemm_and_register_paths_agree(monkeypatch) -> None:
    x, ids, tw, weights = _problem(64, 2, 2, 128, 64, seed=6)  # 64 tokens per expert
    weights = _packed(weights)
    xb = x.bfloat16()
    monkeypatch.setenv("GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS", "0")
    direct = cpu_moe.mxfp4_moe(xb, ids, tw, *weights, 1.702, 7.0).float()
    monkeypatch.setenv("GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS", "1")
    tiled = cpu_moe.mxfp4_moe(xb, ids, tw, *weights, 1.702, 7.0).float()
    assert (direct - tiled).abs().max() <= 2**-5 * direct.abs().max()
