"""Builds the Ray Serve application from a :class:`ServeConfig`: one ingress, one deployment per pool.

``build_app`` is also the import path for ``serve run``/``serveConfigV2``
(``gptoss_vllm.serve.app:build_app`` with ``args: {config: <path>}``), so a RayService runs the same code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray import serve
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from gptoss_vllm.lifetime import EXIT_WITH_PARENT_ENV
from gptoss_vllm.serve.config import PoolConfig, ServeConfig, load_config, parse_config
from gptoss_vllm.serve.ingress.deployment import Ingress, app
from gptoss_vllm.serve.pool.deployment import PoolServer
from gptoss_vllm.serve.pool.router import router_class_path

APP_NAME = "gptoss"
# What a pool replica is built from; a change to anything else of a pool (its scaling, bounds, efforts) is
# applied without restarting its replicas.
POOL_REPLICA_FIELDS = {"model", "engine_args", "env", "ray_actor_options"}
INGRESS_POOL_FIELDS = {
    "efforts",
    "spillover",
    "max_ongoing_requests",
    "max_queued_requests",
    "cold_start_timeout_s",
}


def ingress_view(config: ServeConfig) -> dict[str, Any]:
    """The settings the ingress reads: all but the pools', of which only what admission, routing by effort and
    cold starts need (a pool's model, engine or scaling policy changes without restarting the ingress)."""
    pools = {
        name: {
            **pool.model_dump(include=INGRESS_POOL_FIELDS),
            "min_replicas": pool.min_replicas,
        }
        for name, pool in config.pools.items()
    }
    # The body limit follows the pools' max_model_len (engine arguments).
    return {**config.model_dump(exclude={"pools"}), "pools": pools, "body_limit": config.body_limit()}


def deployment_version(*parts: Any) -> str:
    """A deployment's version from what its replicas are built from: Ray Serve restarts a deployment's replicas
    when its version changes, and only then (``serve.run`` would give every deploy a new random one, so a
    redeploy that changes one pool would restart every pool and the ingress)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        code = version("gptoss-vllm")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree that was never installed
        code = "source"
    encoded = json.dumps([code, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def pool_deployment_options(name: str, pool: PoolConfig) -> dict[str, Any]:
    """Ray Serve deployment options of one pool."""
    actor_options = dict(pool.ray_actor_options)
    runtime_env = dict(actor_options.pop("runtime_env", {}) or {})
    # The engine core must not outlive a killed replica (it would hold the memory its replacement needs).
    env = {EXIT_WITH_PARENT_ENV: "1", **runtime_env.get("env_vars", {}), **pool.env}
    runtime_env["env_vars"] = env
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": pool.max_ongoing_requests,
        "max_queued_requests": pool.max_queued_requests + pool.max_ongoing_requests,
        "ray_actor_options": {**actor_options, "runtime_env": runtime_env},
        "request_router_config": RequestRouterConfig(request_router_class=router_class_path(pool.router)),
        "graceful_shutdown_timeout_s": pool.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    if pool.autoscaling is not None:
        options["autoscaling_config"] = pool.autoscaling.ray_config()
    else:
        options["num_replicas"] = pool.replicas or 1
    return options


def build_application(config: ServeConfig, pool_class: type = PoolServer) -> serve.Application:
    """The ingress and one deployment per pool; ``pool_class`` is the pool replicas' class (a benchmark's
    stand-in that speaks the same protocol; never anything but :class:`PoolServer` in a serving config)."""
    pools = {
        name: serve.deployment(pool_class)
        .options(
            **pool_deployment_options(name, pool),
            version=deployment_version(
                pool_class.__qualname__, config.model_name, pool.model_dump(include=POOL_REPLICA_FIELDS)
            ),
            _internal=True,  # Ray keeps explicit versions to itself; without one, each deploy restarts all
        )
        .bind(name, pool.model_dump(), config.model_name)
        for name, pool in config.pools.items()
    }
    longest_drain = max(pool.drain_timeout_s for pool in config.pools.values())
    ingress = serve.deployment(serve.ingress(app)(Ingress)).options(
        name="ingress",
        num_replicas=config.ingress.replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        # Bounded, unlike Ray's default: past it the proxy answers 503 with Retry-After (in OpenAI's shape, by
        # the proxy gate), instead of holding every connection of a flood.
        max_queued_requests=config.ingress.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=config.ingress.retry_after_s),
        # On the head, as Ray pins its own control actors: the ingress relays every pool's streams, so the loss
        # of a pool's node must not take the other pools' streams with it (the head's loss is the cluster's).
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE_NAME: 0.001}},
        graceful_shutdown_timeout_s=longest_drain,
        graceful_shutdown_wait_loop_s=1.0,
        version=deployment_version("ingress", ingress_view(config)),
        _internal=True,
    )
    return ingress.bind(config.model_dump(), pools)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for ``serve run gptoss_vllm.serve.app:build_app config=FILE`` and RayService:
    ``args: {config: FILE}``, or the whole serving config inline as ``args: {serve: {...}}`` (what the Helm
    chart writes into ``serveConfigV2``)."""
    if "serve" in args:
        return build_application(parse_config(args["serve"], source="serveConfigV2 args.serve"))
    return build_application(load_config(args.get("config")))
