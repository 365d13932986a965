"""What the KubeRay operator does with the chart's RayService, done on this machine's real Ray (the cluster
tests and ``bench lifecycle``).

No Kubernetes API server, kubelet or container runtime runs here, so the operator's two jobs are done from the
rendered objects directly: each pod becomes a ``ray start --block`` process with the pod's rayStartParams (as
KubeRay turns them into flags, with ``--num-cpus``/``--memory`` from the container's resources and
``--address`` for workers) and its container's environment (values as rendered, Secrets resolved from the
rendered Secret objects, ``status.podIP`` as this machine's loopback address); then ``serveConfigV2`` is PUT to
the head's dashboard (``/api/serve/applications/``) with the Ray auth token, as the operator does.

Where one machine differs from pods, and only there, the harness changes what it starts:
- every node shares one network namespace, so each gets its own free ports (GCS, dashboard, agents, metrics
  export) instead of the pods' fixed 6379/8265/52365/8080, and Serve runs one HTTP proxy (on the head, at a
  free port) instead of one per pod on port 8000;
- environment values that name container paths (``HOME``, ``HF_HOME``) are left as this machine's;
- the object store of each node is small (pods have their memory limit; Ray here would see the machine's);
- each worker pod runs on cores of its own, as a pod does on its node (worker ``k`` on core ``k`` modulo the
  cores this process may use; the head floats): vLLM binds its OpenMP threads to the cores it may use, and two
  engines bound to the same cores stall each other (a second fast replica took minutes to start beside a
  loaded one).
GPUs are dropped (the CPU demo asks for none). Nodes are stopped by their process ids (each ``ray start`` is
the leader of its own process group), never by name.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from gptoss_vllm.bench import BenchmarkError
from gptoss_vllm.bench.process import free_port, yield_cpu_to_caller
from gptoss_vllm.serve.app_names import app_of

NODE_IP = "127.0.0.1"
_HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))  # one TLS context for every poll
CONTAINER_PATH_ENV = ("HOME", "HF_HOME", "HF_TOKEN_PATH")
OBJECT_STORE_BYTES = 256 << 20
GIB = 1 << 30


class ClusterError(BenchmarkError, RuntimeError):
    """The emulated cluster could not be built or asked (the message says what, with the nodes' logs)."""


@dataclass(frozen=True)
class PodSpec:
    """One Ray pod of the RayService: its group, ``ray start`` flags and environment."""

    group: str
    params: dict[str, str]
    env: dict[str, str]


@dataclass(frozen=True)
class RayServiceSpec:
    head: PodSpec
    workers: dict[str, tuple[PodSpec, int]]  # group -> (pod, replicas)
    serve_config: dict[str, Any]

    @property
    def auth_token(self) -> str | None:
        return self.head.env.get("RAY_AUTH_TOKEN") if self.head.env.get("RAY_AUTH_MODE") == "token" else None


def _quantity(text: str) -> float:
    units = {
        "Ki": 1 << 10,
        "Mi": 1 << 20,
        "Gi": 1 << 30,
        "Ti": 1 << 40,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def _container_env(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if name in CONTAINER_PATH_ENV:
            continue
        if "value" in item:
            env[name] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            if source["fieldRef"]["fieldPath"] != "status.podIP":
                raise ClusterError(f"env {name}: only status.podIP fieldRefs can be emulated, not {source}")
            env[name] = NODE_IP
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secrets[ref["name"]][ref["key"]]
        else:
            raise ClusterError(f"env {name}: no source this harness knows: {source}")
    return env


def _secrets(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for obj in objects:
        if obj["kind"] == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            found[obj["metadata"]["name"]] = data | dict(obj.get("stringData") or {})
    return found


def _pod(group: str, spec: dict[str, Any], secrets: dict[str, dict[str, str]]) -> PodSpec:
    container = spec["template"]["spec"]["containers"][0]
    params = {key: str(value) for key, value in spec["rayStartParams"].items()}
    resources = container.get("resources", {})
    # KubeRay: --num-cpus and --memory from the container's limits, else its requests (unless set explicitly).
    for flag, resource in (("num-cpus", "cpu"), ("memory", "memory")):
        amount = resources.get("limits", {}).get(resource) or resources.get("requests", {}).get(resource)
        if flag not in params and amount is not None:
            value = _quantity(str(amount))
            params[flag] = str(int(value)) if flag == "memory" else str(max(1, int(value)))
    return PodSpec(group, params, _container_env(container, secrets))


def rayservice_spec(objects: list[dict[str, Any]]) -> RayServiceSpec:
    """The pods and Serve config of the (one) rendered RayService."""
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    secrets = _secrets(objects)
    head = _pod("head", cluster["headGroupSpec"], secrets)
    workers = {
        group["groupName"]: (_pod(group["groupName"], group, secrets), int(group["replicas"]))
        for group in cluster["workerGroupSpecs"]
    }
    return RayServiceSpec(head, workers, yaml.safe_load(service["spec"]["serveConfigV2"]))


def start_command(params: dict[str, str]) -> list[str]:
    """``ray start`` as KubeRay writes it into the pod's command (a shell line), split as the shell does."""
    flags = " ".join(f"--{key}={value}" if value != "true" else f"--{key}" for key, value in params.items())
    return [sys.executable, "-m", "ray.scripts.scripts", "start", *shlex.split(flags)]


@dataclass
class RayNode:
    """One pod's ``ray start --block`` process (the leader of its own process group)."""

    name: str
    group: str
    params: dict[str, str]
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def processes(self) -> list[psutil.Process]:
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def owns(self, pid: int) -> bool:
        return any(proc.pid == pid for proc in self.processes())

    def raylet(self) -> psutil.Process:
        (raylet,) = [p for p in self.processes() if p.name() == "raylet"]
        return raylet

    def lose(self) -> None:
        """Node loss: the raylet killed outright (no drain, no goodbye); ``ray start`` then stops the rest."""
        self.raylet().kill()

    def stop(self, timeout_s: float = 10) -> None:
        stop_nodes([self], timeout_s)


def stop_nodes(nodes: list[RayNode], timeout_s: float = 10) -> None:
    """SIGTERM to every process of ``nodes`` at once, SIGKILL to what outlives ``timeout_s``."""
    procs = [proc for node in nodes for proc in node.processes()]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    for node in nodes:
        shutil.rmtree(node.params["temp-dir"], ignore_errors=True)


@dataclass
class Cluster:
    """A head and the worker pods of a RayService, on this machine."""

    spec: RayServiceSpec
    root: Path
    head: RayNode
    gcs_address: str
    dashboard_url: str
    serve_port: int
    workers: list[RayNode] = field(default_factory=list)

    @property
    def serve_url(self) -> str:
        return f"http://{NODE_IP}:{self.serve_port}"

    def auth_headers(self) -> dict[str, str]:
        token = self.spec.auth_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client_env(self) -> dict[str, str]:
        """What a process outside the pods needs to join the cluster (``serve --address``): the auth token."""
        token = self.spec.auth_token
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {}

    def nodes(self) -> list[RayNode]:
        return [self.head, *self.workers]

    def group(self, name: str) -> list[RayNode]:
        return [node for node in self.workers if node.group == name]

    def deploy(self, serve_config: dict[str, Any] | None = None) -> None:
        """PUT the Serve config (the RayService's serveConfigV2, with this machine's proxy) as KubeRay does."""
        config = dict(serve_config or self.spec.serve_config)
        config["proxy_location"] = "HeadOnly"
        config["http_options"] = {"host": NODE_IP, "port": self.serve_port}
        answer = httpx.put(
            f"{self.dashboard_url}/api/serve/applications/",
            json=config,
            headers=self.auth_headers(),
            timeout=60,
        )
        if answer.status_code != 200:
            raise ClusterError(f"PUT of the Serve config refused: {answer.status_code}: {answer.text}")

    def applications(self) -> dict[str, Any]:
        answer = _HTTP.get(
            f"{self.dashboard_url}/api/serve/applications/", headers=self.auth_headers(), timeout=30
        )
        if answer.status_code != 200:
            raise ClusterError(f"Serve's applications unreadable: {answer.status_code}: {answer.text}")
        return answer.json()

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        """Serve's view of a deployment's replicas (``state``, ``node_id``, ``pid``, ...): a pool's, in the pool's
        application, or ``ingress``."""
        app_status = self.applications().get("applications", {}).get(app_of(deployment)) or {}
        return list(app_status.get("deployments", {}).get(deployment, {}).get("replicas", []))

    def owner(self, pid: int) -> RayNode | None:
        """The running node whose process tree holds ``pid`` (None: a process of no live node)."""
        owners = [node for node in self.nodes() if node.owns(pid)]
        return owners[0] if owners else None

    def node_of(self, pid: int) -> RayNode:
        node = self.owner(pid)
        if node is None:
            raise ClusterError(f"pid {pid} runs on no live node of the cluster")
        return node

    def log_tail(self) -> str:
        return "\n".join(f"--- {node.name}\n{node.log_tail(1500)}" for node in self.nodes())

    def stop(self) -> None:
        # As a deleted RayService's pods go: the workers together, then the head.
        stop_nodes(self.workers)
        stop_nodes([self.head])


def _start_node(
    name: str, pod: PodSpec, params: dict[str, str], root: Path, cores: list[int] | None = None
) -> RayNode:
    log_path = root / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)} | pod.env
    pinned = ["taskset", "--cpu-list", ",".join(map(str, cores))] if cores else []
    proc = subprocess.Popen(
        [*pinned, *start_command(params | {"block": "true"})],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    yield_cpu_to_caller(proc)  # as the stacks do: the pods' engines must not starve the caller
    return RayNode(name, pod.group, params, proc, log_path)


def _one_machine_params() -> dict[str, str]:
    # Ray's socket paths must stay under 108 bytes: a short session root per node, not the test's tmp_path.
    return {
        "temp-dir": tempfile.mkdtemp(prefix="gptoss-ray-", dir="/tmp"),
        "dashboard-agent-listen-port": str(free_port()),
        "metrics-export-port": str(free_port()),
        "object-store-memory": str(OBJECT_STORE_BYTES),
    }


def _wait_for_nodes(cluster: Cluster, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in cluster.nodes():
            if node.proc.poll() is not None:
                raise ClusterError(f"{node.name} exited:\n{node.log_tail()}")
        try:
            answer = _HTTP.get(
                f"{cluster.dashboard_url}/nodes?view=summary", headers=cluster.auth_headers(), timeout=10
            )
            if answer.status_code == 200:
                summary = answer.json().get("data", {}).get("summary", [])
                alive = [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]
                if len(alive) >= count:
                    return
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(1)
    raise ClusterError(f"{count} nodes not alive after {timeout_s} s:\n{cluster.log_tail()}")


def start_cluster(spec: RayServiceSpec, root: Path, timeout_s: float = 180) -> Cluster:
    """The head, then every worker group's pods (``replicas`` each), until all are alive in the GCS."""
    root.mkdir(parents=True, exist_ok=True)
    gcs_port, dashboard_port = free_port(), free_port()
    head_params = (
        spec.head.params
        | _one_machine_params()
        | {
            "head": "true",
            "port": str(gcs_port),
            "dashboard-port": str(dashboard_port),
            "ray-client-server-port": str(free_port()),
            "node-ip-address": NODE_IP,
        }
    )
    head = _start_node("head", spec.head, head_params, root)
    cluster = Cluster(
        spec, root, head, f"{NODE_IP}:{gcs_port}", f"http://{NODE_IP}:{dashboard_port}", free_port()
    )
    cores = sorted(os.sched_getaffinity(0))
    try:
        _wait_for_nodes(cluster, 1, timeout_s)
        for group, (pod, replicas) in spec.workers.items():
            for index in range(replicas):
                params = (
                    pod.params
                    | _one_machine_params()
                    | {
                        "address": cluster.gcs_address,
                        "node-ip-address": NODE_IP,
                    }
                )
                params.pop("num-gpus", None)
                core = cores[len(cluster.workers) % len(cores)]
                cluster.workers.append(_start_node(f"{group}-{index}", pod, params, root, [core]))
        _wait_for_nodes(cluster, 1 + len(cluster.workers), timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster
