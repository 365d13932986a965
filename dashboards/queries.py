"""Every query of the committed dashboards, for tests: no grafana-foundation-sdk needed.

``panel_queries()`` returns (dashboard file stem, panel title, expr) for every target of every panel, with the
Grafana variables replaced so that the expr is plain PromQL: ``$namespace``/``$pool`` (All) -> ``.*``,
``$__rate_interval``/``$__interval`` -> ``1m`` (pass ``substitutions`` to choose others).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parent
DASHBOARD_NAMES = ("slo-by-effort", "pools-and-capacity", "engine")
DEFAULT_SUBSTITUTIONS: Mapping[str, str] = {
    "namespace": ".*",
    "pool": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def substitute(expr: str, substitutions: Mapping[str, str] = DEFAULT_SUBSTITUTIONS) -> str:
    """``expr`` with ``$name`` and ``${name}`` replaced; an unknown variable raises KeyError."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in substitutions:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return substitutions[name]

    return _VARIABLE.sub(replace, expr)


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """The dashboard's panels, those inside collapsed rows included; rows themselves are left out."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def load(name: str, directory: Path = DASHBOARDS_DIR) -> dict:
    return json.loads((directory / f"{name}.json").read_text())


def panel_queries(
    substitutions: Mapping[str, str] | None = DEFAULT_SUBSTITUTIONS, directory: Path = DASHBOARDS_DIR
) -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every query target; ``substitutions=None`` keeps the variables."""
    triples = []
    for name in DASHBOARD_NAMES:
        for panel in iter_panels(load(name, directory)):
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if expr:
                    triples.append(
                        (
                            name,
                            panel["title"],
                            expr if substitutions is None else substitute(expr, substitutions),
                        )
                    )
    return triples
