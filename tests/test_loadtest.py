"""Load tests: profiles and SLO files (validation, arrival shapes, the SLO check), the CLI's argument errors,
and bounded runs of ``gptoss-vllm loadtest`` (real Locust, a subprocess of the real CLI) against the
observed stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptoss_vllm.loadtest.profiles import Arrival, ProfileError, builtin_profiles, load_profile
from gptoss_vllm.loadtest.samples import Sample, effort_figures, percentile
from gptoss_vllm.loadtest.slo import Slo, SloError, load_slo, violations


def test_builtin_profiles_load_with_the_issue_mixes():
    assert {"interactive", "agentic", "mixed-ramp"} <= set(builtin_profiles())
    assert load_profile("interactive").efforts == {"low": 0.70, "medium": 0.25, "high": 0.05}
    assert load_profile("agentic").efforts == {"low": 0.30, "medium": 0.40, "high": 0.30}
    assert load_profile("mixed-ramp").arrival.shape == "ramp"


def test_bad_profiles_name_the_file_and_key(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'nope': use one of"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nefforts: {low: 1}\nprompt_words: {min: 9, max: 3}\noutput_tokens: {low: 8}\n")
    with pytest.raises(ProfileError, match=r"bad.yaml: prompt_words: .*min \(9.0\) is above max"):
        load_profile(str(bad))
    bad.write_text("name: x\nefforts: {high: 1}\nprompt_words: {min: 1, max: 3}\noutput_tokens: {low: 8}\n")
    with pytest.raises(ProfileError, match="no budget for effort"):
        load_profile(str(bad))
    bad.write_text(
        "name: x\nefforts: {low: 1}\nprompt_words: {min: 1, max: 3}\noutput_tokens: {low: 8}\nburst: 3\n"
    )
    with pytest.raises(ProfileError, match=r"bad\.yaml: burst: Extra inputs are not permitted"):
        load_profile(str(bad))


def test_arrival_shapes():
    steady, ramp = Arrival(), Arrival(shape="ramp", ramp_fraction=0.5)
    spike = Arrival(shape="spike", spike_at_fraction=0.5, spike_factor=3, spike_fraction=0.1)
    assert [steady.users_at(f, 10) for f in (0, 0.5, 0.99)] == [10, 10, 10]
    assert [ramp.users_at(f, 10) for f in (0.0, 0.25, 0.5, 0.9)] == [1, 5, 10, 10]
    assert [spike.users_at(f, 10) for f in (0.4, 0.5, 0.55, 0.6)] == [10, 30, 30, 10]


def _sample(effort: str, ttft: float, ok: bool = True) -> Sample:
    return Sample(effort, 0.0, ok, e2e_s=ttft + 1, ttft_s=ttft, answer_ttft_s=ttft + 0.5, tpot_s=0.01,
                  reasoning_tokens=10, answer_tokens=5)  # fmt: skip


def test_figures_goodput_and_violations():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([1.0, 2.0], 95) == 2.0
    slo = Slo.model_validate(
        {"efforts": {"low": {"ttft_p95_s": 1.0, "max_error_rate": 0.0, "min_goodput_rps": 0.5}}}
    )
    samples = [_sample("low", 0.2), _sample("low", 0.4), _sample("low", 3.0), _sample("low", 0.1, ok=False)]
    figures = effort_figures(samples, duration_s=4.0, slo=slo)
    low = figures["low"]
    assert (low["requests"], low["failures"], low["ttft_p95_s"]) == (4, 1, 3.0)
    assert low["goodput_rps"] == 2 / 4.0  # two requests met the TTFT bound
    assert (low["reasoning_tokens"], low["answer_tokens"]) == (30, 15)
    assert figures["high"]["requests"] == 0
    found = violations(slo, figures)
    assert "low: ttft_p95_s = 3.000 > 1.0" in found
    assert any(v.startswith("low: error_rate = 0.250") for v in found)
    assert not any("goodput" in v for v in found)  # 0.5 rps is enough
    assert violations(Slo.model_validate({"efforts": {"high": {}}}), figures) == [
        "high: no requests were made, so no objective can be met"
    ]


def test_bad_slo_files(tmp_path):
    with pytest.raises(SloError, match="cannot read"):
        load_slo(tmp_path / "missing.yaml")
    bad = tmp_path / "slo.yaml"
    bad.write_text("efforts: {low: {ttft_p95: 1}}\n")
    with pytest.raises(SloError, match=r"slo\.yaml: efforts\.low\.ttft_p95: Extra inputs"):
        load_slo(bad)


def _loadtest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "loadtest", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "nope"], "--profile: unknown profile 'nope'"),
        (["--duration", "soon"], "--duration: expected a duration like 30s"),
        (["--users", "0"], "--users: must be >= 1"),
        (["--slo", "/nonexistent.yaml"], "--slo: /nonexistent.yaml: cannot read"),
        (["--host", "http://127.0.0.1:9"], "--host: cannot reach http://127.0.0.1:9"),
    ],
)
def test_cli_errors_name_the_argument(tmp_path, args, message):
    base = {"--host": "http://127.0.0.1:9", "--profile": "interactive", "--report": str(tmp_path / "r")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    answer = _loadtest(*[x for pair in base.items() for x in pair])
    assert answer.returncode == 2, answer.stderr
    assert message in answer.stderr


@pytest.mark.slow
def test_a_bounded_run_meets_a_reachable_slo(observed_stack, tmp_path):
    slo = tmp_path / "slo.yaml"
    slo.write_text(
        "efforts:\n  low: {max_error_rate: 0.0}\n  medium: {max_error_rate: 0.0}\n  high: {max_error_rate: 0.0}\n"
    )
    report = tmp_path / "report"
    answer = _loadtest(
        "--host", observed_stack.url, "--profile", "interactive", "--users", "2", "--duration", "25s",
        "--slo", str(slo), "--report", str(report), "--api-key", observed_stack.api_key,
        "--prometheus", observed_stack.prometheus_url,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout + answer.stderr
    summary = json.loads((report / "summary.json").read_text())
    assert summary["profile"] == "interactive" and summary["slo"] == {
        "passed": True,
        "violations": [],
        "file": str(slo),
    }
    assert set(summary["efforts"]) == {"low", "medium", "high"}
    made = [e for e, f in summary["efforts"].items() if f["requests"]]
    assert "low" in made and len(made) >= 2, summary["efforts"]
    for effort in made:
        figures = summary["efforts"][effort]
        assert figures["failures"] == 0
        assert 0 < figures["ttft_p50_s"] <= figures["ttft_p95_s"]
        assert figures["answer_ttft_p95_s"] >= figures["ttft_p50_s"]
        assert figures["tpot_p50_s"] > 0 and figures["reasoning_tokens"] > 0 and figures["answer_tokens"] > 0
    rows = (report / "requests.csv").read_text().splitlines()
    assert len(rows) - 1 == sum(f["requests"] for f in summary["efforts"].values())
    assert (
        "chat low" in (report / "locust_stats.csv").read_text()
        or "chat medium" in (report / "locust_stats.csv").read_text()
    )
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # CDFs, throughput/goodput, Prometheus series
    assert (report / "locust.html").stat().st_size > 10_000


@pytest.mark.slow
def test_an_impossible_slo_fails_the_command(observed_stack, tmp_path):
    slo = tmp_path / "impossible.yaml"
    slo.write_text(
        "efforts:\n  low: {ttft_p50_s: 0.000001}\n  medium: {ttft_p50_s: 0.000001}\n  high: {ttft_p50_s: 0.000001}\n"
    )
    report = tmp_path / "report"
    answer = _loadtest(
        "--host", observed_stack.url, "--profile", "interactive", "--users", "2", "--duration", "30s",
        "--max-requests", "4", "--slo", str(slo), "--report", str(report), "--api-key", observed_stack.api_key,
    )  # fmt: skip
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "SLO missed" in answer.stderr and "ttft_p50_s" in answer.stderr
    summary = json.loads((report / "summary.json").read_text())
    assert summary["slo"]["passed"] is False and summary["slo"]["violations"]
    assert summary["totals"]["requests"] >= 4 and summary["duration_s"] < 30


def test_bench_routing_arms_have_the_same_replicas_and_concurrency():
    from gptoss_vllm.bench.routing import arm_configs
    from gptoss_vllm.serve.config import ServeConfig, load_config

    arms = {name: ServeConfig.model_validate(c) for name, c in arm_configs(load_config(None)).items()}
    effort, shared = arms["effort-pools"], arms["shared-pool"]
    assert set(effort.pools) == {"fast", "deep"} and set(shared.pools) == {"shared"}
    (pool,) = shared.pools.values()
    assert pool.efforts == ["low", "medium", "high"] and pool.spillover is None
    assert pool.replicas == sum(p.replicas for p in effort.pools.values())
    assert pool.replicas * pool.max_ongoing_requests == sum(
        p.replicas * p.max_ongoing_requests for p in effort.pools.values()
    )
    assert {p.model for p in arms["shared-pool"].pools.values()} == {p.model for p in effort.pools.values()}
    assert pool.engine_args == effort.pools["fast"].engine_args == effort.pools["deep"].engine_args
