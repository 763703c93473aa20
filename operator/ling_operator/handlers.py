"""Thin kopf wiring: watch events -> a work queue -> reconcile/autoscale -> API writes.

kopf only watches here (`on.event` handlers keep no state on the objects: no finalizers, no
annotations), so two replicas can watch side by side; only the Lease holder (leader.py) writes.
Every event of a LingDeployment or of one of its pods updates an in-memory cache (fed by the watch
streams kopf already runs) and enqueues that deployment's key. A few workers take distinct keys (never
two on one key), read the object and its pods from the cache, ask reconcile.py what to do, apply it
(the pass's writes concurrently, one status patch), and ask to be woken again when a timer matters
(backoff end, rendezvous deadline, autoscaling interval). Our own writes go into the cache from the API's
replies, so a pass right after a write never sees the world from before it (no duplicate creates, no
missed deletions). A periodic resync enqueues every cached deployment without reading the API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ling_operator import api, autoscale_controller, metrics, reconcile, resources
from ling_operator.leader import LeaseElector

log = logging.getLogger("ling_operator")

Key = tuple[str, str]  # (namespace, name)
STATUS_KEYS = (
    "observedGeneration",
    "replicas",
    "readyReplicas",
    "updatedReplicas",
    "desiredReplicas",
    "selector",
    "podsPerGroup",
    "groups",
    "conditions",
)


@dataclass
class Settings:
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    kubeconfig: str | None = None
    default_image: str = resources.DEFAULT_RUNTIME_IMAGE
    lease_name: str = "ling-operator"
    lease_namespace: str = "default"
    lease_duration: float = 15.0
    identity: str = "ling-operator"
    resync_seconds: float = 30.0
    workers: int = 4  # distinct deployments reconciled at once; the API round trips dominate, not CPU


def resource_version(obj: Mapping[str, Any]) -> int | None:
    """resourceVersion as a number, or None. The API calls it opaque, but every etcd-backed server
    hands out increasing integers, and informers compare them the same way to drop stale events."""
    try:
        return int(obj.get("metadata", {}).get("resourceVersion") or "")
    except ValueError:
        return None


def is_newer(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> bool:
    """Whether `new` may replace `old` in a cache: another object (uid) or a later resourceVersion."""
    if old is None or new["metadata"].get("uid") != old["metadata"].get("uid"):
        return True
    new_rv, old_rv = resource_version(new), resource_version(old)
    return new_rv is None or old_rv is None or new_rv >= old_rv


class Cache:
    """What the watches (and our own writes' replies) last showed: LingDeployments, their pods by
    deployment, their Services' names. Touched from the event loop and from worker threads, hence the
    lock; readers get copies of the containers, never the live ones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.deployments: dict[Key, dict[str, Any]] = {}
        self.pods: dict[Key, dict[str, dict[str, Any]]] = {}  # (ns, deployment) -> pod name -> pod
        self.services: dict[Key, set[str]] = {}
        # uids the watch reported gone, with when: a LIST answered before the deletion must not bring
        # them back (pruned after a few minutes; a deleted uid never returns).
        self.gone: dict[str, float] = {}

    def put_deployment(self, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self.lock:
            if body["metadata"].get("uid") in self.gone:
                return
            if is_newer(body, self.deployments.get(key)):
                self.deployments[key] = body

    def drop_deployment(self, key: Key, uid: str | None) -> None:
        with self.lock:
            current = self.deployments.get(key)
            if uid:
                self.gone[uid] = time.monotonic()
            if current is not None and (uid is None or current["metadata"].get("uid") == uid):
                del self.deployments[key]
                # Its Services go with it (garbage collector; they have no watch here). Its pods stay
                # until their own DELETED events: a new deployment of the same name must see them.
                self.services.pop(key, None)

    def put_pod(self, pod: dict[str, Any]) -> Key | None:
        meta = pod["metadata"]
        deployment = (meta.get("labels") or {}).get(resources.LABEL_DEPLOYMENT)
        if not deployment:
            return None
        key = (meta["namespace"], deployment)
        with self.lock:
            if meta.get("uid") in self.gone:
                return key
            pods = self.pods.setdefault(key, {})
            if is_newer(pod, pods.get(meta["name"])):
                pods[meta["name"]] = pod
        return key

    def drop_pod(self, key: Key, name: str, uid: str | None) -> None:
        with self.lock:
            if uid:
                self.gone[uid] = time.monotonic()
            pods = self.pods.get(key) or {}
            current = pods.get(name)
            # A DELETED event of an older pod of the same name must not drop its successor.
            if current is not None and (uid is None or current["metadata"].get("uid") == uid):
                del pods[name]
                if not pods:
                    del self.pods[key]

    def mark_deleting(self, key: Key, name: str, now: datetime) -> None:
        """Our delete was accepted: until the watch says the pod is gone, show it terminating (as the
        API would right after a graceful delete), so no pass recreates its name or forgets the delete."""
        with self.lock:
            pod = (self.pods.get(key) or {}).get(name)
            if pod is not None and not pod["metadata"].get("deletionTimestamp"):
                meta = {**pod["metadata"], "deletionTimestamp": reconcile.format_time(now)}
                self.pods[key][name] = {**pod, "metadata": meta}

    def snapshot(self, key: Key) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[str]]:
        with self.lock:
            return (
                self.deployments.get(key),
                list((self.pods.get(key) or {}).values()),
                sorted(self.services.get(key) or ()),
            )

    def set_services(self, names: dict[Key, set[str]]) -> None:
        with self.lock:
            self.services = names

    def add_service(self, key: Key, name: str) -> None:
        with self.lock:
            self.services.setdefault(key, set()).add(name)

    def deployment_keys(self) -> list[Key]:
        with self.lock:
            now = time.monotonic()
            self.gone = {uid: t for uid, t in self.gone.items() if now - t < 600}
            return list(self.deployments)


# Threads for one pass's concurrent writes. The client's urllib3 pool must hold as many connections, or
# it drops the extra ones after each request (and says so in the log).
WRITE_THREADS = 16
# Every how many resyncs the caches are re-filled by LIST (30 s resyncs: every 5 min, kopf's watch cycle).
RELIST_EVERY = 10


def api_client(kubeconfig: str | None) -> client.ApiClient:
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = WRITE_THREADS + 8  # the sync workers and the leader loop too
    return client.ApiClient(cfg)


class Controller:
    """The operator's shell: reads the watch caches, runs the pure decisions, writes their result."""

    def __init__(self, settings: Settings, api_client_: client.ApiClient) -> None:
        self.settings = settings
        self.core = client.CoreV1Api(api_client_)
        self.custom = client.CustomObjectsApi(api_client_)
        self.elector = LeaseElector(
            client.CoordinationV1Api(api_client_),
            settings.lease_name,
            settings.lease_namespace,
            settings.identity,
            settings.lease_duration,
        )
        self.cache = Cache()
        self.queue: asyncio.Queue[Key] = asyncio.Queue()
        self.queued: set[Key] = set()
        # Keys a worker is on, and keys that came back meanwhile: they wait for that worker, so two
        # workers never act on one deployment from two snapshots.
        self.active: set[Key] = set()
        self.again: set[Key] = set()
        # Set once the caches were filled by a LIST after winning the Lease: before that a missing pod
        # in the cache could mean "not listed yet", and reconcile would read it as a lost rank.
        self.seeded = False
        self.timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        workers = max(settings.workers, 1)
        self.sync_pool = ThreadPoolExecutor(workers, thread_name_prefix="ling-sync")
        # A pass's writes go out at once; separate from sync_pool so a sync waiting on them cannot
        # starve them. The client's connection pool is sized to match in api_client().
        self.write_pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="ling-write")
        # When the autoscaler last looked at each deployment. Looks that change nothing are not written
        # (steady state causes no writes), so status alone cannot say when the last one was.
        self.autoscaled_at: dict[Key, datetime] = {}

    # -- queue -------------------------------------------------------------------------------------------

    def enqueue(self, key: Key) -> None:
        if key in self.active:
            self.again.add(key)
        elif key not in self.queued:
            self.queued.add(key)
            self.queue.put_nowait(key)

    def enqueue_later(self, key: Key, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        current = self.timers.get(key)
        if current is not None and current[0] <= due and not current[1].cancelled():
            return
        if current is not None:
            current[1].cancel()
        self.timers[key] = (due, loop.call_later(delay, self._fire, key))

    def _fire(self, key: Key) -> None:
        self.timers.pop(key, None)
        self.enqueue(key)

    async def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._work(), name=f"ling-worker-{i}") for i in range(self.settings.workers)
        ]
        self.tasks += [
            asyncio.create_task(self._lead(), name="ling-leader"),
            asyncio.create_task(self._resync(), name="ling-resync"),
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.to_thread(self.elector.release)
        self.sync_pool.shutdown(wait=False, cancel_futures=True)
        self.write_pool.shutdown(wait=False, cancel_futures=True)
        metrics.leader.set(0)

    async def _lead(self) -> None:
        was_leader = False
        while True:
            try:
                leading = await asyncio.to_thread(self.elector.tick)
            except Exception:  # a broken API connection must not kill the election loop
                log.exception("leader election tick failed")
                leading = self.elector.is_leader
            metrics.leader.set(1 if leading else 0)
            if leading and (not was_leader or not self.seeded):
                self.seeded = await self._seed()
                if self.seeded:
                    self._enqueue_all()
            elif not leading:
                self.seeded = False  # a standby's caches may have gaps by the time it leads again
            was_leader = leading
            await asyncio.sleep(max(self.settings.lease_duration / 3, 0.5))

    async def _resync(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            rounds += 1
            if not (self.elector.is_leader and self.seeded):
                continue
            if rounds % RELIST_EVERY == 0:
                # kopf re-lists when its watch reconnects (every server_timeout) but reports no DELETED
                # for what vanished in between; a LIST as seldom catches such a ghost pod.
                await self._seed()
            else:
                # Services have no watch (RBAC: list, create): one LIST per resync notices one that
                # someone deleted. Everything else comes from the watches.
                try:
                    services = await asyncio.to_thread(self._list_services)
                    self.cache.set_services(services)
                except ApiException as exc:
                    log.warning("cannot list Services: %s", exc.reason)
            self._enqueue_all()

    def _enqueue_all(self) -> None:
        for key in self.cache.deployment_keys():
            self.enqueue(key)

    async def _seed(self) -> bool:
        try:
            await asyncio.to_thread(self._seed_caches)
        except ApiException as exc:
            log.warning("cannot list LingDeployments, pods or Services: %s", exc.reason)
            return False
        return True

    def _seed_caches(self) -> None:
        """Fill the caches with one LIST of each kind, on top of what the watches already brought. An
        entry the LIST lacks although the LIST is newer than it is gone (its DELETED event was missed)."""
        for ns in self.settings.namespaces or [None]:
            if ns is None:
                resp = self.custom.list_cluster_custom_object(
                    api.GROUP, api.VERSION, api.PLURAL, _preload_content=False
                )
            else:
                resp = self.custom.list_namespaced_custom_object(
                    api.GROUP, api.VERSION, ns, api.PLURAL, _preload_content=False
                )
            data = json.loads(resp.data)
            list_rv = resource_version(data)
            items = data.get("items") or []
            for item in items:
                self.cache.put_deployment(item)
            listed = {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items}
            with self.cache.lock:
                cached_deployments = list(self.cache.deployments.items())
            for key, body in cached_deployments:
                if (ns is None or key[0] == ns) and key not in listed and self._older(body, list_rv):
                    self.cache.drop_deployment(key, body["metadata"].get("uid"))
        selector = f"{resources.LABEL_MANAGED_BY}={resources.MANAGED_BY}"
        pods_ns = self.core.list_namespaced_pod
        for ns in self.settings.namespaces or [None]:
            kw: dict[str, Any] = {"label_selector": selector, "_preload_content": False}
            resp = self.core.list_pod_for_all_namespaces(**kw) if ns is None else pods_ns(ns, **kw)
            data = json.loads(resp.data)
            list_rv = resource_version(data)
            items = data.get("items") or []
            listed_uids = set()
            for pod in items:
                self.cache.put_pod(pod)
                listed_uids.add(pod["metadata"].get("uid"))
            with self.cache.lock:
                cached = [(k, dict(p)) for k, p in self.cache.pods.items() if ns is None or k[0] == ns]
            for key, pods in cached:
                for name, pod in pods.items():
                    if pod["metadata"].get("uid") not in listed_uids and self._older(pod, list_rv):
                        self.cache.drop_pod(key, name, pod["metadata"].get("uid"))
        self.cache.set_services(self._list_services())

    @staticmethod
    def _older(obj: Mapping[str, Any], list_rv: int | None) -> bool:
        rv = resource_version(obj)
        return rv is not None and list_rv is not None and rv <= list_rv

    def _list_services(self) -> dict[Key, set[str]]:
        selector = f"{resources.LABEL_MANAGED_BY}={resources.MANAGED_BY}"
        names: dict[Key, set[str]] = {}
        for ns in self.settings.namespaces or [None]:
            kw: dict[str, Any] = {"label_selector": selector, "_preload_content": False}
            if ns is None:
                resp = self.core.list_service_for_all_namespaces(**kw)
            else:
                resp = self.core.list_namespaced_service(ns, **kw)
            for svc in json.loads(resp.data).get("items") or []:
                meta = svc["metadata"]
                deployment = (meta.get("labels") or {}).get(resources.LABEL_DEPLOYMENT)
                if deployment:
                    names.setdefault((meta["namespace"], deployment), set()).add(meta["name"])
        return names

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = await self.queue.get()
            self.queued.discard(key)
            if not (self.elector.is_leader and self.seeded):
                continue  # the standby only watches; seeding after winning the Lease enqueues everything
            self.active.add(key)
            started = time.monotonic()
            try:
                delay = await loop.run_in_executor(self.sync_pool, self.sync, key)
                metrics.reconcile_total.labels("ok").inc()
            except Exception as exc:
                metrics.reconcile_total.labels("error").inc()
                log.exception("%s/%s: reconcile failed (%s); retrying in 5 s", key[0], key[1], exc)
                delay = 5.0
            finally:
                self.active.discard(key)
            metrics.reconcile_duration_seconds.observe(time.monotonic() - started)
            if key in self.again:
                self.again.discard(key)
                self.enqueue(key)  # something changed while this pass ran: look again now
            if delay is not None:
                self.enqueue_later(key, delay)

    # -- one pass ----------------------------------------------------------------------------------------

    def sync(self, key: Key) -> float | None:
        """Reconcile one LingDeployment; returns when to look again (None: only on the next event)."""
        namespace, name = key
        body, pods, service_names = self.cache.snapshot(key)
        if body is None:
            self.autoscaled_at.pop(key, None)
            return None  # deleted (or not seen yet: its watch event enqueues it again)
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # owner references let the garbage collector remove the groups
        owner = resources.Owner(name, namespace, meta["uid"])
        generation = int(meta.get("generation") or 0)
        status: dict[str, Any] = body.get("status") or {}
        now = datetime.now(UTC)
        try:
            spec = resources.with_defaults(body.get("spec") or {})
        except ValueError as exc:
            message = f"spec rejected by the operator: {exc}"
            self._patch_status(owner, status, reconcile.invalid_spec_status(status, generation, message, now))
            metrics.reconcile_total.labels("invalid_spec").inc()
            log.warning("%s/%s: %s", namespace, name, message)
            return None

        plan = reconcile.reconcile(
            owner,
            generation,
            spec,
            status,
            pods,
            service_names,
            now,
            default_image=self.settings.default_image,
        )
        self._apply(owner, plan)
        new_status = {**status, **plan.status}
        auto_patch, autoscale_delay, result = self._autoscale(
            owner, {**body, "spec": spec, "status": new_status}, pods, now
        )
        # One status write per pass: the autoscaler's keys (computed on top of ours) win where both set one.
        self._patch_status(owner, status, {**plan.status, **auto_patch})
        if result is not None:
            self._apply_autoscale(owner, spec.get("autoscaling") or {}, result)

        metrics.groups_desired.labels(namespace, name).set(plan.status["desiredReplicas"])
        metrics.groups_ready.labels(namespace, name).set(plan.status["readyReplicas"])
        for _ in plan.restarted_groups:
            metrics.group_restarts_total.labels(namespace, name).inc()
        for seconds in plan.rendezvous_seconds:
            metrics.rendezvous_duration_seconds.labels(namespace, name).observe(seconds)

        delay = plan.requeue_after
        if autoscale_delay is not None:
            delay = autoscale_delay if delay is None else min(delay, autoscale_delay)
        return delay

    def _apply(self, owner: resources.Owner, plan: reconcile.Plan) -> None:
        """The pass's writes, all at once: they are independent (reconcile never creates a name it also
        deletes, and pods find their Services by DNS with retries). Replies go into the cache."""
        ns = owner.namespace
        key = (ns, owner.name)
        calls: list[Callable[[], None]] = []

        def create_service(svc: dict[str, Any]) -> None:
            log.info("%s/%s: creating Service %s", ns, owner.name, svc["metadata"]["name"])
            self._ignore(409, self.core.create_namespaced_service, ns, svc)
            self.cache.add_service(key, svc["metadata"]["name"])

        def delete_pod(pod_name: str) -> None:
            log.info("%s/%s: deleting pod %s", ns, owner.name, pod_name)
            try:
                self.core.delete_namespaced_pod(pod_name, ns, _preload_content=False)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.cache.drop_pod(key, pod_name, None)  # already gone
                return
            self.cache.mark_deleting(key, pod_name, datetime.now(UTC))

        def create_pod(pod: dict[str, Any]) -> None:
            log.info("%s/%s: creating pod %s", ns, owner.name, pod["metadata"]["name"])
            try:
                resp = self.core.create_namespaced_pod(ns, pod, _preload_content=False)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                return  # it exists: the watch brings it
            self.cache.put_pod(json.loads(resp.data))

        def post(event: reconcile.Event) -> None:
            log.info("%s/%s: %s: %s", ns, owner.name, event.reason, event.message)
            self.post_event(owner, event.type, event.reason, event.message)

        calls += [lambda s=svc: create_service(s) for svc in plan.create_services]
        calls += [lambda n=name: delete_pod(n) for name in plan.delete_pods]
        calls += [lambda p=pod: create_pod(p) for pod in plan.create_pods]
        calls += [lambda e=event: post(e) for event in plan.events]
        self._run_all(calls)

    def _run_all(self, calls: list[Callable[[], None]]) -> None:
        if len(calls) <= 1:
            for call in calls:
                call()
            return
        futures = [self.write_pool.submit(call) for call in calls]
        errors = [f.exception() for f in futures]  # waits for every one, so the cache is complete
        for error in errors:
            if error is not None:
                raise error

    @staticmethod
    def _ignore(code: int, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except ApiException as exc:
            if exc.status != code:
                raise

    def _patch_status(self, owner: resources.Owner, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        changed = {k: v for k, v in new.items() if old.get(k) != v}
        if not changed:
            return  # steady state: no write
        resp = self.custom.patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            owner.namespace,
            api.PLURAL,
            owner.name,
            {"status": changed},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )
        # The next pass must start from this status, not from the one the watch has not replaced yet.
        self.cache.put_deployment(json.loads(resp.data))

    def post_event(self, owner: resources.Owner, type_: str, reason: str, message: str) -> None:
        stamp = reconcile.format_time(datetime.now(UTC))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{owner.name}.", "namespace": owner.namespace},
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": owner.name,
                "namespace": owner.namespace,
                "uid": owner.uid,
            },
            "type": type_,
            "reason": reason,
            "message": message[:1000],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": "ling-operator"},
            "reportingComponent": "ling-operator",
            "reportingInstance": self.settings.identity[:128],
        }
        try:
            self.core.create_namespaced_event(owner.namespace, event)
        except ApiException as exc:
            log.warning("%s/%s: cannot post event %s: %s", owner.namespace, owner.name, reason, exc.reason)

    # -- autoscaling -------------------------------------------------------------------------------------

    def _autoscale(
        self, owner: resources.Owner, body: dict[str, Any], pods: list[dict[str, Any]], now: datetime
    ) -> tuple[dict[str, Any], float | None, autoscale_controller.AutoscaleResult | None]:
        """Run the autoscaler's entry point when due: (its status keys, when to look again, its result).
        The status keys go into the pass's one status patch; the rest is applied by _apply_autoscale."""
        spec = body["spec"]
        autoscaling = spec.get("autoscaling") or {}
        interval = float(autoscaling.get("intervalSeconds", 15))
        if not autoscaling.get("enabled"):
            active = next(
                (
                    c
                    for c in body["status"].get("conditions") or []
                    if c.get("type") == api.ConditionType.SCALING_ACTIVE
                ),
                None,
            )
            if active is not None and active.get("reason") == api.Reason.AUTOSCALING_DISABLED:
                return {}, None, None  # the "disabled" condition is written once, then nothing
        groups = observed_groups(body["status"], pods)
        try:
            source = autoscale_controller.make_source(body, read_secret=self._secret_reader(owner))
            key = (owner.namespace, owner.name)
            result = autoscale_controller.autoscale_tick(
                body, groups, source, now, last_tick=self.autoscaled_at.get(key)
            )
            if result is not None and result.metrics is not None:
                self.autoscaled_at[key] = now
        except ValueError as exc:
            cond = {
                "type": api.ConditionType.SCALING_ACTIVE,
                "status": "False",
                "reason": api.Reason.SOURCE_ERROR,
                "message": str(exc),
            }
            generation = int(body["metadata"].get("generation") or 0)
            previous = body["status"].get("conditions") or []
            merged = reconcile.merge_conditions(previous, [cond], generation, now)
            metrics.autoscaler_source_errors_total.labels(owner.namespace, owner.name).inc()
            return {"conditions": merged}, interval, None
        delay = interval if autoscaling.get("enabled") else None
        if result is None:
            return {}, delay, None
        patch: dict[str, Any] = dict(result.status or {})
        if result.conditions:
            # The autoscaler already carried its lastTransitionTimes over; ours stay as they are.
            patch["conditions"] = upsert_conditions(body["status"].get("conditions") or [], result.conditions)
        return patch, delay, result

    def _apply_autoscale(
        self,
        owner: resources.Owner,
        autoscaling: Mapping[str, Any],
        result: autoscale_controller.AutoscaleResult,
    ) -> None:
        """After the status patch: the autoscaler's events, metrics and /scale write."""
        for event in result.events:
            log.info("%s/%s: %s: %s", owner.namespace, owner.name, event.reason, event.message)
            self.post_event(owner, event.type, event.reason, event.message)
        m = result.metrics
        if m is not None:
            labels = (owner.namespace, owner.name)
            if m.queue_depth is not None:
                metrics.autoscaler_queue_depth.labels(*labels).set(m.queue_depth)
            metrics.autoscaler_desired_replicas.labels(*labels).set(m.desired_replicas)
            metrics.autoscaler_current_replicas.labels(*labels).set(m.current_replicas)
            if autoscaling.get("maxReplicas") is not None:
                metrics.autoscaler_max_replicas.labels(*labels).set(int(autoscaling["maxReplicas"]))
            if m.direction in ("up", "down"):
                metrics.scale_decisions_total.labels(m.direction, m.reason).inc()
            if m.source_error:
                metrics.autoscaler_source_errors_total.labels(*labels).inc()
        if result.replicas is not None:
            log.info(
                "%s/%s: autoscaler sets spec.replicas to %d", owner.namespace, owner.name, result.replicas
            )
            self.custom.patch_namespaced_custom_object_scale(
                api.GROUP,
                api.VERSION,
                owner.namespace,
                api.PLURAL,
                owner.name,
                {"spec": {"replicas": result.replicas}},
                _content_type="application/merge-patch+json",
            )
            # The reply is a Scale, not the object: read the object back so the next pass (often before
            # the watch event) starts from the new spec.replicas instead of deciding the same step again.
            resp = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, owner.namespace, api.PLURAL, owner.name, _preload_content=False
            )
            self.cache.put_deployment(json.loads(resp.data))

    def _secret_reader(self, owner: resources.Owner) -> Any:
        def read(name: str, key: str) -> str:
            secret = self.core.read_namespaced_secret(name, owner.namespace)
            data = (secret.data or {}).get(key)
            if data is None:
                raise ValueError(
                    f"spec.autoscaling.source.prometheus.authSecretRef: Secret {name} has no key {key}"
                )
            return base64.b64decode(data).decode()

        return read


def upsert_conditions(
    previous: list[Mapping[str, Any]], updates: list[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Conditions by type: `updates` replace the same types, everything else is kept in place."""
    by_type = {c["type"]: dict(c) for c in previous}
    for cond in updates:
        by_type[cond["type"]] = dict(cond)
    order = {t: i for i, t in enumerate(api.ConditionType.ALL)}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def observed_groups(
    status: Mapping[str, Any], pods: list[dict[str, Any]]
) -> list[autoscale_controller.ObservedGroup]:
    """The autoscaler's view of groups: index, rank-0 pod IP, whole-group readiness."""
    heads = {
        reconcile.pod_group(p): p
        for p in pods
        if reconcile.pod_rank(p) == 0 and not reconcile.is_terminating(p)
    }
    out = []
    for group in status.get("groups") or []:
        head = heads.get(int(group["index"]))
        ip = (head or {}).get("status", {}).get("podIP")
        out.append(autoscale_controller.ObservedGroup(int(group["index"]), ip, group.get("phase") == "Ready"))
    return out


# ---------------------------------------------------------------------------------------------------------
# kopf wiring. The Controller travels in kopf's memo (set by cli.py).


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # We write our own events; kopf must not post its handler logs as events from both replicas.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    await memo["controller"].start()


@kopf.on.cleanup()
async def _cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo["controller"].stop()


# Async on purpose: kopf runs sync handlers in threads, and the queue belongs to the event loop. Each handler
# feeds the cache from the raw watch event (type None: kopf's initial listing) and enqueues the deployment.
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
    controller.cache.put_deployment(dict(obj))
    controller.enqueue((namespace, name))


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
    else:
        controller.cache.put_pod(dict(obj))
    controller.enqueue(key)


@kopf.on.probe(id="leader")
def _leader_probe(memo: kopf.Memo, **_: Any) -> bool:
    return bool(memo["controller"].elector.is_leader)
