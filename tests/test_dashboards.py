"""The Grafana dashboards: the committed JSON is dashboards/build.py's output, every panel queries Prometheus
with the dashboard's variables, and every query is valid PromQL (promtool parses it as a recording rule)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import build, queries

EXPECTED_VARIABLES = {"datasource", "namespace", "pool"}


def test_committed_dashboards_are_the_generators_output():
    assert set(build.DASHBOARDS) == set(queries.DASHBOARD_NAMES)
    for path, text in build.rendered().items():
        assert path.exists(), f"{path.name} is missing: run python -m dashboards.build"
        assert path.read_text() == text, f"{path.name} is out of date: run python -m dashboards.build"
    assert build.main(["--check"]) == 0


@pytest.mark.parametrize("name", queries.DASHBOARD_NAMES)
def test_variables(name):
    dashboard = queries.load(name)
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert set(variables) == EXPECTED_VARIABLES
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for label in ("namespace", "pool"):
        variable = variables[label]
        assert variable["type"] == "query"
        assert variable["query"].startswith("label_values(") and variable["query"].endswith(f", {label})")
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
        assert variable["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("name", queries.DASHBOARD_NAMES)
def test_every_panel_queries_prometheus_with_the_filters(name):
    dashboard = queries.load(name)
    panels = list(queries.iter_panels(dashboard))
    assert panels
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique within a dashboard"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        exprs = [target.get("expr") for target in panel.get("targets", [])]
        assert exprs and all(exprs), f"{name}: panel {panel['title']!r} has a target without an expr"
        for expr in exprs:
            assert 'namespace=~"$namespace"' in expr, f"{name}: {panel['title']!r}: {expr}"
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, f"{name}: {panel['title']!r}: {expr}"
            # Every series but the budget clamps (a counter by effort only), the conversation store (shared by
            # every pool) and the ingress replicas' peers has a pool label to filter on.
            if not any(
                s in expr
                for s in (
                    "gptoss_budget_clamps_total",
                    "gptoss:budget_clamps",
                    "gptoss_response_store_",
                    "gptoss_ingress_peers",
                )
            ):
                assert '=~"$pool"' in expr, f"{name}: {panel['title']!r}: {expr}"


def test_panel_queries_substitutes_every_variable():
    triples = queries.panel_queries()
    assert {name for name, _, _ in triples} == set(queries.DASHBOARD_NAMES)
    for _, _, expr in triples:
        assert "$" not in expr, expr
    raw = queries.panel_queries(substitutions=None)
    assert len(raw) == len(triples)
    with pytest.raises(KeyError):
        queries.substitute("rate(x[$unknown])")


def test_every_expr_parses(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: run `make venv` (it installs Debian's prometheus package)")
    triples = queries.panel_queries()
    records = [
        {"record": f"dashboard:query_{i}:check", "expr": expr} for i, (_, _, expr) in enumerate(triples)
    ]
    rules_file = tmp_path / "dashboard-queries.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": records}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        index = {f"dashboard:query_{i}:check": triple for i, triple in enumerate(triples)}
        details = "\n".join(
            f"{record}: {triple}" for record, triple in index.items() if record in result.stderr
        )
        pytest.fail(f"promtool rejects dashboard queries:\n{result.stdout}\n{result.stderr}\n{details}")


def test_json_is_stable_and_sorted():
    for name in queries.DASHBOARD_NAMES:
        text = (queries.DASHBOARDS_DIR / f"{name}.json").read_text()
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
