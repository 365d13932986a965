"""The hook Ray Serve's HTTP proxy loads (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the gate's middleware."""

from __future__ import annotations

import logging
from typing import Any

from gptoss_vllm.serve.proxy.gate import ProxyGate
from gptoss_vllm.serve.proxy.metrics import proxy_counter

log = logging.getLogger("ray.serve")


def middlewares() -> list[Any]:
    """Ray Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    gate = Middleware(ProxyGate, count=proxy_counter())
    probe = ProxyGate(lambda *_: None)  # settings errors surface in the proxy's log at start, by name
    shape = probe.shape
    log.info(
        "gptoss proxy gate: bodies up to %d bytes within %g s, headers up to %d bytes; JSON up to %d deep, "
        "%d members per object, %d items per array, strings up to %d bytes, words up to %d bytes",
        probe.max_body_bytes,
        probe.body_timeout_s,
        probe.max_header_bytes,
        shape.max_depth,
        shape.max_object_members,
        shape.max_array_items,
        shape.max_string_bytes,
        shape.max_word_bytes,
    )
    return [gate]
