"""Cluster fixtures shared by tests/ and e2e/.

`kube` (session): the local control plane of hack/cluster.sh, started on demand or reused when it
already runs. If this session started it, the last session using it stops it at the end (set
LING_KEEP_CLUSTER=1 to keep it running for the next run). `namespace` (function): a fresh namespace,
deleted afterwards. Tests that use either carry `@pytest.mark.cluster`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

ROOT = Path(__file__).resolve().parent
CLUSTER_SH = ROOT / "hack" / "cluster.sh"
CACHE = Path(
    os.environ.get("LING_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ling")
)
WORKDIR = Path(os.environ.get("KWOK_WORKDIR", CACHE / "cluster"))
# Written by `hack/cluster.sh up` when a test session (not a person) created the cluster: only then
# may a session stop it.
STARTED_BY_FIXTURE = WORKDIR / "started-by-fixture"
USERS = WORKDIR / "fixture-users"

# Triton decides interpreted or compiled once per process, when a kernel module is first imported,
# and collection imports tests/gpu before tests/kernels' conftest could ask for the interpreter. So
# the decision is made here: without an NVIDIA device every kernel runs under the interpreter (the
# CPU tests in tests/kernels), and the GPU tier (tests/gpu, `pytest -m gpu` on the GPU machine,
# where tests/gpu/conftest.py asks for compiled kernels) is not collected at all.
HAS_NVIDIA_GPU = Path("/dev/nvidiactl").exists()
if not HAS_NVIDIA_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    collect_ignore = ["tests/gpu"]


@dataclass(frozen=True)
class Kube:
    """Handle on the local control plane: its kubeconfig, its tools, and clients bound to it."""

    kubeconfig: Path
    bin: Path

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached kubectl against this cluster (always with --kubeconfig, never ~/.kube/config)."""
        cmd = [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        return _run(cmd, input=input, check=check, timeout=timeout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run the cached helm against this cluster, with its caches kept under LING_CACHE."""
        home = CACHE / "helm"
        env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        cmd = [str(self.bin / "helm"), "--kubeconfig", str(self.kubeconfig), *args]
        return _run(cmd, input=input, check=check, timeout=timeout, env=env)

    def api_client(self) -> ApiClient:
        """A fresh kubernetes.client.ApiClient for this cluster (close it when done)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def _run(
    cmd: list[str],
    *,
    input: str | None,
    check: bool,
    timeout: float,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def _cluster_sh(*args: str) -> subprocess.CompletedProcess[str]:
    # LING_STARTED_BY_FIXTURE makes `up` leave the marker that allows a session to stop the cluster.
    env = {**os.environ, "LING_STARTED_BY_FIXTURE": "1"}
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=900, env=env
    )


def _live_users() -> list[Path]:
    """Registration files of test sessions whose process still exists (stale ones are removed)."""
    live = []
    for f in USERS.glob("*"):
        try:
            os.kill(int(f.name), 0)
            live.append(f)
        except (ValueError, ProcessLookupError):
            f.unlink(missing_ok=True)
        except PermissionError:
            live.append(f)
    return live


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    # Register before looking, so that a session ending right now does not stop the cluster under us.
    me = USERS / str(os.getpid())
    USERS.mkdir(parents=True, exist_ok=True)
    me.touch()
    if _cluster_sh("healthy").returncode != 0:
        up = _cluster_sh("up")
        if up.returncode != 0:
            pytest.fail(f"could not start the local cluster (hack/cluster.sh up):\n{up.stdout}\n{up.stderr}")
        USERS.mkdir(parents=True, exist_ok=True)
        me.touch()
    kubeconfig = Path(_cluster_sh("kubeconfig").stdout.strip())
    try:
        yield Kube(kubeconfig=kubeconfig, bin=CACHE / "bin")
    finally:
        me.unlink(missing_ok=True)
        keep = os.environ.get("LING_KEEP_CLUSTER", "") not in ("", "0")
        # Another session may still be using the cluster: only the last one out stops it, and only
        # when a fixture (not a person running `make cluster-up`) started it.
        if not keep and STARTED_BY_FIXTURE.exists() and not _live_users():
            _cluster_sh("down")


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    name = f"t-{secrets.token_hex(4)}"
    kube.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kube.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
