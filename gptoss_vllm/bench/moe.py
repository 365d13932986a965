"""``gptoss-vllm bench moe``: one gpt-oss-20b MoE layer on this CPU, three implementations side by side.

In one process and one run, on the same MXFP4 weights and the same routing: the plugin's C++ kernel
(``gptoss_cpu``, on the weights pre-packed as the plugin holds them), the float32 dequantise-and-matmul
reference (``reference``), and vLLM's bf16 ``cpu_fused_moe`` (isa ``vec``, plus ``amx`` where the CPU has
it) on dequantised bf16 copies. Probes of memory read bandwidth and bf16 GEMM speed give the machine's
roofline. ``ms`` is the median over repeats of one full layer (both projections); ``weight_gbps`` counts the
bytes of the distinct experts' weights the call reads in the implementation's own format; ``gflops`` counts
the useful expert FLOPs.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from gptoss_vllm.kernels.cpu_moe import kernel_isa, mxfp4_moe, prepack
from gptoss_vllm.kernels.reference import mxfp4_moe_reference
from gptoss_vllm.quant import mxfp4

HIDDEN = INTERMEDIATE = 2880
EXPERTS, TOP_K = 32, 4
TOKEN_COUNTS = (1, 4, 16, 64, 256, 512)
ALPHA, LIMIT = 1.702, 7.0


def _median_ms(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # first-touch of weights and buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def probe_read_gbps(nbytes: int = 1 << 30) -> float:
    """Read bandwidth: the faster of two reductions over a buffer far larger than the caches.

    A float32 sum is partly bound by its adds on small machines; a uint8 max does less work per byte.
    """
    best = 0.0
    for dtype, reduce in ((torch.float32, torch.sum), (torch.uint8, torch.max)):
        data = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
        ms = _median_ms(lambda data=data, reduce=reduce: reduce(data), 5)
        best = max(best, nbytes / (ms / 1e3) / 1e9)
        del data
    return best


def probe_bf16_gemm_gflops(m: int = 512, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> float:
    a = torch.randn(m, hidden).bfloat16()
    b = torch.randn(hidden, 2 * intermediate).bfloat16()
    ms = _median_ms(lambda: torch.mm(a, b), 5)
    return 2 * m * hidden * 2 * intermediate / (ms / 1e3) / 1e9


def _weights(seed: int, e: int = EXPERTS, h: int = HIDDEN, i: int = INTERMEDIATE) -> dict[str, torch.Tensor]:
    """Random MXFP4 experts with scales typical of trained weights (2**-9 .. 2**-5)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w13_blocks": torch.randint(0, 256, (e, 2 * i, h // 32, 16), generator=g, dtype=torch.uint8),
        "w13_scales": torch.randint(118, 123, (e, 2 * i, h // 32), generator=g, dtype=torch.uint8),
        "w13_bias": torch.randn(e, 2 * i, generator=g) * 0.02,
        "w2_blocks": torch.randint(0, 256, (e, h, i // 32, 16), generator=g, dtype=torch.uint8),
        "w2_scales": torch.randint(118, 123, (e, h, i // 32), generator=g, dtype=torch.uint8),
        "w2_bias": torch.randn(e, h, generator=g) * 0.02,
    }


def _vllm_bf16(w: dict[str, torch.Tensor], isa: str):
    """vLLM's bf16 fused MoE on dequantised copies of ``w``; None when vLLM's CPU ops are missing."""
    try:
        from vllm import _custom_ops as ops
    except Exception:
        return None
    experts = range(w["w13_blocks"].shape[0])
    w13 = torch.stack(
        [mxfp4.dequantize(w["w13_blocks"][e], w["w13_scales"][e], torch.bfloat16) for e in experts]
    )
    w2 = torch.stack(
        [mxfp4.dequantize(w["w2_blocks"][e], w["w2_scales"][e], torch.bfloat16) for e in experts]
    )
    try:
        packed13, packed2 = ops.cpu_prepack_moe_weight(w13, isa), ops.cpu_prepack_moe_weight(w2, isa)
    except Exception:
        return None
    del w13, w2
    b13, b2 = w["w13_bias"].bfloat16(), w["w2_bias"].bfloat16()

    def run(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, packed13, packed2, b13, b2, weights, ids.to(torch.int32), "swigluoai", isa)
        return out

    return run


def run_bench(
    json_path: str | None = None,
    seed: int = 0,
    progress: bool = True,
    hidden: int = HIDDEN,
    intermediate: int = INTERMEDIATE,
    experts: int = EXPERTS,
    token_counts: tuple[int, ...] = TOKEN_COUNTS,
    probe_bytes: int = 1 << 30,
) -> dict:
    """Run the bench (gpt-oss-20b layer shapes unless told otherwise); returns the report written as JSON."""
    threads = torch.get_num_threads()
    machine = {
        "read_gbps": probe_read_gbps(probe_bytes),
        "bf16_gemm_gflops": probe_bf16_gemm_gflops(hidden=hidden, intermediate=intermediate),
        "threads": threads,
        "isa": kernel_isa(),
        "cpu_has_amx": bool(torch.cpu._is_amx_tile_supported()),
    }
    w = _weights(seed, experts, hidden, intermediate)
    args = (w["w13_blocks"], w["w13_scales"], w["w13_bias"], w["w2_blocks"], w["w2_scales"], w["w2_bias"])
    # The kernel reads the layout the plugin packs the weights into at load time.
    packed = (*prepack(args[0], args[1]), args[2], *prepack(args[3], args[4]), args[5])
    impls: dict[str, Callable] = {
        "gptoss_cpu": lambda x, ids, tw: mxfp4_moe(x, ids, tw, *packed, ALPHA, LIMIT),
        "reference": lambda x, ids, tw: mxfp4_moe_reference(x, ids, tw, *args, ALPHA, LIMIT),
    }
    for isa in ("vec", "amx") if machine["cpu_has_amx"] else ("vec",):
        run = _vllm_bf16(w, isa)
        if run is not None:
            impls["vllm_bf16" if isa == "vec" else "vllm_bf16_amx"] = run
    # Per expert: gate_up (2I x H) and down (H x I) weights, with their biases (fp32 here, bf16 in vLLM).
    ref_bytes = 3 * hidden * intermediate * 17 // 32 + (2 * intermediate + hidden) * 4
    packed_bytes = sum(t[0].numel() + t[1].numel() for t in (packed[:2], packed[3:5])) // experts
    cpu_bytes = packed_bytes + (2 * intermediate + hidden) * 4
    bf_bytes = 3 * hidden * intermediate * 2 + (2 * intermediate + hidden) * 2
    results = []
    g = torch.Generator().manual_seed(seed + 1)
    steps = [(m, name) for m in token_counts for name in impls]
    for m, name in tqdm(steps, desc="bench moe", unit="run", disable=not progress):
        x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(m)).bfloat16()
        logits = torch.randn(m, experts, generator=g.manual_seed(seed + m))
        top, ids = logits.topk(TOP_K, dim=-1)
        tw = top.softmax(-1)
        # The float32 reference takes seconds per call from M=16: a single call without warm-up keeps the
        # whole bench within 3 minutes, and its figure is only a baseline.
        slow = name == "reference" and m >= 16
        repeats = 1 if slow else 3 if name == "reference" else 7
        ms = _median_ms(
            lambda name=name, x=x, ids=ids, tw=tw: impls[name](x, ids, tw), repeats, warmup=not slow
        )
        distinct = int(ids.unique().numel())
        per_expert = {"gptoss_cpu": cpu_bytes, "reference": ref_bytes}.get(name, bf_bytes)
        results.append(
            {
                "m": m,
                "impl": name,
                "ms": ms,
                "weight_gbps": distinct * per_expert / (ms / 1e3) / 1e9,
                "gflops": 2 * m * TOP_K * 3 * hidden * intermediate / (ms / 1e3) / 1e9,
                "distinct_experts": distinct,
            }
        )
    shape = {"hidden": hidden, "intermediate": intermediate, "experts": experts, "top_k": TOP_K}
    report = {"machine": machine, "shape": shape, "results": results}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    """The bench as a text table, with the kernel's speed-up over vLLM's bf16 MoE per M."""
    machine = report["machine"]
    lines = [
        f"machine: read {machine['read_gbps']:.1f} GB/s, bf16 GEMM {machine['bf16_gemm_gflops']:.0f} GFLOP/s, "
        f"{machine['threads']} threads, kernel isa {machine['isa']}",
        f"{'M':>5} {'impl':<14} {'ms':>10} {'weight GB/s':>12} {'GFLOP/s':>9} {'vs vllm_bf16':>13}",
    ]
    by = {(r["m"], r["impl"]): r for r in report["results"]}
    for r in report["results"]:
        base = by.get((r["m"], "vllm_bf16"))
        speedup = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        lines.append(
            f"{r['m']:>5} {r['impl']:<14} {r['ms']:>10.2f} {r['weight_gbps']:>12.1f} {r['gflops']:>9.1f} {speedup:>13}"
        )
    return "\n".join(lines)
