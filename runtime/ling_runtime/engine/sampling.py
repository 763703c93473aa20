"""Sampling parameters (validated) and the sampler: greedy, temperature, top-k, top-p, seed, logprobs.

One random draw per emitted token from a per-request generator: that is what makes seeded sampling
give the same tokens with and without speculative decoding (verification samples position by
position and stops at the first mismatch, see `engine/spec.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int) -> SamplingParams:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingParamsError("max_tokens", f"expected an integer >= 1, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingParamsError(
                "temperature", f"expected 0 <= temperature <= 100, got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"expected 0 < top_p <= 1, got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise SamplingParamsError("top_k", f"expected -1 (off) or an integer >= 1, got {self.top_k}")
        if not 0 <= self.top_logprobs <= 20:
            raise SamplingParamsError("top_logprobs", f"expected 0..20, got {self.top_logprobs}")
        if len(self.stop) > 16:
            raise SamplingParamsError("stop", f"at most 16 stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop", "stop strings must be non-empty strings")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise SamplingParamsError(
                "stop_token_ids", f"ids {bad} are outside the vocabulary [0, {vocab_size})"
            )
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


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> SampledToken:
    """Sample one token from a [vocab] row of logits (float32, on CPU)."""
    logits = logits.float()
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        scaled = logits / params.temperature
        if params.top_k > 0 and params.top_k < scaled.numel():
            kth = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
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
