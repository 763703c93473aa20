"""Queue-depth autoscaling policy: a pure function from observations to a desired number of groups.

The core is the formula of DESIGN §6, desired = ceil(total waiting / targetQueueDepthPerReplica) bounded
by minReplicas..maxReplicas, wrapped in the safeguards that the pain points of other serving stacks ask
for (reference/serving-anchors.md §3.7-8):

- stabilization as HPA's `behavior` does it: every observation records a recommendation; a scale-up goes
  to the *lowest* recommendation of the up-window, a scale-down to the *highest* of the down-window;
- a maximum step per decision in each direction;
- groups that are not ready yet count as capacity on the way: while any group of the current size is
  still starting, no further scale-up is decided (the cascade of AIBrix #2670 cannot happen);
- running requests bound scale-down: once a group has been seen saturated (requests waiting on it), its
  running count is the group's capacity, and the recommendation never drops below the groups needed to
  hold the running requests -- otherwise a drained queue would look like "no demand" and flap;
- a group whose metrics cannot be read blocks scale-down (its demand is unknown) but not scale-up;
- a scale-down undone by a scale-up within the down-window was premature: the down-window in force
  doubles (up to FLAP_DAMPING_LIMIT × the spec's) and stays stretched while the load keeps coming back
  within it -- so bursts that return every few minutes keep their groups instead of flapping;
- scale to zero only through a source that still sees demand with no group running (Prometheus).

Nothing here does I/O; the controller (autoscale_controller.py) and the simulation (bench/autoscale/)
feed it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ling_operator.api import AutoscalingSpec, Reason

__all__ = [
    "Decision",
    "GroupObservation",
    "PolicyInput",
    "PolicyState",
    "Recommendation",
    "decide",
    "down_window_in_force",
    "history_seconds",
    "prune_recommendations",
    "record_recommendation",
    "window_values",
]

# Recommendation runs kept at most (the windows also prune them); bounds the status object's size.
MAX_RECOMMENDATIONS = 64
# The down-window in force grows to at most this multiple of spec.scaleDownStabilizationSeconds.
FLAP_DAMPING_LIMIT = 4


@dataclass(frozen=True)
class GroupObservation:
    """What the source saw for one existing group."""

    index: int
    ready: bool
    waiting: float | None = None  # None: not scraped (not ready) or unreadable
    running: float | None = None
    error: str | None = None  # why a ready group's metrics could not be read


@dataclass(frozen=True)
class Recommendation:
    """From `time` (epoch seconds) on, the policy recommended `replicas` (run-length encoded history)."""

    time: float
    replicas: int


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between decisions (persisted in status.autoscaler)."""

    recommendations: tuple[Recommendation, ...] = ()
    group_capacity: int | None = None  # running requests one saturated group held (learned)
    # The size a scale-up set out to reach; while its groups start, steps continue up to it but never past.
    scale_up_target: int | None = None
    # The scale-down window in force when flap damping has stretched it (None: the spec's).
    scale_down_window: float | None = None
    # When the last scale-down happened (cleared by the next scale-up): a scale-up soon after undoes it.
    last_scale_down: float | None = None
    # Until when the stretched window holds unless the load keeps coming back (see down_window_in_force).
    damped_until: float | None = None
    # Since when the recommendation has been below the current size (None while it is not).
    below_since: float | None = None


@dataclass(frozen=True)
class PolicyInput:
    now: float
    current_replicas: int
    groups: Sequence[GroupObservation]
    # Totals for the whole deployment. The engine source sums readable groups; the prometheus source
    # gives the total directly (and usually no running count).
    total_waiting: float | None
    total_running: float | None
    source_error: str | None = None
    # True when the source can see demand while no group exists (prometheus): required for scale-to-zero.
    sees_demand_at_zero: bool = False
    # Configured per-group concurrency (spec.runtime.maxRunningRequests) overrides the learned capacity.
    configured_group_capacity: int | None = None
    state: PolicyState = field(default_factory=PolicyState)


@dataclass(frozen=True)
class Decision:
    desired: int
    direction: str  # up | down | none
    reason: str  # low-cardinality code (metric label)
    message: str  # for a person: events, status history, conditions
    recommendation: int | None
    limited: str  # Reason.AT_MIN_REPLICAS | AT_MAX_REPLICAS | RATE_LIMITED | WITHIN_BOUNDS
    limited_message: str
    unreadable_groups: tuple[int, ...]
    state: PolicyState
    held_for_startup: bool = False


def record_recommendation(
    history: tuple[Recommendation, ...], now: float, replicas: int, keep_seconds: float
) -> tuple[Recommendation, ...]:
    """Append a recommendation (merging equal runs) and drop runs that ended before the longest window."""
    runs = list(history)
    if not runs or runs[-1].replicas != replicas:
        runs.append(Recommendation(now, replicas))
    return prune_recommendations(tuple(runs), now, keep_seconds)


def prune_recommendations(
    history: tuple[Recommendation, ...], now: float, keep_seconds: float
) -> tuple[Recommendation, ...]:
    """Drop runs that no window can see any more (the windows read the same values with or without them)."""
    runs = list(history)
    horizon = now - keep_seconds
    # A run that started before the horizon still matters while it is the one in force at the horizon.
    while len(runs) > 1 and runs[1].time <= horizon:
        runs.pop(0)
    return tuple(runs[-MAX_RECOMMENDATIONS:])


def window_values(history: Sequence[Recommendation], now: float, window: float) -> list[int]:
    """Recommendations in force at any time during (now - window, now]."""
    start = now - window
    values = [r.replicas for r in history if r.time > start]
    before = [r for r in history if r.time <= start]
    if before:
        values.append(before[-1].replicas)
    return values


def history_seconds(spec: AutoscalingSpec) -> float:
    """How much recommendation history the windows can need (the down-window may be stretched)."""
    return max(
        spec.scale_up_stabilization_seconds, FLAP_DAMPING_LIMIT * spec.scale_down_stabilization_seconds
    )


def down_window_in_force(
    spec: AutoscalingSpec,
    state: PolicyState,
    now: float,
    current: int,
    previous_recommendation: int,
    recommendation: int,
) -> tuple[float, PolicyState]:
    """The scale-down window this decision uses, and the state carrying flap damping forward.

    Damping lasts while the load keeps coming back: the recommendation falling below the current size
    and rising again within the stretched window is a scale-down that would have been undone, so the
    damping is renewed. With no such return for FLAP_DAMPING_LIMIT x the spec's window the load pattern
    has ended and the spec's window applies again."""
    base = float(spec.scale_down_stabilization_seconds)
    longest = FLAP_DAMPING_LIMIT * base
    window = min(max(state.scale_down_window or base, base), longest)
    damped_until = state.damped_until
    if window <= base or damped_until is None or now >= damped_until:
        window, damped_until = base, None
    below_since = state.below_since
    rose = recommendation > previous_recommendation
    if below_since is not None and window > base and rose and now - below_since < window:
        damped_until = now + longest  # the load came back before the stretched window ran out
    if recommendation >= current:
        below_since = None
    elif below_since is None:
        below_since = now
    return window, replace(
        state,
        scale_down_window=window if window > base else None,
        damped_until=damped_until,
        below_since=below_since,
    )


def _after_scale(
    spec: AutoscalingSpec, state: PolicyState, now: float, direction: str, window: float
) -> tuple[PolicyState, str]:
    """Flap damping's memory after a decision, and a note for the message when the window grows."""
    if direction == "down":
        return replace(state, last_scale_down=now), ""
    if direction != "up":
        return state, ""
    last = state.last_scale_down
    state = replace(state, last_scale_down=None, below_since=None)
    if last is None or now - last >= window:
        return state, ""
    # The last scale-down is undone within its own window: it was premature. Wait longer next time.
    longest = FLAP_DAMPING_LIMIT * spec.scale_down_stabilization_seconds
    grown = min(window * 2, longest)
    if grown <= window:
        return replace(state, damped_until=now + longest), ""
    note = f"; the scale-down {_fmt(now - last)}s ago was premature, scale-down window now {_fmt(grown)}s"
    return replace(state, scale_down_window=grown, damped_until=now + longest), note


def _effective_min(spec: AutoscalingSpec, inp: PolicyInput) -> int:
    return 0 if spec.scale_to_zero.enabled and inp.sees_demand_at_zero else spec.min_replicas


def _learn_capacity(inp: PolicyInput) -> int | None:
    if inp.configured_group_capacity:
        return inp.configured_group_capacity
    saturated = [
        int(g.running)
        for g in inp.groups
        if g.ready and g.waiting is not None and g.waiting > 0 and g.running is not None and g.running >= 1
    ]
    # The largest seen wins: a group saturated early (by KV memory, a long prompt) must not make the
    # floor below larger than the groups really need.
    return max([*saturated, inp.state.group_capacity or 0]) or None


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


@dataclass(frozen=True)
class _Frame:
    """What every outcome of one decision shares: the size now, the recommendation, the limits."""

    current: int
    load: str  # "12 waiting, 3 running", for messages
    recommendation: int
    limited: str
    limited_message: str
    unreadable: tuple[int, ...]

    def decision(
        self,
        desired: int,
        reason: str,
        message: str,
        state: PolicyState,
        limited: tuple[str, str] | None = None,
    ) -> Decision:
        direction = "up" if desired > self.current else "down" if desired < self.current else "none"
        limited_reason, limited_message = limited or (self.limited, self.limited_message)
        return Decision(
            desired=desired,
            direction=direction,
            reason=reason,
            message=message,
            recommendation=self.recommendation,
            limited=limited_reason,
            limited_message=limited_message,
            unreadable_groups=self.unreadable,
            state=state,
        )


def _unknown(inp: PolicyInput, unreadable: tuple[int, ...]) -> Decision:
    """No queue depth: keep the size (demand unknown is not demand gone)."""
    current = inp.current_replicas
    error = inp.source_error or "no queue depth"
    return Decision(
        desired=current,
        direction="none",
        reason="source_error",
        message=f"keeping {current} groups: queue depth unknown ({error})",
        recommendation=None,
        limited=Reason.WITHIN_BOUNDS,
        limited_message="no recommendation without a queue depth",
        unreadable_groups=unreadable,
        state=inp.state,
    )


def _recommend(
    spec: AutoscalingSpec, inp: PolicyInput, waiting: float, running: float | None, capacity: int | None
) -> tuple[int, int]:
    """(recommendation within bounds, groups the load wants before bounds)."""
    current = inp.current_replicas
    # The raw recommendation: groups for the queue, and at least the groups the running requests occupy
    # (so a queue drained by enough capacity does not read as "no demand"). The running floor only bounds
    # scale-down (capped at the current size): running requests alone never add groups.
    queue_groups = math.ceil(waiting / spec.target_queue_depth_per_replica)
    running_groups = min(math.ceil(running / capacity), current) if capacity and running else 0
    wanted = max(queue_groups, running_groups)
    raw = wanted
    idle = waiting < spec.scale_to_zero.activation_queue_depth and not running
    if _effective_min(spec, inp) == 0 and idle:
        raw = 0
    elif raw < spec.min_replicas:
        raw = spec.min_replicas
    recommendation = min(raw, spec.max_replicas)
    if any(g.ready and g.error is not None for g in inp.groups):
        # Demand on unreadable groups is unknown: never recommend less than what exists.
        recommendation = max(recommendation, min(current, spec.max_replicas))
    return recommendation, wanted


def _limits(
    spec: AutoscalingSpec, inp: PolicyInput, waiting: float, wanted: int, recommendation: int
) -> tuple[str, str]:
    """ScalingLimited: the bound a person should know the recommendation ran into."""
    if wanted > spec.max_replicas:
        return (
            Reason.AT_MAX_REPLICAS,
            f"{_fmt(waiting)} waiting would need {wanted} groups; maxReplicas is {spec.max_replicas}",
        )
    if recommendation == spec.min_replicas and wanted < spec.min_replicas and _effective_min(spec, inp) > 0:
        return (
            Reason.AT_MIN_REPLICAS,
            f"{_fmt(waiting)} waiting needs {wanted} groups; minReplicas is {spec.min_replicas}",
        )
    return Reason.WITHIN_BOUNDS, "recommendation within minReplicas..maxReplicas"


def decide(spec: AutoscalingSpec, inp: PolicyInput) -> Decision:
    """The desired number of groups for this observation, with the reason a person would want."""
    current = inp.current_replicas
    if current < 0:
        raise ValueError(f"current_replicas must be >= 0, got {current}")
    unreadable = tuple(g.index for g in inp.groups if g.ready and g.error is not None)
    if inp.source_error is not None or inp.total_waiting is None:
        return _unknown(inp, unreadable)

    waiting = max(0.0, inp.total_waiting)
    running = max(0.0, inp.total_running) if inp.total_running is not None else None
    capacity = _learn_capacity(inp)
    recommendation, wanted = _recommend(spec, inp, waiting, running, capacity)

    # With no history (first observation, or status lost) the current size counts as recommended just
    # now, so a fresh autoscaler waits a full down-window before removing anything.
    seed = inp.state.recommendations or (Recommendation(inp.now, current),)
    history = record_recommendation(seed, inp.now, recommendation, history_seconds(spec))
    down_window, state = down_window_in_force(
        spec, inp.state, inp.now, current, seed[-1].replicas, recommendation
    )
    state = replace(state, recommendations=history, group_capacity=capacity)
    up_to = min(window_values(history, inp.now, spec.scale_up_stabilization_seconds))
    down_to = max(window_values(history, inp.now, down_window))

    load = f"{_fmt(waiting)} waiting" + (f", {_fmt(running)} running" if running is not None else "")
    frame = _Frame(
        current, load, recommendation, *_limits(spec, inp, waiting, wanted, recommendation), unreadable
    )

    # Bounds first: a size outside min..max is corrected at once, as HPA does.
    if current > spec.max_replicas:
        message = f"{load}; spec.replicas {current} above maxReplicas {spec.max_replicas}"
        return frame.decision(spec.max_replicas, "bounds", message, state)
    if 0 < current < spec.min_replicas or (current == 0 and _effective_min(spec, inp) > 0):
        message = f"{load}; spec.replicas {current} below minReplicas {spec.min_replicas}"
        return frame.decision(spec.min_replicas, "bounds", message, state)
    if current < up_to:
        return _scale_up(spec, inp, frame, state, up_to, down_window, waiting)
    if current > down_to:
        return _scale_down(spec, inp, frame, state, down_to, down_window)
    note = f"; groups {list(unreadable)} unreadable, not scaling down" if unreadable else ""
    return frame.decision(
        current, "stable", f"{load}: {current} groups are right{note}", _settled(inp, state)
    )


def _settled(inp: PolicyInput, state: PolicyState) -> PolicyState:
    """Once every group of the current size is ready, no scale-up is under way any more."""
    current = inp.current_replicas
    not_ready = current - sum(1 for g in inp.groups if g.ready and g.index < current)
    return state if current > 0 and not_ready > 0 else replace(state, scale_up_target=None)


def _scale_up(
    spec: AutoscalingSpec,
    inp: PolicyInput,
    frame: _Frame,
    state: PolicyState,
    up_to: int,
    down_window: float,
    waiting: float,
) -> Decision:
    """Towards the lowest recommendation of the up-window, by at most maxScaleUpStep.

    Groups still starting are capacity on the way: the queue that grows while they load is the start-up's
    doing, not new demand, so a start-up only finishes the climb it began (rate-limited steps up to the
    target set when it began) and never raises that target."""
    current = frame.current
    not_ready = current - sum(1 for g in inp.groups if g.ready and g.index < current)
    starting = current > 0 and not_ready > 0
    goal = up_to
    if starting:
        climb = inp.state.scale_up_target
        if climb is None or current >= climb:
            message = (
                f"holding at {current} groups: {not_ready} still starting count as capacity on "
                f"the way ({frame.load}, recommendation {frame.recommendation})"
            )
            return replace(frame.decision(current, "starting", message, state), held_for_startup=True)
        goal = min(up_to, climb)
    else:
        state = replace(state, scale_up_target=up_to)
    desired = min(goal, current + spec.max_scale_up_step)
    limited = None
    if desired < goal:
        limited = (
            Reason.RATE_LIMITED,
            f"recommendation {goal} limited to +{spec.max_scale_up_step} (maxScaleUpStep)",
        )
    if current == 0:
        reason, message = (
            "activation",
            f"{frame.load} >= activation {spec.scale_to_zero.activation_queue_depth}",
        )
    else:
        target = spec.target_queue_depth_per_replica
        reason, message = "queue_depth", f"{_fmt(waiting)} waiting > {current} × {target} per group"
    state, note = _after_scale(spec, state, inp.now, "up", down_window)
    return frame.decision(desired, reason, message + note, state, limited)


def _scale_down(
    spec: AutoscalingSpec,
    inp: PolicyInput,
    frame: _Frame,
    state: PolicyState,
    down_to: int,
    down_window: float,
) -> Decision:
    """Towards the highest recommendation of the down-window, by at most maxScaleDownStep."""
    current = frame.current
    state = _settled(inp, state)
    desired = max(down_to, current - spec.max_scale_down_step)
    limited = None
    if desired > down_to:
        limited = (
            Reason.RATE_LIMITED,
            f"recommendation {down_to} limited to -{spec.max_scale_down_step} (maxScaleDownStep)",
        )
    window = _fmt(down_window)
    if desired == 0:
        reason, message = "idle", f"no requests for {window}s, scaling to zero"
    else:
        reason = "queue_depth"
        message = f"{frame.load} fit in {down_to} groups (highest recommendation of the last {window}s)"
    state, _ = _after_scale(spec, state, inp.now, "down", down_window)
    return frame.decision(desired, reason, message, state, limited)
