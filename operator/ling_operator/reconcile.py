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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ling_operator import rendezvous, resources
from ling_operator.api import ConditionType, Reason

# How often to look again while pods we deleted are still terminating (pod events also wake us).
TERMINATING_REQUEUE_SECONDS = 2.0


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the LingDeployment."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    """What one reconcile pass decided. The handlers apply it; nothing here touches the API."""

    create_pods: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    create_services: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    requeue_after: float | None = None
    restarted_groups: list[int] = field(default_factory=list)
    rendezvous_seconds: list[float] = field(default_factory=list)

    def wake_in(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


# ---------------------------------------------------------------------------------------------------------
# Reading pods and timestamps.


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _labels(pod: Mapping[str, Any]) -> Mapping[str, str]:
    return pod.get("metadata", {}).get("labels") or {}


def pod_group(pod: Mapping[str, Any]) -> int | None:
    try:
        return int(_labels(pod)[resources.LABEL_GROUP])
    except (KeyError, ValueError):
        return None


def pod_rank(pod: Mapping[str, Any]) -> int | None:
    try:
        return int(_labels(pod)[resources.LABEL_RANK])
    except (KeyError, ValueError):
        return None


def is_terminating(pod: Mapping[str, Any]) -> bool:
    return bool(pod.get("metadata", {}).get("deletionTimestamp"))


def _condition(pod: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def is_ready(pod: Mapping[str, Any]) -> bool:
    ready = _condition(pod, "Ready")
    return (
        pod.get("status", {}).get("phase") == "Running"
        and ready is not None
        and ready.get("status") == "True"
        and not is_terminating(pod)
    )


def is_scheduled(pod: Mapping[str, Any]) -> bool:
    if pod.get("spec", {}).get("nodeName"):
        return True
    scheduled = _condition(pod, "PodScheduled")
    return scheduled is not None and scheduled.get("status") == "True"


def unschedulable_message(pod: Mapping[str, Any]) -> str | None:
    scheduled = _condition(pod, "PodScheduled")
    if scheduled is not None and scheduled.get("status") == "False":
        return str(scheduled.get("message") or scheduled.get("reason") or "not scheduled yet")
    return None


def failure_of(pod: Mapping[str, Any], rank: int) -> str | None:
    """Why this rank is dead, in words a person can act on; None while it is alive."""
    status = pod.get("status", {})
    if status.get("reason") == "Evicted":
        return f"rank {rank} was evicted: {status.get('message') or 'no message'}"
    for key, what in (("initContainerStatuses", "init container "), ("containerStatuses", "")):
        for cs in status.get(key) or []:
            term = (cs.get("state") or {}).get("terminated")
            if term is None:
                continue
            code = term.get("exitCode")
            if key == "initContainerStatuses" and code == 0:
                continue
            reason = term.get("reason")
            detail = f" ({reason})" if reason and reason not in ("Error", "Completed") else ""
            who = f"{what}{cs.get('name')} of " if what else ""
            return f"{who}rank {rank} exited with code {code}{detail}"
    phase = status.get("phase")
    if phase == "Failed":
        return f"rank {rank} failed: {status.get('reason') or status.get('message') or 'pod phase Failed'}"
    if phase == "Succeeded":
        return f"rank {rank} exited with code 0"
    return None


# A group that served this long since its last restart starts its backoff over, as the kubelet forgets a
# container's crash-loop backoff after 10 minutes of running (or maxBackoffSeconds, when that is longer:
# a group must outlive the longest delay before its failures stop counting as one crash loop).
BACKOFF_RESET_SECONDS = 600


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


def served_long_enough(ready_since: str | None, now: datetime, max_backoff: int) -> bool:
    """True when the group has been Ready (since `ready_since`) long enough to forget its backoff."""
    since = parse_time(ready_since)
    return since is not None and (now - since).total_seconds() >= backoff_reset_after(max_backoff)


def _ranks_text(ranks: Iterable[int]) -> str:
    items = sorted(ranks)
    word = "rank" if len(items) == 1 else "ranks"
    return f"{word} {', '.join(str(r) for r in items)}"


# ---------------------------------------------------------------------------------------------------------
# One group as observed.


@dataclass
class GroupView:
    index: int
    pods: dict[int, dict[str, Any]]  # rank -> pod (live and terminating)
    prev: dict[str, Any] | None  # this group's entry of the previous status.groups

    @property
    def live(self) -> dict[int, dict[str, Any]]:
        return {r: p for r, p in self.pods.items() if not is_terminating(p)}

    @property
    def terminating(self) -> bool:
        return any(is_terminating(p) for p in self.pods.values())

    def revisions(self) -> set[str]:
        return {_labels(p).get(resources.LABEL_REVISION, "") for p in self.live.values()}

    def prev_phase(self) -> str | None:
        return (self.prev or {}).get("phase")


@dataclass(frozen=True)
class Shape:
    """The numbers of a spec that decisions need."""

    replicas: int
    pods: int
    tensor: int
    gpus_per_pod: int
    device: str
    max_unavailable: int
    max_surge: int
    restart_group: bool
    backoff: int
    max_backoff: int
    rendezvous_timeout: int
    startup_timeout: int

    @staticmethod
    def of(spec: Mapping[str, Any]) -> Shape:
        rollout = spec.get("rollout") or {}
        fp = spec.get("failurePolicy") or {}
        replicas = int(spec.get("replicas", 1))
        surge = int(rollout.get("maxSurge", 0))
        unavailable = int(rollout.get("maxUnavailable", 1))
        if unavailable == 0 and surge == 0:
            unavailable = 1
        if replicas > 1:
            # Never every group down at once, whatever maxUnavailable says.
            unavailable = min(unavailable, replicas - 1)
        return Shape(
            replicas=replicas,
            pods=rendezvous.pods_per_group(spec),
            tensor=int(spec["parallelism"]["tensor"]),
            gpus_per_pod=int(spec["parallelism"]["gpusPerPod"]),
            device=str(spec["engine"].get("device", "cuda")),
            max_unavailable=unavailable,
            max_surge=surge,
            restart_group=bool(fp.get("restartGroup", True)),
            backoff=int(fp.get("backoffSeconds", 10)),
            max_backoff=int(fp.get("maxBackoffSeconds", 300)),
            rendezvous_timeout=int(fp.get("rendezvousTimeoutSeconds", 900)),
            startup_timeout=int((spec.get("runtime") or {}).get("startupTimeoutSeconds", 1800)),
        )


def _observed_phase(view: GroupView, shape: Shape) -> str:
    live = view.live
    if len(live) < shape.pods or any(not is_scheduled(p) for p in live.values()):
        return "Pending"
    ranks = [live[r] for r in range(shape.pods) if r in live]
    if any(p.get("status", {}).get("phase") != "Running" for p in ranks):
        return "Forming"
    if not all(is_ready(p) for p in ranks):
        return "Loading"
    return "Ready"


def _wait_message(view: GroupView, shape: Shape, phase: str) -> str:
    live = view.live
    if phase == "Pending":
        unscheduled = [r for r, p in live.items() if not is_scheduled(p)]
        if unscheduled:
            why = unschedulable_message(live[unscheduled[0]]) or "not scheduled yet"
            if shape.device == "cuda":
                return (
                    f"group {view.index}: waiting for {len(unscheduled) * shape.gpus_per_pod} of "
                    f"{shape.tensor} GPUs: {why}"
                )
            return f"group {view.index}: waiting for {len(unscheduled)} of {shape.pods} pods to be scheduled: {why}"
        return f"group {view.index}: creating {_ranks_text(r for r in range(shape.pods) if r not in live)}"
    if phase == "Forming":
        waiting = [r for r in range(shape.pods) if live[r].get("status", {}).get("phase") != "Running"]
        why = sorted({w for r in waiting for w in _waiting_reasons(live[r])}) or ["image pull, init"]
        return f"group {view.index}: waiting for {_ranks_text(waiting)} to start ({'; '.join(why)})"
    if phase == "Loading":
        waiting = [r for r in range(shape.pods) if not is_ready(live[r])]
        return f"group {view.index}: loading weights, {_ranks_text(waiting)} not ready"
    return f"group {view.index}: {phase.lower()}"


def _waiting_reasons(pod: Mapping[str, Any]) -> list[str]:
    """The kubelet's words for a container that has not started (ImagePullBackOff: ...)."""
    status = pod.get("status", {})
    out = []
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") and waiting["reason"] not in ("PodInitializing", "ContainerCreating"):
            out.append(
                f"{cs.get('name')}: {waiting['reason']}"
                + (f": {waiting['message']}" if waiting.get("message") else "")
            )
    return out


def _failure(view: GroupView, shape: Shape, now: datetime) -> tuple[str, str] | None:
    """(reason, message) when this group must be restarted, else None."""
    for rank, pod in sorted(view.pods.items()):
        msg = failure_of(pod, rank)
        if msg:
            return Reason.RANK_FAILED, msg
    prev_phase = view.prev_phase()
    if view.prev is not None and prev_phase != "Restarting":
        gone = sorted(r for r, p in view.pods.items() if is_terminating(p))
        if gone:
            return Reason.RANK_FAILED, f"{_ranks_text(gone)} deleted"
    live = view.live
    missing = [r for r in range(shape.pods) if r not in live]
    started = any(p.get("status", {}).get("phase") == "Running" for p in live.values()) or prev_phase in (
        "Loading",
        "Ready",
    )
    if missing and live and started:
        return Reason.RANK_FAILED, f"{_ranks_text(missing)} missing"
    since = parse_time((view.prev or {}).get("formingSince"))
    phase = _observed_phase(view, shape)
    if since is not None and phase in ("Forming", "Loading"):
        limit = shape.rendezvous_timeout + (shape.startup_timeout if phase == "Loading" else 0)
        if (now - since).total_seconds() > limit:
            if phase == "Forming":
                waiting = [
                    r for r in range(shape.pods) if live[r].get("status", {}).get("phase") != "Running"
                ]
            else:
                waiting = [r for r in range(shape.pods) if not is_ready(live[r])]
            return (
                Reason.RENDEZVOUS_TIMEOUT,
                f"rendezvous timed out after {limit} s: {_ranks_text(waiting)} not joined",
            )
    return None


def _rank_status(view: GroupView, shape: Shape, name: str, index: int) -> list[dict[str, Any]]:
    ranks = []
    for rank in range(shape.pods):
        pod = view.live.get(rank)
        entry: dict[str, Any] = {"rank": rank, "pod": rendezvous.pod_name(name, index, rank), "ready": False}
        if pod is not None:
            node = pod.get("spec", {}).get("nodeName")
            if node:
                entry["node"] = node
            entry["ready"] = is_ready(pod)
        ranks.append(entry)
    return ranks


# ---------------------------------------------------------------------------------------------------------
# The decision.


def reconcile(
    owner: resources.Owner,
    generation: int,
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    services: Iterable[str],
    now: datetime,
    *,
    default_image: str = resources.DEFAULT_RUNTIME_IMAGE,
) -> Plan:
    """One pass: `spec` has defaults applied (resources.with_defaults); `pods` are the pods labelled
    with this deployment (any owner); `services` the names of its Services that exist."""
    shape = Shape.of(spec)
    desired_rev = resources.revision_of(spec, default_image)
    plan = Plan()

    existing_services = set(services)
    for svc in (resources.build_ranks_service(owner), resources.build_client_service(owner)):
        if svc["metadata"]["name"] not in existing_services:
            plan.create_services.append(svc)

    prev_groups: dict[int, dict[str, Any]] = {}
    for entry in status.get("groups") or []:
        prev_groups[int(entry["index"])] = dict(entry)

    blocked: set[int] = set()  # indices whose old pods still exist outside any slot: names not reusable
    draining: set[int] = set()  # blocked indices whose pods are going away (still holding their GPUs)
    by_group: dict[int, dict[int, dict[str, Any]]] = {}
    for pod in pods:
        g, r = pod_group(pod), pod_rank(pod)
        if g is None or r is None:
            continue
        owners = pod.get("metadata", {}).get("ownerReferences") or []
        if not any(o.get("uid") == owner.uid for o in owners):
            blocked.add(g)  # left over from an earlier object of the same name: never touch, never reuse
            if is_terminating(pod):
                draining.add(g)
            continue
        by_group.setdefault(g, {})[r] = dict(pod)

    views: dict[int, GroupView] = {}
    for g in sorted(set(prev_groups) | set(by_group)):
        view = GroupView(g, by_group.get(g, {}), prev_groups.get(g))
        if view.prev is None and not view.live:
            blocked.add(g)  # terminating pods of a group we already removed
            draining.add(g)
            continue
        views[g] = view

    new_status: dict[int, dict[str, Any]] = {}
    to_create: set[int] = set()  # groups whose missing ranks are created this pass

    def delete_group(view: GroupView) -> None:
        for rank in sorted(view.live):
            plan.delete_pods.append(rendezvous.pod_name(owner.name, view.index, rank))

    # 1. Failures and restarts.
    for g, view in views.items():
        prev = view.prev or {}
        entry: dict[str, Any] = {
            "index": g,
            "restarts": int(prev.get("restarts", 0)),
        }
        for key in ("lastRestartTime", "lastRestartReason", "formingSince", "readySince", "backoffSeconds"):
            if prev.get(key):
                entry[key] = prev[key]
        if served_long_enough(entry.get("readySince"), now, shape.max_backoff):
            # Restarts weeks apart are not a crash loop: the next one waits backoffSeconds again.
            entry.pop("backoffSeconds", None)
        new_status[g] = entry

        if view.prev_phase() == "Restarting":
            entry["phase"] = "Restarting"
            if view.pods:
                if view.live:
                    delete_group(view)  # a restart interrupted before every rank was deleted
                plan.wake_in(TERMINATING_REQUEUE_SECONDS)
                continue
            delay = entry.get("backoffSeconds")
            if not isinstance(delay, int):
                # A status written before backoffSeconds existed: the delay followed the restart count.
                delay = restart_delay(entry["restarts"], shape.backoff, shape.max_backoff)
            started = parse_time(entry.get("lastRestartTime")) or now
            wait = (started + timedelta(seconds=delay) - now).total_seconds()
            if wait > 0:
                plan.wake_in(wait)
                continue
            to_create.add(g)
            continue

        if view.prev_phase() == "Failed" and not shape.restart_group and view.pods:
            entry["phase"] = "Failed"  # kept for inspection until its pods are deleted or the spec changes
            continue

        failed = _failure(view, shape, now)
        if failed is None:
            continue
        reason, message = failed
        if not shape.restart_group:
            entry["phase"] = "Failed"
            entry["lastRestartReason"] = (
                f"{message}; group {g} left failed (failurePolicy.restartGroup is false)"
            )
            plan.events.append(
                Event("Warning", Reason.RANK_FAILED, f"group {g}: {entry['lastRestartReason']}")
            )
            continue
        entry["restarts"] += 1
        delay = next_backoff(entry.get("backoffSeconds"), shape.backoff, shape.max_backoff)
        entry["backoffSeconds"] = delay
        entry.pop("readySince", None)
        entry["phase"] = "Restarting"
        entry["lastRestartTime"] = format_time(now)
        entry["lastRestartReason"] = f"{message}, restarting group {g} in {delay} s"
        entry.pop("formingSince", None)
        delete_group(view)
        plan.restarted_groups.append(g)
        plan.events.append(Event("Warning", reason, entry["lastRestartReason"]))
        plan.wake_in(max(delay, TERMINATING_REQUEUE_SECONDS))

    # 2. Which groups are at the desired revision, which are ready.
    def is_new(g: int) -> bool:
        view = views[g]
        if new_status[g].get("phase") == "Restarting" or not view.live:
            return True  # will be (re)created at the desired revision
        return view.revisions() == {desired_rev}

    def ready(g: int) -> bool:
        return new_status[g].get("phase") is None and _observed_phase(views[g], shape) == "Ready"

    slots = set(views)
    old = {g for g in slots if not is_new(g)}
    prev_desired = status.get("desiredReplicas")
    scaling_up = not isinstance(prev_desired, int) or shape.replicas > prev_desired
    allowed_total = shape.replicas + (shape.max_surge if old else 0)
    removed: set[int] = set()

    def remove(g: int, event: Event) -> None:
        delete_group(views[g])
        slots.discard(g)
        old.discard(g)
        to_create.discard(g)
        removed.add(g)
        if views[g].live:
            blocked.add(g)
            draining.add(g)
        plan.events.append(event)

    # 3. Scale down by whole groups: outdated, then not-ready, then highest index first.
    excess = len(slots) - allowed_total
    if excess > 0:
        for g in sorted(slots, key=lambda g: (g not in old, ready(g), -g))[:excess]:
            remove(
                g,
                Event(
                    "Normal",
                    Reason.SCALING_DOWN,
                    f"removing group {g}: {len(slots)} groups, {shape.replicas} wanted",
                ),
            )
        allowed_total = shape.replicas + (shape.max_surge if old else 0)

    # 4. Roll outdated groups within the availability budget.
    min_available = shape.replicas - shape.max_unavailable
    available = sum(1 for g in slots if ready(g))
    for g in sorted(old, key=lambda g: (ready(g), -g)):
        if ready(g):
            if available - 1 < min_available:
                continue
            available -= 1
        remove(
            g,
            Event(
                "Normal",
                Reason.ROLLING_UPDATE,
                f"replacing group {g} (revision {', '.join(sorted(views[g].revisions()))} -> {desired_rev}); "
                f"{available} of {shape.replicas} groups stay ready",
            ),
        )
    allowed_total = shape.replicas + (shape.max_surge if old else 0)

    # 5. Create: absent slots, missing ranks of forming groups, then new groups at the lowest free index.
    for g in sorted(slots):
        view = views[g]
        phase = new_status[g].get("phase")
        if phase in ("Restarting", "Failed") or view.terminating:
            continue
        if len(view.live) < shape.pods:
            to_create.add(g)
    new_count = sum(1 for g in slots if is_new(g))
    occupied = len(slots) + len(draining - slots)
    index = 0
    while occupied < allowed_total and new_count < shape.replicas:
        while index in slots or index in blocked or index in removed:
            index += 1
        views[index] = GroupView(index, {}, None)
        new_status[index] = {"index": index, "restarts": 0}
        slots.add(index)
        to_create.add(index)
        occupied += 1
        new_count += 1
        # A new group is a scale-up only when spec.replicas rose above what was desired before;
        # otherwise it replaces a group (a rollout with surge), and the event must not read as scaling.
        if scaling_up:
            event = Event(
                "Normal",
                Reason.SCALING_UP,
                f"creating group {index} ({shape.pods} pods, revision {desired_rev})",
            )
        else:
            event = Event(
                "Normal",
                Reason.ROLLING_UPDATE,
                f"creating group {index} at revision {desired_rev} to replace an outdated or removed group",
            )
        plan.events.append(event)

    for g in sorted(to_create):
        view = views[g]
        live = {} if new_status[g].get("phase") == "Restarting" else view.live
        for pod in resources.build_group(owner, spec, g, default_image=default_image):
            if pod_rank(pod) not in live:
                plan.create_pods.append(pod)
        if new_status[g].get("phase") == "Restarting":
            plan.events.append(
                Event("Normal", Reason.GROUP_RESTARTING, f"starting group {g} again after backoff")
            )
            new_status[g].pop("phase")
        if not live:
            new_status[g]["formingSince"] = format_time(now)

    # 6. Per-group status.
    groups_out: list[dict[str, Any]] = []
    waits: list[str] = []
    for g in sorted(slots):
        view, entry = views[g], new_status[g]
        created = g in to_create
        if entry.get("phase") is None:
            entry["phase"] = "Pending" if created else _observed_phase(view, shape)
        phase = entry["phase"]
        prev_phase = view.prev_phase()
        if phase == "Ready":
            entry.setdefault("readySince", format_time(now))
        else:
            entry.pop("readySince", None)  # the backoff reset counts uninterrupted service only
        if phase == "Ready":
            since = parse_time(entry.pop("formingSince", None))
            if prev_phase != "Ready":
                took = (now - since).total_seconds() if since else None
                if took is not None:
                    plan.rendezvous_seconds.append(took)
                plan.events.append(
                    Event(
                        "Normal",
                        "GroupReady",
                        f"group {g} ready: all {shape.pods} ranks joined"
                        + (f" in {took:.0f} s" if took is not None else ""),
                    )
                )
        elif phase in ("Forming", "Loading") and prev_phase in (None, "Pending"):
            entry["formingSince"] = format_time(now)  # the rendezvous clock starts once all ranks are placed
        if phase in ("Forming", "Loading") and entry.get("formingSince"):
            since = parse_time(entry["formingSince"])
            limit = shape.rendezvous_timeout + (shape.startup_timeout if phase == "Loading" else 0)
            if since is not None:
                plan.wake_in((since + timedelta(seconds=limit) - now).total_seconds() + 1)
        if phase not in ("Ready", "Restarting", "Failed"):
            waits.append(
                f"group {g}: creating {shape.pods} pods" if created else _wait_message(view, shape, phase)
            )
        if phase == "Restarting" and entry.get("lastRestartReason"):
            waits.append(f"group {g}: {entry['lastRestartReason']}")
        revisions = view.revisions()
        # A group being (re)created gets the desired revision; a mixed group reports its oldest.
        entry["revision"] = (
            desired_rev if created or phase == "Restarting" or not revisions else min(revisions)
        )
        if len(revisions) > 1:
            entry["revision"] = min(r for r in revisions if r != desired_rev)
        entry["masterAddress"] = rendezvous.master_address(owner.name, g, owner.namespace)
        entry["ranks"] = _rank_status(view, shape, owner.name, g)
        groups_out.append({k: entry[k] for k in _GROUP_KEYS if k in entry})

    if plan.delete_pods:
        plan.wake_in(TERMINATING_REQUEUE_SECONDS)

    # 7. Deployment status and conditions.
    ready_count = sum(1 for e in groups_out if e["phase"] == "Ready")
    updated = sum(1 for e in groups_out if e["revision"] == desired_rev and e["phase"] != "Failed")
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": len(groups_out),
        "readyReplicas": ready_count,
        "updatedReplicas": updated,
        "desiredReplicas": shape.replicas,
        "selector": resources.selector_string(resources.head_selector(owner.name)),
        "podsPerGroup": shape.pods,
        "groups": groups_out,
    }
    conditions = _conditions(
        shape=shape,
        groups=groups_out,
        desired_rev=desired_rev,
        waits=waits,
        old_left=bool(old),
        plan=plan,
    )
    out["conditions"] = merge_conditions(status.get("conditions") or [], conditions, generation, now)
    plan.status = out
    return plan


_GROUP_KEYS = (
    "index",
    "phase",
    "revision",
    "masterAddress",
    "ranks",
    "restarts",
    "lastRestartTime",
    "lastRestartReason",
    "formingSince",
    "backoffSeconds",
    "readySince",
)


def _conditions(
    *,
    shape: Shape,
    groups: list[dict[str, Any]],
    desired_rev: str,
    waits: list[str],
    old_left: bool,
    plan: Plan,
) -> list[dict[str, str]]:
    ready = sum(1 for e in groups if e["phase"] == "Ready")
    detail = "; ".join(waits[:3]) + ("; ..." if len(waits) > 3 else "")
    conds: list[dict[str, str]] = []

    if shape.replicas == 0:
        conds.append(
            _cond(ConditionType.READY, "True", Reason.SCALED_TO_ZERO, "replicas is 0: no groups wanted")
        )
    elif ready >= shape.replicas:
        conds.append(
            _cond(
                ConditionType.READY,
                "True",
                Reason.ALL_GROUPS_READY,
                f"{ready} of {shape.replicas} groups ready",
            )
        )
    else:
        msg = f"{ready} of {shape.replicas} groups ready" + (f"; {detail}" if detail else "")
        conds.append(_cond(ConditionType.READY, "False", Reason.GROUPS_NOT_READY, msg))

    updated = sum(1 for e in groups if e["revision"] == desired_rev)
    waiting_gpus = [w for w in waits if "waiting for" in w and ("GPUs" in w or "scheduled" in w)]
    if old_left or any(e.reason == Reason.ROLLING_UPDATE for e in plan.events):
        prog = (Reason.ROLLING_UPDATE, f"{updated} of {shape.replicas} groups at revision {desired_rev}")
    elif waiting_gpus:
        prog = (Reason.WAITING_FOR_GPUS, "; ".join(waiting_gpus[:3]))
    elif len(groups) < shape.replicas or any(e.reason == Reason.SCALING_UP for e in plan.events):
        prog = (Reason.SCALING_UP, f"{len(groups)} of {shape.replicas} groups exist")
    elif len(groups) > shape.replicas or any(e.reason == Reason.SCALING_DOWN for e in plan.events):
        prog = (Reason.SCALING_DOWN, f"{len(groups)} groups, {shape.replicas} wanted")
    elif any(e["phase"] not in ("Ready",) for e in groups):
        prog = (Reason.LOADING_WEIGHTS, detail or "groups are starting")
    else:
        prog = None
    if prog is None:
        conds.append(
            _cond(
                ConditionType.PROGRESSING,
                "False",
                Reason.UP_TO_DATE,
                f"{len(groups)} groups at revision {desired_rev}, all ready",
            )
        )
    else:
        conds.append(_cond(ConditionType.PROGRESSING, "True", *prog))

    not_joined = [e for e in groups if e["phase"] != "Ready"]
    timeouts = [e for e in plan.events if e.reason == Reason.RENDEZVOUS_TIMEOUT]
    if timeouts:
        conds.append(
            _cond(ConditionType.RENDEZVOUS_READY, "False", Reason.RENDEZVOUS_TIMEOUT, timeouts[0].message)
        )
    elif not_joined:
        msg = f"{len(groups) - len(not_joined)} of {len(groups)} groups formed" + (
            f"; {detail}" if detail else ""
        )
        conds.append(_cond(ConditionType.RENDEZVOUS_READY, "False", Reason.WAITING_FOR_RANKS, msg))
    else:
        conds.append(
            _cond(
                ConditionType.RENDEZVOUS_READY,
                "True",
                Reason.ALL_RANKS_JOINED,
                f"every rank of {len(groups)} groups joined",
            )
        )

    failed = [e for e in groups if e["phase"] == "Failed"]
    restarting = [e for e in groups if e["phase"] == "Restarting"]
    if failed:
        conds.append(
            _cond(
                ConditionType.DEGRADED,
                "True",
                Reason.RANK_FAILED,
                "; ".join(f"group {e['index']}: {e.get('lastRestartReason', 'failed')}" for e in failed[:3]),
            )
        )
    elif restarting:
        latest = max(restarting, key=lambda e: e.get("lastRestartTime") or "")
        conds.append(
            _cond(
                ConditionType.DEGRADED,
                "True",
                Reason.GROUP_RESTARTING,
                f"{latest.get('lastRestartReason', 'restarting')} (restart {latest['restarts']})",
            )
        )
    else:
        conds.append(_cond(ConditionType.DEGRADED, "False", Reason.AS_EXPECTED, "no group is failing"))
    return conds


def _cond(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(
    previous: Iterable[Mapping[str, Any]],
    current: Iterable[Mapping[str, Any]],
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Replace our condition types, keep others (the autoscaler's); a condition keeps its
    lastTransitionTime while its status stays the same."""
    prev_by_type = {c["type"]: dict(c) for c in previous}
    merged: dict[str, dict[str, Any]] = dict(prev_by_type)
    for cond in current:
        old = prev_by_type.get(cond["type"])
        entry = dict(cond)
        entry["observedGeneration"] = generation
        if old is not None and old.get("status") == cond["status"] and old.get("lastTransitionTime"):
            entry["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            entry["lastTransitionTime"] = format_time(now)
        merged[cond["type"]] = entry
    order = {t: i for i, t in enumerate(ConditionType.ALL)}
    return sorted(merged.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def invalid_spec_status(
    status: Mapping[str, Any], generation: int, message: str, now: datetime
) -> dict[str, Any]:
    """Status for a spec the operator refuses: nothing is changed, Degraded says why."""
    cond = _cond(ConditionType.DEGRADED, "True", Reason.INVALID_SPEC, message)
    return {
        "observedGeneration": generation,
        "conditions": merge_conditions(status.get("conditions") or [], [cond], generation, now),
    }
