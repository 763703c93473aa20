"""The operator's shell: the leader's loop, the workers, and one pass per LingDeployment.

One pass reads the cache (no API request), validates nothing twice (the cache holds the spec validated
once per generation), asks reconcile.py and the autoscaler what to do, and writes the result: the plan's
creates and deletes at once, then one status patch (only what changed: nothing in steady state), then
the autoscaler's /scale. It returns when to look again (a backoff's end, a rendezvous deadline, the
autoscaling interval).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ling_operator import autoscale_controller, metrics, reconcile, resources
from ling_operator.api import LingDeploymentSpec, LingDeploymentStatus
from ling_operator.autoscale_sources import ObservedGroup
from ling_operator.cache import Cache, DeploymentRecord, Key
from ling_operator.kube import IO_THREADS, Kube
from ling_operator.leader import LeaseElector
from ling_operator.pods import ObservedPod, resource_version
from ling_operator.workqueue import WorkQueue
from ling_operator.writes import Writer

log = logging.getLogger("ling_operator")

# Every how many resyncs the caches are re-filled by LIST (30 s resyncs: every 5 min, kopf's watch cycle).
RELIST_EVERY = 10
# After a failed pass, look again in this many seconds.
RETRY_SECONDS = 5.0


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


def observed_groups(status: LingDeploymentStatus, pods: list[ObservedPod]) -> list[ObservedGroup]:
    """The autoscaler's view of groups: index, rank-0 pod IP, whole-group readiness."""
    heads = {p.group: p for p in pods if p.rank == 0 and not p.terminating}
    out = []
    for group in status.groups:
        head = heads.get(group.index)
        out.append(ObservedGroup(group.index, None if head is None else head.ip, group.phase == "Ready"))
    return out


class Controller:
    def __init__(self, settings: Settings, api_client: client.ApiClient) -> None:
        self.settings = settings
        self.kube = Kube(api_client)
        self.cache = Cache()
        self.queue: WorkQueue[Key] = WorkQueue()
        # Blocking API calls and scrapes run here; everything else runs on kopf's event loop.
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="ling-io")
        self.writer = Writer(self.kube, self.cache, settings.identity, self.io)
        self.elector = LeaseElector(
            self.kube.coordination,
            settings.lease_name,
            settings.lease_namespace,
            settings.identity,
            settings.lease_duration,
        )
        # Set once the caches were filled by a LIST after winning the Lease: before that a missing pod
        # in the cache could mean "not listed yet", and reconcile would read it as a lost rank.
        self.seeded = False
        # When the autoscaler last looked at each deployment. Looks that change nothing are not written
        # (steady state causes no writes), so status alone cannot say when the last one was.
        self.autoscaled_at: dict[Key, datetime] = {}
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def acting(self) -> bool:
        return self.elector.is_leader and self.seeded

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
        await self.writer.call(self.elector.release)
        self.io.shutdown(wait=False, cancel_futures=True)
        metrics.leader.set(0)

    # -- leadership, resync, seeding ----------------------------------------------------------------------

    async def _lead(self) -> None:
        was_leader = False
        while True:
            try:
                leading = await self.writer.call(self.elector.tick)
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
            if not self.acting:
                continue
            if rounds % RELIST_EVERY == 0:
                # kopf re-lists when its watch reconnects (every server_timeout) but reports no DELETED
                # for what vanished in between; a LIST as seldom catches such a ghost pod.
                await self._seed()
            else:
                # Services have no watch (RBAC: list, create): one LIST per resync notices one that
                # someone deleted. Everything else comes from the watches.
                try:
                    await self._list_services()
                except ApiException as exc:
                    log.warning("cannot list Services: %s", exc.reason)
            self._enqueue_all()

    def _enqueue_all(self) -> None:
        for key in self.cache.deployment_keys():
            self.queue.add(key)

    async def _seed(self) -> bool:
        """Fill the caches with one LIST of each kind, on top of what the watches already brought."""
        try:
            for ns in self.settings.namespaces or [None]:
                listed = await self.writer.call(self.kube.list_deployments, ns)
                self.cache.relist_deployments(listed.get("items") or [], resource_version(listed), ns)
                listed = await self.writer.call(self.kube.list_pods, ns)
                self.cache.relist_pods(listed.get("items") or [], resource_version(listed), ns)
            await self._list_services()
        except ApiException as exc:
            log.warning("cannot list LingDeployments, pods or Services: %s", exc.reason)
            return False
        return True

    async def _list_services(self) -> None:
        names: dict[Key, set[str]] = {}
        for ns in self.settings.namespaces or [None]:
            listed = await self.writer.call(self.kube.list_services, ns)
            for svc in listed.get("items") or []:
                meta = svc["metadata"]
                deployment = (meta.get("labels") or {}).get(resources.LABEL_DEPLOYMENT)
                if deployment:
                    names.setdefault((meta["namespace"], deployment), set()).add(meta["name"])
        self.cache.set_services(names)

    # -- workers -------------------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            if not self.acting:
                self.queue.skip(key)  # the standby only watches; winning the Lease enqueues everything
                continue
            started = time.monotonic()
            try:
                delay = await self.sync(key)
                metrics.reconcile_total.labels("ok").inc()
            except Exception as exc:
                metrics.reconcile_total.labels("error").inc()
                log.exception("%s/%s: reconcile failed (%s); retrying in %.0f s", *key, exc, RETRY_SECONDS)
                delay = RETRY_SECONDS
            metrics.reconcile_duration_seconds.observe(time.monotonic() - started)
            self.queue.done(key, delay)

    # -- one pass ------------------------------------------------------------------------------------------

    async def sync(self, key: Key) -> float | None:
        """Reconcile one LingDeployment; returns when to look again (None: only on the next event)."""
        record, pods, services = self.cache.snapshot(key)
        if record is None:
            self.autoscaled_at.pop(key, None)
            return None  # deleted (or not seen yet: its watch event enqueues it again)
        if record.deleting:
            return None  # owner references let the garbage collector remove the groups
        owner = resources.Owner(record.name, record.namespace, record.uid)
        status = record.observed
        now = datetime.now(UTC)
        if record.spec is None:
            message = f"spec rejected by the operator: {record.spec_error}"
            invalid = reconcile.invalid_spec_status(status, record.generation, message, now)
            await self.writer.patch_status(owner, record.status, invalid)
            metrics.reconcile_total.labels("invalid_spec").inc()
            log.warning("%s/%s: %s", *key, message)
            return None
        spec = record.spec
        plan = reconcile.reconcile(
            owner,
            record.generation,
            spec,
            status,
            pods,
            services,
            now,
            default_image=self.settings.default_image,
        )
        await self.writer.apply(owner, plan)
        status, autoscale_delay, result = await self._autoscale(record, spec, plan.status, pods, now)
        await self.writer.patch_status(owner, record.status, status)  # one status write per pass
        if result is not None:
            await self._apply_autoscale(owner, spec, result)
        _record_metrics(key, plan)
        delays = [d for d in (plan.requeue_after, autoscale_delay) if d is not None]
        return min(delays) if delays else None

    async def _autoscale(
        self,
        record: DeploymentRecord,
        spec: LingDeploymentSpec,
        status: LingDeploymentStatus,
        pods: list[ObservedPod],
        now: datetime,
    ) -> tuple[LingDeploymentStatus, float | None, autoscale_controller.AutoscaleResult | None]:
        """The autoscaler's look when due: (the status with its part, when to look again, its result)."""
        if not spec.autoscaling.enabled:
            disabled = autoscale_controller.autoscale_tick(spec, status, record.generation, [], None, now)
            return (status if disabled is None else disabled.status), None, None
        key, interval = record.key, float(spec.autoscaling.interval_seconds)
        if not autoscale_controller.is_due(
            spec.autoscaling, status.autoscaler, now, self.autoscaled_at.get(key)
        ):
            return status, interval, None  # not due: no source (and no Secret read), no scrape
        try:
            source = await self.writer.call(
                autoscale_controller.make_source, spec, self.writer.secret_reader(record.namespace)
            )
            result = await self.writer.call(
                autoscale_controller.autoscale_tick,
                spec,
                status,
                record.generation,
                observed_groups(status, pods),
                source,
                now,
                self.autoscaled_at.get(key),
            )
        except ValueError as exc:
            metrics.autoscaler_source_errors_total.labels(*key).inc()
            return (
                autoscale_controller.source_config_error(status, record.generation, str(exc), now),
                interval,
                None,
            )
        if result is None:
            return status, interval, None
        if result.metrics is not None:
            self.autoscaled_at[key] = now
        return result.status, interval, result

    async def _apply_autoscale(
        self, owner: resources.Owner, spec: LingDeploymentSpec, result: autoscale_controller.AutoscaleResult
    ) -> None:
        """After the status patch: the autoscaler's events, metrics and /scale write."""
        await self.writer.post(owner, result.events)
        m = result.metrics
        if m is not None:
            labels = (owner.namespace, owner.name)
            if m.queue_depth is not None:
                metrics.autoscaler_queue_depth.labels(*labels).set(m.queue_depth)
            metrics.autoscaler_desired_replicas.labels(*labels).set(m.desired_replicas)
            metrics.autoscaler_current_replicas.labels(*labels).set(m.current_replicas)
            metrics.autoscaler_max_replicas.labels(*labels).set(spec.autoscaling.max_replicas)
            if m.direction in ("up", "down"):
                metrics.scale_decisions_total.labels(m.direction, m.reason).inc()
            if m.source_error:
                metrics.autoscaler_source_errors_total.labels(*labels).inc()
        if result.replicas is not None:
            await self.writer.scale(owner, result.replicas)


def _record_metrics(key: Key, plan: reconcile.Plan) -> None:
    metrics.groups_desired.labels(*key).set(plan.status.desired_replicas)
    metrics.groups_ready.labels(*key).set(plan.status.ready_replicas)
    for _ in plan.restarted_groups:
        metrics.group_restarts_total.labels(*key).inc()
    for seconds in plan.rendezvous_seconds:
        metrics.rendezvous_duration_seconds.labels(*key).observe(seconds)
