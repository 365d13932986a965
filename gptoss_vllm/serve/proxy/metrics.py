"""The proxy gate's count of what it refused and of uploads clients abandoned: ``gptoss_requests_total`` with the
endpoint ``upload``, from a metrics endpoint of the proxy process (``component=proxy``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def proxy_counter() -> Callable[[int], None] | None:
    """``gptoss_requests_total`` of this proxy process, on its own announced metrics endpoint (lazily: the
    endpoint needs the proxy's running event loop)."""
    from prometheus_client import CollectorRegistry

    from gptoss_vllm.observability.metrics import NONE, IngressMetrics

    registry = CollectorRegistry()
    metrics = IngressMetrics(registry)
    started: list[Any] = []

    def count(status: int) -> None:
        if not started:
            import ray

            from gptoss_vllm.observability.targets import MetricsEndpoint

            node = ray.get_runtime_context().get_node_id()[:12]
            started.append(MetricsEndpoint({"component": "proxy", "replica": f"proxy-{node}"}, registry))
        metrics.requests.labels("upload", NONE, NONE, NONE, str(status)).inc()

    return count
