"""An ingress's metrics in a registry of their own, and their samples as a test reads them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.request_record import RequestRecord


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """Every sample, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def new_record(endpoint: str = "chat") -> tuple[RequestRecord, CollectorRegistry]:
    """A request's record (effort high, pool deep) writing into a registry of its own."""
    registry = CollectorRegistry()
    record = RequestRecord(IngressMetrics(registry), endpoint)
    record.effort, record.effort_source, record.pool = "high", "chat", "deep"
    return record, registry
