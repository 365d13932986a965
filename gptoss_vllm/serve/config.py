"""The serving configuration's schema: one YAML schema for the local ``serve`` command, a Ray cluster and the
Helm chart.

Validated with pydantic; every error names the key (``pools.fast.replicas``) and the file it came from. The
embedded default (``default.yaml`` beside this module) is what ``gptoss-vllm serve`` runs without ``--config``.
Schema only: reading a file and the checks that need vLLM's parser are ``serve/config_load.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gptoss_vllm import envs
from gptoss_vllm.cache import cache_root
from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.body_shape import ShapeLimits

EFFORTS: tuple[str, ...] = ("low", "medium", "high")
Effort = Literal["low", "medium", "high"]
DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")
BUILTIN_PREFIX = "builtin:"
DEFAULT_MAX_MODEL_LEN = 131072  # gpt-oss's context, when a pool does not set max_model_len
BODY_BYTES_PER_TOKEN = 32  # a token's text as escaped JSON, with room for message structure
_POOL_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


class ConfigError(ServeError, ValueError):
    """A serving configuration that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Spillover(_Strict):
    """Overflow to another pool when this one's queue holds more than ``queue_above`` requests."""

    to: str
    queue_above: int = Field(ge=0)


ScalingPolicy = Literal["ongoing", "queue", "kv_cache", "ttft"]
# What each engine-signal policy aims for when the pool names no target: waiting requests per replica, the KV
# cache's use per replica (0..1), and seconds of time to first token.
DEFAULT_SCALING_TARGETS = {"queue": 2.0, "kv_cache": 0.7, "ttft": 2.0}
SCALING_POLICY_FUNCTION = "gptoss_vllm.serve.pool.scaling_policy:EngineSignalPolicy"


class PoolAutoscaling(BaseModel):
    """A pool's autoscaling: Ray Serve's ``autoscaling_config`` fields (``min_replicas``, ``max_replicas``,
    ``upscale_delay_s``, ...; checked by Ray's own schema) and the signal it scales on."""

    model_config = ConfigDict(extra="allow", frozen=True)

    policy: ScalingPolicy = Field(
        default="ongoing",
        description="What the pool scales on: ongoing (Ray Serve's ongoing requests per replica), queue (the "
        "engines' waiting requests per replica), kv_cache (KV-cache use per replica), ttft (time to first "
        "token at ttft_percentile over ttft_window_s, against target seconds)",
    )
    target: float | None = Field(
        default=None,
        gt=0,
        description="The policy's target: ongoing requests, waiting requests or KV-cache use (0..1) per "
        "replica, or TTFT seconds (defaults: Ray's 2 ongoing, 2 waiting, 0.7, 2 s)",
    )
    hysteresis: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Scale down only when one replica fewer stays under target x (1 - hysteresis)",
    )
    ttft_percentile: float = Field(default=95.0, gt=0, lt=100, description="ttft: the percentile scaled on")
    ttft_window_s: float = Field(
        default=30.0, gt=0, description="ttft: the window the percentile is taken over"
    )

    @model_validator(mode="after")
    def _ray_fields(self) -> PoolAutoscaling:
        from ray.serve.config import AutoscalingConfig

        extra = dict(self.model_extra or {})
        if self.policy != "ongoing" and "target_ongoing_requests" in extra:
            raise ValueError(
                f"target_ongoing_requests is policy ongoing's; policy {self.policy} scales on target"
            )
        if self.policy == "ongoing" and self.target is not None and "target_ongoing_requests" in extra:
            raise ValueError("set target or target_ongoing_requests, not both")
        if self.policy == "kv_cache" and self.target is not None and self.target > 1:
            raise ValueError(f"target: KV-cache use is 0..1, got {self.target}")
        AutoscalingConfig(**self.ray_config())  # Ray's own schema; its ValidationError names the bad field
        return self

    @property
    def min_replicas(self) -> int:
        """The floor the pool never goes below (Ray's default is 1)."""
        return int((self.model_extra or {}).get("min_replicas", 1))

    def ray_config(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` of the pool: an engine-signal policy is Ray's custom policy."""
        config = dict(self.model_extra or {})
        if self.policy == "ongoing":
            if self.target is not None:
                config["target_ongoing_requests"] = self.target
            return config
        kwargs = {
            "signal": self.policy,
            "target": self.target or DEFAULT_SCALING_TARGETS[self.policy],
            "hysteresis": self.hysteresis,
        }
        return {**config, "policy": {"policy_function": SCALING_POLICY_FUNCTION, "policy_kwargs": kwargs}}


ToolName = Literal["python", "browser"]
# The Responses API's tool types, and the built-in tool (an MCP server's namespace) that answers each, as vLLM
# maps them.
REQUEST_TOOLS: dict[str, ToolName] = {"code_interpreter": "python", "web_search_preview": "browser"}
_TOOL_SERVER = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


class ToolServer(_Strict):
    """Where a built-in tool's MCP server (``gptoss-vllm tools python|browser``) listens."""

    url: str | None = Field(
        default=None,
        description="host:port of the tool's MCP server (SSE at /sse), as vLLM's --tool-server; none: the "
        "deployment's own (`gptoss-vllm serve` starts one on this machine, the Helm chart its tools.<tool>)",
    )

    @field_validator("url")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None and not _TOOL_SERVER.match(value):
            raise ValueError(f"expected host:port (vLLM adds http:// and /sse), got {value!r}")
        return value


class PoolTools(_Strict):
    """The built-in tools a pool offers: each one's server (its limits are the server's own flags)."""

    python: ToolServer | None = None
    browser: ToolServer | None = None

    def offered(self) -> list[ToolName]:
        return [name for name in ("python", "browser") if getattr(self, name) is not None]  # type: ignore[misc]

    def without_url(self) -> list[ToolName]:
        """The tools whose server is the deployment's own, to be started and named before the pool runs."""
        return [name for name in self.offered() if getattr(self, name).url is None]


class PoolRouting(_Strict):
    """What the ingress routes a pool's requests by: its efforts, bounds, spillover and drain."""

    efforts: list[Effort] = Field(min_length=1)
    max_ongoing_requests: int = Field(default=16, ge=1, description="Concurrent requests per replica")
    max_queued_requests: int = Field(
        default=32, ge=0, description="Queue bound of the whole service; beyond: 429"
    )
    spillover: Spillover | None = None
    drain_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a stopping replica finishes streams"
    )
    cold_start_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A pool scaled to zero (autoscaling.min_replicas 0): how long a request waits for a "
        "replica to start before it is answered 503 with Retry-After",
    )

    @field_validator("efforts")
    @classmethod
    def _unique_efforts(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"lists an effort twice: {value}")
        return value

    @property
    def scales_from_zero(self) -> bool:
        """Whether the pool may have no replica while idle and start one for a request."""
        return self.min_replicas == 0  # type: ignore[attr-defined]  # each subclass has its floor

    def offered_tools(self) -> list[ToolName]:
        """The built-in tools the pool's engines run (each subclass knows them its own way)."""
        raise NotImplementedError


class PoolConfig(PoolRouting):
    """One replica pool: a deployment of identical engines serving some efforts."""

    model: str = Field(description="Local checkpoint path, HF id, or builtin:<preset> (built on first use)")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vLLM engine/server arguments")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of each replica's process")
    replicas: int | None = Field(default=None, ge=1)
    autoscaling: PoolAutoscaling | None = Field(
        default=None, description="Ray Serve's autoscaling_config, and the signal the pool scales on"
    )
    router: Literal["power_of_two", "prefix_aware"] = "power_of_two"
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    tools: PoolTools = Field(
        default_factory=PoolTools, description="The built-in tools (python, browser) the pool offers"
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> PoolConfig:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set either replicas or autoscaling, not both")
        return self

    @property
    def min_replicas(self) -> int:
        """The floor the pool never goes below (Ray's autoscaling default is 1)."""
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas
        return self.replicas or 1

    @property
    def max_model_len(self) -> int:
        """The engine's context length: ``engine_args.max_model_len`` or gpt-oss's own."""
        length = self.engine_args.get("max_model_len") or self.engine_args.get("max-model-len")
        return int(length or DEFAULT_MAX_MODEL_LEN)

    def offered_tools(self) -> list[ToolName]:
        return self.tools.offered()

    def view(self) -> PoolView:
        """What the ingress needs of this pool, and nothing whose change should restart the ingress."""
        routing = self.model_dump(include=set(PoolRouting.model_fields))
        return PoolView(
            **routing,
            min_replicas=self.min_replicas,
            max_model_len=self.max_model_len,
            tools=self.offered_tools(),
        )

    def resolved_model(self) -> str:
        """The checkpoint path (``~`` expanded, builtin presets in the user cache) or the HF id."""
        if self.model.startswith(BUILTIN_PREFIX):
            return str(cache_root() / "models" / self.model[len(BUILTIN_PREFIX) :])
        if self.model.startswith(("~", "/", "./", "../")):
            return os.path.expanduser(self.model)
        return self.model


class PoolView(PoolRouting):
    """A pool as the ingress sees it: its routing, its floor of replicas (a floor of 0 is a cold start) and its
    context length (the body limit follows it). The pool's model, engine and scaling are its own application's."""

    min_replicas: int = Field(default=1, ge=0)
    max_model_len: int = Field(default=DEFAULT_MAX_MODEL_LEN, ge=1)
    tools: list[ToolName] = Field(default_factory=list)

    def offered_tools(self) -> list[ToolName]:
        return list(self.tools)


class Budget(_Strict):
    """The output ceiling of one effort: requests above it are clamped to it or rejected with 400."""

    max_tokens: int = Field(ge=1)
    over_budget: Literal["clamp", "reject"] = "clamp"


class RateLimit(_Strict):
    """What one API key (or, for failed authentication, one client address) may use; each bound optional."""

    requests_per_minute: float | None = Field(default=None, gt=0)
    burst: int = Field(default=10, ge=1, description="Requests at once before requests_per_minute applies")
    concurrent_requests: int | None = Field(
        default=None, ge=1, description="Sequences in flight at once (n x prompts), for the whole service"
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=1, description="Prompt and output tokens (reasoning included) per minute"
    )

    @model_validator(mode="after")
    def _bounds_something(self) -> RateLimit:
        if (
            self.requests_per_minute is None
            and self.concurrent_requests is None
            and not self.tokens_per_minute
        ):
            raise ValueError("set requests_per_minute, concurrent_requests or tokens_per_minute")
        return self


class Auth(_Strict):
    """API keys, from an environment variable and/or a mounted file (``name:key`` or ``key`` per line)."""

    api_keys_env: str | None = None
    api_keys_file: str | None = None
    api_keys_recheck_s: float = Field(
        default=10.0,
        gt=0,
        description="How often, at most, a request makes the ingress look whether api_keys_file changed",
    )
    rate_limit: RateLimit | None = Field(default=None, description="Default limit of every key")
    key_rate_limits: dict[str, RateLimit] = Field(default_factory=dict, description="Per key name")
    failed_auth_per_address: RateLimit = Field(
        default_factory=lambda: RateLimit(requests_per_minute=30, burst=10),
        description="Failed authentications per client address; past it every request of the address is 429",
    )

    @field_validator("failed_auth_per_address")
    @classmethod
    def _rate_only(cls, value: RateLimit) -> RateLimit:
        if value.requests_per_minute is None:
            raise ValueError("needs requests_per_minute (and burst); it counts failed attempts")
        return value

    @model_validator(mode="after")
    def _has_source(self) -> Auth:
        if not self.api_keys_env and not self.api_keys_file:
            raise ValueError("auth needs api_keys_env or api_keys_file")
        return self


class ResponseStoreConfig(_Strict):
    """Where the Responses API's conversations live (``embedded`` SQLite, or ``redis`` for clusters)."""

    backend: Literal["embedded", "redis"] = "embedded"
    path: str | None = Field(default=None, description="embedded: the SQLite file; default in the cache")
    url: str | None = Field(default=None, description="redis: redis://host:6379/0, or rediss:// for TLS")
    password_env: str = Field(
        default=envs.RESPONSE_STORE_PASSWORD.name, description="redis: the variable holding its password"
    )
    tls_ca_file: str | None = Field(default=None, description="redis over TLS: the CA bundle to trust")
    key_prefix: str = Field(default="gptoss:", min_length=1, description="redis: prefix of every key")
    ttl_s: float = Field(default=30 * 86400.0, gt=0, description="How long a response is kept")
    max_responses: int = Field(default=1_000_000, ge=1, description="Past it, the oldest are evicted")
    timeout_s: float = Field(default=2.0, gt=0, description="Per store call; past it: 503")

    @model_validator(mode="after")
    def _backend_settings(self) -> ResponseStoreConfig:
        if self.backend == "redis":
            if not self.url:
                raise ValueError("url: the redis backend needs url (redis://host:port/db or rediss://...)")
            if not re.match(r"^rediss?://", self.url):
                raise ValueError(f"url: {self.url.split('@')[-1]!r} is not a redis:// or rediss:// URL")
        elif self.url is not None:
            raise ValueError("url: only the redis backend takes a url (set backend: redis)")
        return self

    def embedded_path(self) -> Path:
        return Path(self.path) if self.path else cache_root() / "responses.sqlite3"


class BodyShape(_Strict):
    """Bounds on the shape of a JSON request body, checked on its bytes before anything parses it (400 naming the
    bound and the JSON path). The defaults leave room for large tool schemas, long conversations and token-id
    prompts of a whole context."""

    max_depth: int = Field(
        default=ShapeLimits.max_depth,
        ge=8,
        le=256,
        description="Nesting depth of objects and arrays; deeper bodies fail Python's own recursion limits",
    )
    max_object_members: int = Field(
        default=ShapeLimits.max_object_members, ge=16, description="Members per object"
    )
    max_array_items: int = Field(default=ShapeLimits.max_array_items, ge=16, description="Items per array")
    max_string_bytes: int = Field(
        default=ShapeLimits.max_string_bytes, ge=1024, description="Length of one string, in bytes as sent"
    )
    max_word_bytes: int = Field(
        default=ShapeLimits.max_word_bytes,
        ge=256,
        description="One run of letters, punctuation or spaces in a string, in bytes as sent (tokenizing one "
        "costs the square of its length)",
    )

    def limits(self) -> ShapeLimits:
        return ShapeLimits(**self.model_dump())


class IngressConfig(_Strict):
    replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=1000, ge=1)
    max_queued_requests: int = Field(
        default=1000, ge=1, description="Requests waiting for an ingress replica; beyond: 503 + Retry-After"
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of 429/503 answers")
    max_body_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Request body limit (413); default: what the largest pool's max_model_len can use",
    )
    max_header_bytes: int = Field(default=32768, ge=1024, description="Request header limit (431)")
    body_timeout_s: float = Field(default=30.0, gt=0, description="Deadline to receive a whole body (408)")
    body_shape: BodyShape = Field(default_factory=BodyShape)
    expose_replica_ids: bool = Field(default=False, description="Send x-gptoss-replica to clients")
    client_address_header: str | None = Field(
        default=None,
        description="Behind a load balancer: the header whose last entry is the client's address "
        "(x-forwarded-for); unset: the connection's peer",
    )
    monitoring_token_env: str = Field(
        default=envs.MONITORING_TOKEN.name,
        description="Environment variable with the bearer token that GET /metrics/targets requires",
    )


class _Service(_Strict):
    """The service's settings around its pools: a pool's type is its config's or its view's."""

    model_name: str = Field(min_length=1, description="The model name clients send and /v1/models lists")
    default_effort: Effort = "medium"
    budgets: dict[Effort, Budget] = Field(default_factory=dict)
    auth: Auth | None = None
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    response_store: ResponseStoreConfig = Field(default_factory=ResponseStoreConfig)

    @field_validator("pools", check_fields=False)
    @classmethod
    def _pool_names(cls, value: dict[str, PoolRouting]) -> dict[str, PoolRouting]:
        for name in value:
            if not _POOL_NAME.match(name):
                raise ValueError(
                    f"pool name {name!r} must be lowercase letters, digits and '-' (Ray/Kubernetes names)"
                )
        return value

    @model_validator(mode="after")
    def _routing_is_total(self) -> _Service:
        pools: dict[str, PoolRouting] = self.pools  # type: ignore[attr-defined]
        owner: dict[str, str] = {}
        for name, pool in pools.items():
            for effort in pool.efforts:
                if effort in owner:
                    raise ValueError(f"effort {effort!r} is served by two pools: {owner[effort]} and {name}")
                owner[effort] = name
            if pool.spillover is not None:
                if pool.spillover.to not in pools:
                    raise ValueError(f"pools.{name}.spillover.to: no pool named {pool.spillover.to!r}")
                if pool.spillover.to == name:
                    raise ValueError(f"pools.{name}.spillover.to: a pool cannot spill over to itself")
                missing = set(pool.offered_tools()) - set(pools[pool.spillover.to].offered_tools())
                if missing:
                    raise ValueError(
                        f"pools.{name}.spillover.to: {pool.spillover.to} does not offer the tool(s) "
                        f"{', '.join(sorted(missing))} that {name} offers (a spilled request would lose them)"
                    )
        missing = [e for e in EFFORTS if e not in owner]
        if missing:
            raise ValueError(f"no pool serves effort(s) {', '.join(missing)}: every effort needs a pool")
        return self

    def body_limit(self) -> int:
        """``ingress.max_body_bytes``, or room for the largest pool's context as JSON text plus 1 MiB."""
        if self.ingress.max_body_bytes is not None:
            return self.ingress.max_body_bytes
        longest = max(pool.max_model_len for pool in self.pools.values())  # type: ignore[attr-defined]
        return longest * BODY_BYTES_PER_TOKEN + (1 << 20)

    def pool_for(self, effort: str) -> str:
        for name, pool in self.pools.items():  # type: ignore[attr-defined]
            if effort in pool.efforts:
                return name
        raise KeyError(effort)


class ServeConfig(_Service):
    """The whole serving configuration, as an operator writes it."""

    pools: dict[str, PoolConfig] = Field(min_length=1)

    def view(self) -> IngressView:
        """The ingress's settings: all but the pools', of which only their views (a change to a pool's model,
        engine or scaling then restarts that pool's application, not the ingress)."""
        return IngressView(
            **self.model_dump(exclude={"pools"}),
            pools={name: pool.view() for name, pool in self.pools.items()},
        )


class IngressView(_Service):
    """What the ingress application is deployed with: the service's settings and each pool's view."""

    pools: dict[str, PoolView] = Field(min_length=1)
