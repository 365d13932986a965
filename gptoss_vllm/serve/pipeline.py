"""The ingress's request pipeline: the checks a request passes, in order, before it reaches a pool.

key -> rate limit -> body -> model -> effort -> budget -> pool -> admission. Each step either fills in the
request's :class:`Decision` or raises :class:`~gptoss_vllm.serve.refusal.Refusal`; the decision keeps what the
steps before a refusal learnt (effort, pool), so that a refused request is counted where it was refused. Nothing
here touches Ray or HTTP objects: the ingress deployment hands in headers and bytes and wires the decision to
the pool handles, and unit tests drive the pipeline directly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gptoss_vllm.observability.request_record import request_usage
from gptoss_vllm.serve.admission import Admission
from gptoss_vllm.serve.auth import KeyRing, RateLimiter
from gptoss_vllm.serve.budget import BudgetError, apply_budget
from gptoss_vllm.serve.config import ServeConfig
from gptoss_vllm.serve.effort import EffortError, Endpoint, ResolvedEffort, apply_effort, resolve_effort
from gptoss_vllm.serve.refusal import Reason, Refusal

MAX_BODY_BYTES = 32 * 1024 * 1024
ANONYMOUS = "anonymous"


class ResponseRoutes:
    """Where each stored Response lives (pool, replica), bounded LRU."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._routes: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def remember(self, response_id: str, pool: str, replica_id: str) -> None:
        self._routes[response_id] = (pool, replica_id)
        self._routes.move_to_end(response_id)
        while len(self._routes) > self._capacity:
            self._routes.popitem(last=False)

    def find(self, response_id: str) -> tuple[str, str] | None:
        return self._routes.get(response_id)


@dataclass
class Decision:
    """What the pipeline learnt of one request, step by step."""

    key_name: str | None = None
    body: dict[str, Any] | None = None
    effort: ResolvedEffort | None = None
    pool: str | None = None  # the pool it runs in (after spillover)
    spilled_from: str | None = None
    replica_id: str | None = None  # pinned to this replica (a stored response's follow-up)
    clamped_from: int | None = None
    strip_usage: bool = False  # the ingress asked for a usage event the client did not
    remember: bool = False  # a Responses answer to remember the route of
    headers: dict[str, str] = field(default_factory=dict)  # the x-gptoss-* headers of the answer


class RequestPipeline:
    """The checks of one ingress replica; ``admission`` and ``routes`` are its shared state."""

    def __init__(
        self,
        config: ServeConfig,
        admission: Admission,
        routes: ResponseRoutes,
        keys: KeyRing | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._config = config
        self.admission = admission
        self.routes = routes
        self._keys = keys
        self._limiter = limiter

    # -- the steps -------------------------------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str], decision: Decision) -> None:
        """Key, then the key's rate limit."""
        name = ANONYMOUS
        if self._keys is not None:
            found = self._keys.name_of(headers.get("authorization"))
            if found is None:
                raise Refusal(
                    Reason.AUTH,
                    401,
                    "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            name = found
        decision.key_name = name
        if self._limiter is not None and (wait := self._limiter.acquire(name)) is not None:
            retry = max(1, int(wait + 0.999))
            raise Refusal(
                Reason.RATE_LIMIT,
                429,
                f"Rate limit of API key '{name}' exceeded; retry in {retry} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )

    def parse_body(self, raw: bytes, decision: Decision) -> dict[str, Any]:
        if len(raw) > MAX_BODY_BYTES:
            raise Refusal(
                Reason.INVALID, 413, f"Request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}"
            )
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise Refusal(
                Reason.INVALID, 400, f"Request body is not valid JSON: {exc}", code="invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise Refusal(Reason.INVALID, 400, "Request body must be a JSON object", code="invalid_json")
        decision.body = body
        return body

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.setdefault("model", self._config.model_name)
        if model != self._config.model_name:
            raise Refusal(
                Reason.INVALID,
                404,
                f"The model '{model}' does not exist; this server serves '{self._config.model_name}'",
                param="model",
                code="model_not_found",
            )

    def resolve_effort(
        self, endpoint: Endpoint, body: dict[str, Any], headers: Mapping[str, str], decision: Decision
    ) -> None:
        try:
            effort = resolve_effort(endpoint, body, headers, self._config.default_effort)
            apply_effort(endpoint, body, effort.effort)
        except EffortError as exc:
            raise Refusal(
                Reason.INVALID, 400, str(exc), param=exc.param, code="invalid_reasoning_effort"
            ) from None
        decision.effort = effort
        decision.pool = self._config.pool_for(effort.effort)
        decision.headers |= {"x-gptoss-effort": effort.effort, "x-gptoss-effort-source": effort.source}

    def apply_budget(self, endpoint: Endpoint, body: dict[str, Any], decision: Decision) -> None:
        assert decision.effort is not None
        effort = decision.effort.effort
        try:
            budget = apply_budget(endpoint, body, effort, self._config.budgets.get(effort))
        except BudgetError as exc:
            raise Refusal(Reason.BUDGET, 400, str(exc), param=exc.param, code=exc.code) from None
        if budget.clamped_from is not None:
            decision.clamped_from = budget.clamped_from
            decision.headers["x-gptoss-budget-clamped-from"] = str(budget.clamped_from)

    def choose_pool(self, endpoint: Endpoint, body: dict[str, Any], decision: Decision) -> None:
        """The effort's pool, unless a Responses follow-up must run where its previous response is stored."""
        previous = body.get("previous_response_id") if endpoint == "responses" else None
        if isinstance(previous, str) and (where := self.routes.find(previous)) is not None:
            decision.pool, decision.replica_id = where
        decision.remember = endpoint == "responses" and body.get("store", True) is not False
        decision.strip_usage = request_usage(endpoint, body)

    def admit(self, decision: Decision) -> None:
        assert decision.pool is not None
        try:
            admitted = self.admission.admit(decision.pool, pinned=decision.replica_id is not None)
        except Refusal as refusal:
            raise refusal.with_headers(decision.headers | {"x-gptoss-pool": decision.pool}) from None
        decision.pool, decision.spilled_from = admitted.pool, admitted.spilled_from

    # -- whole requests --------------------------------------------------------------------------------------

    def generation(
        self, endpoint: Endpoint, headers: Mapping[str, str], raw: bytes, decision: Decision
    ) -> Decision:
        """Every step for a generating request (chat, completions, responses); ``headers`` lowercase."""
        self.authenticate(headers, decision)
        body = self.parse_body(raw, decision)
        self.check_model(body)
        self.resolve_effort(endpoint, body, headers, decision)
        self.apply_budget(endpoint, body, decision)
        self.choose_pool(endpoint, body, decision)
        self.admit(decision)
        return decision

    def models(self, headers: Mapping[str, str], decision: Decision) -> Decision:
        """``GET /v1/models``: answered by the default effort's pool, which must have a running replica."""
        self.authenticate(headers, decision)
        decision.pool = self._config.pool_for(self._config.default_effort)
        self.admit(decision)
        return decision

    def stored_response(self, headers: Mapping[str, str], response_id: str, decision: Decision) -> Decision:
        """Reading or cancelling a stored response: the replica that stored it."""
        self.authenticate(headers, decision)
        where = self.routes.find(response_id)
        if where is None:
            raise Refusal(
                Reason.NOT_FOUND, 404, f"Response '{response_id}' not found", code="response_not_found"
            )
        decision.pool, decision.replica_id = where
        return decision
