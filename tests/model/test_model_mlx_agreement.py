"""Agreement with mlx-lm's independent ``bailing_hybrid`` on tiny random checkpoints (float32).

Both implementations load the very same Hugging Face-layout files written by ``write_checkpoint``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ling_runtime.model import ForwardBatch, greedy_generate

from .conftest import CONFIGS, load
from .mlx_ref import mlx_greedy, mlx_logits

ATOL = 2e-4  # logits are O(1-10); float32 differences between the two are ~1e-5


def _prompt(seed: int, length: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def _full_logits(model, ids: list[int]) -> np.ndarray:
    cache = model.make_cache(num_slots=1, num_pages=-(-len(ids) // 16))
    batch = ForwardBatch.build([ids], [0], [0], [list(range(cache.num_pages))])
    return model.compute_logits(model(batch, cache)).numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_16_tokens_and_logits_match_mlx(checkpoint, name: str) -> None:
    path = checkpoint(name)
    # Lightning chunk 8 and scheduler chunk 8 < prompt 21: several chunks with carried state.
    model = load(path, chunk_size=8)
    prompt = _prompt(1, 21)
    ours = greedy_generate(model, prompt, 16, prefill_chunk=8)
    theirs, step_logits = mlx_greedy(path, prompt, 16)
    assert ours == theirs
    # Full recomputation over prompt + continuation: every position's logits agree.
    seq = prompt + ours
    np.testing.assert_allclose(_full_logits(model, seq), mlx_logits(path, seq), atol=ATOL, rtol=0)
    # mlx's own step-decode logits equal our full recomputation at the same positions.
    ours_full = _full_logits(model, seq)
    np.testing.assert_allclose(ours_full[len(prompt) - 1 : -1], step_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["base", "nolora_6heads"])
def test_batch_of_different_lengths_matches_mlx(checkpoint, name: str) -> None:
    path = checkpoint(name, seed=3)
    model = load(path, chunk_size=4)
    prompts = [_prompt(10, 5), _prompt(11, 19), _prompt(12, 1), _prompt(13, 12)]
    batched = greedy_generate(model, prompts, 16, prefill_chunk=6)
    for prompt, got in zip(prompts, batched, strict=True):
        assert got == mlx_greedy(path, prompt, 16)[0]
    # One flat batch of the four prompts: each sequence's rows equal mlx on that prompt alone.
    cache = model.make_cache(num_slots=4, num_pages=9, page_size=8)
    batch = ForwardBatch.build(prompts, [0] * 4, [3, 1, 0, 2], [[0], [3, 4, 5], [6], [8, 7]])
    logits = model.compute_logits(model(batch, cache)).numpy()
    for b, prompt in enumerate(prompts):
        rows = logits[batch.offsets[b] : batch.offsets[b + 1]]
        np.testing.assert_allclose(rows, mlx_logits(path, prompt), atol=ATOL, rtol=0)


def test_prefill_plus_step_decode_equals_full_recomputation(checkpoint) -> None:
    path = checkpoint("groups_yarn", seed=5)
    model = load(path, chunk_size=4)
    seq = _prompt(20, 40)
    full = _full_logits(model, seq)
    # Prefill 13 tokens in chunks of 5, then decode one token at a time, reading logits as we go.
    cache = model.make_cache(num_slots=2, num_pages=8, page_size=8)
    table = [[7, 2, 5, 0, 1]]  # pages need not be contiguous or ordered
    got = []
    pos = 0
    for n in [5, 5, 3] + [1] * (len(seq) - 13):
        batch = ForwardBatch.build([seq[pos : pos + n]], [pos], [1], table)
        got.append(model.compute_logits(model(batch, cache)).numpy())
        pos += n
    np.testing.assert_allclose(np.concatenate(got), full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(full, mlx_logits(path, seq), atol=ATOL, rtol=0)
