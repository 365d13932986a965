"""The Grafana dashboards, built with grafana-foundation-sdk: ``python -m dashboards.build`` (or
``python dashboards/build.py``) rewrites the committed ``dashboards/*.json``; a test checks they are its output.

Every dashboard has a Prometheus data source variable and the ``namespace`` and ``pool`` query variables (multi,
with All as ``.*``); every query filters ``namespace=~"$namespace"`` and, where the series has one, the pool.
The SLO numbers and alert thresholds come from ``gptoss_vllm.observability.rules`` (the one place they live), and a
query reads a recording rule of it wherever one records the series (rates over 5 minutes, ``instance`` and
``replica`` summed away, as kubernetes-mixin's dashboards read its rules); histograms' quantiles, gauges per
replica and vLLM's own series are read raw.
``dashboards.queries.panel_queries()`` lists every (dashboard, panel, expr) of the committed JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models

from gptoss_vllm.observability.rules import (
    QUEUE_SATURATION_FOR,
    QUEUE_SATURATION_RATIO,
    SCRAPE_COMPONENTS,
    SLOS,
)

DASHBOARDS_DIR = Path(__file__).resolve().parent
TAGS = ["gptoss-vllm"]
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
NS = 'namespace=~"$namespace"'
POOL = 'pool=~"$pool"'
NS_POOL = f"{NS}, {POOL}"


# --- building blocks -----------------------------------------------------------------------------------------


def target(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def panel(
    title: str,
    description: str,
    unit: str,
    targets: list[prometheus.Dataquery],
    threshold: float | None = None,
    width: int = 12,
    minimum: float | None = 0,
) -> timeseries.Panel:
    built = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(width)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.TABLE)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common_models.TooltipDisplayMode.MULTI)
            .sort(common_models.SortOrder.DESCENDING)
        )
    )
    if minimum is not None:
        built = built.min(minimum)
    for ref_id, query in zip("ABCDEFGH", targets, strict=False):
        built = built.with_target(query.ref_id(ref_id))
    if threshold is not None:  # a dashed line at the objective
        built = built.thresholds(
            dashboard_builders.ThresholdsConfig()
            .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
            .steps(
                [
                    dashboard_models.Threshold(value=None, color="green"),
                    dashboard_models.Threshold(value=threshold, color="red"),
                ]
            )
        ).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common_models.GraphTresholdsStyleMode.DASHED)
        )
    return built


def quantile(q: float, metric: str, by: str, matchers: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{matchers}}}[{RATE}])))"


def quantile_targets(metric: str, by: str, matchers: str, legend: str) -> list[prometheus.Dataquery]:
    return [
        target(quantile(q, metric, by, matchers), f"{legend} p{round(q * 100)}") for q in (0.5, 0.9, 0.99)
    ]


def new_dashboard(uid: str, title: str, description: str) -> dashboard_builders.Dashboard:
    return (
        dashboard_builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard_builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            query_variable(
                "namespace", "Namespace", f'label_values(up{{component=~"{SCRAPE_COMPONENTS}"}}, namespace)'
            )
        )
        .with_variable(
            query_variable("pool", "Pool", f"label_values(gptoss_pool_running_replicas{{{NS}}}, pool)")
        )
    )


def query_variable(name: str, label: str, query: str) -> dashboard_builders.QueryVariable:
    return (
        dashboard_builders.QueryVariable(name)
        .label(label)
        .query(query)
        .datasource(DATASOURCE)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dashboard_models.VariableOption(selected=True, text="All", value="$__all"))
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
    )


# --- the dashboards ------------------------------------------------------------------------------------------


def slo_by_effort() -> dashboard_builders.Dashboard:
    ttft_bounds = ", ".join(f"{effort} {slo.ttft_bound_s:g} s" for effort, slo in SLOS.items())
    availability = min(slo.availability for slo in SLOS.values())
    error_budget = round(1 - availability, 9)
    ttft_target = min(slo.ttft_target for slo in SLOS.values())
    streams = f"sum by (effort) (gptoss:streams:rate5m{{{NS_POOL}}})"
    good = f"sum by (effort) (gptoss:goodput:rate5m{{{NS_POOL}}})"
    requests = f"sum by (effort) (gptoss:requests_by_status:rate5m{{{NS_POOL}}})"
    errors = f'sum by (effort) (gptoss:requests_by_status:rate5m{{{NS_POOL}, status=~"5.."}})'
    return (
        new_dashboard(
            "gptoss-slo-by-effort",
            "gpt-oss / SLO by effort",
            f"Per reasoning effort: availability (SLO {availability:.1%}), time to first token (SLO "
            f"{ttft_target:.0%} within {ttft_bounds}), answer latency, goodput.",
        )
        .with_row(dashboard_builders.Row("Objectives"))
        .with_panel(
            panel(
                "Error ratio (5xx) by effort",
                f"Share of requests answered with a 5xx. The SLO allows {error_budget:.1%}.",
                "percentunit",
                # `or ... * 0`: no 5xx at all is a ratio of 0, not an empty panel.
                [target(f"({errors}\nor\n{requests} * 0)\n/\n{requests}", "{{effort}}")],
                threshold=error_budget,
            )
        )
        .with_panel(
            panel(
                "Streams within the TTFT objective by effort",
                f"Share of streamed requests whose first token came within their effort's bound ({ttft_bounds}); "
                f"the SLO is {ttft_target:.0%}.",
                "percentunit",
                [target(f"{good}\n/\n{streams}", "{{effort}}")],
                threshold=ttft_target,
                minimum=None,
            )
        )
        .with_panel(
            panel(
                "Goodput by effort",
                "Streamed requests per second whose first token met their effort's bound, next to all streams.",
                "reqps",
                [target(good, "{{effort}} good"), target(streams, "{{effort}} all streams")],
            )
        )
        .with_panel(
            panel(
                "Requests by effort and status",
                "Requests answered by the ingress, per second.",
                "reqps",
                [
                    target(
                        f"sum by (effort, status) (gptoss:requests_by_status:rate5m{{{NS_POOL}}})",
                        "{{effort}} {{status}}",
                    )
                ],
            )
        )
        .with_row(dashboard_builders.Row("Latency"))
        .with_panel(
            panel(
                "Time to first token by effort",
                f"Streams: arrival to the first generated token (reasoning or answer). Bounds: {ttft_bounds}.",
                "s",
                quantile_targets("gptoss_time_to_first_token_seconds", "effort", NS_POOL, "{{effort}}"),
            )
        )
        .with_panel(
            panel(
                "Time to first answer token by effort",
                "Streams: arrival to the first token of the final answer, after the analysis channel.",
                "s",
                quantile_targets(
                    "gptoss_time_to_first_answer_token_seconds", "effort", NS_POOL, "{{effort}}"
                ),
            )
        )
        .with_panel(
            panel(
                "Inter-token latency by effort",
                "Streams: time between two consecutive token-carrying events.",
                "s",
                quantile_targets("gptoss_inter_token_latency_seconds", "effort", NS_POOL, "{{effort}}"),
            )
        )
        .with_panel(
            panel(
                "Request duration by effort",
                "All requests: arrival to the last byte of the answer.",
                "s",
                quantile_targets("gptoss_request_duration_seconds", "effort", NS_POOL, "{{effort}}"),
            )
        )
        .with_row(dashboard_builders.Row("Tokens"))
        .with_panel(
            panel(
                "Output tokens by effort and kind",
                "Generated tokens per second, reasoning (analysis channel) and answer.",
                "short",
                [
                    target(
                        f"sum by (effort, kind) (gptoss:output_tokens:rate5m{{{NS_POOL}}})",
                        "{{effort}} {{kind}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Prompt tokens and budget clamps by effort",
                "Prompt tokens per second, and requests per second whose output limit was clamped to the "
                "effort's budget (not per pool).",
                "short",
                [
                    target(
                        f"sum by (effort) (gptoss:prompt_tokens:rate5m{{{NS_POOL}}})",
                        "{{effort}} prompt tokens",
                    ),
                    target(
                        f"sum by (effort) (gptoss:budget_clamps:rate5m{{{NS}}})",
                        "{{effort}} clamps",
                    ),
                ],
            )
        )
    )


def pools_and_capacity() -> dashboard_builders.Dashboard:
    return (
        new_dashboard(
            "gptoss-pools-and-capacity",
            "gpt-oss / Pools and capacity",
            "Per pool: replicas, queue against its bound, in-flight requests, KV cache, spillovers, rejections.",
        )
        .with_row(dashboard_builders.Row("Replicas and queues"))
        .with_panel(
            panel(
                "Running replicas by pool",
                "Replicas in state RUNNING, as the ingress sees them, and the pool's floor (GptossPoolNoReadyReplica "
                "fires at 0 with a floor above 0, or with requests waiting), and starts from zero in the last hour.",
                "short",
                [
                    target(f"max by (pool) (gptoss:pool_running_replicas:max{{{NS_POOL}}})", "{{pool}}"),
                    target(f"max by (pool) (gptoss:pool_min_replicas:max{{{NS_POOL}}})", "{{pool}} floor"),
                    target(
                        f"max by (pool) (increase(gptoss_pool_cold_starts_total{{{NS_POOL}}}[1h]))",
                        "{{pool}} starts from zero (1 h)",
                    ),
                ],
            )
        )
        .with_panel(
            panel(
                "Cold starts: requests held for a replica",
                "Pools scaled to zero (min_replicas 0): how long the requests that arrived with no replica waited "
                "for one, p95 by outcome (timed_out: answered 503 after cold_start_timeout_s).",
                "s",
                [
                    target(
                        "histogram_quantile(0.95, sum by (pool, outcome, le) "
                        f"(rate(gptoss_cold_start_hold_seconds_bucket{{{NS_POOL}}}[{RATE}])))",
                        "{{pool}} p95 hold ({{outcome}})",
                    ),
                ],
            )
        )
        .with_panel(
            panel(
                "Queue depth vs limit by pool",
                "Requests beyond the pool's running capacity (every ingress replica counts the others' too: "
                "max), and the bound.",
                "short",
                [
                    target(f"max by (pool) (gptoss_queue_depth{{{NS_POOL}}})", "{{pool}} depth"),
                    target(f"max by (pool) (gptoss_queue_limit{{{NS_POOL}}})", "{{pool}} limit"),
                ],
            )
        )
        .with_panel(
            panel(
                "Queue saturation by pool",
                f"Queue depth over its bound (GptossPoolQueueSaturated fires above {QUEUE_SATURATION_RATIO:.0%} for "
                f"{QUEUE_SATURATION_FOR}).",
                "percentunit",
                [target(f"max by (pool) (gptoss:queue_depth:ratio_limit{{{NS_POOL}}})", "{{pool}}")],
                threshold=QUEUE_SATURATION_RATIO,
            )
        )
        .with_panel(
            panel(
                "In-flight requests by pool",
                "Requests the ingress replicas have sent to the pool and not finished.",
                "short",
                [target(f"sum by (pool) (gptoss:in_flight_requests:sum{{{NS_POOL}}})", "{{pool}}")],
            )
        )
        .with_panel(
            panel(
                "Ingress replicas: peers heard and lost",
                "With several ingress replicas, each bounds with the others' counts: the peers each hears now, and "
                "those it stopped hearing of in the last hour. Outside a rollout, a loss means bounds held per "
                "replica for a while (an exchange stalled past the peers' TTL).",
                "short",
                [
                    target(f"min by (replica) (gptoss_ingress_peers{{{NS}}})", "{{replica}} peers heard"),
                    target(
                        f"sum by (replica) (increase(gptoss_ingress_peers_lost_total{{{NS}}}[1h]))",
                        "{{replica}} peers lost (1 h)",
                    ),
                ],
            )
        )
        .with_row(dashboard_builders.Row("Engines"))
        .with_panel(
            panel(
                "KV-cache usage by replica",
                "vLLM's KV-cache usage of each pool replica (1 = full: requests wait or are preempted).",
                "percentunit",
                [
                    target(
                        f"max by (pool, replica) (vllm:kv_cache_usage_perc{{{NS_POOL}}})",
                        "{{pool}} {{replica}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Engine requests running and waiting by pool",
                "Requests inside the vLLM engines of the pool: running (batched) and waiting (scheduler queue).",
                "short",
                [
                    target(f"sum by (pool) (vllm:num_requests_running{{{NS_POOL}}})", "{{pool}} running"),
                    target(f"sum by (pool) (vllm:num_requests_waiting{{{NS_POOL}}})", "{{pool}} waiting"),
                ],
            )
        )
        .with_row(dashboard_builders.Row("Overflow"))
        .with_panel(
            panel(
                "Spillovers",
                "Requests per second sent to another pool than their effort's (either pool selected).",
                "reqps",
                [
                    target(
                        f'sum by (from_pool, to_pool) (\n  gptoss:spillovers:rate5m{{{NS}, from_pool=~"$pool"}}\n'
                        f'  or\n  gptoss:spillovers:rate5m{{{NS}, to_pool=~"$pool"}}\n)',
                        "{{from_pool}} -> {{to_pool}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Rejections by reason and pool",
                "Requests per second refused by the ingress (pool none: refused before a pool was chosen).",
                "reqps",
                [
                    target(
                        f"sum by (reason, pool) (gptoss:rejections:rate5m{{{NS_POOL}}})",
                        "{{reason}} {{pool}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Requests by pool and status",
                "Requests answered by the ingress per second, by the pool they were sent to.",
                "reqps",
                [
                    target(
                        f"sum by (pool, status) (gptoss:requests_by_status:rate5m{{{NS_POOL}}})",
                        "{{pool}} {{status}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Scrape targets up",
                "Ingress and pool replicas Prometheus scrapes successfully (GptossScrapeTargetDown).",
                "short",
                [
                    target(
                        f'sum by (component, pool) (up{{{NS_POOL}, component=~"{SCRAPE_COMPONENTS}"}})',
                        "{{component}} {{pool}} up",
                    ),
                    target(
                        # Targets minus the ones up: 0 when all are, not an empty series.
                        f'count by (component, pool) (up{{{NS_POOL}, component=~"{SCRAPE_COMPONENTS}"}})\n- '
                        f'sum by (component, pool) (up{{{NS_POOL}, component=~"{SCRAPE_COMPONENTS}"}})',
                        "{{component}} {{pool}} down",
                    ),
                ],
            )
        )
        .with_row(dashboard_builders.Row("Conversation store"))
        .with_panel(
            panel(
                "Stored responses",
                "Responses in the conversation store (every ingress replica reports the shared store: max).",
                "short",
                [target(f"max by (backend) (gptoss_response_store_responses{{{NS}}})", "{{backend}}")],
            )
        )
        .with_panel(
            panel(
                "Store lookups, evictions and errors",
                "Per second: stored responses asked for (hit, miss), dropped by retention (ttl, size), and "
                "failed store calls (answered 503; GptossResponseStoreFailing).",
                "ops",
                [
                    target(
                        f"sum by (result) (rate(gptoss_response_store_lookups_total{{{NS}}}[{RATE}]))",
                        "lookup {{result}}",
                    ),
                    target(
                        f"sum by (reason) (rate(gptoss_response_store_evictions_total{{{NS}}}[{RATE}]))",
                        "evicted ({{reason}})",
                    ),
                    target(
                        f"sum by (operation) (rate(gptoss_response_store_errors_total{{{NS}}}[{RATE}]))",
                        "error {{operation}}",
                    ),
                ],
            )
        )
    )


def engine() -> dashboard_builders.Dashboard:
    def per_pool(metric: str) -> str:
        return f"sum by (pool) (rate({metric}{{{NS_POOL}}}[{RATE}]))"

    return (
        new_dashboard(
            "gptoss-engine",
            "gpt-oss / vLLM engine",
            "vLLM's own metrics from every pool replica: scheduler, KV cache, latency, throughput, prefix cache.",
        )
        .with_row(dashboard_builders.Row("Scheduler and KV cache"))
        .with_panel(
            panel(
                "Requests running by replica",
                "vllm:num_requests_running: requests in the engine's running batch.",
                "short",
                [
                    target(
                        f"sum by (pool, replica) (vllm:num_requests_running{{{NS_POOL}}})",
                        "{{pool}} {{replica}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Requests waiting by replica",
                "vllm:num_requests_waiting: requests in the engine's scheduler queue.",
                "short",
                [
                    target(
                        f"sum by (pool, replica) (vllm:num_requests_waiting{{{NS_POOL}}})",
                        "{{pool}} {{replica}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "KV-cache usage by replica",
                "vllm:kv_cache_usage_perc (1 = full).",
                "percentunit",
                [
                    target(
                        f"max by (pool, replica) (vllm:kv_cache_usage_perc{{{NS_POOL}}})",
                        "{{pool}} {{replica}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Preemptions by pool",
                "Requests preempted per second (KV cache exhausted: their blocks are freed and recomputed).",
                "short",
                [target(per_pool("vllm:num_preemptions_total"), "{{pool}}")],
            )
        )
        .with_row(dashboard_builders.Row("Latency (engine side)"))
        .with_panel(
            panel(
                "Time to first token (vLLM) by pool",
                "Engine-side TTFT: without the ingress and routing time.",
                "s",
                quantile_targets("vllm:time_to_first_token_seconds", "pool", NS_POOL, "{{pool}}"),
            )
        )
        .with_panel(
            panel(
                "Inter-token latency (vLLM) by pool",
                "vllm:inter_token_latency_seconds.",
                "s",
                quantile_targets("vllm:inter_token_latency_seconds", "pool", NS_POOL, "{{pool}}"),
            )
        )
        .with_panel(
            panel(
                "End-to-end request latency (vLLM) by pool",
                "vllm:e2e_request_latency_seconds.",
                "s",
                quantile_targets("vllm:e2e_request_latency_seconds", "pool", NS_POOL, "{{pool}}"),
            )
        )
        .with_panel(
            panel(
                "Queue time (vLLM) by pool",
                "vllm:request_queue_time_seconds: time in the engine's waiting queue.",
                "s",
                quantile_targets("vllm:request_queue_time_seconds", "pool", NS_POOL, "{{pool}}"),
            )
        )
        .with_row(dashboard_builders.Row("Throughput and prefix cache"))
        .with_panel(
            panel(
                "Token throughput by pool",
                "Prompt tokens prefilled and tokens generated per second.",
                "short",
                [
                    target(per_pool("vllm:prompt_tokens_total"), "{{pool}} prompt"),
                    target(per_pool("vllm:generation_tokens_total"), "{{pool}} generation"),
                ],
            )
        )
        .with_panel(
            panel(
                "Prefix-cache hit rate by pool",
                "Share of queried prompt tokens found in the prefix cache.",
                "percentunit",
                [
                    target(
                        f"{per_pool('vllm:prefix_cache_hits_total')}\n/\n{per_pool('vllm:prefix_cache_queries_total')}",
                        "{{pool}}",
                    )
                ],
            )
        )
        .with_panel(
            panel(
                "Finished requests by reason",
                "vllm:request_success_total by finished_reason (stop, length, abort, ...).",
                "reqps",
                [
                    target(
                        f"sum by (pool, finished_reason) (rate(vllm:request_success_total{{{NS_POOL}}}[{RATE}]))",
                        "{{pool}} {{finished_reason}}",
                    )
                ],
            )
        )
    )


DASHBOARDS: dict[str, Callable[[], dashboard_builders.Dashboard]] = {
    "slo-by-effort": slo_by_effort,
    "pools-and-capacity": pools_and_capacity,
    "engine": engine,
}


def render(name: str) -> str:
    built = DASHBOARDS[name]().build()
    for panel_id, built_panel in enumerate(built.panels or [], start=1):  # stable ids, rows included
        built_panel.id_val = panel_id
    return json.dumps(built, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[Path, str]:
    return {DASHBOARDS_DIR / f"{name}.json": render(name) for name in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the Grafana dashboards' JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed dashboard is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(map(str, stale))}: run python -m dashboards.build", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
