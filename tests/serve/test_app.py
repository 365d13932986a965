"""The Ray Serve application built from a config: the pools' and the ingress's deployment options."""

from __future__ import annotations

import pytest

from gptoss_vllm.serve.config import ConfigError
from gptoss_vllm.serve.config_load import load_config, parse_config
from tests.support.serving_config import serving_config


def test_pool_deployment_options():
    from ray.serve._private.utils import import_attr

    from gptoss_vllm.lifetime import EXIT_WITH_PARENT_ENV
    from gptoss_vllm.serve.app import pool_deployment_options

    config = parse_config(
        serving_config(
            pools__fast__autoscaling={"min_replicas": 1, "max_replicas": 3},
            pools__fast__env={"A": "1"},
            pools__fast__ray_actor_options={"num_gpus": 1, "runtime_env": {"env_vars": {"B": "2"}}},
            pools__deep__router="prefix_aware",
            pools__deep__replicas=2,
        )
    )
    fast = pool_deployment_options("fast", config.pools["fast"])
    assert fast["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3} and "num_replicas" not in fast
    assert fast["ray_actor_options"]["num_gpus"] == 1
    assert fast["ray_actor_options"]["runtime_env"]["env_vars"] == {
        EXIT_WITH_PARENT_ENV: "1",
        "B": "2",
        "A": "1",
    }
    deep = pool_deployment_options("deep", config.pools["deep"])
    assert deep["num_replicas"] == 2
    router = import_attr(deep["request_router_config"].request_router_class)
    assert router.__name__ == "CountingPrefixAwareRouter"
    assert (
        import_attr(fast["request_router_config"].request_router_class).__name__ == "CountingPowerOfTwoRouter"
    )


def test_a_pool_on_an_engine_signal_gets_rays_custom_policy_and_the_others_rays_own():
    from ray.serve.config import AutoscalingConfig

    from gptoss_vllm.serve.app import pool_deployment_options

    config = parse_config(
        serving_config(
            pools__fast__autoscaling={"min_replicas": 1, "max_replicas": 4, "policy": "queue", "target": 3},
            pools__deep__autoscaling={"min_replicas": 0, "max_replicas": 2, "target": 5},
        )
    )
    fast = AutoscalingConfig(**pool_deployment_options("fast", config.pools["fast"])["autoscaling_config"])
    assert fast.policy.policy_function.endswith("scaling_policy:EngineSignalPolicy")
    assert fast.policy.policy_kwargs == {"signal": "queue", "target": 3.0, "hysteresis": 0.2}
    assert (fast.min_replicas, fast.max_replicas) == (1, 4)
    # Ray pickles the policy's module by value into its controller: it stands alone and comes back callable.
    policy = fast.policy.get_policy()(**fast.policy.policy_kwargs)
    assert policy.signal == "queue" and policy.target == 3.0
    deep = AutoscalingConfig(**pool_deployment_options("deep", config.pools["deep"])["autoscaling_config"])
    assert deep.policy.is_default_policy_function() and deep.target_ongoing_requests == 5
    assert config.pools["deep"].scales_from_zero and not config.pools["fast"].scales_from_zero
    # The chart and the replicas get the pool back as it was written.
    assert parse_config(config.model_dump()).pools["fast"].autoscaling == config.pools["fast"].autoscaling


def test_build_app_takes_the_view_the_helm_chart_writes_or_a_whole_config():
    from ray.serve import Application

    from gptoss_vllm.serve.app import build_app, serve_deploy_config

    config = load_config(None)
    (ingress,) = [a for a in serve_deploy_config(config)["applications"] if a["route_prefix"] == "/"]
    assert isinstance(build_app(ingress["args"]), Application)
    assert isinstance(build_app({"serve": config.model_dump(exclude_none=True)}), Application)
    inline = config.model_dump(exclude_none=True)
    inline["pools"]["fast"]["efforts"] = ["low"]  # medium is served by no pool now
    with pytest.raises(ConfigError, match=r"^serveConfigV2 args\.serve: .*medium"):
        build_app({"serve": inline})
    view = config.view().model_dump()
    view["pools"]["deep"]["min_replicas"] = -1
    with pytest.raises(ConfigError, match=r"^serveConfigV2 args\.serve: pools\.deep\.min_replicas"):
        build_app({"serve": view})


def test_build_pool_app_takes_its_section_and_names_the_key_of_a_bad_one():
    from ray.serve import Application

    from gptoss_vllm.serve.app import build_pool_app, serve_deploy_config

    config = load_config(None)
    apps = {a["name"]: a for a in serve_deploy_config(config)["applications"]}
    assert set(apps) == {"gptoss", "gptoss-pool-fast", "gptoss-pool-deep"}
    fast = apps["gptoss-pool-fast"]
    assert fast["route_prefix"] is None and fast["import_path"] == "gptoss_vllm.serve.app:build_pool_app"
    app = build_pool_app(fast["args"])
    assert isinstance(app, Application) and app._bound_deployment.name == "fast"
    bad = {**fast["args"], "pool": {**fast["args"]["pool"], "replicas": 0}}
    with pytest.raises(ConfigError, match=r"'gptoss-pool-fast' args: pools\.fast\.replicas"):
        build_pool_app(bad)
    engine = {**fast["args"], "pool": {**fast["args"]["pool"], "engine_args": {"no_such_flag": 1}}}
    with pytest.raises(ConfigError, match=r"pools\.fast\.engine_args"):
        build_pool_app(engine)
    with pytest.raises(ConfigError, match=r"name 'Fast!' is no pool name"):
        build_pool_app({**fast["args"], "name": "Fast!"})


def test_the_ingress_queue_is_bounded_and_answers_503_with_retry_after():
    from gptoss_vllm.serve.app import build_ingress_application

    config = parse_config(serving_config(ingress={"max_queued_requests": 50, "retry_after_s": 3}))
    ingress = build_ingress_application(config.view())._bound_deployment
    assert ingress.name == "ingress" and ingress.max_queued_requests == 50
    assert ingress.backpressure_config.status_code == 503 and ingress.backpressure_config.retry_after_s == 3
    # Ray's default (-1) would hold every connection of a flood.
    default = build_ingress_application(parse_config(serving_config()).view())._bound_deployment
    assert default.max_queued_requests == 1000


def _run_versions(**changes) -> dict[str, str]:
    """Each deployment's version as ``serve.run_many`` (the local ``serve``) deploys them."""
    from gptoss_vllm.serve.app import run_targets

    targets = run_targets(parse_config(serving_config(**changes)))
    return {t.target._bound_deployment.name: t.target._bound_deployment._version for t in targets}


def _declared_versions(**changes) -> dict[str, str]:
    """Each application's code version (by its deployment's name) as Ray's controller computes it from a declarative deploy config (the
    chart's ``serveConfigV2``): every deployment of an application gets it, and restarts when it changes."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    from gptoss_vllm.serve.app import serve_deploy_config

    declared = ServeDeploySchema(**serve_deploy_config(parse_config(serving_config(**changes))))
    return {app.args.get("name", "ingress"): get_app_code_version(app) for app in declared.applications}


@pytest.mark.parametrize(
    "versions", [_run_versions, _declared_versions], ids=["serve.run_many", "serveConfigV2"]
)
def test_a_redeploy_restarts_only_what_its_change_touches(versions):
    def changed(after: dict[str, str]) -> set[str]:
        return {name for name in base if after[name] != base[name]}

    base = versions()
    fast, deep, ingress = "fast", "deep", "ingress"
    assert versions() == base  # stable: the same config, the same versions
    assert changed(versions(pools__deep__engine_args={"max_num_seqs": 4})) == {deep}
    scaling = changed(
        versions(pools__deep__autoscaling={"min_replicas": 1, "max_replicas": 3, "policy": "queue"})
    )
    # serve.run applies a pool's scaling in place; a declarative deploy restarts that pool (its arguments).
    assert scaling == (set() if versions is _run_versions else {deep})
    assert changed(versions(pools__fast__max_queued_requests=7)) == {ingress} | (
        set() if versions is _run_versions else {fast}
    )
    short = {"max_model_len": 4096}
    # The body limit follows max_model_len: the ingress restarts with the pools whose engine changed.
    assert changed(versions(pools__deep__engine_args=short, pools__fast__engine_args=short)) == {
        ingress,
        fast,
        deep,
    }


def test_the_config_a_deploy_config_deploys_comes_back_whole_and_a_stale_view_is_refused():
    from gptoss_vllm.serve.app import config_of, serve_deploy_config

    config = parse_config(serving_config(pools__deep__autoscaling={"min_replicas": 0, "max_replicas": 2}))
    declared = serve_deploy_config(config)
    assert config_of(declared) == config
    # The ingress's view written by hand, apart from the pool's section it should follow.
    declared["applications"][0]["args"]["serve"]["pools"]["deep"]["min_replicas"] = 1
    with pytest.raises(ConfigError, match=r"args\.serve is not the view of the pools' sections"):
        config_of(declared)
    with pytest.raises(ConfigError, match=r"no application 'gptoss'"):
        config_of({"applications": declared["applications"][1:]})
