"""Local mode's split of the machine's cores between CPU pools (``gptoss_vllm.serve.core_split``), and the
shared stack's engines on their slices."""

from __future__ import annotations

import os

import psutil
import pytest

from gptoss_vllm.serve.config_load import parse_config
from gptoss_vllm.serve.core_split import BIND_ENV, split_cores
from tests.support.serving_config import serving_config


def _binds(config) -> dict[str, str | None]:
    return {name: pool.env.get(BIND_ENV) for name, pool in config.pools.items()}


def test_each_cpu_pool_gets_its_own_equal_slice_of_the_cores():
    config = parse_config(serving_config())
    assert _binds(split_cores(config, [0, 1])) == {"fast": "0", "deep": "1"}
    assert _binds(split_cores(config, [2, 3, 5, 7, 11])) == {"fast": "2,3", "deep": "5,7"}
    assert _binds(config) == {"fast": None, "deep": None}  # a copy: the given config is left as it was


def test_each_replica_of_a_fixed_pool_gets_its_own_slice():
    from gptoss_vllm.serve.core_split import replica_bind

    two = parse_config(serving_config(pools__fast__replicas=2))
    assert _binds(split_cores(two, [0, 1, 2])) == {"fast": "0|1", "deep": "2"}
    data = serving_config(pools__fast__replicas=2, pools__fast__efforts=["low", "medium", "high"])
    data["pools"]["fast"].pop("spillover", None)
    del data["pools"]["deep"]
    assert _binds(split_cores(parse_config(data), [0, 1])) == {
        "fast": "0|1"
    }  # one pool, two replicas: split too
    assert _binds(split_cores(two, [0, 1])) == {"fast": None, "deep": None}  # three replicas, two cores
    assert [replica_bind("0|1", rank) for rank in (0, 1, 2)] == ["0", "1", "0"]
    assert replica_bind("2,3", 1) == "2,3"  # one slice (or a user's binding): every replica's


def test_pools_that_bind_themselves_use_gpus_or_span_ranks_are_left_to_vllm():
    own = serving_config(pools__fast__env={BIND_ENV: "nobind"})
    assert _binds(split_cores(parse_config(own), [0, 1, 2, 3])) == {"fast": "nobind", "deep": None}
    gpu = serving_config(pools__deep__ray_actor_options={"num_gpus": 1})
    assert _binds(split_cores(parse_config(gpu), [0, 1])) == {"fast": None, "deep": None}
    parallel = serving_config(pools__fast__engine_args={"tensor_parallel_size": 2})
    assert _binds(split_cores(parse_config(parallel), [0, 1])) == {"fast": None, "deep": None}
    # Fewer cores than pools: nothing to split.
    assert _binds(split_cores(parse_config(serving_config()), [0])) == {"fast": None, "deep": None}


def test_the_shared_stacks_engines_run_on_cores_of_their_own(stack):
    """Local mode on the embedded default's two CPU pools: each engine's worker is bound to its own cores."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip("one core: nothing to split")
    workers = [
        proc
        for proc in psutil.Process(stack.proc.pid).children(recursive=True)
        if "VLLM::Worker" in " ".join(proc.cmdline())
    ]
    assert len(workers) == 2, [" ".join(p.cmdline()) for p in workers]
    first, second = (set(proc.cpu_affinity()) for proc in workers)
    assert first and second and not first & second, (first, second)
    assert first | second <= cores
