"""The Locust user: OpenAI chat completions with streaming, effort drawn from the profile's mix.

Each request streams (``stream_options.include_usage``), and the user times it from the events: first token
(reasoning or answer), first answer token (``content`` or a tool call: gpt-oss writes its analysis first),
time per output token, end to end; token counts come from the final usage event. Locust's own statistics
get one entry per effort for the request and one each for TTFT, answer TTFT and TPOT, so its CSVs and HTML
report show them per effort.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, ClassVar

from locust import HttpUser, between, task

from gptoss_vllm.loadtest.draws import next_request, think_time, user_rng
from gptoss_vllm.loadtest.profiles import Profile
from gptoss_vllm.loadtest.samples import Sample

_user_numbers = itertools.count()


class OpenAIChatUser(HttpUser):
    """Set ``profile``, ``model``, ``api_key``, ``samples`` and ``clock_start`` before the run starts."""

    abstract = True
    profile: ClassVar[Profile]
    model: ClassVar[str] = "gpt-oss-nano"
    api_key: ClassVar[str | None] = None
    samples: ClassVar[list[Sample]]
    clock_start: ClassVar[float] = 0.0
    seed: ClassVar[int] = 0
    wait_time = between(0, 0)

    def on_start(self) -> None:
        # The n-th user of a run draws the same efforts and prompts in every run with the same seed.
        self._rng = user_rng(self.seed, next(_user_numbers))
        self.wait_time = lambda: think_time(self._rng, self.profile)

    @task
    def chat(self) -> None:
        draw = next_request(self._rng, self.profile)
        effort = draw.effort
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": draw.prompt}],
            "reasoning_effort": effort,
            "max_tokens": self.profile.output_tokens[effort],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.profile.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension: fixed output lengths, whatever the model writes
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._stream(effort, body, headers)

    def _stream(self, effort: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        started = time.perf_counter()
        sample = Sample(effort, time.monotonic() - self.clock_start, ok=False, e2e_s=0.0)
        first = last = None
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=headers,
            stream=True,
            catch_response=True,
            name=f"chat {effort}",
        ) as response:
            sample.status = response.status_code
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {response.text[:200]}"
                response.failure(sample.error)
            else:
                try:
                    done = False
                    for line in response.iter_lines():
                        if line == b"data: [DONE]":
                            done = True
                        if not line.startswith(b"data: {"):
                            continue
                        event = json.loads(line[6:])
                        now = time.perf_counter() - started
                        for choice in event.get("choices") or []:
                            delta = choice.get("delta") or {}
                            answer = bool(delta.get("content") or delta.get("tool_calls"))
                            if answer or delta.get("reasoning") or delta.get("reasoning_content"):
                                first = now if first is None else first
                                last = now
                                if answer and sample.answer_ttft_s is None:
                                    sample.answer_ttft_s = now
                        if usage := event.get("usage"):
                            details = usage.get("completion_tokens_details") or {}
                            sample.reasoning_tokens = details.get("reasoning_tokens") or 0
                            sample.answer_tokens = usage["completion_tokens"] - sample.reasoning_tokens
                        if event.get("error"):  # an error event mid-stream (e.g. a replica lost)
                            raise RuntimeError(event["error"].get("message", "error event"))
                    # A finished stream is a success even if the model wrote nothing the parser passed on
                    # (then it has no TTFT): quality is the model's, failures are the service's.
                    sample.ok = done
                    if not done:
                        response.failure("the stream ended without [DONE]")
                except Exception as exc:  # any broken stream is a failed request
                    sample.error = f"{type(exc).__name__}: {exc}"
                    response.failure(sample.error)
        sample.e2e_s = time.perf_counter() - started
        sample.ttft_s = first
        tokens = sample.reasoning_tokens + sample.answer_tokens
        if first is not None and last is not None and tokens > 1:
            sample.tpot_s = (last - first) / (tokens - 1)
        self.samples.append(sample)
        if sample.ok:
            for kind, value in (
                ("TTFT", sample.ttft_s),
                ("answer TTFT", sample.answer_ttft_s),
                ("TPOT", sample.tpot_s),
            ):
                if value is not None:
                    self.environment.events.request.fire(
                        request_type=kind, name=effort, response_time=value * 1000, response_length=0,
                        exception=None, context={},
                    )  # fmt: skip
