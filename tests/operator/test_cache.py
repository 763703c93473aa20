"""The operator's watch cache: what a pass reads instead of GET/LIST, how our own writes and stale or
reordered watch events update it, and what it keeps of each object (cache.Cache)."""

from __future__ import annotations

from typing import Any

from ling_operator import resources
from ling_operator.cache import Cache
from podstate import OWNER, base_spec, ready


def pod(name: str, uid: str, rv: int, phase: str = "Pending", deployment: str = "d") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": str(rv),
            "labels": {resources.LABEL_DEPLOYMENT: deployment},
        },
        "status": {"phase": phase},
    }


def deployment(rv: int, generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "d",
            "namespace": "ns",
            "uid": "u",
            "resourceVersion": str(rv),
            "generation": generation,
        },
        "spec": {"model": {"source": {"builtin": {}}}, "engine": {"device": "cpu"}, **spec},
    }


def test_stale_events_do_not_replace_newer_objects() -> None:
    cache = Cache()
    cache.put_pod(pod("d-0-0", "u1", 10, "Running"))
    cache.put_pod(pod("d-0-0", "u1", 7, "Pending"))  # an older event arriving late
    _, pods, _ = cache.snapshot(("ns", "d"))
    assert [p.phase for p in pods] == ["Running"]


def test_deleted_event_of_old_pod_keeps_its_successor() -> None:
    cache = Cache()
    cache.put_pod(pod("d-0-0", "new", 20))
    cache.drop_pod(("ns", "d"), "d-0-0", "old")
    assert [p.uid for p in cache.snapshot(("ns", "d"))[1]] == ["new"]
    cache.drop_pod(("ns", "d"), "d-0-0", "new")
    assert cache.snapshot(("ns", "d"))[1] == []
    cache.put_pod(pod("d-0-0", "new", 21))  # a LIST from before the deletion must not bring it back
    assert cache.snapshot(("ns", "d"))[1] == []


def test_our_delete_shows_the_pod_terminating_until_the_watch_drops_it() -> None:
    cache = Cache()
    cache.put_pod(pod("d-0-0", "u1", 5, "Running"))
    cache.mark_deleting(("ns", "d"), "d-0-0")
    (seen,) = cache.snapshot(("ns", "d"))[1]
    assert seen.terminating
    cache.put_pod(pod("d-0-0", "u1", 4))  # stale event: still terminating
    assert cache.snapshot(("ns", "d"))[1][0].terminating


def test_deployment_status_from_our_patch_reply_wins_over_a_late_event() -> None:
    cache = Cache()
    cache.put_deployment({**deployment(3), "status": {"replicas": 1}})
    cache.put_deployment({**deployment(2), "status": {}})
    record = cache.snapshot(("ns", "d"))[0]
    assert record is not None and record.status == {"replicas": 1}
    cache.drop_deployment(("ns", "d"), "u")
    assert cache.snapshot(("ns", "d"))[0] is None
    assert cache.deployment_keys() == []


def test_the_spec_is_validated_once_per_generation() -> None:
    cache = Cache()
    cache.put_deployment(deployment(1))
    first = cache.snapshot(("ns", "d"))[0]
    cache.put_deployment({**deployment(2), "status": {"replicas": 1}})  # a status write: same generation
    second = cache.snapshot(("ns", "d"))[0]
    assert first is not None and second is not None and second.status == {"replicas": 1}
    assert second.spec is first.spec  # the same validated object: not validated again
    cache.put_deployment(deployment(3, generation=2, replicas=3))
    third = cache.snapshot(("ns", "d"))[0]
    assert third is not None and third.spec is not None and third.spec.replicas == 3


def test_a_spec_the_operator_refuses_is_kept_with_the_reason() -> None:
    cache = Cache()
    cache.put_deployment(deployment(1, parallelism={"tensor": 4, "gpusPerPod": 3}))
    record = cache.snapshot(("ns", "d"))[0]
    assert record is not None and record.spec is None and "gpusPerPod" in (record.spec_error or "")


def test_a_pod_is_kept_as_the_fields_the_decisions_read() -> None:
    spec = base_spec()
    full = ready(resources.build_pod(OWNER, spec, 0, 1))
    full["metadata"].update(
        {
            "namespace": "serving",
            "uid": "p1",
            "resourceVersion": "9",
            "managedFields": [{"manager": "x"} for _ in range(50)],
        }
    )
    cache = Cache()
    cache.put_pod(full)
    (kept,) = cache.snapshot(("serving", "ling"))[1]
    assert (kept.name, kept.group, kept.rank, kept.node, kept.ip) == ("ling-0-1", 0, 1, "gpu-0", "10.0.0.1")
    assert kept.ready and kept.scheduled and kept.failure is None
    assert kept.revision == resources.revision_of(spec) and kept.owner_uids == (OWNER.uid,)
    assert not hasattr(kept, "__dict__")  # slots: no per-pod dict, no copy of the pod's spec


def test_relist_drops_what_the_watch_missed_and_keeps_what_is_newer() -> None:
    cache = Cache()
    cache.put_pod(pod("d-0-0", "gone", 5))
    cache.put_pod(pod("d-0-1", "fresh", 30))
    cache.relist_pods([pod("d-1-0", "listed", 10)], list_rv=20, ns="ns")
    assert sorted(p.uid for p in cache.snapshot(("ns", "d"))[1]) == ["fresh", "listed"]


def test_the_echo_of_our_own_write_is_not_news() -> None:
    cache = Cache()
    assert cache.put_pod(pod("d-0-0", "u1", 5))  # our create's reply
    assert not cache.put_pod(pod("d-0-0", "u1", 5))  # the watch's ADDED of the same version: no pass
    assert cache.put_pod(pod("d-0-0", "u1", 6, "Running"))  # the kubelet's update: a pass
    assert not cache.put_pod(pod("d-0-0", "u1", 4))  # stale
    assert cache.put_deployment(deployment(3))
    assert not cache.put_deployment(deployment(3))
    assert cache.put_deployment(deployment(4))
