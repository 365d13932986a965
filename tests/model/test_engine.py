"""The plugin inside real vLLM engines: parity with transformers, engine features, memory, load errors.

Each engine starts once per session (about 35 s eager, 90 s compiled on 2 cores) and several tests read
its results.

Bound on prompt log-probabilities. Both sides hold the same bf16 weights and compute in bf16 (8
significant bits: every rounding is off by up to 2**-9 relative). Logits reach magnitudes of 10-15, so one
rounding of a logit is worth up to 0.03 nats, and attention, norms and residual adds round again in every
layer; the differences are largest on long prompts and unlikely tokens. Stock vLLM on the bf16 twin
(the plugin not involved) differs from transformers by up to 0.22 nats on these prompts, mean 0.016.
So the plugin must stay within 0.35 nats at every position, within 1.5x stock vLLM's own largest
difference plus 0.05, and within a mean of 0.03.
"""

from __future__ import annotations

import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gptoss_vllm.checkpoints.builder import write_checkpoint
from gptoss_vllm.checkpoints.config import build_config
from tests.support.engines import run_offline_batch

MAX_LOGPROB_DIFF = 0.35
MEAN_LOGPROB_DIFF = 0.03
NEW_TOKENS = 8
LENGTHS = [5, 17, 33, 48, 70, 96, 130, 9, 40, 64, 100, 150, 3, 25, 80, 120]  # several beyond the window


def _prompts(seed: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(199_000) for _ in range(24)]  # a common prefix: prefix-cache hits
    prompts = []
    for n, length in enumerate(LENGTHS):
        body = [rng.randrange(199_000) for _ in range(length)]
        prompts.append((shared + body)[:length] if n < 6 and length > 24 else body)
    return prompts


PROMPTS = _prompts()
WIDE = {  # more experts, top-2, a shorter window, another head layout
    "num_hidden_layers": 3,
    "num_local_experts": 16,
    "num_experts_per_tok": 2,
    "sliding_window": 16,
    "intermediate_size": 64,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="session")
def wide_checkpoint_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    config = build_config("tiny", WIDE)
    return {
        d: write_checkpoint(root / f"wide-{d}", config, seed=3, dtype=d, progress=False)
        for d in ("mxfp4", "bf16")
    }


_HF_CACHE: dict[str, dict] = {}


def hf_reference(bf16_dir, prompts: list[list[int]]) -> dict:
    """transformers' prompt log-probabilities and greedy continuations for ``prompts`` (cached per model)."""
    key = str(bf16_dir)
    if key not in _HF_CACHE:
        model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).eval()
        logprobs, margins, greedy = [], [], []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p])
                lp = torch.log_softmax(model(ids).logits.float()[0], -1)
                logprobs.append(lp[torch.arange(len(p) - 1), ids[0, 1:]])
                out = model.generate(
                    ids,
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                greedy.append(out.sequences[0, len(p) :].tolist())
                top2 = torch.stack([s[0].float().topk(2).values for s in out.logits])
                margins.append((top2[:, 0] - top2[:, 1]).tolist())
        _HF_CACHE[key] = {"logprobs": logprobs, "greedy": greedy, "margins": margins}
    return _HF_CACHE[key]


def _logprob_diffs(run_outputs: list[dict], ref: dict) -> torch.Tensor:
    diffs = [
        (torch.tensor(out["prompt_logprobs"][1:]) - want).abs()
        for out, want in zip(run_outputs, ref["logprobs"], strict=True)
        if len(want)
    ]
    return torch.cat(diffs)


def _assert_greedy_agrees(outputs: list[dict], ref: dict) -> None:
    """Equal continuations, except after a near-tie (top-2 logits closer than bf16 noise can separate)."""
    exact = 0
    for out, want, margins in zip(outputs, ref["greedy"], ref["margins"], strict=True):
        got = out["token_ids"]
        if got == want:
            exact += 1
            continue
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        assert margins[first] < 2 * MAX_LOGPROB_DIFF, f"greedy diverges at step {first} without a near-tie"
    assert exact >= len(outputs) // 2


def _resident_bytes(log: str) -> int:
    match = re.search(r"gpt-oss expert weights resident: .*?\((\d+) bytes", log)
    assert match, "the load log reports resident expert bytes"
    return int(match[1])


def _cpu_tiny_job(checkpoint) -> dict:
    """tiny MXFP4 on the plugin's cpu backend, prefix caching and chunked prefill (64-token chunks) on."""
    return {
        "name": "cpu_tiny",
        "model": str(checkpoint),
        # Batch-invariant kernel (no GEMM path): "together" and "alone" then differ only if vLLM itself does.
        "env": {"GPTOSS_VLLM_MOE_BACKEND": "cpu", "GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS": "0"},
        "engine": {
            "enable_prefix_caching": True,
            "enable_chunked_prefill": True,
            "max_num_batched_tokens": 64,
            "max_num_seqs": 16,
        },
        "prompts": PROMPTS,
        "phases": [
            {"name": "logprobs", "sampling": {"max_tokens": NEW_TOKENS, "prompt_logprobs": 0}},
            {"name": "together", "sampling": {"max_tokens": NEW_TOKENS}},
            {"name": "alone", "sampling": {"max_tokens": NEW_TOKENS}, "one_at_a_time": True},
        ],
    }


def _wide_job(checkpoints) -> dict:
    return {
        "model": str(checkpoints["bf16"]),
        "prompts": PROMPTS[:8],
        "phases": [{"name": "logprobs", "sampling": {"max_tokens": NEW_TOKENS, "prompt_logprobs": 0}}],
    }


MIS_SHAPED_TENSOR = "model.layers.1.mlp.experts.down_proj_bias"


def _mis_shaped_checkpoint(good, root):
    broken = root / "broken"
    shutil.copytree(good, broken)
    weights = load_file(broken / "model.safetensors")
    weights[MIS_SHAPED_TENSOR] = weights[MIS_SHAPED_TENSOR][:, :64].contiguous()
    save_file(weights, str(broken / "model.safetensors"))
    return broken


@pytest.fixture(scope="session")
def plugin_runs(tiny_checkpoint_dirs, wide_checkpoint_dirs, tmp_path_factory) -> dict:
    """Every engine with the plugin loaded, one after another in one process (tests.support.vllm_offline).
    The mis-shaped checkpoint goes last: its engine fails while loading."""
    no_gemm_override = {"GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS": None}
    jobs = [
        _cpu_tiny_job(tiny_checkpoint_dirs["mxfp4"]),
        {  # stock vLLM's own MoE on the bf16 twin: the baseline for accuracy and memory
            "name": "native_bf16",
            "model": str(tiny_checkpoint_dirs["bf16"]),
            "env": {"GPTOSS_VLLM_MOE_BACKEND": "native", **no_gemm_override},
            "prompts": PROMPTS,
            "phases": [{"name": "logprobs", "sampling": {"max_tokens": 1, "prompt_logprobs": 0}}],
        },
        {  # tiny MXFP4 on the float32 reference backend (first 6 prompts)
            "name": "reference_tiny",
            "model": str(tiny_checkpoint_dirs["mxfp4"]),
            "env": {"GPTOSS_VLLM_MOE_BACKEND": "reference", **no_gemm_override},
            "prompts": PROMPTS[:6],
            "phases": [{"name": "logprobs", "sampling": {"max_tokens": NEW_TOKENS, "prompt_logprobs": 0}}],
        },
        {  # the wide bf16 checkpoint on the cpu backend, torch.compile on
            **_wide_job(wide_checkpoint_dirs),
            "name": "wide_cpu_compiled",
            "env": {"GPTOSS_VLLM_MOE_BACKEND": "cpu", **no_gemm_override},
            "engine": {"enforce_eager": False},
        },
        {
            "name": "mis_shaped",
            "model": str(
                _mis_shaped_checkpoint(tiny_checkpoint_dirs["mxfp4"], tmp_path_factory.mktemp("bad"))
            ),
            "env": {"GPTOSS_VLLM_MOE_BACKEND": "cpu", **no_gemm_override},
            "prompts": PROMPTS[:1],
            "phases": [{"name": "run"}],
        },
    ]
    return run_offline_batch(jobs)


@pytest.fixture(scope="session")
def stock_runs(tiny_checkpoint_dirs, wide_checkpoint_dirs) -> dict:
    """Stock vLLM, the plugin not loaded, in one process: the wide baseline, then the MXFP4 checkpoint (which
    it refuses without AMX)."""
    jobs = [
        {**_wide_job(wide_checkpoint_dirs), "name": "wide_stock"},
        {
            "name": "stock_mxfp4",
            "model": str(tiny_checkpoint_dirs["mxfp4"]),
            "prompts": PROMPTS[:1],
            "phases": [{"name": "run"}],
        },
    ]
    return run_offline_batch(jobs, env={"VLLM_PLUGINS": ""})


def _succeeded(runs: dict, name: str):
    run = runs[name]
    assert run.returncode == 0, run.log[-5000:]
    return run


@pytest.fixture(scope="session")
def cpu_tiny_run(plugin_runs):
    return _succeeded(plugin_runs, "cpu_tiny")


@pytest.fixture(scope="session")
def native_bf16_run(plugin_runs):
    return _succeeded(plugin_runs, "native_bf16")


@pytest.fixture(scope="session")
def reference_tiny_run(plugin_runs):
    return _succeeded(plugin_runs, "reference_tiny")


def _assert_parity(name: str, diffs: torch.Tensor, baseline: torch.Tensor | None = None) -> None:
    print(f"{name}: prompt logprob |diff| max {diffs.max():.4f} mean {diffs.mean():.4f} over {diffs.numel()}")
    assert diffs.max() <= MAX_LOGPROB_DIFF and diffs.mean() <= MEAN_LOGPROB_DIFF
    if baseline is not None:
        assert diffs.max() <= 1.5 * baseline.max() + 0.05


def test_cpu_backend_is_chosen_and_logged(cpu_tiny_run) -> None:
    assert "gpt-oss MoE backend: cpu" in cpu_tiny_run.log
    assert "No MXFP4 MoE backend" not in cpu_tiny_run.log
    # Eager on CPU (model/cpu_eager.py): these runs' outputs (checked against transformers below) come from the
    # fused norms and the directly called attention.
    layers = build_config("tiny")["num_hidden_layers"]
    assert (
        f"gpt-oss on CPU, eager: RMSNorm on vLLM's fused CPU kernels, {layers} attention layers called directly"
        in cpu_tiny_run.log
    )


def test_cpu_backend_matches_transformers(cpu_tiny_run, native_bf16_run, tiny_checkpoint_dirs) -> None:
    ref = hf_reference(tiny_checkpoint_dirs["bf16"], PROMPTS)
    baseline = _logprob_diffs(native_bf16_run.result["logprobs"], ref)
    print(f"stock vLLM bf16 twin: prompt logprob |diff| max {baseline.max():.4f} mean {baseline.mean():.4f}")
    _assert_parity("tiny/cpu", _logprob_diffs(cpu_tiny_run.result["logprobs"], ref), baseline)
    _assert_greedy_agrees(cpu_tiny_run.result["together"], ref)


def test_concurrent_requests_with_prefix_caching_and_chunked_prefill_match_one_at_a_time(
    cpu_tiny_run,
) -> None:
    together = [o["token_ids"] for o in cpu_tiny_run.result["together"]]
    alone = [o["token_ids"] for o in cpu_tiny_run.result["alone"]]
    assert all(len(t) == NEW_TOKENS for t in together)
    assert together == alone
    assert (
        re.search(r"[Pp]refix cache hit rate: [1-9]", cpu_tiny_run.log)
        or "enable_prefix_caching=True" in cpu_tiny_run.log
    )


def test_reference_backend_matches_transformers(reference_tiny_run, tiny_checkpoint_dirs) -> None:
    run = reference_tiny_run
    assert "gpt-oss MoE backend: reference" in run.log
    ref = hf_reference(tiny_checkpoint_dirs["bf16"], PROMPTS)
    _assert_parity(
        "tiny/reference", _logprob_diffs(run.result["logprobs"], {k: v[:6] for k, v in ref.items()})
    )


def test_cpu_kernel_and_reference_backend_agree_on_greedy_outputs(cpu_tiny_run, reference_tiny_run) -> None:
    """The C++ kernel (bf16 activations) and the float32 reference pick the same tokens in vLLM."""
    cpu = [o["token_ids"] for o in cpu_tiny_run.result["together"][:6]]
    ref = [o["token_ids"] for o in reference_tiny_run.result["logprobs"]]
    assert sum(a == b for a, b in zip(cpu, ref, strict=True)) >= 5, (cpu, ref)


def test_bf16_checkpoint_with_more_experts_compiled(plugin_runs, stock_runs, wide_checkpoint_dirs) -> None:
    """A bf16 checkpoint on the cpu backend (quantised on load), top-2 of 16 experts, torch.compile on.

    With top-2 of 16 random experts some tokens sit on a near-tie between two experts, and bf16 rounding
    flips the choice in either engine (stock vLLM on the same checkpoint shows differences above 1 nat at
    such positions). So the check here is statistical against stock vLLM's own envelope: mean and 95th
    percentile within the bf16 bounds, the largest difference no worse than twice stock vLLM's.
    """
    plugin = _succeeded(plugin_runs, "wide_cpu_compiled")
    stock = _succeeded(stock_runs, "wide_stock")
    ref = hf_reference(wide_checkpoint_dirs["bf16"], PROMPTS[:8])
    diffs = _logprob_diffs(plugin.result["logprobs"], ref)
    baseline = _logprob_diffs(stock.result["logprobs"], ref)
    for name, d in (("wide/stock vLLM", baseline), ("wide/cpu compiled", diffs)):
        print(
            f"{name}: |diff| max {d.max():.4f} p95 {d.quantile(0.95):.4f} mean {d.mean():.4f} over {d.numel()}"
        )
    assert diffs.mean() <= 2 * MEAN_LOGPROB_DIFF and diffs.quantile(0.95) <= MAX_LOGPROB_DIFF
    assert diffs.max() <= 2 * baseline.max() + 0.05
    assert (
        "gpt-oss on CPU, eager" not in plugin.log
    )  # compiled: Inductor fuses the norms, attention stays opaque


def test_resident_expert_memory_is_about_a_quarter_of_bf16(cpu_tiny_run, native_bf16_run) -> None:
    mx, bf = _resident_bytes(cpu_tiny_run.log), _resident_bytes(native_bf16_run.log)
    ratio = mx / bf
    print(f"resident expert bytes: MXFP4 {mx}, bf16 {bf}, ratio {ratio:.4f} (4.25/16 = {4.25 / 16:.4f})")
    # Weights alone are exactly 4.25/16; fp32 biases on the MXFP4 side (bf16 on vLLM's) add a little.
    assert abs(ratio - 4.25 / 16) < 0.02


def test_stock_vllm_on_the_mxfp4_checkpoint(stock_runs) -> None:
    """Without the plugin, vLLM runs MXFP4 MoE on a CPU only with Intel AMX; elsewhere it refuses."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsMxfp4

    run = stock_runs["stock_mxfp4"]
    assert "gpt-oss MoE backend" not in run.log  # the plugin really is off
    if CPUExpertsMxfp4._supports_current_device():
        assert run.returncode == 0 and "Using 'CPU' Mxfp4 MoE backend" in run.log
    else:
        assert run.returncode != 0
        assert "NotImplementedError: No MXFP4 MoE backend supports the deployment configuration" in run.log


def test_mis_shaped_checkpoint_fails_naming_the_tensor(plugin_runs) -> None:
    run = plugin_runs["mis_shaped"]
    assert run.returncode != 0
    assert (
        f"checkpoint tensor {MIS_SHAPED_TENSOR} has shape (8, 64)" in run.log
        and "expects (8, 128)" in run.log
    )
