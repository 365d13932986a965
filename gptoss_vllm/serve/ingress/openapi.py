"""The OpenAPI document of the routes the ingress serves (``GET /openapi.json``).

It describes what the ingress itself reads and decides (model, effort, limits, ``n``, streaming, stored
responses) and leaves every other field open (``additionalProperties``), since vLLM's own validation takes them;
the error answers are OpenAI's shape. The monitoring route (``/metrics/targets``) is not part of the API and
is not listed. Fuzzers (schemathesis, in the tests) generate requests from it.
"""

from __future__ import annotations

from typing import Any

from gptoss_vllm.serve.config import EFFORTS
from gptoss_vllm.serve.ingress.pipeline import MAX_N
from gptoss_vllm.serve.ingress.responses.conversation import MAX_LISTED_ITEMS

_EFFORT = {"type": "string", "enum": list(EFFORTS)}
_LIMIT = {"type": "integer", "minimum": 1}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
    },
}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
_BODIES: dict[str, dict[str, Any]] = {
    "chat": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": _MESSAGE},
            "reasoning_effort": _EFFORT,
            "max_tokens": _LIMIT,
            "max_completion_tokens": _LIMIT,
            "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
            "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        },
    },
    "completions": {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "model": {"type": "string"},
            "prompt": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "integer", "minimum": 0}},
                ]
            },
            "max_tokens": _LIMIT,
            "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
            "stream": {"type": "boolean"},
        },
    },
    "responses": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "model": {"type": "string"},
            "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": _MESSAGE}]},
            "instructions": {"type": "string"},
            "reasoning": {"type": "object", "properties": {"effort": _EFFORT}},
            "max_output_tokens": _LIMIT,
            "previous_response_id": {"type": "string"},
            "store": {"type": "boolean"},
            "background": {"type": "boolean"},
            "stream": {"type": "boolean"},
        },
    },
}


def _answers(ok: str) -> dict[str, Any]:
    error = {"application/json": {"schema": _ERROR}}
    answers: dict[str, Any] = {"200": {"description": ok}}
    for status, why in (
        ("400", "Malformed request"),
        ("401", "Missing or unknown API key"),
        ("404", "Unknown model or stored response"),
        ("408", "The body did not arrive in time"),
        ("413", "Body over the limit"),
        ("415", "Not JSON"),
        ("429", "A rate limit, a key's limit or the pool's queue bound; see Retry-After"),
        ("503", "No replica, a replica lost, or the response store unavailable; see Retry-After"),
    ):
        answers[status] = {"description": why, "content": error}
    return answers


def _generation(summary: str, body: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [
                {"name": "X-Reasoning-Effort", "in": "header", "required": False, "schema": _EFFORT}
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _BODIES[body]}}},
            "responses": _answers("The answer (JSON, or server-sent events when streamed)"),
        }
    }


def _stored(summary: str, query: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """One operation on a stored response (its owner's key only: any other gets 404)."""
    return {
        "summary": summary,
        "parameters": [
            {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}},
            *query,
        ],
        "responses": _answers(summary),
    }


_LISTING = (
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LISTED_ITEMS},
    },
    {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"]}},
    {"name": "after", "in": "query", "schema": {"type": "string"}},
)


def openapi_document(title: str, model_name: str) -> dict[str, Any]:
    """The document; ``model_name`` is the only model the server serves."""
    probe = {"200": {"description": "Up"}, "503": {"description": "Not ready"}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": "1",
            "description": f"OpenAI-compatible API serving '{model_name}'",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"summary": "Liveness", "security": [], "responses": probe}},
            "/ready": {
                "get": {
                    "summary": "Every pool has a running replica or can start one (scaled to zero); each pool's state",
                    "security": [],
                    "responses": probe,
                }
            },
            "/v1/models": {"get": {"summary": "The served model", "responses": _answers("The model list")}},
            "/v1/chat/completions": _generation("Chat completion", "chat"),
            "/v1/completions": _generation("Completion (raw harmony text)", "completions"),
            "/v1/responses": _generation("Responses API", "responses"),
            "/v1/responses/{response_id}": {
                "get": _stored("A stored response"),
                "delete": _stored("Delete a stored response"),
            },
            "/v1/responses/{response_id}/input_items": {
                "get": _stored("The input items of a stored response", _LISTING)
            },
            "/v1/responses/{response_id}/cancel": {"post": _stored("Cancel a background response")},
        },
    }
