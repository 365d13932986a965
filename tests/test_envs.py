"""The environment variables: declared once (gptoss_vllm/envs.py), read only through it, the README's table is its
table, and a former name still works with a warning."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from gptoss_vllm import envs

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^GPTOSS_[A-Z0-9_]+$")


def _python_files() -> list[Path]:
    return sorted((ROOT / "gptoss_vllm").rglob("*.py"))


def test_no_module_but_envs_spells_a_variables_name() -> None:
    """A string that is exactly a GPTOSS_ variable's name appears only in envs.py: every read goes through it."""
    offenders = []
    for path in _python_files():
        if path == ROOT / "gptoss_vllm" / "envs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAME.match(node.value):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert not offenders, "read these through gptoss_vllm.envs:\n" + "\n".join(offenders)


def test_the_cpu_kernel_reads_no_environment() -> None:
    """The C++ takes its settings as op arguments (read through envs by cpu_moe), not from getenv."""
    csrc = ROOT / "gptoss_vllm" / "kernels" / "csrc"
    readers = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted(csrc.rglob("*.[ch]*"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "getenv" in line or "environ" in line
    ]
    assert len(list(csrc.rglob("*.cpp"))) >= 4 and not readers, readers


def test_every_variable_has_the_prefix_a_type_and_a_doc() -> None:
    names = [v.name for v in envs.ALL]
    assert len(names) == len(set(names)) and len(names) >= 20
    for var in envs.ALL:
        assert var.name.startswith(envs.PREFIX) and var.doc and var.type in (str, int, float, bool)
        assert all(NAME.match(old) and not old.startswith(envs.PREFIX) for old in var.old)


def test_the_readmes_table_is_envs_table() -> None:
    assert envs.table() in (ROOT / "README.md").read_text(), "README's variables table: paste envs.table()"


def test_a_former_name_is_read_with_a_warning_and_the_new_one_wins(monkeypatch, caplog) -> None:
    monkeypatch.delenv("GPTOSS_VLLM_METRICS_PORT", raising=False)
    monkeypatch.setenv("GPTOSS_METRICS_PORT", "9600")
    envs._warned.discard("GPTOSS_METRICS_PORT")
    with caplog.at_level(logging.WARNING, logger="gptoss_vllm.envs"):
        assert envs.METRICS_PORT.get() == 9600
    assert "GPTOSS_METRICS_PORT is deprecated: set GPTOSS_VLLM_METRICS_PORT" in caplog.text
    assert envs.lookup("GPTOSS_VLLM_METRICS_PORT") == "9600" and envs.lookup("GPTOSS_METRICS_PORT") == "9600"
    monkeypatch.setenv("GPTOSS_VLLM_METRICS_PORT", "9700")
    assert envs.METRICS_PORT.get() == 9700
    # A config key naming the default token variable finds a token set under its former name.
    monkeypatch.setenv("GPTOSS_MONITORING_TOKEN", "old-token")
    monkeypatch.delenv("GPTOSS_VLLM_MONITORING_TOKEN", raising=False)
    assert envs.lookup(envs.MONITORING_TOKEN.name) == "old-token"


def test_a_bad_value_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS", "many")
    with pytest.raises(envs.EnvError, match="GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS='many': expected int"):
        envs.CPU_GEMM_MIN_TOKENS.get()
    monkeypatch.setenv("GPTOSS_VLLM_EXIT_WITH_PARENT", "maybe")
    with pytest.raises(envs.EnvError, match="expected 1 or 0"):
        envs.EXIT_WITH_PARENT.get()
    monkeypatch.setenv("GPTOSS_VLLM_CPU_GEMM_MIN_TOKENS", "")
    assert envs.CPU_GEMM_MIN_TOKENS.get() == 24
