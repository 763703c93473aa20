"""The work queue of LingDeployment keys (what controller-runtime's workqueue does, on asyncio).

A key is queued at most once; a key a worker holds is never handed to a second worker (it comes back
when the first is done), so one deployment is never reconciled from two snapshots at once; a timer
brings a key back later, and of two timers for one key the earlier wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._again: set[K] = set()  # came back while a worker held it
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}

    def add(self, key: K) -> None:
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        current = self._timers.get(key)
        if current is not None and current[0] <= due and not current[1].cancelled():
            return
        if current is not None:
            current[1].cancel()
        self._timers[key] = (due, loop.call_later(delay, self._fire, key))

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> K:
        """The next key; the caller holds it until `done` (or drops it with `skip`)."""
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: K, again_after: float | None = None) -> None:
        """Release a key: at once again if it came back meanwhile, and after `again_after` seconds if set."""
        self._active.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)
        if again_after is not None:
            self.add_after(key, again_after)

    def skip(self, key: K) -> None:
        """Release a key without looking at it (a standby only watches)."""
        self._active.discard(key)
        self._again.discard(key)


class Backoff(Generic[K]):
    """Per-item exponential backoff (controller-runtime's ItemExponentialFailureRateLimiter): the n-th
    failure in a row of one item waits base * 2^(n-1) seconds, at most `maximum`; a success forgets it."""

    def __init__(self, base: float, maximum: float) -> None:
        self.base, self.maximum = base, maximum
        self._failures: dict[K, int] = {}

    def failed(self, item: K) -> float:
        """Count a failure of `item`; the delay before its next try."""
        n = self._failures.get(item, 0) + 1
        self._failures[item] = n
        return min(self.base * 2 ** min(n - 1, 30), self.maximum)

    def failures(self, item: K) -> int:
        return self._failures.get(item, 0)

    def forget(self, item: K) -> None:
        self._failures.pop(item, None)
