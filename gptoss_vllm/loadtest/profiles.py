"""Workload profiles as data: effort mix, prompt lengths, output budget per effort, think time, arrival shape."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptoss_vllm.loadtest import LoadTestError

EFFORTS = ("low", "medium", "high")
PROFILES_DIR = files("gptoss_vllm.loadtest") / "profiles"


class ProfileError(LoadTestError, ValueError):
    """A profile is unknown or invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    min: float = Field(ge=0)
    max: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class Arrival(_Strict):
    """How the user count moves over the run: ``steady``; ``ramp`` (linear to the full count over
    ``ramp_fraction`` of the run); ``spike`` (``spike_factor`` x users for ``spike_fraction`` of the run,
    starting at ``spike_at_fraction``). A ramp may carry a spike too."""

    shape: Literal["steady", "ramp", "spike"] = "steady"
    ramp_fraction: float = Field(0.5, gt=0, le=1)
    spike_at_fraction: float | None = Field(None, ge=0, lt=1)
    spike_factor: float = Field(2.0, ge=1)
    spike_fraction: float = Field(0.1, gt=0, le=1)

    def users_at(self, fraction: float, users: int) -> int:
        """Target user count at ``fraction`` (0..1) of the run."""
        count = float(users)
        if self.shape == "ramp":
            count = users * min(1.0, fraction / self.ramp_fraction)
        spike_at = self.spike_at_fraction if self.spike_at_fraction is not None else (
            0.5 if self.shape == "spike" else None
        )  # fmt: skip
        if spike_at is not None and spike_at <= fraction < spike_at + self.spike_fraction:
            count = users * self.spike_factor
        return max(1, round(count))


class Profile(_Strict):
    name: str
    efforts: dict[Literal["low", "medium", "high"], float]
    prompt_words: Range
    output_tokens: dict[Literal["low", "medium", "high"], int]
    think_time_s: Range = Range(min=0, max=0)
    arrival: Arrival = Arrival()
    # Generate exactly output_tokens (vLLM's ignore_eos): for benchmarks whose model answers shorter.
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if any(weight < 0 for weight in self.efforts.values()) or sum(self.efforts.values()) <= 0:
            raise ValueError("efforts: weights must be >= 0 with a positive sum")
        missing = [e for e, w in self.efforts.items() if w > 0 and e not in self.output_tokens]
        if missing:
            raise ValueError(f"output_tokens: no budget for effort(s) {', '.join(missing)}")
        if any(tokens < 1 for tokens in self.output_tokens.values()):
            raise ValueError("output_tokens: every budget must be >= 1")
        return self


def builtin_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in PROFILES_DIR.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name, or a YAML file."""
    path = Path(name_or_path)
    if name_or_path in builtin_profiles():
        source, text = f"{name_or_path} (built in)", (PROFILES_DIR / f"{name_or_path}.yaml").read_text()
    elif path.suffix in (".yaml", ".yml") and path.exists():
        source, text = str(path), path.read_text()
    else:
        raise ProfileError(
            f"unknown profile {name_or_path!r}: use one of {', '.join(builtin_profiles())} or a YAML file"
        )
    try:
        return Profile.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ProfileError(f"{source}: {key}: {first['msg']}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{source}: not valid YAML: {exc}") from None
