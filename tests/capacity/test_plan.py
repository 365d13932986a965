"""The capacity simulator against queues with known answers, and the curve file's errors."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from gptoss_vllm.capacity.curve import Curve, CurveError
from gptoss_vllm.capacity.simulate import PoolSpec, Request, simulate


def _curve(tpot: float = 0.01, prefill: float = 1e-6, seqs: int = 1, kv: int = 10**9) -> Curve:
    return Curve(
        max_num_seqs=seqs, kv_capacity_tokens=kv, decode=((1, tpot), (2, tpot)), prefill=((1, prefill),)
    )


def _poisson(rate: float, n: int, seed: int = 0, **request) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Request(arrival_s=t, **request))
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_m_d_1_waits_as_pollaczek_khinchine_says():
    """One sequence at a time, every service 1 s (a 100-token prefill, one output token), arrivals at 0.3/s."""
    curve = Curve(max_num_seqs=1, kv_capacity_tokens=10**6, decode=((1, 0.01),), prefill=((100, 1.0),))
    done = simulate(
        _poisson(0.3, 20000, effort="low", prompt_tokens=100, output_tokens=1),
        [PoolSpec("p", ("low",), 1, curve)],
    )
    rho, service = 0.3, 1.0
    wait = rho * service / (2 * (1 - rho))  # M/D/1 mean wait in queue
    assert _mean(r.ttft_s for r in done) == pytest.approx(wait + service, rel=0.04)


def test_m_m_1_sojourn_is_one_over_mu_minus_lambda():
    """Geometric output lengths of mean 100 at 10 ms per token: exponential service of mean 1 s, at 0.5/s."""
    rng = random.Random(1)
    requests = _poisson(0.5, 20000, seed=2, effort="low", prompt_tokens=1, output_tokens=1)
    for r in requests:
        r.output_tokens = 1 + int(rng.expovariate(1 / 100))
    mean_service = _mean(0.01 * (r.output_tokens - 1) for r in requests)
    done = simulate(requests, [PoolSpec("p", ("low",), 1, _curve())])
    sojourn = _mean(r.done_s - r.arrival_s for r in done)
    assert sojourn == pytest.approx(1 / (1 / mean_service - 0.5), rel=0.08)


def test_saturated_replicas_serve_at_the_curves_capacity():
    curve = Curve(
        max_num_seqs=8, kv_capacity_tokens=10**6, decode=((1, 0.02), (8, 0.1)), prefill=((1, 1e-6),)
    )
    requests = [Request(0.0, "low", 1, 100) for _ in range(800)]
    for replicas in (1, 3):
        done = simulate(
            [Request(0.0, "low", 1, 100) for _ in range(800)], [PoolSpec("p", ("low",), replicas, curve)]
        )
        makespan = max(r.done_s for r in done)
        assert 800 * 100 / makespan == pytest.approx(replicas * curve.saturation_tokens_per_s(), rel=0.02)
    assert curve.saturation_tokens_per_s() == pytest.approx(80)
    assert requests[0].ttft_s is None  # not simulated


def test_the_kv_cache_bounds_the_batch_and_a_request_that_never_fits_is_left():
    curve = Curve(max_num_seqs=8, kv_capacity_tokens=250, decode=((1, 0.1), (8, 0.1)), prefill=((1, 1e-6),))
    requests = [Request(0.0, "low", 50, 50) for _ in range(4)] + [Request(0.0, "low", 200, 100)]
    done = simulate(requests, [PoolSpec("p", ("low",), 1, curve)])
    served = sorted(done[:4], key=lambda r: r.first_token_s)
    assert served[1].first_token_s < served[0].done_s  # two run at once ...
    assert served[2].first_token_s >= min(served[0].done_s, served[1].done_s)  # ... a third waits for room
    assert done[4].first_token_s is None


def test_effort_routing_and_spillover():
    slow = _curve(tpot=0.1)
    pools = [
        PoolSpec("fast", ("low",), 1, slow, spill_to="deep", queue_above=2),
        PoolSpec("deep", ("high",), 1, slow),
    ]
    requests = [Request(0.0, "low", 1, 10) for _ in range(6)] + [Request(0.0, "high", 1, 10)]
    done = simulate(requests, pools)
    assert [r.pool for r in done if r.effort == "high"] == ["deep"]
    low_pools = [r.pool for r in done if r.effort == "low"]
    # One runs, two wait in fast's queue, then each next one spills (the queue holds more than 2).
    assert low_pools.count("fast") == 4 and low_pools.count("deep") == 2, low_pools
    without = simulate([Request(0.0, "low", 1, 10) for _ in range(6)], [PoolSpec("fast", ("low",), 1, slow)])
    assert {r.pool for r in without} == {"fast"}


def test_curve_files_round_trip_and_name_what_is_wrong(tmp_path):
    curve = Curve(
        16, 21000, ((1, 0.16), (4, 0.3), (16, 0.7)), ((128, 2.9), (2048, 44.0)), "gpt-oss-20b", "here"
    )
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(curve.to_json()))
    assert Curve.load(path) == curve
    assert curve.tpot_s(2) == pytest.approx(0.16 + (0.3 - 0.16) / 3)
    assert curve.tpot_s(32) == pytest.approx(0.7 + (0.7 - 0.3) / 12 * 16)  # along the last segment
    for broken, named in (
        ({"max_num_seqs": 4}, "'kv_capacity_tokens'"),
        ({**curve.to_json(), "decode": []}, "decode has no points"),
        ({**curve.to_json(), "decode": [{"concurrency": 1}]}, "decode[0]"),
        ({**curve.to_json(), "prefill": [{"prompt_tokens": 1, "ttft_s": -1}]}, "prefill[0]"),
        ({**curve.to_json(), "max_num_seqs": "16"}, "max_num_seqs must be int"),
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(CurveError, match=re.escape(named)) as failed:
            Curve.load(path)
        assert str(path) in str(failed.value)
    with pytest.raises(CurveError, match="cannot read"):
        Curve.load(tmp_path / "missing.json")


def _traffic(rate: float, **overrides):
    from gptoss_vllm.capacity.plan import Traffic

    data = {"rate_rps": rate, "duration_s": 400, "efforts": {"low": 0.6, "medium": 0.25, "high": 0.15},
            "prompt_tokens": {e: (64, 256) for e in ("low", "medium", "high")},
            "output_tokens": {"low": 40, "medium": 120, "high": 600}}  # fmt: skip
    return Traffic.model_validate({**data, **overrides})


def test_plan_compares_shared_split_and_spillover_and_writes_a_valid_pools_fragment():
    from gptoss_vllm.capacity.plan import best, evaluate, layouts, serving_fragment
    from gptoss_vllm.loadtest.slo import load_slo
    from gptoss_vllm.serve.config import ServeConfig
    from gptoss_vllm.serve.config_load import load_config

    curve = Curve(8, 40000, ((1, 0.02), (8, 0.05)), ((64, 0.1), (256, 0.4)))
    slo = load_slo("cpu-nano")  # a shipped file, by name
    quiet = [evaluate(_traffic(0.05), curve, slo, layout) for layout in layouts(_traffic(0.05), curve, 4, 2)]
    names = [r["layout"] for r in quiet]
    assert names[0] == "shared" and sum(n.startswith("split") for n in names) == 3 == sum(
        n.startswith("spill") for n in names
    )
    assert all(r["min_attainment"] == 1.0 for r in quiet)  # nothing queues at 1 request per 20 s
    assert best(quiet)["layout"] == "shared"  # a tie goes to the simpler layout
    busy = [evaluate(_traffic(3.0), curve, slo, layout) for layout in layouts(_traffic(3.0), curve, 4, 2)]
    assert all(0 <= r["min_attainment"] <= r["attainment"] <= 1 for r in busy)
    assert max(r["goodput_rps"] for r in busy) <= 3.0 * 1.1
    fragment = serving_fragment(next(r for r in busy if r["layout"].startswith("spill")), max_ongoing=8)
    base = load_config(None).model_dump(exclude_none=True)
    model_fields = next(iter(base["pools"].values()))
    pools = {name: {**{k: v for k, v in model_fields.items() if k not in ("efforts", "replicas", "spillover", "autoscaling")}, **pool}
             for name, pool in fragment["pools"].items()}  # fmt: skip
    ServeConfig.model_validate({**base, "pools": pools})  # the fragment is a serving config's pools


def test_traffic_errors_name_the_key(tmp_path):
    from gptoss_vllm.capacity.plan import PlanError, load_traffic

    path = tmp_path / "traffic.yaml"
    path.write_text("rate_rps: 1\nefforts: {low: 0.5, high: 0.4}\nprompt_tokens: {low: [1, 2], high: [1, 2]}\n"
                    "output_tokens: {low: 10, high: 10}\n")  # fmt: skip
    with pytest.raises(PlanError, match="add up to 1") as failed:
        load_traffic(path)
    assert str(path) in str(failed.value)
    path.write_text("rate_rps: 1\nefforts: {low: 1}\nprompt_tokens: {low: [1, 2]}\noutput_tokens: {}\n")
    with pytest.raises(PlanError, match="output_tokens: no figure for effort"):
        load_traffic(path)


def _plan_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gptoss_vllm.cli", "plan", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_plan_cli_writes_the_table_json_plot_and_fragment(tmp_path):
    import yaml

    curve = Curve(8, 40000, ((1, 0.02), (8, 0.05)), ((64, 0.1), (256, 0.4)), "gpt-oss-20b", "a test curve")
    (tmp_path / "gpu.json").write_text(json.dumps(curve.to_json()))
    traffic = {"rate_rps_per_replica": 0.5, "duration_s": 120, "efforts": {"low": 0.6, "medium": 0.25, "high": 0.15},
               "prompt_tokens": {e: [64, 256] for e in ("low", "medium", "high")},
               "output_tokens": {"low": 40, "medium": 120, "high": 600}}  # fmt: skip
    (tmp_path / "traffic.yaml").write_text(yaml.safe_dump(traffic))
    out = {name: tmp_path / name for name in ("plan.json", "plan.png", "pools.yaml")}
    done = _plan_cli("--curves", str(tmp_path / "gpu.json"), "--traffic", str(tmp_path / "traffic.yaml"),
                     "--replicas", "2,4", "--json", str(out["plan.json"]), "--plot", str(out["plan.png"]),
                     "--fragment", str(out["pools.yaml"]))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out["plan.json"].read_text())
    totals = report["plans"]["gpu"]["totals"]
    assert set(totals) == {"2", "4"}
    for total, entry in totals.items():
        names = [r["layout"] for r in entry["layouts"]]
        assert entry["recommended"] in names and names[0] == "shared"
        for result in entry["layouts"]:
            assert {"low", "medium", "high"} == set(result["efforts"])
            assert sum(p["replicas"] for p in result["pools"]) == int(total)
    # The per-replica rate: the 4-replica fleet is offered twice the 2-replica fleet's requests.
    requests = {t: sum(f["requests"] for f in e["layouts"][0]["efforts"].values()) for t, e in totals.items()}
    assert requests["4"] == pytest.approx(2 * requests["2"], rel=0.2)
    assert out["plan.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load(out["pools.yaml"].read_text())["pools"]
    assert "recommended" in done.stdout and "* " in done.stdout


def test_plan_cli_names_the_bad_argument(tmp_path):
    (tmp_path / "bad.json").write_text("{}")
    done = _plan_cli("--curves", str(tmp_path / "bad.json"), "--traffic", str(tmp_path / "none.yaml"))
    assert done.returncode == 2 and "--curves" in done.stderr and "max_num_seqs" in done.stderr, done.stderr
    good = Curve(8, 100, ((1, 0.1),), ((1, 0.1),))
    (tmp_path / "good.json").write_text(json.dumps(good.to_json()))
    done = _plan_cli("--curves", str(tmp_path / "good.json"), "--traffic", str(tmp_path / "none.yaml"))
    assert done.returncode == 2 and "--traffic" in done.stderr and "none.yaml" in done.stderr, done.stderr


def test_plan_validate_replays_the_routing_workload_for_both_arms(tmp_path):
    """bench routing's JSON (its shape; the figures made up) against a curve: every figure of both arms."""
    from gptoss_vllm.bench.routing import WORKLOAD

    curve = Curve(
        8, 20000, ((1, 0.05), (4, 0.08), (8, 0.12)), ((64, 0.5), (256, 1.6)), "gpt-oss-nano", "test"
    )
    (tmp_path / "curve.json").write_text(json.dumps(curve.to_json()))
    efforts = {
        e: {"requests": 10, "ttft_p50_s": 0.5, "ttft_p95_s": 1.5, "goodput_rps": 0.1}
        for e in WORKLOAD["efforts"]
    }
    arm = {"efforts": efforts, "totals": {"requests": 30, "failures": 0, "output_tokens_per_s": 40.0}}
    routing = {
        "workload": WORKLOAD,
        "users": 6,
        "duration_s": 120,
        "arms": {"effort-pools": arm, "shared-pool": arm},
    }
    (tmp_path / "routing.json").write_text(json.dumps(routing))
    done = _plan_cli("validate", "--curves", str(tmp_path / "curve.json"), "--against", str(tmp_path / "routing.json"),
                     "--json", str(tmp_path / "validate.json"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "validate.json").read_text())
    assert set(report["arms"]) == {"effort-pools", "shared-pool"} and report["figures"] == 2 * (1 + 3 * 3)
    for entry in report["arms"].values():
        predicted = entry["predicted"]
        assert (
            set(predicted["efforts"]) == {"low", "medium", "high"}
            and predicted["totals"]["output_tokens_per_s"] > 0
        )
        for row in entry["rows"]:
            assert row["measured"] is not None and row["predicted"] is not None
            assert row["within"] == (abs(row["predicted"] / row["measured"] - 1) <= 0.30)
    # The pools arm routes high to deep alone: its low requests never wait behind 384-token outputs there.
    pools, shared = report["arms"]["effort-pools"]["predicted"], report["arms"]["shared-pool"]["predicted"]
    assert pools["efforts"]["low"]["requests"] > 0 and shared["efforts"]["low"]["requests"] > 0
    assert "figures within 30%" in done.stdout
    bad = _plan_cli(
        "validate", "--curves", str(tmp_path / "curve.json"), "--against", str(tmp_path / "curve.json")
    )
    assert bad.returncode == 2 and "--against" in bad.stderr, bad.stderr
    # bench routing --curves embeds the curve it measured: validate reads it when --curves is not given.
    no_curve = _plan_cli("validate", "--against", str(tmp_path / "routing.json"))
    assert no_curve.returncode == 2 and "--curves" in no_curve.stderr and "holds no curve" in no_curve.stderr
    routing["curve"] = curve.to_json()
    (tmp_path / "embedded.json").write_text(json.dumps(routing))
    embedded = _plan_cli("validate", "--against", str(tmp_path / "embedded.json"), "--json",
                         str(tmp_path / "embedded-report.json"))  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr[-2000:]
    assert json.loads((tmp_path / "embedded-report.json").read_text())["arms"] == report["arms"]
    routing["curve"] = {**curve.to_json(), "decode": []}
    (tmp_path / "broken.json").write_text(json.dumps(routing))
    broken = _plan_cli("validate", "--against", str(tmp_path / "broken.json"))
    assert broken.returncode == 2 and "decode has no points" in broken.stderr, broken.stderr


def test_the_shipped_planning_files_give_the_readme_answer(tmp_path):
    """The published GPU curve and the planning traffic load; with headroom one shared pool meets every effort's
    SLO, and past the knee it misses them all while a split with spillover keeps low effort served."""
    from gptoss_vllm.capacity.plan import load_traffic

    root = Path(__file__).resolve().parents[2] / "gptoss_vllm" / "capacity"
    curve = Curve.load(root / "curves" / "gpt-oss-120b-h100-tp2.json")
    assert curve.model == "gpt-oss-120b" and "InferenceMAX" in curve.source
    for name in ("chat", "mixed", "reasoning", "cpu-nano"):
        load_traffic(root / "traffic" / f"{name}.yaml")
    Curve.load(root / "curves" / "gpt-oss-nano-cpu-2core.json")
    results = {}
    for load in ("1.0", "1.2"):
        out = tmp_path / f"plan-{load}.json"
        done = _plan_cli("--curves", str(root / "curves" / "gpt-oss-120b-h100-tp2.json"), "--traffic",
                         str(root / "traffic" / "mixed.yaml"), "--replicas", "4", "--load", load, "--json", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        entry = next(iter(json.loads(out.read_text())["plans"].values()))["totals"]["4"]
        results[load] = {r["layout"]: r for r in entry["layouts"]}
        if load == "1.0":
            assert entry["recommended"] == "shared"
    assert results["1.0"]["shared"]["min_attainment"] >= 0.99
    hot_shared = results["1.2"]["shared"]
    hot_spill = results["1.2"]["spill low+medium x2 | high x2"]
    assert hot_shared["min_attainment"] < 0.95
    assert hot_spill["efforts"]["low"]["attainment"] > hot_shared["efforts"]["low"]["attainment"] + 0.2
    bad = _plan_cli("--curves", str(root / "curves" / "gpt-oss-120b-h100-tp2.json"), "--traffic",
                    str(root / "traffic" / "mixed.yaml"), "--load", "0")  # fmt: skip
    assert bad.returncode == 2 and "--load" in bad.stderr, bad.stderr
