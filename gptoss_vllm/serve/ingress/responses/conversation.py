"""Responses conversations as the ingress keeps them: a request rewritten for the engine (a server-made id, a
follow-up expanded into its whole input), the owner's view of a stored response, and its input items as OpenAI
lists them.

A follow-up's input is the previous response's input items, then its output items (reasoning, messages, tool
calls), then the follow-up's own input: what OpenAI documents as managing conversation state by hand, and
what vLLM renders token for token as its own store renders ``previous_response_id`` (the conversation's
instructions and tools are the follow-up's own, as OpenAI's are).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.ingress.refusal import Refusal
from gptoss_vllm.serve.ingress.responses.store import StoredConversation

MAX_LISTED_ITEMS = 100  # OpenAI's bound on ``limit``


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def as_items(value: Any) -> list[Any]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value)


def follow_up_input(previous: StoredConversation, value: Any) -> list[Any]:
    """The whole input of a follow-up to ``previous``."""
    return [*previous.input_items, *previous.output_items, *as_items(value)]


@dataclass
class ResponsesRequest:
    """What a Responses request asks of the ingress: its server-made id, whether to store it and run it in the
    background, its whole input (a follow-up expanded), and the fields the client's response objects show."""

    response_id: str
    store: bool
    background: bool
    input_items: list[Any]
    response_fields: dict[str, Any]


def responses_request(body: dict[str, Any], previous: StoredConversation | None) -> ResponsesRequest:
    """Rewrite a Responses body for the engine and say what the ingress does with it: the server makes the id; a
    follow-up of ``previous`` (looked up for its owner beforehand) carries its whole conversation; the engine
    stores nothing (the ingress does) and never runs in the background (the ingress does that too)."""
    if "request_id" in body:
        raise _invalid("request_id", "'request_id' is not accepted: the server makes each response's id")
    value = body.get("input")
    if value is not None and not isinstance(value, (str, list)):
        raise _invalid("input", "'input' must be a string or a list of input items")
    store = body.get("store", True) is not False
    background = body.get("background") is True
    if background and not store:
        raise _invalid("background", "A background response must be stored: leave out 'store: false'")
    if background and body.get("stream"):
        raise _invalid(
            "stream", "Streaming a background response is not supported: poll GET /v1/responses/{id} instead"
        )
    previous_id = body.pop("previous_response_id", None)
    if previous_id is not None:
        if body.get("previous_input_messages"):
            raise _invalid(
                "previous_response_id", "Send 'previous_response_id' or 'previous_input_messages', not both"
            )
        if previous is None or previous.id != previous_id:
            raise not_found(str(previous_id), "previous_response_id")
        body["input"] = follow_up_input(previous, value)
    response_id = body["request_id"] = new_response_id()
    body["store"] = False
    body.pop("background", None)
    fields = {"store": store, "previous_response_id": previous_id, "background": background}
    return ResponsesRequest(response_id, store, background, as_items(body.get("input")), fields)


def owned_by(
    response_id: Any, found: StoredConversation | None, key_name: str | None, param: str | None = None
) -> StoredConversation:
    """``found`` (stored under ``response_id``) if the key ``key_name`` owns it; to any other key it does not
    exist (404, as for an unknown id). ``param`` names the field the id came in."""
    if not isinstance(response_id, str):
        name = param or "response_id"
        raise _invalid(name, f"'{name}' must be a string")
    if found is None or found.owner != key_name:
        raise not_found(response_id, param)
    return found


def not_found(response_id: str, param: str | None) -> Refusal:
    return Refusal(
        Reason.NOT_FOUND,
        404,
        f"Response '{response_id[:100]}' not found",
        param=param,
        code="response_not_found",
    )


def _invalid(param: str, message: str) -> Refusal:
    return Refusal(Reason.INVALID, 400, message, param=param, code="invalid_value")


def queued_response(response_id: str, body: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The answer to a ``background`` request before the engine has it (OpenAI's ``queued`` status)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "queued",
        "model": body.get("model"),
        "output": [],
        "instructions": body.get("instructions"),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "reasoning": body.get("reasoning"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata"),
        "usage": None,
        "error": None,
        **fields,
    }


def with_status(response: dict[str, Any], status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**response, "status": status, "error": error}


def deleted(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response.deleted", "deleted": True}


class ListingError(ServeError, ValueError):
    """A bad ``input_items`` query parameter; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def input_items_page(conversation: StoredConversation, query: dict[str, str]) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items``: OpenAI's list (``limit``, ``order``, ``after``), each item with
    a stable id."""
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LISTED_ITEMS:
        raise ListingError("limit", f"'limit' must be an integer from 1 to {MAX_LISTED_ITEMS}")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ListingError("order", "'order' must be 'asc' or 'desc'")
    suffix = conversation.id.removeprefix("resp_")
    items = []
    for index, item in enumerate(conversation.input_items):
        shown = dict(item) if isinstance(item, dict) else {"content": item}
        shown.setdefault("id", f"item_{suffix}_{index}")
        shown.setdefault("type", "message")
        if shown["type"] == "message" and isinstance(shown.get("content"), str):
            # As OpenAI lists a message sent as a bare string: one text part.
            kind = "output_text" if shown.get("role") == "assistant" else "input_text"
            shown["content"] = [{"type": kind, "text": shown["content"]}]
        items.append(shown)
    if order == "desc":
        items.reverse()
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ListingError("after", f"'after': no input item {after[:80]!r} in this response")
        items = items[ids.index(after) + 1 :]
    limit = int(raw_limit)
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
