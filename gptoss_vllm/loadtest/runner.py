"""``gptoss-vllm loadtest``: a headless Locust run bounded in time and requests, then the report.

Locust (and gevent's monkey-patching) is imported only here, in the process that runs the load.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from gptoss_vllm.loadtest.profiles import Profile
from gptoss_vllm.loadtest.slo import Slo

PERCENTILES = [0.5, 0.9, 0.95, 0.99, 1.0]


def run_loadtest(
    host: str,
    profile: Profile,
    users: int,
    duration_s: float,
    report_dir: Path,
    slo: Slo | None = None,
    slo_file: str | None = None,
    max_requests: int | None = None,
    api_key: str | None = None,
    model: str = "gpt-oss-nano",
    prometheus_url: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the profile against ``host`` and write the report into ``report_dir``; returns the summary."""
    import gevent
    from locust.env import Environment
    from locust.html import get_html_report
    from locust.stats import CSV_STATS_INTERVAL_SEC, StatsCSVFileWriter, stats_history
    from tqdm import tqdm

    from gptoss_vllm.loadtest import report
    from gptoss_vllm.loadtest.samples import Sample, effort_figures, totals
    from gptoss_vllm.loadtest.shape import shape_class
    from gptoss_vllm.loadtest.slo import violations
    from gptoss_vllm.loadtest.user import OpenAIChatUser

    logging.getLogger("locust").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report_dir.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    started = time.monotonic()
    user = type(
        "ProfileUser",
        (OpenAIChatUser,),
        {
            "abstract": False, "host": host, "profile": profile, "model": model, "api_key": api_key,
            "samples": samples, "clock_start": started, "seed": seed,
        },
    )  # fmt: skip
    env = Environment(
        user_classes=[user], shape_class=shape_class(profile.arrival, users, duration_s)(), host=host
    )
    runner = env.create_local_runner()
    csv_writer = StatsCSVFileWriter(env, PERCENTILES, str(report_dir / "locust"), full_history=False)
    background = [gevent.spawn(csv_writer), gevent.spawn(stats_history, runner)]
    wall_start = time.time()
    runner.start_shape()
    bar = tqdm(
        total=round(duration_s),
        desc=f"load test {profile.name}",
        file=sys.stderr,
        disable=not progress,
        mininterval=2,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s{postfix}",
    )
    while True:
        gevent.sleep(0.5)
        elapsed = time.monotonic() - started
        bar.n = min(round(elapsed), bar.total)
        bar.set_postfix(
            requests=len(samples), failures=sum(1 for s in samples if not s.ok), users=runner.user_count
        )
        bar.refresh()
        if elapsed >= duration_s or (max_requests is not None and len(samples) >= max_requests):
            break
    runner.stop()
    duration = time.monotonic() - started
    bar.close()
    wall_end = time.time()
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)  # one more pass of the CSV writer over the final stats
    for greenlet in background:
        greenlet.kill(block=False)
    csv_writer.close_files()
    runner.quit()

    efforts = effort_figures(samples, duration, slo)
    missed = violations(slo, efforts) if slo is not None else []
    summary = {
        "profile": profile.name,
        "host": host,
        "users": users,
        "duration_s": duration,
        "efforts": efforts,
        "totals": totals(samples, duration),
        "slo": {"passed": not missed, "violations": missed, "file": slo_file},
    }
    prometheus = None
    if prometheus_url:
        try:
            prometheus = report.prometheus_series(prometheus_url, wall_start, wall_end)
        except Exception as exc:  # the report is still worth having without these plots
            print(f"loadtest: could not read Prometheus at {prometheus_url}: {exc}", file=sys.stderr)
    report.write_summary(report_dir / "summary.json", summary)
    report.write_samples_csv(samples, report_dir / "requests.csv")
    (report_dir / "locust.html").write_text(get_html_report(env, show_download_link=False))
    report.write_html(report_dir / "report.html", summary, samples, slo, prometheus)
    return summary
