"""Benchmarks: commands that print figures and write JSON (never timing assertions in tests)."""


class BenchmarkError(Exception):
    """Every error of ``gptoss_vllm.bench``: a benchmark could not run or measure."""
