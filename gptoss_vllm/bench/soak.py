"""``gptoss-vllm bench soak``: the embedded default under hostile, mixed traffic for a long time; does anything
leak or get lost?

The stack is the embedded default (two pools of nano) with API keys and one key capped at two sequences in
flight. Clients loop over a fixed mix: streamed and non-streamed chat at every effort, Responses, clients that
hang up mid-stream or before the answer, uploads abandoned mid-body, malformed JSON, non-JSON bodies, ``n``
above the cap, unknown keys (from a second loopback address, whose failed attempts get throttled), and
bursts of the capped key (429s). Every answer is checked against what its kind must get; anything else, or a
request without an answer, is ``lost``. Each process's RSS is sampled over time; at the end, with no traffic,
the ingress must count nothing in flight (``leaked_slots``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from gptoss_vllm import envs
from gptoss_vllm.bench.overhead import machine_info, process_title
from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name
from gptoss_vllm.serve.config_load import load_config

KEY = "sk-soak"
CAPPED_KEY = "sk-soak-capped"
OTHER_ADDRESS = "127.0.0.2"  # unknown keys come from here, so their throttle never touches the rest
PROMPT = [{"role": "user", "content": "What is 47 + 8?"}]
# Process titles (Ray sets them) by role; anything else of the stack's is not sampled.
ROLES = {
    "proxy": ("ray::ProxyActor",),
    "ingress": (f"ServeReplica:{APP_NAME}:ingress",),
    "pool_replica": (
        f"ServeReplica:{pool_app_name('fast')}:fast",
        f"ServeReplica:{pool_app_name('deep')}:deep",
    ),
    "engine": ("VLLM::EngineCore",),
    "controller": ("ray::ServeController",),
}
# What each kind of request must be answered with.
MIX: dict[str, tuple[float, tuple[int, ...]]] = {
    "chat": (0.22, (200, 429)),
    "chat_stream": (0.22, (200, 429)),
    "responses": (0.08, (200, 429)),
    "hang_up_stream": (0.08, (0,)),  # the client leaves: no status to check
    "hang_up_before_answer": (0.05, (0,)),
    "abandoned_upload": (0.04, (0,)),
    "malformed_json": (0.06, (400,)),
    "text_plain": (0.05, (415,)),
    "n_too_large": (0.05, (400,)),
    "unknown_key": (0.05, (401, 429)),
    "capped_burst": (0.10, (200, 429)),
}


@dataclass(frozen=True)
class Settings:
    duration_s: float = 1800.0
    users: int = 6
    sample_every_s: float = 30.0
    warmup_fraction: float = 0.2  # RSS growth is measured from the end of the warm-up
    seed: int = 0


def stack_processes(root_pid: int) -> dict[str, psutil.Process]:
    """The stack's processes by ``role:pid``: the serve command's descendants and Ray's actors."""
    found: dict[str, psutil.Process] = {"serve": psutil.Process(root_pid)}
    for proc in psutil.process_iter():
        title = process_title(proc)
        for role, marks in ROLES.items():
            if any(mark in title for mark in marks):
                found[f"{role}:{proc.pid}"] = proc
                break
    return found


def _rss_mb(procs: dict[str, psutil.Process]) -> dict[str, float | None]:
    sizes: dict[str, float | None] = {}
    for name, proc in procs.items():
        try:
            sizes[name] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            sizes[name] = None  # gone: a replica replaced, which the report shows
    return sizes


class _Traffic:
    def __init__(self, url: str, rng: random.Random) -> None:
        self.url = url
        self.rng = rng
        self.outcomes: Counter[tuple[str, int]] = Counter()
        self.lost: list[str] = []
        self.unanswered = 0
        self._auth = {"Authorization": f"Bearer {KEY}"}
        # Every kind once first, in a random order, then the weighted mix: a short soak still tries them all.
        self._first = self.rng.sample(list(MIX), len(MIX))

    def _body(self, **extra: Any) -> dict[str, Any]:
        effort = self.rng.choice(("low", "medium", "high"))
        return {
            "messages": PROMPT,
            "reasoning_effort": effort,
            "max_tokens": self.rng.randint(4, 48),
            **extra,
        }

    async def one(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
        if self._first:
            kind = self._first.pop()
        else:
            kinds, weights = zip(*((k, w) for k, (w, _) in MIX.items()), strict=True)
            kind = self.rng.choices(kinds, weights)[0]
        try:
            status = await getattr(self, f"_{kind}")(client, other)
        except (httpx.TransportError, OSError) as exc:
            self.unanswered += 1
            self.lost.append(f"{kind}: {type(exc).__name__}: {exc}")
            return
        self.outcomes[(kind, status)] += 1
        if status not in MIX[kind][1]:
            self.lost.append(f"{kind}: answered {status}")

    async def _chat(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        answer = await client.post("/v1/chat/completions", json=self._body(), headers=self._auth)
        return answer.status_code

    async def _chat_stream(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        async with client.stream(
            "POST", "/v1/chat/completions", json=self._body(stream=True), headers=self._auth
        ) as response:
            text = (await response.aread()).decode()
        if response.status_code == 200 and ("data: [DONE]" not in text or '"error"' in text):
            return 599  # a stream that ended without its end, or with an error event
        return response.status_code

    async def _responses(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        body = {"input": "What is 47 + 8?", "max_output_tokens": 32, "store": False}
        return (await client.post("/v1/responses", json=body, headers=self._auth)).status_code

    async def _hang_up_stream(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        body = self._body(stream=True, max_tokens=400, ignore_eos=True)
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=self._auth) as response:
            async for _ in response.aiter_bytes():
                break  # gone after the first bytes
        return 0

    async def _hang_up_before_answer(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        body = self._body(max_tokens=400, ignore_eos=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client.post("/v1/chat/completions", json=body, headers=self._auth), 0.3)
        return 0

    async def _abandoned_upload(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        host, port = httpx.URL(self.url).host, httpx.URL(self.url).port
        _reader, writer = await asyncio.open_connection(host, port)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: 4000\r\n\r\n"
        )
        writer.write(head.encode() + b'{"messages": [')
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        return 0

    async def _malformed_json(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        bad = self.rng.choice([b'{"messages": [', b"[" * 5000, b'{"messages": "\\ud800"}', b"\xff\xfe"])
        headers = {**self._auth, "Content-Type": "application/json"}
        return (await client.post("/v1/chat/completions", content=bad, headers=headers)).status_code

    async def _text_plain(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        headers = {**self._auth, "Content-Type": "text/plain"}
        body = json.dumps(self._body()).encode()
        return (await client.post("/v1/chat/completions", content=body, headers=headers)).status_code

    async def _n_too_large(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        body = self._body(n=self.rng.choice((129, 1000, 10**6)))
        return (await client.post("/v1/chat/completions", json=body, headers=self._auth)).status_code

    async def _unknown_key(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        headers = {"Authorization": f"Bearer sk-guess-{self.rng.randint(0, 10**9)}"}
        return (await other.post("/v1/chat/completions", json=self._body(), headers=headers)).status_code

    async def _capped_burst(self, client: httpx.AsyncClient, other: httpx.AsyncClient) -> int:
        headers = {"Authorization": f"Bearer {CAPPED_KEY}"}
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=self._body(), headers=headers) for _ in range(4))
        )
        statuses = {a.status_code for a in answers}
        return 200 if statuses <= {200, 429} and 200 in statuses else max(statuses)


async def _run_traffic(url: str, settings: Settings, deadline: float, traffic: _Traffic, bar: tqdm) -> None:
    timeout = httpx.Timeout(300, connect=30)
    other_transport = httpx.AsyncHTTPTransport(local_address=OTHER_ADDRESS)
    async with (
        httpx.AsyncClient(base_url=url, timeout=timeout) as client,
        httpx.AsyncClient(base_url=url, timeout=timeout, transport=other_transport) as other,
    ):

        async def user() -> None:
            while time.monotonic() < deadline:
                await traffic.one(client, other)
                bar.update(1)

        await asyncio.gather(*(user() for _ in range(settings.users)))


def _in_flight(url: str, token: str) -> dict[str, float]:
    targets = httpx.get(f"{url}/metrics/targets", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    (ingress,) = [t for t in targets.json() if t["labels"].get("component") == "ingress"]
    text = httpx.get(f"http://{ingress['targets'][0]}/metrics", timeout=30).text
    return {
        sample.labels["pool"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gptoss_in_flight_requests"
    }


def _growth(samples: list[dict[str, Any]], warm: float) -> dict[str, float | None]:
    """RSS growth per process from the first sample after the warm-up to the last, in percent."""
    after = [s for s in samples if s["t_s"] >= warm] or samples[-1:]
    first, last = after[0]["rss_mb"], samples[-1]["rss_mb"]
    return {
        name: (
            round(100 * (last[name] - first[name]) / first[name], 2)
            if first.get(name) and last.get(name)
            else None
        )
        for name in first
    }


def run_soak(settings: Settings, json_path: str | None = None, keep: Path | None = None) -> dict[str, Any]:
    """Start the stack, run the traffic for the duration, sample RSS, check the end state; stop the stack."""
    from gptoss_vllm.bench.process import start_stack
    from gptoss_vllm.serve.pool.deployment import ensure_builtin_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the progress bar
    work = keep or Path(tempfile.mkdtemp(prefix="gptoss-bench-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "keys").write_text(f"soak:{KEY}\ncapped:{CAPPED_KEY}\n")
    config = load_config(None).model_dump(exclude_none=True)
    config["auth"] = {"api_keys_file": str(work / "keys"),
                      "key_rate_limits": {"capped": {"concurrent_requests": 2}}}  # fmt: skip
    for pool in config["pools"].values():
        ensure_builtin_model(pool["model"])
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    token = secrets.token_urlsafe(18)
    print("starting the stack (embedded default, API keys) ...", flush=True)
    stack = start_stack(work / "serve.yaml", work / "serve.log", env={envs.MONITORING_TOKEN.name: token})
    try:
        procs = stack_processes(stack.proc.pid)
        traffic = _Traffic(stack.url, random.Random(settings.seed))
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        deadline = started + settings.duration_s

        async def run() -> None:
            task = asyncio.ensure_future(_run_traffic(stack.url, settings, deadline, traffic, bar))
            while not task.done():
                samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": _rss_mb(procs)})
                await asyncio.wait([task], timeout=settings.sample_every_s)
            await task

        with tqdm(desc="bench soak", unit="req", total=None) as bar:
            asyncio.run(run())
        samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": _rss_mb(procs)})
        settle = time.monotonic() + 60  # hung-up requests finish their clean-up
        in_flight = _in_flight(stack.url, token)
        while sum(in_flight.values()) and time.monotonic() < settle:
            time.sleep(1)
            in_flight = _in_flight(stack.url, token)
        health = httpx.get(f"{stack.url}/health", timeout=30).status_code
    finally:
        code = stack.stop()
    growth = _growth(samples, settings.duration_s * settings.warmup_fraction)
    outcomes: dict[str, dict[str, int]] = {}
    for (kind, status), count in sorted(traffic.outcomes.items()):
        outcomes.setdefault(kind, {})[str(status)] = count
    report = {
        "machine": machine_info(),
        "settings": settings.__dict__,
        "requests": sum(traffic.outcomes.values()) + traffic.unanswered,
        "outcomes": outcomes,
        "lost_requests": len(traffic.lost),
        "lost_examples": traffic.lost[:20],
        "leaked_slots": sum(in_flight.values()),
        "in_flight_at_end": in_flight,
        "health_after": health,
        "serve_exit_code": code,
        "rss_growth_after_warmup_pct": growth,
        "max_rss_growth_after_warmup_pct": max((g for g in growth.values() if g is not None), default=None),
        "rss_samples": samples,
    }
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'kind':<24}{'answers':>40}"]
    for kind, statuses in report["outcomes"].items():
        lines.append(f"{kind:<24}{', '.join(f'{s}: {n}' for s, n in statuses.items()):>40}")
    lines.append("")
    lines.append(f"{'process':<28}{'RSS at end (MB)':>18}{'growth after warm-up':>22}")
    last = report["rss_samples"][-1]["rss_mb"]
    for name, growth in report["rss_growth_after_warmup_pct"].items():
        shown = "gone" if last.get(name) is None else f"{last[name]:.0f}"
        lines.append(f"{name:<28}{shown:>18}{'-' if growth is None else f'{growth:+.2f} %':>22}")
    lines.append("")
    lines.append(
        f"requests {report['requests']}, lost {report['lost_requests']}, leaked admission slots "
        f"{report['leaked_slots']:g}, /health after: {report['health_after']}, serve exit code "
        f"{report['serve_exit_code']} ({report['machine']['cpu']}, {report['machine']['cores']} cores)"
    )
    return "\n".join(lines)


def loopback_alias_works() -> bool:
    """Whether this machine lets a client connect from ``OTHER_ADDRESS`` (Linux routes all of 127/8)."""
    try:
        with socket.socket() as sock:
            sock.bind((OTHER_ADDRESS, 0))
        return True
    except OSError:
        return False
