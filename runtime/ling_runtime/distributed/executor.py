"""Executors on rank 0 and the step loop on ranks > 0.

Per step rank 0 broadcasts the `StepPlan` over a gloo process group (a collective, not a Ray call),
then runs its own shard; the other ranks sit in `worker_step_loop` receiving and running the same
plans until a stop plan arrives. Liveness of the other ranks comes from the launcher (process or
actor state), so a dead rank shows up in /health even when no step is running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from ling_runtime.engine.plan import StepPlan, StepResult

log = logging.getLogger("ling_runtime.distributed")


class LocalExecutor:
    """TP 1: the model runs in this process."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def ranks_alive(self) -> tuple[int, int]:
        return 1, 1

    def shutdown(self) -> None:
        pass


def control_group(timeout_s: float = 60.0):
    """A gloo group over all ranks for step metadata (CPU objects even when the model uses NCCL).

    Every rank must call this in the same order, right after `init_process_group`.
    """
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


class GroupExecutor:
    """TP > 1 on rank 0: broadcast the plan, run the local shard."""

    def __init__(
        self, runner, group, liveness: Callable[[], tuple[int, int]], on_shutdown: Callable[[], None]
    ) -> None:
        self.runner = runner
        self.group = group
        self._liveness = liveness
        self._on_shutdown = on_shutdown
        self._closed = False

    def execute(self, plan: StepPlan) -> StepResult:
        alive, total = self._liveness()
        if alive < total:
            raise RuntimeError(f"{total - alive} of {total} tensor-parallel ranks are down")
        dist.broadcast_object_list([plan], src=0, group=self.group)
        return self.runner.execute(plan)

    def ranks_alive(self) -> tuple[int, int]:
        return self._liveness()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        alive, total = self._liveness()
        if alive == total:
            try:
                dist.broadcast_object_list([StepPlan(stop=True)], src=0, group=self.group)
            except Exception:  # a rank died in between: the launcher kills the rest anyway
                log.warning("could not send the stop plan to the workers")
        self._on_shutdown()


def worker_step_loop(runner, group) -> None:
    """Ranks > 0: receive each plan from rank 0 and execute it, until told to stop."""
    while True:
        box: list[StepPlan | None] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        plan = box[0]
        if plan is None or plan.stop:
            return
        runner.execute(plan)
