"""Run several GPU suites in one device call, each under its own time limit, so that one hang or
crash costs its own slot and not the whole (expensive) call.

    python3 bench/gpu/run_suite.py fp8_sweep.py:150 moe_sweep.py:150 "full_model.py --layers 8:300"

Each argument is ``SCRIPT [ARGS...]:SECONDS`` (script relative to bench/gpu/). Output of every suite
goes to stdout and to $OUT/suite.log; each suite writes its own $OUT/<name>.json as it goes.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent


def parse(spec: str) -> tuple[list[str], float]:
    """``"a.py --x 1:120"`` -> (["a.py", "--x", "1"], 120.0)."""
    cmd, _, secs = spec.rpartition(":")
    if not cmd or not secs.replace(".", "", 1).isdigit():
        raise SystemExit(f"suite spec {spec!r}: expected 'SCRIPT [ARGS]:SECONDS'")
    return shlex.split(cmd), float(secs)


def main() -> None:
    specs = [parse(s) for s in sys.argv[1:]]
    out = Path(os.environ.get("OUT", "/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (out / "suite.log").open("a") as log:
        for argv, limit in specs:
            t0 = time.time()
            head = f"\n=== {' '.join(argv)} (limit {limit:.0f} s)\n"
            sys.stdout.write(head)
            log.write(head)
            log.flush()
            proc = subprocess.Popen(
                [sys.executable, str(HERE / argv[0]), *argv[1:]],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
            )
            assert proc.stdout is not None

            def pump(stream: IO[str]) -> None:
                for line in stream:
                    sys.stdout.write(line)
                    log.write(line)

            reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                timed_out = True
            reader.join(timeout=5)
            tail = f"=== {argv[0]}: rc={proc.returncode} timed_out={timed_out} {time.time() - t0:.0f} s\n"
            sys.stdout.write(tail)
            log.write(tail)
            log.flush()


if __name__ == "__main__":
    main()
