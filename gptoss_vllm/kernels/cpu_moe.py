"""The CPU MXFP4 MoE as the torch op ``gptoss_vllm::mxfp4_moe``, backed by the C++ kernel.

The op reads weights pre-packed once at load time by ``prepack`` (still 4.25 bits per weight, in row groups
of 4; see ``csrc/mxfp4_kernels.h``). It is opaque to torch.compile (a fake implementation gives
the output shape), so vLLM's compiled graph calls it as one node. The kernel picks the best ISA path the CPU
has (AVX-512 with VNNI and BF16, AVX2, portable); ``GPTOSS_VLLM_CPU_ISA=avx512|avx2|portable`` caps it
(lower paths for tests and comparisons); ``isa_names()`` lists the paths as the kernel defines them.
"""

from __future__ import annotations

import functools

import torch

from gptoss_vllm import envs
from gptoss_vllm.kernels.build import load_kernel

ISA_ENV = envs.CPU_ISA.name


@functools.cache
def _isa_names() -> tuple[str, ...]:
    load_kernel()
    return tuple(torch.ops.gptoss_vllm_cpu.isa_names())


def isa_names() -> list[str]:
    """The kernel's paths in order of preference, as it names them (the C++ enum is the one definition);
    builds the kernel on first use. Asked once per process: requested_isa runs on every MoE call."""
    return list(_isa_names())


def requested_isa() -> int:
    """The ISA cap from the environment (-1: the best the CPU has)."""
    name = envs.CPU_ISA.get().lower()
    if name in ("", "auto"):
        return -1
    names = isa_names()
    if name not in names:
        raise ValueError(f"{ISA_ENV}={name!r} is not a kernel ISA; choose auto, {', '.join(names)}")
    return names.index(name)


def kernel_isa() -> str:
    """Name of the ISA path the kernel runs here (after the environment's cap)."""
    load_kernel()
    best = int(torch.ops.gptoss_vllm_cpu.best_isa())
    cap = requested_isa()
    return isa_names()[best if cap < 0 else min(cap, best)]


def prepack(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint-layout MXFP4 (``(..., rows, K/32, 16)`` blocks, ``(..., rows, K/32)`` scales) into the
    kernel's layout: ``(..., rows/4, Kp/128, 4, 64)`` codes and ``(..., rows/4, Kp/128, 4, 4)`` scales, K
    padded to a multiple of 128, rows in groups of 4 (rows must be a multiple of 4), each superblock of a
    group in the kernel's order (see the kernel source)."""
    load_kernel()
    return tuple(torch.ops.gptoss_vllm_cpu.mxfp4_prepack(blocks, scales))


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
    """Routing-weighted sum of each token's top-k MXFP4 experts; blocks and scales as ``prepack`` returns
    them, biases and the rest as in the reference."""
    load_kernel()
    return torch.ops.gptoss_vllm_cpu.mxfp4_moe(
        x, topk_ids, topk_weights, w13_blocks, w13_scales, w13_bias, w2_blocks, w2_scales, w2_bias,
        alpha, limit, requested_isa(), envs.CPU_GEMM_MIN_TOKENS.get(),
    )  # fmt: skip


@mxfp4_moe.register_fake
def _mxfp4_moe_fake(
    x, topk_ids, topk_weights, w13_blocks, w13_scales, w13_bias, w2_blocks, w2_scales, w2_bias, alpha, limit
):
    return x.new_empty((x.shape[0], 4 * w2_blocks.shape[1]))  # groups of 4 rows
