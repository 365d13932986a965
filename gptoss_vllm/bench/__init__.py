"""Benchmarks: commands that print figures and write JSON (never timing assertions in tests)."""
