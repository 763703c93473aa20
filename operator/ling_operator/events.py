"""Kubernetes Events on a LingDeployment: what the pure core decides to say, and the core/v1 Event body
the shell posts for it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from ling_operator import api
from ling_operator.timeutil import format_time

COMPONENT = "ling-operator"
MAX_MESSAGE = 1000  # the API server refuses longer event messages


@dataclass(frozen=True)
class Event:
    """An Event to post on the LingDeployment."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def normal(reason: str, message: str) -> Event:
    return Event("Normal", reason, message)


def warning(reason: str, message: str) -> Event:
    return Event("Warning", reason, message)


def event_body(
    name: str, namespace: str, uid: str, event: Event, *, instance: str, now: datetime
) -> dict[str, Any]:
    """The core/v1 Event for `event` on LingDeployment `namespace/name`, reported by replica `instance`."""
    stamp = format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{name}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": name,
            "namespace": namespace,
            "uid": uid,
        },
        "type": event.type,
        "reason": event.reason,
        "message": event.message[:MAX_MESSAGE],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance[:128],
    }
