"""Why the service refuses a request, in one vocabulary: the ``reason`` label of ``gptoss_rejections_total``,
the ``gptoss.rejected`` span attribute and the alert rules all read :class:`Reason`.

A leaf: the serving code that refuses (``serve``) and the metrics and rules that count refusals
(``observability``) both import it, and it imports neither.
"""

from __future__ import annotations

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
