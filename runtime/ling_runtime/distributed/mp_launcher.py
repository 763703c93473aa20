"""Single-node launcher without Ray: rank 0 in this process, ranks 1..T-1 as spawned processes.

The same step loop as the Ray actors (`worker_step_loop`); used where Ray is not installed (the GPU
machine) and for single-node groups, as vLLM's `mp` backend is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from ling_runtime.distributed.executor import GroupExecutor, LocalExecutor, control_group, worker_step_loop
from ling_runtime.engine.setup import RuntimeSpec, build_runner

log = logging.getLogger("ling_runtime.mp")


def _backend(spec: RuntimeSpec) -> str:
    return "nccl" if spec.device == "cuda" else "gloo"


def _worker(spec: RuntimeSpec, rank: int, tp_size: int, addr: str, port: int, timeout_s: float) -> None:
    from ling_runtime.distributed.parallel import init_process_group

    # Exit with the parent: a rank must never outlive its group.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    tp = init_process_group(rank, tp_size, addr, port, _backend(spec), timeout_s)
    group = control_group(timeout_s)
    runner, _ = build_runner(spec, rank, tp_size, tp.group, local_device=rank)
    worker_step_loop(runner, group)


def launch_mp(spec: RuntimeSpec, tp_size: int, addr: str, port: int, timeout_s: float = 300.0):
    """Start the group; returns (executor, seconds to load) once every rank has its weights."""
    started = time.monotonic()
    if tp_size == 1:
        runner, _ = build_runner(spec)
        return LocalExecutor(runner), time.monotonic() - started
    from ling_runtime.distributed.parallel import init_process_group

    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, tp_size):
        proc = ctx.Process(
            target=_worker,
            args=(spec, rank, tp_size, addr, port, timeout_s),
            name=f"ling-tp{rank}",
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    tp = init_process_group(0, tp_size, addr, port, _backend(spec), timeout_s)
    group = control_group(timeout_s)
    runner, _ = build_runner(spec, 0, tp_size, tp.group, local_device=0)

    def liveness() -> tuple[int, int]:
        return 1 + sum(p.is_alive() for p in procs), tp_size

    def stop() -> None:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        # Lets this process build another group later (tests, benchmarks, a restart in place).
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    log.info("tensor-parallel group of %d ranks ready (pids %s)", tp_size, [p.pid for p in procs])
    executor = GroupExecutor(runner, group, liveness, stop)
    executor.worker_pids = [p.pid for p in procs]  # type: ignore[attr-defined]
    return executor, time.monotonic() - started
