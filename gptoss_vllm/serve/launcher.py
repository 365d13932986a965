"""``gptoss-vllm serve``: start (or join) Ray, deploy the app, wait until ready, drain on Ctrl-C.

Local mode (no ``--address``) starts a private Ray instance and builds ``builtin:`` checkpoints first; with
``--address`` the app is deployed to that cluster and deleted again on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from gptoss_vllm import envs
from gptoss_vllm.serve import ServeError
from gptoss_vllm.serve.config import ServeConfig

log = logging.getLogger(__name__)

READY_POLL_S = 0.5
DEPLOY_ATTEMPTS = 3
STATES_POLL_S = 2.0  # how often the progress bar asks Serve for the deployments' states
READY_LINE = "gptoss-vllm is ready at"  # printed once the app answers; process.start_stack waits for it


class LaunchError(ServeError, RuntimeError):
    """The app could not be started; the message says which pool failed and why."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else host}:{self.port}"


def port_is_free(listen: Listen) -> bool:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError:
            return False
    return True


def curl_examples(config: ServeConfig, url: str) -> list[str]:
    """A chat request, and a Responses request for the python tool at an effort whose pool offers it."""
    auth = ' -H "Authorization: Bearer $API_KEY"' if config.auth else ""
    chat = {
        "model": config.model_name,
        "messages": [{"role": "user", "content": "What is 47 + 8?"}],
        "reasoning_effort": "high",
        "max_tokens": 256,
    }
    examples = [("chat/completions", chat)]
    tooled = next((pool for pool in config.pools.values() if "python" in pool.offered_tools()), None)
    if tooled is not None:
        python = {
            "model": config.model_name,
            "input": "What is 50 + 76?",
            "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}],
            "reasoning": {"effort": tooled.efforts[0]},
        }
        examples.append(("responses", python))
    return [
        f"curl -s {url}/v1/{path} -H 'Content-Type: application/json'{auth} -d '{json.dumps(body)}'"
        for path, body in examples
    ]


def _app_names(config: ServeConfig) -> list[str]:
    from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name

    return [*(pool_app_name(name) for name in config.pools), APP_NAME]


def _pool_states(config: ServeConfig) -> dict[str, str]:
    from ray import serve

    from gptoss_vllm.serve.app_names import pool_app_name

    try:
        apps = serve.status().applications
    except Exception:
        return {}
    states = {}
    for name in config.pools:
        app = apps.get(pool_app_name(name))
        deployment = app.deployments.get(name) if app is not None else None
        if deployment is not None:
            states[name] = str(getattr(deployment.status, "value", deployment.status))
    return states


def _failure_detail(config: ServeConfig) -> str:
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception as exc:
        return f"(Serve status unavailable: {exc})"
    lines = []
    for app_name in _app_names(config):
        app = apps.get(app_name)
        if app is None:
            lines.append(f"application {app_name}: gone")
            continue
        if app.message:
            lines.append(f"application {app_name}: {app.message}")
        lines += [f"{name}: {dep.message}" for name, dep in app.deployments.items() if dep.message]
    return "\n".join(lines)


def wait_until_ready(
    config: ServeConfig,
    listen: Listen,
    timeout_s: float,
    failed: list,
    stop: list,
    deployed: list,
) -> None:
    """Poll ``/ready`` with a progress bar of ready pools; raise LaunchError on failure, timeout or Ctrl-C.

    Ready also needs the deploy to have returned (``deployed``, a flag list the deploying thread appends to):
    an app this one replaces (``--address``, same app name) answers ``/ready`` until it is gone."""
    deadline = time.monotonic() + timeout_s
    states_due = 0.0
    with (
        tqdm(total=len(config.pools), desc="pools ready", unit="pool", file=sys.stderr) as bar,
        httpx.Client(timeout=5) as client,  # one TLS context for every poll: a new one is seconds under load
    ):
        while True:
            if stop:
                raise LaunchError("interrupted before the app was ready")
            if failed:
                raise LaunchError(f"deploying the app failed: {failed[0]}\n{_failure_detail(config)}")
            try:
                answer = client.get(f"{listen.url}/ready")
                pools = (
                    answer.json().get("pools", {})
                    if answer.headers.get("content-type") == "application/json"
                    else {}
                )
                bar.n = sum(1 for pool in pools.values() if pool.get("state") != "no_replica")
                if time.monotonic() >= states_due:  # Serve's status is a controller call: not every poll
                    bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in _pool_states(config).items()))
                    states_due = time.monotonic() + STATES_POLL_S
                bar.refresh()
                if answer.status_code == 200 and deployed:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise LaunchError(f"not ready after {timeout_s:.0f} s\n{_failure_detail(config)}")
            time.sleep(READY_POLL_S)


def proxy_environment(config: ServeConfig) -> dict[str, str]:
    """What this machine's Ray needs for the config: the proxy gate with the config's bounds, and a monitoring
    token (a fresh one unless the environment has one) for the local Prometheus's service discovery."""
    from gptoss_vllm.serve.proxy.settings import gate_env

    ingress = config.ingress
    env = gate_env(
        config.body_limit(), ingress.max_header_bytes, ingress.body_timeout_s, ingress.body_shape.limits()
    )
    env[ingress.monitoring_token_env] = envs.lookup(ingress.monitoring_token_env) or secrets.token_urlsafe(24)
    return env


def run(
    config: ServeConfig,
    listen: Listen,
    address: str | None,
    ready_timeout_s: float,
    prometheus_port: int | None = None,
) -> int:
    """Run the app until SIGINT/SIGTERM (with a local Prometheus when ``prometheus_port`` is given); returns
    the process exit code."""
    import ray
    from ray import serve

    from gptoss_vllm.observability.local_prometheus import LocalPrometheus, PrometheusError
    from gptoss_vllm.serve.app import run_targets
    from gptoss_vllm.serve.core_split import split_cores
    from gptoss_vllm.serve.local_tools import LocalTools, ToolStartError
    from gptoss_vllm.serve.pool.deployment import ensure_builtin_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the readiness polls are not news
    local = address is None
    tools = LocalTools(Path(tempfile.mkdtemp(prefix="gptoss-vllm-tools-")))
    if local:
        for pool in config.pools.values():
            ensure_builtin_model(pool.model)
        # Ray's processes (the proxy with its gate, the ingress) inherit this environment.
        os.environ.update(proxy_environment(config))
        ray.init(
            address="local", include_dashboard=False, object_store_memory=1 << 30, namespace="gptoss-vllm"
        )
        if not ray.cluster_resources().get("GPU"):  # every pool's engine runs on this machine's CPUs
            config = split_cores(config, sorted(os.sched_getaffinity(0)))
        try:  # before the pools: an engine lists its tool servers' tools when it starts
            config = tools.resolve(config)
        except ToolStartError as exc:
            tools.stop()
            ray.shutdown()
            print(f"gptoss-vllm serve: {exc}", file=sys.stderr)
            return 1
    else:
        try:
            ray.init(address=address, namespace="gptoss-vllm")
        except Exception as exc:  # unreachable GCS, or token authentication (Ray's message says how)
            print(
                f"gptoss-vllm serve: --address {address}: could not join the Ray cluster: {exc}\n"
                "A cluster with token authentication (the chart's rayAuth, on by default) needs "
                "RAY_AUTH_MODE=token and its token in $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH "
                "(the chart keeps it in the Secret <release>-gptoss-vllm-ray-auth, key auth_token).",
                file=sys.stderr,
            )
            return 1
    # A flag, not a threading.Event: Event.set from a handler deadlocks with Event.wait in the main thread.
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    failed: list[BaseException] = []
    deployed: list[bool] = []

    def deploy() -> None:
        try:
            serve.start(http_options={"host": listen.host, "port": listen.port})
            for attempt in range(DEPLOY_ATTEMPTS):
                try:
                    serve.run_many(run_targets(config))
                    break
                except Exception as exc:
                    # Ray Serve registers a module for pickling by value around each serialization, for the
                    # whole process and without a lock: the progress bar's serve.status() in the main thread
                    # can unregister it under serve.run, which then fails with "... is not registered for
                    # pickle by value" (a clean-clone run of serve --address did). The deploy is declarative.
                    if "registered for pickle by value" not in str(exc) or attempt == DEPLOY_ATTEMPTS - 1:
                        raise
                    log.warning("deploying again: Ray Serve's serialization raced the status poll (%s)", exc)
            deployed.append(True)
        except BaseException as exc:  # reported by the waiting thread
            failed.append(exc)

    threading.Thread(target=deploy, name="deploy", daemon=True).start()
    code = 0
    prometheus: LocalPrometheus | None = None
    try:
        wait_until_ready(config, listen, ready_timeout_s, failed, stop, deployed)
        print(f"\n{READY_LINE} {listen.url}  (model '{config.model_name}', pools: {', '.join(config.pools)})")
        if prometheus_port is not None:
            token = envs.lookup(config.ingress.monitoring_token_env)
            prometheus = LocalPrometheus(listen.url, prometheus_port, monitoring_token=token)
            prometheus.wait_ready()
            print(f"Prometheus (metrics, recording rules, alerts) at {prometheus.url}")
        tries = "\n  ".join(curl_examples(config, listen.url))
        print(f"Try:\n  {tries}\nCtrl-C drains in-flight requests and stops.", flush=True)
        while not stop:
            time.sleep(0.5)
        print("draining in-flight requests, then stopping ...", file=sys.stderr, flush=True)
    except (LaunchError, PrometheusError) as exc:
        print(f"gptoss-vllm serve: {exc}", file=sys.stderr)
        code = 1
    finally:
        if prometheus is not None:
            prometheus.stop()
        # A second Ctrl-C during the drain stops at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            # The ingress first: it stops taking requests while the pools finish theirs.
            for app_name in reversed(_app_names(config)):
                serve.delete(app_name)
            if local:
                serve.shutdown()
        except KeyboardInterrupt:
            print("stopped without draining", file=sys.stderr)
        finally:
            ray.shutdown()
            tools.stop()
    return code
