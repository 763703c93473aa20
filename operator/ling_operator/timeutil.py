"""Kubernetes timestamps, written and read in one place.

Status fields and Events use metav1.Time (RFC 3339 in UTC, whole seconds); Leases use metav1.MicroTime
(microseconds). Naive datetimes are taken as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(value: str | datetime | None) -> datetime | None:
    """A stored timestamp as an aware datetime; None when absent or not a timestamp."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(value: datetime | float) -> str:
    """metav1.Time: `2026-01-01T12:00:00Z`; a float is seconds since the epoch."""
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(value: datetime) -> str:
    """metav1.MicroTime: `2026-01-01T12:00:00.000000Z`."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def whole_seconds(value: datetime) -> datetime:
    """`value` as it reads back from status (whole seconds), so that a decision made on a time just
    written and one made on the same time read back from the API are the same decision."""
    return value.replace(microsecond=0)
