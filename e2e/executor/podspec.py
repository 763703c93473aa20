"""Pure pieces of the pod executor: env resolution, `$(VAR)` expansion, probes' targets, statuses.

Everything here is a function of a pod (a dict in Kubernetes JSON shape) and local facts (the pod
IP, the directories volumes map to); nothing talks to the API or starts a process, so the kubelet
behaviours we imitate are tested without a cluster (e2e/test_executor_unit.py).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

# Reads a Secret's or ConfigMap's data (decoded): (kind, namespace, name) -> data, or None when absent.
DataReader = Callable[[str, str, str], dict[str, str] | None]

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodSpecError(ValueError):
    """The pod asks for something the executor cannot give it (the message names the field)."""


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined vars are replaced, `$$` escapes, unknown refs stay."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(sub, text)


def field_ref(pod: Mapping[str, Any], path: str, pod_ip: str, node_ip: str) -> str:
    """The downward API's fieldRef paths that a kubelet resolves for env."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": node_ip,
        "status.hostIPs": node_ip,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise PodSpecError(f"fieldRef.fieldPath {path!r}: not supported by the executor")


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_ip: str,
    node_ip: str,
    read_data: DataReader,
) -> dict[str, str]:
    """A container's env in order, like the kubelet: later entries may use `$(EARLIER)`."""
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = source.get(key)
            if not ref:
                continue
            data = read_data(kind, namespace, ref["name"])
            if data is None and not ref.get("optional"):
                raise PodSpecError(f"envFrom: {kind} {namespace}/{ref['name']} not found")
            for k, v in (data or {}).items():
                env[prefix + k] = v
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item.get("value") or ""), env)
            continue
        value_from = item.get("valueFrom") or {}
        if "fieldRef" in value_from:
            env[name] = field_ref(pod, value_from["fieldRef"]["fieldPath"], pod_ip, node_ip)
        elif "secretKeyRef" in value_from or "configMapKeyRef" in value_from:
            kind, ref = (
                ("Secret", value_from["secretKeyRef"])
                if "secretKeyRef" in value_from
                else ("ConfigMap", value_from["configMapKeyRef"])
            )
            value = (read_data(kind, namespace, ref["name"]) or {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise PodSpecError(f"env {name}: {kind} {namespace}/{ref['name']} has no key {ref['key']!r}")
            env[name] = value
        elif "resourceFieldRef" in value_from:
            env[name] = "0"  # no resource limits are enforced here
        else:
            env[name] = ""
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded; an image's entrypoint cannot be known here."""
    command = [expand(str(a), env) for a in container.get("command") or []]
    args = [expand(str(a), env) for a in container.get("args") or []]
    if not command:
        raise PodSpecError(
            f"container {container.get('name')!r}: no command (the executor runs no images, so the "
            "image entrypoint is unknown; set command)"
        )
    return command + args


def volume_env_name(volume: str) -> str:
    return "LING_EXEC_VOLUME_" + re.sub(r"[^A-Za-z0-9]", "_", volume).upper()


def resolve_port(container: Mapping[str, Any], port: Any) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise PodSpecError(f"probe port {port!r}: container {container.get('name')!r} has no port of that name")


def decode_secret(data: Mapping[str, str] | None, key: str) -> str | None:
    if not data or key not in data:
        return None
    return base64.b64decode(data[key]).decode()


def hosts_entries(pods: list[Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """`<hostname>.<subdomain>.<ns>.svc[.cluster.local]` -> pod IP for every pod that has an IP."""
    entries: list[tuple[str, list[str]]] = []
    for pod in pods:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        ip = (pod.get("status") or {}).get("podIP")
        hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
        if not ip or not hostname or not subdomain:
            continue
        base = f"{hostname}.{subdomain}.{meta.get('namespace', 'default')}.svc"
        entries.append((ip, [base, base + ".cluster.local"]))
    return sorted(entries)


def render_hosts(current: str, block_id: str, entries: list[tuple[str, list[str]]]) -> str:
    """/etc/hosts with our marked block replaced (or removed when there are no entries)."""
    begin, end = f"# BEGIN ling-e2e-executor {block_id}", f"# END ling-e2e-executor {block_id}"
    kept: list[str] = []
    inside = False
    for line in current.splitlines():
        if line.strip() == begin:
            inside = True
            continue
        if inside and line.strip() == end:
            inside = False
            continue
        if not inside:
            kept.append(line)
    if entries:
        kept.append(begin)
        kept += [f"{ip}\t{' '.join(names)}" for ip, names in entries]
        kept.append(end)
    return "\n".join(kept) + "\n"


def container_state(
    *,
    running_since: str | None,
    exit_code: int | None,
    signal: int | None,
    started_at: str | None,
    finished_at: str | None,
    waiting_reason: str | None,
    waiting_message: str | None = None,
) -> dict[str, Any]:
    if running_since is not None:
        return {"running": {"startedAt": running_since}}
    if exit_code is not None:
        term: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else ("Error" if signal is None else "Killed"),
            "startedAt": started_at,
            "finishedAt": finished_at,
        }
        if signal is not None:
            term["signal"] = signal
        return {"terminated": term}
    waiting: dict[str, Any] = {"reason": waiting_reason or "ContainerCreating"}
    if waiting_message:
        waiting["message"] = waiting_message
    return {"waiting": waiting}


def condition(kind: str, ok: bool, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": None}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def pod_phase(restart_policy: str, exits: list[int | None], all_started: bool) -> str:
    """Phase from the main containers' exit codes (None: still running or to be restarted)."""
    if not all_started:
        return "Pending"
    if any(code is None for code in exits):
        return "Running"
    if all(code == 0 for code in exits):
        return "Succeeded"
    return "Failed" if restart_policy == "Never" else "Running"
