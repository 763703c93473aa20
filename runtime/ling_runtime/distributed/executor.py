"""Executors on rank 0 and the step loop on ranks > 0.

Per step rank 0 broadcasts the `StepPlan` over a gloo process group (a collective, not a Ray call),
then runs its own shard; the other ranks sit in `worker_step_loop` receiving and running the same
plans until a stop plan arrives. Liveness of the other ranks comes from the launcher (process or
actor state), so a dead rank shows up in /health even when no step is running; each worker counts
the plans it has finished, so when a step hangs (--watchdog-timeout) `diagnose` can name the rank
that did not finish it. Descriptions name ranks, never hosts, ports or paths: they reach clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch.distributed as dist

from ling_runtime.runner.model_runner import ModelRunner, PendingStep
from ling_runtime.runner.plan import StepPlan, StepResult

log = logging.getLogger("ling_runtime.distributed")


@dataclass(frozen=True)
class RankState:
    """What a launcher knows of one worker rank (1..T-1)."""

    rank: int
    alive: bool  # the process runs (mp) / the actor answers its pings (Ray)
    stopped: bool = False  # the process exists but is stopped (SIGSTOP): it will never step
    steps: int | None = None  # plans it has finished; None where the launcher cannot tell


class Executor(Protocol):
    """What the engine drives: one step of the whole group, its liveness, and its end."""

    worker_pids: list[int]  # processes of ranks 1..T-1 (empty at TP 1)

    def execute(self, plan: StepPlan) -> StepResult: ...
    # Queue the step on the device(s) and return without waiting for it (the overlap scheduler).
    def launch(self, plan: StepPlan) -> PendingStep: ...
    def ranks_alive(self) -> tuple[int, int]: ...  # (alive, total)
    def diagnose(self) -> str: ...  # which ranks are down or behind; "" when none is known to be
    def shutdown(self, graceful: bool = True) -> None: ...  # graceful=False: kill, do not ask


class LocalExecutor:
    """TP 1: the model runs in this process."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.worker_pids: list[int] = []

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def launch(self, plan: StepPlan) -> PendingStep:
        return self.runner.launch(plan)

    def ranks_alive(self) -> tuple[int, int]:
        return 1, 1

    def diagnose(self) -> str:
        return ""

    def shutdown(self, graceful: bool = True) -> None:
        pass


def control_group(timeout_s: float = 60.0):
    """A gloo group over all ranks for step metadata (CPU objects even when the model uses NCCL).

    Every rank must call this in the same order, right after `init_process_group`.
    """
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


class GroupExecutor:
    """TP > 1 on rank 0: broadcast the plan, run the local shard."""

    def __init__(
        self,
        runner: ModelRunner,
        group,
        liveness: Callable[[], tuple[int, int]],
        on_shutdown: Callable[[bool], None],
        worker_pids: list[int],
        ranks: Callable[[], list[RankState]] | None = None,
    ) -> None:
        self.runner = runner
        self.group = group
        self.worker_pids = worker_pids
        self._liveness = liveness
        self._on_shutdown = on_shutdown  # called with `graceful`
        self._ranks = ranks
        self._closed = False
        self.steps_sent = 0  # plans broadcast (the workers' step counters catch up to it)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    def launch(self, plan: StepPlan) -> PendingStep:
        alive, total = self._liveness()
        if alive < total:
            raise RuntimeError(f"{total - alive} of {total} tensor-parallel ranks are down")
        self.steps_sent += 1
        dist.broadcast_object_list([plan], src=0, group=self.group)
        return self.runner.launch(plan)

    def ranks_alive(self) -> tuple[int, int]:
        return self._liveness()

    def diagnose(self) -> str:
        alive, total = self._liveness()
        states = self._ranks() if self._ranks is not None else []
        down = [s.rank for s in states if not s.alive]
        if down or alive < total:
            named = f" ({_ranks_text(down)})" if down else ""
            return f"{max(len(down), total - alive)} of {total} ranks are down{named}"
        stopped = [s.rank for s in states if s.stopped]
        behind = [s.rank for s in states if s.steps is not None and s.steps < self.steps_sent]
        if stopped:
            return f"{_ranks_text(stopped)} of {total} stopped (its process is suspended)"
        if behind:
            return f"{_ranks_text(behind)} of {total} did not finish step {self.steps_sent}"
        if states and all(s.steps is not None for s in states):
            return f"rank 0 of {total} did not finish step {self.steps_sent}"
        return ""

    def shutdown(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        alive, total = self._liveness()
        if graceful and alive == total:
            try:
                dist.broadcast_object_list([StepPlan(stop=True)], src=0, group=self.group)
            except Exception:  # a rank died in between: the launcher kills the rest anyway
                log.warning("could not send the stop plan to the workers")
        self._on_shutdown(graceful)


def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def worker_step_loop(runner: ModelRunner, group, on_step: Callable[[], None] | None = None) -> None:
    """Ranks > 0: receive each plan from rank 0 and launch it, until told to stop. Nothing here waits
    for the device (these ranks return no results), so a rank queues step n+1 while its GPU still
    runs step n, as rank 0 does. `on_step` is called after each plan (the launcher's step counter
    for `diagnose`)."""
    while True:
        box: list[StepPlan | None] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        plan = box[0]
        if plan is None or plan.stop:
            return
        runner.launch(plan)
        if on_step is not None:
            on_step()
