"""``gptoss-vllm bench soak`` on a short run (the embedded default, real Ray and engines): every kind of the
hostile mix is sent and answered as it must be, nothing is lost or leaked, RSS is sampled over time, and the
argument errors. The 30-minute figures come from the bench command itself."""

from __future__ import annotations

import json

from gptoss_vllm.bench.soak import MIX
from tests.support.cli import assert_argument_errors


def test_argument_errors_name_the_argument(tmp_path):
    assert_argument_errors(
        ["bench", "soak"],
        [
            (["--duration", "0"], "--duration"),
            (["--users", "0"], "--users"),
            (["--duration", "10s", "--sample-every", "1m"], "--sample-every"),
            (["--json", str(tmp_path / "missing" / "out.json")], "--json"),
        ],
    )


def test_a_short_soak_loses_and_leaks_nothing(bench_cli, tmp_path):
    out = tmp_path / "soak.json"
    answer = bench_cli(
        "soak", "--duration", "12s", "--users", "4", "--sample-every", "2s", "--json", str(out),
        "--keep", str(tmp_path / "keep"), timeout=1200,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["lost_requests"] == 0, report["lost_examples"]
    assert report["leaked_slots"] == 0 and report["health_after"] == 200 and report["serve_exit_code"] == 0
    outcomes = report["outcomes"]
    assert set(outcomes) == set(MIX), outcomes  # every kind was sent
    for kind, statuses in outcomes.items():
        assert {int(s) for s in statuses} <= set(MIX[kind][1]), (kind, statuses)
    assert "200" in outcomes["chat_stream"] and "415" in outcomes["text_plain"]
    assert report["requests"] == sum(n for statuses in outcomes.values() for n in statuses.values())
    samples = report["rss_samples"]
    assert len(samples) >= 4 and samples[0]["t_s"] < samples[-1]["t_s"]
    roles = {name.split(":")[0] for name in samples[0]["rss_mb"]}
    assert {"serve", "proxy", "ingress", "pool_replica", "engine"} <= roles
    assert set(report["rss_growth_after_warmup_pct"]) == set(samples[0]["rss_mb"])
    assert "lost 0, leaked admission slots 0" in answer.stdout
