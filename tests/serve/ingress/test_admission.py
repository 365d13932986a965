"""Admission without engines: the pools' queue bounds, spillover, no replica, and a pool scaled to zero."""

from __future__ import annotations

import pytest

from gptoss_vllm.serve.config_load import parse_config
from gptoss_vllm.serve.ingress.admission import Admission
from gptoss_vllm.serve.ingress.refusal import Refusal
from tests.support.serving_config import serving_config


def test_admission_queue_bound_spillover_and_no_replica():
    config = parse_config(
        serving_config(
            pools__fast__max_ongoing_requests=2,
            pools__fast__max_queued_requests=2,
            pools__deep__max_ongoing_requests=1,
            pools__deep__max_queued_requests=0,
        )
    )
    admission = Admission(config)
    with pytest.raises(Refusal) as err:
        admission.admit("deep")
    assert (err.value.status, err.value.reason) == (503, "no_replica")
    admission.running.update(fast=1, deep=1)
    placed = []
    for _ in range(6):
        try:
            decision = admission.admit("fast")
        except Refusal as exc:
            placed.append(exc.reason)
            continue
        admission.started(decision.pool)
        placed.append(f"{decision.pool}<-{decision.spilled_from}" if decision.spilled_from else decision.pool)
    # 2 run, 2 wait (the second passes queue_above 1), the next spills to deep (1 slot), then fast is full.
    assert placed == ["fast", "fast", "fast", "fast", "deep<-fast", "queue_full"]
    assert admission.queue_depth("fast") == 2
    admission.finished("fast")
    # With no running replica, a pool spills if it can, else refuses at once.
    admission.running["fast"] = 0
    admission.finished("deep")
    assert admission.admit("fast").spilled_from == "fast"


def test_a_pool_scaled_to_zero_holds_its_requests_up_to_its_queue_bound_and_stays_ready():
    config = parse_config(
        serving_config(
            pools__fast__replicas=None,
            pools__fast__autoscaling={"min_replicas": 0, "max_replicas": 2},
            pools__fast__max_queued_requests=2,
            pools__fast__spillover={"to": "deep", "queue_above": 1},
        )
    )
    fast = config.pools["fast"]
    assert (fast.min_replicas, fast.scales_from_zero) == (0, True)
    assert (config.pools["deep"].min_replicas, config.pools["deep"].scales_from_zero) == (1, False)
    admission = Admission(config)
    admission.running["deep"] = 1
    assert admission.pool_state("fast") == "scaled_to_zero"
    assert admission.pool_state("deep") == "serving"
    # Not spilled although deep has room: Ray Serve starts a replica only for requests sent to the pool.
    first = admission.admit("fast")
    assert (first.pool, first.spilled_from, first.cold_start) == ("fast", None, True)
    admission.started("fast")
    assert admission.pool_state("fast") == "cold_start"
    admission.admit("fast")
    admission.started("fast")
    # Past queue_above the rest spills while the replica starts; with no room there, the queue bound holds.
    assert admission.admit("fast").spilled_from == "fast"
    admission.running["deep"] = 0
    with pytest.raises(Refusal) as err:
        admission.admit("fast")
    assert (err.value.status, err.value.reason) == (429, "queue_full")
    assert admission.pool_state("deep") == "no_replica"
    # Once a replica runs, requests are ordinary ones again.
    admission.running["fast"] = 1
    assert admission.admit("fast").cold_start is False
    assert admission.pool_state("fast") == "serving"
