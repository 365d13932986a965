"""Ray Serve request routers for pools: power-of-two choices or prefix-aware, both with replica pinning.

vLLM keeps stored Responses in the replica that produced them, so a ``previous_response_id`` follow-up must
reach that replica. The ingress marks such requests with the replica's id; every other request is routed by
Ray Serve's own policy unchanged.

The routers also say how many replicas they can route to (:func:`routable_replicas`): they live in the calling
process (the ingress) and hear of every change from Ray Serve's long poll, so the ingress's admission needs
no polling of the Serve controller.
"""

from __future__ import annotations

import sys
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

try:  # Ray Serve LLM's prefix-cache router; its module needs pyarrow (the [serve] extra installs it).
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter
except ImportError as exc:  # pragma: no cover - only without pyarrow
    PrefixCacheAffinityRouter = None
    PREFIX_AWARE_IMPORT_ERROR: str | None = str(exc)
else:
    PREFIX_AWARE_IMPORT_ERROR = None


# (app, deployment) -> replicas the router in this process can route to; written from Ray Serve's router loop.
_ROUTABLE: dict[tuple[str, str], int] = {}


def routable_replicas(app: str, deployment: str) -> int | None:
    """The replicas this process's router of that deployment routes to; None until it has heard of them."""
    return _ROUTABLE.get((app, deployment))


def _pinned_replica(pending_request: Any) -> str | None:
    if pending_request is None:
        return None
    for arg in pending_request.args:
        replica_id = getattr(arg, "replica_id", None)
        if replica_id:
            return replica_id
    return None


class _Pinning:
    """Sends a request pinned to a running replica there; anything else to the policy of the next base."""

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

    async def choose_replicas(self, candidate_replicas, pending_request=None):  # type: ignore[no-untyped-def]
        pinned = _pinned_replica(pending_request)
        if pinned is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == pinned:
                    return [[replica]]
        return await super().choose_replicas(candidate_replicas, pending_request)  # type: ignore[misc]


class PinnedPowerOfTwoRouter(_Pinning, PowerOfTwoChoicesRequestRouter):
    """Power-of-two choices on queue length (Ray Serve's default), plus pinning."""


if PrefixCacheAffinityRouter is not None:

    class PinnedPrefixAwareRouter(_Pinning, PrefixCacheAffinityRouter):
        """Prefix-cache affinity (Ray Serve LLM's router), plus pinning."""


def router_class_path(router: str) -> str:
    """The import path Ray Serve loads for a pool's ``router`` setting."""
    if router == "prefix_aware":
        if PREFIX_AWARE_IMPORT_ERROR is not None:
            raise ImportError(f"the prefix_aware router cannot be loaded here: {PREFIX_AWARE_IMPORT_ERROR}")
        return f"{__name__}:PinnedPrefixAwareRouter"
    return f"{__name__}:PinnedPowerOfTwoRouter"
