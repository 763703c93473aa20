"""`ling-runtime serve`, with the step loop's host time measured from outside the engine.

    python -m bench.runtime.step_timing --out FILE.json -- [serve flags]

Starts the server exactly as `ling-runtime serve [flags]` does, after wrapping two methods that every
version of the engine has: `Scheduler.schedule` (called once per loop iteration) and the model
runner's step call (`ModelRunner.execute`, and `launch` where it exists). A loop iteration is the
time from one `schedule()` that returned work to the next `schedule()`; host time per step is the
iterations' time minus the time inside the runner (on the CPU: the model's compute, and sampling
where the runner does it), over the steps. Nothing in the engine is changed, so the same command
measures an older tree (`PYTHONPATH=<old tree>/runtime`). The numbers are written to FILE on exit
(SIGTERM drains the server, then the process exits normally).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("serve", nargs=argparse.REMAINDER, help="-- then the serve flags")
    args = parser.parse_args(argv)
    serve = [a for a in args.serve if a != "--"]

    import ling_runtime
    from ling_runtime.engine.scheduler import Scheduler
    from ling_runtime.runner.model_runner import ModelRunner

    stats = {"iterations": 0, "loop_s": 0.0, "runner_s": 0.0, "steps": 0}
    state: dict = {"since": None}
    lock = threading.Lock()

    schedule = Scheduler.schedule

    def timed_schedule(self):
        now = time.perf_counter()
        step = schedule(self)
        with lock:
            if state["since"] is not None:
                stats["iterations"] += 1
                stats["loop_s"] += now - state["since"]
            state["since"] = now if not step.empty else None
            if not step.empty:
                stats["steps"] += 1
        return step

    Scheduler.schedule = timed_schedule  # type: ignore[method-assign]
    # `launch` where the runner has it (the engine calls it; `execute` calls it too: count once).
    name = "launch" if hasattr(ModelRunner, "launch") else "execute"
    call = getattr(ModelRunner, name)

    def timed_call(self, plan):
        began = time.perf_counter()
        try:
            return call(self, plan)
        finally:
            if threading.current_thread().name == "ling-engine":
                with lock:
                    stats["runner_s"] += time.perf_counter() - began

    setattr(ModelRunner, name, timed_call)

    def write() -> None:
        n = max(stats["iterations"], 1)
        host = stats["loop_s"] - stats["runner_s"]
        record = {
            **stats,
            "runtime": str(Path(ling_runtime.__file__).parent),
            "serve": serve,
            "loop_ms_per_iteration": 1e3 * stats["loop_s"] / n,
            "runner_ms_per_iteration": 1e3 * stats["runner_s"] / n,
            "host_ms_per_iteration": 1e3 * host / n,
            "load_avg": os.getloadavg(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    atexit.register(write)
    from ling_runtime.cli import main as cli_main

    return cli_main(["serve", *serve])


if __name__ == "__main__":
    sys.exit(main())
