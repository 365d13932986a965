"""Errors share one base per room: every exception class a room defines derives from the one base its package
declares (``gptoss_vllm.serve.ServeError``, ...), so that a caller can catch a room's errors as one, and keeps
its builtin kind (ValueError for bad input, RuntimeError for what failed) beside it. Read from the source: some
modules cannot be imported beside others in one process (Locust patches the standard library)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gptoss_vllm"


def _base_names(node: ast.ClassDef) -> set[str]:
    return {ast.unparse(b).rpartition(".")[2] for b in node.bases}


def _is_exception(node: ast.ClassDef) -> bool:
    return any(n.endswith(("Error", "Exception")) for n in _base_names(node))


def _room_bases() -> dict[str, str]:
    """Room -> the one exception class its ``__init__.py`` declares."""
    bases = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        declared = [
            n.name
            for n in ast.parse(init.read_text()).body
            if isinstance(n, ast.ClassDef) and _is_exception(n)
        ]
        assert len(declared) <= 1, f"{init.parent.name} declares several base errors: {declared}"
        if declared:
            bases[init.parent.name] = declared[0]
    return bases


def test_every_error_of_a_room_derives_from_its_base() -> None:
    bases = _room_bases()
    checked, wrong = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 or path.name == "__init__.py":
            continue  # a module at the package's top is a room of its own, with its own error
        room = parts[0]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and _is_exception(node):
                checked += 1
                names = _base_names(node)
                if bases.get(room) not in names:
                    wrong.append(f"{path.relative_to(PACKAGE)}: {node.name}({', '.join(sorted(names))})")
    assert checked >= 30, checked
    assert not wrong, "derive from the room's base error:\n" + "\n".join(wrong)


def test_no_two_errors_share_a_name() -> None:
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and _is_exception(node):
                names.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    assert not {n: p for n, p in names.items() if len(p) > 1}
