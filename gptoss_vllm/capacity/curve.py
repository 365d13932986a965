"""One engine's service curve: how fast one replica serves n sequences at once, as ``bench curves`` measures it.

The JSON (``gptoss-vllm bench curves --json FILE``), version 1::

    {
      "version": 1,
      "model": "gpt-oss-20b",                  # what served it
      "source": "bench curves on AMD EPYC ...", # where the figures come from (a machine, or a publication)
      "max_num_seqs": 16,                       # sequences the engine decodes at once
      "kv_capacity_tokens": 21000,              # tokens its KV cache holds (prompts and outputs together)
      "decode": [{"concurrency": 1, "tpot_s": 0.16}, ...],       # time per output token, n sequences decoding
      "prefill": [{"prompt_tokens": 128, "ttft_s": 2.9}, ...]    # time to first token of one request alone
    }

Between measured points the curve is linear; past the last one it goes on along its last segment.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_vllm.capacity import CapacityError


class CurveError(CapacityError, ValueError):
    """A curve file that cannot be used; the message names the file and the key."""


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise-linear through ``points`` (sorted by x), extended along the end segments."""
    if len(points) == 1:
        return points[0][1] * (x / points[0][0] if points[0][0] else 1.0)
    xs = [p[0] for p in points]
    i = min(max(bisect.bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0), 0.0)


@dataclass(frozen=True)
class Curve:
    """A replica's service curve."""

    max_num_seqs: int
    kv_capacity_tokens: int
    decode: tuple[tuple[int, float], ...]  # (concurrency, seconds per output token), sorted
    prefill: tuple[tuple[int, float], ...]  # (prompt tokens, seconds to the first token alone), sorted
    model: str = ""
    source: str = ""

    def tpot_s(self, concurrency: int) -> float:
        """Seconds per decode step with ``concurrency`` sequences decoding (each gets one token)."""
        return _interpolate(self.decode, max(concurrency, 1))

    def prefill_s(self, prompt_tokens: int) -> float:
        """Seconds to prefill ``prompt_tokens`` (alone; in a step with decodes, added to the step)."""
        return _interpolate(self.prefill, max(prompt_tokens, 1))

    def saturation_tokens_per_s(self) -> float:
        """Output tokens/s of one replica decoding ``max_num_seqs`` sequences without end."""
        return self.max_num_seqs / self.tpot_s(self.max_num_seqs)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "model": self.model,
            "source": self.source,
            "max_num_seqs": self.max_num_seqs,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "decode": [{"concurrency": n, "tpot_s": s} for n, s in self.decode],
            "prefill": [{"prompt_tokens": n, "ttft_s": s} for n, s in self.prefill],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "curve") -> Curve:
        def need(key: str, kind: type) -> Any:
            if key not in data:
                raise CurveError(f"{where}: missing key {key!r}")
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise CurveError(f"{where}: {key} must be {kind.__name__}, got {data[key]!r}")
            return data[key]

        if data.get("version", 1) != 1:
            raise CurveError(f"{where}: version {data.get('version')!r} is not 1")

        def series(key: str, x: str, y: str) -> tuple[tuple[int, float], ...]:
            points = []
            for i, point in enumerate(need(key, list)):
                try:
                    px, py = int(point[x]), float(point[y])
                except (KeyError, TypeError, ValueError):
                    raise CurveError(
                        f"{where}: {key}[{i}] needs numbers {x!r} and {y!r}, got {point!r}"
                    ) from None
                if px <= 0 or py <= 0:
                    raise CurveError(f"{where}: {key}[{i}]: {x} and {y} must be > 0, got {point!r}")
                points.append((px, py))
            if not points:
                raise CurveError(f"{where}: {key} has no points")
            points.sort()
            if len({p[0] for p in points}) != len(points):
                raise CurveError(f"{where}: {key} has two points at the same {x}")
            return tuple(points)

        max_num_seqs, kv = need("max_num_seqs", int), need("kv_capacity_tokens", int)
        if max_num_seqs < 1 or kv < 1:
            raise CurveError(f"{where}: max_num_seqs and kv_capacity_tokens must be >= 1")
        return cls(
            max_num_seqs=max_num_seqs,
            kv_capacity_tokens=kv,
            decode=series("decode", "concurrency", "tpot_s"),
            prefill=series("prefill", "prompt_tokens", "ttft_s"),
            model=str(data.get("model", "")),
            source=str(data.get("source", "")),
        )

    @classmethod
    def load(cls, path: str | Path) -> Curve:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise CurveError(f"{path}: cannot read it ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise CurveError(f"{path}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CurveError(f"{path}: a curve is a JSON object")
        return cls.from_json(data, str(path))
