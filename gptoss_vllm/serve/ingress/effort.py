"""Which reasoning effort a request asks for, and where that came from.

Order (first present wins): Responses ``reasoning.effort``, Chat ``reasoning_effort``, the
``X-Reasoning-Effort`` header, a ``Reasoning: low|medium|high`` line in a system/developer message, the
configured default. The resolved effort is written back into the body so that the engine renders exactly it.
An explicit field or header with an unknown value is refused; a system line is prose the client may not have
meant as a setting (``Reasoning: thorough``), so an unknown value there is logged and skipped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.config import EFFORTS

Endpoint = Literal["chat", "completions", "responses"]
EFFORT_HEADER = "x-reasoning-effort"
_SYSTEM_LINE = re.compile(r"^[ \t]*reasoning[ \t]*:[ \t]*(\S+)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_INSTRUCTION_ROLES = ("system", "developer")
log = logging.getLogger("ray.serve")


class EffortError(ServeError, ValueError):
    """An effort value outside low/medium/high; ``param`` names where it was given."""

    def __init__(self, value: object, param: str) -> None:
        super().__init__(
            f"Invalid reasoning effort {value!r} in {param}: allowed values are {', '.join(EFFORTS)}"
        )
        self.param = param


@dataclass(frozen=True)
class ResolvedEffort:
    effort: str
    source: Literal["responses", "chat", "header", "system", "default"]


def _checked(value: object, param: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in EFFORTS:
        raise EffortError(value, param)
    return value.strip().lower()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(parts)
    return ""


def _instruction_texts(endpoint: Endpoint, body: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    if endpoint == "responses" and isinstance(body.get("instructions"), str):
        texts.append(body["instructions"])
    items = (
        body.get("messages") if endpoint == "chat" else body.get("input") if endpoint == "responses" else None
    )
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and item.get("role") in _INSTRUCTION_ROLES:
                texts.append(_text_of(item.get("content")))
    return texts


def resolve_effort(
    endpoint: Endpoint, body: Mapping[str, Any], headers: Mapping[str, str], default: str
) -> ResolvedEffort:
    if endpoint == "responses":
        reasoning = body.get("reasoning")
        if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
            return ResolvedEffort(_checked(reasoning["effort"], "reasoning.effort"), "responses")
    if endpoint == "chat" and body.get("reasoning_effort") is not None:
        return ResolvedEffort(_checked(body["reasoning_effort"], "reasoning_effort"), "chat")
    header = headers.get(EFFORT_HEADER)
    if header is not None and header.strip():
        return ResolvedEffort(_checked(header, "header X-Reasoning-Effort"), "header")
    for text in _instruction_texts(endpoint, body):
        for match in _SYSTEM_LINE.finditer(text):
            value = match.group(1).strip().lower()
            if value in EFFORTS:
                return ResolvedEffort(value, "system")
            log.info(
                "ignored a system message's 'Reasoning: %s' line: not one of %s",
                value[:40].encode("ascii", "backslashreplace").decode(),
                ", ".join(EFFORTS),
            )
    return ResolvedEffort(default, "default")


def apply_effort(endpoint: Endpoint, body: dict[str, Any], effort: str) -> None:
    """Write the resolved effort where vLLM's harmony rendering reads it (raw completions have no system
    message to carry it: there the effort only chooses the pool)."""
    if endpoint == "chat":
        body["reasoning_effort"] = effort
    elif endpoint == "responses":
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        body["reasoning"] = {**reasoning, "effort": effort}
