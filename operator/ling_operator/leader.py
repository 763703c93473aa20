"""Leader election on a coordination.k8s.io Lease, so two operator replicas are safe.

Chosen over kopf peering because kopf pauses *every* operator when two peers share a priority (two
identical Helm replicas would both stop), and because a Lease is what kube-controller-manager and
controller-runtime use: `kubectl get lease` shows who leads. Both replicas watch; only the holder
writes. The rules are client-go's:
- The holder renews every duration/3 (retrying sooner after a failure). It may act only until the
  *renew deadline* (2/3 of the duration by default) after the start of its last successful renewal:
  every write checks that (writes.py), with no Lease request of its own. A holder that cannot renew, a
  paused process, a black-holed connection, therefore stops acting a third of a duration before any
  standby may take over, and its writes still in flight time out by then (the writer gives each write
  at most the time left until the Lease could expire).
- A standby takes over once the Lease has not changed for a whole duration *as measured by its own
  clock* from when it saw the last change: the renewTime written by another replica's clock is never
  compared with ours, so clock skew between replicas cannot make a standby take over early.
- Every Lease request has a timeout, so a hung connection is a failed renewal, not a hung loop.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from kubernetes.client.exceptions import ApiException

from ling_operator.kube import Kube
from ling_operator.timeutil import format_micro_time

log = logging.getLogger("ling_operator.leader")

Action = Literal["renew", "acquire", "standby"]
# The renew deadline, as a share of the Lease duration (controller-runtime: 10 s of 15 s).
RENEW_DEADLINE_SHARE = 2 / 3


def decide(lease_spec: Mapping[str, Any], me: str, unchanged_for: float, default_duration: float) -> Action:
    """What this replica does with the Lease as read: keep it, take it, or stand by. `unchanged_for` is
    how long (by this replica's monotonic clock) the Lease has looked exactly like this."""
    holder = lease_spec.get("holderIdentity") or ""
    if holder == me:
        return "renew"
    if not holder:
        return "acquire"
    duration = float(lease_spec.get("leaseDurationSeconds") or default_duration)
    return "acquire" if unchanged_for >= duration else "standby"


def next_spec(
    lease_spec: Mapping[str, Any], action: Action, me: str, now: datetime, duration: float
) -> dict[str, Any]:
    """The Lease spec to write for `renew` or `acquire`."""
    spec = dict(lease_spec)
    spec["holderIdentity"] = me
    spec["leaseDurationSeconds"] = max(int(duration), 1)
    spec["renewTime"] = format_micro_time(now)
    if action == "acquire":
        spec["acquireTime"] = format_micro_time(now)
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
    return spec


class LeaseElector:
    """One Lease, one identity. `tick()` is called from one thread; `is_leader` and `time_left()` anywhere."""

    def __init__(
        self,
        kube: Kube,
        name: str,
        namespace: str,
        identity: str,
        duration: float,
        renew_deadline: float | None = None,
    ) -> None:
        self.kube, self.name, self.namespace, self.identity = kube, name, namespace, identity
        self.duration = duration
        self.renew_deadline = (
            renew_deadline if renew_deadline is not None else duration * RENEW_DEADLINE_SHARE
        )
        if not 0 < self.renew_deadline < duration:
            raise ValueError("the renew deadline must be shorter than the Lease duration")
        self._renewed_at: float | None = None  # monotonic start of our last successful Lease write
        self._lease: dict[str, Any] | None = None  # the Lease as we last read or wrote it
        self._seen: dict[str, Any] | None = None  # its spec, as last seen changing ...
        self._seen_at = 0.0  # ... and when (monotonic)
        # Bumped each time this replica starts leading (again): the controller re-fills its caches then.
        self.term = 0

    # -- what the rest of the operator reads ------------------------------------------------------------

    def time_left(self) -> float:
        """Seconds this replica may still act (until the renew deadline); 0 or less: it must not write."""
        if self._renewed_at is None:
            return 0.0
        return self._renewed_at + self.renew_deadline - time.monotonic()

    def expires_in(self) -> float:
        """Seconds until a standby may take the Lease (our writes must be answered by then)."""
        if self._renewed_at is None:
            return 0.0
        return self._renewed_at + self.duration - time.monotonic()

    @property
    def is_leader(self) -> bool:
        return self.time_left() > 0

    def next_tick_in(self) -> float:
        """When to call `tick` again: renew every duration/3, retry a failed renewal soon, and let a
        standby look every duration/5 (it takes over a duration after the last change it saw)."""
        if self._renewed_at is None:
            return max(self.duration / 5, 0.2)
        due = self._renewed_at + self.duration / 3 - time.monotonic()
        return due if due > 0 else max(self.duration / 10, 0.2)

    # -- one look at the Lease (blocking: the controller runs it on its own thread) ------------------------

    def tick(self) -> bool:
        was_leader = self.is_leader
        if was_leader and self._lease is not None:
            # Renew what we wrote last: no GET (a 409 says someone else wrote it: read it next time).
            return self._write(self._lease, "renew", was_leader)
        try:
            lease = self.kube.read_lease(self.namespace, self.name, timeout=self._timeout())
        except ApiException as exc:
            if exc.status == 404:
                return self._create(was_leader)
            log.warning("cannot read Lease %s/%s: %s", self.namespace, self.name, exc.reason)
            return self.is_leader
        spec = lease.get("spec") or {}
        if spec != self._seen:
            self._seen, self._seen_at = copy.deepcopy(spec), time.monotonic()
        action = decide(spec, self.identity, time.monotonic() - self._seen_at, self.duration)
        if action == "standby":
            if self._renewed_at is not None:
                log.warning("lost leadership to %s", spec.get("holderIdentity"))
            self._renewed_at, self._lease = None, None
            return False
        return self._write(lease, action, was_leader)

    def _timeout(self) -> float:
        """A Lease request must not outlast the renew deadline (a late renewal is a failed one)."""
        left = self.time_left()
        return max(min(left, self.duration / 3) if left > 0 else self.duration / 3, 0.2)

    def _write(self, lease: dict[str, Any], action: Action, was_leader: bool) -> bool:
        body = dict(lease)
        body["spec"] = next_spec(
            lease.get("spec") or {}, action, self.identity, datetime.now(UTC), self.duration
        )
        started = time.monotonic()
        try:
            written = self.kube.replace_lease(self.namespace, self.name, body, timeout=self._timeout())
        except ApiException as exc:
            # 409: another replica (or a person) wrote the Lease since we read it. Either way, read it
            # again next time; we may act until our deadline (no one can take over before it).
            log.log(
                logging.INFO if exc.status == 409 else logging.WARNING,
                "Lease %s/%s not %s (%s)",
                self.namespace,
                self.name,
                "renewed" if action == "renew" else "taken",
                exc.reason,
            )
            self._lease = None
            return self.is_leader
        self._took(written, started, was_leader)
        return True

    def _create(self, was_leader: bool) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": next_spec({}, "acquire", self.identity, datetime.now(UTC), self.duration),
        }
        started = time.monotonic()
        try:
            written = self.kube.create_lease(self.namespace, body, timeout=self._timeout())
        except ApiException as exc:
            log.info("Lease %s/%s not created (%s)", self.namespace, self.name, exc.reason)
            return self.is_leader
        self._took(written, started, was_leader)
        return True

    def _took(self, written: dict[str, Any], started: float, was_leader: bool) -> None:
        if not was_leader:
            self.term += 1
            log.info("became leader (Lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
        self._renewed_at, self._lease = started, written
        self._seen, self._seen_at = copy.deepcopy(written.get("spec") or {}), started

    def release(self) -> None:
        """Hand the Lease back on shutdown so the standby takes over at once, not after the duration."""
        lease, leading = self._lease, self.is_leader
        self._renewed_at, self._lease = None, None
        if not leading or lease is None:
            return
        body = dict(lease)
        body["spec"] = {**(lease.get("spec") or {}), "holderIdentity": ""}
        try:
            self.kube.replace_lease(self.namespace, self.name, body, timeout=max(self.duration / 3, 1.0))
        except ApiException as exc:
            log.warning("cannot release Lease %s/%s: %s", self.namespace, self.name, exc.reason)
