"""Pure decisions: (spec, previous status, observed pods, now) -> actions + the status to write.

Groups are identified by their index. A group belongs to the deployment ("slot") while it is listed
in status.groups or has live pods; removing a group (scale-down, rollout) drops it from status, and
its terminating pods keep the index blocked until they are gone, so a name is never reused while
the old pod still exists. Failure handling, rolling replacement and scaling all work on whole groups.

Rolling updates follow Deployment semantics over groups: at most `replicas + maxSurge` groups exist,
at least `replicas - maxUnavailable` stay ready (never zero when replicas > 1), outdated groups are
replaced not-ready first, then highest index first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from ling_operator import conditions, rendezvous, resources
from ling_operator.api import (
    Condition,
    ConditionType,
    GroupPhase,
    GroupStatus,
    LingDeploymentSpec,
    LingDeploymentStatus,
    RankStatus,
    Reason,
)
from ling_operator.events import Event, normal, warning
from ling_operator.failures import WriteFailure
from ling_operator.pods import ObservedPod
from ling_operator.timeutil import whole_seconds

# How often to look again while pods we deleted are still terminating (pod events also wake us).
TERMINATING_REQUEUE_SECONDS = 2.0
# A group that served this long since its last restart starts its backoff over, as the kubelet forgets a
# container's crash-loop backoff after 10 minutes of running (or maxBackoffSeconds, when that is longer:
# a group must outlive the longest delay before its failures stop counting as one crash loop).
BACKOFF_RESET_SECONDS = 600
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Plan:
    """What one reconcile pass decided. The shell applies it; nothing here touches the API."""

    create_pods: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    create_services: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # The whole status to write: ours, with the autoscaler's fields and conditions as they were.
    status: LingDeploymentStatus = field(default_factory=LingDeploymentStatus)
    requeue_after: float | None = None
    restarted_groups: list[int] = field(default_factory=list)
    rendezvous_seconds: list[float] = field(default_factory=list)
    waiting: dict[str, int] = field(default_factory=dict)  # groups not serving yet, by the reason they wait

    def wake_in(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


# ---------------------------------------------------------------------------------------------------------
# Backoff.


def restart_delay(restarts: int, base: int, maximum: int) -> int:
    """Exponential backoff of the n-th consecutive restart of a group (n >= 1)."""
    if restarts <= 0 or base <= 0:
        return 0
    return int(min(base * 2 ** min(restarts - 1, 30), maximum))


def backoff_reset_after(max_backoff: int) -> int:
    """Seconds a group must stay Ready before its next restart waits `backoffSeconds` again."""
    return max(BACKOFF_RESET_SECONDS, max_backoff)


def next_backoff(previous: int | None, base: int, maximum: int) -> int:
    """The delay of a group's next restart: `base` first (or after a reset), then double the last one."""
    if base <= 0:
        return 0
    if previous is None or previous <= 0:
        return min(base, maximum)
    return min(previous * 2, maximum)


def served_long_enough(ready_since: datetime | None, now: datetime, max_backoff: int) -> bool:
    """True when the group has been Ready (since `ready_since`) long enough to forget its backoff."""
    return ready_since is not None and (now - ready_since).total_seconds() >= backoff_reset_after(max_backoff)


def max_unavailable(spec: LingDeploymentSpec) -> int:
    """Groups that may be down during a rollout: never every group at once, whatever the spec says."""
    unavailable = spec.rollout.max_unavailable
    if unavailable == 0 and spec.rollout.max_surge == 0:
        unavailable = 1
    if spec.replicas > 1:
        unavailable = min(unavailable, spec.replicas - 1)
    return unavailable


def _ranks_text(ranks: Iterable[int]) -> str:
    items = sorted(ranks)
    word = "rank" if len(items) == 1 else "ranks"
    return f"{word} {', '.join(str(r) for r in items)}"


# ---------------------------------------------------------------------------------------------------------
# One group as observed.


@dataclass
class GroupView:
    index: int
    pods: dict[int, ObservedPod]  # rank -> pod (live and terminating); fixed for the pass
    prev: GroupStatus | None  # this group's entry of the previous status.groups
    deployment: str | None = None  # the deployment's name (pod names are <name>-<group>-<rank>)

    @cached_property
    def live(self) -> dict[int, ObservedPod]:
        return {r: p for r, p in self.pods.items() if not p.terminating}

    @property
    def terminating(self) -> bool:
        return any(p.terminating for p in self.pods.values())

    def revisions(self) -> set[str]:
        return {p.revision for p in self.live.values()}

    def prev_phase(self) -> str | None:
        return None if self.prev is None else self.prev.phase

    def observed_phase(self, pods: int) -> GroupPhase:
        live = self.live
        if len(live) < pods or any(not p.scheduled for p in live.values()):
            return "Pending"
        ranks = [live[r] for r in range(pods) if r in live]
        if any(not p.running for p in ranks):
            return "Forming"
        if not all(p.ready for p in ranks):
            return "Loading"
        return "Ready"

    def placed_at(self, pods: int) -> datetime | None:
        """When the last rank was placed, by the scheduler's clock (None until every rank is)."""
        times = [self.live[r].placed_at for r in range(pods) if r in self.live]
        if len(times) < pods or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)

    def ready_at(self, pods: int) -> datetime | None:
        """When the last rank became Ready, by the kubelet's clock (None when a rank does not say)."""
        times = [self.live[r].ready_at for r in range(pods) if r in self.live]
        if len(times) < pods or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)

    def not_running(self, pods: int) -> list[int]:
        return [r for r in range(pods) if not self.live[r].running]

    def not_ready(self, pods: int) -> list[int]:
        return [r for r in range(pods) if not self.live[r].ready]


Wait = tuple[str | None, str]  # (reason when someone must act, else None; the line a person reads)


def _wait(
    view: GroupView, spec: LingDeploymentSpec, phase: str, refused: Mapping[str, str], creating: bool
) -> Wait:
    """Why a group is not serving yet, in the words of whoever holds it up: the API server (a create it
    refused), the scheduler (PodScheduled's message) or the kubelet (a container's waiting reason)."""
    g, live, pods = view.index, view.live, spec.pods_per_group
    if phase == "Pending":
        missing = [r for r in range(pods) if r not in live]
        not_admitted = {
            r: refused[name]
            for r in missing
            if (name := rendezvous.pod_name(view.deployment or "", g, r)) in refused
        }
        if not_admitted:
            why = not_admitted[min(not_admitted)]
            return Reason.PODS_NOT_ADMITTED, f"group {g}: {_ranks_text(not_admitted)} not admitted: {why}"
        unscheduled = [r for r, p in sorted(live.items()) if not p.scheduled]
        if unscheduled and not creating:
            stuck = live[unscheduled[0]].stuck
            if stuck is None:
                return None, f"group {g}: waiting for {_ranks_text(unscheduled)} to be scheduled"
            reason, why = stuck
            if reason == Reason.WAITING_FOR_GPUS and spec.engine.device == "cuda":
                gpus = len(unscheduled) * spec.parallelism.gpus_per_pod
                return reason, f"group {g}: waiting for {gpus} of {spec.parallelism.tensor} GPUs: {why}"
            if reason == Reason.WAITING_FOR_VOLUME:
                return reason, f"group {g}: waiting for a volume for {_ranks_text(unscheduled)}: {why}"
            if reason == Reason.NO_MATCHING_NODE:
                return reason, f"group {g}: no node matches {_ranks_text(unscheduled)}: {why}"
            return reason, f"group {g}: {_ranks_text(unscheduled)} cannot be scheduled: {why}"
        return None, f"group {g}: creating {_ranks_text(missing or range(pods))}"
    if phase == "Forming":
        waiting = view.not_running(pods)
        stuck = [live[r].stuck for r in waiting if live[r].stuck is not None]
        why = sorted({w for r in waiting for w in live[r].waiting}) or ["image pull, init"]
        text = f"group {g}: waiting for {_ranks_text(waiting)} to start ({'; '.join(why)})"
        return (stuck[0][0] if stuck else None), text
    if phase == "Loading":
        return None, f"group {g}: loading weights, {_ranks_text(view.not_ready(pods))} not ready"
    return None, f"group {g}: {phase.lower()}"


def _rendezvous_limit(spec: LingDeploymentSpec, phase: str) -> int:
    """Seconds Forming (or Forming + Loading) may take from placement before the group restarts."""
    limit = spec.failure_policy.rendezvous_timeout_seconds
    return limit + (spec.runtime.startup_timeout_seconds if phase == "Loading" else 0)


def _failure(
    view: GroupView, spec: LingDeploymentSpec, now: datetime, refused: Mapping[str, str]
) -> tuple[str, str] | None:
    """(reason, message) when this group must be restarted, else None. Only what the pods show counts
    (a failed, deleted or vanished rank, a rendezvous past its deadline by the pods' own clocks): the
    stored status can hold a restart back, never order one."""
    for _, pod in sorted(view.pods.items()):
        if pod.failure:
            return Reason.RANK_FAILED, pod.failure
    prev_phase = view.prev_phase()
    if view.prev is not None and prev_phase != "Restarting":
        gone = sorted(r for r, p in view.pods.items() if p.terminating)
        if gone:
            return Reason.RANK_FAILED, f"{_ranks_text(gone)} deleted"
    live, pods = view.live, spec.pods_per_group
    # A rank whose create the API refused (quota, a webhook) was never there: the group waits for it.
    missing = [
        r
        for r in range(pods)
        if r not in live and rendezvous.pod_name(view.deployment or "", view.index, r) not in refused
    ]
    if missing and live and any(p.running for p in live.values()):
        return Reason.RANK_FAILED, f"{_ranks_text(missing)} missing"
    phase = view.observed_phase(pods)
    if phase in ("Forming", "Loading"):
        since = view.placed_at(pods)
        if since is None and view.prev is not None and view.prev.forming_since is not None:
            # Pods that do not say when: our own record, never ahead of now.
            since = min(view.prev.forming_since, now)
        limit = _rendezvous_limit(spec, phase)
        if since is not None and (now - since).total_seconds() > limit:
            waiting = view.not_running(pods) if phase == "Forming" else view.not_ready(pods)
            return (
                Reason.RENDEZVOUS_TIMEOUT,
                f"rendezvous timed out after {limit} s: {_ranks_text(waiting)} not joined",
            )
    return None


# ---------------------------------------------------------------------------------------------------------
# The decision.


def reconcile(
    owner: resources.Owner,
    generation: int,
    spec: LingDeploymentSpec,
    status: LingDeploymentStatus,
    pods: Iterable[ObservedPod],
    services: Iterable[str],
    now: datetime,
    *,
    default_image: str = resources.DEFAULT_RUNTIME_IMAGE,
    refused: Mapping[str, str] | None = None,
) -> Plan:
    """One pass: `pods` are the pods labelled with this deployment (any owner); `services` the names of
    its Services that exist; `refused` the pods whose create the API refused (name -> why), which the
    group waits for instead of counting them lost. The plan's status is the whole status to write."""
    return _Pass(owner, generation, spec, status, now, default_image, refused or {}).run(pods, services)


class _Pass:
    """The working state of one reconcile pass; each step is a method, in the order `run` calls them."""

    def __init__(
        self,
        owner: resources.Owner,
        generation: int,
        spec: LingDeploymentSpec,
        status: LingDeploymentStatus,
        now: datetime,
        default_image: str,
        refused: Mapping[str, str],
    ) -> None:
        self.owner, self.generation, self.spec, self.status = owner, generation, spec, status
        self.refused = refused
        self.now, self.stamp = now, whole_seconds(now)
        self.default_image = default_image
        self.pods = spec.pods_per_group
        self.desired_rev = resources.revision_of(spec, default_image)
        self.plan = Plan()
        self.views: dict[int, GroupView] = {}
        self.entries: dict[int, GroupStatus] = {}  # the groups' new status
        self.decided: dict[int, GroupPhase] = {}  # phases failure handling set (Restarting, Failed)
        self.blocked: set[int] = set()  # indices whose old pods still exist outside any slot: not reusable
        self.draining: set[int] = set()  # blocked indices whose pods are going away (still holding GPUs)
        self.to_create: set[int] = set()  # groups whose missing ranks are created this pass
        self.removed: set[int] = set()
        self.slots: set[int] = set()
        self.old: set[int] = set()

    def run(self, pods: Iterable[ObservedPod], services: Iterable[str]) -> Plan:
        self._services(set(services))
        self._observe(pods)
        for g in list(self.views):
            self._failures(g)
        self.slots = set(self.views)
        self.old = {g for g in self.slots if not self._is_new(g)}
        self._scale_down()
        self._roll()
        self._create()
        groups, waits = self._group_status()
        if self.plan.delete_pods:
            self.plan.wake_in(TERMINATING_REQUEUE_SECONDS)
        self.plan.status = self._status(groups, waits)
        return self.plan

    # -- observation ------------------------------------------------------------------------------------

    def _services(self, existing: set[str]) -> None:
        if rendezvous.ranks_service_name(self.owner.name) not in existing:
            self.plan.create_services.append(resources.build_ranks_service(self.owner))
        if self.owner.name not in existing:
            self.plan.create_services.append(resources.build_client_service(self.owner))

    def _observe(self, pods: Iterable[ObservedPod]) -> None:
        prev_groups = {entry.index: entry for entry in self.status.groups}
        by_group: dict[int, dict[int, ObservedPod]] = {}
        for pod in pods:
            g, r = pod.group, pod.rank
            if g is None or r is None:
                continue
            if self.owner.uid not in pod.owner_uids:
                self.blocked.add(g)  # left over from an earlier object of the same name: never touch or reuse
                if pod.terminating:
                    self.draining.add(g)
                continue
            by_group.setdefault(g, {})[r] = pod
        for g in sorted(set(prev_groups) | set(by_group)):
            view = GroupView(g, by_group.get(g, {}), prev_groups.get(g), self.owner.name)
            if view.prev is None and not view.live:
                self.blocked.add(g)  # terminating pods of a group we already removed
                self.draining.add(g)
                continue
            self.views[g] = view

    # -- 1. failures and restarts -----------------------------------------------------------------------

    def _carried_over(self, g: int, prev: GroupStatus | None) -> GroupStatus:
        """A group's status entry with what survives from its previous one."""
        if prev is None:
            return GroupStatus(index=g, restarts=0)
        # Whatever a person (or a replica with a clock ahead of ours) wrote: a time in the future counts
        # as now, a delay beyond maxBackoffSeconds as that maximum.
        policy = self.spec.failure_policy
        entry = GroupStatus(
            index=g,
            restarts=max(prev.restarts, 0),
            last_restart_time=self._not_after_now(prev.last_restart_time),
            last_restart_reason=prev.last_restart_reason or None,
            forming_since=self._not_after_now(prev.forming_since),
            ready_since=self._not_after_now(prev.ready_since),
            backoff_seconds=min(max(prev.backoff_seconds, 0), policy.max_backoff_seconds)
            if prev.backoff_seconds
            else None,
            # Written by the autoscaler's scrape (autoscale_controller.mtp_acceptance), kept between looks.
            mtp_acceptance_rate=prev.mtp_acceptance_rate,
        )
        if served_long_enough(entry.ready_since, self.now, self.spec.failure_policy.max_backoff_seconds):
            entry.backoff_seconds = None  # restarts weeks apart are not a crash loop: start over
        return entry

    def _pod(self, g: int, rank: int) -> str:
        return rendezvous.pod_name(self.owner.name, g, rank)

    def _not_after_now(self, value: datetime | None) -> datetime | None:
        return None if value is None else min(value, self.stamp)

    def _failures(self, g: int) -> None:
        """Restart (or leave failed) a group whose pods show a failure. The stored phase is no command:
        `Restarting` only says the group's restart was begun, which goes on only while its pods show it
        (a rank gone, failed or terminating; no pods left to wait out the backoff), and `Failed` stands
        only while a failure is still there to inspect. A whole, healthy group is never torn down for
        what status says."""
        view, policy = self.views[g], self.spec.failure_policy
        entry = self.entries[g] = self._carried_over(g, view.prev)
        failed = _failure(view, self.spec, self.now, self.refused)
        absent = [r for r in range(self.pods) if r not in view.live and self._pod(g, r) not in self.refused]
        if view.prev_phase() == "Restarting" and (failed is not None or absent or view.terminating):
            self._wait_for_restart(view, entry)
            return
        if failed is None:
            return
        reason, message = failed
        if not policy.restart_group:
            self.decided[g] = "Failed"
            if view.prev_phase() == "Failed":
                return  # said so already: kept for inspection until its pods are deleted or the spec changes
            entry.last_restart_reason = (
                f"{message}; group {g} left failed (failurePolicy.restartGroup is false)"
            )
            self.plan.events.append(warning(Reason.RANK_FAILED, f"group {g}: {entry.last_restart_reason}"))
            return
        entry.restarts += 1
        delay = next_backoff(entry.backoff_seconds, policy.backoff_seconds, policy.max_backoff_seconds)
        entry.backoff_seconds = delay
        entry.ready_since = None
        entry.forming_since = None
        entry.last_restart_time = self.stamp
        entry.last_restart_reason = f"{message}, restarting group {g} in {delay} s"
        self.decided[g] = "Restarting"
        self._delete_group(view)
        self.plan.restarted_groups.append(g)
        self.plan.events.append(Event("Warning", reason, entry.last_restart_reason))
        self.plan.wake_in(max(delay, TERMINATING_REQUEUE_SECONDS))

    def _wait_for_restart(self, view: GroupView, entry: GroupStatus) -> None:
        """A restarting group comes back once its pods are gone and its backoff has passed."""
        self.decided[view.index] = "Restarting"
        if view.pods:
            if view.live:
                self._delete_group(view)  # a restart interrupted before every rank was deleted
            self.plan.wake_in(TERMINATING_REQUEUE_SECONDS)
            return
        policy = self.spec.failure_policy
        delay = entry.backoff_seconds
        if delay is None:
            # A status written before backoffSeconds existed: the delay followed the restart count.
            delay = restart_delay(entry.restarts, policy.backoff_seconds, policy.max_backoff_seconds)
        delay = min(delay, policy.max_backoff_seconds)
        started = entry.last_restart_time or self.stamp  # never after now (`_carried_over`)
        wait = (started + timedelta(seconds=delay) - self.now).total_seconds()
        if wait > 0:
            self.plan.wake_in(wait)
        else:
            self.to_create.add(view.index)

    def _delete_group(self, view: GroupView) -> None:
        for rank in sorted(view.live):
            self.plan.delete_pods.append(rendezvous.pod_name(self.owner.name, view.index, rank))

    # -- 2.-4. which groups stay: scale down, roll outdated ones ----------------------------------------

    def _is_new(self, g: int) -> bool:
        view = self.views[g]
        if self.decided.get(g) == "Restarting" or not view.live:
            return True  # will be (re)created at the desired revision
        return view.revisions() == {self.desired_rev}

    def _ready(self, g: int) -> bool:
        return g not in self.decided and self.views[g].observed_phase(self.pods) == "Ready"

    def _allowed_total(self) -> int:
        return self.spec.replicas + (self.spec.rollout.max_surge if self.old else 0)

    def _remove(self, g: int, event: Event) -> None:
        self._delete_group(self.views[g])
        self.slots.discard(g)
        self.old.discard(g)
        self.to_create.discard(g)
        self.removed.add(g)
        if self.views[g].live:
            self.blocked.add(g)
            self.draining.add(g)
        self.plan.events.append(event)

    def _scale_down(self) -> None:
        """By whole groups: outdated, then not-ready, then highest index first."""
        excess = len(self.slots) - self._allowed_total()
        if excess <= 0:
            return
        for g in sorted(self.slots, key=lambda g: (g not in self.old, self._ready(g), -g))[:excess]:
            message = f"removing group {g}: {len(self.slots)} groups, {self.spec.replicas} wanted"
            self._remove(g, normal(Reason.SCALING_DOWN, message))

    def _roll(self) -> None:
        """Replace outdated groups within the availability budget, not-ready ones first."""
        min_available = self.spec.replicas - max_unavailable(self.spec)
        available = sum(1 for g in self.slots if self._ready(g))
        for g in sorted(self.old, key=lambda g: (self._ready(g), -g)):
            if self._ready(g):
                if available - 1 < min_available:
                    continue
                available -= 1
            revisions = ", ".join(sorted(self.views[g].revisions()))
            message = (
                f"replacing group {g} (revision {revisions} -> {self.desired_rev}); "
                f"{available} of {self.spec.replicas} groups stay ready"
            )
            self._remove(g, normal(Reason.ROLLING_UPDATE, message))

    # -- 5. create ---------------------------------------------------------------------------------------

    def _create(self) -> None:
        """Absent slots, missing ranks of forming groups, then new groups at the lowest free index."""
        for g in sorted(self.slots):
            view = self.views[g]
            if self.decided.get(g) in ("Restarting", "Failed") or view.terminating:
                continue
            if len(view.live) < self.pods:
                self.to_create.add(g)
        self._add_groups()
        for g in sorted(self.to_create):
            live = {} if self.decided.get(g) == "Restarting" else self.views[g].live
            for rank in range(self.pods):
                if rank not in live:
                    pod = resources.build_pod(
                        self.owner, self.spec, g, rank, default_image=self.default_image
                    )
                    self.plan.create_pods.append(pod)
            if self.decided.get(g) == "Restarting":
                self.plan.events.append(
                    normal(Reason.GROUP_RESTARTING, f"starting group {g} again after backoff")
                )
                del self.decided[g]
            if not live:
                self.entries[g].forming_since = self.stamp

    def _add_groups(self) -> None:
        previous = (
            self.status.desired_replicas if "desired_replicas" in self.status.model_fields_set else None
        )
        scaling_up = previous is None or self.spec.replicas > previous
        new_count = sum(1 for g in self.slots if self._is_new(g))
        occupied = len(self.slots) + len(self.draining - self.slots)
        index = 0
        while occupied < self._allowed_total() and new_count < self.spec.replicas:
            while index in self.slots or index in self.blocked or index in self.removed:
                index += 1
            self.views[index] = GroupView(index, {}, None, self.owner.name)
            self.entries[index] = GroupStatus(index=index, restarts=0)
            self.slots.add(index)
            self.to_create.add(index)
            occupied += 1
            new_count += 1
            # A new group is a scale-up only when spec.replicas rose above what was desired before;
            # otherwise it replaces a group (a rollout with surge), and the event must not read as scaling.
            if scaling_up:
                message = f"creating group {index} ({self.pods} pods, revision {self.desired_rev})"
                self.plan.events.append(normal(Reason.SCALING_UP, message))
            else:
                message = (
                    f"creating group {index} at revision {self.desired_rev} to replace an outdated or "
                    "removed group"
                )
                self.plan.events.append(normal(Reason.ROLLING_UPDATE, message))

    # -- 6. per-group status -----------------------------------------------------------------------------

    def _group_status(self) -> tuple[list[GroupStatus], list[Wait]]:
        groups: list[GroupStatus] = []
        waits: list[Wait] = []
        for g in sorted(self.slots):
            view, entry = self.views[g], self.entries[g]
            created = g in self.to_create
            phase = self.decided.get(g) or ("Pending" if created else view.observed_phase(self.pods))
            entry.phase = phase
            self._track_rendezvous(view, entry)
            if phase not in ("Ready", "Restarting", "Failed"):
                wait = _wait(view, self.spec, phase, self.refused, created)
                waits.append(wait)
                if wait[0] is not None:
                    self.plan.waiting[wait[0]] = self.plan.waiting.get(wait[0], 0) + 1
            if phase == "Restarting" and entry.last_restart_reason:
                waits.append((None, f"group {g}: {entry.last_restart_reason}"))
            revisions = view.revisions()
            # A group being (re)created gets the desired revision; a mixed group reports its oldest.
            entry.revision = (
                self.desired_rev if created or phase == "Restarting" or not revisions else min(revisions)
            )
            if len(revisions) > 1:
                entry.revision = min(r for r in revisions if r != self.desired_rev)
            entry.master_address = rendezvous.master_address(self.owner.name, g, self.owner.namespace)
            entry.ranks = self._rank_status(view)
            groups.append(entry)
        return groups, waits

    def _track_rendezvous(self, view: GroupView, entry: GroupStatus) -> None:
        """readySince, formingSince, the rendezvous deadline and the GroupReady event.

        formingSince is when the last rank was placed and the rendezvous took from then until the last
        rank was Ready, both read off the pods (the scheduler's and the kubelet's timestamps): a group
        that formed while the operator was down, paused or cut off reports its own time, not the outage."""
        phase, prev_phase = entry.phase, view.prev_phase()
        # The backoff reset counts uninterrupted service only.
        entry.ready_since = (entry.ready_since or self.stamp) if phase == "Ready" else None
        placed = view.placed_at(self.pods) if view.live else None
        if phase == "Ready":
            since, entry.forming_since = placed or entry.forming_since, None
            if prev_phase != "Ready":
                ready_at = view.ready_at(self.pods)
                took = None
                if since is not None:
                    # Without the pods' own Ready times, the operator's clock: it then says so.
                    took = max(((ready_at or self.now) - since).total_seconds(), 0.0)
                    self.plan.rendezvous_seconds.append(took)
                message = f"group {view.index} ready: all {self.pods} ranks joined"
                if took is not None:
                    message += f" in {took:.0f} s" + ("" if ready_at else " (as the operator saw it)")
                self.plan.events.append(normal("GroupReady", message))
        elif phase in ("Forming", "Loading"):
            # The rendezvous clock starts once all ranks are placed (pods without times: when we saw it).
            entry.forming_since = (
                placed
                or (entry.forming_since if prev_phase in ("Forming", "Loading") else None)
                or self.stamp
            )
        if phase in ("Forming", "Loading") and entry.forming_since is not None:
            deadline = entry.forming_since + timedelta(seconds=_rendezvous_limit(self.spec, phase))
            self.plan.wake_in((deadline - self.now).total_seconds() + 1)

    def _rank_status(self, view: GroupView) -> list[RankStatus]:
        ranks = []
        live = view.live
        for rank in range(self.pods):
            pod = live.get(rank)
            ranks.append(
                RankStatus(
                    rank=rank,
                    pod=rendezvous.pod_name(self.owner.name, view.index, rank),
                    node=None if pod is None else pod.node,
                    ready=pod is not None and pod.ready,
                )
            )
        return ranks

    # -- 7. deployment status ----------------------------------------------------------------------------

    def _status(self, groups: list[GroupStatus], waits: list[Wait]) -> LingDeploymentStatus:
        replicas = self.spec.replicas
        ours = _conditions(
            _Outcome(replicas, groups, self.desired_rev, waits, bool(self.old), self.plan.events)
        )
        return self.status.model_copy(
            update={
                "observed_generation": self.generation,
                "replicas": len(groups),
                "ready_replicas": sum(1 for e in groups if e.phase == "Ready"),
                "updated_replicas": sum(
                    1 for e in groups if e.revision == self.desired_rev and e.phase != "Failed"
                ),
                "desired_replicas": replicas,
                "selector": resources.selector_string(resources.head_selector(self.owner.name)),
                "pods_per_group": self.pods,
                "groups": groups,
                "conditions": conditions.merge(self.status.conditions, ours, self.generation, self.now),
            }
        )


# ---------------------------------------------------------------------------------------------------------
# Conditions: Ready, Progressing, RendezvousReady, Degraded (the autoscaler owns the others).


def _detail(waits: Sequence[Wait]) -> str:
    return "; ".join(text for _, text in waits[:3]) + ("; ..." if len(waits) > 3 else "")


# Which wait Progressing names when groups wait for different things: what blocks hardest first.
_STUCK_ORDER = (
    Reason.PODS_NOT_ADMITTED,
    Reason.WAITING_FOR_VOLUME,
    Reason.CONTAINER_CONFIG_ERROR,
    Reason.IMAGE_PULL_FAILED,
    Reason.NO_MATCHING_NODE,
    Reason.WAITING_FOR_GPUS,
    Reason.UNSCHEDULABLE,
)


@dataclass(frozen=True)
class _Outcome:
    """What the conditions are computed from: the pass's groups, waits and events."""

    replicas: int
    groups: list[GroupStatus]
    desired_rev: str
    waits: list[Wait]  # one per group that is not serving yet: (reason when someone must act, the line)
    old_left: bool  # outdated groups remain
    events: list[Event]

    def ready(self) -> int:
        return sum(1 for e in self.groups if e.phase == "Ready")


def _conditions(outcome: _Outcome) -> list[Condition]:
    return [_ready(outcome), _progressing(outcome), _rendezvous_ready(outcome), _degraded(outcome.groups)]


def _ready(o: _Outcome) -> Condition:
    if o.replicas == 0:
        return conditions.condition(
            ConditionType.READY, "True", Reason.SCALED_TO_ZERO, "replicas is 0: no groups wanted"
        )
    message = f"{o.ready()} of {o.replicas} groups ready"
    if o.ready() >= o.replicas:
        return conditions.condition(ConditionType.READY, "True", Reason.ALL_GROUPS_READY, message)
    detail = _detail(o.waits)
    message += f"; {detail}" if detail else ""
    return conditions.condition(ConditionType.READY, "False", Reason.GROUPS_NOT_READY, message)


def _progressing(o: _Outcome) -> Condition:
    reasons = {e.reason for e in o.events}
    groups, replicas = o.groups, o.replicas
    updated = sum(1 for e in groups if e.revision == o.desired_rev)
    stuck = sorted((_STUCK_ORDER.index(r), r) for r, _ in o.waits if r in _STUCK_ORDER)
    if stuck:
        # Someone must act (free GPUs, create the PVC, fix the image, raise the quota): say that first,
        # in the scheduler's, kubelet's or API server's words, even during a rollout.
        reason = stuck[0][1]
        prog = (reason, _detail([w for w in o.waits if w[0] == reason]))
    elif o.old_left or Reason.ROLLING_UPDATE in reasons:
        prog = (Reason.ROLLING_UPDATE, f"{updated} of {replicas} groups at revision {o.desired_rev}")
    elif len(groups) < replicas or Reason.SCALING_UP in reasons:
        prog = (Reason.SCALING_UP, f"{len(groups)} of {replicas} groups exist")
    elif len(groups) > replicas or Reason.SCALING_DOWN in reasons:
        prog = (Reason.SCALING_DOWN, f"{len(groups)} groups, {replicas} wanted")
    elif any(e.phase != "Ready" for e in groups):
        prog = (Reason.LOADING_WEIGHTS, _detail(o.waits) or "groups are starting")
    else:
        message = f"{len(groups)} groups at revision {o.desired_rev}, all ready"
        return conditions.condition(ConditionType.PROGRESSING, "False", Reason.UP_TO_DATE, message)
    return conditions.condition(ConditionType.PROGRESSING, "True", *prog)


def _rendezvous_ready(o: _Outcome) -> Condition:
    groups = o.groups
    not_joined = [e for e in groups if e.phase != "Ready"]
    timeouts = [e for e in o.events if e.reason == Reason.RENDEZVOUS_TIMEOUT]
    if timeouts:
        return conditions.condition(
            ConditionType.RENDEZVOUS_READY, "False", Reason.RENDEZVOUS_TIMEOUT, timeouts[0].message
        )
    if not_joined:
        detail = _detail(o.waits)
        message = f"{len(groups) - len(not_joined)} of {len(groups)} groups formed" + (
            f"; {detail}" if detail else ""
        )
        return conditions.condition(
            ConditionType.RENDEZVOUS_READY, "False", Reason.WAITING_FOR_RANKS, message
        )
    message = f"every rank of {len(groups)} groups joined"
    return conditions.condition(ConditionType.RENDEZVOUS_READY, "True", Reason.ALL_RANKS_JOINED, message)


def _degraded(groups: list[GroupStatus]) -> Condition:
    failed = [e for e in groups if e.phase == "Failed"]
    restarting = [e for e in groups if e.phase == "Restarting"]
    if failed:
        message = "; ".join(f"group {e.index}: {e.last_restart_reason or 'failed'}" for e in failed[:3])
        return conditions.condition(ConditionType.DEGRADED, "True", Reason.RANK_FAILED, message)
    if restarting:
        latest = max(restarting, key=lambda e: e.last_restart_time or _EPOCH)
        message = f"{latest.last_restart_reason or 'restarting'} (restart {latest.restarts})"
        return conditions.condition(ConditionType.DEGRADED, "True", Reason.GROUP_RESTARTING, message)
    return conditions.condition(ConditionType.DEGRADED, "False", Reason.AS_EXPECTED, "no group is failing")


def invalid_spec_status(
    status: LingDeploymentStatus, generation: int, message: str, now: datetime
) -> LingDeploymentStatus:
    """Status for a spec the operator refuses: nothing is changed, Degraded says why."""
    degraded = conditions.condition(ConditionType.DEGRADED, "True", Reason.INVALID_SPEC, message)
    return status.model_copy(
        update={
            "observed_generation": generation,
            "conditions": conditions.merge(status.conditions, [degraded], generation, now),
        }
    )


# Which refusal Degraded names when writes failed for different causes: what a person fixes first.
_WRITE_FAILURE_ORDER = (
    Reason.FORBIDDEN,
    Reason.ADMISSION_DENIED,
    Reason.INVALID_OBJECT,
    Reason.QUOTA_EXCEEDED,
    Reason.WRITE_CONFLICT,
    Reason.API_SERVER_ERROR,
    Reason.API_UNREACHABLE,
)


def with_write_failures(
    status: LingDeploymentStatus,
    stored: Sequence[Condition],
    failures: Sequence[WriteFailure],
    generation: int,
    now: datetime,
) -> LingDeploymentStatus:
    """The pass's status with its refused writes in it: Degraded=True, reason the cause (QuotaExceeded,
    AdmissionDenied, Forbidden, ...), message the API server's words. No failures: `status` as it is.
    `stored` are the conditions as stored before the pass: the one to keep the transition time of."""
    if not failures:
        return status
    ordered = sorted(
        failures,
        key=lambda f: (
            _WRITE_FAILURE_ORDER.index(f.reason)
            if f.reason in _WRITE_FAILURE_ORDER
            else len(_WRITE_FAILURE_ORDER),
            f.verb,
            f.kind,
            f.name,
        ),
    )
    first = ordered[0]
    message = "; ".join(f.describe() for f in ordered[:3])
    if len(ordered) > 3:
        message += f"; and {len(ordered) - 3} more refused writes"
    degraded = conditions.condition(ConditionType.DEGRADED, "True", first.reason, message)
    merged = conditions.find(conditions.merge(stored, [degraded], generation, now), ConditionType.DEGRADED)
    assert merged is not None
    return status.model_copy(
        update={"conditions": conditions.merge(status.conditions, [merged], generation, now, keep=True)}
    )
