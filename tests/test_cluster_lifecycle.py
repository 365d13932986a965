"""The cluster lifecycle on a real multi-node Ray cluster built from the rendered chart, as KubeRay builds it
(``gptoss_vllm/bench/kuberay.py``), through the phases of ``bench lifecycle`` (``gptoss_vllm/bench/lifecycle.py``)
on its smallest settings: the CPU demo's values, with the deep pool scaling from zero and the fast pool scaling
1..2 over two nodes. The tests run in order on one cluster: deploy and route, cold start, a redeploy that changes
the fast pool's policy and a load step on it, node loss (a fast node is gone from then on), then
``serve --address`` onto the same cluster (its Ctrl-C deletes the app), and last the bench's report from the
phases' figures."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from gptoss_vllm.bench import lifecycle
from gptoss_vllm.bench.kuberay import Cluster
from gptoss_vllm.serve.app import config_of
from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name
from tests.support import http
from tests.support.admission import target_samples
from tests.support.stack import start_stack

# The smallest step that sees the autoscaler's decision; a second replica takes longer than this to run beside a
# loaded one on two cores (the bench's default step, 180 s, sees it serve).
# The decision usually comes 3-11 s into the step; on a loaded 2-core machine, right after a redeploy, it came at
# 34 s: the step outlasts that.
SETTINGS = lifecycle.Settings(policies=("ongoing", "queue"), step_users=4, step_seconds=45, output_tokens=128)
PHASES: dict[str, dict] = {}  # the bench's figures, phase by phase, for the last test
DEPLOY_TIMEOUT_S = 600


def _timed(label: str, seconds: float) -> None:
    # The closing note's figures: printed under -s, and kept in the log of a failed test.
    print(f"\n[cluster] {label}: {seconds:.1f} s", file=sys.stderr)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running, figures = lifecycle.deploy(SETTINGS, tmp_path_factory.mktemp("cluster"))
    try:
        PHASES["deploy"] = figures
        _timed("nodes up (head + 3 workers)", figures["nodes_up_s"])
        _timed("time to deploy (ray start to /ready 200)", figures["ready_s"])
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
    token = cluster.spec.head.env["GPTOSS_VLLM_MONITORING_TOKEN"]
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
    figures: dict = {}
    sender = threading.Thread(target=lambda: figures.update(lifecycle.cold_start(cluster)))
    sender.start()
    # While they wait, the pool says so and the service stays ready.
    deadline = time.monotonic() + 60
    while (state := _ready(cluster)) is None or state.json()["pools"]["deep"]["state"] != "cold_start":
        assert time.monotonic() < deadline, "the held requests never showed as a cold start"
        time.sleep(0.5)
    assert state.status_code == 200
    sender.join()
    PHASES["cold_start"] = figures
    _timed("cold start (first request held until answered)", figures["held_until_answered_s"])
    assert (figures["requests"], figures["failed"], figures["cut_streams"]) == (3, 0, 0), figures
    assert figures["answered_by"] == ["deep"]  # held, not spilled
    deep = _running_replica(cluster, "deep")
    assert cluster.node_of(deep["pid"]).group == "deep"
    samples = _ingress_samples(cluster)
    assert _sample(samples, "gptoss_pool_cold_starts_total", pool="deep") == 1
    assert _sample(samples, "gptoss_cold_start_hold_seconds_count", pool="deep", outcome="served") == 3
    assert _sample(samples, "gptoss_cold_start_hold_seconds_count", pool="deep", outcome="timed_out") == 0
    held = _sample(samples, "gptoss_cold_start_hold_seconds_sum", pool="deep", outcome="served")
    _timed("cold-start hold, mean of 3 requests", held / 3)
    assert _wait_ready(cluster, 10)["pools"]["deep"]["state"] == "serving"


def test_a_redeploy_changes_the_fast_pools_policy_and_it_scales_up_under_load_and_back_down(cluster):
    figures = lifecycle.redeploy(cluster, "queue", SETTINGS)
    PHASES["redeploy[queue]"] = figures
    _timed("redeploy of the fast pool's policy, settled", figures["settled_s"])
    # Only fast's application changed: deep and the ingress keep their replicas, and deep's stream runs on.
    assert (figures["restarted"], figures["kept"]) == (["fast"], ["deep", "ingress"]), figures
    assert figures["stream_on_deep"]["state"] == "running", figures
    assert _wait_ready(cluster, 60)["pools"]["fast"]["running_replicas"] == 1
    # Serve runs fast on the new policy: the engines' queue, through the pool's custom policy.
    fast = cluster.applications()["applications"][pool_app_name("fast")]["deployments"]["fast"]
    policy = fast["deployment_config"]["autoscaling_config"]["policy"]
    assert policy["policy_function"].endswith("scaling_policy:EngineSignalPolicy"), policy
    assert policy["policy_kwargs"]["signal"] == "queue", policy
    # The step: fast's engines run two sequences each, so four streams leave two waiting, the queue policy's
    # signal, and the autoscaler adds a replica; idle again, the pool goes back to one.
    figures = lifecycle.scale(cluster, "queue", SETTINGS)
    PHASES["scale[queue]"] = figures
    _timed("scale decision under the load step (queue policy)", figures["scale_decision_s"] or -1)
    assert figures["failed"] == 0 and figures["cut_streams"] == 0, figures
    assert figures["requests"] >= SETTINGS.step_users, figures
    assert figures["scale_decision_s"] is not None and figures["scale_decision_s"] < figures["step_s"], (
        figures
    )
    assert figures["scale_down_s"] is not None, figures
    # At least one replica throughout the step (sampled every 0.5 s), at most two.
    assert 0.9 * figures["step_s"] <= figures["replica_seconds"] <= 2 * figures["step_s"] + 5, figures
    assert figures["ttft_p95_ms"] >= figures["ttft_p50_ms"] > 0, figures
    # Judged 3 s into the scale-down: on the replica kept, or on the one stopped, whose drain holds it.
    assert figures["stream_through_scale_down"]["state"] in ("running", "finished"), figures


def test_node_loss_ends_its_streams_cleanly_and_the_pool_comes_back_on_the_groups_other_node(cluster):
    figures = lifecycle.node_loss(cluster, SETTINGS)
    PHASES["node_loss"] = figures
    _timed("node loss to the pool serving again", figures["recovery_s"])
    # The stream on the lost node ends with an error event that says why; the other pool never notices.
    assert figures["stream_on_lost_node"] == {"state": "cut", "error": "replica_failed", "status": 200}
    assert figures["other_pool_status"] == 200
    assert figures["fast_replicas_at_loss"] == [f"RUNNING on {figures['node']}"], figures
    # Back on the group's other node, serving.
    assert figures["group"] == "fast"
    (survivor,) = figures["recovered_on"]
    assert survivor != figures["node"] and survivor in {node.name for node in cluster.group("fast")}


def test_serve_address_deploys_onto_the_same_cluster(cluster, tmp_path):
    config = config_of(cluster.spec.serve_config).model_dump(exclude_none=True)
    config["model_name"] = "gpt-oss-nano-by-address"
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
    # Ctrl-C deleted the applications it deployed; the cluster stays.
    assert not set(cluster.applications().get("applications", {})) & {
        APP_NAME,
        *map(pool_app_name, ("fast", "deep")),
    }
    assert all(node.proc.poll() is None for node in [cluster.head, *cluster.group("deep")])


def test_the_bench_report_from_these_phases_has_every_figure(cluster):
    # The phases above (on this cluster) are ``bench lifecycle``'s on its smallest settings; its report and
    # table from them.
    assert set(PHASES) == {"deploy", "cold_start", "redeploy[queue]", "scale[queue]", "node_loss"}, PHASES
    report = {"machine": lifecycle.machine_info(), "settings": dataclasses.asdict(SETTINGS), "phases": PHASES}
    report["misses"] = lifecycle.misses(report)
    loaded = json.loads(json.dumps(report))
    assert {"nodes_up_s", "ready_s"} <= set(loaded["phases"]["deploy"])
    assert {"held_until_answered_s", "requests", "failed", "cut_streams"} <= set(
        loaded["phases"]["cold_start"]
    )
    assert {"changed", "settled_s", "restarted", "kept", "stream_on_deep"} <= set(
        loaded["phases"]["redeploy[queue]"]
    )
    scale = loaded["phases"]["scale[queue]"]
    assert {"policy", "target", "scale_decision_s", "scale_up_s", "scale_down_s", "ttft_p95_ms"} <= set(scale)
    assert {"replica_seconds", "requests", "failed", "cut_streams", "stream_through_scale_down"} <= set(scale)
    assert {"recovery_s", "requests", "failed", "stream_on_lost_node"} <= set(loaded["phases"]["node_loss"])
    # What missed a target is named, phase by phase.
    assert all(miss.split(":")[0] in PHASES for miss in report["misses"])
    table = lifecycle.format_table(report)
    assert all(name in table for name in PHASES)
