"""Tensor-parallel groups: the executors the engine drives (executor.py) and the launchers that start
a group's ranks (mp on one node, Ray across pods)."""
