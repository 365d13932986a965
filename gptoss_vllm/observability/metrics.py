"""The ingress's Prometheus metrics (prometheus-client), all prefixed ``gptoss_``.

Labels are bounded: efforts and effort sources are closed sets, pools come from the config, endpoints are the
routes the ingress serves, statuses are HTTP codes. No request ids, keys or client-sent model strings.
Every replica process (ingress and pools) exposes its registry on its own port (see ``targets``), so the
``pool``/``replica`` of a pool's ``vllm:*`` series come from the scrape target, and the ``pool`` label here is
the pool the ingress sent the request to.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gptoss_vllm.refusal_reasons import Reason

# Tens of milliseconds (a cached prefix on a GPU) to minutes (a high-effort answer on a CPU).
LATENCY_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Between two tokens of one stream: ~5 ms on a GPU, ~100 ms on a small CPU.
INTER_TOKEN_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
# A replica's start: the engine loads its weights (seconds for nano, minutes for gpt-oss-120b).
COLD_START_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)
NONE = "none"  # label value when a request was refused before its effort or pool was known

REQUEST_LABELS = ("endpoint", "effort", "effort_source", "pool", "status")
LATENCY_LABELS = ("endpoint", "effort", "pool")


class IngressMetrics:
    """The metric families of one ingress process, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "gptoss_requests", "Requests answered by the ingress", REQUEST_LABELS, registry=registry
        )
        self.request_duration = Histogram(
            "gptoss_request_duration_seconds",
            "Time from the request's arrival to the last byte of its answer",
            LATENCY_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "gptoss_time_to_first_token_seconds",
            "Streams: time from arrival to the first generated token (reasoning or answer)",
            LATENCY_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.time_to_first_answer_token = Histogram(
            "gptoss_time_to_first_answer_token_seconds",
            "Streams: time from arrival to the first token of the final answer (after the analysis) or tool call",
            LATENCY_LABELS,
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "gptoss_inter_token_latency_seconds",
            "Streams: time between two consecutive token-carrying events",
            LATENCY_LABELS,
            buckets=INTER_TOKEN_BUCKETS_S,
            registry=registry,
        )
        self.output_tokens = Counter(
            "gptoss_output_tokens",
            "Generated tokens, from the answers' usage: kind is reasoning or answer",
            ("effort", "pool", "kind"),
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "gptoss_prompt_tokens",
            "Prompt tokens, from the answers' usage",
            ("effort", "pool"),
            registry=registry,
        )
        self.in_flight = Gauge(
            "gptoss_in_flight_requests",
            "Sequences (n x prompts) this ingress has sent to a pool and not finished", ("pool",),
            registry=registry,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "gptoss_queue_depth",
            "In-flight requests beyond the pool's running capacity (replicas x max_ongoing_requests)",
            ("pool",),
            registry=registry,
        )
        self.queue_limit = Gauge(
            "gptoss_queue_limit",
            "The pool's max_queued_requests (the queue bound)",
            ("pool",),
            registry=registry,
        )
        self.running_replicas = Gauge(
            "gptoss_pool_running_replicas",
            "Replicas of the pool in state RUNNING",
            ("pool",),
            registry=registry,
        )
        self.peer_in_flight = Gauge(
            "gptoss_peer_in_flight_requests",
            "Sequences the other ingress replicas have in flight to the pool, as this replica last heard "
            "(admission bounds their sum with its own)",
            ("pool",),
            registry=registry,
        )
        self.ingress_peers = Gauge(
            "gptoss_ingress_peers", "Other live ingress replicas this replica shares its counts with",
            registry=registry,
        )  # fmt: skip
        self.ingress_peers_lost = Counter(
            "gptoss_ingress_peers_lost",
            "Other ingress replicas this replica stopped hearing of (stopped, scaled down, or their exchange or "
            "this one's stalled past the peers' TTL): until heard again, bounds count without them",
            registry=registry,
        )
        self.min_replicas = Gauge(
            "gptoss_pool_min_replicas",
            "The pool's floor: replicas, or autoscaling.min_replicas (0: it scales to zero when idle)",
            ("pool",),
            registry=registry,
        )
        self.cold_starts = Counter(
            "gptoss_pool_cold_starts",
            "Times the pool went from no running replica to one while it scales from zero",
            ("pool",),
            registry=registry,
        )
        self.cold_start_hold = Histogram(
            "gptoss_cold_start_hold_seconds",
            "Requests that arrived at a pool with no replica: time held until a replica took them (outcome "
            "served) or until cold_start_timeout_s (outcome timed_out, answered 503)",
            ("pool", "outcome"),
            buckets=COLD_START_BUCKETS_S,
            registry=registry,
        )
        self.resends = Counter(
            "gptoss_pool_resends",
            "Requests sent to their pool a second time because the replica that took them was lost before it "
            "answered (nothing had reached the client)",
            ("pool",),
            registry=registry,
        )
        self.spillovers = Counter(
            "gptoss_spillovers", "Requests sent to another pool than their effort's", ("from_pool", "to_pool"),
            registry=registry,
        )  # fmt: skip
        self.rejections = Counter(
            "gptoss_rejections",
            "Requests refused, by reason: " + ", ".join(reason.value for reason in Reason),
            ("reason", "pool"),
            registry=registry,
        )
        self.budget_clamps = Counter(
            "gptoss_budget_clamps", "Requests whose output limit was clamped to the effort's budget", ("effort",),
            registry=registry,
        )  # fmt: skip
        self.api_keys = Gauge(
            "gptoss_api_keys", "API keys in force (0: every request is refused)", registry=registry
        )
        self.api_keys_reload_failures = Counter(
            "gptoss_api_keys_reload_failures",
            "Reloads of the API keys file that failed (the keys in force stay)",
            registry=registry,
        )
        # The Responses conversation store (backend: embedded or redis).
        self.stored_responses = Gauge(
            "gptoss_response_store_responses",
            "Responses in the conversation store (read every few seconds; shared by ingress replicas)",
            ("backend",),
            registry=registry,
        )
        self.store_lookups = Counter(
            "gptoss_response_store_lookups",
            "Stored responses asked for by id: result is hit or miss (unknown, expired, or another key's)",
            ("backend", "result"),
            registry=registry,
        )
        self.store_evictions = Counter(
            "gptoss_response_store_evictions",
            "Responses the store dropped: reason is ttl (past retention) or size (past max_responses)",
            ("backend", "reason"),
            registry=registry,
        )
        self.store_errors = Counter(
            "gptoss_response_store_errors",
            "Store calls that failed (answered 503 with Retry-After), by operation",
            ("backend", "operation"),
            registry=registry,
        )
