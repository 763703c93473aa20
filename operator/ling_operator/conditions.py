"""status.conditions, kept in one place: built, merged by type, and ordered the same way by every writer
(the reconcile pass and the autoscaler each own some types and keep the others as they are)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from ling_operator.api import Condition, ConditionStatus, ConditionType
from ling_operator.timeutil import whole_seconds

_ORDER = {t: i for i, t in enumerate(ConditionType.ALL)}


def condition(type_: str, status: ConditionStatus, reason: str, message: str) -> Condition:
    """A condition as decided; `merge` stamps its generation and transition time."""
    return Condition(type=type_, status=status, reason=reason, message=message)


def find(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def merge(
    previous: Sequence[Condition],
    current: Iterable[Condition],
    generation: int,
    now: datetime,
    *,
    keep: bool = False,
) -> list[Condition]:
    """`previous` with each of `current` in place of its type, every other type kept (another writer's).

    A condition keeps its lastTransitionTime while its status stays the same, so a condition that says
    the same thing again is not a change (and not a write). With `keep`, `current` are already stamped
    (merged against another base): they replace their types as they are."""
    by_type = {c.type: c for c in previous}
    if keep:
        by_type.update({c.type: c for c in current})
        return sorted(by_type.values(), key=lambda c: (_ORDER.get(c.type, len(_ORDER)), c.type))
    for cond in current:
        old = by_type.get(cond.type)
        if old is not None and old.last_transition_time is not None and old.status == cond.status:
            if (old.reason, old.message, old.observed_generation) == (cond.reason, cond.message, generation):
                continue  # says the same again: the stored one stands
            since = old.last_transition_time
        else:
            since = whole_seconds(now)
        by_type[cond.type] = cond.model_copy(
            update={"observed_generation": generation, "last_transition_time": since}
        )
    return sorted(by_type.values(), key=lambda c: (_ORDER.get(c.type, len(_ORDER)), c.type))
