"""Accounting of the two caches a Ling sequence holds: MLA latent-KV pages and one linear-state slot.

Plain bookkeeping over integers (no tensors): the model's `LingCache` owns the memory, this decides
which slot and pages each sequence may use. Pages for a sequence's whole budget (prompt + max new
tokens + speculative lookahead) are reserved when it is admitted, so a running sequence never runs
out mid-flight and nothing has to be preempted; a request that does not fit waits.
"""

from __future__ import annotations

from dataclasses import dataclass


class CacheFullError(RuntimeError):
    """Raised only on a bookkeeping bug: callers check `can_allocate` first."""


@dataclass
class Allocation:
    slot: int
    pages: list[int]


class CacheManager:
    def __init__(self, num_slots: int, num_pages: int, page_size: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages/page_size: expected >= 1, got {num_pages}/{page_size}")
        self.num_slots = num_slots
        self.num_pages = num_pages
        self.page_size = page_size
        # Lowest ids first keeps allocations deterministic (tests, and reproducible benchmarks).
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._free_pages = list(range(num_pages - 1, -1, -1))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return bool(self._free_slots) and self.pages_for(num_tokens) <= len(self._free_pages)

    def fits_at_all(self, num_tokens: int) -> bool:
        """Whether a sequence of this many tokens could ever be admitted (even into an empty cache)."""
        return self.pages_for(num_tokens) <= self.num_pages

    def allocate(self, num_tokens: int) -> Allocation:
        if not self.can_allocate(num_tokens):
            raise CacheFullError(f"no room for {num_tokens} tokens")
        slot = self._free_slots.pop()
        pages = [self._free_pages.pop() for _ in range(self.pages_for(num_tokens))]
        return Allocation(slot, pages)

    def free(self, allocation: Allocation) -> None:
        if allocation.slot in self._free_slots or any(p in self._free_pages for p in allocation.pages):
            raise CacheFullError(f"double free of slot {allocation.slot}")
        self._free_slots.append(allocation.slot)
        self._free_pages.extend(reversed(allocation.pages))
        self._free_slots.sort(reverse=True)
        self._free_pages.sort(reverse=True)

    @property
    def slots_used(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def pages_used(self) -> int:
        return self.num_pages - len(self._free_pages)

    @property
    def page_usage(self) -> float:
        return self.pages_used / self.num_pages
