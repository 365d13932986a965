"""How many replicas each pool has running, as admission counts them, and when a pool cold-starts.

The counts come from the pools' routers in this process once they have heard from Ray Serve's long poll
(:func:`~gptoss_vllm.serve.pool.router.routable_replicas`); until then (a router is built on its handle's first
use) from the Serve controller, whose full status is costly to build and read.
"""

from __future__ import annotations

import asyncio
import logging

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.serve.app_names import pool_app_name
from gptoss_vllm.serve.config import IngressView
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.pool.router import routable_replicas

log = logging.getLogger("ray.serve")

POOL_STATUS_PERIOD_S = 1.0
ROUTER_READ_PERIOD_S = 0.2  # a dict read: cheap


class PoolWatcher:
    """Keeps ``admission.running`` for every pool beside the ingress application ``app_name`` while it runs."""

    def __init__(
        self, config: IngressView, admission: Admission, metrics: IngressMetrics, app_name: str
    ) -> None:
        self._config = config
        self._admission = admission
        self._metrics = metrics
        self._app_name = app_name
        self._heard: set[str] = set()
        self._seen_at_zero: set[str] = set()  # pools seen idle at zero (after they ran)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        from ray import serve

        while True:
            unheard = []
            for name in self._config.pools:
                count = routable_replicas(pool_app_name(name, self._app_name), name)
                if count is None:
                    unheard.append(name)
                else:
                    self.set_running(name, count)
                    if name not in self._heard:
                        self._heard.add(name)
                        log.info("pool %s: running replicas now read from its router (%d)", name, count)
            if unheard:
                try:
                    status = await asyncio.to_thread(serve.status)
                    for name in unheard:
                        pool_app = status.applications.get(pool_app_name(name, self._app_name))
                        deployment = pool_app.deployments.get(name) if pool_app else None
                        states = deployment.replica_states if deployment else {}
                        self.set_running(name, int(states.get("RUNNING", 0)))
                except Exception as exc:  # the controller restarting: keep the last known counts
                    log.warning("could not read pool status from the Serve controller: %s", exc)
            await asyncio.sleep(POOL_STATUS_PERIOD_S if unheard else ROUTER_READ_PERIOD_S)

    def set_running(self, pool: str, count: int) -> None:
        previous = self._admission.running[pool]
        self._admission.running[pool] = count
        # Seen at zero first: a pool's first replicas at the deploy are not a cold start.
        if previous == 0 and count > 0 and pool in self._seen_at_zero:
            self._metrics.cold_starts.labels(pool).inc()
            log.info("pool %s: cold start, %d replica(s) running", pool, count)
        if count == 0 and self._config.pools[pool].scales_from_zero:
            self._seen_at_zero.add(pool)

    def readiness(self) -> tuple[bool, dict[str, dict[str, object]]]:
        """Every pool's state for ``/ready``: ready while each has a running replica, or scales from zero and
        can start one."""
        pools = {
            name: {
                "state": self._admission.pool_state(name),
                "running_replicas": self._admission.running[name],
                "min_replicas": pool.min_replicas,
            }
            for name, pool in self._config.pools.items()
        }
        return all(pool["state"] != "no_replica" for pool in pools.values()), pools

    def stop(self) -> None:
        self._task.cancel()
