"""The cluster lifecycle on a real multi-node Ray cluster built from the rendered chart, as KubeRay builds it
(``gptoss_vllm/bench/kuberay.py``): the CPU demo's values, with the deep pool scaling from zero and the fast group
on two nodes. The tests run in order on one cluster: deploy and route, cold start, node loss (a fast node is
gone from then on), then ``serve --address`` onto the same cluster (last: its Ctrl-C deletes the app)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from gptoss_vllm.bench.kuberay import Cluster, rayservice_spec, start_cluster
from tests.support import http
from tests.support.admission import target_samples
from tests.support.chart import EXAMPLES, example, merge, render
from tests.support.stack import start_stack

CPU_DEMO = next(path for path in EXAMPLES if path.name == "values-cpu-demo.yaml")
HOLD_TOKENS = 30000
TEST_VALUES = {
    # Two fast pods: a lost node's replica comes back on the other.
    "workerGroups": {"fast": {"minReplicas": 2, "maxReplicas": 2}},
    "serve": {
        "pools": {
            "fast": {
                # Long streams for the node-loss test (nano stops early unless told to ignore EOS).
                "engine_args": {"max_model_len": 32768, "enforce_eager": True},
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"},
            },
            "deep": {
                "replicas": None,
                "autoscaling": {
                    # An engine-signal policy: Ray's controller loads it from the declarative config, runs it.
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
        "budgets": {"low": {"max_tokens": HOLD_TOKENS}},
    },
}
DEPLOY_TIMEOUT_S = 600


def _timed(label: str, seconds: float) -> None:
    # The closing note's figures: printed under -s, and kept in the log of a failed test.
    print(f"\n[cluster] {label}: {seconds:.1f} s", file=sys.stderr)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    spec = rayservice_spec(render(merge(example(CPU_DEMO), TEST_VALUES)))
    started = time.monotonic()
    running = start_cluster(spec, tmp_path_factory.mktemp("cluster"))
    try:
        _timed("nodes up (head + 3 workers)", time.monotonic() - started)
        running.deploy()
        _wait_ready(running, DEPLOY_TIMEOUT_S)
        _timed("time to deploy (ray start to /ready 200)", time.monotonic() - started)
        yield running
    finally:
        running.stop()


def _ready(cluster: Cluster) -> httpx.Response | None:
    try:
        return http.get(f"{cluster.serve_url}/ready", timeout=10)
    except httpx.HTTPError:
        return None


def _wait_ready(cluster: Cluster, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = _ready(cluster)
        if answer is not None and answer.status_code == 200:
            return answer.json()
        for node in cluster.nodes():
            assert node.proc.poll() is None, f"{node.name} exited:\n{node.log_tail()}"
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout_s} s:\n{cluster.log_tail()}")


def _ingress_samples(cluster: Cluster) -> dict[tuple[str, frozenset], float]:
    """Every ingress replica's exposition summed, found as Prometheus finds them (the cluster's monitoring token)."""
    token = cluster.spec.head.env["GPTOSS_MONITORING_TOKEN"]
    return target_samples(cluster.serve_url, "ingress", monitoring_token=token)


def _sample(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, found), v in samples.items() if n == name and set(labels.items()) <= found)


def _chat(cluster: Cluster, effort: str, content: str = "What is 47 + 8?", **extra) -> httpx.Response:
    body = {
        "model": "gpt-oss-nano",
        "messages": [{"role": "user", "content": content}],
        "reasoning_effort": effort,
        "max_tokens": 64,
        **extra,
    }
    return http.post(f"{cluster.serve_url}/v1/chat/completions", json=body, timeout=600)


def _running_replica(cluster: Cluster, deployment: str) -> dict:
    running = [r for r in cluster.replicas(deployment) if r.get("state") == "RUNNING"]
    assert len(running) == 1, running
    return running[0]


def test_the_chart_deploys_as_kuberay_does_and_each_pool_runs_on_its_own_group(cluster):
    ready = _wait_ready(cluster, 60)
    assert ready["pools"]["fast"] == {"state": "serving", "running_replicas": 1, "min_replicas": 1}
    # Idle at zero is ready: the head stays in its Service and the pool can start a replica.
    assert ready["pools"]["deep"] == {"state": "scaled_to_zero", "running_replicas": 0, "min_replicas": 0}
    fast = _running_replica(cluster, "fast")
    assert cluster.node_of(fast["pid"]).group == "fast"
    assert not cluster.replicas("deep")
    # The ingress on the head: a pool node's loss must not take every pool's streams with it.
    assert cluster.node_of(_running_replica(cluster, "ingress")["pid"]).group == "head"
    answer = _chat(cluster, "low")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gptoss-pool"] == "fast"
    assert (
        "x-gptoss-replica" not in answer.headers
    )  # the chart's serve section keeps replica ids from clients
    # Ray token authentication is on (the chart's default): the dashboard refuses a caller without the token.
    assert cluster.spec.auth_token
    refused = http.get(f"{cluster.dashboard_url}/api/serve/applications/", timeout=30)
    assert refused.status_code in (401, 403), refused.status_code


def test_a_pool_at_zero_holds_its_first_requests_while_a_replica_starts_on_its_group(cluster):
    samples = _ingress_samples(cluster)
    assert _sample(samples, "gptoss_pool_min_replicas", pool="deep") == 0
    assert _sample(samples, "gptoss_pool_cold_starts_total", pool="deep") == 0
    answers: list[httpx.Response] = []
    started = time.monotonic()
    senders = [threading.Thread(target=lambda: answers.append(_chat(cluster, "high"))) for _ in range(3)]
    for sender in senders:
        sender.start()
    # While they wait, the pool says so and the service stays ready.
    deadline = time.monotonic() + 60
    while (state := _ready(cluster)) is None or state.json()["pools"]["deep"]["state"] != "cold_start":
        assert time.monotonic() < deadline, "the held requests never showed as a cold start"
        time.sleep(0.5)
    assert state.status_code == 200
    for sender in senders:
        sender.join()
    _timed("cold start (first request held until answered)", time.monotonic() - started)
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert {a.headers["x-gptoss-pool"] for a in answers} == {"deep"}  # held, not spilled
    deep = _running_replica(cluster, "deep")
    assert cluster.node_of(deep["pid"]).group == "deep"
    samples = _ingress_samples(cluster)
    assert _sample(samples, "gptoss_pool_cold_starts_total", pool="deep") == 1
    assert _sample(samples, "gptoss_cold_start_hold_seconds_count", pool="deep", outcome="served") == 3
    assert _sample(samples, "gptoss_cold_start_hold_seconds_count", pool="deep", outcome="timed_out") == 0
    held = _sample(samples, "gptoss_cold_start_hold_seconds_sum", pool="deep", outcome="served")
    _timed("cold-start hold, mean of 3 requests", held / 3)
    assert _wait_ready(cluster, 10)["pools"]["deep"]["state"] == "serving"


def test_node_loss_ends_its_streams_cleanly_and_the_pool_comes_back_on_the_groups_other_node(cluster):
    fast = _running_replica(cluster, "fast")
    lost = cluster.node_of(fast["pid"])
    events: list[str] = []

    def stream() -> None:
        body = {
            "model": "gpt-oss-nano",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "reasoning_effort": "low",
            "max_tokens": HOLD_TOKENS - 100,
            "ignore_eos": True,
            "stream": True,
        }
        with http.stream(
            "POST", f"{cluster.serve_url}/v1/chat/completions", json=body, timeout=300
        ) as answer:
            assert answer.status_code == 200
            events.extend(line for line in answer.iter_lines() if line.startswith("data: "))

    streaming = threading.Thread(target=stream)
    streaming.start()
    deadline = time.monotonic() + 120
    while len(events) < 20:
        assert time.monotonic() < deadline and streaming.is_alive(), events[-3:]
        time.sleep(0.2)
    lost.lose()
    lost_at = time.monotonic()
    # The other pool never notices.
    deep = _chat(cluster, "high")
    assert deep.status_code == 200, deep.text
    streaming.join(timeout=300)
    assert not streaming.is_alive()
    *_, last = events
    error = json.loads(last[len("data: ") :])
    assert error["error"]["code"] == "replica_failed", last
    # Back on the group's other node, serving.
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        # Serve lists the lost replica as RUNNING until its health check fails; meanwhile low effort spills
        # over to deep (fast's spillover): the pool is back when fast itself answers.
        alive = [
            r for r in cluster.replicas("fast") if r.get("state") == "RUNNING" and cluster.owner(r["pid"])
        ]
        if alive:
            answer = _chat(cluster, "low")
            if answer.status_code == 200 and answer.headers["x-gptoss-pool"] == "fast":
                break
        assert time.monotonic() < deadline, cluster.log_tail()
        time.sleep(1)
    _timed("node loss to the pool serving again", time.monotonic() - lost_at)
    (replica,) = alive
    survivor = cluster.node_of(replica["pid"])
    assert survivor.group == "fast" and survivor is not lost


def test_serve_address_deploys_onto_the_same_cluster(cluster, tmp_path):
    (app,) = cluster.spec.serve_config["applications"]
    config = dict(app["args"]["serve"], model_name="gpt-oss-nano-by-address")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    # Without the cluster's token, joining fails with a message that says what to set.
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptoss_vllm.cli",
            "serve",
            "--address",
            cluster.gcs_address,
            "--config",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
    )
    assert refused.returncode == 1
    assert "RAY_AUTH_TOKEN" in refused.stderr
    started = time.monotonic()
    stack = start_stack(
        path,
        tmp_path / "serve.log",
        env=cluster.client_env(),
        args=["--address", cluster.gcs_address, "--host", "127.0.0.1"],
        port=cluster.serve_port,
    )
    try:
        _timed("serve --address: redeploy to ready", time.monotonic() - started)
        models = http.get(f"{cluster.serve_url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["gpt-oss-nano-by-address"]
        answer = http.post(
            f"{cluster.serve_url}/v1/chat/completions",
            json={
                "model": "gpt-oss-nano-by-address",
                "messages": [{"role": "user", "content": "Hi"}],
                "reasoning_effort": "low",
                "max_tokens": 32,
            },
            timeout=300,
        )
        assert answer.status_code == 200, answer.text
        assert cluster.node_of(_running_replica(cluster, "fast")["pid"]).group == "fast"
    finally:
        assert stack.stop() == 0, stack.log_tail()
    # Ctrl-C deleted the app it deployed; the cluster stays.
    assert "gptoss" not in cluster.applications().get("applications", {})
    assert all(node.proc.poll() is None for node in [cluster.head, *cluster.group("deep")])
