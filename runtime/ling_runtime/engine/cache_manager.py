"""Accounting of the caches a Ling sequence holds: MLA latent-KV pages, one linear-state slot, and
the prefix cache's shared pages and Lightning-state snapshots.

Plain bookkeeping over integers (no tensors): the model's `LingCache` owns the memory, this decides
which slot and pages each sequence may use. Pages for a sequence's whole budget (prompt + max new
tokens + speculative lookahead) are reserved when it is admitted, so a running sequence never runs
out mid-flight and nothing has to be preempted; a request that does not fit waits.

With the prefix cache (`radix`, engine/radix_cache.py) a sequence's block table starts with the
shared pages of its cached prefix (locked in the tree while it runs) and continues with pages of
its own; finished blocks are donated to the tree as the sequence computes them (`insert`), and
`release` gives back what the sequence alone held. Pages the tree holds but no running sequence
reads count as free: they are evicted (least recently used) whenever an admission needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ling_runtime.engine.radix_cache import Node, PrefixMatch, RadixCache


class CacheFullError(RuntimeError):
    """Raised only on a bookkeeping bug: callers check `can_allocate` first."""


@dataclass
class Allocation:
    slot: int
    pages: list[int]  # the block table: the cached prefix's shared pages, then the sequence's own
    own: set[int] = field(default_factory=set)  # pages only this sequence holds (freed by release)
    node: Node | None = None  # deepest prefix-cache node this sequence holds (None: cache off)
    restore: Node | None = None  # pinned node whose snapshot the first step loads into the slot


class CacheManager:
    def __init__(
        self,
        num_slots: int,
        num_pages: int,
        page_size: int,
        block_tokens: int = 0,
        num_snapshots: int = 0,
    ) -> None:
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
        self.radix: RadixCache | None = None
        if block_tokens > 0 and num_snapshots > 0:
            self.radix = RadixCache(block_tokens, page_size, num_snapshots, self._return_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ---- the prefix cache -------------------------------------------------------------------------
    def match(self, prompt_ids: Sequence[int]) -> PrefixMatch | None:
        """The cached prefix ``prompt_ids`` may resume from (None: the cache is off). At least the
        last prompt token is always computed: its logits give the first output token."""
        if self.radix is None:
            return None
        return self.radix.match(prompt_ids, len(prompt_ids) - 1)

    def alloc_snapshot(self) -> int | None:
        return self.radix.alloc_snapshot() if self.radix is not None else None

    def free_snapshot(self, sid: int) -> None:
        if self.radix is not None:
            self.radix.free_snapshot(sid)

    def insert(
        self, allocation: Allocation, token_ids: Sequence[int], upto: int, snapshots: dict[int, int]
    ) -> None:
        """Hand the sequence's complete blocks up to position ``upto`` to the tree: its pages (when
        the block is new) and the snapshots taken at their ends (popped from ``snapshots``; a block
        without one becomes a snapshot-less node on the way to a later one). The sequence's lock
        extends over them."""
        radix = self.radix
        node = allocation.node
        if radix is None or node is None:
            return
        b, ps = radix.block, self.page_size
        while node.depth + b <= upto:
            start, end = node.depth, node.depth + b
            pages = allocation.pages[start // ps : end // ps]
            snap = snapshots.pop(end, None)
            child, created, taken = radix.insert(node, tuple(token_ids[start:end]), pages, snap)
            if created:
                allocation.own.difference_update(pages)
            if snap is not None and not taken:
                radix.free_snapshot(snap)  # another sequence cached this block (and its state) first
            radix.extend_lock(child)
            node = child
        allocation.node = node

    # ---- admission and release --------------------------------------------------------------------
    def can_allocate(self, num_tokens: int, match: PrefixMatch | None = None) -> bool:
        if not self._free_slots:
            return False
        shared = len(match.pages) if match is not None else 0
        available = len(self._free_pages)
        if self.radix is not None:
            available += self.radix.evictable_pages
            if match is not None:
                available -= self.radix.unlocked_pages_on_path(match.node)
        return self.pages_for(num_tokens) - shared <= available

    def fits_at_all(self, num_tokens: int) -> bool:
        """Whether a sequence of this many tokens could ever be admitted (even into an empty cache)."""
        return self.pages_for(num_tokens) <= self.num_pages

    def allocate(self, num_tokens: int, match: PrefixMatch | None = None) -> Allocation:
        """A slot and the block table for ``num_tokens``: the pages of ``match`` (locked) and pages
        of its own for the rest, evicting unheld cached pages if the free ones do not suffice."""
        if not self.can_allocate(num_tokens, match):
            raise CacheFullError(f"no room for {num_tokens} tokens")
        radix = self.radix
        shared: list[int] = []
        node = restore = None
        if radix is not None:
            node = match.node if match is not None else radix.root
            radix.lock(node)
            radix.touch(node)
            if match is not None and match.tokens > 0:
                shared = list(match.pages)
                restore = match.node
                radix.pin(restore)
        own = self.pages_for(num_tokens) - len(shared)
        if own > len(self._free_pages):
            assert radix is not None
            radix.evict_pages(own - len(self._free_pages))
            if own > len(self._free_pages):  # can_allocate said they were evictable
                raise CacheFullError(f"no room for {num_tokens} tokens after eviction")
        slot = self._free_slots.pop()
        pages = [self._free_pages.pop() for _ in range(own)]
        return Allocation(slot, shared + pages, set(pages), node, restore)

    def restored(self, allocation: Allocation) -> None:
        """The first step loaded the cached snapshot into the slot: it may be evicted again."""
        if allocation.restore is not None and self.radix is not None:
            self.radix.unpin(allocation.restore)
            allocation.restore = None

    def release(self, allocation: Allocation, snapshots: Sequence[int] = ()) -> None:
        """Give back what a finished or aborted sequence held: its slot, its own pages, its hold on
        the shared prefix pages (which stay cached, now evictable, marked recently used), a pending
        restore pin, and ``snapshots`` it took but never handed to the tree."""
        free = set(self._free_pages)
        if allocation.slot in self._free_slots or any(p in free for p in allocation.own):
            raise CacheFullError(f"double free of slot {allocation.slot}")
        self.restored(allocation)
        if self.radix is not None and allocation.node is not None:
            self.radix.touch(allocation.node)
            self.radix.unlock(allocation.node)
            allocation.node = None
        for sid in snapshots:
            self.free_snapshot(sid)
        self._free_slots.append(allocation.slot)
        self._free_slots.sort(reverse=True)
        self._return_pages(sorted(allocation.own))
        allocation.own = set()

    free = release  # the name before the prefix cache

    def _return_pages(self, pages: list[int]) -> None:
        self._free_pages.extend(pages)
        self._free_pages.sort(reverse=True)

    # ---- gauges -----------------------------------------------------------------------------------
    @property
    def slots_used(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def cached_pages(self) -> int:
        """Pages the prefix cache holds (shared with running sequences or evictable)."""
        return self.radix.cached_pages if self.radix is not None else 0

    @property
    def pages_used(self) -> int:
        """Pages running sequences hold; cached pages nobody reads count as free (they are evicted
        on demand), as SGLang counts them."""
        evictable = self.radix.evictable_pages if self.radix is not None else 0
        return self.num_pages - len(self._free_pages) - evictable

    @property
    def page_usage(self) -> float:
        return self.pages_used / self.num_pages
