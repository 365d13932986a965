"""The Helm chart rendered by Helm's own engine (helm-python-sdk embeds Helm's Go library), as objects."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "gptoss-vllm"
EXAMPLES = sorted((ROOT / "deploy" / "helm").glob("values-*.yaml"))
NAMESPACE = "gptoss"


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None = None, release: str = "demo") -> list[dict[str, Any]]:
    """Every object of ``helm install`` with ``values`` (NOTES.txt left out)."""
    manifests = chart().render(values=values or {}, name=release, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def example(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


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
