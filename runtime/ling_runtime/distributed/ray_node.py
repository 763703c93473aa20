"""Starting and stopping this pod's Ray node (`ray start` as a child process, argument lists only).

Each node is labelled with a custom resource `ling_node_<rank>` so the placement group can pin TP
shard r to node rank r // shards_per_node, whatever order the nodes joined in. `--block` keeps the
Ray processes in our child's process group, so stopping is a signal to that group, never a
machine-wide `ray stop` (which would kill other clusters on a shared host).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def node_resource(node_rank: int) -> str:
    return f"ling_node_{node_rank}"


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def ray_start_argv(
    node_rank: int,
    node_ip: str,
    ray_port: int,
    head: bool,
    head_address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: str | None = None,
    ports: dict[str, int] | None = None,
) -> list[str]:
    """The `ray start` command for this node (pure: tested against the contract).

    `ports` maps flags in PORT_FLAGS to ports; `free_ports(node_ip)` picks them for a real start.
    """
    argv = [ray_executable(), "start", "--block", "--node-ip-address", node_ip, "--disable-usage-stats"]
    if head:
        argv += ["--head", "--port", str(ray_port), "--include-dashboard=false", "--dashboard-host", node_ip]
    else:
        if not head_address:
            raise ValueError("head_address: a worker node needs the head's HOST:PORT")
        argv += ["--address", head_address]
    argv += ["--resources", json.dumps({node_resource(node_rank): 1000})]
    if num_cpus is not None:
        argv += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        argv += ["--num-gpus", str(num_gpus)]
    if temp_dir:
        argv += ["--temp-dir", temp_dir]
    for flag, port in (ports or {}).items():
        if flag not in PORT_FLAGS or (flag == "--dashboard-port" and not head):
            continue
        argv += [flag, str(port)]
    return argv


# Fixed default ports of Ray's per-node agents collide when several nodes share a host (tests, e2e).
PORT_FLAGS = (
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def free_ports(host: str) -> dict[str, int]:
    return {flag: free_port(host) for flag in PORT_FLAGS}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class RayNode:
    """`ray start --block` under `ray_supervisor` in its own session: `stop()` (or this process dying,
    even by SIGKILL) ends every Ray process of the node."""

    def __init__(self, argv: list[str], log_path: Path | None = None) -> None:
        self.argv = argv
        self.log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        supervised = [sys.executable, "-m", "ling_runtime.distributed.ray_supervisor", *argv]
        self.proc = subprocess.Popen(
            supervised, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)
