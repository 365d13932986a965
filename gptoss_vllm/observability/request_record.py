"""What the ingress learns about one request as its answer passes through: timings, token counts, status.

Streams are read event by event by a :class:`StreamObserver` where they are made, in the pool replica, which
sends its :class:`Observation` to the ingress at the end, so that the ingress only forwards bytes. The first
event carrying a token gives the time to first token, the first carrying answer text or a tool call gives the
time to first answer token (gpt-oss writes its ``analysis`` channel first), and the gaps between token events
give the inter-token latency. Token counts come from the answer's ``usage``; for chat and completions streams
the ingress asks vLLM for a usage event (``stream_options.include_usage``) and drops it again when the client
did not ask for one. ``/v1/completions`` returns raw harmony text, so its tokens are counted as ``unsplit``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from gptoss_vllm.observability.metrics import NONE, IngressMetrics

# Responses API stream events that carry generated text, by what they carry.
_RESPONSES_REASONING = ("response.reasoning_text.delta", "response.reasoning_summary_text.delta")
_RESPONSES_ANSWER = ("response.output_text.delta", "response.function_call_arguments.delta")
_RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _event_with(event: bytes, payload: dict[str, Any]) -> bytes:
    """The SSE event with its data line replaced by ``payload``."""
    data = b"data: " + json.dumps(payload, ensure_ascii=False).encode()
    return b"\n".join(data if line.startswith(b"data: ") else line for line in event.split(b"\n"))


def request_usage(endpoint: str, body: dict[str, Any]) -> bool:
    """Make a chat/completions stream end with a usage event; True if the client did not ask for it."""
    if endpoint not in ("chat", "completions") or not body.get("stream"):
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


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


class StreamObserver:
    """Reads an answer as it passes: an event stream chunk by chunk, or a whole JSON body.

    It runs where the events are made (the pool replica, so that the ingress only forwards bytes) and drops
    the usage event the ingress asked for on the client's behalf (``strip_usage``).
    """

    def __init__(
        self,
        endpoint: str,
        strip_usage: bool = False,
        response_fields: dict[str, Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.strip_usage = strip_usage
        # Fields of every Responses object to set as the client's request had them (the engine saw others).
        self.response_fields = response_fields
        self.finished_response: bytes | None = None  # the terminal event's response object, once seen
        self.started = time.monotonic()
        self.seen = Observation()
        self._last_token: float | None = None
        self._pending = b""

    def relay(self, chunk: bytes) -> bytes:
        """Observe a chunk of an event stream; returns what the client gets (without a forced usage event)."""
        self._pending += chunk
        *events, self._pending = self._pending.split(b"\n\n")
        kept = []
        for event in events:
            if (observed := self._observe_event(event)) is not None:
                kept.append(observed + b"\n\n")
        return b"".join(kept)

    def flush(self) -> bytes:
        """Whatever the stream ended with that was not a complete event."""
        pending, self._pending = self._pending, b""
        return pending

    def observe_body(self, content: bytes) -> bytes:
        """Observe a whole (non-streamed) JSON answer; returns it as the client gets it."""
        try:
            answer = json.loads(content)
        except ValueError:
            return content
        if isinstance(answer, dict):
            self._read_usage(answer.get("usage"))
            if self.endpoint == "responses" and isinstance(answer.get("id"), str):
                self.seen.response_id = answer["id"]
                if self.response_fields is not None and answer.get("object") == "response":
                    answer.update(self.response_fields)
                    content = json.dumps(answer, ensure_ascii=False).encode()
                    self.finished_response = content
        return content

    def _observe_event(self, event: bytes) -> bytes | None:
        """The event as the client gets it, or None to drop it."""
        data = next((line[6:] for line in event.split(b"\n") if line.startswith(b"data: ")), None)
        if data is None or data == b"[DONE]":
            return event
        try:
            payload = json.loads(data)
        except ValueError:
            return event
        if not isinstance(payload, dict):
            return event
        if self.endpoint == "responses":
            kind = payload.get("type", "")
            if kind in _RESPONSES_REASONING:
                self._token(answer=False)
            elif kind in _RESPONSES_ANSWER:
                self._token(answer=True)
            elif isinstance(payload.get("response"), dict):
                response = payload["response"]
                if self.seen.response_id is None and isinstance(response.get("id"), str):
                    self.seen.response_id = response["id"]
                if kind == "response.completed":
                    self._read_usage(response.get("usage"))
                if self.response_fields is not None:
                    response.update(self.response_fields)
                    if kind in _RESPONSES_TERMINAL:
                        self.finished_response = json.dumps(response, ensure_ascii=False).encode()
                    return _event_with(event, payload)
            return event
        choices = payload.get("choices") or []
        for choice in choices:
            delta = choice.get("delta") or {}
            if self.endpoint == "completions":
                if choice.get("text"):
                    self._token(answer=None)
            elif delta.get("content") or delta.get("tool_calls"):
                self._token(answer=True)
            elif delta.get("reasoning") or delta.get("reasoning_content"):
                self._token(answer=False)
        if payload.get("usage"):
            self._read_usage(payload["usage"])
            if not choices and self.strip_usage:
                return None
        return event

    def _token(self, answer: bool | None) -> None:
        now = time.monotonic()
        seen = self.seen
        if seen.first_token_s is None:
            seen.first_token_s = now - self.started
        elif self._last_token is not None:
            seen.gaps_s.append(now - self._last_token)
        self._last_token = now
        if answer and seen.first_answer_s is None:
            seen.first_answer_s = now - self.started

    def _read_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        output = usage.get("completion_tokens", usage.get("output_tokens"))
        details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
        if isinstance(prompt, int):
            self.seen.prompt_tokens = prompt
        if isinstance(output, int):
            self.seen.output_tokens = output
        if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
            self.seen.reasoning_tokens = details["reasoning_tokens"]


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
