"""One record per finished request, and the per-effort figures (percentiles, tokens, goodput) built from them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from gptoss_vllm.loadtest.profiles import EFFORTS
from gptoss_vllm.loadtest.slo import Slo, goodput_bounds


@dataclass
class Sample:
    effort: str
    started: float  # seconds since the run started
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    answer_ttft_s: float | None = None  # first token of the final answer, after the analysis
    tpot_s: float | None = None  # mean time per output token after the first
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    status: int = 0
    error: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _met(sample: Sample, ttft_bound: float | None, tpot_bound: float | None) -> bool:
    if not sample.ok or sample.ttft_s is None:
        return False
    if ttft_bound is not None and sample.ttft_s > ttft_bound:
        return False
    return not (tpot_bound is not None and sample.tpot_s is not None and sample.tpot_s > tpot_bound)


def effort_figures(samples: list[Sample], duration_s: float, slo: Slo | None) -> dict[str, dict[str, Any]]:
    """The summary's ``efforts`` section (every effort present, zeros where no request was made)."""
    figures = {}
    for effort in EFFORTS:
        mine = [s for s in samples if s.effort == effort]
        good = [s for s in mine if s.ok]
        ttft = [s.ttft_s for s in good if s.ttft_s is not None]
        answer = [s.answer_ttft_s for s in good if s.answer_ttft_s is not None]
        tpot = [s.tpot_s for s in good if s.tpot_s is not None]
        e2e = [s.e2e_s for s in good]
        ttft_bound, tpot_bound = goodput_bounds(slo, effort)
        met = sum(1 for s in mine if _met(s, ttft_bound, tpot_bound))
        figures[effort] = {
            "requests": len(mine),
            "failures": len(mine) - len(good),
            "error_rate": (len(mine) - len(good)) / len(mine) if mine else 0.0,
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p95_s": percentile(ttft, 95),
            "answer_ttft_p50_s": percentile(answer, 50),
            "answer_ttft_p95_s": percentile(answer, 95),
            "tpot_p50_s": percentile(tpot, 50),
            "tpot_p95_s": percentile(tpot, 95),
            "e2e_p50_s": percentile(e2e, 50),
            "e2e_p95_s": percentile(e2e, 95),
            "reasoning_tokens": sum(s.reasoning_tokens for s in good),
            "answer_tokens": sum(s.answer_tokens for s in good),
            "goodput_rps": met / duration_s if duration_s > 0 else 0.0,
        }
    return figures


def totals(samples: list[Sample], duration_s: float) -> dict[str, Any]:
    good = [s for s in samples if s.ok]
    tokens = sum(s.reasoning_tokens + s.answer_tokens for s in good)
    return {
        "requests": len(samples),
        "failures": len(samples) - len(good),
        "requests_per_s": len(good) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": tokens / duration_s if duration_s > 0 else 0.0,
    }
