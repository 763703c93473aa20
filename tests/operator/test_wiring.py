"""The operator's shell pieces that are plain functions: CLI flags, metric names, status patches."""

from __future__ import annotations

import pytest
from ling_operator import cache, cli, controller, metrics, resources, writes
from ling_operator.api import LingDeploymentStatus
from podstate import OWNER, base_spec, group_pods, observed, ready, running
from prometheus_client import generate_latest

ARCHITECTURE_METRICS = [
    "ling_operator_reconcile_total",
    "ling_operator_reconcile_duration_seconds",
    "ling_operator_groups_desired",
    "ling_operator_groups_ready",
    "ling_operator_group_restarts_total",
    "ling_operator_rendezvous_duration_seconds",
    "ling_operator_autoscaler_queue_depth",
    "ling_operator_autoscaler_desired_replicas",
    "ling_operator_autoscaler_current_replicas",
    "ling_operator_autoscaler_max_replicas",
    "ling_operator_scale_decisions_total",
    "ling_operator_autoscaler_source_errors_total",
    "ling_operator_leader",
    "ling_operator_api_requests_total",
    "ling_operator_api_request_duration_seconds",
    "ling_operator_write_failures_total",
    "ling_operator_fenced_writes_total",
    "ling_operator_watch_restarts_total",
    "ling_operator_groups_waiting",
]


def test_metric_names_follow_the_architecture_contract() -> None:
    metrics.reconcile_total.labels("ok").inc()
    metrics.groups_ready.labels("ns", "d").set(2)
    metrics.group_restarts_total.labels("ns", "d").inc()
    metrics.scale_decisions_total.labels("up", "queue").inc()
    metrics.autoscaler_source_errors_total.labels("ns", "d").inc()
    metrics.rendezvous_duration_seconds.labels("ns", "d").observe(3)
    metrics.api_requests_total.labels("create", "pods", "403").inc()
    metrics.api_request_duration_seconds.labels("create").observe(0.01)
    metrics.write_failures_total.labels("QuotaExceeded").inc()
    metrics.watch_restarts_total.labels("pods").inc()
    metrics.set_waiting("ns", "d", {"WaitingForGPUs": 1})
    text = generate_latest(metrics.REGISTRY).decode()
    for name in ARCHITECTURE_METRICS:
        assert f"# TYPE {name.removesuffix('_total')}" in text or f"# TYPE {name} " in text, name
    assert 'ling_operator_groups_ready{deployment="d",namespace="ns"} 2.0' in text
    metrics.forget_deployment("ns", "d")
    assert 'ling_operator_groups_ready{deployment="d"' not in generate_latest(metrics.REGISTRY).decode()


def test_cli_flags() -> None:
    args = cli.build_parser().parse_args(
        ["--kubeconfig", "/k", "--namespace", "a", "--namespace", "b", "--metrics-port", "9000"]
    )
    assert args.namespaces == ["a", "b"]
    assert (args.kubeconfig, args.metrics_port, args.health_port) == ("/k", 9000, 8081)
    default = cli.build_parser().parse_args([])
    assert default.namespaces == []  # all namespaces
    assert default.metrics_port == 8080


@pytest.mark.parametrize(
    "argv",
    [
        ["--metrics-port", "70000"],
        ["--lease-duration", "1"],
        ["--renew-deadline", "15"],  # not shorter than the 15 s Lease
        ["--max-retry-seconds", "0"],
    ],
)
def test_cli_rejects_bad_values_naming_the_flag(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match=argv[0]):
        cli.main(argv)


def test_observed_groups_for_the_autoscaler() -> None:
    spec = base_spec(replicas=2)
    pods = observed(group_pods(spec, 0, ready) + group_pods(spec, 1, running))
    status = LingDeploymentStatus.model_validate(
        {"groups": [{"index": 0, "phase": "Ready"}, {"index": 1, "phase": "Loading"}]}
    )
    groups = controller.observed_groups(status, pods)
    assert [(g.index, g.rank0_ip, g.ready) for g in groups] == [(0, "10.0.0.1", True), (1, "10.0.0.1", False)]
    assert resources.build_pod(OWNER, spec, 1, 0)["metadata"]["name"] == "ling-1-0"


def test_status_patch_is_the_difference_and_empty_in_steady_state() -> None:
    stored = {"replicas": 1, "autoscaler": {"recommendation": 2, "sourceError": "x"}, "queueDepth": 3}
    new = {"replicas": 1, "autoscaler": {"recommendation": 2}, "groups": []}
    assert writes.merge_patch(stored, new) == {
        "autoscaler": {"sourceError": None},
        "queueDepth": None,
        "groups": [],
    }
    assert writes.merge_patch(new, new) == {}


def test_a_status_the_model_refuses_counts_as_none() -> None:
    assert cache.parse_status({"groups": [{"phase": "Sideways"}]}, {}) == LingDeploymentStatus()
