"""The operator's writes: a pass's plan, its one status patch, the autoscaler's /scale, events.

Each write runs on an I/O thread; its reply goes into the cache back on the event loop, so a pass right
after a write never sees the world from before it (no duplicate creates, no missed deletions, no
decision from the status it just replaced: the "expectations" of controller-runtime).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException

from ling_operator.api import LingDeploymentStatus
from ling_operator.cache import Cache
from ling_operator.events import Event, event_body
from ling_operator.kube import Kube
from ling_operator.reconcile import Plan
from ling_operator.resources import Owner

log = logging.getLogger("ling_operator")
T = TypeVar("T")


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys, null for removed ones,
    objects diffed key by key, lists replaced whole. Empty when nothing changed (no write)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or before != value:
            patch[key] = value
    patch.update({key: None for key in old if key not in new})
    return patch


class Writer:
    def __init__(self, kube: Kube, cache: Cache, identity: str, io: Executor) -> None:
        self.kube, self.cache, self.identity, self.io = kube, cache, identity, io

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def apply(self, owner: Owner, plan: Plan) -> None:
        """The pass's writes, all at once: they are independent (reconcile never creates a name it also
        deletes, and pods find their Services by DNS with retries)."""
        writes = [self._create_service(owner, svc) for svc in plan.create_services]
        writes += [self._delete_pod(owner, name) for name in plan.delete_pods]
        writes += [self._create_pod(owner, pod) for pod in plan.create_pods]
        writes += [self.post(owner, plan.events)]
        results = await asyncio.gather(*writes, return_exceptions=True)  # every one lands in the cache
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _create_service(self, owner: Owner, svc: dict[str, Any]) -> None:
        name = svc["metadata"]["name"]
        log.info("%s/%s: creating Service %s", owner.namespace, owner.name, name)
        await self.call(self.kube.create_service, owner.namespace, svc)
        self.cache.add_service((owner.namespace, owner.name), name)

    async def _delete_pod(self, owner: Owner, name: str) -> None:
        log.info("%s/%s: deleting pod %s", owner.namespace, owner.name, name)
        key = (owner.namespace, owner.name)
        if await self.call(self.kube.delete_pod, owner.namespace, name):
            self.cache.mark_deleting(key, name)
        else:
            self.cache.drop_pod(key, name, None)  # already gone

    async def _create_pod(self, owner: Owner, pod: dict[str, Any]) -> None:
        log.info("%s/%s: creating pod %s", owner.namespace, owner.name, pod["metadata"]["name"])
        created = await self.call(self.kube.create_pod, owner.namespace, pod)
        if created is not None:
            self.cache.put_pod(created)

    async def post(self, owner: Owner, events: Iterable[Event]) -> None:
        posts = [self._post(owner, event) for event in events]
        await asyncio.gather(*posts)

    async def _post(self, owner: Owner, event: Event) -> None:
        log.info("%s/%s: %s: %s", owner.namespace, owner.name, event.reason, event.message)
        body = event_body(
            owner.name, owner.namespace, owner.uid, event, instance=self.identity, now=datetime.now(UTC)
        )
        try:
            await self.call(self.kube.create_event, owner.namespace, body)
        except ApiException as exc:
            log.warning(
                "%s/%s: cannot post event %s: %s", owner.namespace, owner.name, event.reason, exc.reason
            )

    async def patch_status(
        self, owner: Owner, stored: Mapping[str, Any], status: LingDeploymentStatus
    ) -> None:
        """One merge patch of what differs from the stored status; nothing at all in steady state."""
        patch = merge_patch(stored, status.to_k8s())
        if not patch:
            return
        updated = await self.call(self.kube.patch_status, owner.namespace, owner.name, patch)
        # The next pass must start from this status, not from the one the watch has not replaced yet.
        self.cache.put_deployment(updated)

    async def scale(self, owner: Owner, replicas: int) -> None:
        log.info("%s/%s: autoscaler sets spec.replicas to %d", owner.namespace, owner.name, replicas)
        self.cache.put_deployment(await self.call(self.kube.scale, owner.namespace, owner.name, replicas))

    def secret_reader(self, namespace: str) -> Callable[[str, str], str]:
        """Reads a key of a Secret in `namespace` (blocking: call it on an I/O thread)."""
        return lambda name, key: self.kube.read_secret(namespace, name, key)
