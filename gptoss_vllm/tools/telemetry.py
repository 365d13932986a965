"""What a tool server reports of each call: a Prometheus counter and histogram by tool and outcome, and an
OpenTelemetry span (when tracing is on, by the standard ``OTEL_*`` variables)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gptoss_vllm.observability.tracing import tracer

CALL_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Call:
    """One call in progress; the tool sets its outcome (``ok``, ``error``, ``timeout``, ...)."""

    outcome: str = "error"


class ToolTelemetry:
    """A tool server's metrics (its own registry, served at ``/metrics``) and tracer."""

    def __init__(self, server: str) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "gptoss_tool_calls",
            "Tool calls by tool and outcome",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "gptoss_tool_call_seconds",
            "Duration of tool calls by tool and outcome",
            ["tool", "outcome"],
            buckets=CALL_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._tracer = tracer(f"gptoss_vllm.tools.{server}", f"{socket.gethostname()}-{os.getpid()}")

    @contextlib.contextmanager
    def call(self, tool: str) -> Iterator[Call]:
        call = Call()
        started = time.monotonic()
        span = (
            self._tracer.start_as_current_span(f"tool {tool}") if self._tracer else contextlib.nullcontext()
        )
        with span as current:
            try:
                yield call
            finally:
                elapsed = time.monotonic() - started
                self.calls.labels(tool, call.outcome).inc()
                self.seconds.labels(tool, call.outcome).observe(elapsed)
                if current is not None:
                    current.set_attribute("gptoss.tool", tool)
                    current.set_attribute("gptoss.tool.outcome", call.outcome)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
