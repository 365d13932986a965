"""The plan: for a total of replicas, one shared pool against effort pools (split every way, and with
spillover), each simulated on the same requests, scored by SLO attainment and goodput per effort.

A traffic description (YAML)::

    rate_rps: 4.0                 # mean arrivals per second
    shape: poisson                # poisson | steady
    duration_s: 600
    efforts: {low: 0.6, medium: 0.25, high: 0.15}
    prompt_tokens: {low: [64, 512], medium: [64, 512], high: [64, 512]}     # uniform between the two
    output_tokens: {low: 300, medium: 1200, high: 4000}                     # mean (exponential), reasoning included

A request meets its SLO when its TTFT is within its effort's ``ttft_p95_s`` and its TPOT within ``tpot_p95_s``
(the ``gptoss_vllm/loadtest/slos`` files); attainment is the share that do, goodput their number per second.
"""

from __future__ import annotations

import copy
import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptoss_vllm.capacity import CapacityError
from gptoss_vllm.capacity.curve import Curve
from gptoss_vllm.capacity.simulate import PoolSpec, Request, simulate
from gptoss_vllm.loadtest.slo import Slo, goodput_bounds

EFFORTS = ("low", "medium", "high")


class PlanError(CapacityError, ValueError):
    """A traffic description that cannot be used; the message names the file and the key."""


class Traffic(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate_rps: float | None = Field(default=None, gt=0)
    rate_rps_per_replica: float | None = Field(
        default=None, gt=0
    )  # scales with the fleet: one load per replica
    shape: Literal["poisson", "steady"] = "poisson"
    duration_s: float = Field(default=600.0, gt=0)
    efforts: dict[Literal["low", "medium", "high"], float]
    prompt_tokens: dict[Literal["low", "medium", "high"], tuple[int, int]]
    output_tokens: dict[Literal["low", "medium", "high"], float]

    @model_validator(mode="after")
    def _every_effort_described(self) -> Traffic:
        if (self.rate_rps is None) == (self.rate_rps_per_replica is None):
            raise ValueError("rate_rps: give rate_rps or rate_rps_per_replica, one of them")
        if abs(sum(self.efforts.values()) - 1) > 1e-6 or any(v < 0 for v in self.efforts.values()):
            raise ValueError("efforts: the shares must be >= 0 and add up to 1")
        for key in ("prompt_tokens", "output_tokens"):
            missing = [e for e, share in self.efforts.items() if share and e not in getattr(self, key)]
            if missing:
                raise ValueError(f"{key}: no figure for effort(s) {', '.join(missing)}")
        for effort, (low, high) in self.prompt_tokens.items():
            if not 1 <= low <= high:
                raise ValueError(f"prompt_tokens.{effort}: [min, max] with 1 <= min <= max")
        return self

    def scaled(self, load: float) -> Traffic:
        """This traffic with its rate times ``load`` (what if it grows by a fifth: 1.2)."""
        rates = {k: getattr(self, k) * load for k in ("rate_rps", "rate_rps_per_replica") if getattr(self, k)}
        return self.model_copy(update=rates)

    def at(self, replicas: int) -> Traffic:
        """This traffic offered to a fleet of ``replicas`` (a per-replica rate grows with it)."""
        if self.rate_rps_per_replica is None:
            return self
        return self.model_copy(update={"rate_rps": self.rate_rps_per_replica * replicas})

    def requests(self, seed: int = 0) -> list[Request]:
        """The arrivals of ``duration_s``, each with its effort and lengths (the same for every configuration)."""
        if self.rate_rps is None:
            raise PlanError("a per-replica rate needs the fleet's size first: Traffic.at(replicas)")
        rng = random.Random(seed)
        efforts = [e for e, share in self.efforts.items() if share]
        weights = [self.efforts[e] for e in efforts]
        out, t = [], 0.0
        while True:
            t += rng.expovariate(self.rate_rps) if self.shape == "poisson" else 1 / self.rate_rps
            if t > self.duration_s:
                return out
            effort = rng.choices(efforts, weights)[0]
            low, high = self.prompt_tokens[effort]
            output = max(1, round(rng.expovariate(1 / self.output_tokens[effort])))
            out.append(Request(t, effort, rng.randint(low, high), output))


def load_traffic(path: str | Path) -> Traffic:
    try:
        return Traffic.model_validate(yaml.safe_load(Path(path).read_text()))
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise PlanError(f"{path}: {key}: {first['msg']}") from None


@dataclass(frozen=True)
class Layout:
    """A configuration: pools of efforts, their replicas, and spillover (from the first pool to the next)."""

    name: str
    pools: tuple[tuple[tuple[str, ...], int], ...]  # (efforts, replicas)
    spill_queue_above: int | None = None

    def specs(self, curve: Curve) -> list[PoolSpec]:
        names = ["shared"] if len(self.pools) == 1 else [f"pool-{'-'.join(e)}" for e, _ in self.pools]
        specs = []
        for i, ((efforts, replicas), name) in enumerate(zip(self.pools, names, strict=True)):
            spill = names[i + 1] if self.spill_queue_above is not None and i + 1 < len(names) else None
            specs.append(PoolSpec(name, efforts, replicas, curve, spill_to=spill,
                                  queue_above=self.spill_queue_above or 0))  # fmt: skip
        return specs


def score(done: list[Request], slo: Slo | None, duration_s: float) -> dict[str, dict[str, float]]:
    """Per effort: requests, SLO attainment, goodput (requests/s within both bounds), TTFT p50/p95."""
    out = {}
    for effort in EFFORTS:
        mine = [r for r in done if r.effort == effort]
        if not mine:
            continue
        ttft_bound, tpot_bound = goodput_bounds(slo, effort)
        good = 0
        for r in mine:
            ok = r.ttft_s is not None
            ok = ok and (ttft_bound is None or r.ttft_s <= ttft_bound)
            ok = ok and (tpot_bound is None or r.tpot_s is None or r.tpot_s <= tpot_bound)
            good += ok
        ttfts = sorted(r.ttft_s if r.ttft_s is not None else float("inf") for r in mine)
        out[effort] = {
            "requests": len(mine),
            "attainment": good / len(mine),
            "goodput_rps": good / duration_s,
            "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        }
    return out


def _groupings(efforts: tuple[str, ...]) -> list[tuple[tuple[str, ...], ...]]:
    """Every way to split the efforts into two or more pools, each pool's efforts contiguous in effort order
    (low with medium, medium with high: a pool serves neighbouring efforts)."""
    out = []
    for cuts in itertools.product((False, True), repeat=len(efforts) - 1):
        if not any(cuts):
            continue
        groups, current = [], [efforts[0]]
        for effort, cut in zip(efforts[1:], cuts, strict=True):
            if cut:
                groups.append(tuple(current))
                current = []
            current.append(effort)
        groups.append(tuple(current))
        out.append(tuple(groups))
    return out


def _work(traffic: Traffic, curve: Curve, efforts: tuple[str, ...]) -> float:
    """Replica-seconds per second the efforts need at a moderate batch (for a first split of replicas)."""
    batch = max(1, curve.max_num_seqs // 2)
    total = 0.0
    for e in efforts:
        share = traffic.efforts.get(e, 0)
        low, high = traffic.prompt_tokens.get(e, (1, 1))
        per_request = (
            curve.prefill_s((low + high) // 2) + traffic.output_tokens.get(e, 1) * curve.tpot_s(batch) / batch
        )
        total += (traffic.rate_rps or 0) * share * per_request
    return total


def _split(total: int, weights: list[float]) -> list[int]:
    """``total`` replicas over pools in proportion to ``weights``, each at least one."""
    shares = [max(1, round(total * w / (sum(weights) or 1))) for w in weights]
    while sum(shares) > total:
        shares[shares.index(max(shares))] -= 1
    while sum(shares) < total:
        shares[shares.index(min(shares))] += 1
    return shares


def layouts(traffic: Traffic, curve: Curve, total: int, spill_queue_above: int = 0) -> list[Layout]:
    """The shared pool, each effort split with replicas in proportion to its work, and the same splits
    with spillover."""
    efforts = tuple(e for e in EFFORTS if traffic.efforts.get(e))
    out = [Layout("shared", ((efforts, total),))]
    for groups in _groupings(efforts):
        if len(groups) > total:
            continue
        replicas = _split(total, [_work(traffic, curve, g) for g in groups])
        pools = tuple(zip(groups, replicas, strict=True))
        label = " | ".join(f"{'+'.join(g)} x{n}" for g, n in pools)
        out.append(Layout(f"split {label}", pools))
        out.append(Layout(f"spill {label}", pools, spill_queue_above))
    return out


def evaluate(
    traffic: Traffic, curve: Curve, slo: Slo | None, layout: Layout, seed: int = 0
) -> dict[str, Any]:
    done = simulate(traffic.requests(seed), layout.specs(curve))
    efforts = score(done, slo, traffic.duration_s)
    requests = sum(f["requests"] for f in efforts.values())
    return {
        "layout": layout.name,
        "pools": [{"efforts": list(e), "replicas": n} for e, n in layout.pools],
        "spill_queue_above": layout.spill_queue_above,
        "efforts": efforts,
        "attainment": sum(f["attainment"] * f["requests"] for f in efforts.values()) / max(requests, 1),
        "min_attainment": min((f["attainment"] for f in efforts.values()), default=0.0),
        "goodput_rps": sum(f["goodput_rps"] for f in efforts.values()),
    }


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The layout whose worst effort fares best, then the most goodput; the shared pool wins ties (fewer
    moving parts)."""
    return max(
        results,
        key=lambda r: (round(r["min_attainment"], 3), round(r["goodput_rps"], 3), r["layout"] == "shared"),
    )


def serving_fragment(result: dict[str, Any], max_ongoing: int) -> dict[str, Any]:
    """The recommended layout as the ``pools`` part of a serving config (replicas fixed, autoscaling bounds
    from half to twice)."""
    pools: dict[str, Any] = {}
    names = ["shared"] if len(result["pools"]) == 1 else ["-".join(p["efforts"]) for p in result["pools"]]
    for i, (pool, name) in enumerate(zip(result["pools"], names, strict=True)):
        entry: dict[str, Any] = {
            "efforts": pool["efforts"],
            "max_ongoing_requests": max_ongoing,
            "autoscaling": {"min_replicas": max(1, pool["replicas"] // 2), "max_replicas": 2 * pool["replicas"],
                            "initial_replicas": pool["replicas"]},
        }  # fmt: skip
        if result["spill_queue_above"] is not None and i + 1 < len(names):
            entry["spillover"] = {"to": names[i + 1], "queue_above": result["spill_queue_above"]}
        pools[name] = entry
    return {"pools": copy.deepcopy(pools)}


def run_plan(
    curves: dict[str, Curve],
    traffic: Traffic,
    slo: Slo | None,
    totals: list[int],
    spill_queue_above: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Every layout at every total of replicas, per curve, with the recommended one marked."""
    from tqdm import tqdm

    work = [(name, total, layout) for name, curve in curves.items() for total in totals
            for layout in layouts(traffic.at(total), curve, total, spill_queue_above)]  # fmt: skip
    plans: dict[str, dict[str, Any]] = {
        name: {"curve": curves[name].to_json(), "totals": {}} for name in curves
    }
    for name, total, layout in tqdm(work, desc="plan", unit="layout"):
        results = plans[name]["totals"].setdefault(str(total), {"layouts": []})["layouts"]
        results.append(evaluate(traffic.at(total), curves[name], slo, layout, seed))
    for plan in plans.values():
        for entry in plan["totals"].values():
            entry["recommended"] = best(entry["layouts"])["layout"]
    return {"traffic": traffic.model_dump(), "slo": slo.model_dump() if slo else None, "plans": plans}


def format_plan(report: dict[str, Any]) -> str:
    lines = []
    for name, plan in report["plans"].items():
        lines.append(
            f"curve {name} ({plan['curve']['model'] or 'model?'}, {plan['curve']['source'] or 'source?'})"
        )
        head = f"{'replicas':>8}  {'layout':<40}" + "".join(f"{e + ' att':>11}" for e in EFFORTS)
        lines.append(head + f"{'goodput/s':>11}")
        for total, entry in plan["totals"].items():
            for result in entry["layouts"]:
                mark = " *" if result["layout"] == entry["recommended"] else ""
                cells = "".join(
                    f"{result['efforts'][e]['attainment']:>11.1%}" if e in result["efforts"] else f"{'-':>11}"
                    for e in EFFORTS
                )
                lines.append(
                    f"{total:>8}  {result['layout'][:40]:<40}{cells}{result['goodput_rps']:>11.2f}{mark}"
                )
    lines.append("* the recommended layout: its worst effort fares best, then the most goodput")
    return "\n".join(lines)


def plot_plan(report: dict[str, Any], path: str | Path) -> None:
    """A PNG per curve row: SLO attainment against total replicas, shared pool vs the best split, per effort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = report["plans"]
    figure, axes = plt.subplots(
        len(plans), len(EFFORTS), figsize=(4 * len(EFFORTS), 3 * len(plans)), squeeze=False
    )
    for row, (name, plan) in enumerate(plans.items()):
        totals = sorted(plan["totals"], key=int)
        for col, effort in enumerate(EFFORTS):
            ax = axes[row][col]
            for label, pick in (
                ("shared", lambda entry: next(r for r in entry["layouts"] if r["layout"] == "shared")),
                ("best split", lambda entry: best([r for r in entry["layouts"] if r["layout"] != "shared"]
                                                  or entry["layouts"])),
            ):  # fmt: skip
                ys = [pick(plan["totals"][t])["efforts"].get(effort, {}).get("attainment") for t in totals]
                ax.plot([int(t) for t in totals], ys, marker="o", label=label)
            ax.set_title(f"{name}: {effort}")
            ax.set_xlabel("total replicas")
            ax.set_ylabel("SLO attainment")
            ax.set_ylim(0, 1.05)
            ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
