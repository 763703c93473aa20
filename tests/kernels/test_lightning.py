"""Lightning attention kernels against their token-by-token fp32 references (interpreter, tiny sizes)."""

from __future__ import annotations

import torch
from ling_runtime.kernels.lightning import (
    lightning_commit,
    lightning_commit_ref,
    lightning_decode,
    lightning_decode_ref,
    lightning_prefill,
    lightning_prefill_ref,
    lightning_slopes,
    lightning_verify,
    lightning_verify_ref,
)
from ling_runtime.kernels.lightning_chunk import lightning_prefill_chunked

from tests.kernels.util import relerr

H, D = 2, 32


def _qkv(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=gen).to(dtype) for _ in range(3)]


def test_decode_updates_pool_in_place_and_skips_padding(gen: torch.Generator) -> None:
    slope = lightning_slopes(H, layer_idx=3, num_layers=32)
    state = torch.randn(5, H, D, D, generator=gen)
    slots = torch.tensor([3, -1, 0], dtype=torch.int32)
    q, k, v = _qkv(gen, 3, H, D)
    ref_state = state.clone()
    ref = lightning_decode_ref(q, k, v, ref_state, slots, slope, D**-0.5)
    out = torch.full_like(q, float("nan"))
    lightning_decode(q, k, v, state, slots, slope, D**-0.5, out=out, block_v=16)
    assert relerr(out[[0, 2]], ref[[0, 2]]) < 1e-5
    assert torch.isnan(out[1]).all()  # padding row left unwritten
    assert relerr(state, ref_state) < 1e-6
    assert not torch.equal(state[3], ref_state[1])  # untouched slots stay as they were


def test_decode_bf16_inputs(gen: torch.Generator) -> None:
    slope = lightning_slopes(H, layer_idx=0, num_layers=32)
    state = torch.randn(2, H, D, D, generator=gen)
    slots = torch.tensor([1, 0], dtype=torch.int32)
    q, k, v = _qkv(gen, 2, H, D, dtype=torch.bfloat16)
    ref_state = state.clone()
    ref = lightning_decode_ref(q, k, v, ref_state, slots, slope, D**-0.5)
    out = lightning_decode(q, k, v, state, slots, slope, D**-0.5, block_v=32)
    assert relerr(out, ref) < 1e-2
    assert relerr(state, ref_state) < 1e-6


def test_verify_keeps_per_position_states_and_commit_rolls_back(gen: torch.Generator) -> None:
    slope = lightning_slopes(H, layer_idx=5, num_layers=32)
    state = torch.randn(4, H, D, D, generator=gen)
    slots = torch.tensor([2, 0], dtype=torch.int32)
    q, k, v = _qkv(gen, 2, 3, H, D)
    before = state.clone()
    ref_o, ref_inter = lightning_verify_ref(q, k, v, state, slots, slope, D**-0.5)
    out, inter = lightning_verify(q, k, v, state, slots, slope, D**-0.5, block_v=16)
    assert torch.equal(state, before)  # verification never touches the pool
    assert relerr(out, ref_o) < 1e-5
    assert relerr(inter, ref_inter) < 1e-6
    accepted = torch.tensor([2, 3], dtype=torch.int32)
    ref_state = state.clone()
    lightning_commit_ref(ref_state, slots, ref_inter, accepted)
    lightning_commit(state, slots, inter, accepted)
    assert relerr(state, ref_state) < 1e-6
    # Committing position 2 of 3 equals a 2-token decode from the original state.
    replay = before.clone()
    for t in range(2):
        lightning_decode_ref(q[:1, t], k[:1, t], v[:1, t], replay, slots[:1], slope, D**-0.5)
    assert relerr(state[2], replay[2]) < 1e-5


def test_prefill_varlen_matches_recurrence(gen: torch.Generator) -> None:
    slope = lightning_slopes(H, layer_idx=1, num_layers=32)
    lens = [37, 16, 5]  # partial chunks, an exact chunk, a short sequence
    cu = torch.tensor([0, 37, 53, 58], dtype=torch.int32)
    q, k, v = _qkv(gen, sum(lens), H, D, dtype=torch.bfloat16)
    state = torch.randn(4, H, D, D, generator=gen)
    slots = torch.tensor([3, 0, 1], dtype=torch.int32)
    has_init = torch.tensor([1, 0, 1], dtype=torch.int32)
    ref_state = state.clone()
    ref = lightning_prefill_ref(q, k, v, ref_state, slots, cu, has_init, slope, D**-0.5)
    out = lightning_prefill(q, k, v, state, slots, cu, has_init, slope, D**-0.5, block_v=16, chunk=16)
    assert relerr(out, ref) < 1e-2
    assert relerr(state, ref_state) < 1e-3
    assert relerr(state[2], ref_state[2]) == 0.0  # slot not in the batch untouched


def test_chunk_parallel_prefill_matches_recurrence(gen: torch.Generator) -> None:
    slope = lightning_slopes(H, layer_idx=1, num_layers=32)
    cu = torch.tensor([0, 37, 53, 58], dtype=torch.int32)
    q, k, v = _qkv(gen, 58, H, D, dtype=torch.bfloat16)
    state = torch.randn(4, H, D, D, generator=gen)
    slots = torch.tensor([3, 0, 1], dtype=torch.int32)
    has_init = torch.tensor([1, 0, 1], dtype=torch.int32)
    ref_state = state.clone()
    ref = lightning_prefill_ref(q, k, v, ref_state, slots, cu, has_init, slope, D**-0.5)
    out = torch.full_like(q, float("nan"))
    lightning_prefill_chunked(
        q,
        k,
        v,
        state,
        slots,
        cu,
        has_init,
        slope,
        D**-0.5,
        out=out,
        chunk=16,
        block_k=16,
        block_v=16,
        block_v_out=16,
    )
    assert relerr(out, ref) < 1e-2  # NaN-poisoned output: every token was written
    assert relerr(state, ref_state) < 1e-2
    assert relerr(state[2], ref_state[2]) == 0.0
