"""The executor's kubelet imitations as pure functions (no cluster): env, expansion, hosts, phases,
and the bind shim that keeps a pod's wildcard listeners on its own loopback IP."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.executor import podspec, procs
from e2e.executor.runner import IpPool

POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
    "spec": {"nodeName": "n1", "hostname": "h", "subdomain": "s"},
}


def reader(kind: str, namespace: str, name: str) -> dict[str, str] | None:
    data = {("Secret", "ns", "tok"): {"token": "s3cret"}, ("ConfigMap", "ns", "cfg"): {"A": "1", "B": "2"}}
    return data.get((kind, namespace, name))


def test_env_resolves_downward_api_refs_and_expands_in_order() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "C_"}],
        "env": [
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
            {"name": "ADDR", "value": "$(IP):80 $(MISSING) $$(IP)"},
        ],
    }
    env = podspec.resolve_env(POD, container, "127.9.0.2", "127.0.0.1", reader)
    assert env["IP"] == "127.9.0.2" and env["NAME"] == "p" and env["APP"] == "x"
    assert env["TOKEN"] == "s3cret" and env["C_A"] == "1"
    # Like the kubelet: defined refs expand, unknown ones stay, $$ escapes.
    assert env["ADDR"] == "127.9.0.2:80 $(MISSING) $(IP)"
    argv = podspec.command_line({"command": ["run", "--host", "$(IP)"], "args": ["$(NAME)"]}, env)
    assert argv == ["run", "--host", "127.9.0.2", "p"]


def test_missing_secret_key_and_missing_command_are_named() -> None:
    bad = {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "nope"}}}]}
    with pytest.raises(podspec.PodSpecError, match="has no key 'nope'"):
        podspec.resolve_env(POD, bad, "127.9.0.2", "127.0.0.1", reader)
    with pytest.raises(podspec.PodSpecError, match="no command"):
        podspec.command_line({"name": "c"}, {})


def test_hosts_block_is_replaced_and_removed_without_touching_other_lines() -> None:
    pod = {**POD, "status": {"podIP": "127.9.0.2"}}
    text = podspec.render_hosts("127.0.0.1 localhost\n", "n1", podspec.hosts_entries([pod]))
    assert "127.9.0.2\th.s.ns.svc h.s.ns.svc.cluster.local" in text
    again = podspec.render_hosts(text, "n1", podspec.hosts_entries([pod]))
    assert again == text
    other = podspec.render_hosts(text, "n2", [("127.8.0.2", ["x.y.z.svc"])])
    assert "h.s.ns.svc" in other and "x.y.z.svc" in other
    assert podspec.render_hosts(other, "n1", []) == podspec.render_hosts(
        "127.0.0.1 localhost\n", "n2", [("127.8.0.2", ["x.y.z.svc"])]
    )


def test_phase_follows_restart_policy() -> None:
    assert podspec.pod_phase("Never", [None], True) == "Running"
    assert podspec.pod_phase("Never", [0], True) == "Succeeded"
    assert podspec.pod_phase("Never", [1], True) == "Failed"
    assert podspec.pod_phase("Always", [1], True) == "Running"
    assert podspec.pod_phase("Never", [None], False) == "Pending"


def test_ip_pool_stays_inside_loopback_and_never_hands_out_one_ip_twice() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        IpPool("10.0.0.0/24")
    pool = IpPool("127.9.0.0/29")
    taken = {pool.take() for _ in range(4)}
    assert len(taken) == 4 and all(ip.startswith("127.9.0.") for ip in taken)
    pool.give_back(next(iter(taken)))
    assert pool.take() not in taken - {next(iter(taken))}


def test_bind_shim_moves_wildcard_listeners_onto_the_pod_ip(tmp_path: Path) -> None:
    shim = procs.build_shim(tmp_path)
    code = (
        "import socket\n"
        "s4 = socket.socket(); s4.bind(('0.0.0.0', 0)); print(s4.getsockname()[0])\n"
        "s6 = socket.socket(socket.AF_INET6); s6.bind(('::', 0)); print(s6.getsockname()[0])\n"
    )
    env = {"LD_PRELOAD": str(shim), procs.POD_IP_ENV: "127.9.0.7", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["127.9.0.7", "::ffff:127.9.0.7"]
    # Without the pod IP the shim changes nothing.
    plain = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, procs.POD_IP_ENV: ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.stdout.split() == ["0.0.0.0", "::"]
    assert socket.inet_aton("127.9.0.7")
