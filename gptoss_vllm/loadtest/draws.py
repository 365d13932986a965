"""What a load-test user sends, drawn from its own seeded generator, without Locust.

The Locust user (``user.py``) and ``plan validate``'s replay (``capacity/validate.py``) both draw from here, in
the same order, so that a replay sends what the load test sent: the ``n``-th user of a run with seed ``s``
draws from ``random.Random(f"{s}-{n}")``, per request its effort, its prompt's word count and words, and after
each request its think time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gptoss_vllm.loadtest.profiles import Profile

_WORDS = (
    "cluster", "latency", "replica", "token", "budget", "stream", "effort", "router", "queue", "kernel",
    "expert", "memory", "throughput", "service", "request", "answer", "window", "cache", "prefix", "model",
)  # fmt: skip


@dataclass(frozen=True)
class Draw:
    """One request as a user draws it."""

    effort: str
    words: int
    prompt: str


def user_rng(seed: int, user: int) -> random.Random:
    return random.Random(f"{seed}-{user}")


def prompt(rng: random.Random, words: int) -> str:
    body = " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))
    return f"Summarise these notes in one sentence: {body}"


def next_request(rng: random.Random, profile: Profile) -> Draw:
    efforts, weights = zip(*profile.efforts.items(), strict=True)
    effort = rng.choices(efforts, weights)[0]
    words = rng.randint(int(profile.prompt_words.min), int(profile.prompt_words.max))
    return Draw(effort, words, prompt(rng, words))


def think_time(rng: random.Random, profile: Profile) -> float:
    return rng.uniform(profile.think_time_s.min, profile.think_time_s.max)
