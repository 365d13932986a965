"""The package's imports run one way: no two modules import each other, through any chain, and no two rooms do
(a room is a folder under ``gptoss_vllm/``, or a module at its top).

Imports are read from the source (``ast``), wherever they stand, in functions too: a deferred import still
ties two modules together. Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gptoss_vllm"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported_names(tree: ast.Module, package: str) -> list[str]:
    type_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for statement in branch.body
        for node in ast.walk(statement)
    }
    names = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name resolves to the longest module it starts with)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imported_names(ast.parse(path.read_text()), package):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            # A module importing its own package's __init__ (or a package its submodule) is Python's doing.
            if imported and imported != name and not name.startswith(imported + "."):
                graph[name].add(imported)
    return graph


def room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def subroom(module: str) -> str | None:
    """The folder inside a room that a module lives in (``serve.ingress``), or None for a module at a room's top
    (a room's driver and its shared leaves, which its folders may all import)."""
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of two or more nodes (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def rooms_graph(graph: dict[str, set[str]], room_of=room) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, imported in graph.items():
        if (here := room_of(module)) is None:
            continue
        others = {room_of(i) for i in imported} - {here, None}
        rooms.setdefault(here, set()).update(others)
    return rooms


def test_no_module_cycle() -> None:
    assert cycles(import_graph()) == []


def _room_cycles(graph: dict[str, set[str]], room_of) -> tuple[list[list[str]], str]:
    """The cycles between rooms, and the module imports that close them (the assertion's message)."""
    found = cycles(rooms_graph(graph, room_of))
    detail = [
        f"{a} -> {b}"
        for group in found
        for a, imported in sorted(graph.items())
        for b in sorted(imported)
        if room_of(a) in group and room_of(b) in group and room_of(a) != room_of(b)
    ]
    return found, "\n".join(detail)


def test_no_room_cycle() -> None:
    found, detail = _room_cycles(import_graph(), room)
    assert found == [], detail


def test_no_cycle_between_the_folders_of_a_room() -> None:
    # serve's processes: proxy, ingress and pool import one way (ingress -> pool), never back.
    graph = import_graph()
    found, detail = _room_cycles(graph, subroom)
    assert found == [], detail
    folders = rooms_graph(graph, subroom)
    assert "gptoss_vllm.serve.pool" in folders["gptoss_vllm.serve.ingress"]
    assert not folders.get("gptoss_vllm.serve.pool", set()) & {
        "gptoss_vllm.serve.ingress",
        "gptoss_vllm.serve.proxy",
    }


def test_the_graph_sees_imports_the_way_python_runs_them() -> None:
    # The walk must find what it checks, or a cycle could hide: known edges, and a cycle that is there.
    graph = import_graph()
    assert "gptoss_vllm.refusal_reasons" in graph["gptoss_vllm.observability.metrics"]
    assert "gptoss_vllm.refusal_reasons" in graph["gptoss_vllm.serve.ingress.refusal"]
    assert (
        "gptoss_vllm.observability.rules" in graph["gptoss_vllm.capacity.validate"]
    )  # a deferred import, counted
    assert "gptoss_vllm.serve.config" not in graph["gptoss_vllm.serve.pool.engine_args"]  # TYPE_CHECKING only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles(rooms_graph({"p.x.m": {"p.y.n"}, "p.y.n": {"p.x.k"}, "p.x.k": set()})) == [["p.x", "p.y"]]
    nested = {
        "p.r.a.m": {"p.r.b.n"},
        "p.r.b.n": {"p.r.a.k", "p.r.top"},
        "p.r.top": {"p.r.a.m"},
        "p.r.a.k": set(),
    }
    assert cycles(rooms_graph(nested, subroom)) == [["p.r.a", "p.r.b"]]
