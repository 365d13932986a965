"""``gptoss-vllm plan validate``: ``bench routing``'s workload replayed through the simulator, each arm's
predicted figures beside the measured ones.

The replay is the load test's own: ``users`` users, each drawing its efforts, prompts and think times from the
same seeded generator as its Locust user (``loadtest/draws.py``), sending its next request once the last is done
and a think time has passed, outputs of the workload's fixed lengths (``ignore_eos``), for the bench's duration.
Prompts are chat messages of ``prompt_words`` words; the engine sees them inside harmony's system and user
framing: ``overhead_tokens + words x tokens_per_word``. A chat stream's first visible delta comes after
``hidden_tokens`` tokens the client never sees (harmony's ``<|channel|>analysis<|message|>``), so a TTFT as
the load test measures it is the first token plus that many of the request's own decode steps.
Both arms' pools come from the serving configs ``bench routing`` ran (replicas, ``max_ongoing_requests``,
spillover; the JSON's ``configs``), every replica on the one measured curve. Goodput counts a request whose first token came within
its effort's TTFT bound, as the bench does.
"""

from __future__ import annotations

import random
from typing import Any

from gptoss_vllm.capacity.curve import Curve
from gptoss_vllm.capacity.simulate import PoolSpec, Request, simulate

FIGURES = ("ttft_p50_s", "ttft_p95_s", "goodput_rps")
WITHIN = 0.30  # a prediction within 30% of the measured figure counts as right


def _pools(arm: dict[str, Any], curve: Curve) -> list[PoolSpec]:
    specs = []
    for name, pool in arm["pools"].items():
        spill = pool.get("spillover") or {}
        specs.append(PoolSpec(name, tuple(pool["efforts"]), int(pool.get("replicas") or 1), curve,
                              max_ongoing=int(pool.get("max_ongoing_requests", 0)), spill_to=spill.get("to"),
                              queue_above=int(spill.get("queue_above", 0))))  # fmt: skip
    return specs


def replay(
    routing: dict[str, Any],
    arm: dict[str, Any],
    curve: Curve,
    ttft_bounds: dict[str, float],
    overhead_tokens: int = 100,
    tokens_per_word: float = 1.3,
    hidden_tokens: int = 3,
    seed: int | None = None,
) -> dict[str, Any]:
    """One arm's load test, simulated: per effort requests, TTFT p50/p95 and goodput; output tokens/s.
    ``seed``: the load test's (default: the one ``routing`` records, else 0)."""
    from gptoss_vllm.loadtest.draws import next_request, think_time, user_rng
    from gptoss_vllm.loadtest.profiles import Profile

    profile = Profile.model_validate(routing["workload"])
    users, duration = int(routing["users"]), float(routing["duration_s"])
    seed = int(routing.get("seed", 0)) if seed is None else seed
    rngs = [user_rng(seed, n) for n in range(users)]
    user_of: dict[int, int] = {}

    def request(user: int, at: float) -> Request | None:
        if at >= duration:
            return None
        draw = next_request(rngs[user], profile)
        prompt_tokens = overhead_tokens + round(draw.words * tokens_per_word)
        sent = Request(at, draw.effort, prompt_tokens, profile.output_tokens[draw.effort])
        user_of[id(sent)] = user
        return sent

    def follow(done: Request) -> Request | None:
        user = user_of[id(done)]
        return request(user, done.done_s + think_time(rngs[user], profile))

    starts = random.Random(seed)
    first = [request(n, starts.uniform(0, 0.1)) for n in range(users)]
    served = simulate([r for r in first if r], _pools(arm, curve), follow)
    # As the load test counts: the streams that ended within the run (a sample is taken when a stream ends).
    finished = [r for r in served if r.done_s is not None and r.done_s <= duration]
    out: dict[str, Any] = {"efforts": {}, "totals": {}}
    for effort in profile.efforts:
        mine = sorted(r.ttft_s + hidden_tokens * (r.tpot_s or 0.0) for r in finished if r.effort == effort)
        if not mine:
            continue
        good = sum(t <= ttft_bounds.get(effort, float("inf")) for t in mine)
        out["efforts"][effort] = {
            "requests": len(mine),
            "ttft_p50_s": mine[len(mine) // 2],
            "ttft_p95_s": mine[min(len(mine) - 1, int(0.95 * len(mine)))],
            "goodput_rps": good / duration,
        }
    out["totals"]["output_tokens_per_s"] = sum(r.output_tokens for r in finished) / duration
    return out


def compare(predicted: dict[str, Any], measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure of one arm: predicted, measured, their ratio, and whether it lands within 30%."""
    rows = []
    pairs = [("throughput", "output_tokens_per_s", predicted["totals"], measured["totals"])]
    for effort in measured["efforts"]:
        for figure in FIGURES:
            pairs.append((effort, figure, predicted["efforts"].get(effort, {}), measured["efforts"][effort]))
    for scope, figure, p, m in pairs:
        got, want = p.get(figure), m.get(figure)
        ratio = got / want if got is not None and want else None
        rows.append({"scope": scope, "figure": figure, "predicted": got, "measured": want, "ratio": ratio,
                     "within": ratio is not None and abs(ratio - 1) <= WITHIN})  # fmt: skip
    return rows


def validate(
    routing: dict[str, Any], curve: Curve, configs: dict[str, dict[str, Any]], **options: Any
) -> dict[str, Any]:
    """Every arm of ``routing`` replayed on ``curve``; ``configs``: each arm's serving config (the routing JSON's
    ``configs``, which ``bench routing`` writes)."""
    from gptoss_vllm.observability.rules import SLOS

    bounds = {effort: slo.ttft_bound_s for effort, slo in SLOS.items()}
    arms = {}
    for arm in routing["arms"]:
        predicted = replay(routing, configs[arm], curve, bounds, **options)
        arms[arm] = {"predicted": predicted, "rows": compare(predicted, routing["arms"][arm])}
    rows = [row for arm in arms.values() for row in arm["rows"]]
    return {"arms": arms, "within": sum(r["within"] for r in rows), "figures": len(rows), "options": options}


def format_validation(report: dict[str, Any]) -> str:
    lines = [f"{'arm':<14}{'scope':<12}{'figure':<22}{'predicted':>11}{'measured':>11}{'ratio':>8}"]
    for arm, entry in report["arms"].items():
        for row in entry["rows"]:
            cells = [
                f"{v:>11.3f}" if v is not None else f"{'-':>11}" for v in (row["predicted"], row["measured"])
            ]
            ratio = f"{row['ratio']:>8.2f}" if row["ratio"] is not None else f"{'-':>8}"
            mark = "" if row["within"] else "  off"
            lines.append(f"{arm:<14}{row['scope']:<12}{row['figure']:<22}{''.join(cells)}{ratio}{mark}")
    lines.append(f"{report['within']} of {report['figures']} figures within {WITHIN:.0%} of the measured")
    return "\n".join(lines)
