"""``gptoss-vllm bench overhead`` on tiny settings (nano, a few requests): both real targets, the JSON's fields,
and its argument errors. The figures themselves come from the bench command on its defaults. Nano, not the
tiny random checkpoint: only a model that writes harmony gets token events through the reasoning parser."""

from __future__ import annotations

import json

import pytest

from tests.support.cli import assert_argument_errors


def test_argument_errors_name_the_argument(tmp_path):
    assert_argument_errors(
        ["bench", "overhead"],
        [
            (["--concurrency", "4,0"], "--concurrency"),
            (["--rounds", "x"], "--rounds"),
            (["--model", str(tmp_path / "none")], "--model"),
            (["--json", str(tmp_path / "missing" / "out.json")], "--json"),
            (["--idle-seconds", "-1"], "--idle-seconds"),
            (["--direct-ingress"], "--direct-ingress"),
        ],
    )


def test_both_targets_are_measured_side_by_side(bench_cli, tmp_path):
    out = tmp_path / "overhead.json"
    answer = bench_cli(
        "overhead", "--concurrency", "2",
        "--rounds", "2", "--requests", "4", "--streams", "2", "--output-tokens", "8", "--json", str(out),
        "--keep", str(tmp_path / "keep"), "--idle-seconds", "2", timeout=1200,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    results = {r["target"]: r for r in report["results"]}
    assert set(results) == {"vllm", "stack"}
    for r in results.values():
        assert r["concurrency"] == 2 and r["failures"] == 0, r
        n, s = r["non_streamed"], r["streamed"]
        assert n["requests"] == 2 * 4  # two rounds of four
        assert 0 < n["latency_p50_ms"] <= n["latency_p99_ms"] and n["requests_per_s"] > 0
        # Every stream ran to its 8 tokens (ignore_eos), counted from the answers' usage.
        assert s["streams"] == 2 * 2 and s["output_tokens"] == 4 * 8
        assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] and s["output_tokens_per_s"] > 0
        assert 0 < s["inter_token_p50_ms"] <= s["inter_token_p99_ms"]
        assert r["cpu_ms_per_request"]["total"] > 0 and r["cpu_ms_per_streamed_token"]["total"] > 0
    assert set(results["vllm"]["cpu_ms_per_request"]) == {"api_server", "total"}
    stack_roles = results["stack"]["cpu_ms_per_streamed_token"]
    assert {"proxy", "ingress", "pool_replica", "controller", "ray_daemons", "total"} <= set(stack_roles)
    assert stack_roles["ingress"] > 0 and stack_roles["pool_replica"] > 0 and stack_roles["proxy"] > 0
    idle = report["idle_cpu_ms_per_s"]
    assert set(idle["vllm"]) == {"api_server", "total"} and set(idle["stack"]) == set(stack_roles)
    assert idle["stack"]["total"] == pytest.approx(
        sum(v for k, v in idle["stack"].items() if k != "total"), abs=0.2
    )
    (ratio,) = report["ratios"]
    assert ratio["concurrency"] == 2
    assert ratio["streamed_tokens_per_s"] > 0 and ratio["cpu_per_streamed_token"] > 0
    assert "stack / vLLM" in answer.stdout
    assert (tmp_path / "keep" / "vllm.log").stat().st_size > 0


def test_relay_bench_counts_every_token_through_the_real_ingress(bench_cli, tmp_path):
    out = tmp_path / "relay.json"
    answer = bench_cli(
        "overhead", "--relay", "--concurrency", "1,8", "--output-tokens", "64", "--json", str(out),
        timeout=600,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["streams"] for r in report["results"]] == [1, 8]
    assert all(report["processes"][role] >= 1 for role in ("proxy", "ingress", "pool"))
    for r in report["results"]:
        # Every token event the synthetic pool made reached the client through proxy and ingress.
        assert r["tokens"] == r["expected_tokens"] == r["streams"] * 64
        assert r["tokens_per_s"] > 0 and all(cpu >= 0 for cpu in r["cpu_ms_per_token"].values())
    # CPU time is read in clock ticks (10 ms): the busier level is sure to have some on both hops.
    busy = report["results"][-1]["cpu_ms_per_token"]
    assert busy["ingress"] > 0 and busy["proxy"] > 0
    assert "one ingress replica" in answer.stdout


def test_relay_bench_with_direct_ingress_has_no_proxy_in_the_path(bench_cli, tmp_path):
    out = tmp_path / "relay.json"
    answer = bench_cli(
        "overhead", "--relay", "--direct-ingress", "--concurrency", "8", "--output-tokens", "64",
        "--json", str(out), timeout=600,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["direct_ingress"] is True
    (r,) = report["results"]
    assert r["tokens"] == r["expected_tokens"] == 8 * 64
    # Ray Serve still starts a proxy, but the streams pass it by: the ingress did the relaying.
    cpu = r["cpu_ms_per_token"]
    assert cpu["ingress"] > 0 and cpu["proxy"] <= cpu["ingress"]
    assert "direct ingress" in answer.stdout
