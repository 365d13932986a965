"""Responses conversations as the ingress keeps them: a follow-up expanded into its whole input, the
owner's view of a stored response, and its input items as OpenAI lists them.

A follow-up's input is the previous response's input items, then its output items (reasoning, messages, tool
calls), then the follow-up's own input: what OpenAI documents as managing conversation state by hand, and
what vLLM renders token for token as its own store renders ``previous_response_id`` (the conversation's
instructions and tools are the follow-up's own, as OpenAI's are).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

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


class ListingError(ValueError):
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
