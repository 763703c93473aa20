"""How each controller under test is started as a local process against the benchmark cluster.

Each runs with its own client certificate (its audit identity), with leader election on (as each is
deployed by default: its Lease renewals are counted apart), and listens on nothing but loopback:
metrics and health endpoints are off, LWS's webhook server binds 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.operator import cluster as cl

LWS_WEBHOOK_PORT = int(os.environ.get("LING_BENCH_LWS_WEBHOOK_PORT", "29443"))
# Namespaces whose pods LWS's pod webhooks see: the real install matches every namespace, here only
# the LWS runs' ones, so that a stopped LWS never blocks pod creation elsewhere in this cluster.
LWS_NS_LABEL = "bench.ling.dev/lws"
LEASE_NAMESPACES = {"ours": "ling-system", "kuberay": "ray-system", "lws": "lws-system"}


def peer_binary(kind: str) -> Path:
    v = cl.versions()
    if kind == "kuberay":
        return cl.CACHE / "tools" / f"kuberay-{v['KUBERAY_VERSION']}" / "bin" / "ray-operator"
    return cl.CACHE / "tools" / f"lws-{v['LWS_VERSION']}" / "bin" / "lws-controller"


@dataclass
class Controller:
    kind: str
    user: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    cleanup: list[list[str]] = field(default_factory=list)  # kubectl argument lists run after stop

    def start(self) -> int:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            # A new session: the controller never gets the terminal's signals meant for the harness.
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, c: cl.Cluster) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for args in self.cleanup:
            try:
                c.kubectl(*args)
            except RuntimeError as exc:
                print(f"[bench] warning: cleanup kubectl {' '.join(args)}: {exc}")


def _ensure_namespace(c: cl.Cluster, name: str) -> None:
    c.kubectl("create", "namespace", name, "--dry-run=client", "-o", "yaml")  # validates the name
    if name not in c.kubectl("get", "namespaces", "-o", "name"):
        c.kubectl("create", "namespace", name)


def ours(c: cl.Cluster, logs: Path) -> Controller:
    kubeconfig = c.identity(cl.USERS["ours"])
    _ensure_namespace(c, LEASE_NAMESPACES["ours"])
    argv = [
        sys.executable, "-m", "ling_operator", "--kubeconfig", str(kubeconfig),
        "--metrics-port", "0", "--health-port", "0", "--metrics-address", "127.0.0.1",
        "--lease-namespace", LEASE_NAMESPACES["ours"], "--identity", "bench",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(cl.ROOT / "operator")}
    return Controller("ours", cl.USERS["ours"], argv, env, logs / "ours.log")


def kuberay(c: cl.Cluster, logs: Path) -> Controller:
    kubeconfig = c.identity(cl.USERS["kuberay"])
    _ensure_namespace(c, LEASE_NAMESPACES["kuberay"])
    argv = [
        str(peer_binary("kuberay")),
        "--metrics-addr", "0", "--health-probe-bind-address", "0",
        "--leader-election-namespace", LEASE_NAMESPACES["kuberay"],
        "--log-stdout-encoder", "console",
    ]  # fmt: skip
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return Controller("kuberay", cl.USERS["kuberay"], argv, env, logs / "kuberay.log")


def _webhook_cert(out: Path) -> Path:
    """A self-signed serving certificate for 127.0.0.1 (tls.crt/tls.key, the names controller-runtime reads)."""
    out.mkdir(parents=True, exist_ok=True)
    crt, key = out / "tls.crt", out / "tls.key"
    if not crt.exists():
        cl.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
                "-keyout", str(key), "-out", str(crt), "-subj", "/CN=127.0.0.1",
                "-addext", "subjectAltName=IP:127.0.0.1",
            ]
        )  # fmt: skip
    return crt


def lws_webhooks(manifests: Path, ca_bundle: str, port: int) -> list[dict[str, Any]]:
    """LWS's own webhook configurations (from its module), pointed at a URL on loopback instead of
    its in-cluster Service, and limited to namespaces labelled LWS_NS_LABEL."""
    docs = [d for d in yaml.safe_load_all(manifests.read_text()) if d]
    for doc in docs:
        doc["metadata"]["name"] = f"bench-lws-{doc['metadata']['name']}"
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}
            hook["namespaceSelector"] = {"matchLabels": {LWS_NS_LABEL: "true"}}
    return docs


def lws(c: cl.Cluster, logs: Path) -> Controller:
    import base64

    kubeconfig = c.identity(cl.USERS["lws"])
    _ensure_namespace(c, LEASE_NAMESPACES["lws"])
    certs = cl.WORKDIR / "lws-webhook-certs"
    crt = _webhook_cert(certs)
    config = {
        "apiVersion": "config.lws.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "leaderElection": {"leaderElect": True, "resourceNamespace": LEASE_NAMESPACES["lws"]},
        # No in-cluster Secret/Service to rotate certificates into: ours are made above.
        "internalCertManagement": {"enable": False},
        "webhook": {"host": "127.0.0.1", "port": LWS_WEBHOOK_PORT, "certDir": str(certs)},
        "metrics": {"bindAddress": "0"},
        "health": {"healthProbeBindAddress": "0"},
    }
    config_path = cl.WORKDIR / "lws-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    dirs = dict(
        line.split(" ", 1)
        for line in cl.run(["bash", str(cl.HACK / "build-bench-peers.sh"), "crd-dirs"]).strip().splitlines()
    )
    manifests = Path(dirs["lws"]).parents[1] / "webhook" / "manifests.yaml"
    hooks = lws_webhooks(manifests, base64.b64encode(crt.read_bytes()).decode(), LWS_WEBHOOK_PORT)
    hooks_path = cl.WORKDIR / "lws-webhooks.yaml"
    hooks_path.write_text("\n---\n".join(yaml.safe_dump(h) for h in hooks))
    c.kubectl("apply", "-f", str(hooks_path))
    argv = [str(peer_binary("lws")), "--config", str(config_path)]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    cleanup = [["delete", "--ignore-not-found", "-f", str(hooks_path)]]
    return Controller("lws", cl.USERS["lws"], argv, env, logs / "lws.log", cleanup=cleanup)


FACTORIES = {"ours": ours, "kuberay": kuberay, "lws": lws}


def wait_leading(ctl: Controller, since: float, offset: int, timeout: float = 90) -> float:
    """Wait until the controller holds its Lease (it acts only then); returns when that was seen."""
    from bench.operator import measure

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not ctl.alive():
            raise RuntimeError(
                f"{ctl.kind} exited (code {ctl.proc.returncode if ctl.proc else '?'}); log: {ctl.log}"
            )
        reqs = measure.read_audit_file(cl.AUDIT_LOG, [ctl.user], offset)
        if any(r.is_lease and r.is_write and r.received >= since for r in reqs):
            return time.time()
        time.sleep(1)
    raise RuntimeError(f"{ctl.kind} did not take its Lease within {timeout:.0f} s; log: {ctl.log}")
