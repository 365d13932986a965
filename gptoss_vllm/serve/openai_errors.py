"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

Rendered as ASCII JSON: a message may echo what a client sent (a model name), lone surrogates included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


class AsciiJSONResponse(JSONResponse):
    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return AsciiJSONResponse(
        error_body(status, message, param, code), status_code=status, headers=dict(headers or {})
    )


def sse_error_event(status: int, message: str, code: str) -> bytes:
    """The last event of a stream that broke after its headers were sent (the openai client raises on it)."""
    return f"data: {json.dumps(error_body(status, message, code=code))}\n\n".encode()
