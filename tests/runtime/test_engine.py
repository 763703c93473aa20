"""The engine against the model's own greedy decode: batching, chunked prefill, slots, and MTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.model import LingForCausalLM, greedy_generate
from ling_runtime.tiny import tiny_config, write_checkpoint

from .engine_utils import generate_all, make_engine, mtp, output_ids

PROMPTS = [list(range(10, 60)), [5, 6, 7], list(range(100, 400, 3)), [42] * 17]


@pytest.fixture(scope="module")
def oracle(builtin_dir: Path) -> LingForCausalLM:
    return LingForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-token vocabulary: random MTP drafts then match often, so acceptance and rollback are exercised."""
    return write_checkpoint(tmp_path_factory.mktemp("vocab6"), tiny_config(vocab_size=6), seed=3)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def test_continuous_batching_matches_greedy_generate(builtin_dir, tokenizer, oracle) -> None:
    # 2 running at a time and 3 slots: requests wait and reuse slots; 16-token chunks split prompts.
    engine = make_engine(
        builtin_dir, tokenizer, max_running_requests=2, max_mamba_cache_size=3, chunked_prefill_size=16
    )
    try:
        events = generate_all(engine, PROMPTS, [greedy(12)] * len(PROMPTS))
    finally:
        engine.stop()
    assert [output_ids(e) for e in events] == [greedy_generate(oracle, p, 12) for p in PROMPTS]
    assert all(e[-1].finish_reason == "length" and e[-1].completion_tokens == 12 for e in events)
    assert engine.scheduler.cache.slots_used == 0 and engine.scheduler.cache.pages_used == 0


def test_mtp_is_lossless_and_accepts_drafts(small_vocab_dir, tokenizer) -> None:
    prompts = [[1, 2, 3, 4, 5, 0, 1], [3, 3], [0, 1, 2, 3, 4, 5] * 6, [2]]
    oracle = LingForCausalLM.from_pretrained(small_vocab_dir, dtype=torch.float32)
    expected = [greedy_generate(oracle, p, 20) for p in prompts]
    for steps in (1, 3):
        engine = make_engine(
            small_vocab_dir, tokenizer, **mtp(steps), max_mamba_cache_size=4, chunked_prefill_size=16
        )
        try:
            events = generate_all(engine, prompts, [greedy(20)] * len(prompts))
        finally:
            engine.stop()
        assert [output_ids(e) for e in events] == expected, f"MTP with {steps} steps changed greedy output"
        accepted = sum(e[-1].spec_accepted for e in events)
        verify_steps = sum(e[-1].spec_verify_steps for e in events)
        # Fewer verify passes than tokens: drafts were accepted and the linear state rolled back.
        assert accepted > 0 and verify_steps < sum(len(x) for x in expected)


def test_seeded_sampling_is_identical_with_and_without_mtp(small_vocab_dir, tokenizer) -> None:
    params = [
        SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2)
    ]
    outputs = []
    for steps in (0, 3):
        engine = make_engine(small_vocab_dir, tokenizer, **mtp(steps), max_mamba_cache_size=2)
        try:
            outputs.append([output_ids(e) for e in generate_all(engine, [[1, 2, 3], [4, 5]], params)])
        finally:
            engine.stop()
    assert outputs[0] == outputs[1]
    assert outputs[0][0] != outputs[0][1]


def test_stop_tokens_and_eos_end_a_request(builtin_dir, tokenizer, oracle) -> None:
    reference = greedy_generate(oracle, PROMPTS[0], 10)
    stop_at = reference[4]
    engine = make_engine(builtin_dir, tokenizer, max_mamba_cache_size=2)
    try:
        [events] = generate_all(
            engine,
            [PROMPTS[0]],
            [SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=[stop_at])],
        )
    finally:
        engine.stop()
    ids = output_ids(events)
    assert ids == reference[: reference.index(stop_at) + 1] and events[-1].finish_reason == "stop"
