"""One CPU machine serving every pool (``serve`` on its own Ray): each pool's engines get cores of their own.

vLLM's automatic OpenMP binding on a CPU pins an engine's worker to the first cores of the machine, whatever
else runs there: the pools of one machine then share those cores while the others idle (on 2 cores, both
engines of the embedded default ran on core 0). In local mode each replica of each CPU pool gets a disjoint
slice of the cores this process may use, as ``VLLM_CPU_OMP_THREADS_BIND``, unless its pool's ``env`` sets the
binding itself (two replicas of one pool had both taken core 0, which made ``bench routing``'s shared arm look
half as fast as it is). On a cluster each pool has nodes of its own, and vLLM's default holds there.
"""

from __future__ import annotations

from gptoss_vllm.serve.config import PoolConfig, ServeConfig

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def _splittable(pool: PoolConfig) -> bool:
    """A CPU pool whose engine is one process wide (a tensor-parallel engine needs one list per rank)."""
    if pool.ray_actor_options.get("num_gpus", 0) or BIND_ENV in pool.env:
        return False
    parallel = (
        "tensor_parallel_size",
        "tensor-parallel-size",
        "pipeline_parallel_size",
        "pipeline-parallel-size",
    )
    return all(int(pool.engine_args.get(key, 1)) == 1 for key in parallel)


def split_cores(config: ServeConfig, cores: list[int]) -> ServeConfig:
    """``config`` with each replica of each splittable pool bound to its own slice of ``cores`` (equal slices,
    in pool order; a pool of fixed ``replicas`` gets one slice per replica, written as vLLM writes a list per
    rank, ``0|1``, and each replica takes its own at its start: ``replica_bind``); unchanged when fewer than two
    replicas can be split or there are fewer cores than replicas."""
    names = [name for name, pool in config.pools.items() if _splittable(pool)]
    slots = {name: config.pools[name].replicas or 1 for name in names}  # an autoscaling pool: one slice
    total = sum(slots.values())
    if total < 2 or len(cores) < total:
        return config
    share = len(cores) // total
    pools = dict(config.pools)
    start = 0
    for name in names:
        slices = []
        for _ in range(slots[name]):
            slices.append(",".join(map(str, cores[start : start + share])))
            start += share
        pools[name] = pools[name].model_copy(update={"env": {**pools[name].env, BIND_ENV: "|".join(slices)}})
    return config.model_copy(update={"pools": pools})


def replica_bind(value: str, local_rank: int) -> str:
    """The slice of a pool's ``split_cores`` binding (``0|1``) that its replica of ``local_rank`` on this node
    takes (a binding of one slice, or one a user wrote without ``|``, is the replica's as it is)."""
    slices = value.split("|")
    return slices[local_rank % len(slices)]
