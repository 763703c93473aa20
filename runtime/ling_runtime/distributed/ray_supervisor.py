"""`python -m ling_runtime.distributed.ray_supervisor ray start --block ...`: ties a Ray node's life
to the runtime process that started it.

`ray start --block` dies alone on SIGTERM and leaves its raylet (and the shards on it) running. This
supervisor gets SIGTERM when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG), and then stops the
whole process group of the Ray node, so a killed rank really is gone and its group notices.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time


def _stop_group(pid: int, grace_s: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m ling_runtime.distributed.ray_supervisor COMMAND...", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    child = subprocess.Popen(argv, start_new_session=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if os.getppid() == 1:  # the parent died before the death signal was armed
        stopping = True
    while not stopping and child.poll() is None:
        time.sleep(0.2)
    _stop_group(child.pid)
    child.wait()
    return 0 if stopping else (child.returncode or 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
