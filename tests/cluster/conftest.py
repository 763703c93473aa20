"""Fixtures that run the real operator (`python -m ling_operator`) against the local control plane.

The operator runs as a subprocess restricted to the test's namespace, with its Lease there too, and
by default as a ServiceAccount bound to exactly charts/ling-operator/files/rbac-rules.yaml, so
every cluster test also proves that the one least-privilege role is enough.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from conftest import Kube

ROOT = Path(__file__).resolve().parents[2]
# LING_OPERATOR_TREE=<checkout> runs the operator (and applies the CRD) of another checkout, e.g. a git
# worktree of an older commit, under these same tests: to check that a test fails on the code it guards
# against. The CRD is cluster-wide: use a cluster of your own for that (KWOK_WORKDIR, LING_APISERVER_PORT).
OTHER_TREE = Path(os.environ["LING_OPERATOR_TREE"]) if os.environ.get("LING_OPERATOR_TREE") else None
CRD = (OTHER_TREE or ROOT) / "crds" / "serving.ling.dev_lingdeployments.yaml"
RBAC_RULES = ROOT / "charts" / "ling-operator" / "files" / "rbac-rules.yaml"
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "nodes"}


@dataclass
class OperatorProcess:
    """One running operator replica; `stop()` is graceful, `kill()` is SIGKILL (a crash)."""

    identity: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class OperatorFactory:
    kube: Kube
    namespace: str
    kubeconfig: Path
    workdir: Path
    started: list[OperatorProcess] = field(default_factory=list)
    # The operator's periods here (short, so tests that watch a window can derive it from them).
    resync_seconds: float = 5
    lease_seconds: float = 4

    def start(self, identity: str | None = None, *extra: str) -> OperatorProcess:
        identity = identity or f"op-{secrets.token_hex(3)}"
        log = self.workdir / f"{identity}.log"
        cmd = [
            sys.executable,
            "-m",
            "ling_operator",
            "--kubeconfig",
            str(self.kubeconfig),
            "--namespace",
            self.namespace,
            "--metrics-port",
            "0",
            "--health-port",
            "0",
            "--lease-namespace",
            self.namespace,
            "--lease-duration",
            str(self.lease_seconds),
            "--resync-seconds",
            str(self.resync_seconds),
            "--identity",
            identity,
            *extra,
        ]
        env = dict(os.environ)
        if OTHER_TREE is not None:
            env["PYTHONPATH"] = str(OTHER_TREE / "operator")
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        op = OperatorProcess(identity, proc, log)
        self.started.append(op)
        return op

    def stop_all(self) -> None:
        for op in self.started:
            op.stop()


def _rbac_kubeconfig(kube: Kube, namespace: str, workdir: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A kubeconfig for a ServiceAccount holding exactly the rules of rbac-rules.yaml."""
    rules: list[dict[str, Any]] = yaml.safe_load(RBAC_RULES.read_text())
    namespaced = [r for r in rules if not set(r["resources"]) & CLUSTER_SCOPED]
    cluster = [r for r in rules if set(r["resources"]) & CLUSTER_SCOPED]
    sa = "ling-operator"
    cluster_name = f"ling-operator-{namespace}"
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": namespace}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": sa, "namespace": namespace},
            "rules": namespaced,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": sa, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": cluster_name},
            "rules": cluster,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": cluster_name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_name},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}],
        },
    ]
    kube.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    token = kube.kubectl("create", "token", sa, "-n", namespace, "--duration", "2h").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    cluster_entry = admin["clusters"][0]["cluster"]
    ca = cluster_entry.get("certificate-authority-data")
    if ca is None and cluster_entry.get("certificate-authority"):
        ca = base64.b64encode(Path(cluster_entry["certificate-authority"]).read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": cluster_entry["server"], "certificate-authority-data": ca},
            }
        ],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [
            {"name": "operator", "context": {"cluster": "local", "user": sa, "namespace": namespace}}
        ],
        "current-context": "operator",
    }
    path = workdir / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path, [("clusterrole", cluster_name), ("clusterrolebinding", cluster_name)]


@pytest.fixture(scope="session")
def crd(kube: Kube) -> Path:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kube.kubectl(
        "wait", "--for=condition=Established", "crd/lingdeployments.serving.ling.dev", "--timeout=60s"
    )
    return CRD


@pytest.fixture
def operators(kube: Kube, namespace: str, crd: Path, tmp_path: Path) -> Iterator[OperatorFactory]:
    """Start operator replicas with `operators.start()`; all are stopped after the test."""
    kubeconfig, cluster_objects = _rbac_kubeconfig(kube, namespace, tmp_path)
    factory = OperatorFactory(kube, namespace, kubeconfig, tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
        for op in factory.started:
            # Captured by pytest: shown only when the test failed.
            print(f"--- operator {op.identity} ---\n{op.output()[-20000:]}")
        for kind, name in cluster_objects:
            kube.kubectl("delete", kind, name, "--ignore-not-found", check=False)
