"""The usage event the ingress asks vLLM for on a client's behalf."""

from __future__ import annotations

from gptoss_vllm.serve.ingress.usage_event import request_usage


def test_request_usage_is_forced_on_streams_and_remembered():
    body = {"stream": True}
    assert request_usage("chat", body) and body["stream_options"] == {"include_usage": True}
    asked = {"stream": True, "stream_options": {"include_usage": True}}
    assert not request_usage("chat", asked)
    assert not request_usage("chat", {"stream": False})
    assert not request_usage("responses", {"stream": True})  # its completed event always carries usage
