"""A pool's ``engine_args`` as vLLM's own server arguments, checked by vLLM's own argument parser.

The YAML keys are vLLM's CLI options (``max_model_len`` or ``max-model-len``); the values go through the same
argparse types and choices as ``vllm serve``, so a typo fails at config load, not on a GPU node an hour later.
"""

from __future__ import annotations

import argparse
import json
from functools import cache
from typing import TYPE_CHECKING, Any

from gptoss_vllm.serve import ServeError

if TYPE_CHECKING:
    from gptoss_vllm.serve.config import PoolConfig

# What gpt-oss needs from vLLM's OpenAI layer: harmony reasoning split and tool calls through `commentary`.
GPT_OSS_DEFAULTS: dict[str, Any] = {
    "reasoning_parser": "openai_gptoss",
    "tool_call_parser": "openai",
    "enable_auto_tool_choice": True,
}
# Owned by the pool or the ingress, not by engine_args.
_RESERVED = {
    "model": "set the pool's `model`",
    "model_tag": "set the pool's `model`",
    "served_model_name": "set the top-level `model_name`",
    "host": "the ingress owns the listening address",
    "port": "the ingress owns the listening address",
    "api_key": "set `auth` (the ingress checks keys)",
    "tool_server": "set the pool's `tools` (python, browser)",
}


class EngineArgsError(ServeError, ValueError):
    """An engine argument vLLM would refuse."""


@cache
def _server_parser() -> argparse.ArgumentParser:
    """vLLM's server parser, whose errors raise instead of exiting the process."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise EngineArgsError(message)

    return make_arg_parser(Parser(prog="engine_args"))


def _actions() -> dict[str, argparse.Action]:
    parser = _server_parser()
    return {a.dest: a for a in parser._actions if a.option_strings}


def server_argv(pool: PoolConfig, model_name: str) -> list[str]:
    """The ``vllm serve`` argument list of one pool's replicas (validated)."""
    actions = _actions()
    argv = ["--model", pool.resolved_model(), "--served-model-name", model_name]
    # vLLM's MCP tool server: it runs the Responses API's tool loop against them. A tool without a url yet is
    # the deployment's own, named before the pool is built (the launcher, the chart).
    servers = [s.url for s in (pool.tools.python, pool.tools.browser) if s is not None and s.url is not None]
    if servers:
        argv += ["--tool-server", ",".join(servers)]
    for key, value in {**GPT_OSS_DEFAULTS, **pool.engine_args}.items():
        dest = key.replace("-", "_")
        if dest in _RESERVED:
            raise EngineArgsError(f"{key}: not an engine argument here ({_RESERVED[dest]})")
        action = actions.get(dest)
        if action is None:
            raise EngineArgsError(f"{key}: vLLM has no such argument")
        flag = next(o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise EngineArgsError(f"{key}: expected true or false, got {value!r}")
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:
            if not isinstance(value, bool):
                raise EngineArgsError(f"{key}: expected true or false, got {value!r}")
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(_text, value)]
        else:
            argv += [flag, _text(value)]
    parse_server_args(argv)
    return argv


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_server_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's server namespace for ``argv``, with vLLM's own post-parse checks."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    args = _server_parser().parse_args(argv)
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:
        raise EngineArgsError(str(exc)) from None
    return args
