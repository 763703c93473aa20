"""Single-node launcher without Ray: rank 0 in this process, ranks 1..T-1 as spawned processes.

The same step loop as the Ray actors (`worker_step_loop`); used where Ray is not installed (the GPU
machine) and for single-node groups, as vLLM's `mp` backend is.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from ling_runtime.distributed.executor import (
    Executor,
    GroupExecutor,
    LocalExecutor,
    RankState,
    control_group,
    worker_step_loop,
)
from ling_runtime.model.parallel import backend_for, init_process_group
from ling_runtime.runner.build import build_runner
from ling_runtime.settings import Settings

log = logging.getLogger("ling_runtime.mp")


def _worker(
    settings: Settings, rank: int, tp_size: int, addr: str, port: int, timeout_s: float, steps
) -> None:
    # Exit with the parent: a rank must never outlive its group.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    tp = init_process_group(rank, tp_size, addr, port, backend_for(settings.device), timeout_s)
    group = control_group(timeout_s)
    runner, _ = build_runner(settings, rank, tp_size, tp.group, local_device=rank)

    def count() -> None:
        steps.value += 1  # only this process writes it

    worker_step_loop(runner, group, count)


def process_stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, a debugger): state T or t in /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def launch_mp(
    settings: Settings, tp_size: int, addr: str, port: int, timeout_s: float = 300.0
) -> tuple[Executor, float]:
    """Start the group; returns (executor, seconds to load) once every rank has its weights."""
    started = time.monotonic()
    if tp_size == 1:
        runner, _ = build_runner(settings)
        return LocalExecutor(runner), time.monotonic() - started
    ctx = mp.get_context("spawn")
    procs = []
    counters = []  # plans each worker has finished (shared memory; for the watchdog's diagnosis)
    for rank in range(1, tp_size):
        steps = ctx.Value("q", 0, lock=False)
        proc = ctx.Process(
            target=_worker,
            args=(settings, rank, tp_size, addr, port, timeout_s, steps),
            name=f"ling-tp{rank}",
            daemon=True,
        )
        proc.start()
        procs.append(proc)
        counters.append(steps)
    tp = init_process_group(0, tp_size, addr, port, backend_for(settings.device), timeout_s)
    group = control_group(timeout_s)
    runner, _ = build_runner(settings, 0, tp_size, tp.group, local_device=0)

    def liveness() -> tuple[int, int]:
        return 1 + sum(p.is_alive() for p in procs), tp_size

    def ranks() -> list[RankState]:
        return [
            RankState(rank, p.is_alive(), p.is_alive() and process_stopped(p.pid), int(c.value))
            for rank, (p, c) in enumerate(zip(procs, counters, strict=True), start=1)
        ]

    def stop(graceful: bool) -> None:
        for p in procs:
            if graceful:
                p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)  # also ends a stopped process
        for p in procs:
            p.join(timeout=5)
        if graceful:
            # Lets this process build another group later (tests, benchmarks, a restart in place).
            # Not after a failure: a collective may still hang in this process.
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    log.info("tensor-parallel group of %d ranks ready (pids %s)", tp_size, [p.pid for p in procs])
    executor = GroupExecutor(runner, group, liveness, stop, worker_pids=[p.pid for p in procs], ranks=ranks)
    return executor, time.monotonic() - started
