"""One request as the engine sees it: token ids, progress through prefill, output, finish state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ling_runtime.engine.cache_manager import Allocation
from ling_runtime.engine.sampling import SampledToken, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output: list[SampledToken] = field(default_factory=list)
    allocation: Allocation | None = None
    # Tokens whose KV / linear state is in the cache. Prefill advances it chunk by chunk.
    num_computed: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    # Speculative decoding: draft tokens proposed for the next verify step.
    draft_ids: list[int] = field(default_factory=list)
    # ---- prefix cache (engine/radix_cache.py) ----
    cached_tokens: int = 0  # prompt tokens served from the cache at admission (usage, metrics)
    snap_mark: int = 0  # snapshot boundaries at or below this position are planned
    # Boundary position -> snapshot id: planned into a step not yet run / taken by an executed step
    # but not yet handed to the tree. Release frees both.
    planned: dict[int, int] = field(default_factory=dict)
    snapshots: dict[int, int] = field(default_factory=dict)
    # MTP: positions [0, mtp_done) hold the MTP layer's latent KV for their true next token (the
    # draft-extend of the step after they were computed); only such blocks go into the tree.
    mtp_done: int = 0
    verify_start: int | None = None  # MTP: first position of the last verify pass

    @property
    def output_ids(self) -> list[int]:
        return [t.token_id for t in self.output]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(all_ids), without building it (the step loop asks for every sequence every step)."""
        return len(self.prompt_ids) + len(self.output)

    @property
    def last_token_id(self) -> int:
        return self.output[-1].token_id if self.output else self.prompt_ids[-1]

    def token_ids(self, lo: int, hi: int) -> list[int]:
        """all_ids[lo:hi] without building all_ids."""
        n = len(self.prompt_ids)
        head = self.prompt_ids[lo:hi] if lo < n else []
        tail = [t.token_id for t in self.output[max(lo - n, 0) : max(hi - n, 0)]]
        return head + tail

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def budget_tokens(self) -> int:
        """Tokens this sequence may ever hold in the cache (what admission reserves)."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def output_full(self) -> bool:
        """Its last allowed token is out or in flight (the overlap scheduler): no more decode steps."""
        return len(self.output) >= self.params.max_new_tokens

    def finishes_at(self, index: int) -> str | None:
        """The finish reason the output token at `index` triggers (by id, or by reaching max_tokens);
        later entries may be placeholders of steps in flight (engine.py)."""
        token_id = self.output[index].token_id
        if token_id in self.params.stop_token_ids:
            return "stop"
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if index + 1 >= self.params.max_new_tokens:
            return "length"
        return None

    def token_finishes(self, token_id: int) -> str | None:
        """The finish reason this token triggers by id (stop strings are checked on text elsewhere)."""
        if token_id in self.params.stop_token_ids:
            return "stop"
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if len(self.output) >= self.params.max_new_tokens:
            return "length"
        return None
