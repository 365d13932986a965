"""``gptoss-vllm bench e2e`` on the tiny shape: every JSON field, from real engines (the plugin's backends this
CPU runs, and stock vLLM's refusal or figures); the full gpt-oss-20b run is the bench command itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptoss_vllm.bench.e2e import decode_bytes_per_token
from gptoss_vllm.checkpoints.config import build_config


def test_a_decode_token_of_gpt_oss_20b_reads_its_published_bytes():
    parts = decode_bytes_per_token(build_config("gpt-oss-20b"))
    # 24 layers x 4 active experts x 3 x 2880^2 MXFP4 values at 17 bytes per 32 (and their bf16 biases).
    assert parts["experts"] == pytest.approx(24 * 4 * 3 * 2880**2 * 17 / 32, rel=0.01)
    assert parts["attention"] == pytest.approx(0.64e9 * 2, rel=0.02)  # 0.64 B bf16 weights
    assert parts["lm_head"] == 201088 * 2880 * 2
    assert sum(parts.values()) / 1e9 == pytest.approx(3.7, abs=0.1)  # ~3.7 GB, as published


def _bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPTOSS_VLLM_CACHE": str(tmp_path / "cache")}  # not the user's cache
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
        "--output-tokens", "6", "--json", str(path), "--keep", str(keep),
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
        each = row["peak_rss_by_process_gb"]  # the engine's processes, each at its own peak
        assert {"front_end", "EngineCore", "Worker"} <= set(each) and max(each.values()) <= row["peak_rss_gb"]
    stock = report["stock_vllm"]
    stock_rows = [r for r in report["results"] if r["impl"] == "stock_vllm"]
    # Stock vLLM runs MXFP4 experts on a CPU only with AMX; elsewhere it refuses, and its reason is recorded.
    assert (stock == "ran" and stock_rows) or (stock.startswith("refused: ") and "MXFP4" in stock), stock
    assert (keep / "gptoss_vllm-cpu.log").exists()  # each engine's log stays with --keep
    assert "roofline" in done.stdout and "stock vLLM" in done.stdout
