"""Load tests without a stack: profiles and SLO files (validation, arrival shapes, the SLO check), the
figures, the CLI's argument errors, and the routing benchmark's arms. The bounded runs against a running stack
are in ``serve/test_observability.py``, which has one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_vllm.loadtest.profiles import Arrival, ProfileError, builtin_profiles, load_profile
from gptoss_vllm.loadtest.samples import Sample, effort_figures, percentile
from gptoss_vllm.loadtest.slo import Slo, SloError, load_slo, violations
from tests.support.cli import run_cli


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
    with pytest.raises(SloError, match=r"unknown SLO 'gpu-21b': use one of cpu-nano, gpu-20b or a YAML file"):
        load_slo("gpu-21b")
    with pytest.raises(SloError, match="cannot read"):
        load_slo(tmp_path / "missing.yaml")
    bad = tmp_path / "slo.yaml"
    bad.write_text("efforts: {low: {ttft_p95: 1}}\n")
    with pytest.raises(SloError, match=r"slo\.yaml: efforts\.low\.ttft_p95: Extra inputs"):
        load_slo(bad)


def _loadtest(*args: str) -> subprocess.CompletedProcess:
    return run_cli("loadtest", *args)


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


def test_bench_routing_arms_have_the_same_replicas_and_concurrency():
    from gptoss_vllm.bench.routing import arm_configs
    from gptoss_vllm.serve.config import ServeConfig
    from gptoss_vllm.serve.config_load import load_config

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


def test_users_draw_the_same_requests_in_every_run_and_differ_from_each_other():
    """The n-th user's requests come from its own seeded generator (loadtest/draws.py): a rerun, or plan
    validate's replay, sends the same ones."""
    from gptoss_vllm.bench.routing import WORKLOAD
    from gptoss_vllm.loadtest.draws import next_request, think_time, user_rng
    from gptoss_vllm.loadtest.profiles import Profile

    profile = Profile.model_validate(WORKLOAD)

    def sequence(seed: int, user: int) -> list[tuple[str, str, float]]:
        rng = user_rng(seed, user)
        out = []
        for _ in range(30):
            draw = next_request(rng, profile)
            out.append((draw.effort, draw.prompt, think_time(rng, profile)))
        return out

    assert sequence(0, 1) == sequence(0, 1)
    assert sequence(0, 1) != sequence(0, 2) and sequence(0, 1) != sequence(1, 1)
    for effort, text, think in sequence(0, 3):
        words = len(text.split(": ", 1)[1].split())
        assert effort in WORKLOAD["efforts"] and 8 <= words <= 40 and 0.0 <= think <= 0.2


def test_the_shipped_locustfile_loads_under_locusts_own_cli():
    import gptoss_vllm.loadtest

    locustfile = Path(gptoss_vllm.loadtest.__file__).parent / "locustfile.py"
    locust = Path(sys.executable).parent / "locust"
    done = subprocess.run(
        [str(locust), "-f", str(locustfile), "--list"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "ProfileUser" in done.stdout, done.stderr[-2000:]
