"""The pool replica's reading of an answer as it passes: timings, token counts, the finished Responses object.

The first event carrying a token gives the time to first token, the first carrying answer text or a tool call
gives the time to first answer token (gpt-oss writes its ``analysis`` channel first), and the gaps between token
events give the inter-token latency. Token counts come from the answer's ``usage``; for chat and completions
streams the ingress asks vLLM for a usage event (:mod:`gptoss_vllm.serve.ingress.usage_event`) and the observer
drops it again when the client did not ask for one. ``/v1/completions`` returns raw harmony text, so its tokens
are counted as ``unsplit``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gptoss_vllm.observability.request_record import Observation

# Responses API stream events that carry generated text, by what they carry.
_RESPONSES_REASONING = ("response.reasoning_text.delta", "response.reasoning_summary_text.delta")
_RESPONSES_ANSWER = ("response.output_text.delta", "response.function_call_arguments.delta")
_RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _event_with(event: bytes, payload: dict[str, Any]) -> bytes:
    """The SSE event with its data line replaced by ``payload``."""
    data = b"data: " + json.dumps(payload, ensure_ascii=False).encode()
    return b"\n".join(data if line.startswith(b"data: ") else line for line in event.split(b"\n"))


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
