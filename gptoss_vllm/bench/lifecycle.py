"""``gptoss-vllm bench lifecycle``: the lifecycle of the service on a multi-node Ray cluster built from the
rendered chart as KubeRay builds it (:mod:`gptoss_vllm.bench.kuberay`), with nano: what an operator asks before
trusting the autoscaler and the rollouts.

Phases, in order, on one cluster (head, two ``fast`` nodes, one ``deep`` node):

- ``deploy``: ``ray start`` of every pod to ``/ready`` 200;
- ``cold_start``: ``deep`` at zero replicas takes requests: how long they are held until answered;
- ``scale[<policy>]``, once per policy: the fast pool (1 to 2 replicas) under a step of sustained streaming load,
  from the step to a second replica running; TTFT p95 during the step and the replica-seconds used; then the
  scale-down once idle, with a long stream running through it;
- ``redeploy[<policy>]``, before each policy but the first: the fast pool's policy changes (a PUT of the new
  serveConfigV2, as KubeRay does on ``helm upgrade``) while a long stream runs on ``deep``: which deployments
  restarted (only ``fast``'s application changed), and whether the stream was cut;
- ``node_loss``: the node of fast's replica loses its raylet mid-traffic: how long until ``fast`` answers again,
  and how the requests sent meanwhile fared.

Every phase counts failed requests and cut streams (a stream that ended without ``[DONE]``, or with an error
event). The figures go to JSON and a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from tqdm import tqdm

from gptoss_vllm.bench.chart import CHART, merge, render
from gptoss_vllm.bench.kuberay import Cluster, ClusterError, RayNode, rayservice_spec, start_cluster
from gptoss_vllm.bench.overhead import machine_info
from gptoss_vllm.loadtest.samples import percentile
from gptoss_vllm.serve.app_names import app_of

MODEL = "gpt-oss-nano"
CPU_DEMO = CHART.parents[1] / "deploy" / "helm" / "values-cpu-demo.yaml"
POLICIES = ("ongoing", "queue", "kv_cache", "ttft")
# Each policy's target for fast, whose engine runs two sequences at a time: two requests in flight per replica
# (what the engine runs at once), one waiting, half the KV cache, a 2 s TTFT p95.
TARGETS = {"ongoing": 2.0, "queue": 1.0, "kv_cache": 0.5, "ttft": 2.0}
FAST_MAX_SEQS = 2
LONG_TOKENS = 30000  # long streams outlast any phase; the bench hangs up on them
DEPLOYMENTS = ("ingress", "fast", "deep")
_HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


@dataclass
class Settings:
    policies: tuple[str, ...] = ("ongoing", "queue")
    step_users: int = 4
    # On two cores a replica takes about 90 s to start beside a loaded one: the step outlasts that.
    step_seconds: float = 180.0
    output_tokens: int = 256
    idle_timeout_s: float = 180.0
    ready_timeout_s: float = 600.0


def values(policy: str) -> dict[str, Any]:
    """The CPU demo's values with two fast nodes, fast scaling 1..2 on ``policy`` and deep from zero."""
    demo = yaml.safe_load(CPU_DEMO.read_text())
    long_context = {
        # Long streams (nano stops early unless told to ignore EOS, and 4096 tokens end too soon).
        "engine_args": {"max_model_len": 32768, "enforce_eager": True},
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
        # The long streams outlast any drain: a restart that cuts them does so after this, not the demo's minutes.
        "drain_timeout_s": 30,
    }
    overlay = {
        # Two fast pods: the second replica has a node to go to, and a lost node's replica comes back.
        "workerGroups": {"fast": {"minReplicas": 2, "maxReplicas": 2}},
        "serve": {
            "pools": {
                "fast": {
                    **long_context,
                    "engine_args": {**long_context["engine_args"], "max_num_seqs": FAST_MAX_SEQS},
                    "replicas": None,
                    "autoscaling": {
                        "policy": policy,
                        "target": TARGETS[policy],
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "upscale_delay_s": 2,
                        "downscale_delay_s": 10,
                    },
                },
                "deep": {
                    **long_context,
                    "replicas": None,
                    "autoscaling": {
                        # An engine-signal policy: Ray's controller loads it from the declarative config.
                        "policy": "queue",
                        "target": 1,
                        "min_replicas": 0,
                        "initial_replicas": 0,
                        "max_replicas": 1,
                        "upscale_delay_s": 0,
                        "downscale_delay_s": 3600,
                    },
                    "cold_start_timeout_s": 300,
                },
            },
            "budgets": {"low": {"max_tokens": LONG_TOKENS}, "high": {"max_tokens": LONG_TOKENS}},
        },
    }
    return merge(demo, overlay)


def serve_config(policy: str) -> dict[str, Any]:
    """The serveConfigV2 the chart renders for :func:`values`."""
    return rayservice_spec(render(values(policy))).serve_config


# -- the client side -------------------------------------------------------------------------------------------


@dataclass
class StreamOutcome:
    status: int
    ttft_s: float | None
    done: bool  # reached [DONE] without an error event
    error: str | None = None
    pool: str | None = None  # the pool that answered (x-gptoss-pool)


def chat_body(effort: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "reasoning_effort": effort,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    effort: str,
    tokens: int,
    on_first_token: Callable[[], None] | None = None,
) -> StreamOutcome:
    started = time.monotonic()
    ttft = None
    try:
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=chat_body(effort, tokens, True)
        ) as r:
            pool = r.headers.get("x-gptoss-pool")
            if r.status_code != 200:
                return StreamOutcome(r.status_code, None, False, (await r.aread()).decode()[:200], pool)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return StreamOutcome(200, ttft, True, None, pool)
                event = json.loads(line[6:])
                if "error" in event:
                    return StreamOutcome(200, ttft, False, event["error"].get("code"), pool)
                if ttft is None and event.get("choices") and event["choices"][0].get("delta"):
                    ttft = time.monotonic() - started
                    if on_first_token:
                        on_first_token()
            return StreamOutcome(200, ttft, False, "ended without [DONE]", pool)
    except httpx.HTTPError as exc:
        return StreamOutcome(0, ttft, False, type(exc).__name__)


class LongStream:
    """One stream that runs until the bench hangs up on it (it outlasts every phase), on a thread."""

    def __init__(self, url: str, effort: str) -> None:
        self.outcome: StreamOutcome | None = None
        self.generating = threading.Event()
        self._hang_up = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(url, effort)), daemon=True)
        self._thread.start()

    async def _run(self, url: str, effort: str) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=30)) as client:
            task = asyncio.create_task(_stream(client, url, effort, LONG_TOKENS, self.generating.set))
            while not self._hang_up.is_set() and not task.done():
                await asyncio.sleep(0.2)
            if task.done():
                self.outcome = task.result()
            else:
                task.cancel()

    def wait_generating(self, timeout_s: float) -> None:
        if not self.generating.wait(timeout_s):
            raise ClusterError(f"a long stream produced no token in {timeout_s:.0f} s: {self.outcome}")

    def hang_up(self) -> dict[str, Any]:
        """Ends it if it still runs: ``running`` (the bench hung up), ``finished``, or ``cut`` with the error."""
        self._hang_up.set()
        self._thread.join(timeout=60)
        if self.outcome is None:
            return {"state": "running"}
        if self.outcome.done:
            return {"state": "finished"}
        return {"state": "cut", "error": self.outcome.error, "status": self.outcome.status}


async def _step_load(url: str, users: int, seconds: float, tokens: int) -> list[StreamOutcome]:
    deadline = time.monotonic() + seconds
    outcomes: list[StreamOutcome] = []

    async def user(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            outcomes.append(await _stream(client, url, "low", tokens))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as client:
        await asyncio.gather(*(user(client) for _ in range(users)))
    return outcomes


def stream_counts(outcomes: list[StreamOutcome]) -> dict[str, Any]:
    """Requests, failed (not 200), cut (200, ended without [DONE] or with an error event), and the errors."""
    failed = [o for o in outcomes if o.status != 200]
    cut = [o for o in outcomes if o.status == 200 and not o.done]
    return {
        "requests": len(outcomes),
        "failed": len(failed),
        "cut_streams": len(cut),
        "errors": sorted({o.error for o in failed + cut if o.error}),
    }


# -- the cluster side ------------------------------------------------------------------------------------------


@dataclass
class ReplicaTrace:
    """One deployment's replicas, sampled every ``every_s`` on a thread: (time, running, listed), where listed
    counts every replica Serve has (starting and stopping ones too: the autoscaler's decision)."""

    cluster: Cluster | None
    deployment: str
    every_s: float = 0.5
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[ReplicaTrace]:
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                with contextlib.suppress(ClusterError, httpx.HTTPError):
                    states = [r.get("state") for r in self.cluster.replicas(self.deployment)]
                    self.samples.append((time.monotonic(), states.count("RUNNING"), len(states)))
                stop.wait(self.every_s)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def first_running(self, count: int, after: float) -> float | None:
        """Seconds from ``after`` to the first sample with ``count`` or more replicas running."""
        return next((t - after for t, n, _ in self.samples if t >= after and n >= count), None)

    def first_listed(self, count: int, after: float) -> float | None:
        """Seconds from ``after`` to the first sample with ``count`` or more replicas in any state."""
        return next((t - after for t, _, n in self.samples if t >= after and n >= count), None)

    def replica_seconds(self, start: float, end: float) -> float:
        """Replicas integrated over [start, end], each sample's count held until the next sample: every listed
        replica (a starting one holds its node's resources as a running one does)."""
        total, points = 0.0, [(t, n) for t, _, n in self.samples if start <= t <= end]
        for (t0, n0), (t1, _) in itertools.pairwise(points):
            total += n0 * (t1 - t0)
        return total


def _replica_ids(cluster: Cluster, deployment: str) -> set[str]:
    return {r["replica_id"] for r in cluster.replicas(deployment) if r.get("state") == "RUNNING"}


def _settled(apps: dict[str, Any]) -> bool:
    """Every application RUNNING and every replica of theirs (Serve's status of them) too: none starting, none
    draining."""
    for name in DEPLOYMENTS:
        app = apps.get(app_of(name), {})
        replicas = app.get("deployments", {}).get(name, {}).get("replicas", [])
        if app.get("status") != "RUNNING" or any(r.get("state") != "RUNNING" for r in replicas):
            return False
    return True


def _stopping(cluster: Cluster, deployment: str) -> bool:
    """A replica of ``deployment`` is draining."""
    return any(r.get("state") == "STOPPING" for r in cluster.replicas(deployment))


def _one_replica(cluster: Cluster, deployment: str) -> bool:
    """Exactly one replica, running: none starting, none stopping."""
    return [r.get("state") for r in cluster.replicas(deployment)] == ["RUNNING"]


def _apps(cluster: Cluster) -> dict[str, Any]:
    return cluster.applications().get("applications", {})


def wait_for(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    cluster: Cluster,
    every_s: float = 0.5,
    lost: RayNode | None = None,
) -> float:
    """Seconds until ``predicate`` holds; a :class:`ClusterError` with the nodes' logs after ``timeout_s``, or
    as soon as a node other than ``lost`` exits."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise ClusterError(f"bench lifecycle: {what} not after {timeout_s:.0f} s\n{cluster.log_tail()}")
        for node in cluster.nodes():
            if node is not lost and node.proc.poll() is not None:
                raise ClusterError(f"bench lifecycle: {node.name} exited during {what}:\n{node.log_tail()}")
        time.sleep(every_s)
    return time.monotonic() - started


def ready(cluster: Cluster) -> bool:
    try:
        return _HTTP.get(f"{cluster.serve_url}/ready", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- phases ----------------------------------------------------------------------------------------------------


def deploy(settings: Settings, root: Path) -> tuple[Cluster, dict[str, Any]]:
    """The cluster from the rendered chart, deployed and ready; its figures."""
    started = time.monotonic()
    cluster = start_cluster(rayservice_spec(render(values(settings.policies[0]))), root)
    try:
        nodes_up = time.monotonic() - started
        cluster.deploy()
        wait_for(lambda: ready(cluster), settings.ready_timeout_s, "the first deploy ready", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster, {"nodes_up_s": round(nodes_up, 1), "ready_s": round(time.monotonic() - started, 1)}


def cold_start(cluster: Cluster) -> dict[str, Any]:
    """Three requests to ``deep`` at zero replicas: held until a replica starts, then answered."""
    started = time.monotonic()
    outcomes = asyncio.run(_cold_requests(cluster.serve_url))
    return {
        "held_until_answered_s": round(time.monotonic() - started, 1),
        "answered_by": sorted({o.pool for o in outcomes if o.pool}),
        **stream_counts(outcomes),
    }


async def _cold_requests(url: str) -> list[StreamOutcome]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30)) as client:
        return list(await asyncio.gather(*(_stream(client, url, "high", 16) for _ in range(3))))


def scale(cluster: Cluster, policy: str, settings: Settings) -> dict[str, Any]:
    """The fast pool under a step of ``step_users`` streams for ``step_seconds``, then idle but for one long
    stream until it is back at one replica."""
    trace = ReplicaTrace(cluster, "fast")
    with trace.sampling():
        step_start = time.monotonic()
        outcomes = asyncio.run(
            _step_load(cluster.serve_url, settings.step_users, settings.step_seconds, settings.output_tokens)
        )
        step_end = time.monotonic()
        # The scale-down comes while a long stream runs: it must finish on its replica or keep running. Serve
        # picks the replica to stop without looking at its requests, so the stream may be on the one draining:
        # it is judged while the drain runs (a stream outlasting ``drain_timeout_s`` is cut by design after it).
        long = LongStream(cluster.serve_url, "low")
        down_s = through_scale_down = None
        with contextlib.suppress(ClusterError):
            wait_for(
                lambda: _stopping(cluster, "fast") or _one_replica(cluster, "fast"),
                settings.idle_timeout_s,
                "fast scaling down",
                cluster,
            )
            time.sleep(3)  # a stream cut by the scale-down has ended by now
            through_scale_down = long.hang_up()
            wait_for(
                lambda: _one_replica(cluster, "fast"), settings.idle_timeout_s, "fast back to 1", cluster
            )
            down_s = time.monotonic() - step_end
        if through_scale_down is None:  # no scale-down came
            through_scale_down = long.hang_up()
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    p95 = percentile(ttfts, 95)
    return {
        "policy": policy,
        "target": TARGETS[policy],
        # From the step to the autoscaler's decision (a second replica listed), and to it running.
        "scale_decision_s": _round(trace.first_listed(2, step_start)),
        "scale_up_s": _round(trace.first_running(2, step_start)),
        "scale_down_s": _round(down_s),
        "ttft_p95_ms": None if p95 is None else round(1000 * p95),
        "ttft_p50_ms": None if not ttfts else round(1000 * statistics.median(ttfts)),
        "replica_seconds": round(trace.replica_seconds(step_start, step_end), 1),
        "step_s": round(step_end - step_start, 1),
        **stream_counts(outcomes),
        "stream_through_scale_down": through_scale_down,
    }


def redeploy(cluster: Cluster, policy: str, settings: Settings) -> dict[str, Any]:
    """The fast pool's autoscaling policy changes, as ``helm upgrade`` changes serveConfigV2, while a long
    stream runs on ``deep``: which deployments restarted (no replica kept), and what became of the stream."""
    before = {name: _replica_ids(cluster, name) for name in DEPLOYMENTS}
    changed = app_of("fast")
    deployed_at = _apps(cluster)[changed].get("last_deployed_time_s")
    long = LongStream(cluster.serve_url, "high")
    long.wait_generating(120)
    started = time.monotonic()
    cluster.deploy(serve_config(policy))

    def settled() -> bool:
        # Serve took the new config and runs it, and every replica a restart replaced is gone (a draining one
        # still carries its streams).
        apps = _apps(cluster)
        return (
            apps.get(changed, {}).get("last_deployed_time_s") != deployed_at
            and _settled(apps)  # from the same status read: one dashboard call per poll
            and ready(cluster)
        )

    wait_for(settled, settings.ready_timeout_s, "the redeploy settled", cluster)
    took = time.monotonic() - started
    time.sleep(3)
    after = {name: _replica_ids(cluster, name) for name in DEPLOYMENTS}
    return {
        "changed": f"fast autoscaling policy -> {policy}",
        "settled_s": round(took, 1),
        "restarted": sorted(name for name in DEPLOYMENTS if before[name] and not before[name] & after[name]),
        "kept": sorted(name for name in DEPLOYMENTS if before[name] & after[name]),
        "stream_on_deep": long.hang_up(),
    }


def node_loss(cluster: Cluster, settings: Settings) -> dict[str, Any]:
    """The node of fast's replica loses its raylet while a long stream runs on it; requests every second
    until ``fast`` itself answers again (meanwhile low effort may spill over to ``deep``)."""
    wait_for(lambda: _one_replica(cluster, "fast"), settings.idle_timeout_s, "fast at one replica", cluster)
    (replica,) = cluster.replicas("fast")
    lost = cluster.node_of(replica["pid"])

    def _on_live_node(replica: dict[str, Any]) -> bool:
        owner = cluster.owner(replica["pid"])
        return owner is not None and owner is not lost

    long = LongStream(cluster.serve_url, "low")
    long.wait_generating(120)
    # What fast had when the node went (a replica the autoscaler added meanwhile would take the traffic at once).
    at_loss = sorted(
        (str(r.get("state")), owner.name if (owner := cluster.owner(r.get("pid") or -1)) else "no live node")
        for r in cluster.replicas("fast")
    )
    lost.lose()
    # The other pool never notices.
    other = _HTTP.post(
        f"{cluster.serve_url}/v1/chat/completions", json=chat_body("high", 8, False), timeout=300
    )
    probes: list[StreamOutcome] = []

    def fast_answers() -> bool:
        # Traffic every second through the outage (low effort may spill over to deep meanwhile). Serve lists the
        # lost replica as RUNNING until its health check fails, and its process may answer until it sees its
        # raylet gone: fast is back when it answers with a replica on a live node.
        try:
            answer = _HTTP.post(
                f"{cluster.serve_url}/v1/chat/completions", json=chat_body("low", 8, False), timeout=120
            )
        except httpx.HTTPError as exc:
            probes.append(StreamOutcome(0, None, False, type(exc).__name__))
            return False
        pool = answer.headers.get("x-gptoss-pool")
        probes.append(
            StreamOutcome(answer.status_code, None, answer.status_code == 200, answer.text[:200], pool)
        )
        live = [r for r in cluster.replicas("fast") if r.get("state") == "RUNNING" and _on_live_node(r)]
        return answer.status_code == 200 and pool == "fast" and bool(live)

    back = wait_for(
        fast_answers, settings.ready_timeout_s, "fast serving after the node loss", cluster, 1.0, lost=lost
    )
    counts = stream_counts(probes)
    survivors = [r for r in cluster.replicas("fast") if r.get("state") == "RUNNING" and _on_live_node(r)]
    return {
        "node": lost.name,
        "group": lost.group,
        "fast_replicas_at_loss": [f"{state} on {node}" for state, node in at_loss],
        "other_pool_status": other.status_code,
        "recovery_s": round(back, 1),
        "recovered_on": sorted(cluster.node_of(r["pid"]).name for r in survivors),
        "requests": counts["requests"],
        "failed": counts["failed"],
        "errors": counts["errors"],
        "answered_by": sorted({o.pool for o in probes if o.pool}),
        # On the lost node: it ends, with an error event that says so (replica_failed), not a silent hang.
        "stream_on_lost_node": long.hang_up(),
    }


def run_lifecycle(
    settings: Settings, json_path: str | None = None, keep: Path | None = None
) -> dict[str, Any]:
    """Every phase on one cluster; the report (also written to ``json_path``)."""
    for policy in settings.policies:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
    report: dict[str, Any] = {"machine": machine_info(), "settings": asdict(settings), "phases": {}}
    phases = report["phases"]
    with (
        tempfile.TemporaryDirectory(prefix="gptoss-lifecycle-") as tmp,
        tqdm(total=3 + 2 * len(settings.policies) - 1, desc="bench lifecycle", unit="phase") as bar,
    ):

        def done(name: str, figures: dict[str, Any]) -> None:
            phases[name] = figures
            bar.set_postfix_str(name)
            bar.update()

        cluster, figures = deploy(settings, (keep or Path(tmp)) / "cluster")
        try:
            done("deploy", figures)
            done("cold_start", cold_start(cluster))
            for index, policy in enumerate(settings.policies):
                if index:
                    done(f"redeploy[{policy}]", redeploy(cluster, policy, settings))
                done(f"scale[{policy}]", scale(cluster, policy, settings))
            done("node_loss", node_loss(cluster, settings))
        finally:
            cluster.stop()
    report["misses"] = misses(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def misses(report: dict[str, Any]) -> list[str]:
    """Where a phase missed a target: a failed request or a cut stream (the stream on a lost node is expected
    to end, with ``replica_failed``), a scale-up that never came, a pool the redeploy restarted unchanged."""
    found = []
    for name, figures in report["phases"].items():
        if figures.get("failed"):
            found.append(f"{name}: {figures['failed']} failed request(s): {figures.get('errors')}")
        if figures.get("cut_streams"):
            found.append(f"{name}: {figures['cut_streams']} cut stream(s): {figures.get('errors')}")
        for key in ("stream_through_scale_down", "stream_on_deep"):
            if figures.get(key, {}).get("state") == "cut":
                found.append(f"{name}: {key} cut ({figures[key].get('error')})")
        lost = figures.get("stream_on_lost_node", {})
        if lost and lost.get("error") != "replica_failed":
            found.append(f"{name}: the stream on the lost node ended {lost} (expected replica_failed)")
        if name.startswith("scale[") and figures.get("scale_up_s") is None:
            found.append(
                f"{name}: no second replica running during the step (a longer --step lets one start)"
            )
        if name.startswith("redeploy[") and set(figures["restarted"]) - {"fast"}:
            found.append(f"{name}: restarted {figures['restarted']}, only fast changed")
    return found


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; nano on a one-machine cluster from the chart", ""]
    for name, figures in report["phases"].items():
        shown = ", ".join(
            f"{k} {v['state'] if isinstance(v, dict) and 'state' in v else v}"
            for k, v in figures.items()
            if not (isinstance(v, list) and not v)
        )
        lines.append(f"{name:<18} {shown}")
    lines += ["", *(f"MISSED {miss}" for miss in report.get("misses", []))] if report.get("misses") else []
    return "\n".join(lines)
