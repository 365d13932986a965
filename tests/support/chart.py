"""The chart as the tests read it: its example values files and objects by kind, on top of the package's
rendering (:mod:`gptoss_vllm.bench.chart`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gptoss_vllm.bench.chart import CHART, NAMESPACE, chart, merge, render

ROOT = CHART.parents[1]
EXAMPLES = sorted((ROOT / "deploy" / "helm").glob("values-*.yaml"))

__all__ = ["CHART", "EXAMPLES", "NAMESPACE", "ROOT", "by_kind", "chart", "example", "merge", "render"]


def example(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
