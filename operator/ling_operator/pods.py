"""Observed pods, reduced to what the decisions read.

The watch delivers whole pods (managedFields, the full spec, every condition); the operator keeps only
this record of each, built once when the pod arrives, so the cache stays small at thousands of pods and
reconcile.py reads typed fields instead of walking Kubernetes JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ling_operator import resources
from ling_operator.api import Reason
from ling_operator.timeutil import parse_time

# The kubelet's waiting reasons that keep a container from starting until someone fixes the pod spec, the
# image or the registry (kubelet/images and kuberuntime), by the reason the operator reports them under.
_WAITING_REASONS = {
    **dict.fromkeys(
        (
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "ErrImageNeverPull",
            "RegistryUnavailable",
            "ImageInspectError",
            "SignatureValidationFailed",
        ),
        Reason.IMAGE_PULL_FAILED,
    ),
    **dict.fromkeys(
        ("CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreStartHookError"),
        Reason.CONTAINER_CONFIG_ERROR,
    ),
}


def scheduling_reason(message: str) -> str:
    """The reason for the scheduler's words on an unschedulable pod (its PodScheduled message). A message
    names every filter that rejected a node; the first cause here wins: a missing volume blocks a pod
    wherever GPUs are free, and GPU nodes that are all full beat other nodes that do not match."""
    m = message.lower()
    if (
        ("persistentvolumeclaim" in m and ("not found" in m or "being deleted" in m))
        or "unbound immediate persistentvolumeclaims" in m
        or "didn't find available persistent volumes" in m
        or "volume node affinity conflict" in m
    ):
        return Reason.WAITING_FOR_VOLUME
    if "insufficient nvidia.com/gpu" in m:
        return Reason.WAITING_FOR_GPUS
    if (
        "didn't match pod's node affinity/selector" in m
        or "untolerated taint" in m
        or "didn't match pod affinity" in m
        or "didn't match pod anti-affinity" in m
        or "didn't satisfy existing pods anti-affinity" in m
        or "didn't match pod topology spread constraints" in m
    ):
        return Reason.NO_MATCHING_NODE
    return Reason.UNSCHEDULABLE


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
    # (reason, the scheduler's or kubelet's words) while the pod cannot progress without someone acting:
    # not schedulable (PodScheduled False), or a container the kubelet cannot start (image, config).
    stuck: tuple[str, str] | None = None
    created_at: datetime | None = None  # metadata.creationTimestamp
    scheduled_at: datetime | None = None  # PodScheduled True since (the scheduler's clock)
    ready_at: datetime | None = None  # Ready True since (the kubelet's clock)

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
        waiting = _waiting(status)
        stuck = None
        if unschedulable is not None:
            stuck = (scheduling_reason(unschedulable), unschedulable)
        else:
            stuck = _stuck_container(status)
        ready_cond = conditions.get("Ready") or {}
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
            ready_condition=ready_cond.get("status") == "True",
            scheduled=bool((pod.get("spec") or {}).get("nodeName")) or scheduled_cond.get("status") == "True",
            unschedulable=unschedulable,
            failure=_failure(status, -1 if rank is None else rank),
            waiting=waiting,
            stuck=stuck,
            created_at=parse_time(meta.get("creationTimestamp")),
            scheduled_at=(
                parse_time(scheduled_cond.get("lastTransitionTime"))
                if scheduled_cond.get("status") == "True"
                else None
            ),
            ready_at=parse_time(ready_cond.get("lastTransitionTime"))
            if ready_cond.get("status") == "True"
            else None,
        )

    @property
    def placed_at(self) -> datetime | None:
        """When the scheduler placed this pod (its creation, for a pod that says no more)."""
        return self.scheduled_at or (self.created_at if self.scheduled else None)


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
    for init, cs in _container_statuses(status):
        if (
            init
            and cs.get("name") == resources.DOWNLOAD_CONTAINER_NAME
            and (cs.get("state") or {}).get("running")
        ):
            # The Hugging Face download (or its wait for another pod on the node): the conditions say so,
            # the init container's log has the progress.
            out.append(
                f"{cs.get('name')}: downloading the weights (progress: kubectl logs -c {cs.get('name')})"
            )
            continue
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason and reason not in ("PodInitializing", "ContainerCreating"):
            message = waiting.get("message")
            out.append(f"{cs.get('name')}: {reason}" + (f": {message}" if message else ""))
    return tuple(out)


def _stuck_container(status: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, the kubelet's words) for the first container the kubelet cannot start."""
    for _, cs in _container_statuses(status):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = _WAITING_REASONS.get(str(waiting.get("reason")))
        if reason is not None:
            message = waiting.get("message")
            return reason, f"{cs.get('name')}: {waiting.get('reason')}" + (f": {message}" if message else "")
    return None
