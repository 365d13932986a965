"""The pool router's order among equally loaded replicas: the longest known first (Ray Serve's scale-down stops
the newest), kept across replica set changes."""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_vllm.serve.pool.router import ArrivalOrder


@dataclass(frozen=True)
class Replica:
    replica_id: str


def _ids(replicas: list[Replica]) -> list[str]:
    return [r.replica_id for r in replicas]


def test_ties_go_to_the_replica_known_longest_across_replica_set_changes():
    order = ArrivalOrder()
    order.update(["old", "mid"])
    assert _ids(order.oldest_first([Replica("mid"), Replica("old")])) == ["old", "mid"]
    order.update(["mid", "new", "old"])  # after a scale-up, in whatever order Ray lists them
    assert _ids(order.oldest_first([Replica("new"), Replica("mid"), Replica("old")])) == ["old", "mid", "new"]
    # One not heard of yet (a rank from a newer replica set) goes last; a replica gone is forgotten.
    assert _ids(order.oldest_first([Replica("unheard"), Replica("new")])) == ["new", "unheard"]
    order.update(["new"])
    assert list(order.seen) == ["new"]
    order.update(["new", "old"])  # back after a restart: a new arrival, behind "new"
    assert _ids(order.oldest_first([Replica("old"), Replica("new")])) == ["new", "old"]
