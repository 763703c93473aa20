"""The autoscaler's glue: one look at one LingDeployment, from its typed spec and status to a result.

Entry points (the controller calls these; everything else here is an implementation detail):

    make_source(spec, read_secret=None) -> MetricSource
        The metric source named by spec.autoscaling.source. `read_secret(name, key)` returns the value of a
        key of a Secret in the LingDeployment's namespace (only called for prometheus.authSecretRef).
        Raises SourceConfigError (a ValueError naming the field) on a bad source spec.

    autoscale_tick(spec, status, generation, groups, source, now, last_tick=None) -> AutoscaleResult | None
        groups:    one ObservedGroup per existing group: index, rank-0 pod IP, ready flag.
        source:    from make_source (the only side effect here is source.read()).
        now:       aware datetime; the clock is an argument so tests and the simulation drive it.
        last_tick: when the caller last looked at this deployment (its own memory; optional).
        Returns None when the deployment is not due (less than spec.autoscaling.intervalSeconds since the
        later of status.autoscaler.lastObservationTime and last_tick): no scrape happened. Otherwise:
          - result.replicas: spec.replicas to set through the scale subresource (None: leave it);
          - result.status: `status` with the autoscaler's part in it: status.autoscaler and queueDepth
            when something a person or the policy needs changed (a look that changes nothing but the
            time leaves them as they were: steady state writes nothing), and the ScalingActive and
            ScalingLimited conditions;
          - result.events: to post on the LingDeployment;
          - result.metrics: values for the ling_operator_autoscaler_* metrics.
    With spec.autoscaling.enabled false the result only carries ScalingActive=False/AutoscalingDisabled:
    the operator never touches spec.replicas, so HPA or KEDA can drive the scale subresource.

    source_config_error(status, generation, message, now) -> LingDeploymentStatus
        The status when make_source refused the spec: ScalingActive=False/SourceError naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ling_operator import conditions
from ling_operator.api import (
    AutoscalerStatus,
    AutoscalingSpec,
    Condition,
    ConditionType,
    LingDeploymentSpec,
    LingDeploymentStatus,
    Reason,
    RecommendationRun,
    ScaleEvent,
)
from ling_operator.autoscale import (
    Decision,
    PolicyInput,
    PolicyState,
    Recommendation,
    decide,
    history_seconds,
    prune_recommendations,
)
from ling_operator.autoscale_sources import (
    EngineSource,
    MetricSource,
    ObservedGroup,
    PrometheusSource,
    SourceConfigError,
    SourceReading,
    authorization_header,
)
from ling_operator.events import Event, normal, warning
from ling_operator.timeutil import whole_seconds

__all__ = [
    "AutoscaleMetrics",
    "AutoscaleResult",
    "ObservedGroup",
    "SourceConfigError",
    "autoscale_tick",
    "is_due",
    "make_source",
    "mtp_acceptance",
    "source_config_error",
]

HISTORY_LENGTH = 10


@dataclass(frozen=True)
class AutoscaleMetrics:
    """Values for the operator's autoscaler metrics (labels: the deployment's namespace/name)."""

    queue_depth: float | None
    desired_replicas: int
    current_replicas: int
    direction: str  # up | down | none
    reason: str  # low-cardinality reason code for scale_decisions_total
    source_error: bool


@dataclass(frozen=True)
class AutoscaleResult:
    replicas: int | None
    status: LingDeploymentStatus
    events: list[Event] = field(default_factory=list)
    metrics: AutoscaleMetrics | None = None


def make_source(
    spec: LingDeploymentSpec, read_secret: Callable[[str, str], str] | None = None
) -> MetricSource:
    """The source named by spec.autoscaling.source (reads the auth Secret through `read_secret`)."""
    source = spec.autoscaling.source
    if source.type == "engine":
        return EngineSource(engine=spec.engine.type, timeout_seconds=source.engine.timeout_seconds)
    prom = source.prometheus
    if prom is None:
        raise SourceConfigError(
            "spec.autoscaling.source.prometheus is required when spec.autoscaling.source.type is prometheus"
        )
    authorization = None
    if prom.auth_secret_ref is not None:
        if read_secret is None:
            raise SourceConfigError(
                "spec.autoscaling.source.prometheus.authSecretRef is set but no Secret reader was given"
            )
        ref = prom.auth_secret_ref
        authorization = authorization_header(read_secret(ref.name, ref.key))
    return PrometheusSource(
        url=prom.url, query=prom.query, timeout_seconds=prom.timeout_seconds, authorization=authorization
    )


def is_due(
    autoscaling: AutoscalingSpec,
    previous: AutoscalerStatus | None,
    now: datetime,
    last_tick: datetime | None = None,
) -> bool:
    """True when intervalSeconds have passed since the last observation (or there was none).

    `last_tick` is the caller's memory of its last look: observations that change nothing are not
    written, so status.autoscaler.lastObservationTime alone can be older than the last look."""
    stored = None if previous is None else previous.last_observation_time
    times = [t for t in (stored, last_tick) if t is not None]
    if not times:
        return True
    # One second of slack: timestamps are stored to the second and timers drift.
    return (now - max(times)).total_seconds() >= autoscaling.interval_seconds - 1


def _moment(epoch: float | None) -> datetime | None:
    """A policy time (epoch seconds) as status stores it: whole seconds."""
    return None if epoch is None else whole_seconds(datetime.fromtimestamp(epoch, UTC))


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _positive(value: int | None) -> int | None:
    return value if value is not None and value > 0 else None


def _state_from_status(previous: AutoscalerStatus) -> PolicyState:
    window = _positive(previous.scale_down_window_seconds)
    return PolicyState(
        tuple(Recommendation(r.time.timestamp(), r.replicas) for r in previous.recommendations),
        group_capacity=_positive(previous.group_capacity),
        scale_up_target=_positive(previous.scale_up_target),
        scale_down_window=None if window is None else float(window),
        last_scale_down=_epoch(previous.last_scale_down_time),
        damped_until=_epoch(previous.damped_until),
        below_since=_epoch(previous.below_since),
    )


def _runs(runs: Sequence[Recommendation]) -> list[RecommendationRun]:
    return [RecommendationRun(time=_moment(r.time), replicas=r.replicas) for r in runs]


def _meaningful(autoscaler: AutoscalerStatus, spec: AutoscalingSpec, now: datetime) -> dict[str, Any]:
    """What of status.autoscaler a person or the policy needs, in a form where equal means equal.

    Left out: lastObservationTime (it changes with every look; writing it would make every interval a
    write) and empty lists. Recommendation runs are compared after pruning at `now`: a run that dropped
    out of every window changes nothing the windows read."""
    out = autoscaler.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude={"last_observation_time"}
    )
    out = {k: v for k, v in out.items() if v != []}
    runs = _state_from_status(autoscaler).recommendations
    pruned = prune_recommendations(runs, now.timestamp(), history_seconds(spec))
    out.pop("recommendations", None)
    if pruned:
        out["recommendations"] = [r.model_dump(mode="json") for r in _runs(pruned)]
    return out


def _autoscaler_status(
    previous: AutoscalerStatus, decision: Decision, reading: SourceReading, current: int, now: datetime
) -> AutoscalerStatus:
    stamp = whole_seconds(now)
    state = decision.state
    status = AutoscalerStatus(
        observed_queue_depth=None if reading.total_waiting is None else round(reading.total_waiting),
        observed_running=None if reading.total_running is None else round(reading.total_running),
        recommendation=decision.recommendation,
        last_scale_time=previous.last_scale_time,
        last_scale_reason=previous.last_scale_reason,
        last_observation_time=stamp,
        source_error=reading.error,
        history=list(previous.history),
        unreadable_groups=list(decision.unreadable_groups),
        recommendations=_runs(state.recommendations),
        group_capacity=state.group_capacity,
        scale_up_target=state.scale_up_target,
        scale_down_window_seconds=None if state.scale_down_window is None else round(state.scale_down_window),
        damped_until=_moment(state.damped_until),
        last_scale_down_time=_moment(state.last_scale_down),
        below_since=_moment(state.below_since),
    )
    if decision.direction != "none":
        status.last_scale_time = stamp
        status.last_scale_reason = decision.message
        status.history.append(
            ScaleEvent(time=stamp, from_=current, to=decision.desired, reason=decision.message)
        )
    status.history = status.history[-HISTORY_LENGTH:]
    return status


def _events(
    spec: LingDeploymentSpec,
    previous: AutoscalerStatus,
    decision: Decision,
    reading: SourceReading,
    source: MetricSource,
) -> list[Event]:
    current = spec.replicas
    events: list[Event] = []
    if decision.direction != "none":
        reason = Reason.SCALING_UP if decision.direction == "up" else Reason.SCALING_DOWN
        events.append(normal(reason, f"scaled {current} → {decision.desired}: {decision.message}"))
    if reading.error and reading.error != previous.source_error:
        events.append(warning(Reason.SOURCE_ERROR, decision.message))
    unreadable_changed = list(decision.unreadable_groups) != previous.unreadable_groups
    if decision.unreadable_groups and not reading.error and unreadable_changed:
        detail = "; ".join(f"group {g.index}: {g.error}" for g in reading.groups if g.error)
        events.append(warning("MetricsUnreadable", f"not scaling down while unreadable: {detail}"))
    autoscaling = spec.autoscaling
    if (
        autoscaling.scale_to_zero.enabled
        and not source.sees_demand_at_zero
        and not previous.last_observation_time
    ):
        note = (
            "scaleToZero needs the prometheus source (the engine source sees no demand at zero groups); "
            f"keeping at least minReplicas {autoscaling.min_replicas}"
        )
        events.append(warning("ScaleToZeroUnavailable", note))
    return events


def _conditions(decision: Decision, reading: SourceReading, source: MetricSource) -> list[Condition]:
    if reading.error:
        active = conditions.condition(
            ConditionType.SCALING_ACTIVE, "False", Reason.SOURCE_ERROR, decision.message
        )
    else:
        active = conditions.condition(
            ConditionType.SCALING_ACTIVE,
            "True",
            Reason.METRICS_AVAILABLE,
            f"{source.kind} source: {decision.message}",
        )
    limited_status = "False" if decision.limited == Reason.WITHIN_BOUNDS else "True"
    limited = conditions.condition(
        ConditionType.SCALING_LIMITED, limited_status, decision.limited, decision.limited_message
    )
    return [active, limited]


def mtp_acceptance(
    spec: LingDeploymentSpec, status: LingDeploymentStatus, reading: SourceReading | None
) -> dict[str, Any]:
    """The status fields of MTP acceptance after a reading (None: no scrape happened): each group's rank-0
    rate to two decimals, and their mean for the printer column. A group not serving loses its value; a
    serving group whose scrape failed keeps the last one; MTP off clears them all."""
    rates = reading.mtp_acceptance if reading is not None and spec.speculative.enabled else {}
    ready = {g.index: g.ready for g in reading.groups} if reading is not None else {}
    groups = []
    for entry in status.groups:
        if entry.index in rates:
            rate: float | None = round(rates[entry.index], 2)
        elif spec.speculative.enabled and ready.get(entry.index, False):
            rate = entry.mtp_acceptance_rate
        else:
            rate = None
        if rate != entry.mtp_acceptance_rate:
            entry = entry.model_copy(update={"mtp_acceptance_rate": rate})
        groups.append(entry)
    known = [g.mtp_acceptance_rate for g in groups if g.mtp_acceptance_rate is not None]
    mean = round(sum(known) / len(known), 2) if known else None
    return {"groups": groups, "mtp_acceptance_rate": mean}


def acceptance_source(spec: LingDeploymentSpec) -> EngineSource | None:
    """A rank-0 scrape for MTP acceptance alone, when MTP is on and the autoscaler does not already
    scrape the engines (autoscaling off, or a Prometheus source); None otherwise."""
    if not spec.speculative.enabled:
        return None
    source = spec.autoscaling.source
    if spec.autoscaling.enabled and source.type == "engine":
        return None
    return EngineSource(engine=spec.engine.type, timeout_seconds=source.engine.timeout_seconds)


def acceptance_look(
    spec: LingDeploymentSpec,
    status: LingDeploymentStatus,
    groups: Sequence[ObservedGroup],
    source: MetricSource,
) -> LingDeploymentStatus:
    """`status` with the acceptance fields from one scrape of each group's rank 0 (nothing else
    changes: the queue seen here drives nothing)."""
    return status.model_copy(update=mtp_acceptance(spec, status, source.read(groups)))


def _disabled(
    spec: LingDeploymentSpec, status: LingDeploymentStatus, generation: int, now: datetime
) -> AutoscaleResult:
    disabled = conditions.condition(
        ConditionType.SCALING_ACTIVE,
        "False",
        Reason.AUTOSCALING_DISABLED,
        "spec.autoscaling.enabled is false: spec.replicas is left to the user, HPA or KEDA",
    )
    merged = conditions.merge(status.conditions, [disabled], generation, now)
    # With MTP on the controller's acceptance look keeps the rates; with MTP off none is left over.
    update: dict[str, Any] = {"conditions": merged}
    if not spec.speculative.enabled:
        update |= mtp_acceptance(spec, status, None)
    return AutoscaleResult(replicas=None, status=status.model_copy(update=update))


def source_config_error(
    status: LingDeploymentStatus, generation: int, message: str, now: datetime
) -> LingDeploymentStatus:
    error = conditions.condition(ConditionType.SCALING_ACTIVE, "False", Reason.SOURCE_ERROR, message)
    return status.model_copy(
        update={"conditions": conditions.merge(status.conditions, [error], generation, now)}
    )


def autoscale_tick(
    spec: LingDeploymentSpec,
    status: LingDeploymentStatus,
    generation: int,
    groups: Sequence[ObservedGroup],
    source: MetricSource | None,
    now: datetime,
    last_tick: datetime | None = None,
) -> AutoscaleResult | None:
    """One autoscaler look at one LingDeployment (see the module docstring for what to do with it).

    `source` may be None only when autoscaling is disabled (nothing is read then)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    autoscaling = spec.autoscaling
    if not autoscaling.enabled:
        return _disabled(spec, status, generation, now)
    if source is None:
        raise ValueError("autoscaling is enabled: a metric source is required")
    previous = status.autoscaler or AutoscalerStatus()
    if not is_due(autoscaling, previous, now, last_tick):
        return None

    reading = source.read(groups)
    capacity = spec.runtime.max_running_requests
    inp = PolicyInput(
        now=now.timestamp(),
        current_replicas=spec.replicas,
        groups=reading.groups,
        total_waiting=reading.total_waiting,
        total_running=reading.total_running,
        source_error=reading.error,
        sees_demand_at_zero=source.sees_demand_at_zero,
        configured_group_capacity=_positive(capacity),
        state=_state_from_status(previous),
    )
    decision = decide(autoscaling, inp)
    update: dict[str, Any] = {
        "conditions": conditions.merge(
            status.conditions, _conditions(decision, reading, source), generation, now
        ),
        **mtp_acceptance(spec, status, reading),
    }
    autoscaler = _autoscaler_status(previous, decision, reading, spec.replicas, now)
    # Steady state causes no writes: an observation that changes nothing a person or the policy needs
    # (same queue, recommendation, decision, error and policy memory) is not written at all.
    if _meaningful(autoscaler, autoscaling, now) != _meaningful(previous, autoscaling, now):
        update |= {"autoscaler": autoscaler, "queue_depth": autoscaler.observed_queue_depth}
    return AutoscaleResult(
        replicas=decision.desired if decision.desired != spec.replicas else None,
        status=status.model_copy(update=update),
        events=_events(spec, previous, decision, reading, source),
        metrics=AutoscaleMetrics(
            queue_depth=reading.total_waiting,
            desired_replicas=decision.desired,
            current_replicas=spec.replicas,
            direction=decision.direction,
            reason=decision.reason,
            source_error=reading.error is not None,
        ),
    )
