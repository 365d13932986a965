"""Every replica's metrics endpoint, and how Prometheus finds them all.

Each replica process (the ingress and every pool replica) serves its own prometheus-client registry on its
own port: ephemeral by default, or the first free port from ``GPTOSS_VLLM_METRICS_PORT`` upwards (Kubernetes, where
a PodMonitor names the port). It announces ``host:port`` and its labels (``component``, ``pool``, ``replica``,
``app``) to one named Ray actor every few seconds; the ingress serves that list in Prometheus' HTTP service
discovery format at ``/metrics/targets`` (to the bearer of the monitoring token only). A replica that stops
announcing is dropped after ``TTL_S``. Any process in the cluster can announce, so the list keeps only label
names Prometheus allows for target labels and none of its ``__`` meta labels (``__address__``, ``__scheme__``,
``__metrics_path__`` would redirect the scrape).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from gptoss_vllm import envs

log = logging.getLogger("ray.serve")

ACTOR_NAME = "gptoss-metrics-targets"
ACTOR_NAMESPACE = "gptoss-vllm"
HEARTBEAT_S = 5.0
TTL_S = 20.0
PORT_ENV = envs.METRICS_PORT.name
PORT_TRIES = 16
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,63}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,100}:[0-9]{1,5}$")


def safe_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels a target may carry: valid names, no ``__`` meta labels, short string values."""
    return {
        name: str(value)[:200]
        for name, value in labels.items()
        if isinstance(name, str) and _LABEL_NAME.match(name) and not name.startswith("__")
    }


class MetricsTargets:
    """The Ray actor holding the announced targets (one per cluster, detached, no CPU)."""

    def __init__(self) -> None:
        self._targets: dict[str, tuple[dict[str, str], float]] = {}

    def announce(self, address: str, labels: dict[str, str]) -> None:
        if isinstance(address, str) and _ADDRESS.match(address) and isinstance(labels, dict):
            self._targets[address] = (safe_labels(labels), time.monotonic())

    def forget(self, address: str) -> None:
        self._targets.pop(address, None)

    def http_sd(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        self._targets = {a: seen for a, seen in self._targets.items() if now - seen[1] < TTL_S}
        return [{"targets": [a], "labels": labels} for a, (labels, _) in sorted(self._targets.items())]


def targets_actor() -> Any:
    """The cluster's targets actor, created on first use (also after it was lost)."""
    import ray

    return (
        ray.remote(MetricsTargets)
        .options(
            name=ACTOR_NAME, namespace=ACTOR_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0
        )
        .remote()
    )


def _port_candidates() -> list[int]:
    base = envs.METRICS_PORT.raw()
    if not base:
        return [0]
    try:
        first = int(base)
    except ValueError:
        raise ValueError(f"{PORT_ENV}={base!r} is not a port number") from None
    return list(range(first, first + PORT_TRIES))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape is noise
        pass


def _text_format_app(registry: CollectorRegistry) -> Any:
    app = make_wsgi_app(registry)

    def text_format(environ: dict, start_response: Any) -> Any:
        # Always the classic text format: offered OpenMetrics, prometheus-client escapes `vllm:` names to
        # `vllm_`, and dashboards and rules would then find nothing.
        environ["HTTP_ACCEPT"] = "text/plain"
        return app(environ, start_response)

    return text_format


class MetricsEndpoint:
    """Serves ``registry`` over HTTP on this node and keeps announcing it until closed."""

    def __init__(self, labels: dict[str, str], registry: CollectorRegistry = REGISTRY) -> None:
        import ray

        host = ray.util.get_node_ip_address()
        for port in _port_candidates():
            try:
                self._server = make_server(
                    host, port, _text_format_app(registry), ThreadingWSGIServer, _QuietHandler
                )
                break
            except OSError:
                continue
        else:
            raise RuntimeError(f"no free metrics port in {_port_candidates()} ({PORT_ENV}) on {host}")
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        self.address = f"{host}:{self._server.server_port}"
        self.labels = labels
        self._task = asyncio.get_running_loop().create_task(self._announce())
        log.info("metrics of %s at http://%s/metrics", labels, self.address)

    async def _announce(self) -> None:
        actor = None
        while True:
            try:
                actor = actor or targets_actor()
                await actor.announce.remote(self.address, self.labels)
            except Exception as exc:  # the actor died with its node: make a new one next time
                log.warning("could not announce metrics target %s: %s", self.address, exc)
                actor = None
            await asyncio.sleep(HEARTBEAT_S)

    def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(Exception):
            targets_actor().forget.remote(self.address)
        self._server.shutdown()
        self._server.server_close()
