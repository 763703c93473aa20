"""The Ray actor hosting one tensor-parallel shard (ranks 1..T-1).

`setup` joins torch.distributed and loads the shard; `start_loop` runs the persistent step loop on a
thread, receiving plans by broadcast from rank 0. Ray only carries setup and liveness pings, never
per-token work. `max_concurrency` lets `ping` answer while the loop runs.
"""

from __future__ import annotations

import os
import threading

import ray

from ling_runtime.distributed.executor import control_group, worker_step_loop
from ling_runtime.model.parallel import backend_for, init_process_group
from ling_runtime.runner.build import build_runner
from ling_runtime.settings import Settings


@ray.remote
class TPWorker:
    def __init__(self) -> None:
        self.runner = None
        self.group = None
        self.loop_error: str | None = None
        self.thread: threading.Thread | None = None
        self.steps = 0  # plans finished (ping reports it; the watchdog names a rank that lags)

    def setup(
        self, settings: Settings, rank: int, tp_size: int, host: str, port: int, timeout_s: float
    ) -> float:
        tp = init_process_group(rank, tp_size, host, port, backend_for(settings.device), timeout_s)
        self.group = control_group(timeout_s)
        # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always local device 0.
        self.runner, seconds = build_runner(settings, rank, tp_size, tp.group, local_device=0)
        return seconds

    def start_loop(self) -> None:
        def run() -> None:
            try:
                worker_step_loop(self.runner, self.group, self._count)
            except Exception as exc:  # rank 0 gone: the collective fails; report it through ping
                self.loop_error = f"{type(exc).__name__}: {exc}"

        self.thread = threading.Thread(target=run, name="ling-step-loop", daemon=True)
        self.thread.start()

    def _count(self) -> None:
        self.steps += 1

    def ping(self) -> int:
        """The plans finished so far; raises when the step loop failed."""
        if self.loop_error:
            raise RuntimeError(f"step loop failed: {self.loop_error}")
        return self.steps

    def pid(self) -> int:
        return os.getpid()

    def placement(self) -> tuple[str, list]:
        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]
