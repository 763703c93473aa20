"""Observed pods, reduced to what the decisions read.

The watch delivers whole pods (managedFields, the full spec, every condition); the operator keeps only
this record of each, built once when the pod arrives, so the cache stays small at thousands of pods and
reconcile.py reads typed fields instead of walking Kubernetes JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ling_operator import resources


@dataclass(frozen=True, slots=True)
class ObservedPod:
    name: str
    namespace: str
    uid: str
    resource_version: int | None
    deployment: str | None  # serving.ling.dev/deployment
    group: int | None  # serving.ling.dev/group
    rank: int | None  # serving.ling.dev/rank
    revision: str  # serving.ling.dev/revision ("" when absent)
    owner_uids: tuple[str, ...]
    terminating: bool  # metadata.deletionTimestamp is set
    phase: str | None
    node: str | None
    ip: str | None
    ready_condition: bool  # condition Ready is True
    scheduled: bool  # bound to a node (nodeName, or PodScheduled True)
    unschedulable: str | None  # the scheduler's message while PodScheduled is False
    failure: str | None  # why this rank is dead, in words a person can act on (None while alive)
    waiting: tuple[str, ...]  # the kubelet's words for containers that have not started

    @property
    def running(self) -> bool:
        return self.phase == "Running"

    @property
    def ready(self) -> bool:
        return self.running and self.ready_condition and not self.terminating

    def deleting(self) -> ObservedPod:
        """This pod as the API shows it right after our graceful delete."""
        return replace(self, terminating=True)

    @classmethod
    def from_k8s(cls, pod: Mapping[str, Any]) -> ObservedPod:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = pod.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        scheduled_cond = conditions.get("PodScheduled") or {}
        rank = _int(labels.get(resources.LABEL_RANK))
        unschedulable = None
        if scheduled_cond.get("status") == "False":
            unschedulable = str(
                scheduled_cond.get("message") or scheduled_cond.get("reason") or "not scheduled yet"
            )
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            resource_version=resource_version(pod),
            deployment=labels.get(resources.LABEL_DEPLOYMENT),
            group=_int(labels.get(resources.LABEL_GROUP)),
            rank=rank,
            revision=labels.get(resources.LABEL_REVISION, ""),
            owner_uids=tuple(str(o.get("uid")) for o in meta.get("ownerReferences") or []),
            terminating=bool(meta.get("deletionTimestamp")),
            phase=status.get("phase"),
            node=(pod.get("spec") or {}).get("nodeName") or None,
            ip=status.get("podIP") or None,
            ready_condition=(conditions.get("Ready") or {}).get("status") == "True",
            scheduled=bool((pod.get("spec") or {}).get("nodeName")) or scheduled_cond.get("status") == "True",
            unschedulable=unschedulable,
            failure=_failure(status, -1 if rank is None else rank),
            waiting=_waiting(status),
        )


def resource_version(obj: Mapping[str, Any]) -> int | None:
    """resourceVersion as a number, or None. The API calls it opaque, but every etcd-backed server
    hands out increasing integers, and informers compare them the same way to drop stale events."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or "")
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _container_statuses(status: Mapping[str, Any]) -> list[tuple[bool, Mapping[str, Any]]]:
    """(is an init container, its status), init containers first."""
    init = [(True, cs) for cs in status.get("initContainerStatuses") or []]
    return init + [(False, cs) for cs in status.get("containerStatuses") or []]


def _failure(status: Mapping[str, Any], rank: int) -> str | None:
    if status.get("reason") == "Evicted":
        return f"rank {rank} was evicted: {status.get('message') or 'no message'}"
    for init, cs in _container_statuses(status):
        term = (cs.get("state") or {}).get("terminated")
        if term is None:
            continue
        code = term.get("exitCode")
        if init and code == 0:
            continue
        reason = term.get("reason")
        detail = f" ({reason})" if reason and reason not in ("Error", "Completed") else ""
        who = f"init container {cs.get('name')} of " if init else ""
        return f"{who}rank {rank} exited with code {code}{detail}"
    phase = status.get("phase")
    if phase == "Failed":
        return f"rank {rank} failed: {status.get('reason') or status.get('message') or 'pod phase Failed'}"
    if phase == "Succeeded":
        return f"rank {rank} exited with code 0"
    return None


def _waiting(status: Mapping[str, Any]) -> tuple[str, ...]:
    """ImagePullBackOff and friends, as `<container>: <reason>[: <message>]`."""
    out = []
    for _, cs in _container_statuses(status):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in ("PodInitializing", "ContainerCreating"):
            message = waiting.get("message")
            out.append(f"{cs.get('name')}: {reason}" + (f": {message}" if message else ""))
    return tuple(out)
