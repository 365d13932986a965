"""``gptoss-vllm bench moe``: the JSON it writes, on small shapes (the real run is the bench command itself)."""

from __future__ import annotations

import json
import subprocess
import sys

from gptoss_vllm.bench.moe import format_table, run_bench


def test_bench_json_holds_every_field(tmp_path) -> None:
    path = tmp_path / "moe.json"
    report = run_bench(
        str(path),
        progress=False,
        hidden=128,
        intermediate=64,
        experts=8,
        token_counts=(1, 5),
        probe_bytes=1 << 26,
    )
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(report))
    machine = data["machine"]
    assert machine["read_gbps"] > 0 and machine["bf16_gemm_gflops"] > 0
    assert machine["threads"] >= 1 and machine["isa"] in ("avx512", "avx2", "portable")
    impls = {r["impl"] for r in data["results"]}
    assert {"gptoss_cpu", "reference", "vllm_bf16"} <= impls
    for r in data["results"]:
        assert r["m"] in (1, 5) and r["ms"] > 0 and r["weight_gbps"] > 0 and r["gflops"] > 0
        assert 1 <= r["distinct_experts"] <= min(8, 4 * r["m"])
    table = format_table(report)
    assert "gptoss_cpu" in table and "vs vllm_bf16" in table


def test_bench_refuses_an_unwritable_json_path(tmp_path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptoss_vllm.cli",
            "bench",
            "moe",
            "--json",
            str(tmp_path / "no" / "such" / "x.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--json: cannot write" in proc.stderr
