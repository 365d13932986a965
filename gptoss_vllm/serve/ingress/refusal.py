"""A refused request: raised as :class:`Refusal` (its reason from :mod:`gptoss_vllm.refusal_reasons`).

A refusal is raised as :class:`Refusal`, which carries the whole answer (HTTP status, OpenAI error code and
``param``, headers such as ``Retry-After``), so that every check raises and one place answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve import ServeError


class Refusal(ServeError):
    """The request is refused with this answer."""

    def __init__(
        self,
        reason: Reason,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message
        self.code = code if code is not None else reason.value
        self.param = param
        self.headers = dict(headers or {})

    def with_headers(self, headers: Mapping[str, str]) -> Refusal:
        """The same refusal answering with ``headers`` too (its own win)."""
        self.headers = {**headers, **self.headers}
        return self

    @classmethod
    def retry_later(
        cls, reason: Reason, status: int, message: str, retry_after_s: int, code: str | None = None
    ) -> Refusal:
        return cls(reason, status, message, code=code, headers={"Retry-After": str(retry_after_s)})


def whole_seconds(wait_s: float) -> int:
    """A wait as ``Retry-After`` says it: whole seconds, rounded up, at least one."""
    return max(1, math.ceil(wait_s))
