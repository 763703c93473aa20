"""Fused small ops and sampling against their torch references (interpreter, small sizes)."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.kernels.moe import fused_moe, moe_route_ref
from ling_runtime.kernels.moe_prefill import MoeConfig, grouped_config
from ling_runtime.kernels.norms import (
    add_rmsnorm,
    add_rmsnorm_partials,
    add_rmsnorm_partials_ref,
    add_rmsnorm_ref,
    group_rmsnorm_gate,
    group_rmsnorm_gate_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
    rope_cos_sin,
)
from ling_runtime.kernels.sampling import sample, sample_ref

from tests.kernels.test_moe import make_experts
from tests.kernels.util import relerr


def test_add_rmsnorm_updates_residual(gen: torch.Generator) -> None:
    x = torch.randn(3, 256, generator=gen).bfloat16()
    res = torch.randn(3, 256, generator=gen).bfloat16()
    w = torch.rand(256, generator=gen) + 0.5
    ref_y, ref_r = add_rmsnorm_ref(x, res, w, 1e-6)
    y, r = add_rmsnorm(x, res, w, 1e-6)
    assert r is res and relerr(res, ref_r) < 1e-2  # in place; within a bf16 ulp
    assert relerr(y, ref_y) < 1e-2


def test_add_rmsnorm_partials_matches_reference(gen: torch.Generator) -> None:
    # Slot magnitudes spread over 1e4, so a dropped or double-counted slot is far off.
    scale = torch.tensor([1.0, 100.0, 0.01, 3.0, 30.0])[None, :, None]
    full = torch.randn(3, 5, 512, generator=gen) * scale
    p = full[:, :, :256]  # strided rows, as a workspace slice would be
    res = torch.randn(3, 256, generator=gen).bfloat16()
    res0 = res.clone()
    w = torch.rand(256, generator=gen) + 0.5
    ref_y, ref_r = add_rmsnorm_partials_ref(p, res, w, 1e-6)
    y, r = add_rmsnorm_partials(p, res, w, 1e-6)
    # Within two bf16 ulps: the interpreter's fp32 -> bf16 casts truncate, torch's round.
    assert r is res and relerr(res, ref_r) < 1e-2
    torch.testing.assert_close(res.float(), ref_r.float(), rtol=2**-6, atol=0.0)
    # fp32 residual (no roundings): the same fp32 adds in the same slot order, so bit-exact.
    res32 = res0.float()
    want = add_rmsnorm_partials_ref(p, res32, w, 1e-6)[1]
    assert torch.equal(add_rmsnorm_partials(p, res32, w, 1e-6)[1], want)
    assert y.dtype == torch.bfloat16 and relerr(y, ref_y) < 1e-2
    # The unfused path it replaces (sum, cast, add_rmsnorm) agrees up to fp32 summation order.
    old_y, old_r = add_rmsnorm(p.sum(1).bfloat16(), res0, w, 1e-6)
    assert relerr(old_r, r) < 1e-2 and relerr(old_y, y) < 1e-2
    # Reading every slot: the last one alone moves the result.
    p2 = p.clone()
    p2[:, -1] += 1.0
    assert relerr(add_rmsnorm_partials(p2, res0.clone(), w, 1e-6)[1], r) > 1e-2


@pytest.mark.parametrize(
    ("bsz", "dense_shared", "fp8"), [(2, False, False), (20, True, False), (3, False, True)]
)
def test_fused_moe_partials_sum_to_reduced_output(
    gen: torch.Generator, bsz: int, dense_shared: bool, fp8: bool
) -> None:
    n_routed, hid, inter = 8, 64, 32
    w13, w2, s13, s2 = make_experts(gen, n_routed, hid, inter, fp8, 32)
    x = torch.randn(bsz, hid, generator=gen).bfloat16()
    logits = torch.randn(bsz, n_routed, generator=gen)
    ids, w = moe_route_ref(logits, torch.zeros(n_routed), top_k=2, n_group=4, topk_group=2, scaling=2.5)
    cfg = MoeConfig("decode", 16, (16, 32), (32, 16), (4, 4), (3, 3), dense_shared=dense_shared)
    reduced = fused_moe(x, w13, w2, ids, w, s13, s2, config=cfg)
    parts = fused_moe(x, w13, w2, ids, w, s13, s2, config=cfg, reduce=False)
    assert parts.shape == (bsz, ids.shape[1], hid) and parts.dtype == torch.float32
    assert relerr(parts.sum(1).bfloat16(), reduced) < 1e-2
    # Every slot is filled (the shared column too, where it runs outside the grouped kernels).
    assert (parts.abs().amax(-1) > 0).all()
    res = torch.randn(bsz, hid, generator=gen).bfloat16()
    lw = torch.rand(hid, generator=gen) + 0.5
    y, r = add_rmsnorm_partials(parts, res.clone(), lw, 1e-6)
    old_y, old_r = add_rmsnorm(reduced, res.clone(), lw, 1e-6)
    assert relerr(r, old_r) < 1e-2 and relerr(y, old_y) < 1e-2


def test_fused_moe_partials_refused_by_grouped_path(gen: torch.Generator) -> None:
    w13, w2, _, _ = make_experts(gen, 4, 64, 32, False, 32)
    x = torch.randn(4, 64, generator=gen).bfloat16()
    ids = torch.tensor([[0, 4], [1, 4], [2, 4], [3, 4]])
    with pytest.raises(AssertionError, match="reduce=False"):
        fused_moe(x, w13, w2, ids, torch.ones(4, 2), config=grouped_config(4, 32, 64), reduce=False)


def test_group_rmsnorm_gate(gen: torch.Generator) -> None:
    o = torch.randn(2, 4 * 64, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0]).repeat_interleave(64)
    g = torch.randn(2, 256, generator=gen).bfloat16()
    w = torch.rand(256, generator=gen) + 0.5
    y = group_rmsnorm_gate(o, g, w, group=64, eps=1e-6)
    assert relerr(y, group_rmsnorm_gate_ref(o, g, w, 64, 1e-6)) < 1e-2
    # Per-group, not per-row: a whole-row norm would give a different answer here.
    whole = group_rmsnorm_gate_ref(o, g, w, 256, 1e-6)
    assert relerr(y, whole) > 0.1


def test_qk_norm_partial_rope(gen: torch.Generator) -> None:
    heads, dim = 3, 32
    qkv = torch.randn(4, 3 * heads * dim, generator=gen).bfloat16()
    wq, wk = torch.rand(dim, generator=gen) + 0.5, torch.rand(dim, generator=gen) + 0.5
    cos, sin = rope_cos_sin(torch.tensor([0, 5, 77, 1000]), rot_dim=16, theta=6e6)
    q, k, v = qk_norm_rope(qkv, wq, wk, cos, sin, heads, 1e-6)
    rq, rk, rv = qk_norm_rope_ref(qkv, wq, wk, cos, sin, heads, 1e-6)
    assert relerr(q, rq) < 1e-2 and relerr(k, rk) < 1e-2 and torch.equal(v, rv)
    assert not torch.allclose(q[:, :, :16].float(), q[:, :, 16:].float())


def test_sampling_greedy_and_gumbel(gen: torch.Generator) -> None:
    logits = torch.randn(3, 10000, generator=gen)
    logits[1, 7777] = 50.0  # a confident row
    u = torch.rand(3, 10000, generator=gen)
    temp = torch.tensor([0.0, 0.7, 1.3])
    out = sample(logits, temp, u, block=1024)
    assert torch.equal(out, sample_ref(logits, temp, u))
    assert out[0] == logits[0].argmax() and out[1] == 7777
    greedy = sample(logits, torch.zeros(3), None, block=1024)
    assert torch.equal(greedy, logits.argmax(-1).to(torch.int32))


def test_sampling_with_hashed_noise(gen: torch.Generator) -> None:
    """Noise hashed in the kernel from (seed, position, token) == the torch reference's, bit for bit;
    rows of a verify share their request's seed (seed_div); the draw depends on seed and position."""
    logits = torch.randn(6, 5000, generator=gen)
    temp = torch.tensor([0.0, 0.7, 1.3, 1.0, 2.0, 1.0])
    seeds = torch.tensor([1, 2, -5, 2**40 + 3, 7, 7], dtype=torch.int64)
    pos = torch.tensor([0, 10, 100, 2**33, 5, 6], dtype=torch.int64)
    out = sample(logits, temp, None, block=1024, seeds=seeds, positions=pos)
    assert torch.equal(out, sample_ref(logits, temp, None, seeds, pos))
    assert out[0] == logits[0].argmax()
    per_request = torch.tensor([3, 4], dtype=torch.int64)
    verify = sample(logits, torch.ones(6), None, block=1024, seeds=per_request, positions=pos, seed_div=3)
    assert torch.equal(verify, sample_ref(logits, torch.ones(6), None, per_request, pos, 3))
    # A flat row: seed and position decide the draw, so they spread over the vocabulary.
    flat = torch.zeros(64, 50)
    draws = sample_ref(flat, torch.ones(64), None, torch.arange(64), torch.zeros(64, dtype=torch.int64))
    assert len(set(draws.tolist())) > 25
    again = sample_ref(flat, torch.ones(64), None, torch.arange(64), torch.zeros(64, dtype=torch.int64))
    assert torch.equal(draws, again)
