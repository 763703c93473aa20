"""Observed pod states as Kubernetes would report them, built from the operator's own pod bodies.

These are data fixtures for the pure decision functions (what a list call returns), not mocks:
each helper takes the pod dict that resources.build_pod made and adds the status fields the
scheduler and kubelet would set.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from ling_operator import api, resources
from ling_operator.pods import ObservedPod

OWNER = resources.Owner(name="ling", namespace="serving", uid="uid-1")


def base_spec(**overrides: Any) -> api.LingDeploymentSpec:
    spec: dict[str, Any] = {
        "replicas": 1,
        "model": {"source": {"hostPath": {"path": "/models/ling"}}},
        "parallelism": {"tensor": 4, "gpusPerPod": 2},
        "failurePolicy": {"backoffSeconds": 10, "maxBackoffSeconds": 300, "rendezvousTimeoutSeconds": 600},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return resources.validated_spec(spec)


def pending(pod: dict[str, Any], message: str | None = None) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    if message:
        cond["message"] = message
    pod["status"] = {"phase": "Pending", "conditions": [cond] if message else []}
    return pod


def _stamp(at: datetime | None) -> dict[str, str]:
    return {} if at is None else {"lastTransitionTime": at.strftime("%Y-%m-%dT%H:%M:%SZ")}


def scheduled(pod: dict[str, Any], node: str = "gpu-0", at: datetime | None = None) -> dict[str, Any]:
    """Bound to `node` (by the scheduler at `at`, when given)."""
    pod = copy.deepcopy(pod)
    pod["spec"]["nodeName"] = node
    pod["status"] = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True", **_stamp(at)}],
    }
    return pod


def running(
    pod: dict[str, Any],
    node: str = "gpu-0",
    ready: bool = False,
    at: datetime | None = None,
    ready_at: datetime | None = None,
) -> dict[str, Any]:
    """Running on `node` (placed at `at`, Ready since `ready_at`, when given)."""
    pod = scheduled(pod, node, at)
    pod["status"] = {
        "phase": "Running",
        "podIP": "10.0.0.1",
        "conditions": [
            {"type": "PodScheduled", "status": "True", **_stamp(at)},
            {"type": "Ready", "status": "True" if ready else "False", **_stamp(ready_at if ready else None)},
        ],
        "containerStatuses": [{"name": "engine", "state": {"running": {}}, "ready": ready}],
    }
    return pod


def ready(
    pod: dict[str, Any], node: str = "gpu-0", at: datetime | None = None, ready_at: datetime | None = None
) -> dict[str, Any]:
    return running(pod, node, ready=True, at=at, ready_at=ready_at)


def waiting(pod: dict[str, Any], reason: str, message: str = "", container: str = "engine") -> dict[str, Any]:
    """Scheduled, with the kubelet unable to start `container` (ErrImagePull, CreateContainerConfigError)."""
    pod = scheduled(pod)
    state = {"reason": reason, **({"message": message} if message else {})}
    pod["status"]["containerStatuses"] = [{"name": container, "state": {"waiting": state}, "ready": False}]
    return pod


def exited(pod: dict[str, Any], code: int, reason: str = "Error") -> dict[str, Any]:
    pod = running(pod)
    pod["status"]["phase"] = "Failed"
    pod["status"]["containerStatuses"] = [
        {"name": "engine", "state": {"terminated": {"exitCode": code, "reason": reason}}, "ready": False}
    ]
    return pod


def evicted(pod: dict[str, Any]) -> dict[str, Any]:
    pod = running(pod)
    pod["status"].update({"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."})
    return pod


def terminating(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return pod


def group_pods(
    spec: api.LingDeploymentSpec, group: int, state: Any = ready, **kw: Any
) -> list[dict[str, Any]]:
    return [state(p, **kw) for p in resources.build_group(OWNER, spec, group)]


def observed(pods: list[dict[str, Any]]) -> list[ObservedPod]:
    """What the operator keeps of each pod (its watch cache holds these, not the whole pods)."""
    return [ObservedPod.from_k8s(p) for p in pods]
