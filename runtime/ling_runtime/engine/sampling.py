"""Sampling parameters (validated) and the sampler.

`sample_row` draws one token from a row of logits: greedy, temperature, top-k, top-p, min-p, seed,
logprobs. `RequestSampler` is one request's sampler: before the draw it adjusts the logits by what
the request's tokens so far decide (logit bias, repetition / frequency / presence penalties,
`min_new_tokens`, a grammar), and after it records the token. Requests that need any of that are
sampled on the host (`needs_host_sampling`), never inside a CUDA graph.

One random draw per emitted token from a per-request generator: that is what makes seeded sampling
give the same tokens with and without speculative decoding (verification samples position by
position and stops at the first mismatch, see `Engine._accept`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ling_runtime.engine.errors import InvalidRequest
from ling_runtime.text.grammar import CompiledGrammar

# OpenAI's ranges.
PENALTY_RANGE = 2.0
LOGIT_BIAS_RANGE = 100.0


@dataclass
class SamplingParams:
    """What to generate. `max_new_tokens` has no default here: each route has its own
    (server/protocol.py, docs/runtime.md)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    min_p: float = 0.0
    # OpenAI's: subtract penalty x count (frequency) or penalty once (presence) for each output token.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # HF/CTRL's, over prompt and output tokens: positive logits divided by it, negative multiplied.
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_new_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are out
    grammar: CompiledGrammar | None = None  # compiled by the route (text/grammar.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_host_sampling(self) -> bool:
        """Whether the logits must be adjusted per request before the draw (so never on the device)."""
        return bool(
            self.frequency_penalty
            or self.presence_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_new_tokens
            or self.grammar is not None
            or self.min_p
        )

    def validate(self, vocab_size: int) -> SamplingParams:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest("max_tokens", f"expected an integer >= 1, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest("temperature", f"expected 0 <= temperature <= 100, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"expected 0 < top_p <= 1, got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequest("top_k", f"expected -1 (off) or an integer >= 1, got {self.top_k}")
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidRequest("top_logprobs", f"expected 0..20, got {self.top_logprobs}")
        if len(self.stop) > 16:
            raise InvalidRequest("stop", f"at most 16 stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop", "stop strings must be non-empty strings")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest("stop_token_ids", f"ids {bad} are outside the vocabulary [0, {vocab_size})")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p", f"expected 0 <= min_p <= 1, got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -PENALTY_RANGE <= value <= PENALTY_RANGE:
                raise InvalidRequest(name, f"expected -2 <= {name} <= 2, got {value}")
        if not 0.0 < self.repetition_penalty <= PENALTY_RANGE:
            raise InvalidRequest(
                "repetition_penalty", f"expected 0 < repetition_penalty <= 2, got {self.repetition_penalty}"
            )
        bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(
                "logit_bias", f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})"
            )
        bad_bias = [b for b in self.logit_bias.values() if not -LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE]
        if bad_bias:
            raise InvalidRequest("logit_bias", f"biases must be within [-100, 100], got {bad_bias[0]}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidRequest(
                "min_tokens", f"expected 0 <= min_tokens <= max_tokens, got {self.min_new_tokens}"
            )
        if self.grammar is not None and (self.ignore_eos or self.min_new_tokens):
            # The grammar ends the output with EOS; neither can hold it open past the grammar's end.
            name = "ignore_eos" if self.ignore_eos else "min_tokens"
            raise InvalidRequest(name, "not supported together with a response format or a forced tool call")
        return self


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def make_generator(params: SamplingParams, fallback_seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(params.seed if params.seed is not None else fallback_seed)
    return gen


def sample_row(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    adjusted: torch.Tensor | None = None,
) -> SampledToken:
    """Sample one token from a [vocab] row of logits (float32, on CPU). `adjusted`: the same row after
    the request's bias, penalties and grammar (`RequestSampler`); the draw uses it, logprobs are of
    the model's own distribution (`logits`)."""
    logits = logits.float()
    chosen = logits if adjusted is None else adjusted
    if params.greedy:
        token = int(torch.argmax(chosen))
    else:
        scaled = chosen / params.temperature
        if params.top_k > 0 and params.top_k < scaled.numel():
            kth = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if params.min_p > 0.0:
            # Drop tokens less likely than min_p times the most likely one (the top one always stays).
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
            probs = probs / probs.sum()
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if not params.logprobs:
        return SampledToken(token)
    logp = torch.log_softmax(logits, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if params.top_logprobs:
        values, ids = torch.topk(logp, params.top_logprobs)
        top = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
    return SampledToken(token, float(logp[token]), top)


class RequestSampler:
    """One request's sampler: its generator, and the state its logit adjustments read (token counts,
    the tokens seen, its grammar matcher). `sample` draws a token and records it, so a caller that
    samples position after position (MTP verification) sees each adjustment as it would be without
    speculation."""

    def __init__(
        self,
        params: SamplingParams,
        generator: torch.Generator,
        prompt_ids: list[int] | tuple[int, ...] = (),
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.params = params
        self.generator = generator
        self.num_output = 0
        self._prompt_ids = prompt_ids
        self._ends = sorted({*eos_token_ids, *params.stop_token_ids})
        self.matcher = params.grammar.matcher() if params.grammar is not None else None
        self._counts: torch.Tensor | None = None  # [vocab] float32: each token's count in the output
        self._seen: torch.Tensor | None = None  # [vocab] bool: in the prompt or the output
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None

    def sample(self, logits: torch.Tensor) -> SampledToken:
        logits = logits.float()
        adjusted = self.adjust(logits) if self.params.needs_host_sampling else None
        token = sample_row(logits, self.params, self.generator, adjusted)
        self.record(token.token_id)
        return token

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The row the draw uses: logit bias, penalties, min_new_tokens and the grammar applied."""
        p = self.params
        x = logits.clone()
        vocab = x.shape[-1]
        if p.logit_bias:
            if self._bias is None:
                items = [(t, b) for t, b in p.logit_bias.items() if t < vocab]
                ids = torch.tensor([t for t, _ in items], dtype=torch.long)
                self._bias = ids, torch.tensor([b for _, b in items], dtype=torch.float32)
            x.index_add_(0, *self._bias)
        if p.repetition_penalty != 1.0:
            seen = self._seen_mask(vocab)
            penalized = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x = torch.where(seen, penalized, x)
        if p.frequency_penalty or p.presence_penalty:
            counts = self._count_vector(vocab)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if self.num_output < p.min_new_tokens and self._ends:
            x[[t for t in self._ends if t < vocab]] = -math.inf
        if self.matcher is not None:
            self.matcher.mask(x)
        return x

    def record(self, token_id: int) -> None:
        self.num_output += 1
        if self._counts is not None:
            self._counts[token_id] += 1.0
        if self._seen is not None:
            self._seen[token_id] = True
        if self.matcher is not None:
            self.matcher.accept(token_id)

    def _count_vector(self, vocab: int) -> torch.Tensor:
        if self._counts is None:
            # Created at the first draw (`adjust` runs before every `record`), when the width is known.
            self._counts = torch.zeros(vocab, dtype=torch.float32)
        return self._counts

    def _seen_mask(self, vocab: int) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool)
            ids = [t for t in self._prompt_ids if t < vocab]
            if ids:
                self._seen[torch.tensor(ids, dtype=torch.long)] = True
        return self._seen
