"""Observability: the ingress's Prometheus metrics, metrics-target discovery, tracing, local Prometheus."""
