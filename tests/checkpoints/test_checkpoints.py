"""Checkpoint builder, config validation, streaming writer and the bf16 -> MXFP4 converter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptoss_vllm.checkpoints.builder import write_checkpoint
from gptoss_vllm.checkpoints.config import ModelConfigError, build_config
from gptoss_vllm.checkpoints.layout import TensorSpec, checkpoint_specs
from gptoss_vllm.checkpoints.safetensors_stream import write_streaming
from gptoss_vllm.quant import mxfp4
from tests.conftest import TINY_SEED


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_published_layout_of_gpt_oss_20b() -> None:
    """The spec for the 20b preset names and shapes every tensor as openai/gpt-oss-20b publishes them."""
    specs = {s.name: s for s in checkpoint_specs(build_config("gpt-oss-20b"), "mxfp4")}
    expected = {
        "model.embed_tokens.weight": ((201088, 2880), torch.bfloat16),
        "lm_head.weight": ((201088, 2880), torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": ((4096, 2880), torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": ((512, 2880), torch.bfloat16),
        "model.layers.0.self_attn.o_proj.weight": ((2880, 4096), torch.bfloat16),
        "model.layers.0.self_attn.sinks": ((64,), torch.bfloat16),
        "model.layers.0.mlp.router.weight": ((32, 2880), torch.bfloat16),
        "model.layers.23.mlp.experts.gate_up_proj_blocks": ((32, 5760, 90, 16), torch.uint8),
        "model.layers.23.mlp.experts.gate_up_proj_scales": ((32, 5760, 90), torch.uint8),
        "model.layers.23.mlp.experts.gate_up_proj_bias": ((32, 5760), torch.bfloat16),
        "model.layers.23.mlp.experts.down_proj_blocks": ((32, 2880, 90, 16), torch.uint8),
        "model.layers.23.mlp.experts.down_proj_scales": ((32, 2880, 90), torch.uint8),
        "model.layers.23.mlp.experts.down_proj_bias": ((32, 2880), torch.bfloat16),
    }
    for name, (shape, dtype) in expected.items():
        assert (specs[name].shape, specs[name].dtype) == (shape, dtype), name
    assert len(specs) == 3 + 24 * 19
    assert "model.layers.24.input_layernorm.weight" not in specs


def test_written_checkpoint_matches_its_layout(tiny_checkpoint_dirs) -> None:
    for dtype, path in tiny_checkpoint_dirs.items():
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
        assert ("quantization_config" in config) == (dtype == "mxfp4")
        assert config["layer_types"][:2] == ["sliding_attention", "full_attention"]
        generation = json.loads((path / "generation_config.json").read_text())
        assert generation["eos_token_id"] == [200002, 199999, 200012]
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable itself
            got = {
                name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in names
            }
        want = {
            s.name: (s.shape, {torch.bfloat16: "BF16", torch.uint8: "U8"}[s.dtype])
            for s in checkpoint_specs(config, dtype)
        }
        assert got == want


def test_mxfp4_checkpoint_is_the_quantised_bf16_twin(tiny_checkpoint_dirs) -> None:
    mx = load_file(tiny_checkpoint_dirs["mxfp4"] / "model.safetensors")
    bf = load_file(tiny_checkpoint_dirs["bf16"] / "model.safetensors")
    for name, tensor in bf.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            deq = mxfp4.dequantize(mx[f"{name}_blocks"], mx[f"{name}_scales"], torch.bfloat16)
            assert torch.equal(deq.transpose(1, 2), tensor), name
        else:
            assert torch.equal(mx[name], tensor), name
    # Scaled for sane activations: weights are neither degenerate nor huge.
    assert 0.5 < bf["model.embed_tokens.weight"].float().std() < 2
    assert bf["model.layers.0.mlp.experts.gate_up_proj"].float().abs().max() < 1


def test_weights_are_deterministic_from_the_seed(tmp_path, tiny_checkpoint_dirs) -> None:
    config = build_config("tiny")
    again = write_checkpoint(tmp_path / "again", config, seed=TINY_SEED, progress=False)
    other = write_checkpoint(tmp_path / "other", config, seed=TINY_SEED + 1, progress=False)
    a = load_file(tiny_checkpoint_dirs["mxfp4"] / "model.safetensors")
    b = load_file(again / "model.safetensors")
    c = load_file(other / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"]
    )


def test_config_overrides_apply_and_stay_consistent() -> None:
    c = build_config("tiny", {"num_hidden_layers": 3, "num_experts_per_tok": 2, "sliding_window": 8})
    assert c["num_hidden_layers"] == 3 and len(c["layer_types"]) == 3
    assert c["experts_per_token"] == 2 and c["sliding_window"] == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_sizee": 64}, "unknown gpt-oss config key 'hidden_sizee'"),
        ({"hidden_size": 100}, "hidden_size=100 must be a multiple of 32"),
        ({"intermediate_size": 48}, "intermediate_size=48 must be a multiple of 32"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads=3"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds num_local_experts=8"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"num_hidden_layers": "four"}, "num_hidden_layers must be a positive integer"),
        ({"head_dim": 63}, "head_dim=63 must be even"),
        ({"vocab_size": 1000}, "too small for the harmony tokenizer"),
        ({"layer_types": ["full_attention"]}, "layer_types must list 4 entries"),
        ({"sliding_window": None}, "sliding_window is null"),
        ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
        ({"tie_word_embeddings": True}, "lm_head is separate"),
        ({"model_type": "llama"}, "unknown gpt-oss config key 'model_type'"),
    ],
)
def test_impossible_configs_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        build_config("tiny", overrides)


def test_make_model_cli_reports_bad_arguments(tmp_path) -> None:
    bad_set = cli("make-model", "--out", str(tmp_path / "x"), "--set", "hidden_size=100")
    assert bad_set.returncode == 2 and "--set: hidden_size=100 must be a multiple of 32" in bad_set.stderr
    no_equals = cli("make-model", "--out", str(tmp_path / "x"), "--set", "hidden_size")
    assert no_equals.returncode == 2 and "--set expects key=value" in no_equals.stderr
    bad_seed = cli("make-model", "--out", str(tmp_path / "x"), "--seed", "-1")
    assert bad_seed.returncode == 2 and "--seed" in bad_seed.stderr
    bad_dtype = cli("make-model", "--out", str(tmp_path / "x"), "--dtype", "fp8")
    assert bad_dtype.returncode == 2 and "--dtype" in bad_dtype.stderr
    assert not (tmp_path / "x").exists()


def test_make_model_cli_never_overwrites_without_force(tmp_path) -> None:
    out = tmp_path / "model"
    ok = cli("make-model", "--out", str(out), "--set", "num_hidden_layers=1", "--seed", "3")
    assert ok.returncode == 0, ok.stderr
    before = (out / "model.safetensors").read_bytes()
    refused = cli("make-model", "--out", str(out), "--set", "num_hidden_layers=2")
    assert refused.returncode == 2 and "--out" in refused.stderr and "--force" in refused.stderr
    assert (out / "model.safetensors").read_bytes() == before
    forced = cli("make-model", "--out", str(out), "--set", "num_hidden_layers=2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging leftovers


def test_streaming_writer_round_trips_and_cleans_up_on_mismatch(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(10, dtype=torch.uint8)}
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_streaming(tmp_path / "ok.safetensors", specs, iter(tensors.items()))
    back = load_file(tmp_path / "ok.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match=r"b: expected shape \(10,\)"):
        write_streaming(
            tmp_path / "bad.safetensors",
            specs,
            iter([("a", tensors["a"]), ("b", torch.zeros(9, dtype=torch.uint8))]),
        )
    assert not (tmp_path / "bad.safetensors").exists()


def test_quantize_bf16_twin_reproduces_the_mxfp4_checkpoint(tmp_path, tiny_checkpoint_dirs) -> None:
    out = tmp_path / "quantized"
    done = cli("quantize", str(tiny_checkpoint_dirs["bf16"]), str(out))
    assert done.returncode == 0, done.stderr
    ours = load_file(out / "model.safetensors")
    ref = load_file(tiny_checkpoint_dirs["mxfp4"] / "model.safetensors")
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    ref_config = json.loads((tiny_checkpoint_dirs["mxfp4"] / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == ref_config
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_quantize_handles_sharded_checkpoints(tmp_path, tiny_checkpoint_dirs) -> None:
    src = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoint_dirs["bf16"], src)
    weights = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(src / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    done = cli("quantize", str(src), str(out))
    assert done.returncode == 0, done.stderr
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    ref = load_file(tiny_checkpoint_dirs["mxfp4"] / "model.safetensors")
    assert set(new_index["weight_map"]) == set(ref)
    for name, shard in new_index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), ref[name]), name


def test_quantize_cli_refuses_bad_sources(tmp_path, tiny_checkpoint_dirs) -> None:
    missing = cli("quantize", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "config.json is missing" in missing.stderr
    already = cli("quantize", str(tiny_checkpoint_dirs["mxfp4"]), str(tmp_path / "out"))
    assert already.returncode == 2 and "already quantised (mxfp4)" in already.stderr
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    wrong = cli("quantize", str(other), str(tmp_path / "out"))
    assert wrong.returncode == 2 and "model_type is 'llama'" in wrong.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    exists = cli("quantize", str(tiny_checkpoint_dirs["bf16"]), str(taken))
    assert exists.returncode == 2 and "already exists" in exists.stderr
    assert (taken / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "out").exists()
