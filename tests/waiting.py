"""Waiting in tests: on a condition, never for a fixed time (`from tests.waiting import wait_for`).

`wait_for` polls a probe until it returns something truthy and returns that; `holds_for` is for the one
kind of test that must watch a window (nothing happens during it): it checks its probe at every look and
fails at the first look where it does not hold. Callers derive that window from the period of what they
watch (a resync, a deadline) and say so. Used by tests/ and e2e/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60, every: float = 0.5) -> T:
    """The first truthy value of `probe()`; AssertionError naming `what` (and the last value) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(every)


def holds_for(what: str, probe: Callable[[], object], seconds: float, every: float = 0.5) -> None:
    """Assert that `probe()` is truthy at every look during `seconds` (looks `every` seconds apart)."""
    deadline = time.monotonic() + seconds
    while True:
        got = probe()
        if not got:
            raise AssertionError(f"{what} stopped holding (got {got!r})")
        if time.monotonic() >= deadline:
            return
        time.sleep(every)
