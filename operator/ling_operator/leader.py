"""Leader election on a coordination.k8s.io Lease, so two operator replicas are safe.

Chosen over kopf peering because kopf pauses *every* operator when two peers share a priority (two
identical Helm replicas would both stop), and because a Lease is what kube-controller-manager and
controller-runtime use: `kubectl get lease` shows who leads. Both replicas watch; only the holder
writes. The holder renews every duration/3; a standby takes over once renewTime + duration passed;
a holder that could not renew within the duration stops acting on its own (no split brain).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from kubernetes.client import CoordinationV1Api
from kubernetes.client.exceptions import ApiException

from ling_operator.kube import read_body
from ling_operator.timeutil import format_micro_time, parse_time

log = logging.getLogger("ling_operator.leader")

Action = Literal["renew", "acquire", "standby"]


def decide(lease_spec: Mapping[str, Any], me: str, now: datetime, default_duration: float) -> Action:
    """What this replica does with the Lease as read: keep it, take it, or stand by."""
    holder = lease_spec.get("holderIdentity") or ""
    if holder == me:
        return "renew"
    if not holder:
        return "acquire"
    renewed = parse_time(lease_spec.get("renewTime") or lease_spec.get("acquireTime"))
    duration = float(lease_spec.get("leaseDurationSeconds") or default_duration)
    if renewed is None or now >= renewed + timedelta(seconds=duration):
        return "acquire"
    return "standby"


def next_spec(
    lease_spec: Mapping[str, Any], action: Action, me: str, now: datetime, duration: float
) -> dict[str, Any]:
    """The Lease spec to write for `renew` or `acquire`."""
    spec = dict(lease_spec)
    spec["holderIdentity"] = me
    spec["leaseDurationSeconds"] = int(duration)
    spec["renewTime"] = format_micro_time(now)
    if action == "acquire":
        spec["acquireTime"] = format_micro_time(now)
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
    return spec


class LeaseElector:
    """One Lease, one identity. `tick()` is called periodically (from a thread); `is_leader` is read anywhere."""

    def __init__(
        self, api: CoordinationV1Api, name: str, namespace: str, identity: str, duration: float
    ) -> None:
        self.api, self.name, self.namespace, self.identity, self.duration = (
            api,
            name,
            namespace,
            identity,
            duration,
        )
        self._renewed_at: float | None = None  # monotonic time of our last successful write

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and time.monotonic() - self._renewed_at < self.duration

    def tick(self) -> bool:
        now = datetime.now(UTC)
        try:
            resp = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            lease = json.loads(read_body(resp))
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot read Lease %s/%s: %s", self.namespace, self.name, exc.reason)
                return self.is_leader
            return self._create(now)
        action = decide(lease.get("spec") or {}, self.identity, now, self.duration)
        if action == "standby":
            if self._renewed_at is not None:
                log.warning("lost leadership to %s", (lease.get("spec") or {}).get("holderIdentity"))
            self._renewed_at = None
            return False
        lease["spec"] = next_spec(lease.get("spec") or {}, action, self.identity, now, self.duration)
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            # 409: another replica wrote first (resourceVersion moved); it leads.
            log.info("Lease %s/%s not taken (%s)", self.namespace, self.name, exc.reason)
            self._renewed_at = None
            return False
        if action == "acquire":
            log.info("became leader (Lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
        self._renewed_at = time.monotonic()
        return True

    def _create(self, now: datetime) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": next_spec({}, "acquire", self.identity, now, self.duration),
        }
        try:
            self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            log.info("Lease %s/%s not created (%s)", self.namespace, self.name, exc.reason)
            return False
        log.info("became leader (created Lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
        self._renewed_at = time.monotonic()
        return True

    def release(self) -> None:
        """Hand the Lease back on shutdown so the standby takes over at once, not after the duration."""
        if not self.is_leader:
            return
        try:
            resp = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
            lease = json.loads(read_body(resp))
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as exc:
            log.warning("cannot release Lease %s/%s: %s", self.namespace, self.name, exc.reason)
        self._renewed_at = None
