"""The tests start the stack the way the benchmarks do."""

from gptoss_vllm.serve.process import RunningStack, free_port, start_stack

__all__ = ["RunningStack", "free_port", "start_stack"]
