"""``gptoss-vllm bench e2e`` on the tiny shape: every JSON field, from real engines (the plugin's backends this
CPU runs, and stock vLLM's refusal or figures); the full gpt-oss-20b run is the bench command itself."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from gptoss_vllm.bench import step_profile
from gptoss_vllm.bench.e2e import decode_bytes_per_token
from gptoss_vllm.bench.step_profile import PARTS
from gptoss_vllm.checkpoints.config import build_config
from tests.support.stack import fresh_cache


def test_a_decode_token_of_gpt_oss_20b_reads_its_published_bytes():
    parts = decode_bytes_per_token(build_config("gpt-oss-20b"))
    # 24 layers x 4 active experts x 3 x 2880^2 MXFP4 values at 17 bytes per 32 (and their bf16 biases).
    assert parts["experts"] == pytest.approx(24 * 4 * 3 * 2880**2 * 17 / 32, rel=0.01)
    assert parts["attention"] == pytest.approx(0.64e9 * 2, rel=0.02)  # 0.64 B bf16 weights
    assert parts["lm_head"] == 201088 * 2880 * 2
    assert sum(parts.values()) / 1e9 == pytest.approx(3.7, abs=0.1)  # ~3.7 GB, as published


def _bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    # Not the user's cache (the tiny checkpoint is built afresh), but the session's compiled kernel: this test
    # runs first in the suite, and compiled it a second time into its own cache (a minute on 2 cores).
    env = {**os.environ, "GPTOSS_VLLM_CACHE": str(fresh_cache(tmp_path / "cache"))}
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "bench", "e2e", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, named",
    [
        (["--output-tokens", "1"], "--output-tokens"),
        (["--batches", "1,0"], "--batches"),
        (["--preset", "nano"], "--preset"),
        (["--kv-cache-gib", "-1"], "--kv-cache-gib"),
        (["--kv-cache-gib", "1.5"], "--kv-cache-gib"),  # vLLM reads whole GiB
        (["--context", "200000"], "--context"),  # past gpt-oss-20b's 131072 positions
        (["--preset", "tiny", "--context", "64"], "--context"),  # shorter than the prompts
        (["--rounds", "-1"], "--rounds"),
        (["--blocks", "0"], "--blocks"),
        (["--only-head-to-head", "--no-llama-cpp"], "--only-head-to-head"),
        (["--only-head-to-head", "--rounds", "0"], "--only-head-to-head"),
    ],
)
def test_bad_arguments_are_named(tmp_path, args, named):
    done = _bench(tmp_path, *args)
    assert done.returncode == 2 and named in done.stderr, done.stderr


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path):
    path, keep = tmp_path / "e2e.json", tmp_path / "keep"
    done = _bench(
        tmp_path, "--preset", "tiny", "--prefill", "32,64", "--batches", "1,3", "--prompt-tokens", "16",
        "--output-tokens", "6", "--json", str(path), "--keep", str(keep), "--no-llama-cpp",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(path.read_text())
    assert {"cpu", "cores", "memory_gb", "read_gbps"} <= set(report["machine"]) and report["machine"][
        "read_gbps"
    ] > 0
    per_token = report["decode_bytes_per_token"]
    assert report["roofline_decode_tok_s"] == pytest.approx(
        report["machine"]["read_gbps"] * 1e9 / sum(per_token.values()), rel=0.01
    )
    ours = [r for r in report["results"] if r["impl"] == "gptoss_vllm"]
    assert {r["backend"] for r in ours} >= {"cpu"} and sorted({r["batch"] for r in ours}) == [1, 3]
    for row in report["results"]:
        for key in ("decode_tok_s", "prefill32_tok_s", "prefill64_tok_s", "load_s"):
            assert row[key] > 0, (key, row)
        # The tree's RSS (engine core and worker): a real engine holds at least its torch and vLLM.
        assert 0 < row["load_peak_anon_gb"] <= row["load_peak_rss_gb"] <= row["peak_rss_gb"]
        assert row["load_peak_rss_gb"] > 0.3 and row["decode_peak_rss_gb"] > 0.3
        each = row["peak_rss_by_process_gb"]  # per phase, the engine's processes, each at its own peak
        assert set(each) == {"loading", "prefill", "decode"}
        assert {"front_end", "EngineCore", "Worker"} <= set(each["loading"])
        assert max(max(roles.values()) for roles in each.values()) <= row["peak_rss_gb"]
        assert 0 < row["load_peak_worker_rss_gb"] == each["loading"]["Worker"] < row["load_peak_rss_gb"]
    stock = report["stock_vllm"]
    stock_rows = [r for r in report["results"] if r["impl"] == "stock_vllm"]
    # Stock vLLM runs MXFP4 experts on a CPU only with AMX; elsewhere it refuses, and its reason is recorded.
    assert (stock == "ran" and stock_rows) or (stock.startswith("refused: ") and "MXFP4" in stock), stock
    assert report["machine"]["omp_threads_bind"]
    for engine, profile in report["decode_profile_b1"].items():  # hooks in the real worker
        parts = profile["parts"]
        assert set(parts) == set(PARTS) and profile["steps"] >= 3, engine
        assert parts["experts"]["ms"] > 0 and parts["attention"]["ms"] > 0 and parts["lm_head"]["ms"] > 0
        assert all(p["ms"] >= 0 for p in parts.values())
        assert sum(p["share"] for p in parts.values()) == pytest.approx(1, abs=0.02)
    assert report["head_to_head_b1"] is None  # it needs llama.cpp
    assert (keep / "gptoss_vllm-cpu.log").exists()  # each engine's log stays with --keep
    assert "roofline" in done.stdout and "stock vLLM" in done.stdout


class _Sleeps(torch.nn.Module):
    def __init__(self, seconds: float, **children: torch.nn.Module) -> None:
        super().__init__()
        self.seconds = seconds
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x):
        time.sleep(self.seconds)
        for name, child in self.named_children():
            if name != "logits_processor":  # called by the model runner, after the forward
                for module in child if isinstance(child, torch.nn.ModuleList) else [child]:
                    x = module(x)
        return x


def test_step_profile_splits_a_step_by_part():
    """Real hooks on stand-in modules named as vLLM's gpt-oss names them, with known times."""
    attn = _Sleeps(0.002, qkv_proj=_Sleeps(0.003), o_proj=_Sleeps(0.001))
    layer = _Sleeps(0, attn=attn, mlp=_Sleeps(0, router=_Sleeps(0.001), experts=_Sleeps(0.008)))
    model = _Sleeps(0.001, model=_Sleeps(0, layers=torch.nn.ModuleList([layer, copy.deepcopy(layer)])))
    model.add_module("logits_processor", _Sleeps(0.004))
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model, sampler=_Sleeps(0.002)))
    assert step_profile.install(worker) == 2 * 5 + 1 + 1
    x = torch.zeros(1)
    for _ in range(6):  # a step: the forward, the logits, the sampler, then the engine's own 5 ms
        model(x)
        model.logits_processor(x)
        worker.model_runner.sampler(x)
        time.sleep(0.005)
    mean = step_profile.collect(worker)
    step_profile.remove(worker)
    model(x)  # hooks are off: no new step
    assert mean["steps"] == 4
    want = {"experts": 0.016, "router": 0.002, "attention": 0.012, "attention_linears": 0.008, "model_other": 0.001,
            "lm_head": 0.004, "sampling": 0.002, "engine": 0.005}  # fmt: skip
    for part, seconds in want.items():
        assert seconds <= mean[part] <= 1.5 * seconds + 0.004, (part, mean[part])  # sleeps overshoot
    summary = step_profile.summarize(mean, {"experts": 16e9})
    assert summary["parts"]["experts"]["read_gbps"] == pytest.approx(16 / mean["experts"], rel=0.01)
    assert sum(p["share"] for p in summary["parts"].values()) == pytest.approx(1, abs=0.01)
    with pytest.raises(RuntimeError, match="too few steps"):
        step_profile.collect(worker)


def test_an_engine_killed_for_memory_names_what_to_change(tmp_path):
    """The kernel's OOM killer (or memcap) sends SIGKILL to the engine's process group: here, this test does."""
    import threading

    import psutil

    from gptoss_vllm.bench.e2e import BenchError, Settings, run_child

    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            run_child("gptoss_vllm", "cpu", tmp_path / "no-model", Settings(preset="tiny"), tmp_path)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not outcome:
        engines = [p for p in psutil.Process().children() if "gptoss_vllm.bench.e2e" in " ".join(p.cmdline())]
        if engines:
            time.sleep(1)
            os.killpg(engines[0].pid, 9)
            break
        time.sleep(0.1)
    thread.join(60)
    error = outcome.get("error")
    assert isinstance(error, BenchError), error
    assert "killed" in str(error) and "--kv-cache-gib" in str(error) and "memcap" in str(error), error
    assert str(tmp_path / "gptoss_vllm-cpu.log") in str(error)


@pytest.mark.slow
def test_llama_cpp_rows_on_the_tiny_shape(tmp_path):
    """llama.cpp beside ours on the same tiny weights. Its build takes minutes, so this runs only where a full
    ``bench e2e`` has built it into the cache (the user's cache: the tiny checkpoint and its GGUF go there too)."""
    from gptoss_vllm.bench import llama_cpp

    if llama_cpp.built() is None:
        pytest.skip(
            f"llama.cpp is not built for this CPU in {llama_cpp.home()}: `gptoss-vllm bench e2e` builds it"
        )
    path = tmp_path / "e2e.json"
    done = subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "bench", "e2e", "--preset", "tiny", "--prefill", "32,64",
         "--batches", "1,3", "--prompt-tokens", "16", "--output-tokens", "6", "--no-stock", "--json", str(path),
         "--keep", str(tmp_path / "keep"), "--rounds", "1", "--blocks", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(path.read_text())
    rows = [r for r in report["results"] if r["impl"] == "llama_cpp"]
    assert [r["batch"] for r in rows] == [1, 3] and {r["backend"] for r in rows} == {"ggml-cpu"}
    for row in rows:
        for key in ("decode_tok_s", "prefill32_tok_s", "prefill64_tok_s", "tg6_tok_s", "peak_rss_gb"):
            assert row[key] > 0, (key, row)
        assert {"llama-bench"} <= set(row["peak_rss_by_process_gb"]["prefill"])
        assert {"llama-batched-bench"} <= set(row["peak_rss_by_process_gb"]["decode"])
    assert rows[1]["decode_tok_s"] != rows[0]["decode_tok_s"]  # one figure per batch, from batched-bench
    assert llama_cpp.gguf_path(
        llama_cpp.home().parent.parent / "models" / "tiny"
    ).exists()  # kept for next time
    assert "llama_cpp" in done.stdout
    # The head-to-head: a round of our engine loaded afresh in vLLM's three processes and in one, and
    # llama-bench's tg, each side its blocks after a read probe (one round: each costs two engine loads).
    h2h = report["head_to_head_b1"]
    assert h2h["tokens"] == 6 and len(h2h["rounds"]) == 1
    sides = ["ours", "ours_one_process", "llama_cpp"]
    assert h2h["rounds"][0]["order"] == sides
    for entry in h2h["rounds"]:
        assert set(entry["sides"]) == set(sides)
        for side in entry["sides"].values():
            assert len(side["tok_s"]) == 2 and all(x > 0 for x in side["tok_s"]) and side["read_gbps"] > 0
    median = h2h["median_tok_s"]
    assert h2h["ratio"] == pytest.approx(median["ours"] / median["llama_cpp"], rel=0.01)
    assert h2h["ratio_one_process"] == pytest.approx(
        median["ours_one_process"] / median["llama_cpp"], rel=0.01
    )
    keep = tmp_path / "keep"
    three = (keep / f"gptoss_vllm-{h2h['backend']}.h2h0.log").read_text()
    one = (keep / f"gptoss_vllm-{h2h['backend']}.h2h0-1proc.log").read_text()
    assert "(EngineCore pid=" in three and "(EngineCore pid=" not in one  # vLLM's log names the process
    assert "batch-1 head-to-head" in done.stdout


def test_a_full_disk_names_the_folder_and_the_variable(tmp_path):
    from gptoss_vllm.bench.e2e import BenchError, check_disk

    check_disk(tmp_path, 1, "writing a byte")
    with pytest.raises(BenchError, match="GPTOSS_VLLM_CACHE") as failed:
        check_disk(tmp_path / "gguf", 1e18, "converting gpt-oss-20b to GGUF")  # an exabyte is free nowhere
    assert str(tmp_path / "gguf") in str(failed.value) and "converting gpt-oss-20b to GGUF" in str(
        failed.value
    )


def test_llama_bench_figures_are_read_from_its_own_json():
    """A real llama-bench output (gpt-oss-20b, 2 repetitions of pp512, pp2048 and tg128, recorded on the AMD EPYC
    of the README): what CI can check of the parsers, where llama.cpp is not built."""
    from pathlib import Path

    from gptoss_vllm.bench import llama_cpp

    text = (Path(__file__).parents[1] / "data" / "llama_bench_gpt-oss-20b.json").read_text()
    records = json.loads(text)
    figures = llama_cpp.parse_llama_bench(text)
    assert set(figures) == {"prefill512_tok_s", "prefill2048_tok_s", "tg128_tok_s"}
    tg = next(r for r in records if r["n_gen"])
    assert figures["tg128_tok_s"] == pytest.approx(tg["avg_ts"], abs=1e-3)
    samples = llama_cpp.parse_tg_samples(text)  # each repetition, for the head-to-head's medians
    assert samples == pytest.approx(tg["samples_ts"], abs=1e-3) and len(samples) == len(tg["samples_ns"]) == 2
    assert llama_cpp.parse_tg_samples("llama-bench: error: no model\n") == []
