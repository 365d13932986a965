"""Helpers the tests run in their own processes (vLLM engines need a ``__main__`` guard)."""
