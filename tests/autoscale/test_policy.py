"""Table tests of the queue-depth policy (pure: spec + observations -> decision)."""

from __future__ import annotations

from typing import Any

import pytest
from ling_operator.api import AutoscalingSpec, Reason
from ling_operator.autoscale import (
    GroupObservation,
    PolicyInput,
    PolicyState,
    Recommendation,
    decide,
    record_recommendation,
    window_values,
)


def spec(**overrides: Any) -> AutoscalingSpec:
    base: dict[str, Any] = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 6,
        "targetQueueDepthPerReplica": 8,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300,
        "maxScaleUpStep": 2,
        "maxScaleDownStep": 1,
    }
    base.update(overrides)
    return AutoscalingSpec.model_validate(base)


def ready_groups(n: int, waiting: float = 0, running: float = 0) -> list[GroupObservation]:
    return [GroupObservation(i, ready=True, waiting=waiting / n, running=running / n) for i in range(n)]


def inp(
    current: int,
    waiting: float | None,
    running: float | None = 0,
    *,
    groups: list[GroupObservation] | None = None,
    now: float = 1000.0,
    state: PolicyState | None = None,
    **kw: Any,
) -> PolicyInput:
    if groups is None:
        groups = ready_groups(current, waiting or 0, running or 0)
    return PolicyInput(
        now=now,
        current_replicas=current,
        groups=groups,
        total_waiting=waiting,
        total_running=running,
        state=state or PolicyState(),
        **kw,
    )


# (name, spec overrides, current, waiting, running, expected desired, expected direction, reason)
CASES = [
    ("steady at one group", {}, 1, 3, 10, 1, "none", "stable"),
    ("37 waiting wants 5 groups, step limits to +2", {}, 2, 37, 0, 4, "up", "queue_depth"),
    ("bigger step reaches the recommendation", {"maxScaleUpStep": 8}, 2, 37, 0, 5, "up", "queue_depth"),
    ("capped at maxReplicas", {"maxScaleUpStep": 10}, 2, 200, 0, 6, "up", "queue_depth"),
    ("exact multiple of target does not round up", {}, 2, 16, 0, 2, "none", "stable"),
    ("one over the target adds a group", {}, 2, 17, 0, 3, "up", "queue_depth"),
    ("empty queue: first down step waits for the window", {}, 3, 0, 0, 3, "none", "stable"),
    ("above maxReplicas corrected at once", {"maxReplicas": 2}, 5, 0, 0, 2, "down", "bounds"),
    ("below minReplicas corrected at once", {"minReplicas": 3}, 1, 0, 0, 3, "up", "bounds"),
]


@pytest.mark.parametrize(
    ("name", "overrides", "current", "waiting", "running", "desired", "direction", "reason"), CASES
)
def test_policy_table(
    name: str,
    overrides: dict[str, Any],
    current: int,
    waiting: float,
    running: float,
    desired: int,
    direction: str,
    reason: str,
) -> None:
    decision = decide(spec(**overrides), inp(current, waiting, running))
    assert (decision.desired, decision.direction, decision.reason) == (desired, direction, reason), name


def test_event_message_names_the_numbers() -> None:
    decision = decide(spec(), inp(2, 37, 0))
    assert decision.message == "37 waiting > 2 × 8 per group"


def test_scale_down_waits_for_the_whole_window_then_steps_by_one() -> None:
    s = spec(scaleDownStabilizationSeconds=300)
    # Busy 200 s ago (recommendation 4), idle since.
    state = PolicyState(recommendations=(Recommendation(500.0, 4), Recommendation(800.0, 1)))
    held = decide(s, inp(4, 0, 0, now=1000.0, state=state))
    assert held.desired == 4 and held.direction == "none"
    # 301 s after the busy run ended nothing in the window recommends 4: step down by maxScaleDownStep.
    later = decide(s, inp(4, 0, 0, now=1101.0, state=held.state))
    assert (later.desired, later.direction, later.limited) == (3, "down", Reason.RATE_LIMITED)


def test_scale_up_window_takes_the_lowest_recommendation() -> None:
    s = spec(scaleUpStabilizationSeconds=60, maxScaleUpStep=10)
    state = PolicyState(recommendations=(Recommendation(950.0, 2),))
    first = decide(s, inp(2, 40, 0, now=1000.0, state=state))
    assert first.desired == 2  # 2 was recommended 50 s ago, inside the 60 s window
    still = decide(s, inp(2, 40, 0, now=1059.0, state=first.state))
    assert still.desired == 2  # the run of 2 lasted until 1000, inside (999, 1059]
    second = decide(s, inp(2, 40, 0, now=1061.0, state=still.state))
    assert second.desired == 5  # the window now holds only recommendations of 5


def test_starting_groups_count_as_capacity_no_stacked_scale_up() -> None:
    groups = [
        GroupObservation(0, ready=True, waiting=60, running=16),
        GroupObservation(1, ready=False),
        GroupObservation(2, ready=False),
    ]
    # Groups 1 and 2 are starting and no climb is in progress (e.g. a restart): hold.
    decision = decide(spec(), inp(3, 60, 16, groups=groups))
    assert decision.desired == 3 and decision.held_for_startup
    assert "2 still starting" in decision.message
    # Once they are ready the same queue scales up.
    ready = decide(spec(), inp(3, 60, 48))
    assert ready.direction == "up" and ready.desired == 5


def test_a_climb_finishes_during_start_up_but_its_target_is_never_raised() -> None:
    s = spec(maxReplicas=8, maxScaleUpStep=2)
    # 40 waiting on one ready group: recommendation 5, step-limited to 3; the target 5 is remembered.
    first = decide(s, inp(1, 40, 16, now=0.0))
    assert (first.desired, first.state.scale_up_target) == (3, 5)
    starting = [GroupObservation(0, ready=True, waiting=100, running=16)] + [
        GroupObservation(i, ready=False) for i in (1, 2)
    ]
    # 15 s later the queue grew to 100 (recommendation 8): the climb continues to 5, not to 8.
    second = decide(s, inp(3, 100, 16, groups=starting, now=15.0, state=first.state))
    assert (second.desired, second.direction) == (5, "up")
    starting5 = [*starting, GroupObservation(3, ready=False), GroupObservation(4, ready=False)]
    third = decide(s, inp(5, 150, 16, groups=starting5, now=30.0, state=second.state))
    assert (third.desired, third.held_for_startup) == (5, True)
    # All ready: the target is forgotten and a new climb may start.
    fourth = decide(s, inp(5, 150, 80, now=45.0, state=third.state))
    assert (fourth.desired, fourth.state.scale_up_target) == (7, 8)


def test_starting_groups_do_not_block_scale_down() -> None:
    s = spec(scaleDownStabilizationSeconds=0)
    groups = [GroupObservation(0, ready=True, waiting=0, running=0), GroupObservation(1, ready=False)]
    decision = decide(s, inp(2, 0, 0, groups=groups))
    assert (decision.desired, decision.direction) == (1, "down")


def test_running_requests_bound_scale_down_once_capacity_is_learned() -> None:
    s = spec(scaleDownStabilizationSeconds=0)
    # A saturated group (requests waiting on it) shows it holds 16 running requests.
    saturated = decide(s, inp(2, 4, 32, groups=ready_groups(2, 4, 32)))
    assert saturated.state.group_capacity == 16
    # Queue drained but 40 requests run: 3 groups of 16 are needed, so 4 -> 3, not 4 -> 1.
    drained = decide(s, inp(4, 0, 40, state=saturated.state))
    assert (drained.desired, drained.recommendation) == (3, 3)
    # Without the learned capacity the drained queue would read as "no demand".
    naive = decide(s, inp(4, 0, 40))
    assert naive.recommendation == 1


def test_configured_capacity_overrides_learning() -> None:
    s = spec(scaleDownStabilizationSeconds=0)
    decision = decide(s, inp(4, 0, 30, configured_group_capacity=10))
    assert decision.state.group_capacity == 10 and decision.recommendation == 3
    assert (decision.desired, decision.direction) == (3, "down")


def test_running_requests_alone_never_add_groups() -> None:
    # A capacity learned too low (a group saturated by memory at 10) must not turn 40 running on 2 groups
    # into a scale-up: the running floor is capped at the current size.
    state = PolicyState(group_capacity=10)
    decision = decide(spec(), inp(2, 0, 40, state=state))
    assert (decision.desired, decision.direction, decision.recommendation) == (2, "none", 2)


def test_learned_capacity_never_shrinks() -> None:
    groups = [GroupObservation(0, ready=True, waiting=3, running=6)]
    decision = decide(spec(), inp(1, 3, 6, groups=groups, state=PolicyState(group_capacity=16)))
    assert decision.state.group_capacity == 16


def test_unreadable_group_blocks_scale_down_and_is_reported() -> None:
    s = spec(scaleDownStabilizationSeconds=0)
    groups = [
        GroupObservation(0, ready=True, waiting=0, running=0),
        GroupObservation(1, ready=True, error="GET http://10.0.0.2:30000/metrics: timed out"),
    ]
    decision = decide(s, inp(2, 0, 0, groups=groups))
    assert decision.desired == 2 and decision.unreadable_groups == (1,)
    assert "unreadable" in decision.message
    # ... but the readable part can still scale up.
    up = decide(s, inp(2, 40, 0, groups=[groups[0], groups[1]]))
    assert up.direction == "up"


def test_source_error_keeps_size_and_says_why() -> None:
    state = PolicyState(recommendations=(Recommendation(900.0, 3),))
    decision = decide(spec(), inp(3, None, None, source_error="connection refused", state=state))
    assert (decision.desired, decision.direction, decision.reason) == (3, "none", "source_error")
    assert "connection refused" in decision.message
    assert decision.state == state  # no recommendation invented


def test_scale_to_zero_needs_a_source_that_sees_demand_at_zero() -> None:
    s = spec(minReplicas=1, scaleDownStabilizationSeconds=0, scaleToZero={"enabled": True})
    engine = decide(s, inp(1, 0, 0, sees_demand_at_zero=False))
    assert engine.desired == 1
    prometheus = decide(s, inp(1, 0, 0, sees_demand_at_zero=True))
    assert (prometheus.desired, prometheus.reason) == (0, "idle")
    # Running requests keep the group even with an empty queue.
    busy = decide(s, inp(1, 0, 3, sees_demand_at_zero=True))
    assert busy.desired == 1


def test_scale_from_zero_on_activation_threshold() -> None:
    s = spec(scaleToZero={"enabled": True, "activationQueueDepth": 3})
    quiet = decide(s, inp(0, 2, None, groups=[], sees_demand_at_zero=True))
    assert quiet.desired == 0
    woken = decide(s, inp(0, 3, None, groups=[], sees_demand_at_zero=True))
    assert (woken.desired, woken.direction, woken.reason) == (1, "up", "activation")
    big = decide(s, inp(0, 40, None, groups=[], sees_demand_at_zero=True))
    assert big.desired == 2  # recommendation 5, limited by maxScaleUpStep


def test_scaling_limited_reasons() -> None:
    assert decide(spec(maxReplicas=2), inp(2, 100, 0)).limited == Reason.AT_MAX_REPLICAS
    assert decide(spec(minReplicas=2), inp(2, 0, 0)).limited == Reason.AT_MIN_REPLICAS
    assert decide(spec(), inp(2, 20, 0)).limited == Reason.WITHIN_BOUNDS


def test_negative_current_replicas_is_rejected_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="current_replicas"):
        decide(spec(), inp(-1, 0, 0, groups=[]))


def test_recommendation_history_is_run_length_and_pruned() -> None:
    history: tuple[Recommendation, ...] = ()
    for t, r in [(0, 1), (15, 1), (30, 3), (45, 3), (400, 2)]:
        history = record_recommendation(history, float(t), r, keep_seconds=300)
    # Runs merged (1 at 0, 3 at 30, 2 at 400); the run of 1 ended before 400-300=100 and is dropped,
    # the run of 3 is still in force at the horizon and kept.
    assert history == (Recommendation(30.0, 3), Recommendation(400.0, 2))
    assert sorted(window_values(history, 400.0, 300)) == [2, 3]
    assert window_values(history, 400.0, 0) == [2]


def run_load(
    s: AutoscalingSpec, loads: list[float], current: int = 1, every: float = 15.0
) -> tuple[list[int], PolicyState]:
    """Feed waiting counts every `every` seconds (groups always ready); returns the sizes decided."""
    state, sizes = PolicyState(), []
    for n, waiting in enumerate(loads):
        decision = decide(s, inp(current, waiting, 0, now=every * n, state=state))
        state, current = decision.state, decision.desired
        sizes.append(current)
    return sizes, state


# Flap damping, down-window 60 s (4 ticks): bursts needing 3 groups separated by idle gaps.
BURST, IDLE = [20.0] * 4, [0.0] * 6  # 6 idle ticks = 90 s: longer than the 60 s window


def test_a_premature_scale_down_doubles_the_down_window() -> None:
    s = spec(scaleDownStabilizationSeconds=60, maxScaleUpStep=4, maxScaleDownStep=4)
    sizes, state = run_load(s, BURST + IDLE + BURST)
    # Down after the 60 s window (tick 8), undone 30 s later by the next burst: premature.
    assert sizes == [3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 3, 3, 3, 3]
    assert state.scale_down_window == 120 and state.last_scale_down is None
    assert state.damped_until == 150 + 240  # the burst at 150 s + 4 × 60 s


def test_a_stretched_window_holds_groups_through_recurring_gaps() -> None:
    s = spec(scaleDownStabilizationSeconds=60, maxScaleUpStep=4, maxScaleDownStep=4)
    sizes, state = run_load(s, (BURST + IDLE) * 6 + BURST)
    changes = sum(1 for a, b in zip([1, *sizes], sizes, strict=False) if a != b)
    # One flap teaches the policy; after it the 90 s gaps fit in the 120 s window: no more changes.
    assert changes == 3 and sizes[-30:] == [3] * 30
    assert state.scale_down_window == 120 and state.damped_until is not None


def test_damping_lapses_when_the_load_stops_coming_back() -> None:
    s = spec(scaleDownStabilizationSeconds=60, maxScaleUpStep=4, maxScaleDownStep=4)
    sizes, state = run_load(s, BURST + IDLE + BURST + [0.0] * 40)
    # The stretched 120 s window delays the last scale-down; 4 × 60 s after the damping was last renewed
    # with no return of the load, the spec's window applies again.
    last_up = 10
    down_at = next(n for n in range(last_up, len(sizes)) if sizes[n] == 1)
    assert (down_at - (last_up + 3)) * 15 >= 120  # the burst's last busy tick + the stretched window
    assert state.scale_down_window is None and state.damped_until is None


def test_damping_never_exceeds_four_windows_and_zero_window_has_none() -> None:
    s = spec(scaleDownStabilizationSeconds=30, maxScaleUpStep=4, maxScaleDownStep=4)
    # At the cap (4 × 30 s) a further premature scale-down renews the damping but stretches no more.
    state = PolicyState(
        recommendations=(Recommendation(0.0, 1),),
        scale_down_window=120.0,
        damped_until=1000.0,
        last_scale_down=900.0,
    )
    up = decide(s, inp(1, 20, 0, now=960.0, state=state))
    assert up.direction == "up" and up.state.scale_down_window == 120
    assert up.state.damped_until == 960 + 120 and "premature" not in up.message
    # A stored window beyond the cap (the spec's window was lowered since) is clamped to it.
    clamped = decide(s, inp(1, 0, 0, now=960.0, state=PolicyState(scale_down_window=900.0, damped_until=2e3)))
    assert clamped.state.scale_down_window == 120
    # With no down-window there is nothing to stretch: every burst scales up and down again.
    sizes, state = run_load(
        spec(scaleDownStabilizationSeconds=0, maxScaleDownStep=4), BURST + [0.0] * 3 + BURST
    )
    assert sizes == [3, 3, 3, 3, 1, 1, 1, 3, 3, 3, 3] and state.scale_down_window is None


def test_a_stretched_window_is_named_in_the_scale_down_message() -> None:
    s = spec(scaleDownStabilizationSeconds=60, maxScaleUpStep=4, maxScaleDownStep=4)
    state = PolicyState(
        recommendations=(Recommendation(0.0, 3), Recommendation(100.0, 1)),
        scale_down_window=120.0,
        damped_until=10_000.0,
    )
    held = decide(s, inp(3, 0, 0, now=200.0, state=state))  # 100 s of 120: held
    assert held.direction == "none" and held.state.scale_down_window == 120
    down = decide(s, inp(3, 0, 0, now=225.0, state=held.state))
    assert down.direction == "down" and "highest recommendation of the last 120s" in down.message
