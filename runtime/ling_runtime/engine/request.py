"""What goes into the engine and what comes out: a checked `EngineRequest` in, `TokenEvent`s out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ling_runtime.engine.errors import EngineError
from ling_runtime.engine.sampling import SampledToken, SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    """A request that passed the boundary checks (`Engine.prepare`): prompt ids in the vocabulary,
    sampling parameters in range, prompt + max_tokens within the context and the KV cache. The
    engine trusts it and checks nothing again."""

    rid: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass
class TokenEvent:
    """New tokens (and the text they completed) of one request; the last one has `finished` set.
    `error` ends a request the engine could not finish (its loop failed)."""

    token_ids: list[int]
    text: str
    logprobs: list[SampledToken] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage.prompt_tokens_details)
    error: EngineError | None = None
    spec_verify_steps: int = 0
    spec_accepted: int = 0


# Called on the engine's output thread (engine/output.py) for every event of a request; must not block.
Emit = Callable[[TokenEvent], None]


@dataclass(frozen=True, eq=False)
class LoopEmit:
    """An `Emit` into an asyncio queue of a running event loop (thread-safe). The output thread hands
    a whole step's events for one loop to `deliver`: one wake-up of the loop per step."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def __call__(self, event: TokenEvent) -> None:
        self.deliver([(self.queue, event)])

    def deliver(self, items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
        # The loop is closed once the server has stopped: nobody waits for the events any more, and
        # the output thread must not die of it.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for q, event in items:
        q.put_nowait(event)
