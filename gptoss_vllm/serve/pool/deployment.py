"""A pool replica: one ``AsyncLLM`` engine behind vLLM's own OpenAI FastAPI app, called in-process.

Harmony rendering, the reasoning parser, tool calls and request validation are vLLM's; this module only starts
the engine from the pool's config and relays HTTP requests into that app. Engines store no Responses (the
ingress keeps conversations, :mod:`.response_store`): the replica sets the fields the client asked for in each
response object and hands the final one to the ingress ahead of its bytes. It observes the answers of
generating requests (timings, usage) where their events are made, so the ingress forwards bytes.
Answers go to the ingress over the replica's :mod:`~gptoss_vllm.serve.pool.answer_channel`, not Ray's stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gptoss_vllm.cache import cache_root
from gptoss_vllm.observability.targets import MetricsEndpoint
from gptoss_vllm.observability.tracing import engine_tracing_env
from gptoss_vllm.serve.config import BUILTIN_PREFIX, PoolConfig
from gptoss_vllm.serve.core_split import BIND_ENV, replica_bind
from gptoss_vllm.serve.pool.answer_channel import (
    AnswerChannel,
    AnswerItem,
    AnswerTicket,
    FinishedResponse,
    PoolAnswerEnd,
    PoolAnswerStart,
)
from gptoss_vllm.serve.pool.asgi_stream import ResponseStart, stream_asgi
from gptoss_vllm.serve.pool.engine_args import parse_server_args, server_argv
from gptoss_vllm.serve.pool.engine_signals import EngineSignals
from gptoss_vllm.serve.pool.stream_observer import StreamObserver

log = logging.getLogger("ray.serve")


@dataclass
class PoolRequest:
    """An HTTP request the ingress forwards to a pool (already authenticated, effort applied)."""

    method: str
    path: str
    body: bytes = b""
    query: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)
    # Generating requests: the replica observes the answer (timings, usage) and sends a PoolAnswerEnd.
    endpoint: str | None = None
    strip_usage: bool = False  # drop the usage event the ingress asked for on the client's behalf
    # Responses the ingress stores: set these fields of every response object (the engine saw store: false,
    # no previous_response_id) and send the final one (FinishedResponse) ahead of its bytes.
    response_fields: dict[str, Any] | None = None

    # Read by Ray Serve's prefix-aware router (PrefixCacheAffinityRouter) to match prompt prefixes.
    @property
    def messages(self) -> Any:
        return self.payload.get("messages") or self.payload.get("input") or ""

    @property
    def prompt(self) -> Any:
        return self.payload.get("prompt") or ""

    def __getstate__(self) -> dict[str, Any]:
        # The parsed payload is for the router, in the ingress; the replica reads ``body``. Bytes cross Ray
        # whatever their content, where a client's object would be pickled as deep as it was sent.
        return {**self.__dict__, "payload": {}}


def _builtin_source(preset: str) -> str:
    """What a builtin checkpoint is built from; a cached build from anything else is rebuilt."""
    from gptoss_vllm.presets import TRAINED_PRESETS

    if preset in TRAINED_PRESETS:
        from gptoss_vllm.nano.asset import ASSET_PATH

        return "asset-" + hashlib.sha256(ASSET_PATH.read_bytes()).hexdigest()[:16]
    return "seed-0"


def ensure_builtin_model(model: str) -> None:
    """Build a ``builtin:<preset>`` checkpoint into the user cache unless it is there (one builder per node)."""
    if not model.startswith(BUILTIN_PREFIX):
        return
    from gptoss_vllm.presets import build_preset

    preset = model[len(BUILTIN_PREFIX) :]
    out = cache_root() / "models" / preset
    out.parent.mkdir(parents=True, exist_ok=True)
    source = _builtin_source(preset)
    with open(out.parent / f".{preset}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two pools on one node must not write the same directory
        stamp = out / ".gptoss-vllm-source"
        whole = (out / "config.json").exists() and any(out.glob("*.safetensors")) and stamp.exists()
        if not whole or stamp.read_text() != source:
            log.info("building the %s checkpoint into %s", preset, out)
            build_preset(preset, out, force=True)
            stamp.write_text(source)


class PoolServer:
    """The Ray Serve replica class of every pool deployment."""

    async def __init__(self, pool_name: str, pool: dict[str, Any], model_name: str) -> None:
        import ray
        from ray import serve
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client_from_engine_args
        from vllm.entrypoints.launchers.app import build_app

        config = PoolConfig.model_validate(pool)
        ensure_builtin_model(config.model)
        context = serve.get_replica_context()
        bind = os.environ.get(BIND_ENV, "")
        tp = config.engine_args.get("tensor_parallel_size", config.engine_args.get("tensor-parallel-size", 1))
        if "|" in bind and int(tp) == 1:
            # split_cores gave each replica of this pool its own cores: take this replica's (vLLM would read
            # the list as one per tensor-parallel rank, and every replica would take the first).
            os.environ[BIND_ENV] = replica_bind(bind, getattr(context.rank, "local_rank", 0) or 0)
        args = parse_server_args(server_argv(config, model_name))
        tracing = engine_tracing_env()
        if tracing:
            os.environ.update(tracing)  # vLLM's exporter reads the protocol from the environment
            args.otlp_traces_endpoint = tracing["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        self._pool_name = pool_name
        self._replica_id = context.replica_id.unique_id
        self._stack = contextlib.AsyncExitStack()
        self._engine = await self._stack.enter_async_context(
            build_async_engine_client_from_engine_args(AsyncEngineArgs.from_cli_args(args))
        )
        tasks = await self._engine.get_supported_tasks()
        self._app = build_app(args, tasks, self._engine.model_config)
        await init_app_state(self._engine, self._app.state, args, tasks)
        # vLLM's engine metrics live in this process's default registry; pool and replica come from the target.
        labels = {
            "component": "pool",
            "pool": pool_name,
            "replica": self._replica_id,
            "app": context.app_name,
        }
        self._metrics_endpoint = MetricsEndpoint(labels)
        self._channel = await AnswerChannel.open(ray.util.get_node_ip_address())
        scaling = config.autoscaling
        self._signals = EngineSignals(
            scaling.ttft_percentile if scaling else 95.0, scaling.ttft_window_s if scaling else 30.0
        )
        log.info("pool %s replica %s ready (model %s)", pool_name, self._replica_id, config.model)

    async def handle_request(self, request: PoolRequest) -> AsyncIterator[AnswerTicket]:
        """Ray's stream of a pool call: the ticket for the answer, which goes over the answer channel."""
        async for ticket in self._channel.answer(self._answer(request)):
            yield ticket

    async def _answer(self, request: PoolRequest) -> AsyncIterator[AnswerItem]:
        """The answer as it is produced: its start, then bytes, then a :class:`PoolAnswerEnd`; a generating
        request's answer is observed here, where its events are made."""
        observer = (
            StreamObserver(request.endpoint, request.strip_usage, request.response_fields)
            if request.endpoint
            else None
        )
        streaming = announced = False
        body = b""
        async for item in stream_asgi(
            self._app, request.method, request.path, request.query, request.headers, request.body
        ):
            if isinstance(item, ResponseStart):
                streaming = any(
                    k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in item.headers
                )
                if observer is not None:
                    observer.started = time.monotonic()  # the ingress counts from this item's arrival
                yield PoolAnswerStart(item.status, item.headers, self._replica_id)
            elif observer is None:
                yield item
            elif streaming:
                relayed = observer.relay(item)
                if not announced and observer.finished_response is not None:
                    announced = True
                    yield FinishedResponse(observer.finished_response)
                if relayed:
                    yield relayed
            else:
                body += item
                if request.response_fields is None:
                    yield item
        if observer is None:
            yield PoolAnswerEnd()
            return
        if streaming and (rest := observer.flush()):
            yield rest
        if not streaming:
            content = observer.observe_body(body)
            if request.response_fields is not None:
                if observer.finished_response is not None:
                    yield FinishedResponse(observer.finished_response)
                yield content
        yield PoolAnswerEnd(observer.seen)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What the engine feels, for the pool's autoscaling policy (Ray Serve calls it on every metrics push)."""
        return self._signals.read()

    async def check_health(self) -> None:
        # A dead engine core fails this; Ray Serve then replaces the replica.
        await self._engine.check_health()

    async def __del__(self) -> None:
        if hasattr(self, "_metrics_endpoint"):
            self._metrics_endpoint.close()
        if hasattr(self, "_channel"):
            self._channel.close()
        await self._stack.aclose()
