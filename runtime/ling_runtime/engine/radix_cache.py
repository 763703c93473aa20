"""Prefix cache for the hybrid model: a radix tree of token blocks holding MLA pages and
Lightning-state snapshots, reference-counted and evicted least-recently-used.

Why blocks. Ling's Lightning (linear-attention) layers carry one recurrent state per sequence, not a
per-token cache, so a request can only resume at a position whose state was saved. The engine saves
("snapshots") that state every `block` tokens (`--mamba-track-interval`, a multiple of the Lightning
chunk and of the page size), and every edge of this tree is one such block of token ids: the node
at the end of a block owns the block's MLA latent-KV pages and, if it is still cached, the snapshot
of the Lightning states after the block. A request resumes at the deepest node of its prompt that
has a snapshot, sharing every page on the way and recomputing only the rest. Branching finer than a
block would buy nothing (no state to resume from there), so the tree branches at block boundaries;
a branching point is simply a node with several children, and it keeps its snapshot.

Ownership. The tree owns the pages and snapshots of its nodes. A running sequence holds a lock on
its path (every node from the root to its deepest one counts it), so the pages it reads are never
evicted under it; its own pages past its cached prefix stay private until the block they hold is
complete and snapshotted, when they are donated to a new node (or stay private if another sequence
inserted the same block first). `pins` protect a snapshot a sequence is about to restore.

Eviction. Pages: unlocked leaves, least recently used first (a parent whose last child goes becomes a
candidate). Snapshots: any unpinned node's, least recently used first, those in the middle of a
chain (one child, a later snapshot on the same path) before leaves and branching points; a leaf
left without a snapshot and without holders is useless and removed with its pages. So a request
never fails because the cache is full: what it needs is taken from what nobody holds.

Pure bookkeeping over integers (page ids, snapshot ids); the memory is the ranks' `LingCache`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class Node:
    key: tuple[int, ...]  # the block's token ids (the root: empty)
    parent: Node | None
    depth: int  # tokens from the root to the end of this block
    pages: tuple[int, ...] = ()
    snapshot: int | None = None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock: int = 0  # sequences whose path passes through (or ends at) this node
    pins: int = 0  # sequences about to restore this node's snapshot
    last_access: int = 0
    attached: bool = True  # False once evicted (stale heap entries check it)


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix a request can resume from."""

    node: Node  # deepest node on the prompt's path with a snapshot (the root: nothing cached)
    pages: tuple[int, ...]  # the pages of the path to it, in order
    matched: int  # tokens of the prompt found in the tree (>= resume; may pass snapshot-less nodes)

    @property
    def tokens(self) -> int:
        """Prompt tokens served from the cache: the request resumes at this position."""
        return self.node.depth


class RadixCache:
    def __init__(
        self, block: int, page_size: int, num_snapshots: int, free_pages: Callable[[list[int]], None]
    ) -> None:
        if block < 1 or page_size < 1 or block % page_size:
            raise ValueError(f"block {block}: must be a positive multiple of the page size {page_size}")
        if num_snapshots < 1:
            raise ValueError(f"num_snapshots: expected >= 1, got {num_snapshots}")
        self.block = block
        self.page_size = page_size
        self.num_snapshots = num_snapshots
        self._free_pages = free_pages
        self.root = Node((), None, 0)
        self._free_snapshots = list(range(num_snapshots - 1, -1, -1))
        self._clock = itertools.count(1)
        self._tie = itertools.count()
        # Lazy min-heap of snapshot eviction candidates: (tier, last_access, tie, node); an entry is
        # stale once the node changed (see _snapshot_candidate).
        self._snap_heap: list[tuple[int, int, int, Node]] = []
        self.cached_pages = 0  # pages owned by the tree
        self.evictable_pages = 0  # of which no running sequence holds
        self.evicted_pages = 0
        self.evicted_snapshots = 0

    # ---- lookups ----------------------------------------------------------------------------------
    def match(self, ids: Sequence[int], limit: int) -> PrefixMatch:
        """The deepest snapshot on the path of ``ids[:limit]`` (pure: nothing is locked or touched)."""
        node, best, pages, best_pages = self.root, self.root, [], 0
        b = self.block
        for j in range(min(len(ids), limit) // b):
            child = node.children.get(tuple(ids[j * b : (j + 1) * b]))
            if child is None:
                break
            node = child
            pages.extend(child.pages)
            if child.snapshot is not None:
                best, best_pages = child, len(pages)
        return PrefixMatch(best, tuple(pages[:best_pages]), node.depth)

    @staticmethod
    def path(node: Node) -> list[Node]:
        out = []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out

    def unlocked_pages_on_path(self, node: Node) -> int:
        """Pages on the path to ``node`` that nobody holds (what locking it removes from the
        evictable pool)."""
        return sum(len(n.pages) for n in self.path(node) if n.lock == 0)

    # ---- holders ----------------------------------------------------------------------------------
    def touch(self, node: Node) -> None:
        """Mark the path to ``node`` as used now (LRU)."""
        now = next(self._clock)
        for n in self.path(node):
            n.last_access = now
            if n.snapshot is not None:
                self._push_snapshot(n)

    def lock(self, node: Node) -> None:
        """A sequence now reads the whole path to ``node``."""
        for n in self.path(node):
            self._inc(n)

    def extend_lock(self, child: Node) -> None:
        """A holder of ``child.parent``'s path now also holds ``child``."""
        self._inc(child)

    def unlock(self, node: Node) -> None:
        for n in self.path(node):
            n.lock -= 1
            if n.lock < 0:
                raise RuntimeError("radix cache: unlock without lock")
            if n.lock == 0:
                self.evictable_pages += len(n.pages)
        self._prune(node)

    def pin(self, node: Node) -> None:
        node.pins += 1

    def unpin(self, node: Node) -> None:
        node.pins -= 1
        if node.pins < 0:
            raise RuntimeError("radix cache: unpin without pin")
        if node.pins == 0 and node.snapshot is not None:
            self._push_snapshot(node)

    def _inc(self, node: Node) -> None:
        if node.lock == 0:
            self.evictable_pages -= len(node.pages)
        node.lock += 1

    # ---- insertion --------------------------------------------------------------------------------
    def insert(
        self, parent: Node, key: tuple[int, ...], pages: Sequence[int], snapshot: int | None
    ) -> tuple[Node, bool, bool]:
        """The child of ``parent`` for block ``key``, created with ``pages`` and ``snapshot`` if new.

        Returns (node, created, snapshot_taken). An existing node keeps its pages (the caller's stay
        its own) and takes the snapshot only if it had lost its own. The caller extends its lock."""
        if len(key) != self.block or len(pages) != self.block // self.page_size:
            raise ValueError(
                f"insert: a block is {self.block} tokens on {self.block // self.page_size} pages"
            )
        now = next(self._clock)
        child = parent.children.get(key)
        if child is not None:
            child.last_access = now
            taken = child.snapshot is None and snapshot is not None
            if taken:
                child.snapshot = snapshot
            if child.snapshot is not None:
                self._push_snapshot(child)
            return child, False, taken
        child = Node(key, parent, parent.depth + self.block, tuple(pages), snapshot, last_access=now)
        parent.children[key] = child
        self.cached_pages += len(pages)
        self.evictable_pages += len(pages)  # nobody holds it until the caller extends its lock
        if snapshot is not None:
            self._push_snapshot(child)
        if parent.snapshot is not None:
            self._push_snapshot(parent)  # its tier may have changed (leaf -> chain -> branching point)
        return child, True, snapshot is not None

    # ---- snapshots --------------------------------------------------------------------------------
    def alloc_snapshot(self) -> int | None:
        """A free snapshot buffer, evicting the least valuable cached one if none is free; None when
        every buffer is in use by sequences (the caller skips that snapshot)."""
        if self._free_snapshots:
            return self._free_snapshots.pop()
        while self._snap_heap:
            tier, access, _, node = heapq.heappop(self._snap_heap)
            if not self._snapshot_candidate(node, tier, access):
                continue
            sid = node.snapshot
            assert sid is not None
            node.snapshot = None
            self.evicted_snapshots += 1
            self._prune(node)
            return sid
        return None

    def free_snapshot(self, sid: int) -> None:
        self._free_snapshots.append(sid)

    @property
    def cached_snapshots(self) -> int:
        return self.num_snapshots - len(self._free_snapshots)

    def _tier(self, node: Node) -> int:
        # 0: inside a chain (exactly one child); evicted before leaves and branching points.
        return 0 if len(node.children) == 1 else 1

    def _push_snapshot(self, node: Node) -> None:
        heapq.heappush(self._snap_heap, (self._tier(node), node.last_access, next(self._tie), node))
        if len(self._snap_heap) > 8 * self.num_snapshots + 1024:
            # Touches leave stale entries behind; rebuild from the live nodes now and then.
            self._snap_heap = [
                (self._tier(n), n.last_access, next(self._tie), n)
                for n in self._nodes()
                if n.snapshot is not None
            ]
            heapq.heapify(self._snap_heap)

    def _snapshot_candidate(self, node: Node, tier: int, access: int) -> bool:
        return (
            node.attached
            and node.snapshot is not None
            and node.pins == 0
            and tier == self._tier(node)
            and access == node.last_access
        )

    # ---- pages ------------------------------------------------------------------------------------
    def evict_pages(self, need: int) -> int:
        """Free at least ``need`` pages from unlocked leaves, least recently used first; returns the
        pages freed (fewer only when nothing else is evictable)."""
        heap = [(n.last_access, next(self._tie), n) for n in self._leaves() if n.lock == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < need:
            _, _, node = heapq.heappop(heap)
            if not node.attached or node.children or node.lock:
                continue
            parent = node.parent
            freed += self._remove(node)
            if parent is not None and parent is not self.root and not parent.children and parent.lock == 0:
                heapq.heappush(heap, (parent.last_access, next(self._tie), parent))
        self.evicted_pages += freed
        return freed

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def _leaves(self) -> list[Node]:
        return [n for n in self._nodes() if not n.children]

    def _remove(self, node: Node) -> int:
        """Detach an unlocked leaf; its pages and snapshot go back to the pools."""
        assert node.parent is not None and not node.children and node.lock == 0
        del node.parent.children[node.key]
        node.attached = False
        if node.snapshot is not None:
            self.free_snapshot(node.snapshot)
            node.snapshot = None
        self._free_pages(list(node.pages))
        self.cached_pages -= len(node.pages)
        self.evictable_pages -= len(node.pages)
        parent = node.parent
        if parent.snapshot is not None:
            self._push_snapshot(parent)  # its tier may have changed
        return len(node.pages)

    def _prune(self, node: Node) -> None:
        """Remove snapshot-less leaves nobody holds, from ``node`` upwards: no request can resume in
        them, and their pages are better free."""
        while (
            node is not self.root
            and node.attached
            and not node.children
            and node.lock == 0
            and node.snapshot is None
        ):
            parent = node.parent
            assert parent is not None
            self._remove(node)
            self.evicted_pages += len(node.pages)
            node = parent
