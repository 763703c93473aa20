"""Lease-based leader election decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ling_operator import leader
from ling_operator.timeutil import format_micro_time, parse_time

NOW = datetime(2026, 11, 29, 1, 0, 0, tzinfo=UTC)


def lease(holder: str, renewed_ago: float, duration: int = 15) -> dict[str, Any]:
    return {
        "holderIdentity": holder,
        "renewTime": format_micro_time(NOW - timedelta(seconds=renewed_ago)),
        "leaseDurationSeconds": duration,
    }


@pytest.mark.parametrize(
    ("spec", "unchanged_for", "action"),
    [
        (lease("me", 1), 0, "renew"),
        (lease("me", 100), 100, "renew"),
        (lease("other", 1), 1, "standby"),
        (lease("other", 14.9), 14.9, "standby"),
        (lease("other", 15), 15, "acquire"),
        (lease("other", 100), 100, "acquire"),
        (lease("", 1), 0, "acquire"),
        ({}, 0, "acquire"),
        ({"holderIdentity": "other"}, 15, "acquire"),
        ({"holderIdentity": "other"}, 1, "standby"),
    ],
)
def test_decide(spec: dict[str, Any], unchanged_for: float, action: str) -> None:
    assert leader.decide(spec, "me", unchanged_for, 15) == action


@pytest.mark.parametrize("renewed_ago", [-3600, 0, 3600])
def test_a_standby_goes_by_its_own_clock_never_by_the_holders(renewed_ago: float) -> None:
    # A holder whose clock is an hour behind (or ahead) writes renewTime an hour off: what counts is
    # that the Lease keeps changing, as this replica sees it.
    spec = lease("other", renewed_ago)
    assert leader.decide(spec, "me", 1, 15) == "standby"
    assert leader.decide(spec, "me", 15, 15) == "acquire"


def test_the_renew_deadline_is_shorter_than_the_lease() -> None:
    elector = leader.LeaseElector(None, "l", "ns", "me", 15)  # type: ignore[arg-type]  # no request made
    assert elector.renew_deadline == pytest.approx(10)  # controller-runtime: 10 s of 15 s
    assert not elector.is_leader and elector.time_left() <= 0 and elector.expires_in() <= 0
    assert elector.next_tick_in() == pytest.approx(3)  # a standby looks every duration/5
    with pytest.raises(ValueError, match="renew deadline"):
        leader.LeaseElector(None, "l", "ns", "me", 15, renew_deadline=15)  # type: ignore[arg-type]


def test_acquire_counts_transitions_and_renew_does_not() -> None:
    taken = leader.next_spec(lease("other", 100) | {"leaseTransitions": 2}, "acquire", "me", NOW, 15)
    assert taken["holderIdentity"] == "me"
    assert taken["leaseTransitions"] == 3
    assert taken["acquireTime"] == taken["renewTime"] == "2026-11-29T01:00:00.000000Z"
    renewed = leader.next_spec(taken, "renew", "me", NOW + timedelta(seconds=5), 15)
    assert renewed["leaseTransitions"] == 3
    assert renewed["acquireTime"] == taken["acquireTime"]
    assert parse_time(renewed["renewTime"]) == NOW + timedelta(seconds=5)
