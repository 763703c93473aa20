"""Properties of our policy against the HPA/KEDA-style baseline, from a short simulation run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.autoscale.simulate import (
    HpaKedaBaseline,
    Ours,
    SimConfig,
    main,
    our_spec,
    run_all,
    simulate,
    traces,
)

# The README's configuration (2 h per trace, 180 s start-up): short runs would see too few bursts to
# tell a policy that learns from a flap from one that keeps flapping. The whole run takes under a second.
CONFIG = SimConfig(duration_seconds=7200, startup_seconds=180, seed=7)
TRACES = ["bursty", "diurnal", "spike", "noisy"]


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, str], dict]:
    return {(o.trace, o.policy): o.summary() for o in run_all(CONFIG)}


@pytest.mark.parametrize("trace", TRACES)
def test_ours_never_stacks_scale_ups_during_start_up(outcomes: dict, trace: str) -> None:
    assert outcomes[(trace, "ours")]["max_stacked_scale_ups"] == 0


def test_the_baseline_does_stack_so_the_measure_is_live(outcomes: dict) -> None:
    assert max(outcomes[(t, "hpa-keda")]["max_stacked_scale_ups"] for t in ("diurnal", "spike", "noisy")) >= 1


@pytest.mark.parametrize("trace", TRACES)
def test_ours_flaps_less_than_the_baseline_on_every_trace(outcomes: dict, trace: str) -> None:
    assert outcomes[(trace, "ours")]["reversals"] < outcomes[(trace, "hpa-keda")]["reversals"]


@pytest.mark.parametrize("trace", TRACES)
def test_ours_changes_size_no_more_often_than_the_baseline(outcomes: dict, trace: str) -> None:
    # Comparable: at most one change more (spike: the -2 steps down from the backlog's peak).
    assert outcomes[(trace, "ours")]["scale_changes"] <= outcomes[(trace, "hpa-keda")]["scale_changes"] + 1


def test_bursts_that_come_back_keep_their_groups(outcomes: dict) -> None:
    # The flap damping: after one premature scale-down the bursts every 15 minutes are served by groups
    # that stayed, so capacity is there far sooner than the baseline's fresh start-up each time.
    ours, base = outcomes[("bursty", "ours")], outcomes[("bursty", "hpa-keda")]
    assert ours["scale_changes"] <= base["scale_changes"] // 2
    assert ours["surge_to_capacity_seconds"] < base["surge_to_capacity_seconds"] / 2
    assert ours["queue_above_target_seconds"] < base["queue_above_target_seconds"]


@pytest.mark.parametrize("startup", [30, 600])
def test_no_more_reversals_than_the_baseline_with_other_start_up_times(startup: int) -> None:
    config = SimConfig(duration_seconds=7200, startup_seconds=startup, seed=7)
    by_key = {(o.trace, o.policy): o for o in run_all(config)}
    for trace in TRACES:
        ours, base = by_key[(trace, "ours")], by_key[(trace, "hpa-keda")]
        assert ours.reversals <= base.reversals, trace
        assert ours.max_stacked_scale_ups == 0, trace
        if ours.surge_to_capacity_seconds:
            # Never much slower to capacity than the baseline (start-up time dominates both).
            mean = sum(ours.surge_to_capacity_seconds) / len(ours.surge_to_capacity_seconds)
            base_mean = sum(base.surge_to_capacity_seconds) / len(base.surge_to_capacity_seconds)
            assert mean <= base_mean + 30, trace


@pytest.mark.parametrize("trace", ["spike", "noisy"])
def test_ours_flaps_less_where_load_is_steady_or_noisy(outcomes: dict, trace: str) -> None:
    ours, base = outcomes[(trace, "ours")], outcomes[(trace, "hpa-keda")]
    assert ours["reversals"] < base["reversals"]
    assert ours["over_provisioned_group_seconds"] < base["over_provisioned_group_seconds"]


def test_every_request_is_served_as_well_as_by_the_baseline(outcomes: dict) -> None:
    for trace in TRACES:
        assert (
            outcomes[(trace, "ours")]["completed_requests"]
            >= outcomes[(trace, "hpa-keda")]["completed_requests"]
        )


def test_start_up_time_is_honoured() -> None:
    spike = next(t for t in traces(1800, CONFIG.seed) if t.name == "spike")
    fast = simulate(SimConfig(duration_seconds=1800, startup_seconds=30), spike, Ours(our_spec(CONFIG)))
    slow = simulate(SimConfig(duration_seconds=1800, startup_seconds=300), spike, Ours(our_spec(CONFIG)))
    assert fast.surge_to_capacity_seconds[0] < slow.surge_to_capacity_seconds[0]
    assert slow.surge_to_capacity_seconds[0] >= 300


def test_baseline_scales_up_at_most_max_of_double_or_four() -> None:
    from ling_operator.autoscale import GroupObservation

    hpa = HpaKedaBaseline(min_replicas=1, max_replicas=20, target=8)
    groups = [GroupObservation(0, ready=True, waiting=400, running=0)]
    assert hpa.step(0.0, 1, groups, 400, 0) == 5  # +4 beats +100 %
    groups = [GroupObservation(i, ready=True) for i in range(6)]
    assert hpa.step(30.0, 6, groups, 4000, 0) == 12  # +100 % beats +4


def test_cli_prints_a_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "autoscale.json"
    assert main(["--duration", "600", "--startup", "60", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| trace | policy |") and "| noisy | hpa-keda |" in table
    record = json.loads(out.read_text())
    assert record["config"]["startup_seconds"] == 60 and len(record["results"]) == 8


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="slots_per_group"):
        SimConfig(slots_per_group=0)
