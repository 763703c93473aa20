"""Local process groups standing in for containers, and the bits of a container runtime they need.

A container's processes are found two ways: the process group the executor started (the common
case) and an env marker (`LING_EXEC_CONTAINER=<pod uid>/<container>`) that every descendant
inherits. The marker catches what a process group cannot: children that start their own session,
like `ray start --block` (Ray's GCS, raylet and workers), which a real container would still hold in
its PID namespace and cgroup. Ending a container ends both sets, as a kubelet ends a cgroup.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

MARKER_ENV = "LING_EXEC_CONTAINER"
POD_IP_ENV = "LING_EXEC_POD_IP"
SHIM_SOURCE = Path(__file__).with_name("podnet.c")


def build_shim(cache_dir: Path) -> Path:
    """Compile podnet.c once per content into cache_dir (gcc; argument list, no shell)."""
    digest = hashlib.sha256(SHIM_SOURCE.read_bytes()).hexdigest()[:12]
    target = cache_dir / f"libpodnet-{digest}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SHIM_SOURCE), "-ldl"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise RuntimeError(
            "gcc not found: the executor compiles e2e/executor/podnet.c (the bind shim that keeps pod "
            "servers on their loopback pod IP); install gcc (apt-get install gcc)"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling {SHIM_SOURCE} failed:\n{exc.stderr}") from None
    os.replace(tmp, target)
    return target


def marked_pids(marker_prefix: str) -> list[int]:
    """Pids whose environment has LING_EXEC_CONTAINER starting with marker_prefix."""
    needle = f"{MARKER_ENV}={marker_prefix}".encode()
    found: list[int] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                data = f.read()
        except OSError:  # gone, or a kernel thread
            continue
        for item in data.split(b"\0"):
            if item.startswith(needle):
                found.append(int(entry.name))
                break
    return found


def signal_all(pgid: int | None, marker_prefix: str, sig: int) -> int:
    """Send sig to the process group and every marked process; returns how many were signalled."""
    return signal_once([] if pgid is None else [pgid], marker_prefix, sig)


def signal_once(pgids: list[int], marker_prefix: str, sig: int) -> int:
    """Send sig once to each process of the groups and to every marked process outside them (a
    kubelet's SIGTERM arrives once: a second one means "stop now" to many servers, ours included);
    returns how many signals were sent."""
    count = 0
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
            count += 1
    for pid in marked_pids(marker_prefix):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) in pgids:
                continue  # the group's signal reached it
            os.kill(pid, sig)
            count += 1
    return count


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def terminate(pgid: int | None, marker_prefix: str, grace_s: float, term: bool = True) -> None:
    """SIGTERM (unless the caller sent it: `term=False`), wait up to grace_s for everything to go, then
    SIGKILL what is left (bounded)."""
    if term:
        signal_all(pgid, marker_prefix, signal.SIGTERM)
    deadline = time.monotonic() + max(0.0, grace_s)
    while time.monotonic() < deadline:
        if not (pgid is not None and _group_alive(pgid)) and not marked_pids(marker_prefix):
            return
        time.sleep(0.2)
    for _ in range(10):
        if not signal_all(pgid, marker_prefix, signal.SIGKILL):
            return
        time.sleep(0.2)


def spawn(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start one container's process as the leader of a new session (so its group can be killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
