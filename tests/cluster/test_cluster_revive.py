"""`make cluster-up` on a cluster whose API answers but whose scheduler and controller-manager died.

/readyz alone said "already running" while nothing got scheduled (issue 18): `hack/cluster.sh healthy`
now checks every component, and `up` restarts the dead ones in place, keeping every object.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.waiting import wait_for

if TYPE_CHECKING:
    from conftest import Kube

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
PIDS = (
    Path(os.environ.get("LING_CACHE", Path.home() / ".cache" / "ling"))
    / "cluster"
    / "clusters"
    / "ling"
    / "pids"
)
KILLED = ("kube-scheduler", "kube-controller-manager")


def cluster_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=180)


def gone(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True
    return not cmdline  # a zombie keeps its pid but has no command line


def test_up_restarts_dead_components_and_keeps_objects(kube: Kube, namespace: str) -> None:
    kube.kubectl("create", "configmap", "survivor", "-n", namespace, "--from-literal=k=v")
    pids = {name: int((PIDS / f"{name}.pid").read_text().strip()) for name in KILLED}
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    wait_for("the killed components to exit", lambda: all(gone(pid) for pid in pids.values()), timeout=30)

    assert cluster_sh("healthy").returncode == 1, "a cluster without its scheduler must not count as healthy"
    status = cluster_sh("status").stdout
    for name in KILLED:
        assert f"{name}" in status and "NOT running" in status.split(name, 1)[1].splitlines()[0], status

    up = cluster_sh("up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "restarting dead components: kube-controller-manager kube-scheduler" in up.stdout, up.stdout
    assert "recreating" not in up.stdout, "objects must survive: the cluster is revived, not recreated"
    assert cluster_sh("healthy").returncode == 0

    # The object made before is still there, and the revived scheduler schedules a new pod.
    assert kube.kubectl("get", "configmap", "survivor", "-n", namespace, "-o", "name").stdout.strip()
    pod = f"p-{secrets.token_hex(3)}"
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace},
        "spec": {"containers": [{"name": "main", "image": "registry.invalid/x:1"}]},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def scheduled() -> str:
        got = json.loads(kube.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)
        return got["spec"].get("nodeName", "")

    assert wait_for("the revived scheduler to bind a pod", scheduled, timeout=60)
