"""The pure side of issue 18: status that is no command, refused creates, pending reasons in the
scheduler's and kubelet's words, rendezvous times from the pods' own clocks, refused writes in status,
and the small shell pieces (classification, backoff, metrics) that need no API server."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from ling_operator import metrics, reconcile
from ling_operator.api import LingDeploymentStatus
from ling_operator.failures import WriteFailure
from ling_operator.kube import Unreachable
from ling_operator.pods import ObservedPod, scheduling_reason
from ling_operator.workqueue import Backoff
from ling_operator.writes import classify
from podstate import OWNER, base_spec, group_pods, observed, pending, ready, running, scheduled, waiting
from prometheus_client import generate_latest
from test_reconcile import SERVICES, T0, World, cond, group, run, steady, stored


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def hostile(world: World, index: int, **fields: Any) -> dict[str, Any]:
    """The stored status with group `index` edited by someone else."""
    status = json.loads(json.dumps(world.status))
    entry = next(g for g in status["groups"] if g["index"] == index)
    entry.update(fields)
    return status


# ---------------------------------------------------------------------------------------------------------
# Status is no command.


@pytest.mark.parametrize("shift", [timedelta(hours=1), -timedelta(hours=1), timedelta(0)])
def test_a_restarting_phase_written_on_a_healthy_group_deletes_nothing(shift: timedelta) -> None:
    world = steady(base_spec(replicas=2))
    edited = hostile(world, 0, phase="Restarting", lastRestartTime=stamp(world.now + shift), restarts=5)
    plan = run(world.spec, edited, list(world.pods.values()), world.now)
    assert not plan.delete_pods and not plan.create_pods and not plan.restarted_groups
    assert group(plan, 0)["phase"] == "Ready"
    assert group(plan, 0)["lastRestartTime"] <= stamp(world.now)  # a time in the future counts as now
    assert [e.reason for e in plan.events if e.type == "Warning"] == []
    assert cond(plan, "Ready")["status"] == "True"


def test_a_failed_phase_written_on_a_healthy_group_is_not_kept() -> None:
    world = steady(base_spec(failurePolicy={"restartGroup": False}))
    plan = run(world.spec, hostile(world, 0, phase="Failed"), list(world.pods.values()), world.now)
    assert group(plan, 0)["phase"] == "Ready" and not plan.delete_pods


def test_a_restart_in_progress_still_goes_on_while_the_pods_show_it() -> None:
    world = steady(base_spec(replicas=1))
    del world.pods["ling-0-1"]  # rank 1 went away, rank 0 is still there: the restart was interrupted
    edited = hostile(world, 0, phase="Restarting", lastRestartTime=stamp(world.now), backoffSeconds=10)
    plan = run(world.spec, edited, list(world.pods.values()), world.now)
    assert plan.delete_pods == ["ling-0-0"]
    assert not plan.restarted_groups  # the same restart, not a new one


def test_a_backoff_written_in_the_future_or_beyond_the_maximum_waits_at_most_the_maximum() -> None:
    world = steady(base_spec(replicas=1, failurePolicy={"maxBackoffSeconds": 60}))
    world.pods.clear()  # the group's pods are gone: it waits out its backoff
    edited = hostile(
        world,
        0,
        phase="Restarting",
        lastRestartTime=stamp(world.now + timedelta(days=30)),
        backoffSeconds=10**6,
    )
    plan = run(world.spec, edited, [], world.now)
    assert not plan.create_pods and plan.requeue_after is not None and plan.requeue_after <= 60
    later = run(world.spec, stored(plan), [], world.now + timedelta(seconds=61))
    assert sorted(p["metadata"]["name"] for p in later.create_pods) == ["ling-0-0", "ling-0-1"]


def test_the_rendezvous_deadline_comes_from_the_pods_not_from_an_edited_forming_since() -> None:
    spec = base_spec(failurePolicy={"rendezvousTimeoutSeconds": 60})
    first = run(spec, {}, [])
    pods = [running(first.create_pods[0], at=T0), scheduled(first.create_pods[1], at=T0)]
    forming = run(spec, first.status, pods, T0 + timedelta(seconds=1))
    assert group(forming, 0)["formingSince"] == stamp(T0)  # the scheduler's time, not the pass's
    status = stored(forming)
    status["groups"][0]["formingSince"] = stamp(T0 - timedelta(hours=1))  # edited
    assert not run(spec, status, pods, T0 + timedelta(seconds=30)).delete_pods
    assert run(spec, status, pods, T0 + timedelta(seconds=62)).delete_pods == ["ling-0-0", "ling-0-1"]


def test_rendezvous_time_is_the_pods_own_not_the_operators_outage() -> None:
    spec = base_spec()
    first = run(spec, {}, [])
    placed, joined = T0 + timedelta(seconds=2), T0 + timedelta(seconds=9)
    pods = [ready(p, at=placed, ready_at=joined) for p in first.create_pods]
    # The operator looks again only an hour later (it was down): the group took 7 s all the same.
    plan = run(spec, first.status, pods, T0 + timedelta(hours=1))
    assert plan.rendezvous_seconds == [7]
    assert any(e.reason == "GroupReady" and e.message.endswith("joined in 7 s") for e in plan.events)


# ---------------------------------------------------------------------------------------------------------
# Refused creates: the group waits, it is not restarted.


def test_a_rank_whose_create_was_refused_is_waited_for_not_counted_lost() -> None:
    spec = base_spec(replicas=1)
    first = run(spec, {}, [])
    pods = [ready(first.create_pods[0])]  # rank 0 admitted and running, rank 1 refused
    why = 'QuotaExceeded: pods "ling-0-1" is forbidden: exceeded quota: pods, limited: pods=1'
    plan = reconcile.reconcile(
        OWNER, 1, spec, first.status, observed(pods), SERVICES, T0 + timedelta(seconds=5),
        refused={"ling-0-1": why},
    )  # fmt: skip
    assert not plan.delete_pods and not plan.restarted_groups
    assert [p["metadata"]["name"] for p in plan.create_pods] == ["ling-0-1"]  # retried (the writer backs off)
    assert group(plan, 0)["phase"] == "Pending"
    prog = cond(plan, "Progressing")
    assert prog["reason"] == "PodsNotAdmitted"
    assert prog["message"] == f"group 0: rank 1 not admitted: {why}"
    assert plan.waiting == {"PodsNotAdmitted": 1}
    # Without the refusal it is a lost rank of a started group: the group restarts (as before).
    lost = run(spec, first.status, pods, T0 + timedelta(seconds=5))
    assert lost.restarted_groups == [0]


# ---------------------------------------------------------------------------------------------------------
# Pending reasons in the scheduler's and kubelet's words.


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ('0/6 nodes are available: persistentvolumeclaim "weights" not found. not found', "WaitingForVolume"),
        ("0/6 nodes are available: pod has unbound immediate PersistentVolumeClaims.", "WaitingForVolume"),
        ("0/6 nodes are available: 6 Insufficient nvidia.com/gpu. preemption: ...", "WaitingForGPUs"),
        (
            "0/6 nodes are available: 2 Insufficient nvidia.com/gpu, 4 node(s) didn't match Pod's node "
            "affinity/selector.",
            "WaitingForGPUs",
        ),
        ("0/6 nodes are available: 6 node(s) didn't match Pod's node affinity/selector.", "NoMatchingNode"),
        ("0/6 nodes are available: 6 node(s) had untolerated taint {gpu: true}.", "NoMatchingNode"),
        ("0/6 nodes are available: 6 Insufficient memory.", "Unschedulable"),
    ],
)
def test_scheduling_reasons(message: str, reason: str) -> None:
    assert scheduling_reason(message) == reason


def pending_plan(settle: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> reconcile.Plan:
    """A pass after the first one created group 0, with its pods as `settle` makes them."""
    spec = base_spec()
    first = run(spec, {}, [])
    return run(spec, first.status, settle(first.create_pods), T0 + timedelta(seconds=5))


def test_a_missing_pvc_is_not_a_gpu_shortage() -> None:
    msg = '0/6 nodes are available: persistentvolumeclaim "weights" not found. not found'
    plan = pending_plan(lambda created: [pending(p, msg) for p in created])
    prog = cond(plan, "Progressing")
    assert prog["reason"] == "WaitingForVolume"
    assert prog["message"] == f"group 0: waiting for a volume for ranks 0, 1: {msg}"
    assert "GPUs" not in cond(plan, "Ready")["message"]
    assert plan.waiting == {"WaitingForVolume": 1}


@pytest.mark.parametrize(
    ("kubelet_reason", "reason"),
    [("ErrImagePull", "ImagePullFailed"), ("ImagePullBackOff", "ImagePullFailed"),
     ("CreateContainerConfigError", "ContainerConfigError")],
)  # fmt: skip
def test_containers_the_kubelet_cannot_start_are_named(kubelet_reason: str, reason: str) -> None:
    plan = pending_plan(
        lambda created: [running(created[0]), waiting(created[1], kubelet_reason, "no such image x:1")]
    )
    assert group(plan, 0)["phase"] == "Forming"
    prog = cond(plan, "Progressing")
    assert prog["reason"] == reason
    assert f"engine: {kubelet_reason}: no such image x:1" in prog["message"]
    assert plan.waiting == {reason: 1}


def test_pods_record_the_scheduler_and_kubelet_times() -> None:
    spec = base_spec()
    (pod, _) = group_pods(spec, 0, ready, at=T0, ready_at=T0 + timedelta(seconds=3))
    pod["metadata"]["creationTimestamp"] = stamp(T0 - timedelta(seconds=1))
    seen = ObservedPod.from_k8s(pod)
    assert (seen.created_at, seen.scheduled_at, seen.ready_at) == (
        T0 - timedelta(seconds=1), T0, T0 + timedelta(seconds=3),
    )  # fmt: skip
    assert seen.placed_at == T0 and seen.stuck is None


# ---------------------------------------------------------------------------------------------------------
# Refused writes in status.


def failure(reason: str, name: str = "ling-0-1", message: str = "exceeded quota: pods") -> WriteFailure:
    return WriteFailure("create", "pod", name, reason, "403", message)


def test_refused_writes_become_degraded_and_keep_their_transition_time() -> None:
    world = steady(base_spec(replicas=1))
    status = LingDeploymentStatus.model_validate(world.status)
    failures = [failure("QuotaExceeded"), failure("QuotaExceeded", "ling-0-0")]
    first = reconcile.with_write_failures(status, status.conditions, failures, 1, T0)
    degraded = first.condition("Degraded")
    assert degraded is not None and (degraded.status, degraded.reason) == ("True", "QuotaExceeded")
    assert degraded.message == (
        "cannot create pod ling-0-0: exceeded quota: pods; cannot create pod ling-0-1: exceeded quota: pods"
    )
    # The next pass computes Degraded=False again before the writes fail again: the stored one stands.
    again = reconcile.with_write_failures(status, first.conditions, failures, 1, T0 + timedelta(minutes=5))
    assert again.condition("Degraded") == degraded
    assert reconcile.with_write_failures(status, status.conditions, [], 1, T0) is status


def test_the_cause_a_person_fixes_first_names_degraded() -> None:
    status = LingDeploymentStatus()
    mixed = [failure("APIUnreachable", "a"), failure("AdmissionDenied", "b"), failure("QuotaExceeded", "c")]
    degraded = reconcile.with_write_failures(status, [], mixed, 1, T0).condition("Degraded")
    assert degraded is not None and degraded.reason == "AdmissionDenied"


def api_error(status: int, message: str) -> ApiException:
    exc = ApiException(status=status, reason="Forbidden")
    exc.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return exc


@pytest.mark.parametrize(
    ("status", "message", "reason"),
    [
        (403, 'pods "a" is forbidden: exceeded quota: q, requested: pods=1, used: pods=0, limited: pods=0',
         "QuotaExceeded"),
        (400, 'admission webhook "deny.example.com" denied the request: no GPUs on Sundays', "AdmissionDenied"),
        (403, 'pods is forbidden: User "system:serviceaccount:x:y" cannot create resource "pods"', "Forbidden"),
        (422, 'Pod "a" is invalid: spec.containers[0].image: Required value', "InvalidObject"),
        (409, "Operation cannot be fulfilled: the object has been modified", "WriteConflict"),
        (500, "etcdserver: request timed out", "APIServerError"),
        (429, "storage is (re)initializing", "APIServerError"),
    ],
)  # fmt: skip
def test_classify_names_the_cause_in_the_api_servers_words(status: int, message: str, reason: str) -> None:
    assert classify(api_error(status, message)) == (reason, str(status), message)


def test_no_answer_is_api_unreachable_with_a_message_that_does_not_change_per_retry() -> None:
    exc = Unreachable(
        "connection", "<urllib3.connection.HTTPSConnection object at 0x7f12>: Failed to connect"
    )
    assert classify(exc) == ("APIUnreachable", "connection", "connection: Failed to connect")


def test_backoff_doubles_per_item_up_to_the_maximum_and_forgets_on_success() -> None:
    backoff: Backoff[str] = Backoff(1, 10)
    assert [backoff.failed("a") for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    assert backoff.failed("b") == 1  # per item
    backoff.forget("a")
    assert backoff.failed("a") == 1


def test_groups_waiting_keeps_only_the_reasons_of_the_last_pass() -> None:
    metrics.set_waiting("ns", "d", {"WaitingForGPUs": 2, "ImagePullFailed": 1})
    metrics.set_waiting("ns", "d", {"ImagePullFailed": 1})
    text = generate_latest(metrics.REGISTRY).decode()
    assert 'ling_operator_groups_waiting{deployment="d",namespace="ns",reason="ImagePullFailed"} 1.0' in text
    assert 'reason="WaitingForGPUs"' not in text
    metrics.forget_deployment("ns", "d")
    assert 'ling_operator_groups_waiting{deployment="d"' not in generate_latest(metrics.REGISTRY).decode()
