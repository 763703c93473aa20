"""Continuous batching: a waiting queue, a bounded running set, mixed prefill + decode steps, and the
prefix cache's admission and snapshot decisions.

Pure decisions over `Sequence` objects and the `CacheManager`; no tensors, no threads. Each call to
`schedule()` returns the work of one model step: every running sequence past its prompt advances by
one token (plus its drafts under MTP), and prompts still being prefilled add chunks of up to
`--chunked-prefill-size` tokens in all, so a long prompt never stops the streams already decoding
(SGLang's mixed chunks). A new request reaches its first token after ceil(prompt / budget) steps.

Admission (`--schedule-policy`): `fcfs` takes the queue in arrival order; `lpm` takes the request
with the longest cached prefix first (SGLang's longest prefix match; FCFS past 128 waiting, as
SGLang). Either way the head blocks the rest when it does not fit, so a large request is never
starved by small ones. A request resumes at the longest cached prefix that has a Lightning snapshot.

Prefill chunks end on multiples of `align` (the snapshot interval, or the 64-token Lightning chunk
when the cache is off) unless they finish the prompt, so every chunk starts on the Lightning chunk
grid: resumed and cold prefills run the same chunks, and snapshots land on chunk starts.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ling_runtime.engine.cache_manager import CacheManager
from ling_runtime.engine.radix_cache import PrefixMatch
from ling_runtime.engine.sequence import Sequence, Status
from ling_runtime.settings import SCHEDULE_POLICIES

LPM_MAX_WAITING = 128  # beyond this many waiting requests, matching them all costs more than it helps

Snapshots = tuple[tuple[int, int], ...]  # (boundary position, snapshot id): save the state covering
# positions [0, boundary) into that snapshot buffer


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int
    end: int
    restore: int | None = None  # load this cached snapshot into the slot first (a resumed prefix)
    snapshots: Snapshots = ()

    @property
    def last(self) -> bool:
        """Whether this chunk completes the prompt (its final position yields the first token)."""
        return self.end == len(self.seq.prompt_ids)


@dataclass(frozen=True)
class Step:
    prefill: tuple[PrefillChunk, ...] = ()
    decode: tuple[Sequence, ...] = ()
    # One entry per decode sequence: plain decode, the state after this step's token; MTP, states
    # of the previous verify pass, which this step commits first.
    decode_snapshots: tuple[Snapshots, ...] = ()
    admitted: tuple[Sequence, ...] = ()  # sequences admitted for this step (their cached_tokens set)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(
        self,
        cache: CacheManager,
        max_running: int,
        chunk_tokens: int,
        lookahead_tokens: int = 0,
        policy: str = "fcfs",
        align: int = 1,
        speculative: bool = False,
    ) -> None:
        if max_running < 1 or chunk_tokens < 1 or align < 1:
            raise ValueError(
                f"max_running/chunk_tokens/align: expected >= 1, got {max_running}/{chunk_tokens}/{align}"
            )
        if policy not in SCHEDULE_POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {SCHEDULE_POLICIES}")
        self.cache = cache
        self.max_running = max_running
        self.chunk_tokens = chunk_tokens
        # MTP verification writes up to num_draft_tokens positions past the last accepted one.
        self.lookahead_tokens = lookahead_tokens
        self.policy = policy
        self.align = align
        self.speculative = speculative
        self.block = cache.radix.block if cache.radix is not None else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def reserve_tokens(self, seq: Sequence) -> int:
        return seq.budget_tokens + self.lookahead_tokens

    def fits(self, seq: Sequence) -> bool:
        return self.can_ever_fit(seq.budget_tokens)

    def can_ever_fit(self, budget_tokens: int) -> bool:
        """Whether a sequence of prompt + max_tokens = `budget_tokens` could ever be admitted."""
        return self.cache.fits_at_all(budget_tokens + self.lookahead_tokens)

    def add(self, seq: Sequence) -> None:
        if not self.fits(seq):
            raise ValueError(
                f"request {seq.rid} needs {self.reserve_tokens(seq)} cache tokens; the cache holds "
                f"{self.cache.num_pages * self.cache.page_size}"
            )
        self.waiting.append(seq)

    # ---- admission ----------------------------------------------------------------------------------
    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the running set while there is a slot and room in the cache,
        each resuming at its longest cached prefix."""
        admitted: list[Sequence] = []
        order: list[tuple[Sequence, PrefixMatch | None]]
        if self.policy == "lpm" and self.cache.radix is not None and len(self.waiting) <= LPM_MAX_WAITING:
            matched = [(s, self.cache.match(s.prompt_ids)) for s in self.waiting]
            # Stable: equal matches keep arrival order.
            order = sorted(matched, key=lambda sm: -(sm[1].tokens if sm[1] is not None else 0))
        else:
            order = [(s, None) for s in self.waiting]
        for seq, match in order:
            if len(self.running) >= self.max_running:
                break
            if match is None:
                match = self.cache.match(seq.prompt_ids)
            need = self.reserve_tokens(seq)
            if not self.cache.can_allocate(need, match):
                break
            self.waiting.remove(seq)
            seq.allocation = self.cache.allocate(need, match)
            cached = match.tokens if match is not None else 0
            seq.num_computed = seq.cached_tokens = seq.snap_mark = seq.mtp_done = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    # ---- one step -----------------------------------------------------------------------------------
    def schedule(self) -> Step:
        admitted = self.admit()
        # A sequence whose last token is in flight (the overlap scheduler) waits for it to resolve.
        decode = tuple(s for s in self.running if not s.prefilling and not s.output_full)
        decode_snaps = tuple(self._decode_snapshots(s) for s in decode)
        chunks: list[PrefillChunk] = []
        budget = self.chunk_tokens
        for seq in self.running:
            if not seq.prefilling or budget <= 0:
                continue
            start, prompt = seq.num_computed, len(seq.prompt_ids)
            end = min(prompt, start + budget)
            if end < prompt and self.chunk_tokens >= self.align > 1:
                aligned = end // self.align * self.align
                if aligned <= start:
                    continue  # too little budget left for a piece on the grid: next step
                end = aligned
            # (A budget below the grid gives unaligned chunks: still exact, snapshots cut the
            # Lightning chunks mid-way and the Triton path falls back to the reference for them.)
            alloc = seq.allocation
            assert alloc is not None
            restore = None
            if alloc.restore is not None and start == seq.cached_tokens:
                restore = alloc.restore.snapshot
            chunks.append(PrefillChunk(seq, start, end, restore, self._plan(seq, start, end)))
            budget -= end - start
        return Step(tuple(chunks), decode, decode_snaps, tuple(admitted))

    def _decode_snapshots(self, seq: Sequence) -> Snapshots:
        if self.block == 0:
            return ()
        if not self.speculative:
            # This step feeds the token at position num_computed: the state after it covers +1.
            return self._plan(seq, seq.num_computed, seq.num_computed + 1)
        if seq.verify_start is None:
            return ()
        # The previous verify kept the state after each of its positions; it is committed (and
        # these are copied out) at the start of this step.
        return self._plan(seq, seq.verify_start, seq.num_computed)

    def _plan(self, seq: Sequence, lo: int, hi: int) -> Snapshots:
        """Snapshot buffers for the boundaries in (max(lo, snap_mark), hi]; a boundary whose buffer
        cannot be had (all in use) is skipped."""
        if self.block == 0 or hi <= seq.snap_mark:
            return ()
        first = max(lo, seq.snap_mark) // self.block + 1
        out = []
        for b in range(first * self.block, hi + 1, self.block):
            sid = self.cache.alloc_snapshot()
            if sid is not None:
                out.append((b, sid))
                seq.planned[b] = sid
        seq.snap_mark = hi
        return tuple(out)

    def step_done(self, step: Step) -> None:
        """The step ran: its snapshots exist, restores are done; hand complete blocks to the tree.
        Call right after the executor returns, before results can finish a sequence."""
        for chunk in step.prefill:
            if chunk.restore is not None and chunk.seq.allocation is not None:
                self.cache.restored(chunk.seq.allocation)
            self._taken(chunk.seq, chunk.snapshots)
        for seq, snaps in zip(step.decode, step.decode_snapshots, strict=True):
            self._taken(seq, snaps)
        stepped = {id(c.seq): c.seq for c in step.prefill} | {id(s): s for s in step.decode}
        for seq in stepped.values():
            self.cache_blocks(seq)

    def _taken(self, seq: Sequence, snaps: Snapshots) -> None:
        if seq.allocation is None:  # released meanwhile, with its planned snapshots
            return
        for b, sid in snaps:
            seq.planned.pop(b, None)
            seq.snapshots[b] = sid

    def cache_blocks(self, seq: Sequence) -> None:
        """Insert the sequence's blocks up to its deepest snapshot whose block is complete (under
        MTP: whose MTP latent KV is written too)."""
        if not seq.snapshots or seq.allocation is None:
            return
        limit = seq.mtp_done if self.speculative else math.inf
        ready = [b for b in seq.snapshots if b <= limit]
        if ready:
            self.cache.insert(seq.allocation, seq.all_ids, max(ready), seq.snapshots)

    # ---- the end of a request -------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        """Drop a sequence from whichever queue holds it and release what it holds (`release`)."""
        seq.finish_reason = seq.finish_reason or reason
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
        seq.status = Status.FINISHED

    def release(self, seq: Sequence) -> None:
        """Free a sequence's slot, its own pages, its hold on shared prefix pages (reference
        counted: they stay cached for others) and snapshots it took but did not cache. Idempotent."""
        if seq.allocation is not None:
            self.cache.release(seq.allocation, [*seq.snapshots.values(), *seq.planned.values()])
            seq.snapshots.clear()
            seq.planned.clear()
            seq.allocation = None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
