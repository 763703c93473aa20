"""Private network namespaces for tests whose processes bind every interface (Ray's gcs_server and
raylet listen on `*:<port>` whatever `--node-ip-address` says).

A `NetNamespace` has only its own loopback, so `*` there means that namespace's `lo` and nothing is
reachable from the machine's real interfaces. All of 127.0.0.0/8 is routed to `lo`, so 127.0.0.2 works
inside it as in the host. Processes start in it through `nsenter --net=...` (which exec()s, so the
Popen pid is the real process), and the test talks to them with `ns.run(fn, ...)`: `fn` runs on a worker
thread that entered the namespace with setns(2), which moves only the calling thread.

Needs root (CAP_SYS_ADMIN), `ip` (iproute2) and `nsenter` (util-linux)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/var/run/netns")
PREFIX = "ling-test-"
CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _netns_inode(path: str | Path) -> int | None:
    """The namespace's identity (inode of its nsfs file); None when the path is gone."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in(inode: int) -> list[int]:
    """Processes (thread-group leaders) whose network namespace is `inode`, except this one: a
    worker thread of ours may sit in the namespace, but our main thread never does."""
    pids = []
    for entry in Path("/proc").iterdir():
        candidate = entry.name.isdigit() and int(entry.name) != os.getpid()
        if candidate and _netns_inode(entry / "ns" / "net") == inode:
            pids.append(int(entry.name))
    return pids


def _kill_all_in(inode: int, timeout: float = 10) -> None:
    """SIGKILL every process left in the namespace (Ray daemons orphaned by a killed parent, say)
    and wait until none remains, so the namespace really goes away with `ip netns del`."""
    deadline = time.monotonic() + timeout
    while (pids := pids_in(inode)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _setns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _reap_stale() -> None:
    """Remove namespaces left by test sessions that died without cleanup (SIGKILL, OOM): their
    name carries the creating pid, and a namespace whose creator is gone belongs to no one."""
    if not NETNS_DIR.is_dir():
        return
    for path in NETNS_DIR.glob(f"{PREFIX}*"):
        owner = path.name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            if (inode := _netns_inode(path)) is not None:
                _kill_all_in(inode)
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, timeout=30, check=False)


class NetNamespace:
    """`with NetNamespace() as ns:` a fresh namespace with `lo` up; on exit (also on failure) every
    process in it is killed and the namespace is deleted."""

    def __init__(self) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = NETNS_DIR / self.name
        self.procs: list[subprocess.Popen] = []
        self._inode: int | None = None
        self._thread: ThreadPoolExecutor | None = None

    def __enter__(self) -> NetNamespace:
        _reap_stale()
        _ip("netns", "add", self.name)
        try:
            self._inode = _netns_inode(self.path)
            _ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def prefix(self) -> list[str]:
        """argv prefix that runs a command in the namespace (network only: same mounts, same pids)."""
        return ["nsenter", f"--net={self.path}", "--"]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start `argv` in the namespace; kwargs go to Popen. The process is killed on close()."""
        proc = subprocess.Popen([*self.prefix, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on a thread inside the namespace: sockets it creates (an httpx
        request, say) live there. Its result or exception comes back to the caller."""
        if self._thread is None:
            # One long-lived thread: setns once, and every socket made on it is in the namespace.
            self._thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self.name, initializer=_setns, initargs=(self.path,)
            )
        return self._thread.submit(fn, *args, **kwargs).result()

    def listeners(self) -> str:
        """`ss -ltnp` as seen inside the namespace."""
        return subprocess.run(
            [*self.prefix, "ss", "-ltnp"], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def pids(self) -> list[int]:
        return pids_in(self._inode) if self._inode is not None else []

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        if self._inode is not None:
            _kill_all_in(self._inode)
        for proc in self.procs:
            # Reap our own children so none lingers as a zombie.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30, check=False)
