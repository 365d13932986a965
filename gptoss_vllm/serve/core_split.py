"""One CPU machine serving every pool (``serve`` on its own Ray): each pool's engines get cores of their own.

vLLM's automatic OpenMP binding on a CPU pins an engine's worker to the first cores of the machine, whatever
else runs there: the pools of one machine then share those cores while the others idle (on 2 cores, both
engines of the embedded default ran on core 0). In local mode each CPU pool gets a disjoint slice of the cores
this process may use, as ``VLLM_CPU_OMP_THREADS_BIND``, unless its ``env`` sets the binding itself. On a
cluster each pool has nodes of its own, and vLLM's default holds there.
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
    """``config`` with each splittable pool bound to its own slice of ``cores`` (equal slices, in pool order);
    unchanged when fewer than two pools can be split or there are fewer cores than pools."""
    names = [name for name, pool in config.pools.items() if _splittable(pool)]
    if len(names) < 2 or len(cores) < len(names):
        return config
    share = len(cores) // len(names)
    pools = dict(config.pools)
    for index, name in enumerate(names):
        mine = cores[index * share : (index + 1) * share]
        pools[name] = pools[name].model_copy(
            update={"env": {**pools[name].env, BIND_ENV: ",".join(map(str, mine))}}
        )
    return config.model_copy(update={"pools": pools})
