"""The operator's writes: a pass's plan, its one status patch, the autoscaler's /scale, events.

Each write runs on an I/O thread; its reply goes into the cache back on the event loop, so a pass right
after a write never sees the world from before it (no duplicate creates, no missed deletions, no
decision from the status it just replaced: the "expectations" of controller-runtime).

Three rules keep the writes safe when the API or the network misbehaves:
- **Fencing.** Every write first checks, on the thread that sends it, that this replica may still act
  (its Lease renewed within the renew deadline: leader.py) and gets as timeout at most the time until the
  Lease could pass to another replica. The check reads the elector's clock, never the Lease itself, so it
  costs no request. A write refused by the fence raises `Fenced`, which ends the pass.
- **Refusals are data.** A create, delete or patch the API refuses (quota, an admission webhook, RBAC,
  a conflict, a 5xx, no answer) is recorded as a `WriteFailure` naming the cause in the API's words,
  instead of ending the pass: the pass still writes its status, which says why (reconcile
  `with_write_failures`: Degraded with the cause as reason). Each written object backs off on its own
  (1 s, doubling, up to `retry_max`): a pass before an object's retry time skips that write.
- **Gangs go in order.** A group is useful only whole, so the creates of a pass go group by group
  (a group's ranks at once); once a group's create was refused, the creates of later groups wait. A
  quota of 2 pods then completes one group of two instead of starting two half groups that both wait.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException

from ling_operator import metrics, resources
from ling_operator.api import LingDeploymentStatus, Reason
from ling_operator.cache import Cache, Key
from ling_operator.events import Event, event_body
from ling_operator.failures import WriteFailure
from ling_operator.kube import READ_TIMEOUT, Kube, Unreachable, api_message
from ling_operator.pods import ObservedPod
from ling_operator.reconcile import Plan
from ling_operator.resources import Owner
from ling_operator.workqueue import Backoff

log = logging.getLogger("ling_operator")
T = TypeVar("T")

RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


class Fenced(Exception):
    """This replica may not write: its Lease was not renewed within the renew deadline."""


class Fence(Protocol):
    """What the writer asks of the elector (leader.LeaseElector)."""

    def time_left(self) -> float: ...

    def expires_in(self) -> float: ...


class AlwaysLeader:
    """A fence for a single replica without election (tests, embedding)."""

    def time_left(self) -> float:
        return float("inf")

    def expires_in(self) -> float:
        return READ_TIMEOUT


def classify(exc: ApiException) -> tuple[str, str, str]:
    """(reason, code, message) of a refused or unanswered write, from what the API server said."""
    if isinstance(exc, Unreachable):
        return Reason.API_UNREACHABLE, exc.code, _stable(str(exc.reason))
    status, message = int(exc.status or 0), api_message(exc)
    lowered = message.lower()
    if status == 403 and "exceeded quota" in lowered:
        reason = Reason.QUOTA_EXCEEDED
    elif "admission webhook" in lowered:
        reason = Reason.ADMISSION_DENIED
    elif status == 403:
        reason = Reason.FORBIDDEN
    elif status in (400, 422):
        reason = Reason.INVALID_OBJECT
    elif status == 409:
        reason = Reason.WRITE_CONFLICT
    else:  # 429, 5xx, and whatever else the server may answer
        reason = Reason.API_SERVER_ERROR
    return reason, str(status), message


def _stable(message: str) -> str:
    """A connection error's text without the object addresses urllib3 puts in it (status must not
    change with every retry)."""
    return re.sub(r"<[^>]*>:?\s*", "", message).strip() or "no answer"


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


@dataclass
class WriteOutcome:
    """What became of a plan's writes."""

    failures: list[WriteFailure] = field(default_factory=list)  # still failing: refused now or backing off
    retry_in: float | None = None  # seconds until the earliest retry


class Writer:
    def __init__(
        self,
        kube: Kube,
        cache: Cache,
        identity: str,
        io: Executor,
        fence: Fence | None = None,
        retry_max: float = RETRY_MAX_SECONDS,
    ) -> None:
        self.kube, self.cache, self.identity, self.io = kube, cache, identity, io
        self.fence: Fence = fence or AlwaysLeader()
        self.backoff: Backoff[tuple[Key, str]] = Backoff(min(RETRY_BASE_SECONDS, retry_max), retry_max)
        # Per deployment: the writes still failing (by "verb kind/name"), and the creates that wait for an
        # earlier group (pod name -> why). Both feed the next pass (reconcile's `refused`).
        self.failures: dict[Key, dict[str, WriteFailure]] = {}
        self.deferred: dict[Key, dict[str, str]] = {}

    # -- running calls -----------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A read (or anything that is not a write) on an I/O thread."""
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """A write on an I/O thread, fenced there, right before it is sent: `fn(*args, timeout=...)`."""
        return await asyncio.get_running_loop().run_in_executor(self.io, self._fenced, fn, args)

    def _fenced(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self.fence.time_left() <= 0:
            metrics.fenced_writes_total.inc()
            raise Fenced("this replica's Lease was not renewed in time: not writing")
        # Answered before the Lease can pass to a standby, or abandoned (the caller records a failure).
        timeout = max(min(READ_TIMEOUT, self.fence.expires_in()), 0.1)
        return fn(*args, timeout=timeout)

    # -- a plan ------------------------------------------------------------------------------------------

    def refused(self, key: Key) -> dict[str, str]:
        """Pods of `key` whose create the API refused (or that wait for an earlier group): name -> why."""
        out = dict(self.deferred.get(key) or {})
        for failure in (self.failures.get(key) or {}).values():
            if failure.verb == "create" and failure.kind == "pod":
                out[failure.name] = f"{failure.reason}: {failure.message}"
        return out

    def forget_all(self) -> None:
        for key in list(self.failures):
            self.forget(key)
        self.deferred.clear()

    def forget(self, key: Key) -> None:
        for write_id in self.failures.pop(key, {}):
            self.backoff.forget((key, write_id))
        self.deferred.pop(key, None)

    async def apply(self, owner: Owner, plan: Plan, pods: Iterable[ObservedPod] = ()) -> WriteOutcome:
        """The pass's writes: Services, deletes and events at once, creates group by group meanwhile
        (reconcile never creates a name it also deletes, and pods find their Services by DNS with retries).
        Raises `Fenced` when this replica may not write any more."""
        key = (owner.namespace, owner.name)
        memory = self.failures.setdefault(key, {})
        deferred: dict[str, str] = {}
        planned: set[str] = set()
        uids = {p.name: p.uid for p in pods}
        writes = []
        for svc in plan.create_services:
            name = svc["metadata"]["name"]
            planned.add(f"create Service/{name}")
            writes.append(self._create_service(key, owner, svc))
        for name in plan.delete_pods:
            planned.add(f"delete pod/{name}")
            writes.append(self._delete_pod(key, owner, name, uids.get(name)))
        by_group: dict[int, list[dict[str, Any]]] = {}
        for pod in plan.create_pods:
            planned.add(f"create pod/{pod['metadata']['name']}")
            by_group.setdefault(int(pod["metadata"]["labels"][resources.LABEL_GROUP]), []).append(pod)
        writes.append(self._create_groups(key, owner, by_group, deferred))
        writes.append(self.post(owner, plan.events))
        results = await asyncio.gather(*writes, return_exceptions=True)  # every reply lands in the cache
        for result in results:
            if isinstance(result, Fenced):
                raise result
        for result in results:
            if isinstance(result, BaseException):
                raise result
        # A write the plan no longer wants (the spec changed, the pod went away) is no longer failing.
        for write_id in set(memory) - planned:
            del memory[write_id]
            self.backoff.forget((key, write_id))
        if deferred:
            self.deferred[key] = deferred
        else:
            self.deferred.pop(key, None)
        if not memory:
            del self.failures[key]
            return WriteOutcome()
        now = time.monotonic()
        failures = sorted(memory.values(), key=lambda f: (f.verb, f.kind, f.name))
        return WriteOutcome(failures, max(min(f.retry_at for f in failures) - now, 0.1))

    async def _attempt(
        self, key: Key, write_id: str, group: int | None, fn: Callable[..., T], *args: Any
    ) -> tuple[bool, T | None]:
        """(done, reply) of one write; a refusal is recorded, a write still backing off is skipped."""
        memory = self.failures.setdefault(key, {})
        failure = memory.get(write_id)
        if failure is not None and failure.retry_at > time.monotonic():
            return False, None
        try:
            reply = await self.write(fn, *args)
        except ApiException as exc:
            reason, code, message = classify(exc)
            delay = self.backoff.failed((key, write_id))
            verb, _, rest = write_id.partition(" ")
            kind, _, name = rest.partition("/")
            memory[write_id] = WriteFailure(
                verb, kind, name, reason, code, message, group, time.monotonic() + delay
            )
            metrics.write_failures_total.labels(reason).inc()
            log.warning(
                "%s/%s: cannot %s %s %s (%s, HTTP %s; next try in %.0f s): %s",
                key[0], key[1], verb, kind, name, reason, code, delay, message,
            )  # fmt: skip
            return False, None
        if memory.pop(write_id, None) is not None:
            self.backoff.forget((key, write_id))
        return True, reply

    async def _create_service(self, key: Key, owner: Owner, svc: dict[str, Any]) -> None:
        name = svc["metadata"]["name"]
        log.info("%s/%s: creating Service %s", owner.namespace, owner.name, name)
        done, _ = await self._attempt(
            key, f"create Service/{name}", None, self.kube.create_service, owner.namespace, svc
        )
        if done:
            self.cache.add_service(key, name)

    async def _delete_pod(self, key: Key, owner: Owner, name: str, uid: str | None) -> None:
        log.info("%s/%s: deleting pod %s", owner.namespace, owner.name, name)
        done, accepted = await self._attempt(
            key, f"delete pod/{name}", None, self.kube.delete_pod, owner.namespace, name, uid
        )
        if done and accepted:
            self.cache.mark_deleting(key, name)
        elif done:
            # Already gone (or replaced: the successor has another uid and stays).
            self.cache.drop_pod(key, name, uid)

    async def _create_groups(
        self, key: Key, owner: Owner, by_group: dict[int, list[dict[str, Any]]], deferred: dict[str, str]
    ) -> None:
        blocked: int | None = None
        for g in sorted(by_group):
            if blocked is not None:
                why = f"waits for group {blocked}, whose pods the API refused"
                deferred.update({pod["metadata"]["name"]: why for pod in by_group[g]})
                continue
            results = await asyncio.gather(*(self._create_pod(key, owner, g, pod) for pod in by_group[g]))
            if not all(results):
                blocked = g

    async def _create_pod(self, key: Key, owner: Owner, group: int, pod: dict[str, Any]) -> bool:
        name = pod["metadata"]["name"]
        log.info("%s/%s: creating pod %s", owner.namespace, owner.name, name)
        done, created = await self._attempt(
            key, f"create pod/{name}", group, self.kube.create_pod, owner.namespace, pod
        )
        if created is not None:
            self.cache.put_pod(created)
        return done

    async def post(self, owner: Owner, events: Iterable[Event]) -> None:
        posts = [self._post(owner, event) for event in events]
        await asyncio.gather(*posts)

    async def _post(self, owner: Owner, event: Event) -> None:
        log.info("%s/%s: %s: %s", owner.namespace, owner.name, event.reason, event.message)
        body = event_body(
            owner.name, owner.namespace, owner.uid, event, instance=self.identity, now=datetime.now(UTC)
        )
        try:
            await self.write(self.kube.create_event, owner.namespace, body)
        except ApiException as exc:
            log.warning(
                "%s/%s: cannot post event %s: %s", owner.namespace, owner.name, event.reason, exc.reason
            )

    async def patch_status(
        self,
        owner: Owner,
        stored: Mapping[str, Any],
        status: LingDeploymentStatus,
        resource_version: int | None = None,
    ) -> None:
        """One merge patch of what differs from the stored status; nothing at all in steady state. With
        `resource_version`, only onto that version of the object (a 409 ApiException otherwise)."""
        patch = merge_patch(stored, status.to_k8s())
        if not patch:
            return
        updated = await self.write(
            self.kube.patch_status, owner.namespace, owner.name, patch, resource_version
        )
        # The next pass must start from this status, not from the one the watch has not replaced yet.
        self.cache.put_deployment(updated)

    async def scale(self, owner: Owner, replicas: int) -> None:
        log.info("%s/%s: autoscaler sets spec.replicas to %d", owner.namespace, owner.name, replicas)
        self.cache.put_deployment(await self.write(self.kube.scale, owner.namespace, owner.name, replicas))

    def secret_reader(self, namespace: str) -> Callable[[str, str], str]:
        """Reads a key of a Secret in `namespace` (blocking: call it on an I/O thread)."""
        return lambda name, key: self.kube.read_secret(namespace, name, key)
