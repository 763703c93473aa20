"""What goes into the engine and what comes out: a checked `EngineRequest` in, `TokenEvent`s out."""

from __future__ import annotations

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


# Called on the engine thread for every event of a request; must not block.
Emit = Callable[[TokenEvent], None]
