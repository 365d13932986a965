"""Why the service refuses a request, in one vocabulary: the ``reason`` label of ``gptoss_rejections_total``,
the ``gptoss.rejected`` span attribute and the alert rules all read :class:`Reason`.

A refusal is raised as :class:`Refusal`, which carries the whole answer (HTTP status, OpenAI error code and
``param``, headers such as ``Retry-After``), so that every check raises and one place answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum


class Reason(str, Enum):
    """The reasons a request is refused; the value is the metric label."""

    AUTH = "auth"  # no or an unknown API key
    AUTH_THROTTLED = "auth_throttled"  # too many failed authentications from the client's address
    RATE_LIMIT = "rate_limit"  # the key's limits: request rate, sequences in flight, tokens per minute
    INVALID = "invalid"  # a malformed request: body, model, effort, or one vLLM refused
    BUDGET = "budget"  # an output limit above a rejecting budget
    NOT_FOUND = "not_found"  # a stored response this service does not know
    QUEUE_FULL = "queue_full"  # the pool's queue bound
    NO_REPLICA = "no_replica"  # the pool has no running replica
    REPLICA_FAILED = "replica_failed"  # the replica died before or while answering
    STORE_UNAVAILABLE = "store_unavailable"  # the conversation store could not be read or written

    def __str__(self) -> str:
        return self.value


# Refusals that are the service's own doing (no room, no replica, a dead replica), not the client's.
SERVICE_REASONS = (Reason.QUEUE_FULL, Reason.NO_REPLICA, Reason.REPLICA_FAILED, Reason.STORE_UNAVAILABLE)


class Refusal(Exception):
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
