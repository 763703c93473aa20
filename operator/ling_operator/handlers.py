"""Thin kopf wiring: watch events -> a work queue -> reconcile/autoscale -> API writes.

kopf only watches here (`on.event` handlers keep no state on the objects: no finalizers, no
annotations), so two replicas can watch side by side; only the Lease holder (leader.py) writes.
Every event of a LingDeployment or of one of its pods enqueues that deployment's key; one worker
takes keys in turn, reads the object and its pods fresh, asks reconcile.py what to do, applies it,
and asks to be woken again when a timer matters (backoff end, rendezvous deadline, autoscaling
interval). A periodic resync enqueues every deployment, so a missed event is never fatal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Mapping
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


def api_client(kubeconfig: str | None) -> client.ApiClient:
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Controller:
    """The operator's shell: reads the API, runs the pure decisions, writes their result."""

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
        self.queue: asyncio.Queue[Key] = asyncio.Queue()
        self.queued: set[Key] = set()
        self.timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        # When the autoscaler last looked at each deployment. Looks that change nothing are not written
        # (steady state causes no writes), so status alone cannot say when the last one was.
        self.autoscaled_at: dict[Key, datetime] = {}

    # -- queue -------------------------------------------------------------------------------------------

    def enqueue(self, key: Key) -> None:
        if key not in self.queued:
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
            asyncio.create_task(self._work(), name="ling-worker"),
            asyncio.create_task(self._lead(), name="ling-leader"),
            asyncio.create_task(self._resync(), name="ling-resync"),
        ]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.to_thread(self.elector.release)
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
            if leading and not was_leader:
                await self._enqueue_all()
            was_leader = leading
            await asyncio.sleep(max(self.settings.lease_duration / 3, 0.5))

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            if self.elector.is_leader:
                await self._enqueue_all()

    async def _enqueue_all(self) -> None:
        try:
            for key in await asyncio.to_thread(self._list_keys):
                self.enqueue(key)
        except ApiException as exc:
            log.warning("cannot list LingDeployments: %s", exc.reason)

    def _list_keys(self) -> list[Key]:
        items: list[dict[str, Any]] = []
        if self.settings.namespaces:
            for ns in self.settings.namespaces:
                resp = self.custom.list_namespaced_custom_object(
                    api.GROUP, api.VERSION, ns, api.PLURAL, _preload_content=False
                )
                items += json.loads(resp.data).get("items") or []
        else:
            resp = self.custom.list_cluster_custom_object(
                api.GROUP, api.VERSION, api.PLURAL, _preload_content=False
            )
            items = json.loads(resp.data).get("items") or []
        return [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items]

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            self.queued.discard(key)
            if not self.elector.is_leader:
                continue  # the standby only watches; the leader's resync covers everything
            started = time.monotonic()
            try:
                delay = await asyncio.to_thread(self.sync, key)
                metrics.reconcile_total.labels("ok").inc()
            except Exception as exc:
                metrics.reconcile_total.labels("error").inc()
                log.exception("%s/%s: reconcile failed (%s); retrying in 5 s", key[0], key[1], exc)
                delay = 5.0
            metrics.reconcile_duration_seconds.observe(time.monotonic() - started)
            if delay is not None:
                self.enqueue_later(key, delay)

    # -- one pass ----------------------------------------------------------------------------------------

    def sync(self, key: Key) -> float | None:
        """Reconcile one LingDeployment; returns when to look again (None: only on the next event)."""
        namespace, name = key
        try:
            resp = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                metrics.forget_deployment(namespace, name)
                self.autoscaled_at.pop(key, None)
                return None
            raise
        body: dict[str, Any] = json.loads(resp.data)
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

        selector = f"{resources.LABEL_DEPLOYMENT}={name}"
        pods = json.loads(
            self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False).data
        ).get("items", [])
        services = json.loads(
            self.core.list_namespaced_service(namespace, label_selector=selector, _preload_content=False).data
        ).get("items", [])
        plan = reconcile.reconcile(
            owner,
            generation,
            spec,
            status,
            pods,
            [s["metadata"]["name"] for s in services],
            now,
            default_image=self.settings.default_image,
        )
        self._apply(owner, body, plan)
        new_status = {**status, **plan.status}
        self._patch_status(owner, status, plan.status)

        metrics.groups_desired.labels(namespace, name).set(plan.status["desiredReplicas"])
        metrics.groups_ready.labels(namespace, name).set(plan.status["readyReplicas"])
        for _ in plan.restarted_groups:
            metrics.group_restarts_total.labels(namespace, name).inc()
        for seconds in plan.rendezvous_seconds:
            metrics.rendezvous_duration_seconds.labels(namespace, name).observe(seconds)

        delay = plan.requeue_after
        autoscale_delay = self._autoscale(owner, {**body, "spec": spec, "status": new_status}, pods, now)
        if autoscale_delay is not None:
            delay = autoscale_delay if delay is None else min(delay, autoscale_delay)
        return delay

    def _apply(self, owner: resources.Owner, body: Mapping[str, Any], plan: reconcile.Plan) -> None:
        ns = owner.namespace
        for svc in plan.create_services:
            log.info("%s/%s: creating Service %s", ns, owner.name, svc["metadata"]["name"])
            self._ignore(409, self.core.create_namespaced_service, ns, svc)
        for pod_name in plan.delete_pods:
            log.info("%s/%s: deleting pod %s", ns, owner.name, pod_name)
            self._ignore(404, self.core.delete_namespaced_pod, pod_name, ns)
        for pod in plan.create_pods:
            log.info("%s/%s: creating pod %s", ns, owner.name, pod["metadata"]["name"])
            self._ignore(409, self.core.create_namespaced_pod, ns, pod)
        for event in plan.events:
            log.info("%s/%s: %s: %s", ns, owner.name, event.reason, event.message)
            self.post_event(owner, event.type, event.reason, event.message)

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
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            owner.namespace,
            api.PLURAL,
            owner.name,
            {"status": changed},
            _content_type="application/merge-patch+json",
        )

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
    ) -> float | None:
        """Run the autoscaler's entry point when due and apply what it returns."""
        spec = body["spec"]
        autoscaling = spec.get("autoscaling") or {}
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
                return None  # the "disabled" condition is written once, then nothing
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
            self._patch_status(owner, body["status"], {"conditions": merged})
            metrics.autoscaler_source_errors_total.labels(owner.namespace, owner.name).inc()
            return float(autoscaling.get("intervalSeconds", 15))
        if result is None:
            return float(autoscaling.get("intervalSeconds", 15)) if autoscaling.get("enabled") else None
        patch: dict[str, Any] = dict(result.status or {})
        if result.conditions:
            # The autoscaler already carried its lastTransitionTimes over; ours stay as they are.
            patch["conditions"] = upsert_conditions(body["status"].get("conditions") or [], result.conditions)
        self._patch_status(owner, body["status"], patch)
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
        return float(autoscaling.get("intervalSeconds", 15)) if autoscaling.get("enabled") else None

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


# Async on purpose: kopf runs sync handlers in threads, and the queue belongs to the event loop.
@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def _deployment_event(
    event: Mapping[str, Any], name: str, namespace: str, memo: kopf.Memo, **_: Any
) -> None:
    if event.get("type") == "DELETED":
        metrics.forget_deployment(namespace, name)
        return
    memo["controller"].enqueue((namespace, name))


@kopf.on.event("", "v1", "pods", labels={resources.LABEL_MANAGED_BY: resources.MANAGED_BY})
async def _pod_event(labels: Mapping[str, str], namespace: str, memo: kopf.Memo, **_: Any) -> None:
    deployment = labels.get(resources.LABEL_DEPLOYMENT)
    if deployment:
        memo["controller"].enqueue((namespace, deployment))


@kopf.on.probe(id="leader")
def _leader_probe(memo: kopf.Memo, **_: Any) -> bool:
    return bool(memo["controller"].elector.is_leader)
