"""The Prometheus recording and alerting rules, generated from the SLOs below (the one place they live).

``python -m gptoss_vllm.observability.rules`` rewrites the committed ``prometheus/rules.yaml``; a test checks that
the committed file is this module's output, and ``promtool test rules prometheus/rules_test.yaml`` tests it.

Recording rules are named ``gptoss:<metric>:<operations>``; the labels each keeps are said in its group below
(every ratio sums ``instance``/``replica``/``job`` away first, so several ingress replicas count as one service).

SLOs, per effort: availability (5xx among all requests of the effort) and time to first token of streamed
requests (the share under the effort's bound, read exactly from the histogram bucket with that bound). Alerts
are the multi-window, multi-burn-rate ones of the Google SRE workbook ("Alerting on SLOs", approach 6).
A window with no traffic has no ratio at all (the denominator is filtered with ``> 0``), so it never fires.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from gptoss_vllm.observability.metrics import LATENCY_BUCKETS_S
from gptoss_vllm.refusal_reasons import SERVICE_REASONS


@dataclass(frozen=True)
class EffortSLO:
    """The objectives of one reasoning effort."""

    availability: float  # share of requests not answered with a 5xx
    ttft_bound_s: float  # a streamed request's first token is due within this (a histogram bucket bound)
    ttft_target: float  # share of streamed requests whose first token came within the bound


SLOS: dict[str, EffortSLO] = {
    "low": EffortSLO(availability=0.999, ttft_bound_s=1.0, ttft_target=0.99),
    "medium": EffortSLO(availability=0.999, ttft_bound_s=2.5, ttft_target=0.99),
    "high": EffortSLO(availability=0.999, ttft_bound_s=5.0, ttft_target=0.99),
}
# The windows the SLIs are recorded over: every short and long window of the burn-rate alerts.
SLI_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


@dataclass(frozen=True)
class BurnRateWindow:
    """Fire when the error ratio over both windows exceeds ``factor`` times the error budget."""

    severity: str
    long: str
    short: str
    factor: float


# SRE workbook, table 5-8: 2% of a 30-day budget in 1 h and 5% in 6 h page; 10% in 3 d (and 1 d) tickets.
BURN_RATE_WINDOWS = (
    BurnRateWindow("page", "1h", "5m", 14.4),
    BurnRateWindow("page", "6h", "30m", 6.0),
    BurnRateWindow("ticket", "1d", "2h", 3.0),
    BurnRateWindow("ticket", "3d", "6h", 1.0),
)
BURN_ALERT_FOR = {"page": "2m", "ticket": "15m"}

# Capacity alerts.
NO_REPLICA_FOR = "5m"
QUEUE_SATURATION_RATIO = 0.8  # queue depth / queue limit
QUEUE_SATURATION_FOR = "10m"
# Rejections per second (5 m rate) per reason and pool, sustained for REJECTIONS_FOR. The service's own refusals
# (no room, no replica, a replica died) matter at a low rate; the client-caused ones only when they are heavy.
SERVICE_REJECTION_REASONS = tuple(reason.value for reason in SERVICE_REASONS)
SERVICE_REJECTIONS_PER_S = 0.05
CLIENT_REJECTIONS_PER_S = 1.0
REJECTIONS_FOR = "15m"
TARGET_DOWN_FOR = "5m"
KEYS_RELOAD_WINDOW = "10m"  # a failed reload is retried every 10 s while requests come
STORE_ERRORS_WINDOW = "5m"
STORE_ERRORS_FOR = "5m"  # the size gauge reads the store every 10 s: a store down fails continuously
SCRAPE_COMPONENTS = "ingress|pool"

RULES_PATH = Path(__file__).resolve().parent / "prometheus" / "rules.yaml"
# Repository-relative; a deployment that wants absolute links passes --runbook-base when generating its copy.
RUNBOOK_BASE = "docs/runbook.md"

SLI_LABELS = "namespace, effort"


def _num(value: float) -> str:
    """A threshold as PromQL reads it, without float noise (14.4 * 0.001 -> 0.0144)."""
    return f"{value:.6g}"


def le_matcher(bound_s: float) -> str:
    """A matcher for the histogram bucket with upper bound ``bound_s``.

    prometheus-client writes ``le="1.0"``; a protobuf scrape (Prometheus 2) stores ``le="1"``: match both.
    """
    if bound_s not in LATENCY_BUCKETS_S:
        raise ValueError(f"{bound_s} s is not a bucket bound of the latency histograms: {LATENCY_BUCKETS_S}")
    if float(bound_s).is_integer():
        return f'le=~"{int(bound_s)}(\\\\.0)?"'
    return f'le="{bound_s!r}"'


def effort_regex() -> str:
    return "|".join(SLOS)


def ttft_good_rate(window: str, by: str, extra_matchers: str = "") -> str:
    """Rate of streamed requests whose first token came within their effort's bound, summed ``by``."""
    terms = [
        f'rate(gptoss_time_to_first_token_seconds_bucket{{{extra_matchers}effort="{effort}", '
        f"{le_matcher(slo.ttft_bound_s)}}}[{window}])"
        for effort, slo in SLOS.items()
    ]
    return f"sum by ({by}) (\n  " + "\n  or\n  ".join(terms) + "\n)"


class _Block(str):
    """A multi-line PromQL expression, written as a YAML literal block."""


def _block_representer(dumper: yaml.SafeDumper, data: _Block) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Block, _block_representer)


def _expr(text: str) -> str:
    text = text.strip()
    return _Block(text + "\n") if "\n" in text else text


def _record(name: str, expr: str) -> dict:
    return {"record": name, "expr": _expr(expr)}


def _alert(
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    runbook_base: str,
    labels: dict | None = None,
) -> dict:
    rule: dict = {"alert": name, "expr": _expr(expr)}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": f"{runbook_base}#{name.lower()}",
    }
    return rule


def availability_sli_group() -> dict:
    """Per (namespace, effort): request rate, 5xx rate and 5xx ratio over every SLI window."""
    rules = []
    for w in SLI_WINDOWS:
        rules += [
            _record(f"gptoss:requests:rate{w}", f"sum by ({SLI_LABELS}) (rate(gptoss_requests_total[{w}]))"),
            # Zero rather than nothing when there is traffic but no 5xx series (yet).
            _record(
                f"gptoss:request_errors:rate{w}",
                f'sum by ({SLI_LABELS}) (rate(gptoss_requests_total{{status=~"5.."}}[{w}]))\n'
                f"or\n0 * gptoss:requests:rate{w}",
            ),
            _record(
                f"gptoss:request_errors:ratio_rate{w}",
                f"gptoss:request_errors:rate{w}\n/\n(gptoss:requests:rate{w} > 0)",
            ),
        ]
    return {"name": "gptoss-sli-availability", "rules": rules}


def ttft_sli_group() -> dict:
    """Per (namespace, effort): streamed requests, those within the effort's TTFT bound, and the miss ratio."""
    rules = []
    for w in SLI_WINDOWS:
        rules += [
            _record(
                f"gptoss:ttft_requests:rate{w}",
                f"sum by ({SLI_LABELS}) (\n  rate(gptoss_time_to_first_token_seconds_count"
                f'{{effort=~"{effort_regex()}"}}[{w}])\n)',
            ),
            _record(f"gptoss:ttft_good:rate{w}", ttft_good_rate(w, SLI_LABELS)),
            _record(
                f"gptoss:ttft_slo_miss:ratio_rate{w}",
                f"(gptoss:ttft_requests:rate{w} - gptoss:ttft_good:rate{w})\n/\n(gptoss:ttft_requests:rate{w} > 0)",
            ),
        ]
    return {"name": "gptoss-sli-ttft", "rules": rules}


def traffic_group() -> dict:
    """5-minute rates for dashboards and capacity planning, with ``instance``/``replica`` summed away."""
    return {
        "name": "gptoss-traffic",
        "rules": [
            _record(
                "gptoss:requests_by_status:rate5m",
                "sum by (namespace, endpoint, effort, pool, status) (rate(gptoss_requests_total[5m]))",
            ),
            _record(
                "gptoss:output_tokens:rate5m",
                "sum by (namespace, effort, pool, kind) (rate(gptoss_output_tokens_total[5m]))",
            ),
            # Streamed requests whose first token went out (the TTFT histogram's count), the goodput's whole.
            _record(
                "gptoss:streams:rate5m",
                "sum by (namespace, effort, pool) (rate(gptoss_time_to_first_token_seconds_count[5m]))",
            ),
            _record(
                "gptoss:prompt_tokens:rate5m",
                "sum by (namespace, effort, pool) (rate(gptoss_prompt_tokens_total[5m]))",
            ),
            # Goodput: streamed requests whose first token met their effort's bound (a stream is observed in
            # the TTFT histogram once its first token is out, so it was answered).
            _record("gptoss:goodput:rate5m", ttft_good_rate("5m", "namespace, effort, pool")),
            _record(
                "gptoss:rejections:rate5m",
                "sum by (namespace, reason, pool) (rate(gptoss_rejections_total[5m]))",
            ),
            _record(
                "gptoss:spillovers:rate5m",
                "sum by (namespace, from_pool, to_pool) (rate(gptoss_spillovers_total[5m]))",
            ),
            _record(
                "gptoss:budget_clamps:rate5m",
                "sum by (namespace, effort) (rate(gptoss_budget_clamps_total[5m]))",
            ),
        ],
    }


def capacity_group() -> dict:
    """Per (namespace, pool), from the ingress replicas' gauges."""
    return {
        "name": "gptoss-capacity",
        "rules": [
            # Every ingress replica reports the pool's replica count: take the most optimistic.
            _record(
                "gptoss:pool_running_replicas:max",
                "max by (namespace, pool) (gptoss_pool_running_replicas)",
            ),
            _record("gptoss:pool_min_replicas:max", "max by (namespace, pool) (gptoss_pool_min_replicas)"),
            _record("gptoss:in_flight_requests:sum", "sum by (namespace, pool) (gptoss_in_flight_requests)"),
            # The queue bound holds per ingress replica: its fullest queue, a pool without a bound is left out.
            _record(
                "gptoss:queue_depth:ratio_limit",
                "max by (namespace, pool) (gptoss_queue_depth / (gptoss_queue_limit > 0))",
            ),
        ],
    }


def _burn_expr(ratio_record: str, effort: str, budget: float, windows: list[BurnRateWindow]) -> str:
    clauses = []
    for win in windows:
        threshold = _num(win.factor * budget)
        clauses.append(
            f'(\n  {ratio_record}{win.long}{{effort="{effort}"}} > {threshold}\n  and\n'
            f'  {ratio_record}{win.short}{{effort="{effort}"}} > {threshold}\n)'
        )
    return "\nor\n".join(clauses)


def _windows(severity: str) -> list[BurnRateWindow]:
    return [w for w in BURN_RATE_WINDOWS if w.severity == severity]


def _window_text(severity: str) -> str:
    return " or ".join(f"{w.factor:g}x over {w.long} and {w.short}" for w in _windows(severity))


@dataclass(frozen=True)
class BurnSLI:
    """One SLI the multi-window burn-rate alerts watch: the ratio it records, its objective, and the alert's text."""

    alert: str  # the alert's name, before Fast/Slow
    ratio_record: str  # recorded over every SLI window: ``<ratio_record><window>``
    slo: str  # the ``slo`` label
    objective: Callable[[EffortSLO], float]  # the share that must be good
    summary: str  # with {effort} and {speed}
    description: Callable[[EffortSLO, str], str]  # the SLO and the burn windows' text


BURN_SLIS = (
    BurnSLI(
        "GptossErrorBudgetBurn",
        "gptoss:request_errors:ratio_rate",
        "availability",
        lambda slo: slo.availability,
        "gpt-oss {effort}-effort requests are burning the availability error budget ({speed} burn)",
        lambda slo, burn: (
            "{{ $value | humanizePercentage }} of {{ $labels.effort }}-effort requests in namespace "
            f"{{{{ $labels.namespace }}}} failed with a 5xx (SLO {slo.availability:.1%} available, burn {burn})."
        ),
    ),
    BurnSLI(
        "GptossTTFTBudgetBurn",
        "gptoss:ttft_slo_miss:ratio_rate",
        "ttft",
        lambda slo: slo.ttft_target,
        "gpt-oss {effort}-effort streams are burning the time-to-first-token error budget ({speed} burn)",
        lambda slo, burn: (
            "{{ $value | humanizePercentage }} of {{ $labels.effort }}-effort streams in namespace "
            f"{{{{ $labels.namespace }}}} waited more than {slo.ttft_bound_s:g} s for their first token (SLO "
            f"{slo.ttft_target:.0%} within {slo.ttft_bound_s:g} s, burn {burn})."
        ),
    ),
)


def slo_alert_group(runbook_base: str) -> dict:
    """A fast (page) and a slow (ticket) burn-rate alert per SLI of ``BURN_SLIS`` and effort."""
    rules = []
    speeds = {"page": "Fast", "ticket": "Slow"}
    for sli in BURN_SLIS:
        for effort, slo in SLOS.items():
            budget = 1 - sli.objective(slo)
            for severity, speed in speeds.items():
                rules.append(
                    _alert(
                        f"{sli.alert}{speed}",
                        _burn_expr(sli.ratio_record, effort, budget, _windows(severity)),
                        BURN_ALERT_FOR[severity],
                        severity,
                        summary=sli.summary.format(effort=effort, speed=speed.lower()),
                        description=sli.description(slo, _window_text(severity)),
                        runbook_base=runbook_base,
                        labels={"effort": effort, "slo": sli.slo},
                    )
                )
    return {"name": "gptoss-slo-alerts", "rules": rules}


def capacity_alert_group(runbook_base: str) -> dict:
    service = "|".join(SERVICE_REJECTION_REASONS)
    return {
        "name": "gptoss-capacity-alerts",
        "rules": [
            _alert(
                "GptossPoolNoReadyReplica",
                # A pool scaled to zero (min_replicas 0) is idle by design: it pages only while requests wait
                # for a replica that does not come.
                "gptoss:pool_running_replicas:max == 0 and (gptoss:pool_min_replicas:max > 0 "
                "or gptoss:in_flight_requests:sum > 0)",
                NO_REPLICA_FOR,
                "page",
                summary="gpt-oss pool {{ $labels.pool }} has no running replica",
                description=(
                    "Pool {{ $labels.pool }} in namespace {{ $labels.namespace }} has had no replica in state "
                    f"RUNNING for {NO_REPLICA_FOR} while it should have one (min_replicas above 0, or requests "
                    "waiting for a cold start): its requests spill over to another pool or are refused "
                    "(no_replica)."
                ),
                runbook_base=runbook_base,
            ),
            _alert(
                "GptossPoolQueueSaturated",
                f"gptoss:queue_depth:ratio_limit > {_num(QUEUE_SATURATION_RATIO)}",
                QUEUE_SATURATION_FOR,
                "ticket",
                summary="gpt-oss pool {{ $labels.pool }}'s queue is nearly full",
                description=(
                    "Pool {{ $labels.pool }} in namespace {{ $labels.namespace }} has had its queue "
                    "{{ $value | humanizePercentage }} full for "
                    f"{QUEUE_SATURATION_FOR} (alert above {QUEUE_SATURATION_RATIO:.0%}): new requests are about "
                    "to be refused with queue_full."
                ),
                runbook_base=runbook_base,
            ),
            _alert(
                "GptossSustainedRejections",
                f'gptoss:rejections:rate5m{{reason=~"{service}"}} > {_num(SERVICE_REJECTIONS_PER_S)}\n'
                f'or\ngptoss:rejections:rate5m{{reason!~"{service}"}} > {_num(CLIENT_REJECTIONS_PER_S)}',
                REJECTIONS_FOR,
                "ticket",
                summary="gpt-oss refuses requests of pool {{ $labels.pool }} ({{ $labels.reason }})",
                description=(
                    "The ingress in namespace {{ $labels.namespace }} has refused "
                    '{{ printf "%.2f" $value }} requests/s for pool {{ $labels.pool }} with reason '
                    f"{{{{ $labels.reason }}}} for {REJECTIONS_FOR} (alert above {SERVICE_REJECTIONS_PER_S:g}/s "
                    f"for {', '.join(SERVICE_REJECTION_REASONS)}, {CLIENT_REJECTIONS_PER_S:g}/s otherwise)."
                ),
                runbook_base=runbook_base,
            ),
            _alert(
                "GptossApiKeysNotReloaded",
                f"sum by (namespace) (increase(gptoss_api_keys_reload_failures_total[{KEYS_RELOAD_WINDOW}])) > 0",
                "",
                "ticket",
                summary="gpt-oss cannot reload its API keys file",
                description=(
                    "An ingress in namespace {{ $labels.namespace }} failed to reload its API keys file in the "
                    f"last {KEYS_RELOAD_WINDOW}: it keeps serving with the keys it had, so a rotation (a new or "
                    "revoked key) has not taken effect."
                ),
                runbook_base=runbook_base,
            ),
            _alert(
                "GptossResponseStoreFailing",
                f"sum by (namespace, backend, operation) (rate(gptoss_response_store_errors_total[{STORE_ERRORS_WINDOW}])) > 0",
                STORE_ERRORS_FOR,
                "page",
                summary="gpt-oss's response store ({{ $labels.backend }}) is failing",
                description=(
                    "Calls to the {{ $labels.backend }} response store failed ({{ $labels.operation }}, "
                    '{{ printf "%.2f" $value }}/s) in namespace {{ $labels.namespace }} for '
                    f"{STORE_ERRORS_FOR}: Responses requests that store or read a conversation are answered "
                    "503 until it recovers."
                ),
                runbook_base=runbook_base,
            ),
            _alert(
                "GptossScrapeTargetDown",
                f'up{{component=~"{SCRAPE_COMPONENTS}"}} == 0',
                TARGET_DOWN_FOR,
                "ticket",
                summary="Prometheus cannot scrape gpt-oss {{ $labels.component }} {{ $labels.replica }}",
                description=(
                    "The {{ $labels.component }} target {{ $labels.instance }} (replica {{ $labels.replica }}"
                    "{{ if $labels.pool }}, pool {{ $labels.pool }}{{ end }}) in namespace "
                    f"{{{{ $labels.namespace }}}} has failed its scrapes for {TARGET_DOWN_FOR}."
                ),
                runbook_base=runbook_base,
            ),
        ],
    }


def rule_groups(runbook_base: str = RUNBOOK_BASE) -> dict:
    return {
        "groups": [
            availability_sli_group(),
            ttft_sli_group(),
            traffic_group(),
            capacity_group(),
            slo_alert_group(runbook_base),
            capacity_alert_group(runbook_base),
        ]
    }


HEADER = "# Generated by `python -m gptoss_vllm.observability.rules`: edit rules.py, not this file.\n"


def render(runbook_base: str = RUNBOOK_BASE) -> str:
    body = yaml.dump(
        rule_groups(runbook_base), Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True
    )
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=RULES_PATH, help="where to write (default: %(default)s)"
    )
    parser.add_argument(
        "--runbook-base",
        default=RUNBOOK_BASE,
        help="runbook_url prefix, before #<alert> (default: %(default)s)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file is not up to date")
    args = parser.parse_args(argv)
    text = render(args.runbook_base)
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is out of date: run python -m gptoss_vllm.observability.rules",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
