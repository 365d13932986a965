"""The Helm chart rendered by Helm's own engine (helm-python-sdk embeds Helm's Go library), as objects: what
``helm install`` would send, for the one-machine cluster (:mod:`gptoss_vllm.bench.kuberay`) and the chart tests.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from gptoss_vllm.bench import BenchmarkError

# The chart of this checkout (the package is installed from it: `make venv`).
CHART = Path(__file__).resolve().parents[2] / "helm" / "gptoss-vllm"
NAMESPACE = "gptoss"


class ChartError(BenchmarkError, RuntimeError):
    """The chart could not be loaded or rendered (the message names the chart and Helm's own error)."""


@functools.cache
def chart(path: Path = CHART) -> Any:
    try:
        import helm_python as helm
    except ImportError as exc:
        raise ChartError(
            "rendering the chart needs helm-python-sdk (pip install helm-python-sdk; `make venv` installs it)"
        ) from exc
    if not (path / "Chart.yaml").is_file():
        raise ChartError(f"no Helm chart at {path} (no Chart.yaml): run from a checkout of gptoss-vllm")
    return helm.Chart.load(path)


def render(
    values: dict[str, Any] | None = None, release: str = "demo", path: Path = CHART
) -> list[dict[str, Any]]:
    """Every object of ``helm install`` with ``values`` (NOTES.txt left out); Helm's own errors
    (``helm_python.HelmError``: the schema or a template's ``fail``) name the bad value."""
    manifests = chart(path).render(values=values or {}, name=release, namespace=NAMESPACE, is_install=True)
    objects = []
    for name, text in sorted(manifests.items()):
        if name.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def merge(base: dict[str, Any], *overlays: dict[str, Any]) -> dict[str, Any]:
    """Values files merged as ``-f a -f b`` does: maps key by key, anything else (lists too) replaced."""
    out = copy.deepcopy(base)
    for overlay in overlays:
        for key, value in overlay.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out
