"""Observability: the ingress's Prometheus metrics, metrics-target discovery, tracing, local Prometheus."""


class ObservabilityError(Exception):
    """Every error of ``gptoss_vllm.observability``: metrics, tracing or Prometheus cannot be set up as asked."""
