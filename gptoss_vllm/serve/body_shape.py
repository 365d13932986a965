"""The shape of a JSON body, bounded before anything parses it: nesting depth, members per object, items per
array, the length of one string and of one word in it.

A body within the size limit can still be a few hundred levels deep: it parses, and then fails wherever an
object is walked recursively (pickled on its way to a pool, compiled into a grammar, rendered into a prompt).
The proxy gate and the ingress (for paths that bypass the gate) both scan the raw bytes with
:func:`shape_error` and answer 400 naming the bound and the JSON path where it was passed.

A word is bounded apart from its string because the tokenizer's byte-pair encoding costs the square of a
piece's length: one run of 100,000 letters takes 4 s to encode here, a 1 MiB one minutes, and the pool replica
doing it stops answering its health checks. A word here is a run the tokenizer's pre-splitter keeps whole at
most: letters (any script), punctuation, or spaces.

The scan is lexical: it follows strings and brackets and does not validate JSON (the parser does that next,
on a body whose shape is then known to be safe). Cost: one regular-expression pass over the body in C, plus a
Python step per bracket, comma and string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from gptoss_vllm.serve import ServeError

# A string (escapes included, possessive so that a long one is never backtracked) or one structural character.
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"?|[{}\[\],]')
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PATH_SEGMENTS_SHOWN = 12


@dataclass(frozen=True)
class ShapeLimits:
    """The bounds; the defaults leave room for large tool schemas, long conversations and token-id prompts of a
    whole context (gpt-oss: 131,072 positions)."""

    max_depth: int = 64
    max_object_members: int = 10_000
    max_array_items: int = 262_144
    max_string_bytes: int = 1 << 20
    max_word_bytes: int = 32768  # 0.3 s to encode here


class ShapeError(ServeError, ValueError):
    """A body over one of its shape bounds; ``bound`` names it, ``path`` is where it was passed."""

    def __init__(self, bound: str, limit: int, path: str) -> None:
        self.bound, self.limit, self.path = bound, limit, path
        super().__init__(f"Request body is over its {bound} bound ({limit}) at {path}")


class _Frame:
    __slots__ = ("count", "expecting_key", "is_object", "key")

    def __init__(self, is_object: bool) -> None:
        self.is_object = is_object
        self.count = 0  # an object's keys so far; an array's commas (the index of its current item)
        self.key: str | None = None
        self.expecting_key = is_object


def shape_error(body: bytes, limits: ShapeLimits) -> ShapeError | None:
    """The first bound ``body`` passes, or None when it is within all of them."""
    stack: list[_Frame] = []
    for match in _TOKEN.finditer(body):
        token = match.group()
        first = token[0]
        if first == 0x22:  # '"'
            if stack and stack[-1].expecting_key:
                frame = stack[-1]
                frame.count += 1
                frame.key = _key(token)
                frame.expecting_key = False
                if frame.count > limits.max_object_members:
                    return ShapeError("members per object", limits.max_object_members, _path(stack))
            length = len(token) - 2
            if length > limits.max_string_bytes:
                return ShapeError("string length in bytes", limits.max_string_bytes, _path(stack))
            if length > limits.max_word_bytes and _long_word(limits.max_word_bytes).search(
                token, 1, length + 1
            ):
                return ShapeError("word length in bytes", limits.max_word_bytes, _path(stack))
        elif first == 0x2C:  # ','
            if stack:
                frame = stack[-1]
                if frame.is_object:
                    frame.expecting_key = True
                else:
                    frame.count += 1
                    if frame.count >= limits.max_array_items:
                        return ShapeError("items per array", limits.max_array_items, _path(stack))
        elif first in (0x7B, 0x5B):  # '{' '['
            if len(stack) >= limits.max_depth:
                return ShapeError("nesting depth", limits.max_depth, _path(stack))
            stack.append(_Frame(first == 0x7B))
        elif stack:  # '}' ']'
            stack.pop()
    return None


@cache
def _long_word(limit: int) -> re.Pattern[bytes]:
    """A run longer than ``limit`` of letters (UTF-8 bytes of other scripts count as letters), of ASCII
    punctuation, or of spaces and escaped line breaks, as they appear inside a JSON string."""
    run = b"{%d,}" % (limit + 1)
    return re.compile(rb"[A-Za-z\x80-\xff]" + run + rb"|[!-/:-@\[-`{-~]" + run + rb"|(?: |\\[nrt])" + run)


def _key(token: bytes) -> str:
    text = token[1:-1].decode("utf-8", "replace")
    return text if len(text) <= 64 else text[:61] + "..."


def _path(stack: list[_Frame]) -> str:
    """The JSON path of the value being scanned (``$.messages[3].content``), its middle elided when long."""
    segments = []
    for frame in stack:
        if frame.is_object:
            if frame.key is None:
                continue
            key = frame.key
            segments.append(f".{key}" if _IDENTIFIER.match(key) else f"[{key!r}]")
        else:
            segments.append(f"[{frame.count}]")
    if len(segments) > _PATH_SEGMENTS_SHOWN:
        half = _PATH_SEGMENTS_SHOWN // 2
        segments = [*segments[:half], f"...({len(segments) - 2 * half} more)...", *segments[-half:]]
    return "$" + "".join(segments)
