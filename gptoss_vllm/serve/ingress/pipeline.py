"""The ingress's request pipeline: the checks a request passes, in order, before it reaches a pool.

address guard -> key -> rate limit -> body (media type, size, JSON, encoding) -> model -> effort -> budget ->
the answer asked for (Responses: server-made id, a follow-up's whole conversation) -> sequences (``n`` times
prompts) -> admission -> the key's concurrency and tokens per minute. Each step either fills in the request's
:class:`Decision` or raises :class:`~gptoss_vllm.serve.ingress.refusal.Refusal`; the decision keeps what the
steps before a refusal learnt (effort, pool), so that a refused request is counted where it was refused.

:meth:`RequestPipeline.generation` is the one call from a request's bytes to its decision, for the ingress
deployment and the unit tests alike. Nothing here touches Ray or HTTP objects: the deployment hands in headers,
a body reader and a conversation lookup, and wires the decision to the pool handles.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gptoss_vllm.refusal_reasons import Reason
from gptoss_vllm.serve.body_shape import shape_error
from gptoss_vllm.serve.config import REQUEST_TOOLS, IngressView
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.ingress.budget import BudgetError, apply_budget
from gptoss_vllm.serve.ingress.effort import (
    EffortError,
    Endpoint,
    ResolvedEffort,
    apply_effort,
    resolve_effort,
)
from gptoss_vllm.serve.ingress.keys import KeyRing
from gptoss_vllm.serve.ingress.peer_counts import Counts, PeerView
from gptoss_vllm.serve.ingress.quotas import TenantUsage
from gptoss_vllm.serve.ingress.rate_limits import RateLimiter
from gptoss_vllm.serve.ingress.refusal import Refusal, whole_seconds
from gptoss_vllm.serve.ingress.responses.conversation import owned_by, responses_request
from gptoss_vllm.serve.ingress.responses.store import StoredConversation
from gptoss_vllm.serve.ingress.usage_event import request_usage

ANONYMOUS = "anonymous"
MAX_N = 128  # OpenAI's cap on choices per request
_JSON_MEDIA = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
BodyReader = Callable[[int], Awaitable[bytes]]


def client_address(headers: Mapping[str, str], peer: str | None, header: str | None) -> str | None:
    """The client's address: the last entry of ``header`` (the one the load balancer in front appended; those
    before it are the client's to write), else the connection's peer."""
    if header:
        entries = [entry.strip() for entry in headers.get(header, "").split(",") if entry.strip()]
        if entries:
            return entries[-1][:64]
    return peer


@dataclass
class Decision:
    """What the pipeline learnt of one request, step by step."""

    key_name: str | None = None
    body: dict[str, Any] | None = None
    encoded: bytes | None = None  # the body as the pool gets it
    sequences: int = 1  # what admission and the key's concurrency count: n x prompts
    started: bool = False  # counted in admission and the key's usage (until finished)
    effort: ResolvedEffort | None = None
    pool: str | None = None  # the pool it runs in (after spillover)
    spilled_from: str | None = None
    cold_start: bool = False  # its pool is at zero replicas: the ingress waits for one to start
    clamped_from: int | None = None
    strip_usage: bool = False  # the ingress asked for a usage event the client did not
    # Responses: the id the server made, whether to store it (and run it in the background), the whole input
    # (a follow-up expanded), and the fields the client's response objects show.
    response_id: str | None = None
    store: bool = False
    background: bool = False
    input_items: list[Any] | None = None
    response_fields: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the x-gptoss-* headers of the answer


# (the id, the request's decision so far, the field it came in) -> the stored conversation, or a 404 refusal
ConversationLookup = Callable[[Any, Decision, str], Awaitable[StoredConversation]]


class RequestPipeline:
    """The checks of one ingress replica; ``admission`` is its shared state."""

    def __init__(
        self,
        config: IngressView,
        admission: Admission,
        keys: KeyRing | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._config = config
        self.admission = admission
        self._keys = keys
        self._limiter = limiter
        auth = config.auth
        self.tenants = TenantUsage(auth.rate_limit, dict(auth.key_rate_limits)) if auth else None
        self._failures = RateLimiter(auth.failed_auth_per_address) if auth else None
        self._body_limit = config.body_limit()
        self._body_shape = config.ingress.body_shape.limits()

    # -- the steps -------------------------------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str], decision: Decision, client: str | None = None) -> None:
        """The client address's failed attempts, the key, then the key's rate limit."""
        name = ANONYMOUS
        if self._keys is not None:
            address = client or "unknown"
            assert self._failures is not None
            if (wait := self._failures.wait(address)) is not None:
                # Every request of the address, valid key or not: a different answer would be an oracle.
                retry = whole_seconds(wait)
                message = f"Too many failed authentications from this address; retry in {retry} s"
                raise Refusal.retry_later(
                    Reason.AUTH_THROTTLED, 429, message, retry, code="too_many_failed_authentications"
                )
            found = self._keys.name_of(headers.get("authorization"))
            if found is None:
                self._failures.acquire(address)
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
            retry = whole_seconds(wait)
            message = f"Rate limit of API key '{name}' exceeded; retry in {retry} s"
            raise Refusal.retry_later(Reason.RATE_LIMIT, 429, message, retry, code="rate_limit_exceeded")

    def check_media_type(self, headers: Mapping[str, str]) -> None:
        """JSON or nothing said: a form or text/plain body is what a cross-site form post sends."""
        declared = headers.get("content-type")
        if declared is None:
            return
        media = declared.split(";", 1)[0].strip().lower()
        if not _JSON_MEDIA.match(media):
            raise Refusal(
                Reason.INVALID,
                415,
                f"Content-Type {declared[:80]!r} is not supported: send application/json",
                code="unsupported_media_type",
            )

    @property
    def body_limit(self) -> int:
        return self._body_limit

    def parse_body(self, raw: bytes, decision: Decision, parsed: Any = None) -> dict[str, Any]:
        """The body as a JSON object; ``parsed`` is :meth:`parse_json` of ``raw`` when done already."""
        body = self.parse_json(raw) if parsed is None else parsed
        if not isinstance(body, dict):
            raise Refusal(Reason.INVALID, 400, "Request body must be a JSON object", code="invalid_json")
        decision.body = body
        return body

    def parse_json(self, raw: bytes) -> Any:
        """Size, shape and syntax only (no shared state: a thread may run it for a large body)."""
        if len(raw) > self._body_limit:
            raise Refusal(
                Reason.INVALID,
                413,
                f"Request body is {len(raw)} bytes; the limit is {self._body_limit}",
                code="body_too_large",
            )
        # The gate checked it already; paths that bypass the gate (a direct ingress) are held to the same shape.
        if (shaped := shape_error(raw, self._body_shape)) is not None:
            raise Refusal(Reason.INVALID, 400, str(shaped), code="body_shape", param=shaped.path)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise Refusal(
                Reason.INVALID, 400, f"Request body is not valid JSON: {exc}", code="invalid_json"
            ) from None
        except RecursionError:
            raise Refusal(
                Reason.INVALID, 400, "Request body is nested too deeply to parse", code="invalid_json"
            ) from None
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

    def check_tools(self, endpoint: Endpoint, body: dict[str, Any], decision: Decision) -> None:
        """A built-in tool the request asks for must be one its pool offers: vLLM would drop it unsaid."""
        tools = body.get("tools") if endpoint == "responses" else None
        if not isinstance(tools, list):
            return
        assert decision.pool is not None and decision.effort is not None
        offered = self._config.pools[decision.pool].offered_tools()
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            needed = REQUEST_TOOLS.get(kind) if isinstance(kind, str) else None
            if needed is not None and needed not in offered:
                where = f"offers {', '.join(offered)}" if offered else "offers no built-in tool"
                raise Refusal(
                    Reason.INVALID,
                    400,
                    f"tools[{i}]: {kind} (the {needed} tool) is not offered for reasoning effort "
                    f"'{decision.effort.effort}': its pool '{decision.pool}' {where}",
                    param=f"tools[{i}].type",
                    code="tool_not_offered",
                )

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

    def count_sequences(self, endpoint: Endpoint, body: dict[str, Any], decision: Decision) -> None:
        """``n`` (at most OpenAI's 128) times the prompts of a completions batch."""
        n = body.get("n", 1) if endpoint != "responses" else 1
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise Refusal(
                Reason.INVALID,
                400,
                f"Invalid 'n': {str(n)[:40]!r}; it must be an integer from 1 to {MAX_N}",
                param="n",
                code="invalid_value",
            )
        prompts = 1
        prompt = body.get("prompt") if endpoint == "completions" else None
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompts = len(prompt)  # a batch of strings or of token lists
        decision.sequences = n * prompts
        assert decision.pool is not None
        bound = self._config.pools[decision.pool].max_ongoing_requests
        if decision.sequences > bound:
            raise Refusal(
                Reason.INVALID,
                400,
                f"This request asks for {decision.sequences} sequences (n x prompts); pool "
                f"'{decision.pool}' runs at most {bound} at once per replica: ask for fewer or split it",
                param="n",
                code="too_many_sequences",
            )

    def encode_body(self, body: dict[str, Any], decision: Decision) -> None:
        """The body as the pool gets it: UTF-8 JSON, which a lone surrogate anywhere in it cannot be."""
        try:
            decision.encoded = json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise Refusal(
                Reason.INVALID,
                400,
                "Request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): send valid Unicode",
                code="invalid_encoding",
            ) from None

    def prepare_answer(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        decision: Decision,
        previous: StoredConversation | None = None,
    ) -> None:
        """What the pool is asked for. Responses: the server makes the id; a follow-up of ``previous`` carries
        its whole conversation; the engine stores nothing (the ingress does) and never runs in the background
        (the ingress does that too)."""
        decision.strip_usage = request_usage(endpoint, body)
        if endpoint != "responses":
            return
        asked = responses_request(body, previous)
        decision.response_id, decision.store, decision.background = (
            asked.response_id,
            asked.store,
            asked.background,
        )
        decision.input_items, decision.response_fields = asked.input_items, asked.response_fields

    def owned(
        self,
        response_id: Any,
        found: StoredConversation | None,
        decision: Decision,
        param: str | None = None,
    ) -> StoredConversation:
        """The stored response ``found`` under ``response_id``, if the request's key owns it (else 404)."""
        return owned_by(response_id, found, decision.key_name, param)

    def admit(self, decision: Decision) -> None:
        assert decision.pool is not None
        try:
            admitted = self.admission.admit(decision.pool, sequences=decision.sequences)
        except Refusal as refusal:
            raise refusal.with_headers(decision.headers | {"x-gptoss-pool": decision.pool}) from None
        decision.pool, decision.spilled_from = admitted.pool, admitted.spilled_from
        decision.cold_start = admitted.cold_start
        self.admit_tenant(decision)

    def admit_tenant(self, decision: Decision) -> None:
        """The key's bounds: sequences in flight and tokens per minute."""
        if self.tenants is None or decision.key_name is None:
            return
        refused = self.tenants.admit(decision.key_name, decision.sequences)
        if refused is None:
            return
        bound, wait = refused
        retry = whole_seconds(wait)
        limit = self.tenants.limit_of(decision.key_name)
        what = (
            f"{limit.concurrent_requests} sequences in flight"
            if bound == "concurrent_requests"
            else f"{limit.tokens_per_minute} tokens per minute"
        )
        message = f"API key '{decision.key_name}' is at its limit of {what}; retry in {retry} s"
        refusal = Refusal.retry_later(Reason.RATE_LIMIT, 429, message, retry, code="rate_limit_exceeded")
        raise refusal.with_headers(decision.headers)

    # -- the request's life after admission ------------------------------------------------------------------

    def started(self, decision: Decision) -> None:
        """Count the admitted request in its pool and its key's usage, until :meth:`finished`."""
        assert decision.pool is not None and not decision.started
        decision.started = True
        self.admission.started(decision.pool, decision.sequences)
        if self.tenants is not None and decision.key_name is not None:
            self.tenants.started(decision.key_name, decision.sequences)

    def finished(self, decision: Decision, tokens: int = 0) -> None:
        """Release what :meth:`started` counted (once), charging the key the tokens the answer used."""
        if not decision.started:
            return
        decision.started = False
        assert decision.pool is not None
        self.admission.finished(decision.pool, decision.sequences)
        if self.tenants is not None and decision.key_name is not None:
            self.tenants.finished(decision.key_name, decision.sequences, tokens)

    # -- the other ingress replicas (peer_counts) -------------------------------------------------------------

    def own_counts(self) -> Counts:
        """What this replica counts, as it shares it with the other ingress replicas."""
        return Counts(
            pool_in_flight=dict(self.admission.in_flight),
            key_in_flight=self.tenants.in_flight_by_key() if self.tenants else {},
            key_requests=dict(self._limiter.taken) if self._limiter else {},
            key_tokens=dict(self.tenants.tokens_spent) if self.tenants else {},
        )

    def take_peers(self, view: PeerView, requests: dict[str, float], tokens: dict[str, float]) -> None:
        """Bound with the peers' in-flight counts from now on, and charge the keys what the peers spent."""
        self.admission.peer_in_flight = dict(view.pool_in_flight)
        if self.tenants is not None:
            self.tenants.peer_in_flight = dict(view.key_in_flight)
            for name, spent in tokens.items():
                self.tenants.charge(name, spent)
        if self._limiter is not None:
            for name, taken in requests.items():
                self._limiter.charge(name, taken)

    # -- whole requests --------------------------------------------------------------------------------------

    async def generation(
        self,
        endpoint: Endpoint,
        headers: Mapping[str, str],
        body: bytes | BodyReader,
        decision: Decision,
        client: str | None = None,
        conversations: ConversationLookup | None = None,
    ) -> Decision:
        """Every step for a generating request (chat, completions, responses), from its bytes to a decision:
        ``headers`` lowercase, ``body`` the bytes or what reads them given the limit (called only once the steps
        before the body passed), ``client`` the client's address, ``conversations`` what finds the stored
        conversation a follow-up continues, if the request's key owns it."""
        self.before_body(headers, decision, client)
        raw = body if isinstance(body, bytes) else await body(self._body_limit)
        # Parsing megabytes on the event loop would stall every stream it relays.
        parsed = await asyncio.to_thread(self.parse_json, raw) if len(raw) > 1 << 20 else self.parse_json(raw)
        previous = None
        previous_id = parsed.get("previous_response_id") if isinstance(parsed, dict) else None
        if endpoint == "responses" and previous_id is not None and conversations is not None:
            previous = await conversations(previous_id, decision, "previous_response_id")
        return self.with_body(endpoint, headers, raw, decision, parsed, previous)

    def before_body(self, headers: Mapping[str, str], decision: Decision, client: str | None = None) -> None:
        """The steps a request passes before its body is worth parsing."""
        self.authenticate(headers, decision, client)
        self.check_media_type(headers)

    def with_body(
        self,
        endpoint: Endpoint,
        headers: Mapping[str, str],
        raw: bytes,
        decision: Decision,
        parsed: Any = None,
        previous: StoredConversation | None = None,
    ) -> Decision:
        """The steps after :meth:`before_body`; ``parsed`` is :meth:`parse_json` of ``raw`` when done already,
        ``previous`` the owned conversation of a follow-up (:meth:`owned`)."""
        body = self.parse_body(raw, decision, parsed)
        self.check_model(body)
        self.resolve_effort(endpoint, body, headers, decision)
        self.check_tools(endpoint, body, decision)
        self.apply_budget(endpoint, body, decision)
        self.prepare_answer(endpoint, body, decision, previous)
        self.count_sequences(endpoint, body, decision)
        self.encode_body(body, decision)
        self.admit(decision)
        return decision

    def models(self, headers: Mapping[str, str], decision: Decision, client: str | None = None) -> Decision:
        """``GET /v1/models``: answered by the default effort's pool, which must have a running replica."""
        self.authenticate(headers, decision, client)
        decision.pool = self._config.pool_for(self._config.default_effort)
        self.admit(decision)
        return decision

    def stored_response(
        self, headers: Mapping[str, str], decision: Decision, client: str | None = None
    ) -> Decision:
        """Reading, listing, cancelling or deleting a stored response: the key (the ingress then looks it up
        and checks :meth:`owned`)."""
        self.authenticate(headers, decision, client)
        return decision
