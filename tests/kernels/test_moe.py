"""Router, decode and grouped (prefill) MoE kernels, bf16 and fp8, against their torch references.

Interpreter, tiny sizes; fp8 tests use 32 x 32 scale blocks except one at the real 128.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from ling_runtime.kernels import moe as moe_mod
from ling_runtime.kernels import moe_prefill
from ling_runtime.kernels.moe import (
    dequant_blockwise,
    fused_moe,
    fused_moe_ref,
    moe_config,
    moe_route,
    moe_route_ref,
)
from ling_runtime.kernels.moe_prefill import (
    MoeConfig,
    dequant_experts,
    fused_moe_grouped,
    grouped_config,
    moe_align,
)

from tests.kernels.util import relerr


def test_router_matches_reference(gen: torch.Generator) -> None:
    logits = torch.randn(7, 64, generator=gen) * 3
    bias = torch.randn(64, generator=gen) * 0.5
    ids, w = moe_route(logits, bias, top_k=4, n_group=8, topk_group=3, scaling=2.5)
    ref_ids, ref_w = moe_route_ref(logits, bias, top_k=4, n_group=8, topk_group=3, scaling=2.5)
    assert torch.equal(ids, ref_ids)
    assert relerr(w, ref_w) < 1e-6
    assert (ids[:, -1] == 64).all() and (w[:, -1] == 1.0).all()  # the shared expert rides along
    # Group limiting: every chosen routed expert lies in one of the 3 kept groups.
    assert all(len(set((row[:-1] // 8).tolist())) <= 3 for row in ids)


# Small decode tiles for the tiny dims below (pairs are (up, down)).
DECODE = MoeConfig("decode", 16, (16, 32), (32, 16), (4, 4), (3, 3))
GROUPED = MoeConfig("grouped", 16, (16, 32), (32, 16), (4, 4), (2, 2))


# bsz 20: expert grid, and the shared expert's 20 tokens take two trips of the 16-row M loop;
# bsz 2: pair grid. dense_shared: the shared expert as plain GEMMs instead of in the decode kernels.
@pytest.mark.parametrize(("bsz", "dense_shared"), [(20, False), (2, False), (20, True)])
def test_fused_moe_matches_reference_with_shared_expert(
    gen: torch.Generator, bsz: int, dense_shared: bool
) -> None:
    n_routed, hid, inter = 8, 64, 32
    w13 = (torch.randn(n_routed + 1, 2 * inter, hid, generator=gen) * hid**-0.5).bfloat16()
    w2 = (torch.randn(n_routed + 1, hid, inter, generator=gen) * inter**-0.5).bfloat16()
    x = torch.randn(bsz, hid, generator=gen).bfloat16()
    logits = torch.randn(bsz, n_routed, generator=gen)
    ids, w = moe_route_ref(logits, torch.zeros(n_routed), top_k=2, n_group=4, topk_group=2, scaling=2.5)
    ref = fused_moe_ref(x, w13, w2, ids, w)
    cfg = replace(DECODE, dense_shared=dense_shared)
    out = fused_moe(x, w13, w2, ids, w, config=cfg)
    assert relerr(out, ref) < 1e-2
    # A token's output changes when its routing changes: the kernel really reads the ids.
    ids2 = ids.clone()
    ids2[0, 0] = (
        (ids[0, 0] + 1) % n_routed if (ids[0, 0] + 1) % n_routed != ids[0, 1] else (ids[0, 0] + 2) % n_routed
    )
    out2 = fused_moe(x, w13, w2, ids2, w, config=cfg)
    assert relerr(out2[0], out[0]) > 1e-2 and torch.equal(out2[1:], out[1:])


def quantize_experts(w: torch.Tensor, qb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (fp8 e4m3, fp32 scales [E, N/qb, K/qb]) with W = w_fp8 * scale, per qb x qb block."""
    e, n, k = w.shape
    blocks = w.float().view(e, n // qb, qb, k // qb, qb)
    scale = blocks.abs().amax(dim=(2, 4)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, :, None, :, None]).to(torch.float8_e4m3fn).view(e, n, k)
    return q, scale.contiguous()


def make_experts(
    gen: torch.Generator, n_routed: int, hid: int, inter: int, fp8: bool, qb: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    # Row magnitudes vary by 8x across scale blocks, so a kernel that applies the wrong block's
    # scale (or none) is far off, not within rounding.
    rows13 = torch.rand(n_routed + 1, 2 * inter, 1, generator=gen) * 4 + 0.5
    rows2 = torch.rand(n_routed + 1, hid, 1, generator=gen) * 4 + 0.5
    w13 = torch.randn(n_routed + 1, 2 * inter, hid, generator=gen) * hid**-0.5 * rows13
    w2 = torch.randn(n_routed + 1, hid, inter, generator=gen) * inter**-0.5 * rows2
    if not fp8:
        return w13.bfloat16(), w2.bfloat16(), None, None
    q13, s13 = quantize_experts(w13, qb)
    q2, s2 = quantize_experts(w2, qb)
    return q13, q2, s13, s2


def route(
    gen: torch.Generator, tokens: int, n_routed: int, dead: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """top-2 of n_routed in 4 groups; the last ``dead`` experts get no tokens."""
    logits = torch.randn(tokens, n_routed, generator=gen)
    if dead:
        logits[:, n_routed - dead :] = -30.0
    return moe_route_ref(logits, torch.zeros(n_routed), top_k=2, n_group=4, topk_group=2, scaling=2.5)


# FP8 decode: pair grid (2), expert grid with two trips of the M loop (20), and the shared expert
# taken out to the fp8 grouped GEMM (dense_shared, with grouped_config's tiles clipped to the dims).
@pytest.mark.parametrize(("bsz", "dense_shared"), [(2, False), (20, False), (20, True)])
def test_fused_moe_fp8_decode_matches_reference(gen: torch.Generator, bsz: int, dense_shared: bool) -> None:
    n_routed, hid, inter, qb = 8, 64, 32, 32
    w13, w2, s13, s2 = make_experts(gen, n_routed, hid, inter, True, qb)
    x = torch.randn(bsz, hid, generator=gen).bfloat16()
    ids, w = route(gen, bsz, n_routed)
    ref = fused_moe_ref(x, w13, w2, ids, w, s13, s2)
    cfg = replace(DECODE, dense_shared=dense_shared)
    out = fused_moe(x, w13, w2, ids, w, s13, s2, config=cfg)
    assert relerr(out, ref) < 1e-2
    # The scales are read per block: doubling one expert's up-projection scales changes exactly
    # the tokens routed to it.
    e = int(ids[0, 0])
    s13b = s13.clone()
    s13b[e, s13.shape[1] // 2 :] *= 2
    out2 = fused_moe(x, w13, w2, ids, w, s13b, s2, config=cfg)
    hit = (ids == e).any(1)
    assert relerr(out2[hit], out[hit]) > 0.1 and torch.equal(out2[~hit], out[~hit])


def test_fused_moe_fp8_real_scale_block(gen: torch.Generator) -> None:
    """The checkpoint's 128 x 128 blocks with BN/BK below 128 (several tiles per scale block)."""
    n_routed, hid, inter = 4, 256, 128
    w13, w2, s13, s2 = make_experts(gen, n_routed, hid, inter, True, 128)
    x = torch.randn(3, hid, generator=gen).bfloat16()
    ids, w = moe_route_ref(
        torch.randn(3, n_routed, generator=gen),
        torch.zeros(n_routed),
        top_k=2,
        n_group=2,
        topk_group=1,
        scaling=1.0,
    )
    cfg = MoeConfig("decode", 16, (64, 64), (128, 64), (4, 4), (4, 4))
    out = fused_moe(x, w13, w2, ids, w, s13, s2, config=cfg)
    assert (
        s13.shape == (n_routed + 1, 2, 2) and relerr(out, fused_moe_ref(x, w13, w2, ids, w, s13, s2)) < 1e-2
    )


def test_moe_align_tiles_cover_every_pair_once(gen: torch.Generator) -> None:
    ids, _ = route(gen, 37, 8, dead=2)
    order, tiles = moe_align(ids, 9, block_m=16)
    assert sorted(order.tolist()) == list(range(ids.numel()))
    flat = ids.view(-1)
    seen = []
    for e, pos0, rows in tiles.T.tolist():
        if e == 9:
            assert rows == 0
            continue
        assert 0 < rows <= 16
        chunk = order[pos0 : pos0 + rows]
        assert (flat[chunk] == e).all()
        seen += chunk.tolist()
    assert sorted(seen) == list(range(ids.numel()))
    assert tiles.shape[1] == -(-ids.numel() // 16) + 9  # the static bound, whatever the routing


# 37 tokens: not a multiple of BM, the shared expert spans three 16-row tiles, experts 6 and 7 get
# no tokens. fp8 with 32 x 32 scale blocks.
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_moe_grouped_matches_reference(gen: torch.Generator, fp8: bool) -> None:
    n_routed, hid, inter, tokens = 8, 64, 32, 37
    w13, w2, s13, s2 = make_experts(gen, n_routed, hid, inter, fp8, 32)
    x = torch.randn(tokens, hid, generator=gen).bfloat16()
    ids, w = route(gen, tokens, n_routed, dead=2)
    assert not torch.isin(ids, torch.tensor([6, 7])).any()
    ref = fused_moe_ref(x, w13, w2, ids, w, s13, s2)
    out = fused_moe_grouped(x, w13, w2, ids, w, s13, s2, config=GROUPED)
    assert relerr(out, ref) < 1e-2
    # fused_moe runs a grouped config through here (the default grouped tiles at other dims).
    if not fp8:
        big_hid, big_inter = 128, 64  # the default grouped tiles (64, 128) need these multiples
        w13b, w2b, _, _ = make_experts(gen, n_routed, big_hid, big_inter, False, 32)
        xb = torch.randn(tokens, big_hid, generator=gen).bfloat16()
        via = fused_moe(xb, w13b, w2b, ids, w, config=grouped_config(tokens, big_inter, big_hid))
        assert relerr(via, fused_moe_ref(xb, w13b, w2b, ids, w)) < 1e-2
    # Routing is honoured: moving token 0's first slot to another expert changes token 0 only.
    ids2 = ids.clone()
    ids2[0, 0] = 5 if ids[0, 0] != 5 and ids[0, 1] != 5 else 4 if ids[0, 1] != 4 else 3
    out2 = fused_moe_grouped(x, w13, w2, ids2, w, s13, s2, config=GROUPED)
    assert relerr(out2[0], out[0]) > 1e-2 and torch.equal(out2[1:], out[1:])


# The fp8 path widens the weights to fp16 against fp16 activations; fp16 tops out at 65504, so
# each row's K block is scaled by a power of two first. Token 0 carries values ~1e5 (its h is
# ~1e11), token 1 values ~1e-6, token 2 a single 1e5 outlier among unit values: all must come out
# as accurate as the other rows, in the decode kernels and in the grouped (prefill) ones.
@pytest.mark.parametrize(("bsz", "dense_shared"), [(3, False), (20, True)])
def test_fp8_fp16_path_survives_huge_and_tiny_rows(
    gen: torch.Generator, bsz: int, dense_shared: bool
) -> None:
    n_routed, hid, inter, qb = 8, 64, 32, 32
    w13, w2, s13, s2 = make_experts(gen, n_routed, hid, inter, True, qb)
    x = torch.randn(bsz, hid, generator=gen)
    x[0] *= 1e5
    x[1] *= 1e-6
    x[2, 5] = 1e5
    x = x.bfloat16()
    ids, w = route(gen, bsz, n_routed)
    ref = fused_moe_ref(x, w13, w2, ids, w, s13, s2)
    out = fused_moe(x, w13, w2, ids, w, s13, s2, config=replace(DECODE, dense_shared=dense_shared))
    outg = fused_moe_grouped(x, w13, w2, ids, w, s13, s2, config=GROUPED)
    for row in range(bsz):
        assert relerr(out[row], ref[row]) < 1e-2, row
        assert relerr(outg[row], ref[row]) < 1e-2, row


def test_grouped_dequant_path_matches_reference(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill via experts expanded to bf16 first, then the bf16 grouped GEMM."""
    n_routed, hid, inter, tokens = 8, 64, 32, 37
    w13, w2, s13, s2 = make_experts(gen, n_routed, hid, inter, True, 32)
    # bf16 rounding only (the interpreter truncates where the GPU rounds, hence not exact equality).
    full = torch.stack([dequant_blockwise(a, b) for a, b in zip(w13, s13, strict=True)])
    assert relerr(dequant_experts(w13, s13), full) < 8e-3
    x = torch.randn(tokens, hid, generator=gen).bfloat16()
    ids, w = route(gen, tokens, n_routed)
    # From FP8_DEQUANT_FROM tokens on the default fp8 config is this path.
    monkeypatch.setattr(moe_prefill, "FP8_DEQUANT_FROM", tokens)
    cfg = grouped_config(tokens, inter, hid, 32)
    assert cfg.path == "dequant"
    out = fused_moe_grouped(x, w13, w2, ids, w, s13, s2, config=cfg)
    # Rounding w * scale to bf16 (the interpreter truncates: biased, ~1.4% here; the GPU rounds).
    assert relerr(out, fused_moe_ref(x, w13, w2, ids, w, s13, s2)) < 3e-2
    assert torch.equal(fused_moe_grouped(x, w13, w2, ids, w, s13, s2), out)
    monkeypatch.setattr(moe_prefill, "FP8_DEQUANT_FROM", tokens + 1)
    assert grouped_config(tokens, inter, hid, 32).path == "grouped"
    assert not torch.equal(fused_moe_grouped(x, w13, w2, ids, w, s13, s2), out)
    # The scales are honoured: doubling all of w2's scales doubles y.
    out2 = fused_moe_grouped(x, w13, w2, ids, w, s13, s2 * 2, config=cfg)
    assert relerr(out2, 2 * out.float()) < 1e-2


def test_grouped_from_is_per_dtype(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 weights switch to the grouped GEMM at GROUPED_FROM_FP8, bf16 at GROUPED_FROM."""
    calls: list[int] = []

    def fake_grouped(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    monkeypatch.setattr(moe_mod, "fused_moe_grouped", fake_grouped)
    monkeypatch.setattr(moe_mod, "GROUPED_FROM", 4)
    monkeypatch.setattr(moe_mod, "GROUPED_FROM_FP8", 6)
    n_routed, hid, inter = 8, 64, 32
    q13, q2, s13, s2 = make_experts(gen, n_routed, hid, inter, True, 32)
    b13, b2, _, _ = make_experts(gen, n_routed, hid, inter, False, 32)
    for bsz, fp8, grouped in [(4, False, True), (3, False, False), (5, True, False), (6, True, True)]:
        x = torch.randn(bsz, hid, generator=gen).bfloat16()
        ids, w = route(gen, bsz, n_routed)
        calls.clear()
        if fp8:
            fused_moe(x, q13, q2, ids, w, s13, s2)
        else:
            fused_moe(x, b13, b2, ids, w)
        assert calls == ([bsz] if grouped else []), (bsz, fp8)
        assert (moe_config(bsz, inter, hid, 32 if fp8 else 0).path == "grouped") == grouped
