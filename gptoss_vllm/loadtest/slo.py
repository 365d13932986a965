"""SLO files: per effort, p50/p95 of TTFT and TPOT, error rate and minimum goodput; checked on a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptoss_vllm.loadtest import LoadTestError


class SloError(LoadTestError, ValueError):
    """An SLO file is missing or invalid; the message names the file and the key."""


class EffortSlo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_p50_s: float | None = Field(None, gt=0)
    ttft_p95_s: float | None = Field(None, gt=0)
    tpot_p50_s: float | None = Field(None, gt=0)
    tpot_p95_s: float | None = Field(None, gt=0)
    max_error_rate: float | None = Field(None, ge=0, le=1)
    # Requests per second that met this effort's TTFT p95 and TPOT p95 bounds individually.
    min_goodput_rps: float | None = Field(None, ge=0)


class Slo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    efforts: dict[Literal["low", "medium", "high"], EffortSlo]


SLOS_DIR = Path(__file__).parent / "slos"


def builtin_slos() -> list[str]:
    return sorted(p.stem for p in SLOS_DIR.glob("*.yaml"))


def load_slo(name_or_path: str | Path) -> Slo:
    """A shipped SLO file by name (``gpu-20b``, ``cpu-nano``), or a YAML file."""
    path = Path(name_or_path)
    if str(name_or_path) in builtin_slos():
        path = SLOS_DIR / f"{name_or_path}.yaml"
    elif path.suffix not in (".yaml", ".yml"):
        raise SloError(
            f"unknown SLO {str(name_or_path)!r}: use one of {', '.join(builtin_slos())} or a YAML file"
        )
    try:
        return Slo.model_validate(yaml.safe_load(path.read_text()))
    except OSError as exc:
        raise SloError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SloError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise SloError(f"{path}: {key}: {first['msg']}") from None


def violations(slo: Slo, efforts: dict[str, dict[str, Any]]) -> list[str]:
    """Every objective a summary's per-effort figures miss, as readable sentences."""
    found = []
    for effort, objective in slo.efforts.items():
        figures = efforts.get(effort)
        if not figures or not figures["requests"]:
            found.append(f"{effort}: no requests were made, so no objective can be met")
            continue
        for key in ("ttft_p50_s", "ttft_p95_s", "tpot_p50_s", "tpot_p95_s"):
            bound = getattr(objective, key)
            value = figures.get(key)
            if bound is not None and (value is None or value > bound):
                found.append(f"{effort}: {key} = {_fmt(value)} > {bound}")
        if objective.max_error_rate is not None and figures["error_rate"] > objective.max_error_rate:
            found.append(f"{effort}: error_rate = {figures['error_rate']:.3f} > {objective.max_error_rate}")
        if objective.min_goodput_rps is not None and figures["goodput_rps"] < objective.min_goodput_rps:
            found.append(
                f"{effort}: goodput_rps = {figures['goodput_rps']:.3f} < {objective.min_goodput_rps}"
            )
    return found


def goodput_bounds(slo: Slo | None, effort: str) -> tuple[float | None, float | None]:
    """The per-request (TTFT, TPOT) bounds a request must meet to count as goodput."""
    objective = slo.efforts.get(effort) if slo else None
    return (objective.ttft_p95_s, objective.tpot_p95_s) if objective else (None, None)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
