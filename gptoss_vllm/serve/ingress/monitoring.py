"""The monitoring token: what Prometheus presents to read the replicas' metrics endpoints from
``GET /metrics/targets`` (they are internal addresses); to anyone else the route does not exist."""

from __future__ import annotations

import hmac
import logging

from gptoss_vllm import envs
from gptoss_vllm.serve.ingress.keys import bearer_token

log = logging.getLogger("ray.serve")


class MonitoringToken:
    """The token from ``$env``; without one, the route is off (and the log says how to turn it on)."""

    def __init__(self, env: str) -> None:
        self._token = (envs.lookup(env) or "").strip().encode() or None
        if self._token is None:
            log.warning("GET /metrics/targets is off: set $%s to the token Prometheus sends", env)

    def presented_in(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (compared in constant time)."""
        token = bearer_token(authorization)
        return (
            self._token is not None
            and token is not None
            and hmac.compare_digest(token.encode("latin-1", "replace"), self._token)
        )
