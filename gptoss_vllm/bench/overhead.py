"""``gptoss-vllm bench overhead``: what the stack's serving path costs over vLLM's own OpenAI server.

The same checkpoint and engine arguments are served (a) by vLLM's own OpenAI server and (b) by the stack with
one pool of one replica, both up at once. Rounds alternate (vllm, stack, vllm, stack, ...), so that the noise of
a shared machine falls on both. Per target and concurrency: non-streamed chat (``max_tokens`` 1) latency p50/p99
and requests/s; streamed chat (``ignore_eos``) time to first token p50/p99, the gap between token events
p50/p99 and output tokens/s; and the CPU time, read from the OS, of every process outside the engine (vLLM's
API server; the stack's proxy, ingress, pool replica, Serve controller, and Ray's own daemons), per
non-streamed request and per streamed token. The engine processes (engine core, workers) are left out of both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from tqdm import tqdm

from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name
from gptoss_vllm.serve.config import PoolConfig
from gptoss_vllm.serve.config_load import load_config
from gptoss_vllm.serve.pool.engine_args import server_argv

TARGETS = ("vllm", "stack")
MODEL_NAME = "gpt-oss-bench"
PROMPT = [{"role": "user", "content": "What is 47 + 8?"}]
# Process titles (Ray sets them) of the stack's processes outside the engine, by role.
STACK_ROLES = {
    "proxy": "ray::ProxyActor",
    "ingress": f"ServeReplica:{APP_NAME}:ingress",
    "pool_replica": f"ServeReplica:{pool_app_name('all')}:all",
    "controller": "ray::ServeController",
    "ray_daemons": ("raylet", "gcs_server", "dashboard"),
}
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker")


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...] = (4, 32)
    rounds: int = 2  # per target, alternating
    requests: int = 64  # non-streamed requests per round (at least 2 per client)
    streams: int = 32  # streamed requests per round
    output_tokens: int = 64
    model: str | None = None  # a checkpoint directory; None: the embedded default's model (nano)
    idle_s: float = 10.0  # both targets up and unloaded: what their processes cost doing nothing


@dataclass
class _Samples:
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    streams: int = 0
    request_wall_s: float = 0.0
    stream_wall_s: float = 0.0
    request_cpu_s: dict[str, float] = field(default_factory=dict)
    stream_cpu_s: dict[str, float] = field(default_factory=dict)
    failures: int = 0


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


# -- processes -------------------------------------------------------------------------------------------------


def process_title(proc: psutil.Process) -> str:
    """A process's command line as Ray titles it (empty once it is gone)."""
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _processes(target: str, root_pid: int) -> dict[str, list[psutil.Process]]:
    """The processes outside the engine of one target, by role."""
    if target == "vllm":
        return {"api_server": [psutil.Process(root_pid)]}
    found: dict[str, list[psutil.Process]] = {role: [] for role in STACK_ROLES}
    for proc in psutil.process_iter():
        title = process_title(proc)
        if any(engine in title for engine in ENGINE_TITLES):
            continue
        for role, marks in STACK_ROLES.items():
            if any(mark in title for mark in ((marks,) if isinstance(marks, str) else marks)):
                found[role].append(proc)
                break
    missing = [role for role in ("proxy", "ingress", "pool_replica") if not found[role]]
    if missing:
        raise RuntimeError(f"bench overhead: no process found for {', '.join(missing)} of the stack")
    return found


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    totals = {}
    for role, procs in processes.items():
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        totals[role] = total
    return totals


def _idle_cpu(procs: dict[str, dict[str, list[psutil.Process]]], seconds: float) -> dict[str, dict]:
    """CPU milliseconds per second each target's processes spend with no request in flight (Ray Serve's
    control loop, health checks, metrics pushes): a floor under the CPU per token at any load."""
    before = {target: cpu_seconds(found) for target, found in procs.items()}
    time.sleep(seconds)
    idle = {}
    for target, found in procs.items():
        after = cpu_seconds(found)
        per_s = {role: round((after[role] - before[target][role]) * 1000 / seconds, 1) for role in after}
        idle[target] = {**per_s, "total": round(sum(per_s.values()), 1)}
    return idle


def _add(into: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    for role in after:
        into[role] = into.get(role, 0.0) + after[role] - before.get(role, 0.0)


# -- load ------------------------------------------------------------------------------------------------------


async def _one_request(client: httpx.AsyncClient, url: str, samples: _Samples) -> None:
    body = {"model": MODEL_NAME, "messages": PROMPT, "max_tokens": 1, "reasoning_effort": "low"}
    started = time.perf_counter()
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    if response.status_code != 200:
        samples.failures += 1
        return
    samples.latencies_s.append(time.perf_counter() - started)


def _carries_token(event: dict) -> bool:
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False


async def _one_stream(client: httpx.AsyncClient, url: str, tokens: int, samples: _Samples) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": PROMPT,
        "max_tokens": tokens,
        "ignore_eos": True,
        "reasoning_effort": "low",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    last = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            samples.failures += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if _carries_token(event):
                now = time.perf_counter()
                if last is None:
                    samples.ttfts_s.append(now - started)
                else:
                    samples.gaps_s.append(now - last)
                last = now
            if event.get("usage") and not event.get("choices"):
                samples.tokens += event["usage"]["completion_tokens"]


async def _run_clients(concurrency: int, total: int, make) -> float:
    """``total`` calls of ``make()`` from ``concurrency`` clients; returns the wall time."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def client() -> None:
        while not queue.empty():
            queue.get_nowait()
            await make()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _round(url: str, concurrency: int, settings: Settings, procs, samples: _Samples) -> None:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        requests = max(settings.requests, 2 * concurrency)
        before = cpu_seconds(procs)
        samples.request_wall_s += await _run_clients(
            concurrency, requests, lambda: _one_request(client, url, samples)
        )
        _add(samples.request_cpu_s, before, cpu_seconds(procs))
        samples.requests += requests
        streams = max(settings.streams, concurrency)
        before = cpu_seconds(procs)
        samples.stream_wall_s += await _run_clients(
            concurrency, streams, lambda: _one_stream(client, url, settings.output_tokens, samples)
        )
        _add(samples.stream_cpu_s, before, cpu_seconds(procs))
        samples.streams += streams


def _figures(target: str, concurrency: int, s: _Samples) -> dict[str, Any]:
    per_request = {role: round(cpu * 1000 / max(1, s.requests), 3) for role, cpu in s.request_cpu_s.items()}
    per_token = {role: round(cpu * 1000 / max(1, s.tokens), 4) for role, cpu in s.stream_cpu_s.items()}
    per_request["total"] = round(sum(s.request_cpu_s.values()) * 1000 / max(1, s.requests), 3)
    per_token["total"] = round(sum(s.stream_cpu_s.values()) * 1000 / max(1, s.tokens), 4)
    return {
        "target": target,
        "concurrency": concurrency,
        "failures": s.failures,
        "non_streamed": {
            "requests": s.requests,
            "latency_p50_ms": _ms(_quantile(s.latencies_s, 0.5)),
            "latency_p99_ms": _ms(_quantile(s.latencies_s, 0.99)),
            "requests_per_s": round(len(s.latencies_s) / s.request_wall_s, 2) if s.request_wall_s else None,
        },
        "streamed": {
            "streams": s.streams,
            "output_tokens": s.tokens,
            "ttft_p50_ms": _ms(_quantile(s.ttfts_s, 0.5)),
            "ttft_p99_ms": _ms(_quantile(s.ttfts_s, 0.99)),
            "inter_token_p50_ms": _ms(_quantile(s.gaps_s, 0.5)),
            "inter_token_p99_ms": _ms(_quantile(s.gaps_s, 0.99)),
            "output_tokens_per_s": round(s.tokens / s.stream_wall_s, 1) if s.stream_wall_s else None,
        },
        "cpu_ms_per_request": per_request,
        "cpu_ms_per_streamed_token": per_token,
    }


def ratios(results: list[dict]) -> list[dict[str, Any]]:
    """The stack against vLLM's own server, per concurrency (the issue's targets)."""
    rows = []
    for concurrency in sorted({r["concurrency"] for r in results}):
        by = {r["target"]: r for r in results if r["concurrency"] == concurrency}
        vllm, stack = by["vllm"], by["stack"]

        def ratio(a: float | None, b: float | None) -> float | None:
            return round(a / b, 3) if a is not None and b else None

        rows.append(
            {
                "concurrency": concurrency,
                "streamed_tokens_per_s": ratio(
                    stack["streamed"]["output_tokens_per_s"], vllm["streamed"]["output_tokens_per_s"]
                ),
                "non_streamed_requests_per_s": ratio(
                    stack["non_streamed"]["requests_per_s"], vllm["non_streamed"]["requests_per_s"]
                ),
                "ttft_p50_added_ms": round(
                    stack["streamed"]["ttft_p50_ms"] - vllm["streamed"]["ttft_p50_ms"], 2
                ),
                "cpu_per_streamed_token": ratio(
                    stack["cpu_ms_per_streamed_token"]["total"], vllm["cpu_ms_per_streamed_token"]["total"]
                ),
                "cpu_per_request": ratio(
                    stack["cpu_ms_per_request"]["total"], vllm["cpu_ms_per_request"]["total"]
                ),
            }
        )
    return rows


# -- the two servers -------------------------------------------------------------------------------------------


def bench_pool(model: str | None) -> PoolConfig:
    """The embedded default's first pool (same engine arguments and environment), serving every effort."""
    base = next(iter(load_config(None).pools.values()))
    changes: dict[str, Any] = {
        "efforts": ["low", "medium", "high"],
        "replicas": 1,
        "max_ongoing_requests": 256,
        "max_queued_requests": 1024,
        "spillover": None,
    }
    if model is not None:
        changes["model"] = model
    return PoolConfig.model_validate(base.model_dump() | changes)


def machine_info() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def run_bench(settings: Settings, json_path: str | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Start both targets, run the alternating rounds, stop both; returns the report (also written as JSON)."""
    from gptoss_vllm.bench.process import start_stack, start_vllm_server
    from gptoss_vllm.serve.pool.deployment import ensure_builtin_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bar
    work = keep or Path(tempfile.mkdtemp(prefix="gptoss-bench-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    pool = bench_pool(settings.model)
    ensure_builtin_model(pool.model)  # built once, before either target starts
    config = {"model_name": MODEL_NAME, "pools": {"all": pool.model_dump(exclude_none=True)}}
    (work / "stack.yaml").write_text(yaml.safe_dump(config))
    print("starting vLLM's own OpenAI server and the stack (one pool, one replica) ...", flush=True)
    # Both start at once (their start-ups are mostly imports, which overlap well); the rounds run once both
    # are up, so neither is measured while the other starts.
    with ThreadPoolExecutor(2) as starting:
        vllm_start = starting.submit(
            start_vllm_server, server_argv(pool, MODEL_NAME), work / "vllm.log", pool.env
        )
        stack_start = starting.submit(start_stack, work / "stack.yaml", work / "stack.log")
    started = [f.result() for f in (vllm_start, stack_start) if f.exception() is None]
    if len(started) < 2:
        for target in started:
            target.stop()
        raise (vllm_start.exception() or stack_start.exception())
    vllm, stack = started
    try:
        roots = {"vllm": (vllm.url, vllm.proc.pid), "stack": (stack.url, stack.proc.pid)}
        procs = {target: _processes(target, pid) for target, (_, pid) in roots.items()}
        idle = _idle_cpu(procs, settings.idle_s) if settings.idle_s > 0 else {}
        results = []
        steps = len(settings.concurrency) * settings.rounds * len(TARGETS)
        with tqdm(total=steps, desc="bench overhead", unit="round") as bar:
            for concurrency in settings.concurrency:
                samples = {target: _Samples() for target in TARGETS}
                for url, _ in roots.values():  # one warm-up stream each, outside the figures
                    asyncio.run(
                        _round(url, 1, Settings(requests=1, streams=1, output_tokens=4), {}, _Samples())
                    )
                for _ in range(settings.rounds):
                    for target in TARGETS:
                        bar.set_postfix(concurrency=concurrency, target=target)
                        url = roots[target][0]
                        asyncio.run(_round(url, concurrency, settings, procs[target], samples[target]))
                        bar.update()
                results += [_figures(target, concurrency, samples[target]) for target in TARGETS]
    finally:
        stack.stop()
        vllm.stop()
    report = {
        "machine": machine_info(),
        "settings": {**settings.__dict__, "concurrency": list(settings.concurrency), "model": pool.model},
        "idle_cpu_ms_per_s": idle,
        "results": results,
        "ratios": ratios(results),
    }
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def _cell(value: Any, width: int) -> str:
    return f"{'-' if value is None else value:>{width}}"


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; model {report['settings']['model']}", ""]
    head = (
        f"{'target':<7} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'TTFT50':>7} {'TTFT99':>7} "
        f"{'ITL50':>6} {'ITL99':>6} {'tok/s':>7} {'cpu ms/req':>10} {'cpu ms/tok':>10}"
    )
    lines.append(head)
    for r in report["results"]:
        n, s = r["non_streamed"], r["streamed"]
        cells = (
            (n["latency_p50_ms"], 8), (n["latency_p99_ms"], 8), (n["requests_per_s"], 7),
            (s["ttft_p50_ms"], 7), (s["ttft_p99_ms"], 7), (s["inter_token_p50_ms"], 6),
            (s["inter_token_p99_ms"], 6), (s["output_tokens_per_s"], 7),
            (r["cpu_ms_per_request"]["total"], 10), (r["cpu_ms_per_streamed_token"]["total"], 10),
        )  # fmt: skip
        lines.append(f"{r['target']:<7} {r['concurrency']:>4} " + " ".join(_cell(v, w) for v, w in cells))
    lines += ["", "stack / vLLM:"]
    for row in report["ratios"]:
        lines.append(
            f"  conc {row['concurrency']}: streamed tok/s x{row['streamed_tokens_per_s']}, "
            f"non-streamed req/s x{row['non_streamed_requests_per_s']}, "
            f"TTFT p50 {row['ttft_p50_added_ms']:+} ms, CPU per streamed token x{row['cpu_per_streamed_token']}, "
            f"CPU per request x{row['cpu_per_request']}"
        )
    idle = report.get("idle_cpu_ms_per_s") or {}
    if idle:
        lines.append(
            "  idle CPU ms/s: "
            + "; ".join(
                f"{target} " + ", ".join(f"{k} {v}" for k, v in roles.items())
                for target, roles in idle.items()
            )
        )
    stack = [r for r in report["results"] if r["target"] == "stack"]
    if stack:
        roles = ", ".join(f"{k} {v}" for k, v in stack[-1]["cpu_ms_per_streamed_token"].items())
        lines.append(
            f"  stack CPU ms per streamed token by process (conc {stack[-1]['concurrency']}): {roles}"
        )
    return "\n".join(lines)
