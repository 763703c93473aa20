"""What the watches (and the replies to our own writes) last showed, kept as small typed records.

LingDeployments are kept with their spec validated once per generation and their status as stored; pods
as `pods.ObservedPod`; Services by name only. Everything here runs on the event loop (kopf's handlers,
and the controller between its awaits), so there is no lock. Entries only move forward: a record is
replaced by another object (uid) or by a later resourceVersion, never by a stale event, and a uid the
watch reported gone is not brought back by a LIST answered before the deletion.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ling_operator import resources
from ling_operator.api import LingDeploymentSpec, LingDeploymentStatus, ValidationError
from ling_operator.pods import ObservedPod, resource_version

log = logging.getLogger("ling_operator")
Key = tuple[str, str]  # (namespace, name of the LingDeployment)
# How long a deleted uid is remembered (a LIST older than that cannot arrive any more).
GONE_SECONDS = 600


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    """A LingDeployment as the operator keeps it."""

    namespace: str
    name: str
    uid: str
    resource_version: int | None
    generation: int
    deleting: bool
    spec: LingDeploymentSpec | None  # None when the operator's validation refused it
    spec_error: str | None
    status: dict[str, Any]  # as stored: the base our status patch is computed against
    observed: LingDeploymentStatus  # the same, as the API model

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


def deployment_record(body: Mapping[str, Any], previous: DeploymentRecord | None = None) -> DeploymentRecord:
    """The record of a LingDeployment body; the spec is validated only when its generation is new."""
    meta = body.get("metadata") or {}
    uid, generation = str(meta.get("uid", "")), int(meta.get("generation") or 0)
    status = dict(body.get("status") or {})
    if previous is not None and previous.uid == uid and previous.generation == generation:
        spec, error = previous.spec, previous.spec_error
    else:
        try:
            spec, error = resources.validated_spec(body.get("spec") or {}), None
        except ValidationError as exc:
            spec, error = None, str(exc)
    return DeploymentRecord(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=uid,
        resource_version=resource_version(body),
        generation=generation,
        deleting=bool(meta.get("deletionTimestamp")),
        spec=spec,
        spec_error=error,
        status=status,
        observed=parse_status(status, meta),
    )


def parse_status(stored: dict[str, Any], meta: Mapping[str, Any]) -> LingDeploymentStatus:
    """The stored status as the API model. One the model refuses (written by hand) counts as none: the
    decisions rest on the spec and the observed pods, and the next pass writes a whole status again."""
    try:
        return LingDeploymentStatus.model_validate(stored)
    except ValidationError as exc:
        log.warning(
            "%s/%s: ignoring a status the API model refuses: %s", meta.get("namespace"), meta.get("name"), exc
        )
        return LingDeploymentStatus()


def _older_than(entry: DeploymentRecord | ObservedPod, list_rv: int | None) -> bool:
    return entry.resource_version is not None and list_rv is not None and entry.resource_version <= list_rv


@dataclass
class Cache:
    deployments: dict[Key, DeploymentRecord] = field(default_factory=dict)
    pods: dict[Key, dict[str, ObservedPod]] = field(default_factory=dict)  # deployment -> pod name -> pod
    services: dict[Key, set[str]] = field(default_factory=dict)
    gone: dict[str, float] = field(default_factory=dict)  # uid -> when the watch said it was deleted

    # -- LingDeployments ---------------------------------------------------------------------------------

    def put_deployment(self, body: Mapping[str, Any]) -> bool:
        """Keep a LingDeployment; True when it told the cache something new (the watch's echo of our
        own status patch, whose reply is already here, is not: no pass needs to look at it again)."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if meta.get("uid") in self.gone:
            return False
        current = self.deployments.get(key)
        if current is not None and current.uid == meta.get("uid") and not _moves_forward(body, current):
            return False
        self.deployments[key] = deployment_record(body, current)
        return True

    def drop_deployment(self, key: Key, uid: str | None) -> None:
        if uid:
            self.gone[uid] = time.monotonic()
        current = self.deployments.get(key)
        if current is not None and (uid is None or current.uid == uid):
            del self.deployments[key]
            # Its Services go with it (garbage collector; they have no watch here). Its pods stay until
            # their own DELETED events: a new deployment of the same name must see them.
            self.services.pop(key, None)

    # -- pods --------------------------------------------------------------------------------------------

    def put_pod(self, obj: Mapping[str, Any]) -> bool:
        """Keep a pod of a deployment; True when it told the cache something new (not the watch's echo
        of our own create)."""
        pod = ObservedPod.from_k8s(obj)
        if not pod.deployment or pod.uid in self.gone:
            return False
        pods = self.pods.setdefault((pod.namespace, pod.deployment), {})
        current = pods.get(pod.name)
        if current is not None and current.uid == pod.uid and not _moves_forward(obj, current):
            return False
        pods[pod.name] = pod
        return True

    def drop_pod(self, key: Key, name: str, uid: str | None) -> None:
        if uid:
            self.gone[uid] = time.monotonic()
        pods = self.pods.get(key) or {}
        current = pods.get(name)
        # A DELETED event of an older pod of the same name must not drop its successor.
        if current is not None and (uid is None or current.uid == uid):
            del pods[name]
            if not pods:
                del self.pods[key]

    def mark_deleting(self, key: Key, name: str) -> None:
        """Our delete was accepted: until the watch says the pod is gone, show it terminating (as the
        API would right after a graceful delete), so no pass recreates its name or forgets the delete."""
        pod = (self.pods.get(key) or {}).get(name)
        if pod is not None and not pod.terminating:
            self.pods[key][name] = pod.deleting()

    # -- reading -----------------------------------------------------------------------------------------

    def snapshot(self, key: Key) -> tuple[DeploymentRecord | None, list[ObservedPod], list[str]]:
        return (
            self.deployments.get(key),
            list((self.pods.get(key) or {}).values()),
            sorted(self.services.get(key) or ()),
        )

    def deployment_keys(self) -> list[Key]:
        now = time.monotonic()
        self.gone = {uid: t for uid, t in self.gone.items() if now - t < GONE_SECONDS}
        return list(self.deployments)

    # -- LIST results ------------------------------------------------------------------------------------

    def set_services(self, names: dict[Key, set[str]]) -> None:
        self.services = names

    def add_service(self, key: Key, name: str) -> None:
        self.services.setdefault(key, set()).add(name)

    def relist_deployments(
        self, items: Iterable[Mapping[str, Any]], list_rv: int | None, ns: str | None
    ) -> None:
        """Fill from a LIST of `ns` (None: every namespace); an entry the LIST lacks although the LIST is
        newer than it is gone (its DELETED event was missed)."""
        listed = set()
        for item in items:
            self.put_deployment(item)
            meta = item.get("metadata") or {}
            listed.add((str(meta.get("namespace", "")), str(meta.get("name", ""))))
        for key, record in list(self.deployments.items()):
            if (ns is None or key[0] == ns) and key not in listed and _older_than(record, list_rv):
                self.drop_deployment(key, record.uid)

    def relist_pods(self, items: Iterable[Mapping[str, Any]], list_rv: int | None, ns: str | None) -> None:
        listed = set()
        for item in items:
            self.put_pod(item)
            listed.add((item.get("metadata") or {}).get("uid"))
        for key, pods in list(self.pods.items()):
            if ns is not None and key[0] != ns:
                continue
            for name, pod in list(pods.items()):
                if pod.uid not in listed and _older_than(pod, list_rv):
                    self.drop_pod(key, name, pod.uid)


def _moves_forward(obj: Mapping[str, Any], current: DeploymentRecord | ObservedPod) -> bool:
    """Whether `obj` is a later version of the same object than `current` (an unknown version is
    taken as later: better one pass too many than a change missed)."""
    rv = resource_version(obj)
    return rv is None or current.resource_version is None or rv > current.resource_version
