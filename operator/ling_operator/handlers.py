"""kopf wiring: kopf watches LingDeployments and the operator's pods; each event feeds the cache and
queues the deployment's key for the controller (controller.py), which travels in kopf's memo (cli.py).

kopf only watches here (`on.event` handlers keep no state on the objects: no finalizers, no
annotations), so two replicas can watch side by side; only the Lease holder (leader.py) acts.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import kopf

from ling_operator import api, metrics, resources
from ling_operator.controller import Controller


class _NoDiffBase(kopf.DiffBaseStorage):
    """kopf keeps, per object, the "essence" it last handled, for on.create/on.update handlers to diff
    against; building it deep-copies the object at every event. The operator has no such handlers (kopf
    only watches here), so it keeps none: at 100 deployments that copy was a sixth of the operator's CPU."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class _NoProgress(kopf.ProgressStorage):
    """Nor does it keep handler progress on the objects (only change handlers have any)."""

    def fetch(self, *, key: Any, body: kopf.Body) -> None:
        return None

    def store(self, *, key: Any, record: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        return None

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return essence


def count_watch_restarts() -> bool:
    """Count each watch stream kopf opens again after its first (`ling_operator_watch_restarts_total`).

    kopf runs the watches (LIST, then WATCH, reconnecting on errors, timeouts and silence) and offers no
    hook for it, so its one function that opens a watch request is wrapped; with a kopf that has no such
    function the metric stays empty and a warning says so. True when the wrapper is in place."""
    try:
        from kopf._cogs.clients import watching
    except ImportError:
        watching = None
    original: Callable[..., AsyncIterator[Any]] | None = getattr(watching, "watch_objs", None)
    if original is None:
        logging.getLogger("ling_operator").warning(
            "this kopf has no watch_objs: watch restarts are not counted"
        )
        return False
    if getattr(original, "_ling_counted", False):
        return True
    opened: set[tuple[str, str | None]] = set()

    def watch_objs(*, resource: Any, namespace: str | None, **kw: Any) -> AsyncIterator[Any]:
        plural = str(getattr(resource, "plural", resource))
        if (plural, namespace) in opened:
            metrics.watch_restarts_total.labels(plural).inc()
        opened.add((plural, namespace))
        assert original is not None
        return original(resource=resource, namespace=namespace, **kw)

    watch_objs._ling_counted = True  # type: ignore[attr-defined]
    watching.watch_objs = watch_objs  # type: ignore[union-attr]
    return True


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # We write our own events; kopf must not post its handler logs as events from both replicas.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    # Every request has a timeout (issue 18): kopf's own (LISTs) and its watch connections. A silent
    # watch is reopened after kopf's inactivity timeout (70 s; the API server sends bookmarks meanwhile).
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.watching.connect_timeout = 10
    settings.watching.client_timeout = settings.watching.server_timeout + 60
    count_watch_restarts()
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.persistence.progress_storage = _NoProgress()
    await memo["controller"].start()


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo["controller"].stop()


# Async on purpose: kopf runs sync handlers in threads, and the cache and the queue belong to the event
# loop. The raw watch event goes into the cache (type None: kopf's initial listing); the deployment is
# queued when the event told the cache something new.
@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def _deployment_event(
    event: Mapping[str, Any], name: str, namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    controller: Controller = memo["controller"]
    obj = event.get("object") or {}
    if event.get("type") == "DELETED":
        controller.cache.drop_deployment((namespace, name), (obj.get("metadata") or {}).get("uid"))
        metrics.forget_deployment(namespace, name)
        return
    if controller.cache.put_deployment(obj):
        controller.queue.add((namespace, name))


@kopf.on.event("", "v1", "pods", labels={resources.LABEL_MANAGED_BY: resources.MANAGED_BY})
async def _pod_event(
    event: Mapping[str, Any], name: str, labels: Mapping[str, str], namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    controller: Controller = memo["controller"]
    deployment = labels.get(resources.LABEL_DEPLOYMENT)
    if not deployment:
        return
    key = (namespace, deployment)
    obj = event.get("object") or {}
    if event.get("type") == "DELETED":
        controller.cache.drop_pod(key, name, (obj.get("metadata") or {}).get("uid"))
        controller.queue.add(key)
    elif controller.cache.put_pod(obj):
        controller.queue.add(key)


@kopf.on.probe(id="leader")
def _leader_probe(memo: kopf.Memo, **_: Any) -> bool:
    return bool(memo["controller"].elector.is_leader)
