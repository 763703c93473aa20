"""The pod executor on the real control plane: pods bound to its node run as local processes.

What a user of `kubectl` sees: the pod goes Running with a 127.x IP, its readiness probe gates
Ready, exit codes and restarts are reported, its stable DNS name resolves to it, a wildcard bind
stays on its pod IP, and deleting it kills every process it started (even one in its own session).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from e2e.conftest import ExecutorHandle, free_port, wait_until
from e2e.executor import procs

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

# A server that waits before listening (so "Running but not Ready" is observable), binds the
# wildcard address, prints its env expansion and the pid of a child in its own session.
SERVER = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys, threading, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    def term(*_):  # says each SIGTERM, and lingers a second so that a second one would be seen
        print("TERM", flush=True)
        threading.Timer(1.0, os._exit, (0,)).start()
    signal.signal(signal.SIGTERM, term)
    print("GREETING=" + os.environ["GREETING"], "CHILD=" + str(child.pid), flush=True)
    time.sleep(float(os.environ["DELAY"]))
    http.server.HTTPServer(("0.0.0.0", int(os.environ["PORT"])), http.server.SimpleHTTPRequestHandler).serve_forever()
    """
)


def pod_manifest(node: str, name: str, containers: list[dict[str, Any]], **spec: Any) -> str:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": "ling.dev/local-exec", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 5,
            "containers": containers,
            **spec,
        },
    }
    return json.dumps(body)


def get_pod(kube, namespace: str, name: str) -> dict[str, Any] | None:
    out = kube.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def cond(pod: dict[str, Any], kind: str) -> str | None:
    for c in pod.get("status", {}).get("conditions") or []:
        if c["type"] == kind:
            return c["status"]
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def test_pod_runs_is_gated_by_readiness_resolves_and_dies_with_deletion(
    kube, namespace: str, executor: ExecutorHandle
) -> None:
    # Free on 127.0.0.1, so "nothing answers there" below is about the pod, not a neighbour.
    port = free_port()
    container = {
        "name": "main",
        "image": "unused",
        "command": ["python", "-c", SERVER],
        "env": [
            {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "GREETING", "value": "hello-$(MY_NS)-$(MY_IP)"},
            {"name": "DELAY", "value": "4"},
            {"name": "PORT", "value": str(port)},
        ],
        "ports": [{"name": "web", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "web"}, "periodSeconds": 1},
    }
    kube.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=pod_manifest(executor.node, "web", [container], hostname="web", subdomain="sub"),
    )

    running = wait_until(
        "pod web Running",
        lambda: (p := get_pod(kube, namespace, "web")) and p["status"].get("phase") == "Running" and p,
        timeout=60,
        interval=0.3,
    )
    ip = running["status"]["podIP"]
    assert ip.startswith("127.") and ip != "127.0.0.1"
    # The server sleeps 4 s before listening: Ready must wait for the probe.
    assert cond(running, "Ready") == "False"
    ready = wait_until(
        "pod web Ready",
        lambda: (p := get_pod(kube, namespace, "web")) and cond(p, "Ready") == "True" and p,
        60,
    )
    status = ready["status"]["containerStatuses"][0]
    assert status["ready"] is True and "running" in status["state"]
    pid = int(status["containerID"].removeprefix("ling-exec://"))

    # Env: downward API and $(VAR) expansion, exactly as a kubelet resolves them.
    out = executor.container_log(namespace, "web", "main")
    assert f"GREETING=hello-{namespace}-{ip}" in out
    child = int(out.split("CHILD=")[1].split()[0])
    assert pid_alive(pid) and pid_alive(child)

    # The stable name of the pod resolves to its loopback IP, for any process of this machine.
    assert socket.gethostbyname(f"web.sub.{namespace}.svc") == ip
    assert socket.gethostbyname(f"web.sub.{namespace}.svc.cluster.local") == ip
    # The wildcard bind stayed on the pod IP: nothing listens on 127.0.0.1 (or beyond loopback).
    with socket.create_connection((ip, port), timeout=5):
        pass
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass

    kube.kubectl("delete", "pod", "web", "-n", namespace, "--wait=true", "--timeout=60s")
    assert get_pod(kube, namespace, "web") is None
    wait_until("the pod's processes to be gone", lambda: not pid_alive(pid) and not pid_alive(child), 15, 0.3)
    # As from a kubelet: one SIGTERM (a second means "stop now" to many servers, the runtime's included).
    assert executor.container_log(namespace, "web", "main").count("TERM") == 1
    hosts = Path("/etc/hosts")
    wait_until("the DNS name to go", lambda: f"web.sub.{namespace}.svc" not in hosts.read_text(), 10, 0.5)


def test_exit_codes_restart_policy_and_init_containers(
    kube, namespace: str, executor: ExecutorHandle
) -> None:
    never = pod_manifest(
        executor.node,
        "fails",
        [{"name": "main", "image": "unused", "command": ["sh", "-c", "echo bye; exit 7"]}],
        restartPolicy="Never",
    )
    on_failure = pod_manifest(
        executor.node,
        "flaky",
        [{"name": "main", "image": "unused", "command": ["sh", "-c", "exit 3"]}],
        restartPolicy="OnFailure",
    )
    with_init = pod_manifest(
        executor.node,
        "init",
        [{"name": "main", "image": "unused", "command": ["sh", "-c", 'test -f "$LING_EXEC_VOLUME_WORK/ok"']}],
        restartPolicy="Never",
        initContainers=[
            {
                "name": "prep",
                "image": "unused",
                "command": ["sh", "-c", 'touch "$LING_EXEC_VOLUME_WORK/ok"'],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }
        ],
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    # The main container of "init" mounts the same emptyDir: the init container's file is visible.
    doc = json.loads(with_init)
    doc["spec"]["containers"][0]["volumeMounts"] = [{"name": "work", "mountPath": "/work"}]
    for manifest in (never, on_failure, json.dumps(doc)):
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)

    failed = wait_until(
        "pod fails Failed",
        lambda: (p := get_pod(kube, namespace, "fails")) and p["status"].get("phase") == "Failed" and p,
        60,
    )
    term = failed["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 7 and term["reason"] == "Error"

    flaky = wait_until(
        "pod flaky restarted twice",
        lambda: (
            (p := get_pod(kube, namespace, "flaky"))
            and p["status"]["containerStatuses"][0]["restartCount"] >= 2
            and p
        ),
        60,
    )
    assert flaky["status"]["phase"] == "Running"
    assert flaky["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 3

    done = wait_until(
        "pod init Succeeded",
        lambda: (
            (p := get_pod(kube, namespace, "init"))
            and p["status"].get("phase") in ("Succeeded", "Failed")
            and p
        ),
        60,
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert cond(done, "Initialized") == "True"


class _Forwarder:
    """A loopback TCP forwarder to the API server that the test can cut (an API outage)."""

    def __init__(self, target: tuple[str, int]) -> None:
        import threading

        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        self.closed = True
        self.listener.close()
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()


def test_executor_stops_its_pods_and_exits_when_the_api_server_is_gone(
    kube, namespace: str, tmp_path: Path
) -> None:
    import yaml

    config = yaml.safe_load(kube.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    forwarder = _Forwarder((host, int(port)))
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{forwarder.port}"
    via_forwarder = tmp_path / "kubeconfig"
    via_forwarder.write_text(yaml.safe_dump(config))
    node = f"e2e-cut-{os.getpid()}"
    log = tmp_path / "executor.log"
    cmd = [
        sys.executable,
        "-m",
        "e2e.executor",
        "--kubeconfig",
        str(via_forwarder),
        "--node",
        node,
        "--pod-cidr",
        "127.98.0.0/16",
        "--state-dir",
        str(tmp_path / "state"),
        "--exit-after-api-loss",
        "5",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=Path(__file__).parents[1], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(f"node {node}", lambda: kube.kubectl("get", "node", node, check=False).returncode == 0, 60)
        sleeper = {"name": "main", "image": "unused", "command": ["sleep", "600"]}
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=pod_manifest(node, "sleeper", [sleeper]))
        running = wait_until(
            "sleeper Running",
            lambda: (
                (p := get_pod(kube, namespace, "sleeper")) and p["status"].get("phase") == "Running" and p
            ),
            60,
        )
        pid = int(running["status"]["containerStatuses"][0]["containerID"].removeprefix("ling-exec://"))
        assert pid_alive(pid)
        forwarder.cut()
        wait_until("the executor to exit", lambda: proc.poll() is not None, 90)
        assert not pid_alive(pid), "a pod process outlived its executor"
        assert "API server unreachable" in log.read_text()
    finally:
        forwarder.cut()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        procs.terminate(None, f"{node}/", 0)
        kube.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
        kube.kubectl(
            "delete",
            "pod",
            "sleeper",
            "-n",
            namespace,
            "--force",
            "--grace-period=0",
            "--ignore-not-found",
            check=False,
        )
