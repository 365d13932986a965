"""``gptoss-vllm bench overhead --relay``: how many tokens/s one ingress replica relays, without an engine.

The real ingress (and Ray Serve's proxy in front of it) serves one pool whose replica is :class:`SyntheticPool`:
it answers through the same :class:`~gptoss_vllm.serve.pool.answer_channel.AnswerChannel` as a pool replica and
emits pre-rendered chat-completion SSE events, one item per token as vLLM's app sends them, as fast as it is
asked. Clients hold 1, 32, 128 and 512 streams at once; the figures are tokens/s through the ingress and the CPU per token of the proxy, the ingress and the
synthetic pool. The synthetic pool lives here and in no serving config.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from tqdm import tqdm

from gptoss_vllm.bench.overhead import cpu_seconds, machine_info
from gptoss_vllm.observability.request_record import Observation
from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name
from gptoss_vllm.serve.pool.answer_channel import (
    AnswerChannel,
    AnswerItem,
    AnswerTicket,
    PoolAnswerEnd,
    PoolAnswerStart,
)
from gptoss_vllm.serve.pool.deployment import PoolRequest

STREAMS = (1, 32, 128, 512)
POOL = "relay"
MODEL_NAME = "gpt-oss-relay"
ROLES = {
    "proxy": "ray::ProxyActor",
    "ingress": f"ServeReplica:{APP_NAME}:ingress",
    "pool": f"ServeReplica:{pool_app_name(POOL)}:{POOL}",
}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class SyntheticPool:
    """A pool replica without an engine: ``max_tokens`` token events, then usage and ``[DONE]``."""

    async def __init__(self, pool_name: str, pool: dict[str, Any], model_name: str) -> None:
        import ray
        from ray import serve

        self._channel = await AnswerChannel.open(ray.util.get_node_ip_address())
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        base = {"id": "chatcmpl-relay", "object": "chat.completion.chunk", "created": 0, "model": model_name}
        self._token = _event(
            {**base, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
        )
        self._base = base

    async def handle_request(self, request: PoolRequest) -> AsyncIterator[AnswerTicket]:
        async for ticket in self._channel.answer(self._answer(request)):
            yield ticket

    async def _answer(self, request: PoolRequest) -> AsyncIterator[AnswerItem]:
        # The body's bytes, as a real pool reads them (the parsed payload stays in the ingress).
        tokens = int(json.loads(request.body or b"{}").get("max_tokens") or 16)
        yield PoolAnswerStart(200, [("content-type", "text/event-stream")], self._replica_id)
        started = time.monotonic()
        for _ in range(tokens):
            yield self._token
            await asyncio.sleep(0)  # one item per token, as vLLM's app sends them
        usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
        if not request.strip_usage:
            yield _event({**self._base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
        seen = Observation(first_token_s=0.0, prompt_tokens=8, output_tokens=tokens, reasoning_tokens=0)
        seen.gaps_s = [(time.monotonic() - started) / max(1, tokens)] * max(0, tokens - 1)
        yield PoolAnswerEnd(seen)

    async def check_health(self) -> None:
        pass


async def _stream(client: httpx.AsyncClient, url: str, tokens: int) -> int:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": tokens,
        "stream": True,
    }
    received = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for chunk in response.aiter_raw():
            received += chunk.count(b'"delta":{"content"')
    return received


async def _measure(url: str, streams: int, tokens: int, procs: dict) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        before = cpu_seconds(procs)
        started = time.perf_counter()
        received = await asyncio.gather(*(_stream(client, url, tokens) for _ in range(streams)))
        wall = time.perf_counter() - started
        after = cpu_seconds(procs)
    relayed = sum(received)
    cpu = {role: round((after[role] - before[role]) * 1000 / max(1, relayed), 4) for role in after}
    return {
        "streams": streams,
        "tokens_per_stream": tokens,
        "tokens": relayed,
        "expected_tokens": streams * tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(relayed / wall, 1),
        "cpu_ms_per_token": cpu,
    }


DIRECT_PORTS = 2  # Ray Serve gives every application's ingress replica a port: the pool's and the ingress's


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    import socket

    from gptoss_vllm.bench.process import free_port

    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as held:
                for offset in range(count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def _direct_ingress(port: int) -> None:
    """Ray Serve's direct ingress: each application's ingress replica serves HTTP itself, on a port from
    ``port`` on. Ray Serve reads the flags when it is first imported, here and in every Ray process this one
    starts."""
    import sys

    from gptoss_vllm.bench.process import free_port

    if "ray.serve" in sys.modules and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        raise RuntimeError("--direct-ingress: Ray Serve was imported before the flag could be set")
    os.environ.update(
        {
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_PORTS),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc := free_port()),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",  # nothing to deregister from here
        }
    )


def _ingress_among(ports: list[int]) -> str:
    """Which of the direct-ingress ports the ingress's replica took (the pool's replica took another)."""
    deadline = time.monotonic() + 60
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            for port in ports:
                try:
                    if "pools" in client.get(f"http://127.0.0.1:{port}/ready").json():
                        return f"http://127.0.0.1:{port}"
                except (httpx.HTTPError, ValueError):
                    pass
            time.sleep(0.5)
    raise RuntimeError(f"bench overhead --relay: no direct ingress answered /ready on ports {ports}")


def run_relay_bench(
    streams: tuple[int, ...] = STREAMS, tokens: int = 128, direct_ingress: bool = False
) -> dict[str, Any]:
    """Start Ray, the real ingress and a synthetic pool in this process; measure; stop. ``direct_ingress``:
    clients reach the ingress replica without Ray Serve's proxy."""
    from gptoss_vllm.bench.process import free_port

    port = free_port()  # the proxy's (Ray Serve starts one even with direct ingress on)
    url = f"http://127.0.0.1:{port}"
    direct_ports: list[int] = []
    if direct_ingress:
        base = _free_ports(DIRECT_PORTS)
        _direct_ingress(base)
        direct_ports = list(range(base, base + DIRECT_PORTS))
    import psutil
    import ray
    from ray import serve

    from gptoss_vllm.serve.app import run_targets
    from gptoss_vllm.serve.config_load import parse_config

    config = parse_config(
        {
            "model_name": MODEL_NAME,
            "pools": {
                POOL: {
                    "model": "builtin:nano",  # never loaded: the synthetic pool has no engine
                    "efforts": ["low", "medium", "high"],
                    "max_ongoing_requests": 4096,
                    "max_queued_requests": 4096,
                    "ray_actor_options": {"num_cpus": 0},
                }
            },
            "ingress": {"max_ongoing_requests": 4096},
        },
        source="bench overhead --relay",
    )
    ray.init(
        address="local", include_dashboard=False, object_store_memory=1 << 30, namespace="gptoss-vllm-relay"
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many(run_targets(config, pool_class=SyntheticPool))
        if direct_ingress:
            url = _ingress_among(direct_ports)
        deadline = time.monotonic() + 60  # the ingress learns of the pool's replica
        with httpx.Client(timeout=5) as client:
            while client.get(f"{url}/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "bench overhead --relay: the ingress never saw the synthetic pool running"
                    )
                time.sleep(0.5)
        procs: dict[str, list] = {role: [] for role in ROLES}
        for proc in psutil.process_iter():
            try:
                title = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for role, mark in ROLES.items():
                if mark in title:
                    procs[role].append(proc)
        results = []
        asyncio.run(_measure(url, 1, 8, {}))  # warm-up
        for count in tqdm(streams, desc="bench overhead --relay", unit="level"):
            results.append(asyncio.run(_measure(url, count, tokens, procs)))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "machine": machine_info(),
        "direct_ingress": direct_ingress,
        "processes": {role: len(found) for role, found in procs.items()},
        "results": results,
    }


def format_relay_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    hop = (
        "clients straight to the ingress (direct ingress)"
        if report.get("direct_ingress")
        else "behind the proxy"
    )
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; one ingress replica {hop}, synthetic pool", ""]
    lines.append(f"{'streams':>7} {'tokens':>8} {'tok/s':>9} {'proxy ms/tok':>12} {'ingress':>8} {'pool':>8}")
    for r in report["results"]:
        cpu = r["cpu_ms_per_token"]
        lines.append(
            f"{r['streams']:>7} {r['tokens']:>8} {r['tokens_per_s']:>9} {cpu['proxy']:>12} "
            f"{cpu['ingress']:>8} {cpu['pool']:>8}"
        )
    return "\n".join(lines)
