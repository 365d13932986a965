"""Capacity planning: engine service curves (``curve``), a simulation of pools of continuously batching
replicas (``simulate``), and the plan that compares one shared pool with effort pools."""


class CapacityError(Exception):
    """Every error of ``gptoss_vllm.capacity``: a curve, a traffic description or a measurement that capacity planning cannot use."""
