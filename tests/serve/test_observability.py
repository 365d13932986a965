"""Observability end to end: the real CLI runs nano in two pools with ``--prometheus`` (a real Prometheus
scraping every replica through the ingress's service discovery, rules loaded) and OTLP tracing to an in-test
receiver. Metric values are checked against what the test sent and what the answers' ``usage`` said; every
dashboard and recording-rule expression is run against that Prometheus; a request's trace is followed from the
ingress into vLLM's engine; bounded load tests run against it."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from typing import Any

import httpx
import pytest
import yaml

from dashboards.queries import panel_queries
from gptoss_vllm.observability.local_prometheus import RULES
from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name
from tests.support import http
from tests.support.admission import HOLD_TOKENS, Samples, holding, ingress_samples, monitoring_headers
from tests.support.cli import run_cli

USER = [{"role": "user", "content": "What is 47 + 8?"}]
CHAT = "/v1/chat/completions"
# Held slots: outputs at their effort's budget (conftest), released by the test.
OVER_BUDGET = HOLD_TOKENS + 10_000  # above high's rejecting budget
MEDIUM_HOLD = {"messages": USER, "reasoning_effort": "medium", "max_tokens": HOLD_TOKENS, "ignore_eos": True}
HIGH_HOLD = {"messages": USER, "reasoning_effort": "high", "max_tokens": HOLD_TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def receiver(otlp_receiver):
    return otlp_receiver


def _post(stack, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return http.post(
        f"{stack.url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {stack.api_key}", **(headers or {})},
        timeout=180,
    )


def _post_raw(stack, body: bytes) -> httpx.Response:
    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    return http.post(f"{stack.url}{CHAT}", content=body, headers=headers, timeout=60)


def _targets(stack) -> list[dict]:
    return http.get(f"{stack.url}/metrics/targets", headers=monitoring_headers(), timeout=10).json()


def _ingress_metrics(stack) -> Samples:
    return ingress_samples(stack.url)


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    def total(samples: dict) -> float:
        return sum(
            value
            for (sample, sample_labels), value in samples.items()
            if sample == name and set(labels.items()) <= sample_labels
        )

    return total(after) - total(before)


def _stream_events(response: httpx.Response) -> list[dict]:
    return [
        json.loads(line[6:])
        for line in response.text.split("\n")
        if line.startswith("data: {")
    ]  # fmt: skip


def test_targets_cover_the_ingress_the_proxy_and_every_pool_replica(stack):
    # The proxy's gate announces its metrics from its first count: one body it refuses (a 100-deep one).
    deep = b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}"
    assert _post_raw(stack, deep).status_code == 400
    expected = [("ingress", ""), ("pool", "deep"), ("pool", "fast"), ("proxy", "")]
    deadline = time.monotonic() + 30
    while (
        labels := sorted((t["labels"]["component"], t["labels"].get("pool", "")) for t in _targets(stack))
    ) != expected:
        assert time.monotonic() < deadline, labels
        time.sleep(0.25)
    for target in _targets(stack):
        labels = target["labels"]
        assert labels["replica"]
        # Each replica's Ray Serve application: a pool's own, the ingress's; proxies serve all of them.
        app = {"ingress": APP_NAME, "pool": pool_app_name(labels.get("pool", "")), "proxy": None}
        assert labels.get("app") == app[labels["component"]]
        assert http.get(f"http://{target['targets'][0]}/metrics", timeout=10).status_code == 200


def test_request_counts_and_tokens_agree_with_the_answers(stack):
    before = _ingress_metrics(stack)
    streamed = _post(
        stack,
        "/v1/chat/completions",
        {
            "messages": USER,
            "reasoning_effort": "low",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    low_usage = _stream_events(streamed)[-1]["usage"]
    whole = _post(
        stack, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "high", "max_tokens": 300}
    )
    high_usage = whole.json()["usage"]
    response = _post(
        stack, "/v1/responses", {"input": "Sort the list [2, 3, 1].", "reasoning": {"effort": "medium"}}
    )
    medium_usage = response.json()["usage"]
    after = _ingress_metrics(stack)

    requests = "gptoss_requests_total"
    assert _delta(before, after, requests, endpoint="chat", effort="low", pool="fast", status="200") == 1
    assert _delta(before, after, requests, endpoint="chat", effort="high", pool="deep", status="200") == 1
    assert _delta(before, after, requests, endpoint="responses", effort="medium", status="200") == 1
    for effort, usage, reasoning in (
        ("low", low_usage, low_usage["completion_tokens_details"]["reasoning_tokens"]),
        ("high", high_usage, high_usage["completion_tokens_details"]["reasoning_tokens"]),
        ("medium", medium_usage, medium_usage["output_tokens_details"]["reasoning_tokens"]),
    ):
        output = usage.get("completion_tokens", usage.get("output_tokens"))
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        assert reasoning > 0, (effort, usage)  # nano writes an analysis first
        assert (
            _delta(before, after, "gptoss_output_tokens_total", effort=effort, kind="reasoning") == reasoning
        )
        assert (
            _delta(before, after, "gptoss_output_tokens_total", effort=effort, kind="answer")
            == output - reasoning
        )
        assert _delta(before, after, "gptoss_prompt_tokens_total", effort=effort) == prompt
    # Only the stream's latencies are observable: one TTFT, one time to first answer token, after it.
    ttft = _delta(before, after, "gptoss_time_to_first_token_seconds_count", effort="low")
    ttfa = _delta(before, after, "gptoss_time_to_first_answer_token_seconds_count", effort="low")
    assert ttft == ttfa == 1
    assert _delta(before, after, "gptoss_time_to_first_answer_token_seconds_sum", effort="low") > _delta(
        before, after, "gptoss_time_to_first_token_seconds_sum", effort="low"
    )
    gaps = _delta(before, after, "gptoss_inter_token_latency_seconds_count", effort="low")
    assert 0 < gaps < low_usage["completion_tokens"]


def test_usage_the_client_did_not_ask_for_is_counted_but_not_sent(stack):
    before = _ingress_metrics(stack)
    answer = _post(
        stack, "/v1/chat/completions", {"messages": USER, "reasoning_effort": "medium", "stream": True}
    )
    events = _stream_events(answer)
    assert events and not any(e.get("usage") for e in events)
    assert answer.text.rstrip().endswith("data: [DONE]")
    after = _ingress_metrics(stack)
    assert _delta(before, after, "gptoss_output_tokens_total", effort="medium", kind="reasoning") > 0
    assert _delta(before, after, "gptoss_output_tokens_total", effort="medium", kind="answer") > 0


def _spill_one(stack) -> httpx.Response:
    """A medium request that spills from fast to deep: fast (one running, one queued) is held full first."""
    with holding(stack.url, CHAT, {"fast": [MEDIUM_HOLD, MEDIUM_HOLD]}, stack.api_key):
        return _post(stack, CHAT, {"messages": USER, "reasoning_effort": "medium", "max_tokens": 8})


def test_refusals_spills_and_clamps_are_counted_by_reason(stack):
    before = _ingress_metrics(stack)
    assert http.post(f"{stack.url}{CHAT}", json={"messages": USER}, timeout=30).status_code == 401
    assert _post(stack, CHAT, {"messages": USER, "reasoning_effort": "huge"}).status_code == 400
    clamped = _post(stack, CHAT, {"messages": USER, "reasoning_effort": "low", "max_tokens": 500})
    assert clamped.headers["x-gptoss-budget-clamped-from"] == "500"
    over = {"messages": USER, "reasoning_effort": "high", "max_tokens": OVER_BUDGET}
    assert _post(stack, CHAT, over).status_code == 400
    spilled = _spill_one(stack)
    assert spilled.status_code == 200, spilled.text
    assert spilled.headers["x-gptoss-spilled-from"] == "fast" and spilled.headers["x-gptoss-pool"] == "deep"
    # deep admits two running and one queued; with those held, the next high request is refused at once.
    with holding(stack.url, CHAT, {"deep": [HIGH_HOLD] * 3}, stack.api_key):
        refused = _post(stack, CHAT, {"messages": USER, "reasoning_effort": "high", "max_tokens": 8})
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
    # A held request that was still queued is counted once its handler has unwound, just after its slot is
    # free: wait for the held requests' counts (a deadline, not a pace).
    deadline = time.monotonic() + 30
    while True:
        after = _ingress_metrics(stack)
        held = [
            _delta(before, after, "gptoss_requests_total", effort=effort, pool=pool, status="499")
            for effort, pool in (("medium", "fast"), ("high", "deep"))
        ]
        if (held[0] >= 2 and held[1] >= 3) or time.monotonic() > deadline:
            break
        time.sleep(0.25)

    assert _delta(before, after, "gptoss_spillovers_total", from_pool="fast", to_pool="deep") == 1
    assert _delta(before, after, "gptoss_rejections_total", reason="auth") == 1
    assert _delta(before, after, "gptoss_rejections_total", reason="invalid") == 1
    assert _delta(before, after, "gptoss_rejections_total", reason="budget", pool="deep") == 1
    assert _delta(before, after, "gptoss_rejections_total", reason="queue_full", pool="deep") == 1
    assert _delta(before, after, "gptoss_budget_clamps_total", effort="low") == 1
    assert _delta(before, after, "gptoss_requests_total", endpoint="chat", effort="none", status="401") == 1
    assert _delta(before, after, "gptoss_requests_total", endpoint="chat", effort="none", status="400") == 1
    assert _delta(before, after, "gptoss_requests_total", effort="high", pool="deep", status="429") == 1
    # The held requests were let go by their client: recorded as 499, never as the service's failure.
    assert _delta(before, after, "gptoss_requests_total", effort="medium", pool="fast", status="499") == 2
    counted = {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if k[0] == "gptoss_requests_total" and v != before.get(k, 0)
    }
    assert _delta(before, after, "gptoss_requests_total", effort="high", pool="deep", status="499") == 3, (
        counted
    )
    assert _delta(before, after, "gptoss_requests_total", status="500") == 0


def _query(stack, expr: str) -> list[dict[str, Any]]:
    answer = http.get(f"{stack.prometheus_url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def _wait_for(stack, expr: str, timeout_s: float = 90) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := _query(stack, expr):
            return result
        time.sleep(0.5)
    pytest.fail(f"no data for {expr} after {timeout_s} s")


def test_prometheus_scrapes_vllm_metrics_from_every_replica(stack):
    series = _wait_for(stack, 'vllm:kv_cache_usage_perc{namespace="local"}')
    pools = sorted(s["metric"]["pool"] for s in series)
    assert pools == ["deep", "fast"]
    assert all(s["metric"]["replica"] and s["metric"]["component"] == "pool" for s in series)
    up = _wait_for(stack, 'count(up{job="gptoss-vllm", component=~"ingress|pool"} == 1)')
    assert up[0]["value"][1] == "3"


def _wait_for_spans(receiver, trace_id: str, names: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spans = {s.name: s for s in receiver.trace(trace_id)}
        if names <= spans.keys():
            return spans
        time.sleep(0.5)
    pytest.fail(f"spans of trace {trace_id}: {sorted(spans)}; expected {sorted(names)}")


def test_a_trace_runs_from_the_client_through_the_ingress_into_the_engine(stack, receiver):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    answer = _post(
        stack,
        "/v1/chat/completions",
        {"messages": USER, "reasoning_effort": "high", "max_tokens": 300},
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
    )
    assert answer.status_code == 200
    usage = answer.json()["usage"]
    root_name = "POST /v1/chat/completions"
    spans = _wait_for_spans(receiver, trace_id, {root_name, "admission", "engine", "llm_request"})
    root, admission, engine, vllm = (spans[n] for n in (root_name, "admission", "engine", "llm_request"))
    assert root.parent_span_id == client_span
    assert admission.parent_span_id == engine.parent_span_id == root.span_id
    assert vllm.parent_span_id == engine.span_id  # vLLM continued the context the ingress forwarded
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    for name, value in {
        "gptoss.effort": "high",
        "gptoss.effort_source": "chat",
        "gptoss.pool": "deep",
        "gptoss.replica": _only_replica(stack, "deep"),
        "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "gptoss.usage.reasoning_tokens": reasoning,
        "gptoss.usage.answer_tokens": usage["completion_tokens"] - reasoning,
    }.items():
        assert root.attributes.get(name) == value, (name, root.attributes)
    assert "gptoss.spilled_from" not in root.attributes
    assert engine.attributes["gptoss.replica"] == _only_replica(stack, "deep")
    assert vllm.attributes["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert root.resource["service.name"] == "gptoss-vllm"


def _only_replica(stack, pool: str) -> str:
    """The id of ``pool``'s one replica, as service discovery labels it (clients are not shown replica ids)."""
    (replica,) = [t["labels"]["replica"] for t in _targets(stack) if t["labels"].get("pool") == pool]
    return replica


def test_a_refused_request_is_traced_without_an_engine_span(stack, receiver):
    trace_id = secrets.token_hex(16)
    answer = _post(
        stack,
        "/v1/chat/completions",
        {"messages": USER, "reasoning_effort": "high", "max_tokens": OVER_BUDGET},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )
    assert answer.status_code == 400
    spans = _wait_for_spans(receiver, trace_id, {"POST /v1/chat/completions", "admission"})
    assert spans["admission"].attributes["gptoss.rejected"] == "budget"
    assert spans["POST /v1/chat/completions"].attributes["http.response.status_code"] == 400
    time.sleep(1)
    assert "engine" not in {s.name for s in receiver.trace(trace_id)}


def _recording_rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r["record"], r["expr"]) for group in rules["groups"] for r in group["rules"] if "record" in r]


def _streams_at_every_effort(stack) -> None:
    for effort in ("low", "medium", "high"):
        chat = {"messages": USER, "reasoning_effort": effort, "stream": True, "max_tokens": 200}
        assert _post(stack, CHAT, chat).status_code == 200
        response = {"input": "Sort the list [3, 1, 2].", "reasoning": {"effort": effort}, "stream": True}
        assert _post(stack, "/v1/responses", response).status_code == 200


def _wait_for_a_scrape_after(stack, moment: float, timeout_s: float = 60) -> None:
    """Until Prometheus holds an ingress sample taken after ``moment`` (Unix time; one clock on this machine)."""
    _wait_for(stack, f'timestamp(gptoss_pool_running_replicas{{pool="fast"}}) > {moment}', timeout_s)


def test_every_dashboard_and_recording_rule_expression_returns_data(stack):
    # The test makes every series the dashboards and rules read, whatever ran before it: streams at every
    # effort through both generating endpoints (histograms, tokens), a budget clamp, a refusal and a spill.
    _streams_at_every_effort(stack)
    assert (
        _post(stack, CHAT, {"messages": USER, "reasoning_effort": "low", "max_tokens": 500}).status_code
        == 200
    )
    assert http.post(f"{stack.url}{CHAT}", json={"messages": USER}, timeout=30).status_code == 401
    assert _spill_one(stack).headers["x-gptoss-spilled-from"] == "fast"
    # A rate is only non-zero over two samples that differ: the second round comes after a scrape of the first.
    _wait_for_a_scrape_after(stack, time.time())
    _streams_at_every_effort(stack)
    _wait_for_a_scrape_after(stack, time.time())
    queries = [(f"{board} / {panel}", expr) for board, panel, expr in panel_queries()]
    queries += [(f"rule {record}", expr) for record, expr in _recording_rule_exprs()]
    assert len(queries) > 60
    # Recording rules are evaluated on their own interval after the scrape: poll until every one has data.
    deadline = time.monotonic() + 60
    while empty := [f"{where}: {expr}" for where, expr in queries if not _query(stack, expr)]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not empty, "expressions without data:\n" + "\n".join(empty)


def test_every_rule_is_loaded_and_evaluates_without_error(stack):
    groups = http.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    expected = yaml.safe_load(RULES.read_text())["groups"]
    assert len(rules) == sum(len(group["rules"]) for group in expected)
    broken = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not broken, broken
    # Nothing here takes a pool down: the page for a pool without replicas must stay silent.
    alerts = http.get(f"{stack.prometheus_url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "GptossPoolNoReadyReplica"], alerts


# -- load tests (gptoss-vllm loadtest: real Locust) against this stack -----------------------------------------


def _loadtest(*args: str) -> subprocess.CompletedProcess:
    return run_cli("loadtest", *args)


def test_a_bounded_run_meets_a_reachable_slo(stack, tmp_path):
    # Every effort often enough that a 25 s run has each (interactive's 5% high could draw none), outputs
    # within this stack's budgets.
    profile = tmp_path / "mix.yaml"
    profile.write_text(
        "name: mix\nefforts: {low: 0.5, medium: 0.3, high: 0.2}\nprompt_words: {min: 4, max: 20}\n"
        "output_tokens: {low: 48, medium: 96, high: 128}\n"
    )
    slo = tmp_path / "slo.yaml"
    slo.write_text(
        "efforts:\n  low: {max_error_rate: 0.0}\n  medium: {max_error_rate: 0.0}\n  high: {max_error_rate: 0.0}\n"
    )
    report = tmp_path / "report"
    answer = _loadtest(
        "--host", stack.url, "--profile", str(profile), "--users", "2", "--duration", "25s",
        "--slo", str(slo), "--report", str(report), "--api-key", stack.api_key,
        "--prometheus", stack.prometheus_url,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stdout + answer.stderr
    summary = json.loads((report / "summary.json").read_text())
    assert summary["profile"] == "mix" and summary["slo"] == {
        "passed": True,
        "violations": [],
        "file": str(slo),
    }
    assert set(summary["efforts"]) == {"low", "medium", "high"}
    for effort, figures in summary["efforts"].items():
        assert figures["requests"] > 0 and figures["failures"] == 0, (effort, figures)
    low = summary["efforts"]["low"]  # the most frequent: its figures exist whatever nano writes
    assert 0 < low["ttft_p50_s"] <= low["ttft_p95_s"] and low["answer_ttft_p95_s"] >= low["ttft_p50_s"]
    assert low["tpot_p50_s"] > 0 and low["reasoning_tokens"] > 0 and low["answer_tokens"] > 0
    rows = (report / "requests.csv").read_text().splitlines()
    assert len(rows) - 1 == sum(f["requests"] for f in summary["efforts"].values())
    assert "chat high" in (report / "locust_stats.csv").read_text()
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # CDFs, throughput/goodput, Prometheus series
    assert (report / "locust.html").stat().st_size > 10_000


def test_an_impossible_slo_fails_the_command(stack, tmp_path):
    slo = tmp_path / "impossible.yaml"
    slo.write_text(
        "efforts:\n  low: {ttft_p50_s: 0.000001}\n  medium: {ttft_p50_s: 0.000001}\n  high: {ttft_p50_s: 0.000001}\n"
    )
    report = tmp_path / "report"
    answer = _loadtest(
        "--host", stack.url, "--profile", "interactive", "--users", "2", "--duration", "30s",
        "--max-requests", "4", "--slo", str(slo), "--report", str(report), "--api-key", stack.api_key,
    )  # fmt: skip
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "SLO missed" in answer.stderr and "ttft_p50_s" in answer.stderr
    summary = json.loads((report / "summary.json").read_text())
    assert summary["slo"]["passed"] is False and summary["slo"]["violations"]
    assert summary["totals"]["requests"] >= 4 and summary["duration_s"] < 30
