"""``gptoss-vllm bench routing``: does routing by effort pay? One workload, two arms, one run.

Arm ``effort-pools`` is the embedded default (``fast`` serves low and medium, ``deep`` serves high); arm
``shared-pool`` serves every effort from one pool with the same total replicas, engine settings and model.
Output lengths are fixed per effort (vLLM's ``ignore_eos``) to mimic gpt-oss: low short, high long. Each arm
runs the real CLI (``gptoss-vllm serve``) and the real load test (``gptoss-vllm loadtest``), one after the
other, and the figures of both land in one table and one JSON.

With ``curves_path``, the shared arm's stack is also measured by ``bench curves`` once its load test is done,
every replica loaded alike (``capacity/measure.py``): the curve ``plan validate`` replays this run on, taken
on the same machine, through the same serving path, with the same neighbours on the cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from gptoss_vllm.observability.rules import SLOS
from gptoss_vllm.serve.config import ServeConfig
from gptoss_vllm.serve.config_load import load_config

ARMS = ("effort-pools", "shared-pool")
WORKLOAD = {
    "name": "routing-bench",
    "efforts": {"low": 0.6, "medium": 0.25, "high": 0.15},
    "prompt_words": {"min": 8, "max": 40},
    "output_tokens": {"low": 24, "medium": 96, "high": 384},
    "ignore_eos": True,
    "think_time_s": {"min": 0.0, "max": 0.2},
    "arrival": {"shape": "steady"},
}


def arm_configs(base: ServeConfig) -> dict[str, dict[str, Any]]:
    """Both arms' serving configs: the effort pools as given, and one pool holding all of their replicas."""
    pools = base.pools.values()
    if any(p.autoscaling is not None for p in pools):
        raise ValueError("bench routing compares fixed replica counts; the base config autoscales")
    replicas = sum(p.replicas or 1 for p in pools)
    ongoing = sum((p.replicas or 1) * p.max_ongoing_requests for p in pools)
    first = next(iter(pools))
    shared = first.model_dump(exclude_none=True) | {
        "efforts": ["low", "medium", "high"],
        "replicas": replicas,
        "max_ongoing_requests": max(1, ongoing // replicas),  # the same total concurrency
        "max_queued_requests": sum(p.max_queued_requests for p in pools),
        "drain_timeout_s": max(p.drain_timeout_s for p in pools),
    }
    shared.pop("spillover", None)
    effort_pools = base.model_dump(exclude_none=True)
    return {
        "effort-pools": effort_pools,
        "shared-pool": {**effort_pools, "pools": {"shared": shared}},
    }


def _slo_file(directory: Path) -> Path:
    """Goodput counts a request whose first token came within its effort's TTFT bound (the project's SLO)."""
    path = directory / "slo.yaml"
    efforts = {effort: {"ttft_p95_s": slo.ttft_bound_s} for effort, slo in SLOS.items()}
    path.write_text(yaml.safe_dump({"efforts": efforts}))
    return path


def _measure_curve(url: str, pool: dict[str, Any], max_num_seqs: int, path: str) -> dict[str, Any]:
    """The shared pool's curve, per replica, at the concurrencies and prompt lengths this workload reaches.
    ``max_num_seqs``: the most any arm's router sends one replica (the engines' own limit is higher)."""
    from gptoss_vllm.capacity.measure import run

    ongoing, replicas = int(pool["max_ongoing_requests"]), int(pool["replicas"])
    concurrency = sorted({1, 2, max(1, ongoing // 2), ongoing})
    # The stack's /metrics is the service's, not vLLM's: the KV bound is what this pool could ever hold at once
    # (max_model_len per admitted request), which never binds this workload's short requests.
    max_model_len = int(pool.get("engine_args", {}).get("max_model_len", 4096))
    print(
        f"[shared-pool] measuring its curve ({replicas} replicas loaded alike) ...",
        file=sys.stderr,
        flush=True,
    )
    return run(url, path, concurrency=concurrency, prompt_lengths=[64, 128, 256], output_tokens=32,
               max_num_seqs=max_num_seqs, kv_capacity_tokens=max_model_len * max_num_seqs, replicas=replicas)  # fmt: skip


def run_bench(
    users: int,
    duration_s: float,
    report_dir: Path | None = None,
    json_path: str | None = None,
    curves_path: str | None = None,
) -> dict:
    from gptoss_vllm.bench.process import start_stack

    work = Path(tempfile.mkdtemp(prefix="gptoss-bench-routing-"))
    report_dir = report_dir or work
    report_dir.mkdir(parents=True, exist_ok=True)
    (work / "workload.yaml").write_text(yaml.safe_dump(WORKLOAD))
    slo = _slo_file(work)
    configs = arm_configs(load_config(None))
    arms, curve = {}, None
    for arm in ARMS:
        config_path = work / f"{arm}.yaml"
        config_path.write_text(yaml.safe_dump(configs[arm]))
        print(
            f"[{arm}] starting the stack ({', '.join(configs[arm]['pools'])}) ...",
            file=sys.stderr,
            flush=True,
        )
        stack = start_stack(config_path, report_dir / f"{arm}-serve.log")
        try:
            out = report_dir / arm
            command = [
                sys.executable, "-m", "gptoss_vllm.cli", "loadtest", "--host", stack.url,
                "--profile", str(work / "workload.yaml"), "--users", str(users), "--duration", f"{duration_s}s",
                "--slo", str(slo), "--report", str(out),
            ]  # fmt: skip
            finished = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if finished.returncode not in (0, 1):  # 1: an objective missed, which is a figure here
                raise RuntimeError(f"[{arm}] the load test failed (exit {finished.returncode})")
            arms[arm] = json.loads((out / "summary.json").read_text())
            if curves_path and arm == "shared-pool":
                most = max(p["max_ongoing_requests"] for c in configs.values() for p in c["pools"].values())
                curve = _measure_curve(stack.url, configs[arm]["pools"]["shared"], most, curves_path)
        finally:
            stack.stop()
    effort, shared = arms["effort-pools"], arms["shared-pool"]
    low_effort, low_shared = effort["efforts"]["low"]["ttft_p95_s"], shared["efforts"]["low"]["ttft_p95_s"]
    result = {
        "workload": WORKLOAD,
        "users": users,
        "duration_s": duration_s,
        "seed": 0,  # the load test's (its default): plan validate replays its users' draws
        "configs": configs,  # each arm's serving config, as plan validate replays them
        "arms": arms,
        "low_ttft_p95_ratio_shared_over_effort": (low_shared / low_effort) if low_effort and low_shared else None,
        "throughput_ratio_effort_over_shared": _ratio(effort["totals"]["output_tokens_per_s"], shared["totals"]["output_tokens_per_s"]),
        "goodput_ratio_effort_over_shared": _ratio(_goodput(effort), _goodput(shared)),
    }  # fmt: skip
    if curve is not None:
        result["curve"] = curve
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _goodput(summary: dict) -> float:
    return sum(f["goodput_rps"] for f in summary["efforts"].values())


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def format_table(result: dict) -> str:
    header = (
        f"{'arm':<13}"
        + "".join(f"{e + ' TTFT p50/p95 s':>26}" for e in ("low", "medium", "high"))
        + f"{'req/s':>8}{'out tok/s':>11}{'goodput/s':>11}{'failures':>10}"
    )
    lines = [header]
    for arm, summary in result["arms"].items():
        cells = ""
        for effort in ("low", "medium", "high"):
            f = summary["efforts"][effort]
            p50, p95 = f["ttft_p50_s"], f["ttft_p95_s"]
            text = f"{p50:.3f} / {p95:.3f}" if p50 is not None else "-"
            cells += f"{text + ' (n=' + str(f['requests']) + ')':>26}"
        totals = summary["totals"]
        lines.append(
            f"{arm:<13}{cells}{totals['requests_per_s']:>8.2f}{totals['output_tokens_per_s']:>11.1f}"
            f"{_goodput(summary):>11.2f}{totals['failures']:>10}"
        )
    ratio = result["low_ttft_p95_ratio_shared_over_effort"]
    throughput = result["throughput_ratio_effort_over_shared"]
    lines.append(
        f"low-effort p95 TTFT, shared / effort pools: {'-' if ratio is None else f'{ratio:.2f}x'}; "
        f"output throughput, effort pools / shared: {'-' if throughput is None else f'{throughput:.3f}'}"
    )
    return "\n".join(lines)
