"""The autoscaler's glue: what the kopf timer calls once per LingDeployment.

Entry points (handlers.py wires these; everything else here is an implementation detail):

    make_source(body: Mapping[str, Any], read_secret: Callable[[str, str], str] | None = None) -> MetricSource
        The metric source named by spec.autoscaling.source. `read_secret(name, key)` returns the value of a
        key of a Secret in the LingDeployment's namespace (only called for prometheus.authSecretRef).
        Raises SourceConfigError (a ValueError naming the field) on a bad source spec.

    autoscale_tick(body, groups, source, now, previous=None) -> AutoscaleResult | None
        body:     the LingDeployment as stored (dict with metadata/spec/status; kopf's body works).
        groups:   Sequence[ObservedGroup] -- one per existing group: index, rank-0 pod IP, ready flag.
        source:   MetricSource from make_source (the only side effect here is source.read()).
        now:      datetime (aware, UTC) -- the clock is an argument so tests and the simulation drive it.
        previous: status.autoscaler as last written (defaults to body["status"]["autoscaler"]).
        last_tick: when the caller last ran a tick for this deployment (its own memory; optional).
        Returns None when the deployment is not due (less than spec.autoscaling.intervalSeconds since
        the later of status.autoscaler.lastObservationTime and last_tick): do nothing, no scrape happened.
        Otherwise an AutoscaleResult; the caller applies it:
          - result.replicas is not None -> patch spec.replicas through the scale subresource
            (it is None when autoscaling is disabled or the size stays);
          - result.status -> merge-patch into status: {"autoscaler": {...}, "queueDepth": n}; None when
            disabled or when the observation changed nothing but the time (steady state: no write);
          - result.conditions -> upsert by type into status.conditions (ScalingActive, ScalingLimited);
            lastTransitionTime is already carried over from body's conditions when the status is unchanged;
          - result.events -> post each (type "Normal"/"Warning", reason, message) on the LingDeployment;
          - result.metrics -> set ling_operator_autoscaler_queue_depth / _desired_replicas /
            _current_replicas gauges, inc scale_decisions_total{direction,reason} when metrics.direction is
            "up"/"down", inc autoscaler_source_errors_total when metrics.source_error.
    With spec.autoscaling.enabled false autoscale_tick returns a result with replicas None, status None and
    only the ScalingActive=False/AutoscalingDisabled condition: the operator never touches spec.replicas,
    so HPA or KEDA can drive the scale subresource.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ling_operator.api import AutoscalingSpec, ConditionType, Reason
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

__all__ = [
    "AutoscaleEvent",
    "AutoscaleMetrics",
    "AutoscaleResult",
    "ObservedGroup",
    "SourceConfigError",
    "autoscale_tick",
    "is_due",
    "make_source",
]

HISTORY_LENGTH = 10


@dataclass(frozen=True)
class AutoscaleEvent:
    """A Kubernetes event to post on the LingDeployment."""

    type: str  # Normal | Warning
    reason: str
    message: str


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
    status: dict[str, Any] | None
    conditions: list[dict[str, Any]]
    events: list[AutoscaleEvent] = field(default_factory=list)
    metrics: AutoscaleMetrics | None = None


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _rfc3339(value: datetime | float) -> str:
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _autoscaling_spec(body: Mapping[str, Any]) -> AutoscalingSpec:
    spec = body.get("spec") or {}
    return AutoscalingSpec.model_validate(spec.get("autoscaling") or {})


def make_source(
    body: Mapping[str, Any], read_secret: Callable[[str, str], str] | None = None
) -> MetricSource:
    """The source named by spec.autoscaling.source (reads the auth Secret through `read_secret`)."""
    spec = body.get("spec") or {}
    source = _autoscaling_spec(body).source
    if source.type == "engine":
        engine = str((spec.get("engine") or {}).get("type", "native"))
        return EngineSource(engine=engine, timeout_seconds=source.engine.timeout_seconds)
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
    body: Mapping[str, Any],
    now: datetime,
    previous: Mapping[str, Any] | None = None,
    last_tick: datetime | None = None,
) -> bool:
    """True when intervalSeconds have passed since the last observation (or there was none).

    `last_tick` is the caller's memory of its last look: observations that change nothing are not
    written, so status.autoscaler.lastObservationTime alone can be older than the last look."""
    if previous is None:
        previous = ((body.get("status") or {}).get("autoscaler")) or {}
    times = [t for t in (_parse_time(previous.get("lastObservationTime")), last_tick) if t is not None]
    if not times:
        return True
    last = max(times)
    # One second of slack: timestamps are stored to the second and timers drift.
    return (now - last).total_seconds() >= _autoscaling_spec(body).interval_seconds - 1


def _state_from_status(previous: Mapping[str, Any]) -> PolicyState:
    runs = []
    for item in previous.get("recommendations") or []:
        when = _parse_time(item.get("time"))
        if when is not None and isinstance(item.get("replicas"), int):
            runs.append(Recommendation(when.timestamp(), item["replicas"]))
    capacity = previous.get("groupCapacity")
    climb = previous.get("scaleUpTarget")
    window = previous.get("scaleDownWindowSeconds")

    def stamp(key: str) -> float | None:
        when = _parse_time(previous.get(key))
        return None if when is None else when.timestamp()

    return PolicyState(
        tuple(runs),
        group_capacity=capacity if isinstance(capacity, int) and capacity > 0 else None,
        scale_up_target=climb if isinstance(climb, int) and climb > 0 else None,
        scale_down_window=float(window) if isinstance(window, int) and window > 0 else None,
        last_scale_down=stamp("lastScaleDownTime"),
        damped_until=stamp("dampedUntil"),
        below_since=stamp("belowSince"),
    )


def _condition(
    body: Mapping[str, Any], type_: str, status: str, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    existing = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None
    )
    since = _rfc3339(now)
    if existing and existing.get("status") == status and existing.get("lastTransitionTime"):
        since = existing["lastTransitionTime"]
    condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    generation = (body.get("metadata") or {}).get("generation")
    if isinstance(generation, int):
        condition["observedGeneration"] = generation
    return condition


def _policy_input(
    body: Mapping[str, Any], reading: SourceReading, source: MetricSource, now: datetime, state: PolicyState
) -> PolicyInput:
    spec = body.get("spec") or {}
    capacity = (spec.get("runtime") or {}).get("maxRunningRequests")
    return PolicyInput(
        now=now.timestamp(),
        current_replicas=int(spec.get("replicas", 1)),
        groups=reading.groups,
        total_waiting=reading.total_waiting,
        total_running=reading.total_running,
        source_error=reading.error,
        sees_demand_at_zero=source.sees_demand_at_zero,
        configured_group_capacity=capacity if isinstance(capacity, int) and capacity > 0 else None,
        state=state,
    )


def _optional_time(value: float | None) -> str | None:
    return None if value is None else _rfc3339(value)


def _meaningful(autoscaler: Mapping[str, Any], spec: AutoscalingSpec, now: datetime) -> dict[str, Any]:
    """What of status.autoscaler a person or the policy needs, in a form where equal means equal.

    Left out: lastObservationTime (it changes with every look; writing it would make every interval a
    write) and explicit nulls (a merge patch deletes keys set to null, so the stored object lacks them).
    Recommendation runs are compared after pruning at `now`: a run that dropped out of every window
    changes nothing the windows read."""
    out = {k: v for k, v in autoscaler.items() if v is not None and k != "lastObservationTime"}
    for key in ("unreadableGroups", "history", "recommendations"):
        if not out.get(key):
            out.pop(key, None)
    runs = _state_from_status(autoscaler).recommendations
    pruned = prune_recommendations(runs, now.timestamp(), history_seconds(spec))
    if pruned:
        out["recommendations"] = [{"time": _rfc3339(r.time), "replicas": r.replicas} for r in pruned]
    return out


def _status(
    previous: Mapping[str, Any], decision: Decision, reading: SourceReading, current: int, now: datetime
) -> dict[str, Any]:
    stamp = _rfc3339(now)
    history = list(previous.get("history") or [])
    window = decision.state.scale_down_window
    status: dict[str, Any] = {
        "observedQueueDepth": None if reading.total_waiting is None else round(reading.total_waiting),
        "observedRunning": None if reading.total_running is None else round(reading.total_running),
        "recommendation": decision.recommendation,
        "lastScaleTime": previous.get("lastScaleTime"),
        "lastScaleReason": previous.get("lastScaleReason"),
        "lastObservationTime": stamp,
        "sourceError": reading.error,
        "unreadableGroups": list(decision.unreadable_groups),
        "recommendations": [
            {"time": _rfc3339(r.time), "replicas": r.replicas} for r in decision.state.recommendations
        ],
        "groupCapacity": decision.state.group_capacity,
        "scaleUpTarget": decision.state.scale_up_target,
        "scaleDownWindowSeconds": None if window is None else round(window),
        "dampedUntil": _optional_time(decision.state.damped_until),
        "lastScaleDownTime": _optional_time(decision.state.last_scale_down),
        "belowSince": _optional_time(decision.state.below_since),
    }
    if decision.direction != "none":
        status["lastScaleTime"] = stamp
        status["lastScaleReason"] = decision.message
        history.append({"time": stamp, "from": current, "to": decision.desired, "reason": decision.message})
    status["history"] = history[-HISTORY_LENGTH:]
    # Explicit None values stay: in a merge patch they clear what an earlier observation set.
    return status


def autoscale_tick(
    body: Mapping[str, Any],
    groups: Sequence[ObservedGroup],
    source: MetricSource,
    now: datetime,
    previous: Mapping[str, Any] | None = None,
    last_tick: datetime | None = None,
) -> AutoscaleResult | None:
    """One autoscaler step for one LingDeployment (see the module docstring for how to apply it)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    autoscaling = _autoscaling_spec(body)
    if not autoscaling.enabled:
        return AutoscaleResult(
            replicas=None,
            status=None,
            conditions=[
                _condition(
                    body,
                    ConditionType.SCALING_ACTIVE,
                    "False",
                    Reason.AUTOSCALING_DISABLED,
                    "spec.autoscaling.enabled is false: spec.replicas is left to the user, HPA or KEDA",
                    now,
                )
            ],
        )
    if previous is None:
        previous = ((body.get("status") or {}).get("autoscaler")) or {}
    if not is_due(body, now, previous, last_tick):
        return None

    reading = source.read(groups)
    state = _state_from_status(previous)
    inp = _policy_input(body, reading, source, now, state)
    decision = decide(autoscaling, inp)
    current = inp.current_replicas

    events: list[AutoscaleEvent] = []
    if decision.direction != "none":
        arrow = f"{current} → {decision.desired}"
        events.append(
            AutoscaleEvent(
                "Normal",
                Reason.SCALING_UP if decision.direction == "up" else Reason.SCALING_DOWN,
                f"scaled {arrow}: {decision.message}",
            )
        )
    previous_error = previous.get("sourceError")
    if reading.error and reading.error != previous_error:
        events.append(AutoscaleEvent("Warning", Reason.SOURCE_ERROR, decision.message))
    unreadable_changed = list(decision.unreadable_groups) != previous.get("unreadableGroups")
    if decision.unreadable_groups and not reading.error and unreadable_changed:
        detail = "; ".join(f"group {g.index}: {g.error}" for g in reading.groups if g.error)
        events.append(
            AutoscaleEvent("Warning", "MetricsUnreadable", f"not scaling down while unreadable: {detail}")
        )
    if autoscaling.scale_to_zero.enabled and not source.sees_demand_at_zero:
        events_note = (
            "scaleToZero needs the prometheus source (the engine source sees no demand at zero groups); "
            f"keeping at least minReplicas {autoscaling.min_replicas}"
        )
        if not previous.get("lastObservationTime"):
            events.append(AutoscaleEvent("Warning", "ScaleToZeroUnavailable", events_note))

    if reading.error:
        active = _condition(
            body, ConditionType.SCALING_ACTIVE, "False", Reason.SOURCE_ERROR, decision.message, now
        )
    else:
        active = _condition(
            body,
            ConditionType.SCALING_ACTIVE,
            "True",
            Reason.METRICS_AVAILABLE,
            f"{source.kind} source: {decision.message}",
            now,
        )
    limited_status = "False" if decision.limited == Reason.WITHIN_BOUNDS else "True"
    limited = _condition(
        body, ConditionType.SCALING_LIMITED, limited_status, decision.limited, decision.limited_message, now
    )

    autoscaler = _status(previous, decision, reading, current, now)
    # Steady state causes no writes: an observation that changes nothing a person or the policy needs
    # (same queue, recommendation, decision, error and policy memory) is not written at all.
    changed = _meaningful(autoscaler, autoscaling, now) != _meaningful(previous, autoscaling, now)
    return AutoscaleResult(
        replicas=decision.desired if decision.desired != current else None,
        status={"autoscaler": autoscaler, "queueDepth": autoscaler["observedQueueDepth"]}
        if changed
        else None,
        conditions=[active, limited],
        events=events,
        metrics=AutoscaleMetrics(
            queue_depth=reading.total_waiting,
            desired_replicas=decision.desired,
            current_replicas=current,
            direction=decision.direction,
            reason=decision.reason,
            source_error=reading.error is not None,
        ),
    )
