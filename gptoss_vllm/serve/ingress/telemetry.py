"""The ingress's telemetry: its metric series, its metrics endpoint, and each request's record and spans.

Every series a panel or an alert reads exists from the start (at 0): a store that never failed still has a
failure rate of 0, and a pool that never scaled to zero has a cold-start count of 0.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response

from gptoss_vllm.observability.metrics import IngressMetrics
from gptoss_vllm.observability.request_record import RequestRecord
from gptoss_vllm.observability.targets import MetricsEndpoint
from gptoss_vllm.observability.tracing import ingress_tracer
from gptoss_vllm.refusal_reasons import SERVICE_REASONS
from gptoss_vllm.serve.config import IngressView
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.ingress.pipeline import Decision
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.openai_errors import error_response
from gptoss_vllm.serve.pool.deployment import PoolRequest

log = logging.getLogger("ray.serve")


class IngressTelemetry:
    """One ingress replica's metrics (``metrics``), served on its own endpoint, and its tracer."""

    def __init__(self, config: IngressView, admission: Admission, replica: str, app_name: str) -> None:
        registry = CollectorRegistry()
        self.metrics = metrics = IngressMetrics(registry)
        backend = config.response_store.backend
        for result in ("hit", "miss"):
            metrics.store_lookups.labels(backend, result)
        for reason in ("ttl", "size"):
            metrics.store_evictions.labels(backend, reason)
        for operation in ("get", "put", "delete", "count"):
            metrics.store_errors.labels(backend, operation)
        for name, pool in config.pools.items():
            # Read at scrape time, so the gauges never lag the admission counts.
            metrics.in_flight.labels(name).set_function(lambda n=name: admission.in_flight[n])
            metrics.queue_depth.labels(name).set_function(lambda n=name: admission.queue_depth(n))
            metrics.running_replicas.labels(name).set_function(lambda n=name: admission.running[n])
            metrics.peer_in_flight.labels(name).set_function(
                lambda n=name: admission.peer_in_flight.get(n, 0)
            )
            metrics.queue_limit.labels(name).set(pool.max_queued_requests)
            metrics.min_replicas.labels(name).set(pool.min_replicas)
            metrics.cold_starts.labels(name)
            for outcome in ("served", "timed_out"):
                metrics.cold_start_hold.labels(name, outcome)
        labels = {"component": "ingress", "replica": replica, "app": app_name}
        self._endpoint = MetricsEndpoint(labels, registry)
        self._tracer = ingress_tracer(replica)

    def keys_reloaded(self, loaded: bool, in_force: int) -> None:
        """The key ring's report after each reload attempt."""
        self.metrics.api_keys.set(in_force)
        if not loaded:
            self.metrics.api_keys_reload_failures.inc()

    def record(self, endpoint: str, request: Request) -> RequestRecord:
        """Start observing a request: its metrics record and, when tracing is on, its server span."""
        if self._tracer is None:
            return RequestRecord(self.metrics, endpoint)
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(dict(request.headers))
        span = self._tracer.start_span(
            f"{request.method} {request.url.path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "url.path": request.url.path},
        )
        record = RequestRecord(self.metrics, endpoint, span)
        # Auth, effort, budget and the queue decision; ends when the pool is called or the request refused.
        record.admission_span = self._tracer.start_span("admission", context=set_span_in_context(span))
        return record

    def decided(self, record: RequestRecord, decision: Decision) -> None:
        """A request the pipeline admitted: its effort, and a budget it was clamped to."""
        assert decision.effort is not None
        record.effort, record.effort_source = decision.effort.effort, decision.effort.source
        if decision.clamped_from is not None:
            self.metrics.budget_clamps.labels(decision.effort.effort).inc()

    def start_engine_span(self, record: RequestRecord, pool_request: PoolRequest) -> None:
        """A child span for the pool call, whose context vLLM's engine span continues (``traceparent``)."""
        if record.span is None or self._tracer is None:
            return
        from opentelemetry.trace import SpanKind, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        record.end_admission()
        record.engine_span = self._tracer.start_span(
            "engine", context=set_span_in_context(record.span), kind=SpanKind.CLIENT,
            attributes={"gptoss.pool": record.pool},
        )  # fmt: skip
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(record.engine_span))
        kept = [(k, v) for k, v in pool_request.headers if k not in ("traceparent", "tracestate")]
        pool_request.headers = kept + list(carrier.items())

    @staticmethod
    def finished(record: RequestRecord, response: Response, client_error: str | None = None) -> Response:
        """Close the record of a request answered without a stream; a 4xx the ingress did not classify
        (vLLM's own validation) counts as the ``client_error`` rejection reason."""
        status = response.status_code
        if status < 400:
            record.rejected = None
        elif record.rejected is None and status < 500:
            record.rejected = client_error
        record.finish(status)
        return response

    @staticmethod
    def refused(record: RequestRecord, decision: Decision, refusal: Refusal) -> Response:
        """Answer and record a refusal, where the pipeline got to (effort, pool) before it."""
        if decision.effort is not None:
            record.effort, record.effort_source = decision.effort.effort, decision.effort.source
        record.pool = decision.pool or record.pool
        record.rejected = refusal.reason.value
        if refusal.reason in SERVICE_REASONS:
            log.info("refused %s request (pool %s): %s", record.endpoint, record.pool, refusal.reason)
        answer = error_response(
            refusal.status,
            refusal.message,
            param=refusal.param,
            code=refusal.code,
            headers=decision.headers | refusal.headers,
        )
        record.finish(refusal.status)
        return answer

    def close(self) -> None:
        self._endpoint.close()
