"""``gptoss-vllm bench lifecycle``: its argument errors and the arithmetic of its figures (its phases run on the
cluster in ``tests/test_cluster_lifecycle.py``)."""

from __future__ import annotations

from gptoss_vllm.bench.lifecycle import ReplicaTrace, StreamOutcome, stream_counts
from tests.support.cli import assert_argument_errors


def test_argument_errors_name_the_argument(tmp_path):
    assert_argument_errors(
        ["bench", "lifecycle"],
        [
            (["--policies", "ongoing,fastest"], "--policies"),
            (["--policies", ""], "--policies"),
            (["--users", "0"], "--users"),
            (["--step", "soon"], "--step"),
            (["--output-tokens", "-1"], "--output-tokens"),
            (["--json", str(tmp_path / "missing" / "out.json")], "--json"),
        ],
    )


def test_replica_seconds_and_scale_times_come_from_the_samples():
    trace = ReplicaTrace(cluster=None, deployment="fast")  # samples given, no cluster asked
    # (time, running, listed): a second replica listed at 11 (the decision), running at 13, gone at 15.
    trace.samples = [(10.0, 1, 1), (11.0, 1, 2), (13.0, 2, 2), (14.0, 2, 2), (15.0, 1, 1), (16.0, 1, 1)]
    # Each sample's listed count held until the next one: a starting replica costs as a running one.
    assert trace.replica_seconds(10.0, 16.0) == 1 + 2 * 2 + 2 * 1 + 2 * 1 + 1
    assert trace.replica_seconds(13.0, 14.0) == 2
    assert trace.first_listed(2, after=10.5) == 0.5
    assert trace.first_running(2, after=10.5) == 2.5
    assert trace.first_running(3, after=10.0) is None


def test_stream_counts_tell_failed_from_cut():
    outcomes = [
        StreamOutcome(200, 0.1, True),
        StreamOutcome(200, 0.2, False, "replica_failed"),
        StreamOutcome(503, None, False, "no replica"),
        StreamOutcome(0, None, False, "ReadTimeout"),
    ]
    assert stream_counts(outcomes) == {
        "requests": 4,
        "failed": 2,
        "cut_streams": 1,
        "errors": ["ReadTimeout", "no replica", "replica_failed"],
    }
