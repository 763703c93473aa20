"""Lightning attention kernels against their token-by-token fp32 references (interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.kernels import lightning_chunk
from ling_runtime.kernels.lightning import (
    lightning_commit,
    lightning_commit_ref,
    lightning_decode,
    lightning_decode_ref,
    lightning_prefill_ref,
    lightning_slopes,
    lightning_verify,
    lightning_verify_ref,
)
from ling_runtime.kernels.lightning_chunk import PrefillConfig, lightning_prefill_chunked, prefill_config

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
        config=PrefillConfig(chunk=16, block_k=16, block_v=16, block_v_out=16),
    )
    assert relerr(out, ref) < 1e-2  # NaN-poisoned output: every token was written
    assert relerr(state, ref_state) < 1e-2
    assert relerr(state[2], ref_state[2]) == 0.0


# The interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest), biasing every bf16 cast of
# the chunk kernels down by ~0.4%: these batches land at ~1.0e-2 here (test_against_model.py uses
# 2e-2 for the same reason); a wrong decay, mask or chunk->sequence mapping gives O(1).
TOL_CHUNKED = 2e-2


def _chunked_case(gen: torch.Generator, lens: list[int]) -> tuple:
    slope = lightning_slopes(H, layer_idx=2, num_layers=32)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _qkv(gen, sum(lens), H, D, dtype=torch.bfloat16)
    n = len(lens)
    state = torch.randn(n + 1, H, D, D, generator=gen)
    slots = torch.arange(n, 0, -1, dtype=torch.int32)  # slot 0 stays out of the batch
    has_init = torch.tensor([i % 2 for i in range(n)], dtype=torch.int32)
    ref_state = state.clone()
    ref = lightning_prefill_ref(q, k, v, ref_state, slots, cu, has_init, slope, D**-0.5)
    return (q, k, v, state, slots, cu, has_init, slope), ref, ref_state


@pytest.mark.parametrize(
    "cfg",
    [
        PrefillConfig(16, 16, 16, 4, 2, 16, 4, 2),
        PrefillConfig(16, 16, 32, 4, 2, 32, 4, 2, block_ptr1=True, block_ptr2=True),
        PrefillConfig(32, 32, 16, 4, 2, 16, 4, 2, block_ptr1=True),
        PrefillConfig(16, 16, 16, 4, 2, 32, 4, 2, block_ptr2=True),
    ],
)
def test_chunked_configs_match_recurrence(gen: torch.Generator, cfg: PrefillConfig) -> None:
    # An empty sequence, a partial chunk, an exact chunk multiple and a long one in one batch.
    args, ref, ref_state = _chunked_case(gen, [21, 0, 32, 3, 40])
    out = torch.full_like(args[0], float("nan"))
    lightning_prefill_chunked(*args, D**-0.5, out=out, config=cfg)
    assert relerr(out, ref) < TOL_CHUNKED  # NaN-poisoned: every token written
    assert relerr(args[3], ref_state) < TOL_CHUNKED
    assert torch.equal(args[3][0], ref_state[0])  # slot outside the batch untouched


def test_chunked_fp32_states_block_ptr(gen: torch.Generator) -> None:
    args, ref, ref_state = _chunked_case(gen, [19, 16])
    cfg = PrefillConfig(16, 16, 16, 4, 2, 16, 4, 2, block_ptr1=True, block_ptr2=True, fp32_states=True)
    out = lightning_prefill_chunked(*args, D**-0.5, config=cfg)
    assert relerr(out, ref) < TOL_CHUNKED
    assert relerr(args[3], ref_state) < TOL_CHUNKED


def test_chunk_owner_scan_spans_several_sequence_blocks(gen: torch.Generator, monkeypatch) -> None:
    # The in-kernel chunk -> sequence lookup scans cu_seqlens in blocks of _SEQ_BLOCK; with a
    # block of 2, seven sequences take four blocks, so block carries (running chunk counts) matter.
    monkeypatch.setattr(lightning_chunk, "_SEQ_BLOCK", 2)
    args, ref, ref_state = _chunked_case(gen, [5, 17, 0, 16, 2, 20, 1])
    out = torch.full_like(args[0], float("nan"))
    # Both helpers (_chunks_before, _chunk_owner) are shared by the two kernel flavours.
    cfg = PrefillConfig(16, 16, 16, 4, 2, 16, 4, 2, block_ptr2=True)
    lightning_prefill_chunked(*args, D**-0.5, out=out, config=cfg)
    assert relerr(out, ref) < TOL_CHUNKED
    assert relerr(args[3], ref_state) < TOL_CHUNKED


def test_dispatch_picks_by_average_length(monkeypatch) -> None:
    short, long_ = PrefillConfig(block_k=32), PrefillConfig(block_k=64, warps1=8)
    monkeypatch.setattr(lightning_chunk, "_DISPATCH", [(2048, short), (1 << 62, long_)])
    assert prefill_config(8 * 2048, 8) is short
    assert prefill_config(4096, 1) is long_
    assert prefill_config(0, 1) is short
    seen: list[PrefillConfig] = []

    def fake_states(*a: object) -> None:  # records the config it was given and stops
        seen.append(a[7])
        raise RuntimeError("stop")

    monkeypatch.setattr(lightning_chunk, "chunk_states", fake_states)
    q = torch.zeros(4096, 2, 32, dtype=torch.bfloat16)
    z = torch.zeros(1, dtype=torch.int32)
    cu = torch.tensor([0, 4096], dtype=torch.int32)
    for cfg in (None, short):
        with pytest.raises(RuntimeError):
            lightning_prefill_chunked(
                q, q, q, torch.zeros(1, 2, 32, 32), z, cu, z, torch.ones(2), 1.0, config=cfg
            )
    # The dispatched row has its blocks clamped to the head dim (32); an explicit config is used as is.
    assert seen == [PrefillConfig(block_k=32, block_v=32, warps1=8, block_v_out=32), short]


@pytest.mark.parametrize("bp", [False, True])
def test_chunked_steep_decay_partial_chunk_stays_finite(gen: torch.Generator, bp: bool) -> None:
    # Past a partial chunk's end the key/value decay exp(-slope * (n - 1 - pos)) overflows fp32 for
    # steep slopes: the kernels must mask it, not multiply it by the zero padding (0 * inf = NaN).
    slope = torch.tensor([4.0, 0.05])
    q, k, v = _qkv(gen, 35, H, D, dtype=torch.bfloat16)
    state = torch.zeros(1, H, D, D)
    args = (q, k, v, state, torch.zeros(1, dtype=torch.int32), torch.tensor([0, 35], dtype=torch.int32))
    ref_state = state.clone()
    ref = lightning_prefill_ref(
        *args[:3], ref_state, *args[4:], torch.zeros(1, dtype=torch.int32), slope, D**-0.5
    )
    cfg = PrefillConfig(32, 16, 16, 4, 2, 16, 4, 2, block_ptr1=bp, block_ptr2=bp)
    out = lightning_prefill_chunked(*args, torch.zeros(1, dtype=torch.int32), slope, D**-0.5, config=cfg)
    assert relerr(out, ref) < TOL_CHUNKED
    assert relerr(state, ref_state) < TOL_CHUNKED


def _poisoned(shape: tuple[int, ...], pad: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a NaN buffer with ``pad`` rows either side of the view the kernel gets."""
    buf = torch.full((shape[0] + 2 * pad, *shape[1:]), float("nan"), dtype=dtype)
    return buf, buf[pad : pad + shape[0]]


@pytest.mark.parametrize(
    "cfg", [PrefillConfig(block_v_out=32, warps2=8), PrefillConfig(block_v_out=32, block_ptr2=True)]
)
def test_chunked_real_shape_stays_in_bounds(gen: torch.Generator, monkeypatch, cfg: PrefillConfig) -> None:
    # Round 1's faulting configuration (stage-2 BV=32 of D=128, chunk 64) at the real head dim. The
    # interpreter does not fault on an out-of-bounds access, so every buffer (q/k/v, output, state
    # pool and the internal chunk states) sits inside NaN padding: a stray read reaches the output
    # as NaN, a stray write replaces padding.
    d, h, pad = 128, 2, 3
    lens = [70, 0, 64, 5]
    total, n = sum(lens), len(lens)
    slope = lightning_slopes(h, layer_idx=1, num_layers=32)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    bufs, views = [], []
    for x in _qkv(gen, total, h, d, dtype=torch.bfloat16):
        buf, view = _poisoned((total, h, d), pad, torch.bfloat16)
        view.copy_(x)
        bufs.append(buf)
        views.append(view)
    q, k, v = views
    pool_buf, state = _poisoned((n, h, d, d), 1, torch.float32)
    state.copy_(torch.randn(n, h, d, d, generator=gen) * 0.05)
    slots = torch.arange(n - 1, -1, -1, dtype=torch.int32)
    has_init = torch.tensor([1, 0, 0, 1], dtype=torch.int32)
    ref_state = state.clone()
    ref = lightning_prefill_ref(q, k, v, ref_state, slots, cu, has_init, slope, d**-0.5)
    out_buf, out = _poisoned((total, h, d), pad, torch.bfloat16)
    h_bufs: list[torch.Tensor] = []
    empty = torch.empty

    def poisoned_empty(*shape, **kw):  # the chunk-state buffer [chunks, H, D, D] only
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if len(dims) != 4:
            return empty(*shape, **kw)
        buf, view = _poisoned(dims, 2, kw["dtype"])
        h_bufs.append(buf)
        return view

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    lightning_prefill_chunked(q, k, v, state, slots, cu, has_init, slope, d**-0.5, out=out, config=cfg)
    monkeypatch.undo()
    assert len(h_bufs) == 1
    assert h_bufs[0][:2].isnan().all() and h_bufs[0][-2:].isnan().all()
    assert out_buf[:pad].isnan().all() and out_buf[-pad:].isnan().all()
    assert pool_buf[0].isnan().all() and pool_buf[-1].isnan().all()
    assert relerr(out, ref) < TOL_CHUNKED  # any NaN (a stray read, an unwritten token) fails this
    assert relerr(state, ref_state) < TOL_CHUNKED


def test_stage2_narrow_value_block_refused_on_gpu(monkeypatch) -> None:
    # Compiled (non-interpreter) launches of the faulting stage-2 block are refused before launch.
    monkeypatch.setattr(lightning_chunk, "interpret_mode", lambda: False)
    q = torch.zeros(64, 1, 128, dtype=torch.bfloat16)
    h_states = torch.zeros(2, 1, 128, 128, dtype=torch.bfloat16)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_v=32"):
        cfg = PrefillConfig(block_v_out=32)
        lightning_chunk.chunk_outputs(q, q, q, h_states, cu, 1, torch.ones(1), 1.0, q.clone(), cfg)
