"""The engine-signal autoscaling policy as Ray Serve's controller runs it: Ray's own ``AutoscalingContext`` and
the wrapper Ray puts around a custom policy (scaling factors, delays, zero only from one), with figures as the
replicas report them. Ray's controller applies min/max replicas after it."""

from __future__ import annotations

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from gptoss_vllm.serve.pool.scaling_policy import EngineSignalPolicy


def _context(
    current: int, figures: dict[str, list[float]], requests: float = 1.0, **config
) -> AutoscalingContext:
    replicas = [f"r{i}" for i in range(current)]
    settings = {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 0, "downscale_delay_s": 0, **config}
    return AutoscalingContext(
        deployment_id=DeploymentID(name="fast", app_name="gptoss-pool-fast"),
        deployment_name="fast",
        app_name="gptoss-pool-fast",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=replicas,
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics={key: dict(zip(replicas, values, strict=True)) for key, values in figures.items()},
        raw_metrics={},
        capacity_adjusted_min_replicas=settings["min_replicas"],
        capacity_adjusted_max_replicas=settings["max_replicas"],
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=AutoscalingConfig(**settings),
    )


def _decide(policy: EngineSignalPolicy, current: int, figures: dict[str, list[float]], **kw) -> int:
    return _apply_autoscaling_config(policy)(_context(current, figures, **kw))[0]


def _busy(key: str, values: list[float]) -> dict[str, list[float]]:
    figures = {"engine_waiting": [0.0] * len(values), "engine_running": [4.0] * len(values)}
    return {**figures, key: values}


def test_queue_scales_to_bring_the_waiting_requests_back_to_the_target_and_down_with_hysteresis():
    policy = EngineSignalPolicy("queue", target=2, hysteresis=0.25)
    assert _decide(policy, 2, _busy("engine_waiting", [6, 4])) == 5  # 10 waiting / 2 per replica
    assert _decide(policy, 2, _busy("engine_waiting", [3, 2])) == 3  # over the target: at least one more
    assert _decide(policy, 3, _busy("engine_waiting", [2, 1, 1])) == 3  # on one fewer: 2 each, over 1.5
    assert _decide(policy, 3, _busy("engine_waiting", [1, 0, 0])) == 2  # on one fewer: 0.5 each, under 1.5


def test_kv_cache_scales_on_the_caches_use_and_keeps_a_pool_near_its_target():
    policy = EngineSignalPolicy("kv_cache", target=0.6, hysteresis=0.2)
    assert _decide(policy, 2, _busy("kv_cache_usage", [0.9, 0.8])) == 3  # 1.7 / 0.6
    assert _decide(policy, 2, _busy("kv_cache_usage", [0.5, 0.3])) == 2  # 0.8 on one: over 0.48, stays
    assert _decide(policy, 4, _busy("kv_cache_usage", [0.1, 0.1, 0.1, 0.1])) == 3


def test_ttft_scales_up_on_the_slowest_replica_and_down_only_when_nothing_waits():
    policy = EngineSignalPolicy("ttft", target=1.0, hysteresis=0.2)
    slow = {"ttft_s": [3.0, 0.5], "ttft_samples": [10, 10]}
    assert _decide(policy, 2, {**_busy("engine_waiting", [0, 0]), **slow}) == 4  # 3x over, at most doubled
    fast = {"ttft_s": [0.2, 0.3], "ttft_samples": [10, 10]}
    assert _decide(policy, 2, {**_busy("engine_waiting", [0, 0]), **fast}) == 1
    assert _decide(policy, 2, {**_busy("engine_waiting", [1, 0]), **fast}) == 2  # a request waits: keep
    near = {"ttft_s": [0.9, 0.3], "ttft_samples": [10, 10]}
    assert _decide(policy, 2, {**_busy("engine_waiting", [0, 0]), **near}) == 2  # inside the band
    stale = {"ttft_s": [5.0, 0.3], "ttft_samples": [0, 10]}  # no first token in r0's window: not slow
    assert _decide(policy, 2, {**_busy("engine_waiting", [0, 0]), **stale}) == 1


def test_an_idle_pool_goes_to_its_floor_and_a_starting_one_keeps_its_target():
    policy = EngineSignalPolicy("queue", target=2)
    idle = {"engine_waiting": [0, 0], "engine_running": [0, 0]}
    assert _decide(policy, 2, idle, requests=0.0, min_replicas=0) == 1  # Ray goes to zero from one only
    assert (
        _decide(policy, 1, {"engine_waiting": [0], "engine_running": [0]}, requests=0.0, min_replicas=0) == 0
    )
    assert _decide(policy, 3, {}) == 3  # no reports yet


@pytest.mark.parametrize(
    ("signal", "target", "hysteresis", "message"),
    [("vibes", 1, 0.2, "signal must be one of"), ("queue", 0, 0.2, "target"), ("queue", 1, 1, "hysteresis")],
)
def test_bad_settings_name_what_is_wrong(signal, target, hysteresis, message):
    with pytest.raises(ValueError, match=message):
        EngineSignalPolicy(signal, target, hysteresis)
