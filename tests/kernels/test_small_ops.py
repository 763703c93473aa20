"""Fused small ops and sampling against their torch references (interpreter, small sizes)."""

from __future__ import annotations

import torch
from ling_runtime.kernels.norms import (
    add_rmsnorm,
    add_rmsnorm_ref,
    group_rmsnorm_gate,
    group_rmsnorm_gate_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
    rope_cos_sin,
)
from ling_runtime.kernels.sampling import sample, sample_ref

from tests.kernels.util import relerr


def test_add_rmsnorm_updates_residual(gen: torch.Generator) -> None:
    x = torch.randn(3, 256, generator=gen).bfloat16()
    res = torch.randn(3, 256, generator=gen).bfloat16()
    w = torch.rand(256, generator=gen) + 0.5
    ref_y, ref_r = add_rmsnorm_ref(x, res, w, 1e-6)
    y, r = add_rmsnorm(x, res, w, 1e-6)
    assert r is res and relerr(res, ref_r) < 1e-2  # in place; within a bf16 ulp
    assert relerr(y, ref_y) < 1e-2


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
