"""Fixtures of the end-to-end scenarios: the pod executor and the operator as local processes.

`executor` (session): `python -m e2e.executor` registering one local-execution node with a unique
name and its own loopback pod range, so a concurrent `make run` or another session never collides.
`operator` (function): `python -m ling_operator` watching only the test's namespace (admin kubeconfig;
tests/cluster/ proves the least-privilege role separately). Both are process groups that are ended
on teardown, whatever the test did; the executor then kills whatever its pods left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from conftest import Kube

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "e2e" / "manifests" / "tiny-cpu-local.yaml"
CACHE = Path(
    os.environ.get("LING_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ling")
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """Poll check() until it returns something truthy; fail naming what was awaited (bounded)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, then SIGKILL it after grace seconds (bounded)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@dataclass
class ExecutorHandle:
    node: str
    proc: subprocess.Popen[bytes]
    log: Path
    state_dir: Path

    def container_log(self, namespace: str, pod: str, container: str = "engine") -> str:
        path = self.state_dir / "logs" / f"{namespace}_{pod}_{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session")
def executor(kube: Kube) -> Iterator[ExecutorHandle]:
    from e2e.executor import procs

    node = f"e2e-{secrets.token_hex(3)}"
    # Kept after the session (pytest's tmp dirs rotate away under concurrent sessions): the
    # executor's and every container's log, for reading a failure afterwards. The last 5 are kept.
    runs = CACHE / "e2e-runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in sorted(runs.iterdir(), key=lambda p: p.stat().st_mtime)[:-4]:
        shutil.rmtree(old, ignore_errors=True)
    work = runs / node
    work.mkdir()
    log = work / "executor.log"
    cidr = f"127.{random.randint(100, 199)}.0.0/16"
    cmd = [
        sys.executable,
        "-m",
        "e2e.executor",
        "--kubeconfig",
        str(kube.kubeconfig),
        "--node",
        node,
        "--pod-cidr",
        cidr,
        "--state-dir",
        str(work / "state"),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    handle = ExecutorHandle(node=node, proc=proc, log=log, state_dir=work / "state")
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"executor exited {proc.returncode}:\n{log.read_text()}")
            out = kube.kubectl("get", "node", node, "-o", "json", check=False)
            if out.returncode != 0:
                return False
            conds = json.loads(out.stdout)["status"].get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        wait_until(f"node {node} Ready", ready, timeout=60)
        yield handle
    finally:
        stop_group(proc, grace=60)
        # Whatever happened above, no pod process of this node may outlive the session.
        procs.terminate(None, f"{node}/", 0)
        kube.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)


@dataclass
class OperatorRunner:
    """Starts/stops the operator for one namespace; a restart keeps the same metrics port."""

    kube: Kube
    namespace: str
    workdir: Path
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        cmd = [
            sys.executable,
            "-m",
            "ling_operator",
            "--kubeconfig",
            str(self.kube.kubeconfig),
            "--namespace",
            self.namespace,
            "--metrics-address",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            "0",
            "--lease-duration",
            "5",
            "--resync-seconds",
            "10",
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace=20)

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def logs(self) -> str:
        return "\n".join(
            (self.workdir / f"operator-{i}.log").read_text(errors="replace")
            for i in range(1, self.starts + 1)
        )


@pytest.fixture
def operator(kube: Kube, namespace: str, tmp_path: Path) -> Iterator[OperatorRunner]:
    runner = OperatorRunner(kube=kube, namespace=namespace, workdir=tmp_path)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def tiny_manifest(node: str, **spec_overrides: Any) -> dict[str, Any]:
    """e2e/manifests/tiny-cpu-local.yaml pinned to one executor node, with spec fields replaced."""
    doc = yaml.safe_load(MANIFEST.read_text())
    doc["spec"]["template"]["nodeSelector"] = {"kubernetes.io/hostname": node}
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc
