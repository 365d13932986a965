"""What the ingress learns about one request as its answer passes through: timings, token counts, status.

The pool replica reads the answer's bytes where they are made
(:class:`~gptoss_vllm.serve.pool.stream_observer.StreamObserver`) and sends its :class:`Observation` to the
ingress at the end, so that the ingress only forwards bytes; the ingress's :class:`RequestRecord` takes it and
turns it, with the request's effort, pool and status, into metrics and the request's span.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gptoss_vllm.observability.metrics import NONE, IngressMetrics


@dataclass
class Observation:
    """What one answer's bytes said; times are seconds after the observer started."""

    first_token_s: float | None = None
    first_answer_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    response_id: str | None = None


class RequestRecord:
    """Collects one request's observations and writes them to the metrics (and its span) once, at the end."""

    def __init__(self, metrics: IngressMetrics, endpoint: str, span: Any | None = None) -> None:
        self._metrics = metrics
        self.span = span
        self.started = time.monotonic()
        self.endpoint = endpoint
        self.effort = NONE
        self.effort_source = NONE
        self.pool = NONE
        self.status = 0
        self.rejected: str | None = None  # the rejection reason, when the ingress refused the request
        self.replica: str | None = None
        self.spilled_from: str | None = None
        self.admission_span: Any | None = None
        self.engine_span: Any | None = None
        self._seen = Observation()
        self._origin = self.started  # when, on this process's clock, the observer started
        self._finished = False

    # -- what the answer said --------------------------------------------------------------------------------

    def take(self, seen: Observation, origin: float) -> None:
        """The observation of the answer, made elsewhere (the pool replica) from ``origin`` on this clock."""
        self._seen, self._origin = seen, origin

    @property
    def prompt_tokens(self) -> int | None:
        return self._seen.prompt_tokens

    @property
    def output_tokens(self) -> int | None:
        return self._seen.output_tokens

    @property
    def reasoning_tokens(self) -> int | None:
        return self._seen.reasoning_tokens

    @property
    def response_id(self) -> str | None:
        return self._seen.response_id

    # -- the end ---------------------------------------------------------------------------------------------

    @property
    def time_to_first_token_s(self) -> float | None:
        first = self._seen.first_token_s
        return None if first is None else self._origin + first - self.started

    @property
    def time_to_first_answer_token_s(self) -> float | None:
        first = self._seen.first_answer_s
        return None if first is None else self._origin + first - self.started

    def finish(self, status: int | None = None) -> None:
        """Write the observations (once; later calls do nothing)."""
        if self._finished:
            return
        self._finished = True
        if status is not None:
            self.status = status
        m = self._metrics
        m.requests.labels(self.endpoint, self.effort, self.effort_source, self.pool, str(self.status)).inc()
        latency = (self.endpoint, self.effort, self.pool)
        m.request_duration.labels(*latency).observe(time.monotonic() - self.started)
        if self.rejected is not None:
            m.rejections.labels(self.rejected, self.pool).inc()
        if (ttft := self.time_to_first_token_s) is not None:
            m.time_to_first_token.labels(*latency).observe(ttft)
        if (ttfa := self.time_to_first_answer_token_s) is not None:
            m.time_to_first_answer_token.labels(*latency).observe(ttfa)
        if self._seen.gaps_s:
            histogram = m.inter_token_latency.labels(*latency)
            for gap in self._seen.gaps_s:
                histogram.observe(gap)
        if self.prompt_tokens is not None:
            m.prompt_tokens.labels(self.effort, self.pool).inc(self.prompt_tokens)
        if self.output_tokens is not None:
            if self.endpoint == "completions":
                m.output_tokens.labels(self.effort, self.pool, "unsplit").inc(self.output_tokens)
            else:
                reasoning = min(self.reasoning_tokens or 0, self.output_tokens)
                m.output_tokens.labels(self.effort, self.pool, "reasoning").inc(reasoning)
                m.output_tokens.labels(self.effort, self.pool, "answer").inc(self.output_tokens - reasoning)
        self.end_admission()
        if self.engine_span is not None:
            self.engine_span.set_attribute("gptoss.replica", self.replica or NONE)
            self.engine_span.end()
        if self.span is not None:
            self._end_span()

    def end_admission(self) -> None:
        if self.admission_span is not None:
            if self.rejected is not None:
                self.admission_span.set_attribute("gptoss.rejected", self.rejected)
            self.admission_span.end()
            self.admission_span = None

    def _end_span(self) -> None:
        from opentelemetry.trace import Status, StatusCode

        attributes = {
            "http.response.status_code": self.status,
            "gptoss.endpoint": self.endpoint,
            "gptoss.effort": self.effort,
            "gptoss.effort_source": self.effort_source,
            "gptoss.pool": self.pool,
        }
        for name, value in (
            ("gen_ai.usage.input_tokens", self.prompt_tokens),
            ("gen_ai.usage.output_tokens", self.output_tokens),
            ("gptoss.usage.reasoning_tokens", self.reasoning_tokens),
            ("gptoss.replica", self.replica),
            ("gptoss.spilled_from", self.spilled_from),
            ("gptoss.rejected", self.rejected),
            ("gptoss.time_to_first_token_s", self.time_to_first_token_s),
            ("gptoss.time_to_first_answer_token_s", self.time_to_first_answer_token_s),
        ):
            if value is not None:
                attributes[name] = value
        if self.output_tokens is not None and self.endpoint != "completions":
            attributes["gptoss.usage.answer_tokens"] = self.output_tokens - min(
                self.reasoning_tokens or 0, self.output_tokens
            )
        self.span.set_attributes(attributes)
        if self.status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, f"HTTP {self.status}"))
        self.span.end()
