"""The operator's Prometheus metrics (prefix ling_operator_, names fixed by docs/architecture.md).

One registry of our own, so tests and an embedding process never collide with the default one.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)
_PREFIX = "ling_operator_"
_DEPLOYMENT = ("namespace", "deployment")

reconcile_total = Counter(
    _PREFIX + "reconcile",
    "Reconcile passes by result: ok, write_error (a create, delete or patch was refused: status says why), "
    "conflict (the object moved under the pass: looked at again), fenced (stopped: the Lease had no time "
    "left), invalid_spec, error.",
    ["result"],
    registry=REGISTRY,
)
reconcile_duration_seconds = Histogram(
    _PREFIX + "reconcile_duration_seconds",
    "Time of one reconcile pass (read, decide, write).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
api_requests_total = Counter(
    _PREFIX + "api_requests",
    "Kubernetes API requests by verb, resource and HTTP code (timeout or connection when no answer came).",
    ["verb", "resource", "code"],
    registry=REGISTRY,
)
api_request_duration_seconds = Histogram(
    _PREFIX + "api_request_duration_seconds",
    "Time of one Kubernetes API request (until its answer, or its timeout).",
    ["verb"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
write_failures_total = Counter(
    _PREFIX + "write_failures",
    "Creates, deletes and patches the API refused or never answered, by the reason status names "
    "(QuotaExceeded, AdmissionDenied, Forbidden, InvalidObject, WriteConflict, APIServerError, APIUnreachable).",
    ["reason"],
    registry=REGISTRY,
)
fenced_writes_total = Counter(
    _PREFIX + "fenced_writes",
    "Writes not sent because this replica's Lease was not renewed in time (a deposed leader's writes).",
    registry=REGISTRY,
)
watch_restarts_total = Counter(
    _PREFIX + "watch_restarts",
    "Watch streams opened again after their first start (a reconnect, a re-list), by resource.",
    ["resource"],
    registry=REGISTRY,
)


def _per_deployment(name: str, documentation: str) -> Gauge:
    """A gauge labelled {namespace, deployment}."""
    return Gauge(_PREFIX + name, documentation, _DEPLOYMENT, registry=REGISTRY)


groups_desired = _per_deployment("groups_desired", "Serving groups wanted (spec.replicas).")
groups_ready = _per_deployment("groups_ready", "Serving groups whose every rank is ready.")
group_restarts_total = Counter(
    _PREFIX + "group_restarts",
    "Whole-group restarts after a rank failed, vanished or missed the rendezvous deadline.",
    _DEPLOYMENT,
    registry=REGISTRY,
)
rendezvous_duration_seconds = Histogram(
    _PREFIX + "rendezvous_duration_seconds",
    "Time from a group's creation (or placement) until every rank is ready.",
    _DEPLOYMENT,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
    registry=REGISTRY,
)
autoscaler_queue_depth = _per_deployment("autoscaler_queue_depth", "Total waiting requests last observed.")
autoscaler_desired_replicas = _per_deployment("autoscaler_desired_replicas", "Groups the autoscaler wants.")
autoscaler_current_replicas = _per_deployment(
    "autoscaler_current_replicas", "spec.replicas when last observed."
)
# spec.autoscaling.maxReplicas, so an alert can tell "pinned at max" from "scaling" (docs/observability.md).
autoscaler_max_replicas = _per_deployment("autoscaler_max_replicas", "spec.autoscaling.maxReplicas.")
scale_decisions_total = Counter(
    _PREFIX + "scale_decisions",
    "Autoscaler decisions that changed spec.replicas.",
    ["direction", "reason"],
    registry=REGISTRY,
)
autoscaler_source_errors_total = Counter(
    _PREFIX + "autoscaler_source_errors",
    "Failed reads of the queue-depth source.",
    _DEPLOYMENT,
    registry=REGISTRY,
)
groups_waiting = Gauge(
    _PREFIX + "groups_waiting",
    "Groups not serving yet, by why they wait (the scheduler's, kubelet's or API server's words): "
    "WaitingForGPUs, WaitingForVolume, NoMatchingNode, Unschedulable, ImagePullFailed, ContainerConfigError, "
    "PodsNotAdmitted.",
    ["namespace", "deployment", "reason"],
    registry=REGISTRY,
)
# Read at scrape time (controller.py sets its function): 1 only while this replica may act, so it drops as
# soon as the Lease was not renewed in time, even while the renewal itself still hangs.
leader = Gauge(
    _PREFIX + "leader",
    "1 on the replica that holds the leader Lease and renewed it within the renew deadline, else 0.",
    registry=REGISTRY,
)
_waiting: dict[tuple[str, str], set[str]] = {}


def set_waiting(namespace: str, deployment: str, counts: dict[str, int]) -> None:
    """groups_waiting of one deployment: the reasons in `counts`, and no series left for the others."""
    key = (namespace, deployment)
    for reason in _waiting.get(key, set()) - set(counts):
        with contextlib.suppress(KeyError):
            groups_waiting.remove(namespace, deployment, reason)
    for reason, n in counts.items():
        groups_waiting.labels(namespace, deployment, reason).set(n)
    if counts:
        _waiting[key] = set(counts)
    else:
        _waiting.pop(key, None)


def forget_deployment(namespace: str, deployment: str) -> None:
    """Drop a deleted deployment's series so dashboards do not show ghosts."""
    for metric in (
        groups_desired,
        groups_ready,
        autoscaler_queue_depth,
        autoscaler_desired_replicas,
        autoscaler_current_replicas,
        autoscaler_max_replicas,
    ):
        with contextlib.suppress(KeyError):
            metric.remove(namespace, deployment)
    set_waiting(namespace, deployment, {})


def serve(port: int, address: str) -> None:
    """Expose /metrics; the address is explicit so tests bind loopback only."""
    start_http_server(port, addr=address, registry=REGISTRY)
