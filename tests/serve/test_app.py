"""The Ray Serve application built from a config: the pools' and the ingress's deployment options."""

from __future__ import annotations

import pytest

from gptoss_vllm.serve.config import ConfigError, load_config, parse_config
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


def test_build_app_takes_the_config_inline_as_the_helm_chart_writes_it():
    from ray.serve import Application

    from gptoss_vllm.serve.app import build_app

    inline = load_config(None).model_dump(exclude_none=True)
    assert isinstance(build_app({"serve": inline}), Application)
    inline["pools"]["fast"]["efforts"] = ["low"]  # medium is served by no pool now
    with pytest.raises(ConfigError, match=r"^serveConfigV2 args\.serve: .*medium"):
        build_app({"serve": inline})


def test_the_ingress_queue_is_bounded_and_answers_503_with_retry_after():
    from gptoss_vllm.serve.app import build_application

    config = parse_config(serving_config(ingress={"max_queued_requests": 50, "retry_after_s": 3}))
    ingress = build_application(config)._bound_deployment
    assert ingress.name == "ingress" and ingress.max_queued_requests == 50
    assert ingress.backpressure_config.status_code == 503 and ingress.backpressure_config.retry_after_s == 3
    # Ray's default (-1) would hold every connection of a flood.
    assert build_application(parse_config(serving_config()))._bound_deployment.max_queued_requests == 1000


def test_a_redeploy_restarts_only_what_its_change_touches():
    from gptoss_vllm.serve.app import build_application

    def versions(**changes) -> dict[str, str]:
        ingress = build_application(parse_config(serving_config(**changes)))._bound_deployment
        pools = ingress.init_args[1]
        return {"ingress": ingress._version} | {
            name: pool._bound_deployment._version for name, pool in pools.items()
        }

    base = versions()
    assert versions() == base  # stable: the same config, the same versions
    engine = versions(pools__deep__engine_args={"max_num_seqs": 4})
    assert engine["deep"] != base["deep"] and (engine["fast"], engine["ingress"]) == (
        base["fast"],
        base["ingress"],
    )
    scaling = versions(pools__deep__autoscaling={"min_replicas": 1, "max_replicas": 3, "policy": "queue"})
    assert scaling == base  # applied in place by Ray: no replica restarts
    bounds = versions(pools__fast__max_queued_requests=7)
    assert bounds["ingress"] != base["ingress"] and (bounds["fast"], bounds["deep"]) == (
        base["fast"],
        base["deep"],
    )
    short = {"max_model_len": 4096}
    longer = versions(pools__deep__engine_args=short, pools__fast__engine_args=short)
    assert longer["ingress"] != base["ingress"]  # the body limit follows max_model_len
