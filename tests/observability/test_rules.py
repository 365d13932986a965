"""The Prometheus rules: the committed file is the generator's output, promtool accepts it and its unit tests
(prometheus/rules_test.yaml) pass. Needs promtool: `make venv` installs Debian's prometheus package."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gptoss_vllm.observability import rules
from gptoss_vllm.observability.metrics import LATENCY_BUCKETS_S

PROMETHEUS_DIR = rules.RULES_PATH.parent
RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"
ALERTS = {
    "GptossErrorBudgetBurnFast",
    "GptossErrorBudgetBurnSlow",
    "GptossTTFTBudgetBurnFast",
    "GptossTTFTBudgetBurnSlow",
    "GptossPoolNoReadyReplica",
    "GptossPoolQueueSaturated",
    "GptossSustainedRejections",
    "GptossScrapeTargetDown",
    "GptossApiKeysNotReloaded",
    "GptossResponseStoreFailing",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: run `make venv` (it installs Debian's prometheus package)")
    return path


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def all_rules() -> list[dict]:
    return [rule for group in rules.rule_groups()["groups"] for rule in group["rules"]]


def test_committed_rules_are_the_generators_output():
    assert rules.RULES_PATH.read_text() == rules.render(), (
        "prometheus/rules.yaml is out of date: run python -m gptoss_vllm.observability.rules"
    )
    assert rules.main(["--check"]) == 0


def test_promtool_check_rules():
    run_promtool("check", "rules", "rules.yaml")


def test_promtool_unit_tests():
    run_promtool("test", "rules", "rules_test.yaml")


def test_slo_bounds_are_bucket_bounds():
    for slo in rules.SLOS.values():
        assert slo.ttft_bound_s in LATENCY_BUCKETS_S
        assert 0 < slo.availability < 1 and 0 < slo.ttft_target < 1
    with pytest.raises(ValueError):
        rules.le_matcher(3.0)
    assert rules.le_matcher(1.0) == 'le=~"1(\\\\.0)?"'
    assert rules.le_matcher(2.5) == 'le="2.5"'


def test_recording_rule_names_and_windows():
    records = {rule["record"] for rule in all_rules() if "record" in rule}
    assert all(name.startswith("gptoss:") and name.count(":") == 2 for name in records)
    for window in rules.SLI_WINDOWS:
        for sli in ("request_errors:ratio_rate", "ttft_slo_miss:ratio_rate"):
            assert f"gptoss:{sli}{window}" in records
    used = {w for burn in rules.BURN_RATE_WINDOWS for w in (burn.long, burn.short)}
    assert used <= set(rules.SLI_WINDOWS)


def test_alerts_have_severity_annotations_and_a_runbook_section():
    alerts = [rule for rule in all_rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == ALERTS
    runbook = RUNBOOK.read_text()
    headings = {line[3:].strip() for line in runbook.splitlines() if line.startswith("## ")}
    for rule in alerts:
        assert rule["labels"]["severity"] in ("page", "ticket")
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations)
        assert "{{ $labels." in annotations["description"]
        assert annotations["runbook_url"] == f"docs/runbook.md#{rule['alert'].lower()}"
        assert rule["alert"] in headings, f"docs/runbook.md has no section ## {rule['alert']}"
    # One burn-rate alert of each speed per effort and SLO.
    for slo in ("availability", "ttft"):
        for severity in ("page", "ticket"):
            efforts = [
                rule["labels"]["effort"]
                for rule in alerts
                if rule["labels"].get("slo") == slo and rule["labels"]["severity"] == severity
            ]
            assert sorted(efforts) == sorted(rules.SLOS)


def test_ratios_aggregate_replicas_away():
    for rule in all_rules():
        if "record" in rule and "ratio" in rule["record"]:
            expr = rule["expr"]
            assert "> 0" in expr, f"{rule['record']} does not guard its denominator"
        if "record" in rule:
            if re.search(r"\bgptoss_\w+", rule["expr"]):  # raw series: summed over the replicas
                assert re.search(r"(sum|max) by \(", rule["expr"]), rule["record"]
            assert not re.search(r"by \([^)]*\b(instance|replica|job)\b", rule["expr"]), rule["record"]


def test_rules_yaml_parses_and_test_file_points_at_it():
    loaded = yaml.safe_load(rules.RULES_PATH.read_text())
    assert [group["name"] for group in loaded["groups"]] == [g["name"] for g in rules.rule_groups()["groups"]]
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yaml").read_text())
    assert tests["rule_files"] == ["rules.yaml"]
    tested = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])}
    assert tested == ALERTS
