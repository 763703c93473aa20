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
    ("spec", "action"),
    [
        (lease("me", 1), "renew"),
        (lease("me", 100), "renew"),
        (lease("other", 1), "standby"),
        (lease("other", 14.9), "standby"),
        (lease("other", 15), "acquire"),
        (lease("other", 100), "acquire"),
        (lease("", 1), "acquire"),
        ({}, "acquire"),
        ({"holderIdentity": "other"}, "acquire"),
    ],
)
def test_decide(spec: dict[str, Any], action: str) -> None:
    assert leader.decide(spec, "me", NOW, 15) == action


def test_acquire_counts_transitions_and_renew_does_not() -> None:
    taken = leader.next_spec(lease("other", 100) | {"leaseTransitions": 2}, "acquire", "me", NOW, 15)
    assert taken["holderIdentity"] == "me"
    assert taken["leaseTransitions"] == 3
    assert taken["acquireTime"] == taken["renewTime"] == "2026-11-29T01:00:00.000000Z"
    renewed = leader.next_spec(taken, "renew", "me", NOW + timedelta(seconds=5), 15)
    assert renewed["leaseTransitions"] == 3
    assert renewed["acquireTime"] == taken["acquireTime"]
    assert parse_time(renewed["renewTime"]) == NOW + timedelta(seconds=5)
