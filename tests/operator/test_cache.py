"""The operator's watch cache: what a pass reads instead of GET/LIST, and how our own writes and stale
or reordered watch events update it (handlers.Cache)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ling_operator import handlers, reconcile, resources


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


def test_stale_events_do_not_replace_newer_objects() -> None:
    cache = handlers.Cache()
    cache.put_pod(pod("d-0-0", "u1", 10, "Running"))
    cache.put_pod(pod("d-0-0", "u1", 7, "Pending"))  # an older event arriving late
    _, pods, _ = cache.snapshot(("ns", "d"))
    assert [p["status"]["phase"] for p in pods] == ["Running"]


def test_deleted_event_of_old_pod_keeps_its_successor() -> None:
    cache = handlers.Cache()
    cache.put_pod(pod("d-0-0", "new", 20))
    cache.drop_pod(("ns", "d"), "d-0-0", "old")
    assert [p["metadata"]["uid"] for p in cache.snapshot(("ns", "d"))[1]] == ["new"]
    cache.drop_pod(("ns", "d"), "d-0-0", "new")
    assert cache.snapshot(("ns", "d"))[1] == []
    cache.put_pod(pod("d-0-0", "new", 21))  # a LIST from before the deletion must not bring it back
    assert cache.snapshot(("ns", "d"))[1] == []


def test_our_delete_shows_the_pod_terminating_until_the_watch_drops_it() -> None:
    cache = handlers.Cache()
    cache.put_pod(pod("d-0-0", "u1", 5, "Running"))
    cache.mark_deleting(("ns", "d"), "d-0-0", datetime(2026, 1, 1, tzinfo=UTC))
    (seen,) = cache.snapshot(("ns", "d"))[1]
    assert reconcile.is_terminating(seen)
    cache.put_pod(pod("d-0-0", "u1", 4))  # stale event: still terminating
    assert reconcile.is_terminating(cache.snapshot(("ns", "d"))[1][0])


def test_deployment_status_from_our_patch_reply_wins_over_a_late_event() -> None:
    cache = handlers.Cache()
    body = {"metadata": {"name": "d", "namespace": "ns", "uid": "u", "resourceVersion": "3"}}
    cache.put_deployment({**body, "status": {"replicas": 1}})
    cache.put_deployment({**body, "metadata": {**body["metadata"], "resourceVersion": "2"}, "status": {}})
    assert cache.snapshot(("ns", "d"))[0]["status"] == {"replicas": 1}  # type: ignore[index]
    cache.drop_deployment(("ns", "d"), "u")
    assert cache.snapshot(("ns", "d"))[0] is None
    assert cache.deployment_keys() == []
