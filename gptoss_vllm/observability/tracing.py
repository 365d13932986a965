"""OpenTelemetry tracing of the ingress, configured only by the standard ``OTEL_*`` environment variables.

Off unless an OTLP traces endpoint is set (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``) and ``OTEL_SDK_DISABLED`` is not true; when off, the ingress holds ``None``
instead of a tracer and no span object is ever made. Pools hand the same endpoint to vLLM
(``otlp_traces_endpoint``), whose engine span joins the trace through the ``traceparent`` header the ingress
forwards.
"""

from __future__ import annotations

import os
from typing import Any

from gptoss_vllm.observability import ObservabilityError

SERVICE_NAME = "gptoss-vllm"
PROTOCOLS = ("grpc", "http/protobuf")


class TracingConfigError(ObservabilityError, ValueError):
    """An ``OTEL_*`` variable has a value the exporters cannot use."""


def traces_endpoint() -> str | None:
    """The OTLP endpoint traces go to, or None when tracing is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint:
        return endpoint
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base:
        return None
    # The generic endpoint is a base URL for HTTP (signal path appended, per the spec), as-is for gRPC.
    return base.rstrip("/") + "/v1/traces" if traces_protocol() == "http/protobuf" else base


def traces_protocol() -> str:
    """The OTLP protocol for traces; vLLM reads only the traces-specific variable, so both use this one."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    if protocol not in PROTOCOLS:
        raise TracingConfigError(
            f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL={protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}"
        )
    return protocol


def engine_tracing_env() -> dict[str, str]:
    """What a pool process needs so that vLLM exports to the same place with the same protocol."""
    endpoint = traces_endpoint()
    if endpoint is None:
        return {}
    return {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": traces_protocol(),
    }


def ingress_tracer(replica: str) -> Any | None:
    """The ingress replica's tracer, or None when tracing is off."""
    return tracer("gptoss_vllm.ingress", replica)


def tracer(name: str, instance: str) -> Any | None:
    """A tracer exporting by OTLP in batches for the process ``instance``, or None when tracing is off."""
    endpoint = traces_endpoint()
    if endpoint is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if traces_protocol() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are honoured by Resource.create.
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME),
                                "service.instance.id": instance})  # fmt: skip
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider.get_tracer(name)
