"""The proxy gate's settings: environment variables every Ray node's proxy reads, and the environment the driver
(``serve``) and the chart set for them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gptoss_vllm import envs
from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.body_shape import ShapeLimits

CALLBACK = "gptoss_vllm.serve.proxy.callback:middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
MAX_BODY_ENV = envs.MAX_BODY_BYTES.name
MAX_HEADER_ENV = envs.MAX_HEADER_BYTES.name
BODY_TIMEOUT_ENV = envs.BODY_TIMEOUT_S.name
# The shape of a JSON body (gptoss_vllm.serve.body_shape), by ShapeLimits field.
SHAPE_ENV = {
    "max_depth": envs.MAX_JSON_DEPTH.name,
    "max_object_members": envs.MAX_JSON_OBJECT_MEMBERS.name,
    "max_array_items": envs.MAX_JSON_ARRAY_ITEMS.name,
    "max_string_bytes": envs.MAX_JSON_STRING_BYTES.name,
    "max_word_bytes": envs.MAX_JSON_WORD_BYTES.name,
}
DEFAULT_MAX_BODY_BYTES = envs.MAX_BODY_BYTES.default  # the serving config's default for a 128k-token context
DEFAULT_MAX_HEADER_BYTES = envs.MAX_HEADER_BYTES.default
DEFAULT_BODY_TIMEOUT_S = envs.BODY_TIMEOUT_S.default
# Ray Serve's per-request controls (ray.serve._private.constants), and its session-affinity header.
CONTROL_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"


class GateError(ServeError, ValueError):
    """A proxy gate setting that cannot be used; the message names the environment variable."""


def env_number(name: str, default: float, kind: type, environ: Mapping[str, str] | None = None) -> Any:
    raw = (envs.lookup(name, environ) or "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise GateError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value <= 0:
        raise GateError(f"{name}={raw!r} must be positive")
    return value


def shape_limits(environ: Mapping[str, str] | None = None) -> ShapeLimits:
    """The body shape bounds from the environment (ShapeLimits' defaults where unset)."""
    defaults = ShapeLimits()
    return ShapeLimits(
        **{
            field: env_number(name, getattr(defaults, field), int, environ)
            for field, name in SHAPE_ENV.items()
        }
    )


def control_headers() -> frozenset[bytes]:
    session = os.environ.get(SESSION_HEADER_ENV, "x-session-id").lower()
    return CONTROL_HEADERS | {session.encode(), session.replace("-", "_").encode()}


def gate_env(
    max_body_bytes: int, max_header_bytes: int, body_timeout_s: float, shape: ShapeLimits | None = None
) -> dict[str, str]:
    """The environment every Ray node's proxy needs for the gate with these bounds."""
    shape = shape or ShapeLimits()
    return {
        CALLBACK_ENV: CALLBACK,
        MAX_BODY_ENV: str(max_body_bytes),
        MAX_HEADER_ENV: str(max_header_bytes),
        BODY_TIMEOUT_ENV: f"{body_timeout_s:g}",
        **{name: str(getattr(shape, field)) for field, name in SHAPE_ENV.items()},
    }
