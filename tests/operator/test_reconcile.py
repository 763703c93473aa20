"""Table-driven tests of the pure decisions: groups, failures, backoff, rendezvous, rollout, scale."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ling_operator import conditions, reconcile, resources
from ling_operator.api import Condition, LingDeploymentSpec, LingDeploymentStatus
from ling_operator.reconcile import Plan
from ling_operator.timeutil import parse_time
from podstate import (
    OWNER,
    base_spec,
    evicted,
    exited,
    group_pods,
    observed,
    pending,
    ready,
    running,
    scheduled,
    terminating,
)

T0 = datetime(2026, 11, 29, 1, 0, 0, tzinfo=UTC)
SERVICES = ["ling", "ling-ranks"]


def run(
    spec: LingDeploymentSpec,
    status: dict[str, Any] | LingDeploymentStatus,
    pods: list[dict[str, Any]],
    now: datetime = T0,
) -> Plan:
    """One pass on status as stored (JSON, as the API server gives it back) and pods as the watch shows them."""
    raw = status.to_k8s() if isinstance(status, LingDeploymentStatus) else status
    return reconcile.reconcile(
        OWNER, 1, spec, LingDeploymentStatus.model_validate(raw), observed(pods), SERVICES, now
    )


def stored(plan: Plan) -> dict[str, Any]:
    """The plan's status as written (and read back)."""
    return plan.status.to_k8s()


def cond(plan: Plan, type_: str) -> dict[str, Any]:
    return next(c for c in stored(plan)["conditions"] if c["type"] == type_)


def group(plan: Plan, index: int) -> dict[str, Any]:
    return next(g for g in stored(plan)["groups"] if g["index"] == index)


class World:
    """A tiny API server + kubelet made of data: applies plans, then lets pods settle like kwok does."""

    def __init__(self, spec: LingDeploymentSpec) -> None:
        self.spec = spec
        self.pods: dict[str, dict[str, Any]] = {}
        self.status: dict[str, Any] = {}
        self.now = T0
        self.settle: Callable[[dict[str, Any]], dict[str, Any]] = ready

    def step(self, seconds: float = 1) -> Plan:
        plan = run(self.spec, self.status, list(self.pods.values()), self.now)
        for name in plan.delete_pods:
            self.pods[name] = terminating(self.pods[name])
        for pod in plan.create_pods:
            assert pod["metadata"]["name"] not in self.pods, "a pod name was reused while the old pod exists"
            self.pods[pod["metadata"]["name"]] = pod
        self.status = stored(plan)
        self.now += timedelta(seconds=seconds)
        return plan

    def kubelet(self) -> None:
        for name, pod in list(self.pods.items()):
            if pod["metadata"].get("deletionTimestamp"):
                del self.pods[name]
            elif "status" not in pod:
                self.pods[name] = self.settle(pod)

    def ready_groups(self) -> set[int]:
        by_group: dict[int, list[dict[str, Any]]] = {}
        for pod in self.pods.values():
            by_group.setdefault(int(pod["metadata"]["labels"]["serving.ling.dev/group"]), []).append(pod)
        pods = self.spec.pods_per_group
        return {g for g, ps in by_group.items() if len(ps) == pods and all(o.ready for o in observed(ps))}

    def revisions(self) -> set[str]:
        return {p["metadata"]["labels"]["serving.ling.dev/revision"] for p in self.pods.values()}

    def converge(self, max_steps: int = 60, check: Callable[[World], None] | None = None) -> int:
        for n in range(max_steps):
            plan = self.step()
            if check:
                check(self)
            self.kubelet()
            if check:
                check(self)
            if not plan.create_pods and not plan.delete_pods and not plan.events and n > 0:
                again = run(self.spec, self.status, list(self.pods.values()), self.now)
                if not again.create_pods and not again.delete_pods and stored(again) == self.status:
                    return n
        raise AssertionError(f"no convergence in {max_steps} steps: {self.status}")


def steady(spec: LingDeploymentSpec) -> World:
    world = World(spec)
    world.converge()
    return world


# ---------------------------------------------------------------------------------------------------------


def test_fresh_deployment_creates_every_group_and_both_services() -> None:
    spec = base_spec(replicas=2)
    plan = reconcile.reconcile(OWNER, 3, spec, LingDeploymentStatus(), [], [], T0)
    assert sorted(p["metadata"]["name"] for p in plan.create_pods) == [
        "ling-0-0",
        "ling-0-1",
        "ling-1-0",
        "ling-1-1",
    ]
    assert sorted(s["metadata"]["name"] for s in plan.create_services) == ["ling", "ling-ranks"]
    assert stored(plan)["observedGeneration"] == 3
    assert [g["phase"] for g in stored(plan)["groups"]] == ["Pending", "Pending"]
    assert group(plan, 1)["masterAddress"] == "ling-1-0.ling-ranks.serving.svc"
    assert cond(plan, "Ready")["status"] == "False"
    assert cond(plan, "Progressing")["reason"] == "ScalingUp"
    assert stored(plan)["selector"] == "serving.ling.dev/deployment=ling,serving.ling.dev/role=head"


def test_ready_groups_then_steady_state_writes_nothing() -> None:
    world = steady(base_spec(replicas=2))
    assert world.status["readyReplicas"] == 2
    assert world.status["updatedReplicas"] == 2
    plan = run(world.spec, world.status, list(world.pods.values()), world.now + timedelta(hours=1))
    assert not plan.create_pods and not plan.delete_pods and not plan.events and not plan.create_services
    assert plan.requeue_after is None
    assert stored(plan) == world.status
    assert cond(plan, "Ready")["status"] == "True"
    assert cond(plan, "RendezvousReady")["reason"] == "AllRanksJoined"
    assert cond(plan, "Progressing")["reason"] == "UpToDate"
    assert cond(plan, "Degraded")["status"] == "False"
    g0 = group(plan, 0)
    assert g0["phase"] == "Ready" and g0["ranks"][1] == {
        "rank": 1,
        "pod": "ling-0-1",
        "node": "gpu-0",
        "ready": True,
    }


def test_unschedulable_rank_is_reported_with_the_scheduler_message() -> None:
    spec = base_spec()
    first = run(spec, {}, [])
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    pods = [ready(first.create_pods[0]), pending(first.create_pods[1], msg)]
    plan = run(spec, first.status, pods, T0 + timedelta(seconds=5))
    assert not plan.delete_pods
    assert group(plan, 0)["phase"] == "Pending"
    prog = cond(plan, "Progressing")
    assert prog["reason"] == "WaitingForGPUs"
    assert prog["message"] == f"group 0: waiting for 2 of 4 GPUs: {msg}"
    assert msg in cond(plan, "Ready")["message"]
    # no rendezvous deadline while waiting for GPUs: an impossible request is a condition, not a crash loop
    later = run(spec, plan.status, pods, T0 + timedelta(hours=5))
    assert not later.delete_pods


@pytest.mark.parametrize(
    ("break_rank", "expected"),
    [
        (lambda p: exited(p, 137), "rank 1 exited with code 137, restarting group 0 in 10 s"),
        (
            lambda p: exited(p, 137, "OOMKilled"),
            "rank 1 exited with code 137 (OOMKilled), restarting group 0 in 10 s",
        ),
        (evicted, "rank 1 was evicted: The node was low on memory., restarting group 0 in 10 s"),
        (terminating, "rank 1 deleted, restarting group 0 in 10 s"),
        (None, "rank 1 missing, restarting group 0 in 10 s"),
    ],
)
def test_a_failed_rank_restarts_exactly_its_group(break_rank: Any, expected: str) -> None:
    world = steady(base_spec(replicas=2))
    pods = dict(world.pods)
    if break_rank is None:
        del pods["ling-0-1"]
    else:
        pods["ling-0-1"] = break_rank(pods["ling-0-1"])
    plan = run(world.spec, world.status, list(pods.values()), world.now)
    expected_deletes = ["ling-0-0"] if break_rank in (None, terminating) else ["ling-0-0", "ling-0-1"]
    assert plan.delete_pods == expected_deletes  # group 1 untouched
    assert not plan.create_pods
    g0 = group(plan, 0)
    assert g0["phase"] == "Restarting"
    assert g0["restarts"] == 1
    assert g0["lastRestartReason"] == expected
    assert group(plan, 1)["phase"] == "Ready"
    assert plan.restarted_groups == [0]
    assert [e.type for e in plan.events] == ["Warning"]
    assert cond(plan, "Degraded")["status"] == "True"
    assert cond(plan, "Degraded")["reason"] == "GroupRestarting"
    assert expected in cond(plan, "Degraded")["message"]


def test_group_restart_waits_for_exponential_backoff() -> None:
    world = steady(base_spec(replicas=1))
    t_fail = world.now
    world.pods["ling-0-1"] = exited(world.pods["ling-0-1"], 1)
    world.step(0)
    world.kubelet()  # every rank gone
    waiting = run(world.spec, world.status, list(world.pods.values()), t_fail + timedelta(seconds=4))
    assert not waiting.create_pods
    assert waiting.requeue_after == pytest.approx(6)
    due = run(world.spec, world.status, list(world.pods.values()), t_fail + timedelta(seconds=10))
    assert sorted(p["metadata"]["name"] for p in due.create_pods) == ["ling-0-0", "ling-0-1"]
    assert group(due, 0)["phase"] == "Pending"
    assert group(due, 0)["restarts"] == 1
    # the second failure doubles the delay
    world.now = t_fail + timedelta(seconds=10)
    world.converge()
    world.pods["ling-0-0"] = exited(world.pods["ling-0-0"], 1)
    plan = world.step(0)
    assert group(plan, 0)["restarts"] == 2
    assert group(plan, 0)["lastRestartReason"].endswith("restarting group 0 in 20 s")


@pytest.mark.parametrize(
    ("restarts", "delay"), [(0, 0), (1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (60, 300)]
)
def test_restart_delay(restarts: int, delay: int) -> None:
    assert reconcile.restart_delay(restarts, 10, 300) == delay


def fail_and_restart(world: World, after: float) -> dict[str, Any]:
    """Let group 0 serve for `after` seconds, kill rank 1, and return group 0's status after the restart."""
    world.now += timedelta(seconds=after)
    world.pods["ling-0-1"] = exited(world.pods["ling-0-1"], 1)
    plan = world.step(0)
    failed = group(plan, 0)
    world.kubelet()
    world.now += timedelta(seconds=failed["backoffSeconds"])
    world.converge()
    return failed


def test_backoff_doubles_while_failures_come_soon_after_the_group_is_ready() -> None:
    world = steady(base_spec(replicas=1))
    assert "backoffSeconds" not in group(world.step(0), 0)  # never restarted: nothing to remember
    delays = [fail_and_restart(world, after=30)["backoffSeconds"] for _ in range(7)]
    assert delays == [10, 20, 40, 80, 160, 300, 300]
    assert world.status["groups"][0]["restarts"] == 7  # the count keeps growing; only the delay resets


def test_backoff_resets_after_the_group_served_long_enough() -> None:
    world = steady(base_spec(replicas=1))
    for _ in range(5):
        fail_and_restart(world, after=30)
    assert world.status["groups"][0]["backoffSeconds"] == 160
    ready_since = world.status["groups"][0]["readySince"]
    # Ready for 9 minutes 59 s: still the same crash loop, the delay doubles.
    world.now = parse_time(ready_since) + timedelta(seconds=599)
    assert fail_and_restart(world, after=0)["backoffSeconds"] == 300
    # Ready for 10 minutes (longer than maxBackoffSeconds 300): the next restart waits backoffSeconds again.
    world.now = parse_time(world.status["groups"][0]["readySince"]) + timedelta(seconds=600)
    failed = fail_and_restart(world, after=0)
    assert failed["backoffSeconds"] == 10
    assert failed["lastRestartReason"].endswith("restarting group 0 in 10 s")
    assert failed["restarts"] == 7


def test_backoff_reset_waits_for_max_backoff_when_that_is_longer() -> None:
    world = steady(base_spec(replicas=1, failurePolicy={"maxBackoffSeconds": 3600}))
    for _ in range(3):
        fail_and_restart(world, after=30)
    assert fail_and_restart(world, after=1800)["backoffSeconds"] == 80  # 30 min < maxBackoffSeconds
    assert fail_and_restart(world, after=3600)["backoffSeconds"] == 10


def test_ready_since_marks_uninterrupted_service_and_causes_no_writes_in_steady_state() -> None:
    world = steady(base_spec(replicas=1))
    entry = world.status["groups"][0]
    assert entry["phase"] == "Ready" and entry["readySince"]
    later = run(world.spec, world.status, list(world.pods.values()), world.now + timedelta(hours=5))
    assert stored(later)["groups"] == world.status["groups"]  # nothing to write while nothing changes
    # A group that stops being ready loses readySince (the reset counts uninterrupted service only),
    # and a long service before that still resets the backoff when it then fails.
    world.status["groups"][0]["backoffSeconds"] = 300
    world.now += timedelta(hours=1)
    world.pods["ling-0-1"] = running(world.pods["ling-0-1"])  # readiness failing
    loading = world.step(0)
    assert group(loading, 0)["phase"] == "Loading" and "readySince" not in group(loading, 0)
    assert "backoffSeconds" not in group(loading, 0)
    world.pods["ling-0-1"] = exited(world.pods["ling-0-1"], 1)
    assert group(world.step(0), 0)["backoffSeconds"] == 10


@pytest.mark.parametrize(("previous", "delay"), [(None, 10), (0, 10), (10, 20), (160, 300), (300, 300)])
def test_next_backoff(previous: int | None, delay: int) -> None:
    assert reconcile.next_backoff(previous, 10, 300) == delay
    assert reconcile.next_backoff(previous, 0, 300) == 0  # backoffSeconds 0: restart at once


def test_a_restarting_group_from_an_older_status_waits_by_its_restart_count() -> None:
    world = steady(base_spec(replicas=1))
    t_fail = world.now
    world.pods["ling-0-1"] = exited(world.pods["ling-0-1"], 1)
    world.step(0)
    world.kubelet()
    old = {**world.status, "groups": [{**world.status["groups"][0], "restarts": 3}]}
    del old["groups"][0]["backoffSeconds"]  # written before the field existed
    waiting = run(world.spec, old, list(world.pods.values()), t_fail + timedelta(seconds=30))
    assert not waiting.create_pods and waiting.requeue_after == pytest.approx(10)  # 40 s for restart 3


def test_rendezvous_deadline_restarts_the_group_naming_missing_ranks() -> None:
    spec = base_spec(failurePolicy={"rendezvousTimeoutSeconds": 60})
    first = run(spec, {}, [])
    pods = [running(first.create_pods[0]), scheduled(first.create_pods[1])]
    forming = run(spec, first.status, pods, T0 + timedelta(seconds=1))
    assert group(forming, 0)["phase"] == "Forming"
    assert group(forming, 0)["formingSince"] == "2026-11-29T01:00:01Z"
    assert cond(forming, "RendezvousReady")["reason"] == "WaitingForRanks"
    assert "rank 1 to start" in cond(forming, "RendezvousReady")["message"]
    assert forming.requeue_after is not None and forming.requeue_after <= 62
    early = run(spec, forming.status, pods, T0 + timedelta(seconds=50))
    assert not early.delete_pods
    late = run(spec, forming.status, pods, T0 + timedelta(seconds=62))
    assert late.delete_pods == ["ling-0-0", "ling-0-1"]
    rdv = cond(late, "RendezvousReady")
    assert rdv["reason"] == "RendezvousTimeout"
    assert "rank 1 not joined" in rdv["message"]


def test_rendezvous_duration_is_measured_when_the_group_becomes_ready() -> None:
    spec = base_spec()
    first = run(spec, {}, [])
    pods = [ready(p) for p in first.create_pods]
    plan = run(spec, first.status, pods, T0 + timedelta(seconds=42))
    assert plan.rendezvous_seconds == [42]
    assert any(e.reason == "GroupReady" and "in 42 s" in e.message for e in plan.events)
    assert "formingSince" not in group(plan, 0)


def test_restart_group_false_leaves_the_group_failed_for_inspection() -> None:
    world = steady(base_spec(failurePolicy={"restartGroup": False}))
    world.pods["ling-0-1"] = exited(world.pods["ling-0-1"], 3)
    plan = world.step()
    assert not plan.delete_pods and not plan.create_pods
    assert group(plan, 0)["phase"] == "Failed"
    assert cond(plan, "Degraded")["reason"] == "RankFailed"
    assert "rank 1 exited with code 3" in cond(plan, "Degraded")["message"]
    again = world.step()
    assert not again.delete_pods and not again.events


@pytest.mark.parametrize(
    ("replicas", "max_unavailable", "max_surge", "min_ready"),
    [(3, 1, 0, 2), (3, 2, 0, 1), (3, 0, 1, 3), (2, 5, 0, 1), (1, 0, 1, 1), (4, 1, 1, 3)],
)
def test_rollout_replaces_groups_within_budget(
    replicas: int, max_unavailable: int, max_surge: int, min_ready: int
) -> None:
    spec = base_spec(replicas=replicas, rollout={"maxUnavailable": max_unavailable, "maxSurge": max_surge})
    world = steady(spec)
    old_rev = world.revisions()
    world.spec = base_spec(
        replicas=replicas,
        rollout={"maxUnavailable": max_unavailable, "maxSurge": max_surge},
        speculative={"enabled": True},
    )
    new_rev = resources.revision_of(world.spec)
    assert old_rev != {new_rev}
    seen_max_groups = 0

    def check(w: World) -> None:
        nonlocal seen_max_groups
        assert len(w.ready_groups()) >= min_ready, f"only groups {w.ready_groups()} ready"
        groups = {int(p["metadata"]["labels"]["serving.ling.dev/group"]) for p in w.pods.values()}
        seen_max_groups = max(seen_max_groups, len(groups))

    world.converge(check=check)
    assert world.revisions() == {new_rev}
    indices = sorted(g["index"] for g in world.status["groups"])
    assert len(indices) == replicas
    if max_surge == 0:
        assert indices == list(range(replicas))  # replaced in place, names unchanged
    assert world.status["updatedReplicas"] == replicas
    assert seen_max_groups <= replicas + max_surge


def test_rollout_progress_is_in_status_and_events() -> None:
    spec = base_spec(replicas=3)
    world = steady(spec)
    world.spec = base_spec(replicas=3, speculative={"enabled": True})
    plan = world.step()
    assert plan.delete_pods == ["ling-2-0", "ling-2-1"]  # highest index first, one at a time
    assert cond(plan, "Progressing")["reason"] == "RollingUpdate"
    assert stored(plan)["updatedReplicas"] == 0
    assert any(e.reason == "RollingUpdate" and "replacing group 2" in e.message for e in plan.events)


def test_outdated_not_ready_groups_are_replaced_first() -> None:
    world = steady(base_spec(replicas=3))
    world.pods["ling-0-1"] = running(world.pods["ling-0-1"])  # group 0 loading (not ready)
    world.spec = base_spec(replicas=3, engine={"image": "new:2"})
    plan = world.step()
    # group 0 first (costs no availability); group 2 must wait: 2 ready = replicas - maxUnavailable
    assert sorted(plan.delete_pods) == ["ling-0-0", "ling-0-1"]


def test_scale_up_then_down_by_whole_groups() -> None:
    world = steady(base_spec(replicas=1))
    world.spec = base_spec(replicas=3)
    plan = world.step()
    assert sorted(p["metadata"]["name"] for p in plan.create_pods) == [
        "ling-1-0",
        "ling-1-1",
        "ling-2-0",
        "ling-2-1",
    ]
    world.kubelet()
    world.converge()
    assert world.status["readyReplicas"] == 3
    world.spec = base_spec(replicas=1)
    plan = world.step()
    assert sorted(plan.delete_pods) == ["ling-1-0", "ling-1-1", "ling-2-0", "ling-2-1"]
    assert [g["index"] for g in stored(plan)["groups"]] == [0]
    assert stored(plan)["replicas"] == 1


def test_events_tell_a_scale_up_from_a_surge_replacement() -> None:
    world = steady(base_spec(replicas=1))
    world.spec = base_spec(replicas=2)
    plan = world.step()
    assert [e.reason for e in plan.events if "creating group" in e.message] == ["ScalingUp"]
    world.kubelet()
    world.converge()
    rollout = {"maxUnavailable": 1, "maxSurge": 1}
    world.spec = base_spec(replicas=2, rollout=rollout)
    world.converge()
    world.spec = base_spec(replicas=2, rollout=rollout, speculative={"enabled": True})
    creations: list[str] = []
    for _ in range(40):
        plan = world.step()
        creations += [e.reason for e in plan.events if "creating group" in e.message]
        world.kubelet()
    assert creations and set(creations) == {"RollingUpdate"}, creations


def test_scale_down_removes_not_ready_groups_first() -> None:
    world = steady(base_spec(replicas=3))
    world.pods["ling-0-0"] = running(world.pods["ling-0-0"])  # group 0 not ready
    world.spec = base_spec(replicas=2)
    plan = world.step()
    assert sorted(plan.delete_pods) == ["ling-0-0", "ling-0-1"]
    assert [g["index"] for g in stored(plan)["groups"]] == [1, 2]


def test_pods_of_an_earlier_object_with_the_same_name_are_never_touched() -> None:
    spec = base_spec()
    stale = [dict(p) for p in group_pods(spec, 0)]
    for pod in stale:
        pod["metadata"] = {**pod["metadata"], "ownerReferences": [{"uid": "old-uid"}]}
    plan = run(spec, {}, stale)
    assert not plan.delete_pods
    assert {p["metadata"]["name"] for p in plan.create_pods} == {"ling-1-0", "ling-1-1"}
    # while they terminate they still hold GPUs: wait instead of over-committing
    plan = run(spec, {}, [terminating(p) for p in stale])
    assert not plan.delete_pods and not plan.create_pods


def test_operator_restart_adopts_running_groups_without_duplicates() -> None:
    world = steady(base_spec(replicas=2))
    plan = run(world.spec, {}, list(world.pods.values()), world.now)  # status lost
    assert not plan.create_pods and not plan.delete_pods
    assert stored(plan)["readyReplicas"] == 2


def test_conditions_keep_transition_time_and_foreign_types() -> None:
    earlier = datetime(2026, 1, 1, tzinfo=UTC)
    prev = [
        Condition(type="Ready", status="True", reason="AllGroupsReady", last_transition_time=earlier),
        Condition(
            type="ScalingActive", status="True", reason="MetricsAvailable", last_transition_time=earlier
        ),
    ]
    merged = conditions.merge(
        prev,
        [
            conditions.condition("Ready", "True", "AllGroupsReady", "1 of 1"),
            conditions.condition("Degraded", "False", "AsExpected", ""),
        ],
        7,
        T0,
    )
    by_type = {c.type: c for c in merged}
    assert by_type["Ready"].last_transition_time == earlier
    assert by_type["Degraded"].last_transition_time == T0
    assert by_type["ScalingActive"] == prev[1]  # another writer's condition, untouched
    assert by_type["Ready"].observed_generation == 7
    assert [c.type for c in merged] == ["Ready", "Degraded", "ScalingActive"]
    flipped = conditions.merge(merged, [conditions.condition("Ready", "False", "GroupsNotReady", "")], 8, T0)
    assert conditions.find(flipped, "Ready").last_transition_time == T0  # type: ignore[union-attr]


def test_invalid_spec_status_names_the_problem() -> None:
    status = reconcile.invalid_spec_status(
        LingDeploymentStatus(), 4, "spec.parallelism.tensor must be divisible", T0
    ).to_k8s()
    (degraded,) = status["conditions"]
    assert (degraded["type"], degraded["status"], degraded["reason"]) == ("Degraded", "True", "InvalidSpec")
    assert "spec.parallelism.tensor" in degraded["message"]
    assert status["observedGeneration"] == 4


def test_forming_message_carries_the_kubelet_waiting_reason() -> None:
    spec = base_spec()
    first = run(spec, {}, [])
    stuck = scheduled(first.create_pods[1])
    stuck["status"]["containerStatuses"] = [
        {"name": "engine", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}
    ]
    plan = run(spec, first.status, [running(first.create_pods[0]), stuck], T0 + timedelta(seconds=3))
    assert group(plan, 0)["phase"] == "Forming"
    assert "rank 1 to start (engine: ImagePullBackOff: not found)" in cond(plan, "RendezvousReady")["message"]


def test_scale_to_zero_removes_every_group() -> None:
    world = steady(base_spec(replicas=2))
    world.spec = base_spec(replicas=0)
    plan = world.step()
    assert sorted(plan.delete_pods) == ["ling-0-0", "ling-0-1", "ling-1-0", "ling-1-1"]
    assert stored(plan)["groups"] == [] and stored(plan)["replicas"] == 0
    assert cond(plan, "Ready")["reason"] == "ScaledToZero"
    world.kubelet()
    assert not world.step().create_pods
