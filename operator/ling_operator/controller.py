"""The operator's shell: the leader's loop, the workers, and one pass per LingDeployment.

One pass reads the cache (no API request), validates nothing twice (the cache holds the spec validated
once per generation), asks reconcile.py and the autoscaler what to do, and writes the result: the plan's
creates and deletes (writes.py: fenced by the Lease, refusals recorded, not raised), then one status
patch (only what changed: nothing in steady state; it says which writes the API refused, and applies only
to the version of the object the pass read), then the autoscaler's /scale. It returns when to look again
(a backoff's end, a refused write's retry, a rendezvous deadline, the autoscaling interval).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ling_operator import api, autoscale_controller, metrics, reconcile, resources
from ling_operator.api import ConditionType, LingDeploymentSpec, LingDeploymentStatus
from ling_operator.autoscale_sources import ObservedGroup
from ling_operator.cache import Cache, DeploymentRecord, Key
from ling_operator.events import Event, warning
from ling_operator.failures import WriteFailure
from ling_operator.kube import IO_THREADS, Kube
from ling_operator.leader import LeaseElector
from ling_operator.pods import ObservedPod, resource_version
from ling_operator.watch import Event as WatchEvent
from ling_operator.watch import Listed, OnList, Watch
from ling_operator.workqueue import Backoff, WorkQueue
from ling_operator.writes import RETRY_MAX_SECONDS, Fenced, Writer, classify

log = logging.getLogger("ling_operator")

# Every how many resyncs the caches are re-filled by LIST (30 s resyncs: every 5 min, kopf's watch cycle).
RELIST_EVERY = 10
# After a status patch that found the object moved on (409), look again this soon (its watch event, which
# queues the deployment too, usually comes first).
CONFLICT_RETRY_SECONDS = 1.0


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
    renew_deadline: float | None = None  # None: 2/3 of lease_duration (leader.py)
    retry_max_seconds: float = RETRY_MAX_SECONDS  # the longest backoff of a refused write or failed pass


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
        self.api_client = api_client
        self.kube = Kube(api_client)
        self.watches: list[Watch] = []
        self.cache = Cache()
        self.queue: WorkQueue[Key] = WorkQueue()
        # Blocking API calls and scrapes run here; everything else runs on kopf's event loop.
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="ling-io")
        # The Lease has a thread of its own: writes hung on a dead connection must not hold up the very
        # renewal that decides whether writes may be sent at all.
        self.lease_io = ThreadPoolExecutor(1, thread_name_prefix="ling-lease")
        self.elector = LeaseElector(
            self.kube,
            settings.lease_name,
            settings.lease_namespace,
            settings.identity,
            settings.lease_duration,
            settings.renew_deadline,
        )
        self.writer = Writer(
            self.kube, self.cache, settings.identity, self.io, self.elector, settings.retry_max_seconds
        )
        # The leadership term whose caches were filled by a LIST: before that a missing pod in the cache
        # could mean "not listed yet", and reconcile would read it as a lost rank.
        self.seeded_term = 0
        self._seeding: asyncio.Task[None] | None = None
        # A pass that failed (not a refused write: the pass itself) looks again with per-key backoff.
        self.pass_backoff: Backoff[Key] = Backoff(1.0, settings.retry_max_seconds)
        # The causes of refused writes already told in a Warning event, per deployment.
        self.announced: dict[Key, set[tuple[str, str, str]]] = {}
        # When the autoscaler last looked at each deployment. Looks that change nothing are not written
        # (steady state causes no writes), so status alone cannot say when the last one was.
        self.autoscaled_at: dict[Key, datetime] = {}
        self.accepted_at: dict[Key, datetime] = {}  # the last MTP-acceptance look without the autoscaler
        self.tasks: list[asyncio.Task[None]] = []
        # Read at each scrape: drops to 0 the moment the renew deadline passes, even while a renewal hangs.
        metrics.leader.set_function(lambda: 1.0 if self.elector.is_leader else 0.0)

    @property
    def acting(self) -> bool:
        return self.elector.is_leader and self.seeded_term == self.elector.term

    async def start(self) -> None:
        # The watches get a connection pool of their own: a WATCH holds its connection for minutes.
        watching = Kube(client.ApiClient(self.api_client.configuration))
        namespaces: list[str | None] = list(self.settings.namespaces) or [None]
        loop = asyncio.get_running_loop()
        self.watches = [
            Watch(
                api.PLURAL,
                watching.list_deployments,
                watching.watch_deployments,
                namespaces,
                loop,
                self._relisted(self.cache.relist_deployments),
                self._deployment_events,
            ),
            Watch(
                "pods",
                watching.list_pods,
                watching.watch_pods,
                namespaces,
                loop,
                self._relisted(self.cache.relist_pods),
                self._pod_events,
            ),
        ]
        for watch in self.watches:
            watch.start()
        self.tasks = [
            asyncio.create_task(self._work(), name=f"ling-worker-{i}") for i in range(self.settings.workers)
        ]
        self.tasks += [
            asyncio.create_task(self._lead(), name="ling-leader"),
            asyncio.create_task(self._resync(), name="ling-resync"),
        ]

    async def stop(self) -> None:
        for watch in self.watches:
            watch.stop()
        for task in [*self.tasks, *([self._seeding] if self._seeding else [])]:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self.lease_io, self.elector.release)
        self.io.shutdown(wait=False, cancel_futures=True)
        self.lease_io.shutdown(wait=False)

    # -- leadership, resync, seeding ----------------------------------------------------------------------

    async def _lead(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self.lease_io, self.elector.tick)
            except Exception:  # a broken API connection must not kill the election loop
                log.exception("leader election tick failed")
            # Each new term (first win, or winning back after the deadline passed) starts from a LIST: a
            # standby's watches may have gaps. Seeding runs beside this loop, which must keep renewing.
            term = self.elector.term
            if self.elector.is_leader and self.seeded_term != term and self._seeding is None:
                self._seeding = asyncio.create_task(self._seed_term(term), name="ling-seed")
            await asyncio.sleep(self.elector.next_tick_in())

    async def _seed_term(self, term: int) -> None:
        try:
            if await self._seed() and self.elector.term == term:
                # What this replica knew of refused writes is from before another replica led: stale.
                self.writer.forget_all()
                self.announced.clear()
                self.seeded_term = term
                self._enqueue_all()
        finally:
            self._seeding = None

    async def _resync(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            rounds += 1
            if not self.acting:
                continue
            if rounds % RELIST_EVERY == 0:
                # A backstop: the watches resume from their last version and list again after a 410, so
                # they should miss nothing; two LISTs every few minutes bound how long a cache error lasts.
                await self._seed()
            else:
                # Services have no watch (RBAC: list, create): one LIST per resync notices one that
                # someone deleted. Everything else comes from the watches.
                try:
                    await self._list_services()
                except ApiException as exc:
                    log.warning("cannot list Services: %s", exc.reason)
            self._enqueue_all()

    # -- the watches' hand-overs (on the event loop) ---------------------------------------------------------

    def _deployment_events(self, events: list[WatchEvent]) -> None:
        for kind, obj in events:
            meta = obj.get("metadata") or {}
            key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
            if kind == "DELETED":
                self.cache.drop_deployment(key, meta.get("uid"))
                metrics.forget_deployment(*key)
            elif self.cache.put_deployment(obj):
                self.queue.add(key)

    def _pod_events(self, events: list[WatchEvent]) -> None:
        for kind, obj in events:
            meta = obj.get("metadata") or {}
            deployment = (meta.get("labels") or {}).get(resources.LABEL_DEPLOYMENT)
            if not deployment:
                continue
            key = (str(meta.get("namespace", "")), str(deployment))
            if kind == "DELETED":
                self.cache.drop_pod(key, str(meta.get("name", "")), meta.get("uid"))
                self.queue.add(key)
            elif self.cache.put_pod(obj):
                self.queue.add(key)

    def _relisted(
        self, relist: Callable[[Iterable[Mapping[str, Any]], int | None, str | None], None]
    ) -> OnList:
        """A watch's LIST goes into the cache through `relist` (which also drops what the LIST no longer
        has); every deployment of that namespace is looked at again."""

        def on_list(ns: str | None, listed: Listed) -> None:
            items, rv = listed
            relist(items, rv, ns)
            self._enqueue_all(ns)

        return on_list

    def _enqueue_all(self, ns: str | None = None) -> None:
        for key in self.cache.deployment_keys():
            if ns is None or key[0] == ns:
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
                delay, result = await self.sync(key)
                self.pass_backoff.forget(key)
            except Fenced:
                # Deposed (or cut off) mid-pass: what it decided is stale. Whoever leads looks again.
                log.info("%s/%s: pass stopped before its next write: the Lease was not renewed in time", *key)
                delay, result = None, "fenced"
            except Exception as exc:
                delay, result = self.pass_backoff.failed(key), "error"
                log.exception("%s/%s: reconcile failed (%s); retrying in %.0f s", *key, exc, delay)
            metrics.reconcile_total.labels(result).inc()
            metrics.reconcile_duration_seconds.observe(time.monotonic() - started)
            self.queue.done(key, delay)

    # -- one pass ------------------------------------------------------------------------------------------

    async def sync(self, key: Key) -> tuple[float | None, str]:
        """Reconcile one LingDeployment: (when to look again, None: only on the next event; the result)."""
        record, pods, services = self.cache.snapshot(key)
        if record is None:
            self._forget(key)
            return None, "ok"  # deleted (or not seen yet: its watch event enqueues it again)
        if record.deleting:
            return None, "ok"  # owner references let the garbage collector remove the groups
        owner = resources.Owner(record.name, record.namespace, record.uid)
        status = record.observed
        now = datetime.now(UTC)
        if record.spec is None:
            message = f"spec rejected by the operator: {record.spec_error}"
            invalid = reconcile.invalid_spec_status(status, record.generation, message, now)
            log.warning("%s/%s: %s", *key, message)
            if not await self._patch_status(owner, record, invalid):
                return CONFLICT_RETRY_SECONDS, "conflict"
            return None, "invalid_spec"
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
            refused=self.writer.refused(key),
        )
        outcome = await self.writer.apply(owner, plan, pods)
        status, autoscale_delay, result = await self._autoscale(record, spec, plan.status, pods, now)
        status = await self._acceptance(record, spec, status, pods, now)
        status = reconcile.with_write_failures(
            status, record.observed.conditions, outcome.failures, record.generation, now
        )
        if not await self._patch_status(owner, record, status):  # one status write per pass
            return CONFLICT_RETRY_SECONDS, "conflict"
        await self.writer.post(owner, self._announce(key, record, outcome.failures))
        scaled = True
        if result is not None:
            scaled = await self._apply_autoscale(owner, spec, result)
        _record_metrics(key, plan)
        # MTP acceptance without the autoscaler's scrape is looked at on its own cadence.
        accept_delay = (
            None
            if autoscale_controller.acceptance_source(spec) is None
            else float(spec.autoscaling.interval_seconds)
        )
        delays = [
            d for d in (plan.requeue_after, autoscale_delay, outcome.retry_in, accept_delay) if d is not None
        ]
        return (min(delays) if delays else None), ("ok" if scaled and not outcome.failures else "write_error")

    async def _patch_status(
        self, owner: resources.Owner, record: DeploymentRecord, status: LingDeploymentStatus
    ) -> bool:
        """The pass's one status patch, onto the version of the object it read; False when the object moved
        on meanwhile (409): the status was computed from what is no longer there, so it is not written."""
        try:
            await self.writer.patch_status(owner, record.status, status, record.resource_version)
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("%s/%s: the object changed during the pass; looking again", owner.namespace, owner.name)
            return False
        return True

    def _announce(self, key: Key, record: DeploymentRecord, failures: list[WriteFailure]) -> list[Event]:
        """One Warning event per distinct cause of refused writes (reason, verb, kind), not one per retry;
        a cause that clears is told again if it comes back."""
        causes: dict[tuple[str, str, str], WriteFailure] = {}
        for failure in failures:
            causes.setdefault(failure.cause, failure)
        known = self.announced.get(key)
        if known is None:
            # The first refusals this replica sees here: the stored status may already tell them (another
            # replica's, or this one's before a restart).
            stored = record.observed.condition(ConditionType.DEGRADED)
            told = stored.reason if stored is not None and stored.status == "True" else None
            known = {cause for cause in causes if cause[0] == told}
        events = [
            warning(
                f.reason,
                f"{f.describe()} (retrying with backoff; status.conditions Degraded says when it clears)",
            )
            for cause, f in causes.items()
            if cause not in known
        ]
        if causes:
            self.announced[key] = set(causes)
        else:
            self.announced.pop(key, None)
        return events

    def _forget(self, key: Key) -> None:
        self.autoscaled_at.pop(key, None)
        self.accepted_at.pop(key, None)
        self.announced.pop(key, None)
        self.writer.forget(key)
        self.pass_backoff.forget(key)

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

    async def _acceptance(
        self,
        record: DeploymentRecord,
        spec: LingDeploymentSpec,
        status: LingDeploymentStatus,
        pods: list[ObservedPod],
        now: datetime,
    ) -> LingDeploymentStatus:
        """MTP acceptance when the autoscaler's engine scrape does not read it: rank 0's /metrics at
        most once per spec.autoscaling.intervalSeconds (on passes: events and the resync)."""
        source = autoscale_controller.acceptance_source(spec)
        if source is None:
            return status
        last = self.accepted_at.get(record.key)
        if last is not None and (now - last).total_seconds() < spec.autoscaling.interval_seconds - 1:
            return status
        self.accepted_at[record.key] = now
        groups = observed_groups(status, pods)
        return await self.writer.call(autoscale_controller.acceptance_look, spec, status, groups, source)

    async def _apply_autoscale(
        self, owner: resources.Owner, spec: LingDeploymentSpec, result: autoscale_controller.AutoscaleResult
    ) -> bool:
        """After the status patch: the autoscaler's events, metrics and /scale write; False when the API
        refused the /scale write (the autoscaler decides again at its next look)."""
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
            try:
                await self.writer.scale(owner, result.replicas)
            except ApiException as exc:
                reason, code, message = classify(exc)
                metrics.write_failures_total.labels(reason).inc()
                log.warning(
                    "%s/%s: cannot set spec.replicas to %d (%s, HTTP %s): %s",
                    owner.namespace, owner.name, result.replicas, reason, code, message,
                )  # fmt: skip
                return False
        return True


def _record_metrics(key: Key, plan: reconcile.Plan) -> None:
    metrics.groups_desired.labels(*key).set(plan.status.desired_replicas)
    metrics.groups_ready.labels(*key).set(plan.status.ready_replicas)
    metrics.set_waiting(*key, plan.waiting)
    for _ in plan.restarted_groups:
        metrics.group_restarts_total.labels(*key).inc()
    for seconds in plan.rendezvous_seconds:
        metrics.rendezvous_duration_seconds.labels(*key).observe(seconds)
