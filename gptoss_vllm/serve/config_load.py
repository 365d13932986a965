"""Reading a serving configuration: YAML or an already-parsed document to the schema of ``serve/config.py``,
with the checks pydantic cannot make there (each pool's engine arguments through vLLM's own parser, a custom
router's import). Every error names the file (or source) and the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gptoss_vllm.serve.config import (
    _POOL_NAME,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    IngressView,
    PoolConfig,
    ServeConfig,
)
from gptoss_vllm.serve.pool.engine_args import EngineArgsError, server_argv

_S = TypeVar("_S", bound=BaseModel)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)


def _validate(schema: type[_S], data: Any, source: str) -> _S:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None


def parse_view(data: Any, source: str = "<ingress view>") -> IngressView:
    """Validate the ingress application's settings (:meth:`ServeConfig.view`, as the chart renders it)."""
    return _validate(IngressView, data, source)


def _check_pool(name: str, pool: PoolConfig, model_name: str, source: str) -> None:
    """What pydantic cannot see: the engine arguments as vLLM's parser takes them, and the router's import."""
    try:
        server_argv(pool, model_name)
    except EngineArgsError as exc:
        raise ConfigError(f"{source}: pools.{name}.engine_args: {exc}") from None
    if pool.router != "power_of_two":
        from gptoss_vllm.serve.pool.router import router_class_path

        try:
            router_class_path(pool.router)
        except ImportError as exc:
            raise ConfigError(f"{source}: pools.{name}.router: {exc}") from None


def parse_config(data: Any, source: str = "<config>") -> ServeConfig:
    """Validate an already-parsed YAML/JSON document; errors name ``source`` and the key."""
    config = _validate(ServeConfig, data, source)
    for name, pool in config.pools.items():
        _check_pool(name, pool, config.model_name, source)
    return config


def parse_pool(name: Any, data: Any, model_name: Any, source: str) -> PoolConfig:
    """Validate one pool's section apart from its config (a pool application's arguments); errors name
    ``source`` and the key as in the whole config (``pools.fast.replicas``)."""
    if not isinstance(name, str) or not _POOL_NAME.match(name):
        raise ConfigError(f"{source}: name {name!r} is no pool name (lowercase letters, digits and '-')")
    if not isinstance(model_name, str) or not model_name:
        raise ConfigError(f"{source}: model_name: the model name clients send is missing")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: pools.{name}: a mapping, got {type(data).__name__}")
    try:
        pool = PoolConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: pools.{name}.{_format_errors(exc)}") from None
    _check_pool(name, pool, model_name, source)
    return pool


def load_config(path: str | os.PathLike[str] | None = None) -> ServeConfig:
    """Read and validate a config file; ``None`` is the embedded default."""
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_config(data, str(file))
