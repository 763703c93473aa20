"""The controller glue: LingDeployment body + observed groups + a real source + clock -> result."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ling_operator.api import (
    AutoscalerStatus,
    ConditionType,
    LingDeploymentSpec,
    LingDeploymentStatus,
    Reason,
)
from ling_operator.autoscale_controller import (
    AutoscaleResult,
    ObservedGroup,
    SourceConfigError,
    autoscale_tick,
    is_due,
    make_source,
)
from ling_operator.autoscale_sources import EngineSource, MetricSource, PrometheusSource

from tests.autoscale.exporter import EngineMetrics, serve_metrics

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def body(replicas: int = 2, status: dict[str, Any] | None = None, **autoscaling: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "ling", "namespace": "ns", "generation": 3},
        "spec": {
            "replicas": replicas,
            "model": {"source": {"builtin": {}}},
            "engine": {"type": "native"},
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 6, **autoscaling},
        },
        "status": status or {},
    }


def spec_of(doc: dict[str, Any]) -> LingDeploymentSpec:
    return LingDeploymentSpec.model_validate(doc["spec"])


def tick(
    doc: dict[str, Any],
    groups: list[ObservedGroup],
    source: MetricSource,
    now: datetime,
    last_tick: datetime | None = None,
) -> AutoscaleResult | None:
    """One look, on the object as stored (the operator validates it once, then passes the models)."""
    status = LingDeploymentStatus.model_validate(doc["status"])
    return autoscale_tick(spec_of(doc), status, doc["metadata"]["generation"], groups, source, now, last_tick)


def written(result: AutoscaleResult | None) -> dict[str, Any]:
    """The status as the operator writes it (and the API server stores it)."""
    assert result is not None
    return result.status.to_k8s()


def apply(doc: dict[str, Any], result: AutoscaleResult | None) -> dict[str, Any]:
    """What the operator does with a result: /scale, then the status patch (stored as written)."""
    assert result is not None
    if result.replicas is not None:
        doc["spec"]["replicas"] = result.replicas
    doc["status"] = written(result)
    return doc


@pytest.fixture
def cluster() -> Iterator[tuple[EngineSource, list[EngineMetrics], list[ObservedGroup]]]:
    metrics = [EngineMetrics("native") for _ in range(3)]
    with ExitStack() as stack:
        port = stack.enter_context(serve_metrics(metrics[0], "127.0.0.1")).server_address[1]
        for i in (1, 2):
            stack.enter_context(serve_metrics(metrics[i], f"127.0.0.{i + 1}", port))
        groups = [ObservedGroup(i, f"127.0.0.{i + 1}", ready=True) for i in range(3)]
        yield EngineSource(port=port, timeout_seconds=2), metrics, groups


def test_disabled_never_touches_replicas(cluster: Any) -> None:
    source, metrics, groups = cluster
    metrics[0].set(500)
    doc = body(enabled=False)
    result = tick(doc, groups[:2], source, T0)
    assert result is not None and result.replicas is None and result.status.autoscaler is None
    [condition] = written(result)["conditions"]
    assert (condition["type"], condition["status"], condition["reason"]) == (
        ConditionType.SCALING_ACTIVE,
        "False",
        Reason.AUTOSCALING_DISABLED,
    )


def test_scale_up_event_status_and_conditions(cluster: Any) -> None:
    source, metrics, groups = cluster
    metrics[0].set(20, 16)
    metrics[1].set(17, 16)
    doc = body(replicas=2, maxScaleUpStep=2)
    result = tick(doc, groups[:2], source, T0)
    assert result is not None and result.replicas == 4
    assert [(e.type, e.reason, e.message) for e in result.events] == [
        ("Normal", Reason.SCALING_UP, "scaled 2 → 4: 37 waiting > 2 × 8 per group")
    ]
    autoscaler = written(result)["autoscaler"]
    # The status is exactly what the API accepts (no unknown field, right types).
    AutoscalerStatus.model_validate(autoscaler)
    assert written(result)["queueDepth"] == 37
    assert autoscaler["observedRunning"] == 32 and autoscaler["recommendation"] == 5
    assert autoscaler["history"] == [
        {"time": "2026-01-01T12:00:00Z", "from": 2, "to": 4, "reason": "37 waiting > 2 × 8 per group"}
    ]
    assert autoscaler["groupCapacity"] == 16
    conditions = {c["type"]: c for c in written(result)["conditions"]}
    assert conditions[ConditionType.SCALING_ACTIVE]["status"] == "True"
    assert conditions[ConditionType.SCALING_LIMITED]["reason"] == Reason.RATE_LIMITED
    assert conditions[ConditionType.SCALING_ACTIVE]["observedGeneration"] == 3
    assert result.metrics is not None
    assert (result.metrics.direction, result.metrics.reason, result.metrics.desired_replicas) == (
        "up",
        "queue_depth",
        4,
    )


def test_interval_and_state_round_trip_through_status(cluster: Any) -> None:
    source, metrics, groups = cluster
    doc = body(replicas=3, intervalSeconds=15, scaleDownStabilizationSeconds=60)
    metrics[0].set(30, 16)
    doc = apply(doc, tick(doc, groups, source, T0))
    assert doc["spec"]["replicas"] == 4
    stored = doc["status"]["autoscaler"]
    assert stored["recommendations"][-1] == {"time": "2026-01-01T12:00:00Z", "replicas": 4}
    assert stored["lastObservationTime"] == "2026-01-01T12:00:00Z"
    assert tick(doc, groups, source, T0 + timedelta(seconds=5)) is None  # not due
    due = spec_of(doc).autoscaling, AutoscalerStatus.model_validate(doc["status"]["autoscaler"])
    assert not is_due(*due, T0 + timedelta(seconds=5)) and is_due(*due, T0 + timedelta(seconds=15))
    # The learned capacity (16 per saturated group) came back from status: 40 running need 3 groups even
    # with an empty queue.
    metrics[0].set(0, 40)
    groups4 = [*groups, ObservedGroup(3, None, ready=False)]
    later = tick(doc, groups4, source, T0 + timedelta(seconds=15))
    assert later is not None and written(later)["autoscaler"]["recommendation"] == 3


def test_scale_down_respects_the_window_across_ticks(cluster: Any) -> None:
    source, metrics, groups = cluster
    doc = body(replicas=3, scaleDownStabilizationSeconds=60, maxScaleDownStep=1)
    for m in metrics:
        m.set(0, 0)
    sizes = []
    for step in range(7):
        result = tick(doc, groups[: doc["spec"]["replicas"]], source, T0 + timedelta(seconds=15 * step))
        assert result is not None
        doc = apply(doc, result)
        sizes.append(doc["spec"]["replicas"])
    # Fresh autoscaler: the current size counts as recommended at T0, so nothing goes before 60 s, then
    # one group per decision.
    assert sizes == [3, 3, 3, 3, 2, 1, 1]
    history = doc["status"]["autoscaler"]["history"]
    assert [(h["from"], h["to"]) for h in history] == [(3, 2), (2, 1)]
    assert doc["status"]["conditions"][1]["reason"] == Reason.AT_MIN_REPLICAS


def test_source_error_keeps_size_warns_once(cluster: Any) -> None:
    _, _, groups = cluster
    dead = EngineSource(port=9, timeout_seconds=0.5)
    doc = body(replicas=2)
    first = tick(doc, groups[:2], dead, T0)
    assert first is not None and first.replicas is None
    active = written(first)["conditions"][0]
    assert (active["status"], active["reason"]) == ("False", Reason.SOURCE_ERROR)
    assert "queue depth unknown" in active["message"]
    assert written(first)["autoscaler"]["sourceError"] is not None
    assert [e.type for e in first.events] == ["Warning"]
    assert first.metrics is not None and first.metrics.source_error
    doc = apply(doc, first)
    second = tick(doc, groups[:2], dead, T0 + timedelta(seconds=15))
    assert second is not None and second.events == []  # same error: no new event
    assert written(second)["conditions"][0]["lastTransitionTime"] == active["lastTransitionTime"]


def test_history_keeps_the_last_ten(cluster: Any) -> None:
    source, metrics, groups = cluster
    old = [{"time": "2026-01-01T11:00:00Z", "from": 1, "to": 2, "reason": "old"}] * 10
    doc = body(replicas=1, status={"autoscaler": {"history": old}}, maxScaleUpStep=2)
    metrics[0].set(40)
    result = tick(doc, groups[:1], source, T0)
    assert result is not None and len(written(result)["autoscaler"]["history"]) == 10
    assert written(result)["autoscaler"]["history"][-1]["to"] == 3


def tick_writes(
    doc: dict[str, Any],
    groups: list[ObservedGroup],
    source: EngineSource,
    start: datetime,
    ticks: int,
    every: float = 15,
) -> tuple[dict[str, Any], list[int]]:
    """Run `ticks` autoscaler looks `every` seconds apart; returns the doc and the ticks that wrote status
    (a status change or a scale: anything the operator would send to the API server)."""
    wrote = []
    last: datetime | None = None
    for n in range(ticks):
        now = start + timedelta(seconds=every * n)
        before = json.dumps(doc, sort_keys=True)
        result = tick(doc, groups[: doc["spec"]["replicas"]], source, now, last_tick=last)
        assert result is not None
        last = now
        doc = apply(doc, result)
        if json.dumps(doc, sort_keys=True) != before:
            wrote.append(n)
    return doc, wrote


def test_steady_state_zero_queue_writes_nothing_after_the_first_look(cluster: Any) -> None:
    source, metrics, groups = cluster
    for m in metrics:
        m.set(0, 0)
    doc, wrote = tick_writes(body(replicas=1), groups, source, T0, ticks=40)  # 10 minutes
    assert wrote == [0]  # the first look records the recommendation run and the conditions, then nothing
    auto = doc["status"]["autoscaler"]
    assert auto["observedQueueDepth"] == 0 and auto["lastObservationTime"] == "2026-01-01T12:00:00Z"
    # Something a person needs changes -> one write, then quiet again.
    metrics[0].set(3, 1)
    doc, wrote = tick_writes(doc, groups, source, T0 + timedelta(minutes=10), ticks=8)
    assert wrote == [0] and doc["status"]["autoscaler"]["observedQueueDepth"] == 3


def test_a_scale_down_window_holds_across_unwritten_looks_and_a_restart(cluster: Any) -> None:
    source, metrics, groups = cluster
    doc = body(replicas=3, scaleDownStabilizationSeconds=120)
    metrics[0].set(20, 16)  # 3 groups recommended
    doc, wrote = tick_writes(doc, groups, source, T0, ticks=2)
    assert wrote == [0] and doc["spec"]["replicas"] == 3
    for m in metrics:
        m.set(0, 0)
    # The drop is written once (a new recommendation run); the looks after it change nothing.
    doc, wrote = tick_writes(doc, groups, source, T0 + timedelta(seconds=30), ticks=7)
    assert wrote == [0] and doc["spec"]["replicas"] == 3
    runs = doc["status"]["autoscaler"]["recommendations"]
    assert [r["replicas"] for r in runs] == [3, 1] and runs[1]["time"] == "2026-01-01T12:00:30Z"
    # An operator started now has only the stored status (no memory of its looks): the window still
    # counts from 12:00:30, so the scale-down comes at 12:02:30 (120 s), not 120 s after the restart.
    restarted = json.loads(json.dumps(doc))
    at = T0 + timedelta(seconds=135)
    assert tick(restarted, groups[:3], source, at).replicas is None  # 105 s of 120
    down = tick(restarted, groups[:3], source, T0 + timedelta(seconds=150))
    assert down is not None and down.replicas == 1


def test_not_due_counts_from_the_last_look_even_when_it_was_not_written(cluster: Any) -> None:
    source, _, groups = cluster
    doc = body(replicas=1, status={"autoscaler": {"lastObservationTime": "2026-01-01T11:00:00Z"}})
    due = spec_of(doc).autoscaling, AutoscalerStatus.model_validate(doc["status"]["autoscaler"])
    assert is_due(*due, T0)
    assert not is_due(*due, T0 + timedelta(seconds=5), last_tick=T0)
    assert tick(doc, groups[:1], source, T0 + timedelta(seconds=5), last_tick=T0) is None
    assert is_due(*due, T0 + timedelta(seconds=15), last_tick=T0)


def test_flap_damping_memory_round_trips_through_status(cluster: Any) -> None:
    source, metrics, groups = cluster
    doc = body(replicas=1, scaleDownStabilizationSeconds=60, maxScaleDownStep=4)
    sizes = []
    # Load: 2 min of demand for 3 groups, 75 s idle, demand again: the scale-down after 60 s idle is
    # undone 15 s later, so the window in force doubles to 120 s -- and the stored status carries it.
    for n, waiting in enumerate([20] * 8 + [0] * 5 + [20] * 2):
        metrics[0].set(waiting, 16 if waiting else 0)
        result = tick(
            json.loads(json.dumps(doc)),
            groups[: doc["spec"]["replicas"]],
            source,
            T0 + timedelta(seconds=15 * n),
        )
        assert result is not None
        doc = apply(doc, result)
        sizes.append(doc["spec"]["replicas"])
    assert sizes == [3] * 12 + [1, 3, 3]
    auto = doc["status"]["autoscaler"]
    AutoscalerStatus.model_validate(auto)
    assert auto["scaleDownWindowSeconds"] == 120 and auto["dampedUntil"] == "2026-01-01T12:07:15Z"
    assert "premature, scale-down window now 120s" in auto["history"][-1]["reason"]
    assert "lastScaleDownTime" not in auto  # consumed by the scale-up that undid it


def test_make_source_engine_and_prometheus_with_secret() -> None:
    engine = make_source(spec_of(body(source={"type": "engine", "engine": {"timeoutSeconds": 3}})))
    assert isinstance(engine, EngineSource) and engine.timeout_seconds == 3 and engine.engine == "native"
    reads: list[tuple[str, str]] = []

    def read_secret(name: str, key: str) -> str:
        reads.append((name, key))
        return "tok"

    prom_spec = {
        "type": "prometheus",
        "prometheus": {
            "url": "http://prom:9090",
            "query": "sum(ling_runtime_num_queue_reqs)",
            "authSecretRef": {"name": "prom-auth", "key": "token"},
        },
    }
    prom = make_source(spec_of(body(source=prom_spec)), read_secret)
    assert isinstance(prom, PrometheusSource) and prom.authorization == "Bearer tok"
    assert reads == [("prom-auth", "token")]
    with pytest.raises(SourceConfigError, match="authSecretRef"):
        make_source(spec_of(body(source=prom_spec)))


def test_naive_clock_is_rejected(cluster: Any) -> None:
    source, _, groups = cluster
    with pytest.raises(ValueError, match="timezone-aware"):
        tick(body(), groups, source, datetime(2026, 1, 1))
