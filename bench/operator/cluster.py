"""The benchmark's own control plane: a second kwokctl cluster beside the shared one.

Same binaries, kwokctl configuration and kwok stages as hack/cluster.sh (so pods become Running the
same way), but its own name, port and work dir, an audit policy that logs every request of the
controllers under test, more simulated GPU nodes (N = 1000 groups need 2000 GPUs), and one client
certificate per controller so that the audit log tells their requests apart. Other engineers' tests
on the shared cluster are never touched.
"""

from __future__ import annotations

import base64
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HACK = ROOT / "hack"
CACHE = Path(
    os.environ.get("LING_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ling")
)
BIN = CACHE / "bin"
NAME = "ling-bench"
WORKDIR = Path(os.environ.get("LING_BENCH_WORKDIR", CACHE / "bench-cluster"))
CLUSTER_DIR = WORKDIR / "clusters" / NAME
KUBECONFIG = WORKDIR / "kubeconfig"
DEFAULT_PORT = int(os.environ.get("LING_BENCH_APISERVER_PORT", "26443"))
AUDIT_LOG = CLUSTER_DIR / "logs" / "audit.log"
GPUS_PER_NODE = 32  # fat simulated nodes: fewer Node objects, same scheduling work per pod
# The identities (client certificate CNs) whose requests the audit policy logs.
USERS = {"ours": "bench:ours", "kuberay": "bench:kuberay", "lws": "bench:lws"}


def versions() -> dict[str, str]:
    """hack/versions.env + bench/operator/versions.env as a dict."""
    out: dict[str, str] = {}
    for f in (HACK / "versions.env", Path(__file__).with_name("versions.env")):
        for line in f.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key] = value
    return out


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, log: Path | None = None, timeout: float = 300
) -> str:
    """Run a command (an argument list, never a shell string); on failure raise with its output."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        where = f" (log: {log})" if log else ""
        raise RuntimeError(
            f"{cmd[0]} {' '.join(cmd[1:4])} ... failed{where}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    return proc.stdout


def audit_policy() -> dict[str, Any]:
    # Metadata (no bodies) for the controllers, nothing for anyone else: the log stays small, and
    # RequestReceived is omitted because ResponseStarted/Complete carry the same auditID and times.
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "users": sorted(USERS.values())}, {"level": "None"}],
    }


def node(i: int) -> dict[str, Any]:
    """A simulated GPU server shaped like hack/kwok/nodes.yaml's, with GPUS_PER_NODE GPUs."""
    name = f"bench-gpu-{i}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": f"bench-{'ab'[i % 2]}",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H200",
                "nvidia.com/gpu.count": str(GPUS_PER_NODE),
            },
        },
        "spec": {"podCIDR": f"10.{100 + i // 250}.{i % 250}.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": f"10.20.{i // 250}.{i % 250 + 1}"}],
            "capacity": {"cpu": "768", "memory": "8Ti", "pods": "250", "nvidia.com/gpu": str(GPUS_PER_NODE)},
            "allocatable": {
                "cpu": "760",
                "memory": "8000Gi",
                "pods": "250",
                "nvidia.com/gpu": str(GPUS_PER_NODE),
            },
        },
    }


def nodes_for(max_groups: int) -> int:
    """Nodes for `max_groups` groups of 2 one-GPU pods, with one node of slack."""
    return math.ceil(2 * max_groups / GPUS_PER_NODE) + 1


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@dataclass
class Cluster:
    port: int = DEFAULT_PORT

    @property
    def env(self) -> dict[str, str]:
        v = versions()
        return {
            **os.environ,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "KWOK_WORKDIR": str(WORKDIR),
            "KWOK_KUBE_VERSION": v["K8S_VERSION"],
            "KWOK_VERSION": v["KWOK_VERSION"],
            "KWOK_ETCD_VERSION": v["ETCD_VERSION"].lstrip("v"),
            "KWOK_KUBECTL_BINARY": str(BIN / "kubectl"),
        }

    def kubectl(self, *args: str, kubeconfig: Path = KUBECONFIG, timeout: float = 300) -> str:
        return run([str(BIN / "kubectl"), "--kubeconfig", str(kubeconfig), *args], timeout=timeout)

    def healthy(self) -> bool:
        if not KUBECONFIG.exists():
            return False
        try:
            return self.kubectl("get", "--raw=/readyz", "--request-timeout=5s", timeout=10).strip() == "ok"
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def up(self, max_groups: int) -> None:
        """Create (or reuse) the cluster, its stages, CRDs and enough GPU nodes for `max_groups`."""
        logs = CACHE / "logs"
        if not self.healthy():
            if CLUSTER_DIR.exists():
                self.down()
            WORKDIR.mkdir(parents=True, exist_ok=True)
            policy = WORKDIR / "audit-policy.yaml"
            policy.write_text(yaml.safe_dump(audit_policy()))
            print(
                f"[bench] creating cluster {NAME} on 127.0.0.1:{self.port} (log {logs / 'bench-cluster-up.log'})"
            )
            run(
                [
                    str(BIN / "kwokctl"), "create", "cluster", "--name", NAME, "--runtime", "binary",
                    "--config", str(HACK / "kwok" / "kwokctl.yaml"),
                    "--kubeconfig", str(KUBECONFIG),
                    "--kube-apiserver-port", str(self.port),
                    "--kube-audit-policy", str(policy),
                    "--kube-apiserver-binary", str(BIN / "kube-apiserver"),
                    "--kube-controller-manager-binary", str(BIN / "kube-controller-manager"),
                    "--kube-scheduler-binary", str(BIN / "kube-scheduler"),
                    "--etcd-binary", str(BIN / "etcd"),
                    "--kwok-controller-binary", str(BIN / "kwok"),
                    "--wait", "120s",
                ],
                env=self.env, log=logs / "bench-cluster-up.log", timeout=300,
            )  # fmt: skip
        for _ in range(60):
            if self.healthy():
                break
            time.sleep(1)
        self.kubectl("wait", "--for=condition=Established", "crd/stages.kwok.x-k8s.io", "--timeout=60s")
        self.kubectl("apply", "-f", str(HACK / "kwok" / "stages"))
        self.ensure_nodes(nodes_for(max_groups))
        self.ensure_service_cidr()
        self.apply_crds()

    def ensure_service_cidr(self) -> None:
        # kwokctl's default Service range is a /24 (254 ClusterIPs); N = 1000 LingDeployments need
        # 1000. A second ServiceCIDR (GA since Kubernetes 1.33) widens it without a restart.
        path = WORKDIR / "service-cidr.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "ServiceCIDR",
                    "metadata": {"name": "bench-wide"},
                    "spec": {"cidrs": ["10.96.0.0/16"]},
                }
            )
        )
        self.kubectl("apply", "-f", str(path))

    def ensure_nodes(self, count: int) -> None:
        have = set(self.kubectl("get", "nodes", "-o", "name").split())
        missing = [node(i) for i in range(count) if f"node/bench-gpu-{i}" not in have]
        if missing:
            # `create` (not apply): a Node's status is only accepted on create.
            docs = "\n---\n".join(yaml.safe_dump(n) for n in missing)
            path = WORKDIR / "nodes.yaml"
            path.write_text(docs)
            self.kubectl("create", "-f", str(path))
        self.kubectl("wait", "--for=condition=Ready", "node", "-l", "type=kwok", "--timeout=120s")

    def apply_crds(self) -> None:
        dirs = dict(
            line.split(" ", 1)
            for line in run(["bash", str(HACK / "build-bench-peers.sh"), "crd-dirs"]).strip().splitlines()
        )
        files = [
            ROOT / "crds" / "serving.ling.dev_lingdeployments.yaml",
            Path(dirs["kuberay"]) / "ray.io_rayclusters.yaml",
            Path(dirs["lws"]) / "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
        ]
        for f in files:
            # Server-side: the RayCluster CRD is too large for client-side apply's annotation.
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
        for crd in (
            "lingdeployments.serving.ling.dev",
            "rayclusters.ray.io",
            "leaderworkersets.leaderworkerset.x-k8s.io",
        ):
            self.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")

    def down(self) -> None:
        if CLUSTER_DIR.exists():
            try:
                run(
                    [str(BIN / "kwokctl"), "delete", "cluster", "--name", NAME, "--kubeconfig", str(KUBECONFIG)],
                    env=self.env, log=CACHE / "logs" / "bench-cluster-down.log", timeout=120,
                )  # fmt: skip
            except RuntimeError as exc:
                print(f"[bench] warning: kwokctl delete cluster failed: {exc}")

    # -- identities -----------------------------------------------------------------------------------

    def identity(self, user: str) -> Path:
        """A kubeconfig whose client certificate says CN=`user` (group system:masters), signed by
        the cluster's CA: the audit log then names `user` for every request made with it."""
        out = WORKDIR / "identities"
        out.mkdir(parents=True, exist_ok=True)
        stem = user.replace(":", "-")
        key, csr, crt = out / f"{stem}.key", out / f"{stem}.csr", out / f"{stem}.crt"
        ca_crt, ca_key = CLUSTER_DIR / "pki" / "ca.crt", CLUSTER_DIR / "pki" / "ca.key"
        kubeconfig = out / f"{stem}.kubeconfig"
        # A cluster recreated since has a new CA: re-sign when the CA is newer than the cert.
        if not crt.exists() or crt.stat().st_mtime < ca_crt.stat().st_mtime:
            run(["openssl", "genrsa", "-out", str(key), "2048"])
            run(
                [
                    "openssl",
                    "req",
                    "-new",
                    "-key",
                    str(key),
                    "-out",
                    str(csr),
                    "-subj",
                    f"/O=system:masters/CN={user}",
                ]
            )
            run(
                [
                    "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-out", str(crt), "-days", "7",
                ]
            )  # fmt: skip
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": NAME,
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.port}",
                        "certificate-authority-data": _b64(ca_crt),
                    },
                }
            ],
            "users": [
                {"name": user, "user": {"client-certificate-data": _b64(crt), "client-key-data": _b64(key)}}
            ],
            "contexts": [{"name": user, "context": {"cluster": NAME, "user": user}}],
            "current-context": user,
        }
        kubeconfig.write_text(yaml.safe_dump(config))
        return kubeconfig
