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
    "Reconcile passes by result (ok, error, invalid_spec).",
    ["result"],
    registry=REGISTRY,
)
reconcile_duration_seconds = Histogram(
    _PREFIX + "reconcile_duration_seconds",
    "Time of one reconcile pass (read, decide, write).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
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
leader = Gauge(_PREFIX + "leader", "1 on the replica that holds the leader Lease, else 0.", registry=REGISTRY)


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


def serve(port: int, address: str) -> None:
    """Expose /metrics; the address is explicit so tests bind loopback only."""
    start_http_server(port, addr=address, registry=REGISTRY)
