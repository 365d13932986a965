"""Hostile clients and many tenants against the session's shared stack (real Ray Serve proxy with the gate, real
ingress, real vLLM engines): oversized, stalled and malformed requests, amplification, hang-ups, Ray Serve's
control headers, per-key limits, failed-authentication floods, key rotation, internal exposure, and a
schemathesis run from the ingress's own OpenAPI document. Each test checks the status, OpenAI's error shape,
and that the service still answers afterwards."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support import http
from tests.support.admission import (
    HeldRequest,
    ingress_samples,
    monitoring_headers,
    target_samples,
    wait_for_in_flight,
)
from tests.support.shared_stack import (
    BODY_TIMEOUT_S,
    CAPPED_KEY,
    MAIN_KEY,
    MODEL,
    TPM_KEY,
    keys_file_text,
)

AUTH = {"Authorization": f"Bearer {MAIN_KEY}"}
USER = [{"role": "user", "content": "What is 2 + 2?"}]
CHAT = "/v1/chat/completions"


def _post(stack, body, headers=None, path=CHAT, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    merged = {"Content-Type": "application/json", **AUTH, **(headers or {})}
    kw.setdefault("timeout", 120)
    return http.post(f"{stack.url}{path}", content=content, headers=merged, **kw)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert error["message"] and error["type"], error
    assert "Traceback" not in error["message"] and "/site-packages/" not in error["message"]
    return error


def _still_serves(stack) -> None:
    assert http.get(f"{stack.url}/health", timeout=30).status_code == 200
    answer = _post(stack, {"messages": USER, "max_tokens": 2, "reasoning_effort": "low"})
    assert answer.status_code == 200, answer.text


def _raw(stack, head: list[str], body: bytes = b"", source: str | None = None) -> socket.socket:
    """An HTTP/1.1 request written by hand (lengths and pacing a client library would not send)."""
    address = urlsplit(stack.url)
    sock = socket.create_connection(
        (address.hostname, address.port), timeout=60, source_address=(source, 0) if source else None
    )
    lines = [head[0], f"Host: {address.netloc}", *head[1:]]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _read_answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        ),
        None,
    )
    while length is not None and len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    sock.close()
    return status, rest


def _count(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


# -- bodies and headers ----------------------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(stack):
    sock = _raw(stack, ["POST /v1/chat/completions HTTP/1.1", "Content-Type: application/json",
                        f"Authorization: Bearer {MAIN_KEY}", "Content-Length: 50000000"])  # fmt: skip
    status, body = _read_answer(sock)  # answered without a byte of the 50 MB
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    _still_serves(stack)


def test_a_chunked_body_is_cut_off_at_the_limit(stack):
    sock = _raw(stack, ["POST /v1/chat/completions HTTP/1.1", "Content-Type: application/json",
                        f"Authorization: Bearer {MAIN_KEY}", "Transfer-Encoding: chunked"])  # fmt: skip
    chunk = b"x" * (256 * 1024)
    try:
        for _ in range(16):  # 4 MiB against the limit of 2 MiB (32768 tokens of context)
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    except OSError:
        pass  # the server answered and closed before the rest
    status, body = _read_answer(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    _still_serves(stack)


def test_stalled_uploads_get_408_and_never_hold_the_ingress(stack):
    head = ["POST /v1/chat/completions HTTP/1.1", "Content-Type: application/json",
            f"Authorization: Bearer {MAIN_KEY}", "Content-Length: 1000"]  # fmt: skip
    stalled = [_raw(stack, head, b'{"messages": [') for _ in range(200)]
    started = time.monotonic()
    # The gate holds them in the proxy, so the ingress answers its probes and real requests meanwhile.
    assert http.get(f"{stack.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < BODY_TIMEOUT_S
    statuses = [_read_answer(sock)[0] for sock in stalled]
    assert statuses == [408] * len(stalled)
    trickle = _raw(stack, head, b"{")
    for _ in range(BODY_TIMEOUT_S * 4):  # a byte every 0.5 s never completes in time
        try:
            trickle.sendall(b" ")
        except OSError:
            break
        time.sleep(0.5)
    status, body = _read_answer(trickle)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    _still_serves(stack)


def test_headers_over_the_bound_are_431(stack):
    error = _error(_post(stack, {"messages": USER}, {"X-Padding": "p" * 40000}), 431)
    assert error["code"] == "headers_too_large"
    _still_serves(stack)


# -- malformed input ---------------------------------------------------------------------------------------------


def test_malformed_input_is_a_4xx_in_openais_shape(stack):
    deep = _error(_post(stack, b'{"messages": ' + b"[" * 50000 + b"]" * 50000 + b"}"), 400)
    assert deep["code"] == "body_shape" and deep["param"].startswith("$.messages[0]")  # refused in the gate
    assert _error(_post(stack, b'{"messages": [}'), 400)["code"] == "invalid_json"
    lone = b'{"messages": [{"role": "user", "content": "x\\ud800y"}], "max_tokens": 2}'
    assert _error(_post(stack, lone), 400)["code"] == "invalid_encoding"
    unknown = _error(_post(stack, b'{"model": "\\udc00", "messages": []}'), 404)
    assert unknown["code"] == "model_not_found"
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=b",
    ):
        error = _error(_post(stack, {"messages": USER}, {"Content-Type": content_type}), 415)
        assert error["code"] == "unsupported_media_type"
    for path in ("/v1/chat/completions/x", "/v1/%ff%fe", "/../etc/passwd"):
        _error(http.get(f"{stack.url}{path}", headers=AUTH, timeout=30), 404)
    _error(httpx.delete(f"{stack.url}/v1/chat/completions", headers=AUTH, timeout=30), 405)
    _still_serves(stack)


# -- amplification -------------------------------------------------------------------------------------------------


def test_n_is_capped_and_counted_in_sequences(stack):
    assert _error(_post(stack, {"messages": USER, "n": 129}), 400)["param"] == "n"
    # fast runs one sequence at a time per replica: n=2 would take more than its whole batch.
    error = _error(_post(stack, {"messages": USER, "n": 2, "reasoning_effort": "low"}), 400)
    assert error["code"] == "too_many_sequences" and "'fast'" in error["message"]
    two = _post(stack, {"messages": USER, "n": 2, "max_tokens": 2, "reasoning_effort": "high"})
    assert two.status_code == 200 and len(two.json()["choices"]) == 2  # deep takes two
    _still_serves(stack)


# -- accounting --------------------------------------------------------------------------------------------------


def _running_in_engine(stack, pool: str) -> float:
    return _count(target_samples(stack.url, "pool", pool=pool), "vllm:num_requests_running")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_is_499_and_the_engine_stops(stack, stream):
    before = ingress_samples(stack.url)
    body = {
        "messages": USER,
        "max_tokens": 3000,
        "ignore_eos": True,
        "reasoning_effort": "high",
        "stream": stream,
    }
    # Ray Serve's own control headers would keep the request going after the hang-up: they must not reach it.
    headers = {"x-request-disconnect-disabled": "?1", "x-request-timeout-seconds": "0"}
    # Hang up once the engine generates for it (not on a clock: a loaded machine may not have admitted it yet).
    held = HeldRequest(stack.url, CHAT, body, MAIN_KEY, stream=stream, headers=headers)
    try:
        deadline = time.monotonic() + 60
        while _running_in_engine(stack, "deep") == 0:
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.2)
    finally:
        held.release()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running_in_engine(stack, "deep") > 0:
        time.sleep(0.5)
    assert _running_in_engine(stack, "deep") == 0, "the engine kept generating for a client that left"
    wait_for_in_flight(stack.url, {"deep": 0})
    after = ingress_samples(stack.url)

    def statuses(samples) -> dict[str, float]:
        counted: dict[str, float] = {}
        for (name, labels), value in samples.items():
            found = dict(labels)
            if name == "gptoss_requests_total" and found.get("endpoint") == "chat":
                counted[found["status"]] = counted.get(found["status"], 0) + value
        return counted

    was, now = statuses(before), statuses(after)
    changed = {code: now[code] - was.get(code, 0) for code in now if now[code] != was.get(code, 0)}
    # Only the hang-up: a cancelled pool call is not a replica failure (503) nor a crash (500).
    assert changed == {"499": 1}, changed
    _still_serves(stack)


def test_a_client_that_leaves_mid_upload_is_499_at_the_proxy(stack):
    before = target_samples(stack.url, "proxy")
    head = ["POST /v1/chat/completions HTTP/1.1", "Content-Type: application/json",
            f"Authorization: Bearer {MAIN_KEY}", "Content-Length: 1000"]  # fmt: skip
    sock = _raw(stack, head, b'{"messages"')
    time.sleep(0.5)
    sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = target_samples(stack.url, "proxy")
        left = _count(after, "gptoss_requests_total", endpoint="upload", status="499")
        if left > _count(before, "gptoss_requests_total", endpoint="upload", status="499"):
            break
        time.sleep(1)
    else:
        pytest.fail("the proxy did not count the abandoned upload as 499")
    assert _count(after, "gptoss_requests_total", status="500") == 0
    _still_serves(stack)


def test_ray_serves_timeout_header_from_a_client_is_ignored(stack):
    # Were it obeyed, Ray's proxy would answer 408 after a millisecond.
    answer = _post(stack, {"messages": USER, "max_tokens": 8, "reasoning_effort": "low"},
                   {"x-request-timeout-seconds": "0.001"})  # fmt: skip
    assert answer.status_code == 200, answer.text


# -- tenants -----------------------------------------------------------------------------------------------------


def test_a_key_capped_in_concurrency_cannot_fill_the_queue(stack):
    held = HeldRequest(stack.url, CHAT, {"messages": USER, "max_tokens": 20000, "ignore_eos": True,
                                         "reasoning_effort": "high"}, CAPPED_KEY)  # fmt: skip
    try:
        wait_for_in_flight(stack.url, {"deep": 1})
        refused = _post(stack, {"messages": USER, "max_tokens": 2}, {"Authorization": f"Bearer {CAPPED_KEY}"})
        error = _error(refused, 429)
        assert error["code"] == "rate_limit_exceeded" and "1 sequences in flight" in error["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        _still_serves(stack)  # other keys are not held back
    finally:
        held.release()
    wait_for_in_flight(stack.url, {"deep": 0})
    again = _post(stack, {"messages": USER, "max_tokens": 2}, {"Authorization": f"Bearer {CAPPED_KEY}"})
    assert again.status_code == 200


def test_a_key_over_its_tokens_per_minute_waits(stack):
    key = {"Authorization": f"Bearer {TPM_KEY}"}
    first = _post(
        stack, {"messages": USER, "max_tokens": 150, "ignore_eos": True, "reasoning_effort": "high"}, key
    )
    assert first.status_code == 200
    usage = first.json()["usage"]
    assert (
        usage["prompt_tokens"] + usage["completion_tokens"] > 120
    )  # the key's whole minute, reasoning included
    refused = _post(stack, {"messages": USER, "max_tokens": 2}, key)
    error = _error(refused, 429)
    assert "tokens per minute" in error["message"] and int(refused.headers["Retry-After"]) >= 1
    _still_serves(stack)


def test_failed_authentication_is_rate_limited_per_address(stack):
    other = "127.0.0.2"  # a second client on the loopback: the rest of the suite talks from 127.0.0.1
    wrong = ["POST /v1/chat/completions HTTP/1.1", "Content-Type: application/json",
             "Authorization: Bearer sk-guess", "Content-Length: 2"]  # fmt: skip
    statuses = [_read_answer(_raw(stack, wrong, b"{}", source=other))[0] for _ in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]  # the default: a burst of 10
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    valid = ["POST /v1/chat/completions HTTP/1.1", "Content-Type: application/json",
             f"Authorization: Bearer {MAIN_KEY}", f"Content-Length: {len(body)}"]  # fmt: skip
    status, answer = _read_answer(_raw(stack, valid, body, source=other))
    assert status == 429 and json.loads(answer)["error"]["code"] == "too_many_failed_authentications"
    _still_serves(stack)  # from 127.0.0.1


def test_key_rotation_reload_failure_and_an_emptied_file(stack):
    def samples():
        return ingress_samples(stack.url)

    failures_before = _count(samples(), "gptoss_api_keys_reload_failures_total")
    assert _count(samples(), "gptoss_api_keys") == 4

    def wait_for(check, what: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(1)
        pytest.fail(what)

    try:
        stack.keys_path.write_bytes(b"\xff\xfe\x00 not a keys file")
        # The ring re-reads a changed file when a request needs it (at most every KEYS_RECHECK_S).
        wait_for(
            lambda: (
                _post(stack, {"messages": USER, "max_tokens": 2}).status_code == 200
                and _count(samples(), "gptoss_api_keys_reload_failures_total") > failures_before
            ),
            "a keys file that cannot be read was not reported",
        )
        assert _post(stack, {"messages": USER, "max_tokens": 2}).status_code == 200  # the keys in force stay
        stack.keys_path.write_text("# every key revoked\n")
        wait_for(
            lambda: _post(stack, {"messages": USER, "max_tokens": 2}).status_code == 401,
            "an emptied keys file still admits",
        )
        assert _count(samples(), "gptoss_api_keys") == 0
    finally:
        stack.keys_path.write_text(keys_file_text())
    wait_for(
        lambda: _post(stack, {"messages": USER, "max_tokens": 2}).status_code == 200, "keys did not return"
    )


# -- internal exposure ---------------------------------------------------------------------------------------------


def test_internal_addresses_and_paths_are_not_served_to_clients(stack):
    for headers in ({}, AUTH, {"Authorization": "Bearer wrong-token"}):
        _error(http.get(f"{stack.url}/metrics/targets", headers=headers, timeout=30), 404)
    listing = http.get(f"{stack.url}/metrics/targets", headers=monitoring_headers(), timeout=30).json()
    assert {t["labels"]["component"] for t in listing} >= {"ingress", "pool"}
    assert not any(name.startswith("__") for t in listing for name in t["labels"])
    models = http.get(f"{stack.url}/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert "/" not in json.dumps(models)  # vLLM's root is the checkpoint's path on the server


# -- fuzzing -------------------------------------------------------------------------------------------------------


def _short(case) -> None:
    """Short answers, so that a few hundred cases run in minutes on a tiny CPU model."""
    if not isinstance(case.body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(case.body.get(field), int) and case.body[field] > 8:
            case.body[field] = 8
    default = "max_output_tokens" if case.path == "/v1/responses" else "max_tokens"
    if not any(field in case.body for field in ("max_tokens", "max_completion_tokens", "max_output_tokens")):
        case.body[default] = 4


def test_schemathesis_finds_no_5xx_and_no_hang(stack):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    paths = set(schema.raw_schema["paths"])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models"} <= paths
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(operation.as_strategy())
        def call(case) -> None:
            _short(case)
            case.headers = {**(case.headers or {}), **AUTH}
            started = time.monotonic()
            try:
                response = case.call(timeout=60)
            except Exception as exc:  # a hang (timeout) or a dropped connection
                failures.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}: {exc}")
                return
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500 or time.monotonic() - started > 50:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}"
                )
            elif response.status_code >= 400 and "error" not in response.json():
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: not an error shape"
                )

        call()
    assert sum(statuses.values()) >= 200 and not failures, (statuses, failures[:5])
    _still_serves(stack)
