"""The built checkpoints load in transformers and in stock vLLM, and the MXFP4/bf16 twins agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Mxfp4Config

from gptoss_vllm.quant import mxfp4

PROMPT = torch.randint(
    0, 199_000, (1, 70), generator=torch.Generator().manual_seed(11)
)  # longer than the window


def _load_hf(path: Path):
    # MXFP4 on CPU without the hub's triton kernels: transformers dequantises to bf16 (the reference path).
    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if "mxfp4" in path.name else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoint_dirs):
    return {dtype: _load_hf(path) for dtype, path in tiny_checkpoint_dirs.items()}


def test_transformers_loads_mxfp4_and_matches_the_bf16_twin(hf_models, tiny_checkpoint_dirs) -> None:
    from safetensors.torch import load_file

    raw = load_file(tiny_checkpoint_dirs["mxfp4"] / "model.safetensors")
    experts = hf_models["mxfp4"].model.layers[1].mlp.experts
    want = mxfp4.dequantize(
        raw["model.layers.1.mlp.experts.gate_up_proj_blocks"],
        raw["model.layers.1.mlp.experts.gate_up_proj_scales"],
    )
    assert torch.equal(experts.gate_up_proj.float(), want.transpose(1, 2))  # really loaded, not initialised
    with torch.no_grad():
        a = hf_models["mxfp4"](PROMPT).logits.float()
        b = hf_models["bf16"](PROMPT).logits.float()
    assert a.std() > 0.5  # a non-degenerate model
    # Same weights, same kernels: the twins agree to bf16 round-off at most.
    assert (a - b).abs().max().item() <= 1e-2
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_stock_vllm_serves_the_bf16_twin(hf_models, tiny_checkpoint_dirs, offline_engines) -> None:
    prompt = PROMPT[0].tolist()
    job = {
        "model": str(tiny_checkpoint_dirs["bf16"]),
        "engine": {"dtype": "bfloat16"},
        "prompts": [prompt],
        "phases": [{"name": "run", "sampling": {"max_tokens": 6, "prompt_logprobs": 0}}],
    }
    run = offline_engines([{"name": "stock", **job}], env={"VLLM_PLUGINS": ""})["stock"]  # no plugin loaded
    assert run.returncode == 0, run.log[-4000:]
    out = run.result["run"][0]
    assert len(out["token_ids"]) == 6
    # vLLM's prompt log-probabilities agree with transformers' (same bf16 weights, different kernels).
    with torch.no_grad():
        logits = hf_models["bf16"](PROMPT).logits.float()[0]
    hf_lp = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), PROMPT[0, 1:]]
    vllm_lp = torch.tensor(out["prompt_logprobs"][1:])
    assert (hf_lp - vllm_lp).abs().max().item() < 0.25
    # Its greedy first token is one transformers ranks at the top as well.
    assert out["token_ids"][0] in logits[-1].topk(3).indices.tolist()
