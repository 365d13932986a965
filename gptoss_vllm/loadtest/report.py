"""The run's report: ``summary.json``, per-request CSV, Locust's CSVs and HTML, and ``report.html`` with
plots (latency CDF per effort, throughput and goodput over time, replicas and queue over time from
Prometheus when its address is given)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import httpx

from gptoss_vllm.loadtest.profiles import EFFORTS
from gptoss_vllm.loadtest.samples import Sample
from gptoss_vllm.loadtest.slo import Slo, goodput_bounds

BIN_S = 5.0


def write_samples_csv(samples: list[Sample], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(Sample.__dataclass_fields__))
        writer.writeheader()
        for sample in samples:
            writer.writerow(sample.as_row())


def prometheus_series(
    url: str, start: float, end: float
) -> dict[str, list[tuple[str, list[tuple[float, float]]]]]:
    """Running replicas and queue depth per pool over the run (empty lists when Prometheus has none)."""
    series = {}
    for title, expr in (
        ("running replicas", "max by (pool) (gptoss_pool_running_replicas)"),
        ("queue depth", "sum by (pool) (gptoss_queue_depth)"),
        ("in flight", "sum by (pool) (gptoss_in_flight_requests)"),
    ):
        answer = httpx.get(
            f"{url.rstrip('/')}/api/v1/query_range",
            params={"query": expr, "start": start, "end": end, "step": "2s"},
            timeout=30,
        ).json()
        series[title] = [
            (r["metric"].get("pool", ""), [(float(t), float(v)) for t, v in r["values"]])
            for r in answer.get("data", {}).get("result", [])
        ]
    return series


def _figure_png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(samples: list[Sample], duration_s: float, slo: Slo | None, prometheus: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, key) in zip(
        axes, (("TTFT", "ttft_s"), ("answer TTFT", "answer_ttft_s"), ("end to end", "e2e_s")), strict=True
    ):
        for effort in EFFORTS:
            values = sorted(
                getattr(s, key)
                for s in samples
                if s.effort == effort and s.ok and getattr(s, key) is not None
            )
            if values:
                ax.step(
                    values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=effort
                )
        ax.set(title=f"{title} CDF per effort", xlabel="seconds", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    images.append(_figure_png(fig))
    plt.close(fig)

    bins = max(1, math.ceil(duration_s / BIN_S - 0.5))  # a last bin under half full would read as a drop
    done = [[0.0] * bins for _ in range(2)]
    for sample in samples:
        index = min(bins - 1, int((sample.started + sample.e2e_s) // BIN_S))
        if sample.ok:
            done[0][index] += 1 / BIN_S
            ttft_bound, tpot_bound = goodput_bounds(slo, sample.effort)
            if (ttft_bound is None or (sample.ttft_s or 0) <= ttft_bound) and (
                tpot_bound is None or sample.tpot_s is None or sample.tpot_s <= tpot_bound
            ):
                done[1][index] += 1 / BIN_S
    fig, ax = plt.subplots(figsize=(10, 3.5))
    times = [i * BIN_S for i in range(bins)]
    ax.plot(times, done[0], label="throughput (requests/s)")
    ax.plot(times, done[1], label="goodput (requests/s within the SLO bounds)")
    ax.set(title="Throughput and goodput over time", xlabel="seconds into the run", ylabel="requests/s")
    ax.grid(alpha=0.3)
    ax.legend()
    images.append(_figure_png(fig))
    plt.close(fig)

    if prometheus:
        fig, axes = plt.subplots(1, len(prometheus), figsize=(15, 3.5))
        for ax, (title, series) in zip(axes, prometheus.items(), strict=True):
            for pool, points in series:
                if points:
                    start = points[0][0]
                    ax.step([t - start for t, _ in points], [v for _, v in points], where="post", label=pool)
            ax.set(title=f"{title} per pool (Prometheus)", xlabel="seconds", ylabel=title)
            ax.grid(alpha=0.3)
            if any(points for _, points in series):
                ax.legend()
        images.append(_figure_png(fig))
        plt.close(fig)
    return images


def write_html(
    path: Path, summary: dict[str, Any], samples: list[Sample], slo: Slo | None, prometheus: dict | None
) -> None:
    rows = "".join(
        "<tr><td>{}</td>{}</tr>".format(
            effort,
            "".join(f"<td>{_cell(figures.get(k))}</td>" for k in _COLUMNS),
        )
        for effort, figures in summary["efforts"].items()
    )
    verdict = summary["slo"]
    slo_text = (
        "no SLO file"
        if verdict["file"] is None
        else (
            "all objectives met"
            if verdict["passed"]
            else "<br>".join(html.escape(v) for v in verdict["violations"])
        )
    )
    images = "".join(
        f'<p><img src="data:image/png;base64,{png}"></p>'
        for png in _plots(samples, summary["duration_s"], slo, prometheus)
    )
    path.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>gptoss-vllm load test: {html.escape(summary["profile"])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head>
<body><h1>Load test: {html.escape(summary["profile"])}</h1>
<p>{html.escape(summary["host"])}, {summary["users"]} users, {summary["duration_s"]:.0f} s, {summary["totals"]["requests"]} requests
({summary["totals"]["failures"]} failed), {summary["totals"]["output_tokens_per_s"]:.1f} output tokens/s.</p>
<h2>SLO</h2><p>{slo_text}</p>
<h2>Per effort</h2><table><tr><th>effort</th>{"".join(f"<th>{k}</th>" for k in _COLUMNS)}</tr>{rows}</table>
<h2>Plots</h2>{images}
<p>Locust's own report: <a href="locust.html">locust.html</a>; CSVs: locust_stats.csv, requests.csv.</p>
</body></html>"""
    )


_COLUMNS = (
    "requests", "failures", "ttft_p50_s", "ttft_p95_s", "answer_ttft_p95_s", "tpot_p50_s", "tpot_p95_s",
    "e2e_p95_s", "reasoning_tokens", "answer_tokens", "goodput_rps",
)  # fmt: skip


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
