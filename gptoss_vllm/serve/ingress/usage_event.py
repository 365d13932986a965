"""Chat and completions streams end with a usage event, asked of vLLM on the client's behalf: the ingress
counts every answer's tokens (metrics, per-key tokens per minute), and the pool drops the event again for a
client that did not ask for it."""

from __future__ import annotations

from typing import Any


def request_usage(endpoint: str, body: dict[str, Any]) -> bool:
    """Make a chat/completions stream end with a usage event; True if the client did not ask for it."""
    if endpoint not in ("chat", "completions") or not body.get("stream"):
        return False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True
