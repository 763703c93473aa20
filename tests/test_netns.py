"""tests/netns.py confines what it runs: a listener on 0.0.0.0 inside the namespace answers on the
namespace's loopback and is not reachable on the machine's real address; everything in it dies with it."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.netns import NetNamespace

# Binds every interface (what Ray's daemons do), prints its port, answers each connection.
LISTENER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    print(s.getsockname()[1], flush=True)
    while True:
        conn, _ = s.accept()
        conn.sendall(b"inside\\n")
        conn.close()
    """
)

# Leaves an orphan behind in the namespace: a process that is not our child, which only the
# namespace scan can find.
ORPHANER = textwrap.dedent(
    """
    import subprocess
    print(subprocess.Popen(["sleep", "300"], start_new_session=True).pid, flush=True)
    """
)


def host_address() -> str:
    """The machine's first non-loopback IPv4 address, from `ip -4 -o addr`."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        address = fields[3].split("/")[0]
        if not address.startswith("127."):
            return address
    pytest.fail(f"no non-loopback IPv4 address in `ip -4 -o addr`:\n{out}")


def host_listens_on(port: int) -> bool:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return any(line.split()[3].rsplit(":", 1)[1] == str(port) for line in out.splitlines())


def fetch(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=5) as conn:
        return conn.recv(64)


def alive(pid: int) -> bool:
    """Exists and is not a zombie (an exited orphan may wait a while for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_listener_on_all_interfaces_is_reachable_only_inside_the_namespace() -> None:
    address = host_address()
    with NetNamespace() as ns:
        links = subprocess.run([*ns.prefix, "ip", "-o", "link"], capture_output=True, text=True, check=True)
        assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]
        proc = ns.popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
        port = int(proc.stdout.readline())
        assert f"0.0.0.0:{port}" in ns.listeners()
        # The host namespace does not see it at all, so a refusal below is the namespace's doing.
        assert not host_listens_on(port)
        with pytest.raises(ConnectionRefusedError):
            fetch(address, port)
        with pytest.raises(ConnectionRefusedError):
            fetch("127.0.0.1", port)
        assert ns.run(fetch, "127.0.0.1", port) == b"inside\n"
        assert ns.run(fetch, "127.0.0.2", port) == b"inside\n"  # all of 127/8 is on the namespace's lo
        assert proc.pid in ns.pids()  # nsenter exec()ed: the Popen pid is the listener itself


def test_close_kills_everything_in_the_namespace_and_deletes_it_even_on_failure() -> None:
    with pytest.raises(RuntimeError, match="test body failed"), NetNamespace() as ns:
        name = ns.name
        listener = ns.popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
        listener.stdout.readline()
        orphaner = ns.popen([sys.executable, "-c", ORPHANER], stdout=subprocess.PIPE, text=True)
        orphan = int(orphaner.stdout.readline())
        assert orphaner.wait(timeout=30) == 0 and alive(orphan) and orphan in ns.pids()
        raise RuntimeError("test body failed")
    assert listener.poll() is not None
    deadline = time.monotonic() + 10
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(orphan)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert name not in netns
