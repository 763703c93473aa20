"""MTP acceptance in status: rank 0's measured rate per group (and their mean for `kubectl get lingd`),
read by the autoscaler's engine scrape from real /metrics servers (the runtime's own metrics module)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import pytest
from ling_operator.api import LingDeploymentStatus
from ling_operator.autoscale_controller import acceptance_look, acceptance_source, mtp_acceptance
from ling_operator.autoscale_sources import EngineSource, ObservedGroup, parse_mtp_acceptance
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from tests.autoscale.exporter import EngineMetrics, serve_metrics
from tests.autoscale.test_controller import T0, apply, body, spec_of, tick, tick_writes


def mtp_body(**spec: Any) -> dict[str, Any]:
    doc = body(replicas=2, minReplicas=2)  # two groups throughout: no scale-down writes
    doc["spec"]["speculative"] = {"enabled": True}
    doc["spec"].update(spec)
    doc["status"] = {"groups": [{"index": 0, "phase": "Ready"}, {"index": 1, "phase": "Ready"}]}
    return doc


def drafted(metrics: EngineMetrics, drafts: int, accepted: int) -> None:
    runtime = metrics._runtime  # the runtime's RuntimeMetrics: the names the engine really exports
    runtime.spec_draft_tokens.inc(drafts)
    runtime.spec_accepted_tokens.inc(accepted)


@pytest.fixture
def engines() -> Iterator[tuple[EngineSource, list[EngineMetrics], list[ObservedGroup]]]:
    metrics = [EngineMetrics("native") for _ in range(2)]
    with ExitStack() as stack:
        port = stack.enter_context(serve_metrics(metrics[0], "127.0.0.1")).server_address[1]
        stack.enter_context(serve_metrics(metrics[1], "127.0.0.2", port))
        groups = [ObservedGroup(i, f"127.0.0.{i + 1}", ready=True) for i in range(2)]
        yield EngineSource(port=port, timeout_seconds=2), metrics, groups


def rates(doc: dict[str, Any]) -> tuple[list[float | None], float | None]:
    status = doc["status"]
    return [g.get("mtpAcceptanceRate") for g in status["groups"]], status.get("mtpAcceptanceRate")


def test_each_groups_rank0_rate_and_their_mean(engines: Any) -> None:
    source, metrics, groups = engines
    drafted(metrics[0], 300, 240)  # 0.8
    drafted(metrics[1], 300, 180)  # 0.6
    doc = apply(mtp_body(), tick(mtp_body(), groups, source, T0))
    assert rates(doc) == ([0.8, 0.6], 0.7)


def test_steady_acceptance_writes_nothing_and_a_change_writes_once(engines: Any) -> None:
    source, metrics, groups = engines
    drafted(metrics[0], 400, 300)
    drafted(metrics[1], 400, 300)
    doc, wrote = tick_writes(mtp_body(), groups, source, T0, ticks=10)
    assert wrote == [0] and rates(doc) == ([0.75, 0.75], 0.75)
    drafted(metrics[1], 400, 0)  # group 1 now accepts nothing: 300 / 800
    doc, wrote = tick_writes(doc, groups, source, T0 + timedelta(minutes=5), ticks=5)
    assert wrote == [0] and rates(doc) == ([0.75, 0.38], 0.56)


def test_no_value_before_the_first_draft_nor_for_a_group_not_serving(engines: Any) -> None:
    source, metrics, groups = engines
    drafted(metrics[0], 10, 5)
    doc = mtp_body()
    doc["status"]["groups"][1]["mtpAcceptanceRate"] = 0.9  # from before its restart
    not_ready = [groups[0], ObservedGroup(1, "127.0.0.2", ready=False)]
    doc = apply(doc, tick(doc, not_ready, source, T0))
    assert rates(doc) == ([0.5, None], 0.5)
    fresh = mtp_body()
    doc = apply(fresh, tick(fresh, [groups[1]], source, T0))  # group 1 never drafted: no rate yet
    assert rates(doc)[0][1] is None


def test_mtp_off_clears_the_rates_and_a_disabled_autoscaler_keeps_them(engines: Any) -> None:
    source, metrics, groups = engines
    drafted(metrics[0], 10, 10)
    off = mtp_body(speculative={"enabled": False})
    off["status"]["groups"][0]["mtpAcceptanceRate"] = 0.5
    off["status"]["mtpAcceptanceRate"] = 0.5
    assert rates(apply(off, tick(off, groups, source, T0))) == ([None, None], None)
    disabled = mtp_body()
    disabled["spec"]["autoscaling"]["enabled"] = False
    disabled["status"]["groups"][0]["mtpAcceptanceRate"] = 0.5
    # The controller's acceptance look owns them then (see the test below): the tick leaves them.
    assert rates(apply(disabled, tick(disabled, groups, source, T0))) == ([0.5, None], None)


def test_no_reading_leaves_groups_untouched_by_identity() -> None:
    doc = mtp_body()
    status = LingDeploymentStatus.model_validate(doc["status"])
    update = mtp_acceptance(spec_of(doc), status, None)
    assert update["groups"] == status.groups and update["mtp_acceptance_rate"] is None


def exposition(*metrics: tuple[type, str, float]) -> str:
    registry = CollectorRegistry()
    for kind, name, value in metrics:
        metric = kind(name, name, registry=registry)
        metric.inc(value) if kind is Counter else metric.set(value)
    return generate_latest(registry).decode()


def test_each_engines_names() -> None:
    vllm = exposition(
        (Counter, "vllm:spec_decode_num_accepted_tokens", 30),
        (Counter, "vllm:spec_decode_num_draft_tokens", 40),
    )
    assert parse_mtp_acceptance(vllm, "vllm") == 0.75
    sglang = exposition((Gauge, "sglang:spec_accept_rate", 0.62))
    assert parse_mtp_acceptance(sglang, "sglang") == 0.62
    assert parse_mtp_acceptance(exposition((Gauge, "sglang:num_queue_reqs", 1)), "sglang") is None
    assert parse_mtp_acceptance("not { metrics", "native") is None


def test_acceptance_is_looked_at_without_the_autoscalers_engine_scrape(engines: Any) -> None:
    _, metrics, groups = engines
    drafted(metrics[0], 100, 90)
    drafted(metrics[1], 100, 70)
    off = mtp_body()
    off["spec"]["autoscaling"]["enabled"] = False
    # Autoscaling off (or a Prometheus source): the controller's own look scrapes rank 0.
    assert acceptance_source(spec_of(mtp_body())) is None  # the autoscaler's scrape already reads it
    source = acceptance_source(spec_of(off))
    assert isinstance(source, EngineSource)
    plain = mtp_body()
    plain["spec"]["speculative"] = {"enabled": False}
    plain["spec"]["autoscaling"]["enabled"] = False
    assert acceptance_source(spec_of(plain)) is None  # MTP off: nothing to show
    port = engines[0].port
    looked = acceptance_look(
        spec_of(off), LingDeploymentStatus.model_validate(off["status"]), groups, EngineSource(port=port)
    )
    off["status"] = looked.to_k8s()
    assert rates(off) == ([0.9, 0.7], 0.8)
    # The disabled autoscaler's look between two acceptance looks keeps the rates (no flapping writes).
    off = apply(off, tick(off, groups, engines[0], T0))
    assert rates(off) == ([0.9, 0.7], 0.8)
