"""Continuous batching: a waiting queue, a bounded running set, chunked prefill before decode.

Pure decisions over `Sequence` objects and the `CacheManager`; no tensors, no threads. Each call to
`schedule()` returns the work of one model step:
- a prefill step: chunks of prompts under a token budget (`--chunked-prefill-size`), or
- a decode step: every running sequence advances by one token (plus its drafts under MTP).
Prefill goes first so new requests reach their first token quickly (TTFT), as nano-vllm and SGLang do.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ling_runtime.engine.cache_manager import CacheManager
from ling_runtime.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        """Whether this chunk completes the prompt (its final position yields the first token)."""
        return self.end == len(self.seq.prompt_ids)


@dataclass(frozen=True)
class Step:
    prefill: tuple[PrefillChunk, ...] = ()
    decode: tuple[Sequence, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(
        self, cache: CacheManager, max_running: int, chunk_tokens: int, lookahead_tokens: int = 0
    ) -> None:
        if max_running < 1 or chunk_tokens < 1:
            raise ValueError(f"max_running/chunk_tokens: expected >= 1, got {max_running}/{chunk_tokens}")
        self.cache = cache
        self.max_running = max_running
        self.chunk_tokens = chunk_tokens
        # MTP verification writes up to num_draft_tokens positions past the last accepted one.
        self.lookahead_tokens = lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def reserve_tokens(self, seq: Sequence) -> int:
        return seq.budget_tokens + self.lookahead_tokens

    def fits(self, seq: Sequence) -> bool:
        return self.cache.fits_at_all(self.reserve_tokens(seq))

    def add(self, seq: Sequence) -> None:
        if not self.fits(seq):
            raise ValueError(
                f"request {seq.rid} needs {self.reserve_tokens(seq)} cache tokens; the cache holds "
                f"{self.cache.num_pages * self.cache.page_size}"
            )
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the running set while there is a slot and room in the cache.

        FIFO: the head of the queue blocks the rest, so a large request is never starved by small ones.
        """
        admitted = []
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            need = self.reserve_tokens(seq)
            if not self.cache.can_allocate(need):
                break
            self.waiting.popleft()
            seq.allocation = self.cache.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def schedule(self) -> Step:
        self.admit()
        chunks: list[PrefillChunk] = []
        budget = self.chunk_tokens
        for seq in self.running:
            if not seq.prefilling or budget == 0:
                continue
            end = min(len(seq.prompt_ids), seq.num_computed + budget)
            chunks.append(PrefillChunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
        if chunks:
            return Step(prefill=tuple(chunks))
        return Step(decode=tuple(s for s in self.running if not s.prefilling))

    def finish(self, seq: Sequence, reason: str) -> None:
        """Release a sequence's cache and drop it from whichever queue holds it."""
        seq.finish_reason = seq.finish_reason or reason
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.allocation is not None:
            self.cache.free(seq.allocation)
            seq.allocation = None
        seq.status = Status.FINISHED

    def find(self, rid: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.rid == rid:
                return seq
        return None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
