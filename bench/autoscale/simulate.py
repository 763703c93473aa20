"""Trace-driven simulation of queue-depth autoscaling: our policy against an HPA/KEDA-style baseline.

A simple queue model, one-second ticks: requests arrive (Poisson around the trace's rate), wait in one
queue, and run on free slots of *ready* groups (each group holds `slots_per_group` requests for
`service_seconds` each, so it serves slots/service requests per second). A group added by a scale-up is
ready `startup_seconds` later (weights loading); a removed group stops taking work at once.

Ours:      ling_operator.autoscale.decide, called every spec.intervalSeconds with the observations the
           engine source would give (per-group waiting/running of ready groups, starting groups not ready).
Baseline:  KEDA defaults driving HPA's default behaviour -- the metric is polled every 30 s
           (pollingInterval), HPA syncs every 15 s: usage = waiting / ready replicas vs the target
           (AverageValue), 10 % tolerance, desired = ceil(usage/target × ready); scale-up with no
           stabilization and at most max(+100 %, +4 pods) per 15 s; scale-down to the highest
           recommendation of the last 300 s, at most -100 % per 15 s.

Run: `python -m bench.autoscale.simulate [--duration S] [--startup S] [--json PATH]`: prints a markdown
table and writes bench/results/autoscale.json.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ling_operator.api import AutoscalingSpec
from ling_operator.autoscale import GroupObservation, PolicyInput, PolicyState, decide

RESULTS = Path(__file__).resolve().parents[1] / "results" / "autoscale.json"


@dataclass(frozen=True)
class SimConfig:
    duration_seconds: int = 7200
    startup_seconds: int = 180
    slots_per_group: int = 16
    service_seconds: float = 10.0
    min_replicas: int = 1
    max_replicas: int = 8
    target_queue_depth: int = 8
    initial_groups: int = 1
    seed: int = 7

    def __post_init__(self) -> None:
        for name in (
            "duration_seconds",
            "slots_per_group",
            "min_replicas",
            "max_replicas",
            "target_queue_depth",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.startup_seconds < 0 or self.service_seconds <= 0:
            raise ValueError("startup_seconds must be >= 0 and service_seconds > 0")

    @property
    def group_rate(self) -> float:
        """Requests per second one ready group completes when busy."""
        return self.slots_per_group / self.service_seconds


@dataclass(frozen=True)
class Trace:
    name: str
    rate: Callable[[float], float]  # mean arrivals per second at time t
    surges: tuple[float, ...]  # times where demand jumps (for "time from surge to enough capacity")


def traces(duration: int, seed: int) -> list[Trace]:
    """The four workload shapes; rates are in requests/second (a group serves 1.6 req/s by default)."""
    rng = random.Random(seed)
    period = 900.0

    def bursty(t: float) -> float:
        return 9.0 if (t % period) >= 600 else 1.0  # 5 min bursts every 15 min

    def diurnal(t: float) -> float:
        return 0.5 + 9.0 * (1 - math.cos(2 * math.pi * t / duration)) / 2

    spike_start, spike_end = duration * 0.25, duration * 0.25 + 900

    def spike(t: float) -> float:
        # A sustained step needing 3 groups: the classic case for a scale-up cascade while groups load.
        return 4.5 if spike_start <= t < spike_end else 1.0

    # Noisy: a level of 5 req/s re-drawn every 20 s within ±60 %: no trend, only noise.
    levels = [5.0 * rng.uniform(0.4, 1.6) for _ in range(duration // 20 + 2)]

    def noisy(t: float) -> float:
        return levels[int(t // 20)]

    bursts = tuple(float(t) for t in range(600, duration, int(period)))
    return [
        Trace("bursty", bursty, bursts),
        Trace("diurnal", diurnal, ()),
        Trace("spike", spike, (spike_start,) if spike_start < duration else ()),
        Trace("noisy", noisy, ()),
    ]


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation; exact sampling is needless here
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


# ---------------------------------------------------------------------------------------------------------
# Autoscalers: given (now, current, observations) return the new size.


class Autoscaler(ABC):
    name = ""
    interval = 15

    @abstractmethod
    def step(
        self, now: float, current: int, groups: list[GroupObservation], waiting: int, running: int
    ) -> int: ...


@dataclass
class Ours(Autoscaler):
    spec: AutoscalingSpec
    state: PolicyState = field(default_factory=PolicyState)
    name: str = "ours"

    def __post_init__(self) -> None:
        self.interval = self.spec.interval_seconds

    def step(
        self, now: float, current: int, groups: list[GroupObservation], waiting: int, running: int
    ) -> int:
        decision = decide(
            self.spec,
            PolicyInput(
                now=now,
                current_replicas=current,
                groups=groups,
                total_waiting=float(waiting),
                total_running=float(running),
                state=self.state,
            ),
        )
        self.state = decision.state
        return decision.desired


@dataclass
class HpaKedaBaseline(Autoscaler):
    """KEDA defaults + HPA default behaviour (see the module docstring)."""

    min_replicas: int
    max_replicas: int
    target: float
    polling_interval: float = 30.0
    tolerance: float = 0.1
    down_window: float = 300.0
    name: str = "hpa-keda"
    _sample: float | None = None
    _sampled_at: float = -math.inf
    _recommendations: list[tuple[float, int]] = field(default_factory=list)

    def step(
        self, now: float, current: int, groups: list[GroupObservation], waiting: int, running: int
    ) -> int:
        if now - self._sampled_at >= self.polling_interval:
            self._sample, self._sampled_at = float(waiting), now
        ready = sum(1 for g in groups if g.ready)
        if self._sample is None:
            return current
        # HPA counts only ready pods in the average and multiplies the ratio back by them.
        basis = max(ready, 1)
        ratio = (self._sample / basis) / self.target
        raw = current if abs(ratio - 1.0) <= self.tolerance else math.ceil(ratio * basis)
        raw = max(self.min_replicas, min(self.max_replicas, raw))
        self._recommendations.append((now, raw))
        self._recommendations = [(t, r) for t, r in self._recommendations if t > now - self.down_window]
        if raw > current:
            return min(raw, max(current * 2, current + 4), self.max_replicas)
        stabilized = max(r for _, r in self._recommendations)
        return min(current, stabilized)


# ---------------------------------------------------------------------------------------------------------
# The queue model


@dataclass
class Outcome:
    policy: str
    trace: str
    scale_changes: int = 0
    reversals: int = 0
    over_provisioned_group_seconds: float = 0.0
    queue_above_target_seconds: int = 0
    surge_to_capacity_seconds: list[float] = field(default_factory=list)
    max_stacked_scale_ups: int = 0
    peak_groups: int = 0
    completed_requests: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (time, groups) at each change

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("sizes")
        surges = self.surge_to_capacity_seconds
        data["surge_to_capacity_seconds"] = round(sum(surges) / len(surges), 1) if surges else None
        data["over_provisioned_group_seconds"] = round(self.over_provisioned_group_seconds)
        return data


def simulate(config: SimConfig, trace: Trace, autoscaler: Autoscaler) -> Outcome:
    rng = random.Random(config.seed)
    out = Outcome(autoscaler.name, trace.name)
    ready_at: list[float] = [0.0] * config.initial_groups  # one entry per provisioned group
    queue = 0
    in_service: list[float] = []  # finish times
    last_direction = 0
    stacked = 0
    episode_goal = 0
    pending_surges = list(trace.surges)
    open_surges: list[float] = []
    for t in range(config.duration_seconds):
        now = float(t)
        while in_service and in_service[0] <= now:
            heapq.heappop(in_service)
            out.completed_requests += 1
        queue += _poisson(rng, trace.rate(now))
        ready = sum(1 for r in ready_at if r <= now)
        free = ready * config.slots_per_group - len(in_service)
        start = max(0, min(queue, free))
        for _ in range(start):
            heapq.heappush(in_service, now + config.service_seconds)
        queue -= start

        if t % autoscaler.interval == 0:
            groups = _observe(ready_at, now, queue, len(in_service))
            current = len(ready_at)
            desired = autoscaler.step(now, current, groups, queue, len(in_service))
            if desired != current:
                direction = 1 if desired > current else -1
                starting = any(r > now for r in ready_at)
                if direction > 0:
                    if not starting:
                        # A start-up episode begins: what the observation asked for right now (queue
                        # groups, or the groups the running requests fill), bounded by max.
                        demand = max(
                            math.ceil(queue / config.target_queue_depth),
                            math.ceil(len(in_service) / config.slots_per_group),
                        )
                        episode_goal = max(desired, min(config.max_replicas, demand))
                        stacked = 0
                    elif desired > episode_goal:
                        # A scale-up beyond that goal while the episode's groups still start: stacked.
                        stacked += 1
                        episode_goal = desired
                        out.max_stacked_scale_ups = max(out.max_stacked_scale_ups, stacked)
                    ready_at.extend([now + config.startup_seconds] * (desired - current))
                else:
                    # The operator removes the highest groups first (the newest, maybe still starting).
                    del ready_at[desired:]
                out.scale_changes += 1
                out.reversals += int(last_direction != 0 and direction != last_direction)
                last_direction = direction
                out.sizes.append((t, desired))

        # Bookkeeping against the ideal: the groups the mean rate needs.
        ready = sum(1 for r in ready_at if r <= now)
        needed = max(config.min_replicas, math.ceil(trace.rate(now) / config.group_rate))
        out.over_provisioned_group_seconds += max(0, len(ready_at) - needed)
        out.queue_above_target_seconds += int(queue > config.target_queue_depth * max(ready, 1))
        out.peak_groups = max(out.peak_groups, len(ready_at))
        while pending_surges and pending_surges[0] <= now:
            open_surges.append(pending_surges.pop(0))
        if open_surges and ready * config.group_rate >= min(
            trace.rate(now), config.max_replicas * config.group_rate
        ):
            out.surge_to_capacity_seconds.extend(now - s for s in open_surges)
            open_surges.clear()
    # A surge never served in time counts until the end of the trace (censored).
    out.surge_to_capacity_seconds.extend(config.duration_seconds - s for s in open_surges)
    return out


def _observe(ready_at: list[float], now: float, queue: int, running: int) -> list[GroupObservation]:
    # The engine source's view: ready groups split the queue and the running requests (a balanced
    # router); starting groups are not scraped.
    ready = [i for i, r in enumerate(ready_at) if r <= now]
    share = len(ready) or 1
    return [
        GroupObservation(i, ready=True, waiting=queue / share, running=running / share)
        if r <= now
        else GroupObservation(i, ready=False)
        for i, r in enumerate(ready_at)
    ]


def our_spec(config: SimConfig) -> AutoscalingSpec:
    return AutoscalingSpec.model_validate(
        {
            "enabled": True,
            "minReplicas": config.min_replicas,
            "maxReplicas": config.max_replicas,
            "targetQueueDepthPerReplica": config.target_queue_depth,
        }
    )


def run_all(config: SimConfig) -> list[Outcome]:
    outcomes = []
    for trace in traces(config.duration_seconds, config.seed):
        for scaler in (
            Ours(our_spec(config)),
            HpaKedaBaseline(config.min_replicas, config.max_replicas, config.target_queue_depth),
        ):
            outcomes.append(simulate(config, trace, scaler))
    return outcomes


COLUMNS = [
    ("trace", "trace"),
    ("policy", "policy"),
    ("scale_changes", "scale changes"),
    ("reversals", "reversals"),
    ("over_provisioned_group_seconds", "over-provisioned group·s"),
    ("queue_above_target_seconds", "s queue > target"),
    ("surge_to_capacity_seconds", "surge → capacity (s, mean)"),
    ("max_stacked_scale_ups", "max stacked scale-ups"),
    ("peak_groups", "peak groups"),
    ("completed_requests", "completed"),
]


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for outcome in outcomes:
        summary = outcome.summary()
        cells = ["–" if summary[key] is None else str(summary[key]) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=SimConfig.duration_seconds, help="seconds per trace")
    parser.add_argument(
        "--startup", type=int, default=SimConfig.startup_seconds, help="group start-up seconds"
    )
    parser.add_argument("--seed", type=int, default=SimConfig.seed)
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    config = SimConfig(duration_seconds=args.duration, startup_seconds=args.startup, seed=args.seed)
    outcomes = run_all(config)
    table = markdown(outcomes)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m bench.autoscale.simulate "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": asdict(config),
        "results": [o.summary() for o in outcomes],
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
