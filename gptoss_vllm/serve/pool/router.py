"""Ray Serve request routers for pools: power-of-two choices here, prefix-aware in ``prefix_router``; each tells
the ingress how many replicas it routes to.

The routers live in the calling process (the ingress) and hear of every replica change from Ray Serve's long
poll, so the ingress's admission reads :func:`routable_replicas` and needs no polling of the Serve controller.
Any replica of a pool serves any request of it: conversations live in the ingress's store, not in replicas.
"""

from __future__ import annotations

import importlib
import sys

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

# Ray Serve LLM's package imports vLLM and torch (seconds, and hundreds of MB): only a process that routes a
# prefix-aware pool loads it, through this module's path.
PREFIX_ROUTER_MODULE = "gptoss_vllm.serve.pool.prefix_router"


# (app, deployment) -> replicas the router in this process can route to; written from Ray Serve's router loop.
_ROUTABLE: dict[tuple[str, str], int] = {}


def routable_replicas(app: str, deployment: str) -> int | None:
    """The replicas this process's router of that deployment routes to; None until it has heard of them."""
    return _ROUTABLE.get((app, deployment))


class Counting:
    """Publishes the number of routable replicas whenever the router's set changes; routes by its base."""

    def update_replicas(self, replicas):  # type: ignore[no-untyped-def]
        result = super().update_replicas(replicas)  # type: ignore[misc]
        self._publish()
        return result

    def on_replica_actor_died(self, replica_id):  # type: ignore[no-untyped-def]
        result = super().on_replica_actor_died(replica_id)  # type: ignore[misc]
        self._publish()
        return result

    def _publish(self) -> None:
        # Through sys.modules: Ray Serve may ship this class by value, with a copy of this module's globals.
        module = sys.modules.get(__name__)
        if module is None:  # a process that routes but never reads the counts
            return
        deployment = self._deployment_id  # type: ignore[attr-defined]
        module._ROUTABLE[(deployment.app_name, deployment.name)] = len(self.curr_replicas)  # type: ignore[attr-defined]


class CountingPowerOfTwoRouter(Counting, PowerOfTwoChoicesRequestRouter):
    """Power-of-two choices on queue length (Ray Serve's default)."""


def router_class_path(router: str) -> str:
    """The import path Ray Serve loads for a pool's ``router`` setting; the prefix-aware one is imported here
    first, so that a router this machine cannot load fails the config, not the first request."""
    if router == "prefix_aware":
        try:
            importlib.import_module(PREFIX_ROUTER_MODULE)
        except ImportError as exc:
            raise ImportError(f"the prefix_aware router cannot be loaded here: {exc}") from None
        return f"{PREFIX_ROUTER_MODULE}:CountingPrefixAwareRouter"
    return f"{__name__}:CountingPowerOfTwoRouter"
