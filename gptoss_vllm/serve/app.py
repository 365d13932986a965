"""Builds the service's Ray Serve applications from a :class:`ServeConfig`: one per pool, and the ingress's.

``build_app`` (the ingress) and ``build_pool_app`` (one pool) are also the import paths of a declarative
deploy: the Helm chart's ``serveConfigV2`` lists the ingress application with the config's view
(``args: {serve: ...}``) and each pool's application with its own section (``args: {model_name, name,
pool}``), as :func:`serve_deploy_config` writes them. Ray versions each application by its arguments, so a
change to one pool restarts that pool alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray import serve
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from gptoss_vllm.lifetime import EXIT_WITH_PARENT_ENV
from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name
from gptoss_vllm.serve.config import ConfigError, IngressView, PoolConfig, ServeConfig
from gptoss_vllm.serve.config_load import load_config, parse_config, parse_pool, parse_view
from gptoss_vllm.serve.ingress.deployment import Ingress, app
from gptoss_vllm.serve.pool.deployment import PoolServer
from gptoss_vllm.serve.pool.router import router_class_path

# What a pool replica is built from; a change to anything else of a pool (its scaling, bounds, efforts) is
# applied without restarting its replicas.
POOL_REPLICA_FIELDS = {"model", "engine_args", "env", "ray_actor_options"}


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


def build_pool_application(
    model_name: str, name: str, pool: PoolConfig, pool_class: type = PoolServer
) -> serve.Application:
    """One pool's application: its deployment, named ``name``; ``pool_class`` is the pool replicas' class (a
    benchmark's stand-in that speaks the same protocol; never anything but :class:`PoolServer` in a serving
    config)."""
    if missing := pool.tools.without_url():
        raise ConfigError(
            f"pools.{name}.tools.{missing[0]}: no url, and nothing started one (`gptoss-vllm serve` starts the "
            "tool servers on its own machine; on a cluster, give the url of a server the workers reach)"
        )
    return (
        serve.deployment(pool_class)
        .options(
            **pool_deployment_options(name, pool),
            version=deployment_version(
                pool_class.__qualname__, model_name, pool.model_dump(include=POOL_REPLICA_FIELDS)
            ),
            _internal=True,  # Ray keeps explicit versions to itself; without one, each deploy restarts it
        )
        .bind(name, pool.model_dump(), model_name)
    )


def build_ingress_application(view: IngressView) -> serve.Application:
    """The ingress's application; it reaches each pool's application by name (:func:`pool_app_name`)."""
    longest_drain = max(pool.drain_timeout_s for pool in view.pools.values())
    ingress = serve.deployment(serve.ingress(app)(Ingress)).options(
        name="ingress",
        num_replicas=view.ingress.replicas,
        max_ongoing_requests=view.ingress.max_ongoing_requests,
        # Bounded, unlike Ray's default: past it the proxy answers 503 with Retry-After (in OpenAI's shape, by
        # the proxy gate), instead of holding every connection of a flood.
        max_queued_requests=view.ingress.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=view.ingress.retry_after_s),
        # On the head, as Ray pins its own control actors: the ingress relays every pool's streams, so the loss
        # of a pool's node must not take the other pools' streams with it (the head's loss is the cluster's).
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE_NAME: 0.001}},
        graceful_shutdown_timeout_s=longest_drain,
        graceful_shutdown_wait_loop_s=1.0,
        version=deployment_version("ingress", view.model_dump()),
        _internal=True,
    )
    return ingress.bind(view.model_dump())


def run_targets(
    config: ServeConfig, pool_class: type = PoolServer, app_name: str = APP_NAME
) -> list[serve.RunTarget]:
    """What ``serve.run_many`` deploys: every pool's application, then the ingress's at ``/``."""
    pools = [
        serve.RunTarget(
            build_pool_application(config.model_name, name, pool, pool_class),
            name=pool_app_name(name, app_name),
            route_prefix=None,
        )
        for name, pool in config.pools.items()
    ]
    return [
        *pools,
        serve.RunTarget(build_ingress_application(config.view()), name=app_name, route_prefix="/"),
    ]


def serve_deploy_config(config: ServeConfig, app_name: str = APP_NAME) -> dict[str, Any]:
    """The ``applications`` of a Serve deploy config (what the chart renders into ``serveConfigV2``)."""
    pools = [
        {
            "name": pool_app_name(name, app_name),
            "route_prefix": None,
            "import_path": "gptoss_vllm.serve.app:build_pool_app",
            "args": {
                "model_name": config.model_name,
                "name": name,
                "pool": pool.model_dump(exclude_none=True),
            },
        }
        for name, pool in config.pools.items()
    ]
    ingress = {
        "name": app_name,
        "route_prefix": "/",
        "import_path": "gptoss_vllm.serve.app:build_app",
        "args": {"serve": config.view().model_dump(exclude_none=True)},
    }
    return {"applications": [ingress, *pools]}


def config_of(declared: dict[str, Any], app_name: str = APP_NAME) -> ServeConfig:
    """The whole serving config a deploy config (:func:`serve_deploy_config`, the chart's ``serveConfigV2``)
    deploys: the ingress's view with each pool application's section; a :class:`ConfigError` where the ingress's
    view is not the one the pools' sections make."""
    apps = {app.get("name"): app for app in declared.get("applications", [])}
    if app_name not in apps:
        raise ConfigError(f"serveConfigV2: no application {app_name!r} (the ingress's) among {sorted(apps)}")
    view = apps.pop(app_name)["args"]["serve"]
    pools = {
        app["args"]["name"]: app["args"]["pool"] for app in apps.values() if "pool" in app.get("args", {})
    }
    config = parse_config({**view, "pools": pools}, source="serveConfigV2")
    if parse_view(view, source=f"serveConfigV2 application {app_name!r} args.serve") != config.view():
        raise ConfigError(
            f"serveConfigV2: application {app_name!r} args.serve is not the view of the pools' sections"
        )
    return config


def _full_config(args: dict[str, Any], source: str) -> ServeConfig:
    if "serve" in args:
        return parse_config(args["serve"], source=source)
    return load_config(args.get("config"))  # none: the embedded default


def build_app(args: dict[str, Any]) -> serve.Application:
    """The ingress application's builder: ``args: {serve: VIEW}`` (what the Helm chart writes: the config's
    :meth:`~ServeConfig.view`), or the whole serving config, inline as ``serve`` or as a file, ``config: FILE``
    (then any change to a pool restarts the ingress too, as its arguments changed)."""
    inline = args.get("serve")
    pools = inline.get("pools") if isinstance(inline, dict) else None
    if isinstance(pools, dict) and not any(isinstance(p, dict) and "model" in p for p in pools.values()):
        return build_ingress_application(parse_view(inline, source="serveConfigV2 args.serve"))
    return build_ingress_application(_full_config(args, "serveConfigV2 args.serve").view())


def build_pool_app(args: dict[str, Any]) -> serve.Application:
    """One pool application's builder: ``args: {model_name, name, pool: SECTION}`` (what the Helm chart
    writes), or ``{config: FILE, name: POOL}``."""
    name = args.get("name")
    if "pool" in args:
        source = f"serveConfigV2 application {pool_app_name(str(name))!r} args"
        pool = parse_pool(name, args["pool"], args.get("model_name"), source)
        return build_pool_application(args["model_name"], name, pool)
    config = load_config(args.get("config"))
    if name not in config.pools:
        raise ConfigError(f"pool application args.name: {name!r} is none of the pools {sorted(config.pools)}")
    return build_pool_application(config.model_name, name, config.pools[name])
