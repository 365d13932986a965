"""The proxy gate as Ray Serve's proxy runs it: an ASGI middleware, driven here with raw ASGI messages (the
stack tests send the same through the real proxy)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gptoss_vllm.serve.body_shape import ShapeLimits
from gptoss_vllm.serve.proxy.gate import ProxyGate
from gptoss_vllm.serve.proxy.settings import CALLBACK, GateError, gate_env


class _App:
    """The inner app (Ray's proxy): records what reached it, answers 200, or what ``answer`` says."""

    def __init__(self, answer: list[dict] | None = None) -> None:
        self.scope: dict | None = None
        self.body = b""
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        self.scope = scope
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        for message in self.answer or [
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            },
            {"type": "http.response.body", "body": b"{}"},
        ]:
            await send(message)


async def _call(gate: ProxyGate, headers: list[tuple[bytes, bytes]], chunks, pause_s: float = 0.0):
    """Send ``chunks`` (bytes, "disconnect", or "stall": nothing more) ``pause_s`` apart; returns (status,
    headers, body)."""
    queue: list = list(chunks)
    sent: list[dict] = []

    async def receive() -> dict:
        if not queue:
            await asyncio.sleep(3600)  # a client that waits for the answer
        await asyncio.sleep(pause_s)
        chunk = queue.pop(0)
        if chunk == "stall":
            await asyncio.sleep(3600)
        if chunk == "disconnect":
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    await asyncio.wait_for(gate(scope, receive, send), 10)
    if not sent:
        return None, {}, b""
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def _gate(app=None, counted=None, **bounds) -> ProxyGate:
    settings = {"max_body_bytes": 1000, "max_header_bytes": 2048, "body_timeout_s": 0.5} | bounds
    return ProxyGate(app or _App(), count=(counted.append if counted is not None else None), **settings)


def _error(body: bytes) -> dict:
    return json.loads(body)["error"]


def test_a_whole_body_reaches_the_proxy_without_ray_serves_control_headers():
    app = _App()
    headers = [
        (b"content-type", b"application/json"),
        (b"x-request-timeout-seconds", b"0"),
        (b"X-Request-Disconnect-Disabled", b"?1"),
        (b"x-session-id", b"pin-me"),
        (b"x-request-id", b"kept"),
    ]
    status, _, _ = asyncio.run(_call(_gate(app), headers, [b'{"a": ', b"1}"]))
    assert status == 200 and app.body == b'{"a": 1}'
    assert [k.lower() for k, _ in app.scope["headers"]] == [b"content-type", b"x-request-id"]


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read():
    app, counted = _App(), []
    status, headers, body = asyncio.run(_call(_gate(app, counted), [(b"content-length", b"5000")], []))
    assert status == 413 and _error(body)["code"] == "body_too_large" and "1000" in _error(body)["message"]
    assert headers[b"content-type"] == b"application/json"
    assert app.scope is None and counted == [413]
    status, _, body = asyncio.run(_call(_gate(), [(b"content-length", b"12x")], []))
    assert status == 400 and _error(body)["type"] == "invalid_request_error"


def test_a_chunked_body_is_cut_off_at_the_limit():
    app = _App()
    status, _, body = asyncio.run(_call(_gate(app), [], [b"x" * 600, b"x" * 600, b"never read"]))
    assert status == 413 and _error(body)["code"] == "body_too_large" and app.scope is None


def test_a_stalled_or_trickling_body_is_408_after_the_deadline():
    counted: list[int] = []
    status, _, body = asyncio.run(_call(_gate(counted=counted), [], [b"{", "stall"]))
    assert status == 408 and _error(body)["code"] == "request_timeout"
    status, _, _ = asyncio.run(
        _call(_gate(counted=counted), [], [b"x"] * 20, pause_s=0.05)
    )  # 1 s; 0.5 allowed
    assert status == 408 and counted == [408, 408]


def test_a_body_over_its_shape_is_400_naming_the_bound_and_path_before_the_ingress_sees_it():
    app, counted = _App(), []
    gate = _gate(
        app,
        counted,
        shape=ShapeLimits(max_depth=3, max_object_members=4, max_array_items=4, max_string_bytes=16),
    )
    deep = json.dumps({"tools": [{"parameters": {"a": {}}}]}).encode()
    status, _, body = asyncio.run(_call(gate, [], [deep[:10], deep[10:]]))
    error = _error(body)
    assert status == 400 and error["code"] == "body_shape" and error["type"] == "invalid_request_error"
    assert error["param"] == "$.tools[0].parameters" and "nesting depth bound (3)" in error["message"]
    assert app.scope is None and counted == [400]
    status, _, _ = asyncio.run(_call(gate, [], [json.dumps({"tools": [{"parameters": 1}]}).encode()]))
    assert status == 200  # at the bound


def test_headers_over_the_bound_are_431():
    status, _, body = asyncio.run(_call(_gate(), [(b"x-big", b"v" * 3000)], [b""]))
    assert status == 431 and _error(body)["code"] == "headers_too_large"


def test_a_client_that_leaves_mid_upload_is_counted_499():
    app, counted = _App(), []
    status, _, _ = asyncio.run(_call(_gate(app, counted), [], [b"{", "disconnect"]))
    assert status is None and app.scope is None and counted == [499]


def test_rays_own_plain_text_errors_become_openai_errors_without_internals():
    ray_answer = [
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")],
        },
        {
            "type": "http.response.body",
            "body": b"Request dropped due to backpressure (num_queued_requests=9)",
        },
    ]
    status, headers, body = asyncio.run(_call(_gate(_App(ray_answer)), [], [b"{}"]))
    assert status == 503 and headers[b"retry-after"] == b"2"
    error = _error(body)
    assert error["type"] == "service_unavailable" and "num_queued" not in error["message"]
    crash = [
        {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]},
        {"type": "http.response.body", "body": b"Traceback ... /secret/path.py", "more_body": True},
        {"type": "http.response.body", "body": b"KeyError"},
    ]
    status, _, body = asyncio.run(_call(_gate(_App(crash)), [], [b"{}"]))
    assert status == 500 and "secret" not in body.decode() and _error(body)["type"] == "server_error"


def test_settings_come_from_the_environment_and_bad_ones_name_the_variable(monkeypatch):
    env = gate_env(4096, 8192, 2.5)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == CALLBACK
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gate = ProxyGate(_App())
    assert (gate.max_body_bytes, gate.max_header_bytes, gate.body_timeout_s) == (4096, 8192, 2.5)
    assert gate.shape == ShapeLimits()  # the defaults, unless told otherwise
    for name, value in gate_env(4096, 8192, 2.5, ShapeLimits(10, 20, 30, 4000, 300)).items():
        monkeypatch.setenv(name, value)
    assert ProxyGate(_App()).shape == ShapeLimits(10, 20, 30, 4000, 300)
    monkeypatch.setenv("GPTOSS_VLLM_MAX_JSON_DEPTH", "0")
    with pytest.raises(GateError, match="GPTOSS_VLLM_MAX_JSON_DEPTH='0' must be positive"):
        ProxyGate(_App())
    monkeypatch.setenv("GPTOSS_VLLM_MAX_JSON_DEPTH", "10")
    monkeypatch.setenv("GPTOSS_VLLM_MAX_BODY_BYTES", "lots")
    with pytest.raises(GateError, match="GPTOSS_VLLM_MAX_BODY_BYTES='lots'"):
        ProxyGate(_App())
