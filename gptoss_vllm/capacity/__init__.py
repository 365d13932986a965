"""Capacity planning: engine service curves (``curve``), a simulation of pools of continuously batching
replicas (``simulate``), and the plan that compares one shared pool with effort pools."""
