"""A small serving config (two pools, no engines started) for the tests of serve's parts, and its variants."""

from __future__ import annotations

import copy

BASE = {
    "model_name": "m",
    "pools": {
        "fast": {
            "model": "/models/x",
            "efforts": ["low", "medium"],
            "spillover": {"to": "deep", "queue_above": 1},
        },
        "deep": {"model": "/models/x", "efforts": ["high"]},
    },
}


def serving_config(**changes) -> dict:
    """``BASE`` with ``changes``: a double underscore walks into nested keys (``pools__fast__replicas=2``)."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data
