"""Plugin parts that need no engine: registration, backend choice, the MoE ops, TP slicing, layout checks."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from torch import nn

from gptoss_vllm.checkpoints.config import build_config
from gptoss_vllm.checkpoints.layout import CheckpointLayoutError, LayoutChecker, checkpoint_specs
from gptoss_vllm.kernels.reference import mxfp4_moe_reference
from gptoss_vllm.model.backend import BackendUnavailableError, Platform, choose_backend
from gptoss_vllm.model.moe import MXFP4_SUFFIXES, MXFP4Experts
from gptoss_vllm.quant import mxfp4

AMX_CPU = Platform("cpu", cpu_has_amx=True, mxfp4_checkpoint=True)
PLAIN_CPU = Platform("cpu", cpu_has_amx=False, mxfp4_checkpoint=True)


def test_entry_point_and_repeated_registration() -> None:
    eps = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps["gptoss_vllm"] == "gptoss_vllm.plugin:register"
    from vllm import ModelRegistry

    from gptoss_vllm.plugin import register

    register()
    register()  # vLLM may load plugins several times per process
    model_cls = ModelRegistry._try_load_model_cls("GptOssForCausalLM")
    assert model_cls.__module__ == "gptoss_vllm.model.gpt_oss"


@pytest.mark.parametrize(
    ("platform", "requested", "expected"),
    [
        (AMX_CPU, "auto", "native"),
        (PLAIN_CPU, "auto", "cpu"),
        (PLAIN_CPU, "reference", "reference"),
        (AMX_CPU, "cpu", "cpu"),
        (Platform("cuda", False, True), "auto", "native"),
        (Platform("cpu", False, mxfp4_checkpoint=False), "auto", "native"),  # bf16 experts: vLLM's MoE
        (PLAIN_CPU, " CPU ", "cpu"),
    ],
)
def test_backend_choice(platform: Platform, requested: str, expected: str) -> None:
    assert choose_backend(platform, requested) == expected


def test_unavailable_backends_say_why_and_what_works(monkeypatch) -> None:
    with pytest.raises(BackendUnavailableError) as err:
        choose_backend(PLAIN_CPU, "native")
    message = str(err.value)
    assert "CPU without Intel AMX" in message and "needs Intel AMX" in message
    assert "Backends that work here: cpu, reference" in message
    with pytest.raises(BackendUnavailableError, match="runs on CPUs, not CUDA"):
        choose_backend(Platform("cuda", False, True), "cpu")
    with pytest.raises(BackendUnavailableError, match="expert parallelism"):
        choose_backend(Platform("cpu", False, True, expert_parallel=True), "auto")
    monkeypatch.setenv("GPTOSS_VLLM_MOE_BACKEND", "ultra")
    with pytest.raises(
        BackendUnavailableError, match=r"GPTOSS_VLLM_MOE_BACKEND='ultra'.*auto, native, cpu, reference"
    ):
        choose_backend(PLAIN_CPU)


def _random_moe(e: int = 8, h: int = 128, i: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    b13, s13 = mxfp4.quantize(w13)
    b2, s2 = mxfp4.quantize(w2)
    return {
        "w13": w13,
        "w2": w2,
        "args": (
            b13,
            s13,
            torch.randn(e, 2 * i, generator=g) * 0.1,
            b2,
            s2,
            torch.randn(e, h, generator=g) * 0.1,
        ),
    }


def _packed(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The cpu kernel's layout of ``_random_moe``'s checkpoint-layout args."""
    from gptoss_vllm.kernels.cpu_moe import prepack

    b13, s13, bias13, b2, s2, bias2 = args
    return (*prepack(b13, s13), bias13, *prepack(b2, s2), bias2)


def _routing(t: int, e: int, k: int, seed: int = 1):
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(seed))
    values, ids = logits.topk(k)
    return ids, values.softmax(-1)


def test_reference_op_matches_a_dense_float64_computation() -> None:
    moe = _random_moe()
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(2))
    ids, weights = _routing(9, 8, 4)
    got = mxfp4_moe_reference(x, ids, weights, *moe["args"], 1.702, 7.0)
    b13, s13, bias13, b2, s2, bias2 = moe["args"]
    w13 = mxfp4.dequantize(b13, s13, torch.float64)
    w2 = mxfp4.dequantize(b2, s2, torch.float64)
    want = torch.zeros(9, 128, dtype=torch.float64)
    for t in range(9):
        for slot in range(4):
            e = ids[t, slot]
            h = w13[e] @ x[t].double() + bias13[e].double()
            g, lin = h[0::2].clamp(max=7.0), h[1::2].clamp(-7.0, 7.0)
            act = g * torch.sigmoid(1.702 * g) * (lin + 1)
            want[t] += weights[t, slot].double() * (w2[e] @ act + bias2[e].double())
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_cpu_op_matches_reference_within_activation_rounding(tokens: int) -> None:
    moe = _random_moe()
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    ids, weights = _routing(tokens, 8, 4)
    got = torch.ops.gptoss_vllm.mxfp4_moe(x, ids, weights, *_packed(moe["args"]), 1.702, 7.0)
    want = mxfp4_moe_reference(x.float(), ids, weights, *moe["args"], 1.702, 7.0)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, 128)
    # Activations are rounded to int8 per 32-element block (small batches) or bf16 (GEMM path): each element
    # is off by at most 1/254 of its block's largest magnitude, or 2**-9 relative, a few times over.
    assert (got.float() - want).abs().max() <= 2**-5 * want.abs().max()


def test_ops_pass_torch_library_checks() -> None:
    moe = _random_moe(e=4, h=64, i=32)
    x = torch.randn(5, 64).bfloat16()
    ids, weights = _routing(5, 4, 2)
    torch.library.opcheck(
        torch.ops.gptoss_vllm.mxfp4_moe.default, (x, ids, weights, *_packed(moe["args"]), 1.702, 7.0)
    )
    torch.library.opcheck(
        torch.ops.gptoss_vllm.mxfp4_moe_reference.default, (x, ids, weights, *moe["args"], 1.702, 7.0)
    )


def test_tensor_parallel_shards_sum_to_the_whole() -> None:
    """Two TP ranks, each holding half the intermediate dim in whole blocks, add up to one rank's result."""
    e, h, i = 4, 64, 64
    moe = _random_moe(e, h, i)
    b13, s13, bias13, b2, s2, bias2 = moe["args"]
    checkpoint = {
        "gate_up_proj_blocks": b13,
        "gate_up_proj_scales": s13,
        "gate_up_proj_bias": bias13,
        "down_proj_blocks": b2,
        "down_proj_scales": s2,
        "down_proj_bias": bias2,
    }
    x = torch.randn(6, h)
    ids, weights = _routing(6, e, 2)
    outs = []
    for tp_size in (1, 2):
        total = torch.zeros(6, h)
        for rank in range(tp_size):
            experts = MXFP4Experts(e, h, i, backend="reference", tp_rank=rank, tp_size=tp_size)
            for suffix, tensor in checkpoint.items():
                experts.load_checkpoint_tensor(suffix, tensor)
            total += experts(x, ids, weights)
        outs.append(total)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_bf16_expert_tensors_are_quantised_on_load() -> None:
    e, h, i = 4, 64, 64
    moe = _random_moe(e, h, i)
    b13, s13, _, b2, s2, _ = moe["args"]
    experts = MXFP4Experts(e, h, i, backend="cpu")
    # bf16 checkpoints store gate_up as (E, H, 2I) and down as (E, I, H).
    experts.load_checkpoint_tensor("gate_up_proj", mxfp4.dequantize(b13, s13).transpose(1, 2).bfloat16())
    experts.load_checkpoint_tensor("down_proj", mxfp4.dequantize(b2, s2).transpose(1, 2).bfloat16())
    assert torch.equal(experts.gate_up_blocks, b13) and torch.equal(experts.gate_up_scales, s13)
    assert torch.equal(experts.down_blocks, b2) and torch.equal(experts.down_scales, s2)


def test_cpu_experts_repack_once_loaded_and_refuse_loading_over_it() -> None:
    e, h, i = 4, 64, 96
    b13, s13, bias13, b2, s2, bias2 = _random_moe(e, h, i)["args"]
    checkpoint = dict(zip(MXFP4_SUFFIXES, (b13, s13, bias13, b2, s2, bias2), strict=True))
    cpu, ref = MXFP4Experts(e, h, i, backend="cpu"), MXFP4Experts(e, h, i, backend="reference")
    for experts in (cpu, ref):
        for suffix, tensor in checkpoint.items():
            experts.load_checkpoint_tensor(suffix, tensor)
        experts.pack_for_backend()
    assert cpu.packed and not ref.packed
    assert cpu.gate_up_blocks.shape == (e, 2 * i // 4, 1, 4, 64) and cpu.down_blocks.shape == (
        e,
        h // 4,
        1,
        4,
        64,
    )
    assert torch.equal(ref.gate_up_blocks, b13)
    x = torch.randn(5, h)
    ids, weights = _routing(5, e, 2)
    want = ref(x, ids, weights)
    assert (cpu(x, ids, weights) - want).abs().max() <= 2**-5 * want.abs().max()
    with pytest.raises(RuntimeError, match="already repacked for the cpu kernel"):
        cpu.load_checkpoint_tensor("down_proj_bias", bias2)


def test_tp_split_must_keep_whole_blocks() -> None:
    with pytest.raises(ValueError, match=r"intermediate_size=96 cannot be split over tensor_parallel_size=2"):
        MXFP4Experts(4, 64, 96, backend="cpu", tp_size=2)


def test_layout_checker_names_the_tensor_and_expected_shape() -> None:
    specs = checkpoint_specs(build_config("tiny"), "mxfp4")
    name = "model.layers.2.mlp.experts.down_proj_blocks"
    checker = LayoutChecker(specs, "tiny")
    with pytest.raises(
        CheckpointLayoutError, match=rf"{name} has shape \(8, 128, 4, 8\).*expects \(8, 128, 4, 16\)"
    ):
        checker.check(name, torch.zeros(8, 128, 4, 8, dtype=torch.uint8))
    with pytest.raises(
        CheckpointLayoutError, match=r"model\.layers\.9\.mlp\.router\.weight .* is not part of"
    ):
        checker.check("model.layers.9.mlp.router.weight", torch.zeros(8, 128))
    with pytest.raises(CheckpointLayoutError, match="must be uint8"):
        checker.check(name, torch.zeros(8, 128, 4, 16))
    complete = LayoutChecker(specs, "tiny")
    for spec in specs[:-1]:
        complete.check(spec.name, torch.zeros(spec.shape, dtype=spec.dtype))
    with pytest.raises(CheckpointLayoutError, match=r"missing 1 tensor\(s\).*lm_head.weight \(201088, 128\)"):
        complete.finish()


def _mapped_kib(path) -> int:
    """This process's resident KiB of the file mappings of ``path``."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


def test_checkpoint_pages_are_dropped_once_each_tensor_is_consumed(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from gptoss_vllm.model.resident import released_as_consumed

    tensors = {f"t{i}": torch.randn(512, 1024) for i in range(6)}  # 2 MiB each
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    anon = torch.randn(512, 1024)
    anon_copy = anon.clone()
    with safe_open(str(path), framework="pt") as f:
        consumed = []
        for name, tensor in released_as_consumed([*((n, f.get_tensor(n)) for n in f.keys()), ("anon", anon)]):  # noqa: SIM118
            if name != "anon":
                assert torch.equal(tensor, tensors[name])  # maps this tensor's pages
                assert _mapped_kib(path) >= 2000  # this tensor is resident while the loader holds it
            consumed.append((name, tensor))
        # Without the release all 12 MiB would stay mapped until the file is closed.
        assert _mapped_kib(path) < 300
        # Dropped pages read back from the file, unchanged; a tensor that is not file-mapped is left alone.
        for name, tensor in consumed:
            assert torch.equal(tensor, anon_copy if name == "anon" else tensors[name])


@pytest.mark.parametrize("tokens", [1, 4, 64])
def test_bf16_linears_take_vllms_packed_kernel_on_this_cpu(tokens: int, monkeypatch) -> None:
    """model/cpu_gemm.py: a bf16 linear is packed for vLLM's weight_packed_linear (its oneDNN copy never made,
    the original dropped) and computes what F.linear does; a shape the kernel cannot take, or
    GPTOSS_VLLM_CPU_GEMM=onednn, leaves the layer to vLLM."""
    from gptoss_vllm.model.cpu_gemm import CpuGemmError, pack_for_cpu, packed_kernel_fits

    def layer(n: int, k: int) -> nn.Module:
        m = nn.Module()
        g = torch.Generator().manual_seed(n + k)
        m.weight = nn.Parameter((torch.randn(n, k, generator=g) * 0.05).bfloat16(), requires_grad=False)
        m.bias = nn.Parameter(torch.randn(n, generator=g).bfloat16(), requires_grad=False)
        return m

    probe = layer(96, 128)
    if not packed_kernel_fits(probe):
        pytest.skip("this CPU has neither AVX-512 BF16 nor AMX: vLLM's packed kernel does not run here")
    x = torch.randn(tokens, 128).bfloat16()
    expected = torch.nn.functional.linear(x.float(), probe.weight.float(), probe.bias.float())
    assert pack_for_cpu(probe)
    assert probe.weight.numel() == 0 and probe.bias.dtype == torch.float32
    got = probe.cpu_linear(x, probe.weight, probe.bias)
    assert got.shape == (tokens, 96) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    odd = layer(90, 128)  # rows not a whole number of the kernel's 32-row blocks
    assert not pack_for_cpu(odd) and odd.weight.shape == (90, 128) and not hasattr(odd, "cpu_linear")
    monkeypatch.setenv("GPTOSS_VLLM_CPU_GEMM", "onednn")
    kept = layer(96, 128)
    assert not pack_for_cpu(kept) and kept.weight.shape == (96, 128)
    monkeypatch.setenv("GPTOSS_VLLM_CPU_GEMM", "fast")
    with pytest.raises(CpuGemmError, match="GPTOSS_VLLM_CPU_GEMM='fast': use one of packed, onednn"):
        pack_for_cpu(layer(96, 128))


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1 : text.index("]")]


def _vma_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping holding ``address``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(part, 16) for part in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    return 0


def test_streamed_weights_move_onto_huge_pages_unchanged() -> None:
    """model/huge_pages.py: a written tensor is moved onto 2 MB pages in place (MADV_COLLAPSE) with its contents
    kept; a tensor holding no whole huge page is left alone."""
    import platform

    from gptoss_vllm.model.huge_pages import HUGE_PAGE, back_with_huge_pages, huge_span, process_huge_bytes

    weight = torch.randn(4 * HUGE_PAGE // 2, dtype=torch.bfloat16)  # 8 MB: at least 3 whole huge pages
    before = weight.clone()
    begin, end = huge_span(weight)
    assert end - begin >= 3 * HUGE_PAGE and begin % HUGE_PAGE == 0
    moved = back_with_huge_pages(weight)
    assert torch.equal(weight, before)
    assert back_with_huge_pages(torch.ones(1000)) == 0  # no whole 2 MB page inside
    kernel = tuple(int(p) for p in platform.release().split(".")[:2] if p.isdigit())
    if _thp_mode() in ("absent", "never") or kernel < (6, 1):
        pytest.skip(
            f"transparent huge pages {_thp_mode()}, Linux {platform.release()}: MADV_COLLAPSE unavailable"
        )
    assert moved == end - begin
    assert _vma_huge_bytes(begin) >= moved and process_huge_bytes() >= moved


def test_cpu_norm_provider_matches_vllms_native_norms_and_takes_only_the_default_priority() -> None:
    """model/cpu_eager.py: the gptoss_cpu RMSNorm (vLLM's fused CPU kernels) computes what vLLM's native one
    does (to bf16 rounding), declines what it cannot take, and is put first where vLLM's CPU default stands."""
    import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels, as its worker does)
    from vllm import ir

    from gptoss_vllm.model import cpu_eager

    if not cpu_eager._kernels_loaded():
        pytest.skip("vLLM's CPU kernels (torch.ops._C.rms_norm) are not in this vLLM build")
    g = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, 2880, generator=g).bfloat16() for _ in range(2))
    weight = (1 + 0.1 * torch.randn(2880, generator=g)).bfloat16()
    rms, fused = ir.ops.rms_norm, ir.ops.fused_add_rms_norm
    want = rms.impls["native"].impl_fn(x, weight, 1e-5)
    got = rms.impls[cpu_eager.PROVIDER].impl_fn(x, weight, 1e-5)
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    want_out, want_res = fused.impls["native"].impl_fn(x, residual, weight, 1e-5)
    got_out, got_res = fused.impls[cpu_eager.PROVIDER].func_impl_fn(x, residual, weight, 1e-5)
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)  # the sum, rounded once to bf16
    torch.testing.assert_close(got_out.float(), want_out.float(), rtol=1.6e-2, atol=1e-2)
    supports = rms.impls[cpu_eager.PROVIDER].supports_args
    assert supports(x, weight, 1e-5)
    assert not supports(x.t(), weight[:5], 1e-5)  # not contiguous
    assert not supports(x, weight.float(), 1e-5) and not supports(x, None, 1e-5)
    assert not supports(x, weight, 1e-5, 64)  # a variance over part of the row
    saved = {op: op.get_priority() for op in (rms, fused)}
    try:
        for op in (rms, fused):
            op.set_default(["native"])
        assert cpu_eager.prefer_fused_norms()
        assert rms.get_priority() == fused.get_priority() == [cpu_eager.PROVIDER, "native"]
        assert not cpu_eager.prefer_fused_norms()  # nothing left to change
        torch.testing.assert_close(rms(x, weight, 1e-5), got, rtol=0, atol=0)  # vLLM's dispatch picks it
    finally:
        for op, priority in saved.items():
            op.set_default(priority) if priority else op._priority_impls.clear()
