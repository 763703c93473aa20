"""MoE for decode: fused router (sigmoid + bias + group top-k) and the expert kernels.

Math (reference/model.md §4): p = sigmoid(x W_g^T) in fp32; selection score p + expert_bias; each
of n_group groups scores the sum of its top-2; the top topk_group groups stay; the top-k experts of
those are chosen; weights are the *unbiased* p renormalised and scaled by routed_scaling_factor;
y = sum_e w_e SwiGLU_e(x) + SwiGLU_shared(x).

The shared expert is handled as one more expert: stack its weights as expert index E (so w13 is
[E + 1, 2I, hidden], gate rows then up rows, and w2 is [E + 1, hidden, I]); the router appends it
to every token's selection with weight 1, so routed and shared experts run in the same launches.

The decode expert kernels need no sort/align pass (which costs several launches at decode sizes):
each program owns one expert, finds the tokens that chose it in the [B, K] id table, compacts their
row indices in registers and runs its M-tiles, so an expert's weights are streamed once per M-tile.
From ``GROUPED_FROM`` tokens on (prefill chunks), ``fused_moe`` hands over to the sort-based grouped
GEMM in ``moe_prefill``, whose cost does not grow with B per program. ``moe_config`` holds both
choices; the tile loops themselves (``up_tile``, ``down_tile``) are shared with that module.

Weights are bf16, or fp8 e4m3 with fp32 128x128 block scales (DeepSeek ``weight_scale_inv``,
W = w * scale; w13_scale [E + 1, 2I/128, hidden/128], w2_scale [E + 1, hidden/128, I/128]): fp8 is
widened to fp16 in registers (against power-of-two scaled fp16 activations) and each K block's
partial product takes its block scale, so decode still reads each distinct expert once, at 1 byte
per weight. Variants that lost (swap-AB, split-K, bf16 widening, fp8 x fp8) are in docs/gpu-notes.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels.moe_prefill import (
    MoeConfig,
    check_tiles,
    clip_tiles,
    down_tile,
    fused_moe_grouped,
    grouped_config,
    scale_block,
    up_tile,
)

# Batch size from which fused_moe switches to the sort-based grouped GEMM, per weight dtype
# (bench/gpu/moe_sweep.py "THRESHOLDS", H200): bf16 grouped 973 us vs decode 1145 us at B = 128;
# fp8 decode (fp16 widening) 928 us at B = 128 vs grouped 1031 us, grouped 2.8x faster at 512.
GROUPED_FROM = 128
GROUPED_FROM_FP8 = 256

# ---------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------


def moe_route_ref(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    scaling: float,
    append_shared: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference router on fp32 logits [B, E] -> (ids [B, K(+1)] int32, weights fp32)."""
    bsz, n_exp = logits.shape
    p = torch.sigmoid(logits.float())
    score = p + bias.float()
    grouped = score.view(bsz, n_group, n_exp // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool)
    keep.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    masked = grouped.masked_fill(~keep[..., None], float("-inf")).view(bsz, n_exp)
    ids = masked.topk(top_k, dim=-1).indices
    w = p.gather(1, ids)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * scaling
    if append_shared:
        ids = torch.cat([ids, torch.full((bsz, 1), n_exp, dtype=ids.dtype, device=ids.device)], 1)
        w = torch.cat([w, torch.ones((bsz, 1), dtype=w.dtype, device=w.device)], 1)
    return ids.to(torch.int32), w


@triton.jit
def _route_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    w_ptr,
    stride_l,
    stride_o,
    scaling,
    E: tl.constexpr,
    G: tl.constexpr,
    TOPK_G: tl.constexpr,
    TOPK: tl.constexpr,
    KPAD: tl.constexpr,
    SHARED: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.arange(0, E)
    p = tl.sigmoid(tl.load(logits_ptr + b * stride_l + offs).to(tl.float32))
    score = p + tl.load(bias_ptr + offs).to(tl.float32)
    per: tl.constexpr = E // G
    col = tl.arange(0, per)
    grouped = tl.reshape(score, (G, per))
    first = tl.argmax(grouped, axis=1)
    best = tl.max(grouped, axis=1)
    second = tl.max(tl.where(col[None, :] == first[:, None], float("-inf"), grouped), axis=1)
    gscore = best + second
    gidx = tl.arange(0, G)
    keep = gidx < 0
    for _ in tl.static_range(TOPK_G):
        gi = tl.argmax(tl.where(keep, float("-inf"), gscore), axis=0)
        keep = keep | (gidx == gi)
    cand = tl.reshape(tl.where(keep[:, None], grouped, float("-inf")), (E,))
    kk = tl.arange(0, KPAD)
    sel_ids = tl.zeros((KPAD,), dtype=tl.int32)
    sel_p = tl.zeros((KPAD,), dtype=tl.float32)
    for i in tl.static_range(TOPK):
        ei = tl.argmax(cand, axis=0)
        pe = tl.sum(tl.where(offs == ei, p, 0.0), axis=0)
        sel_ids = tl.where(kk == i, ei, sel_ids)
        sel_p = tl.where(kk == i, pe, sel_p)
        cand = tl.where(offs == ei, float("-inf"), cand)
    w = sel_p / (tl.sum(sel_p, axis=0) + 1e-20) * scaling
    if SHARED:
        sel_ids = tl.where(kk == TOPK, E, sel_ids)
        w = tl.where(kk == TOPK, 1.0, w)
    n_out: tl.constexpr = TOPK + SHARED
    tl.store(ids_ptr + b * stride_o + kk, sel_ids, mask=kk < n_out)
    tl.store(w_ptr + b * stride_o + kk, w, mask=kk < n_out)


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    scaling: float,
    append_shared: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused router: one program per token; logits [B, E] fp32 (x W_g^T, from cuBLAS)."""
    bsz, n_exp = logits.shape
    n_out = top_k + int(append_shared)
    ids = torch.empty((bsz, n_out), dtype=torch.int32, device=logits.device)
    w = torch.empty((bsz, n_out), dtype=torch.float32, device=logits.device)
    _route_kernel[(bsz,)](
        logits,
        bias,
        ids,
        w,
        logits.stride(0),
        n_out,
        scaling,
        E=n_exp,
        G=n_group,
        TOPK_G=topk_group,
        TOPK=top_k,
        KPAD=triton.next_power_of_2(n_out),
        SHARED=int(append_shared),
        num_warps=4,
    )
    return ids, w


# Tokens up to which ``router_logits`` runs the gate GEMV itself; above, cuBLAS (each block of
# ROUTER_BLOCK_B tokens re-reads the fp32 gate weight, fine for decode, not for prefill chunks).
ROUTER_KERNEL_MAX_TOKENS = 8
# Elements of one program's [tokens, experts, K] product tile (registers: 32 fp32 per thread at 8 warps).
_ROUTER_TILE = 8192


def router_logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits ``x W_g^T`` [B, E] (x any float dtype, W_g fp32 [E, H])."""
    return torch.nn.functional.linear(x.float(), weight.float())


@triton.jit
def _router_logits_kernel(
    x_ptr,
    w_ptr,
    o_ptr,
    B,
    stride_x,
    stride_w,
    stride_o,
    K: tl.constexpr,
    E: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Split over experts (E / BLOCK_E programs per token block): at B = 1 one program per token
    # would leave all but one SM idle while 4 MB of fp32 gate weight streams in.
    pe = tl.program_id(0)
    pb = tl.program_id(1)
    offs_e = pe * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    emask = offs_e < E
    bmask = offs_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kin = (k0 + offs_k) < K
        w = tl.load(
            w_ptr + offs_e[:, None].to(tl.int64) * stride_w + (k0 + offs_k)[None, :],
            mask=emask[:, None] & kin[None, :],
            other=0.0,
        ).to(tl.float32)
        # The activation cast to fp32 happens here, not as a separate launch.
        x = tl.load(
            x_ptr + offs_b[:, None].to(tl.int64) * stride_x + (k0 + offs_k)[None, :],
            mask=bmask[:, None] & kin[None, :],
            other=0.0,
        ).to(tl.float32)
        # Plain fp32 FMAs, no tl.dot: a tf32 dot would change which experts win close calls.
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(o_ptr + offs_b[:, None] * stride_o + offs_e[None, :], acc, mask=bmask[:, None] & emask[None, :])


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``router_logits_ref`` with one launch for decode-sized ``x`` [B, H] (bf16 or fp32) and the fp32
    gate ``weight`` [E, H]: no separate cast of x, and E/2 programs per token instead of cuBLAS's
    gemv. Larger B falls back to the reference (cuBLAS reads the weight once)."""
    bsz, k = x.shape
    n_exp = weight.shape[0]
    if bsz > ROUTER_KERNEL_MAX_TOKENS or bsz == 0 or x.stride(1) != 1 or weight.stride(1) != 1:
        return router_logits_ref(x, weight)
    out = torch.empty((bsz, n_exp), dtype=torch.float32, device=x.device)
    block_b = triton.next_power_of_2(bsz)
    block_e = 2 if n_exp % 2 == 0 else 1
    block_k = min(triton.next_power_of_2(k), max(16, _ROUTER_TILE // (block_b * block_e)))
    grid = (triton.cdiv(n_exp, block_e), triton.cdiv(bsz, block_b))
    _router_logits_kernel[grid](
        x,
        weight,
        out,
        bsz,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        K=k,
        E=n_exp,
        BLOCK_B=block_b,
        BLOCK_E=block_e,
        BLOCK_K=block_k,
        num_warps=8,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------


def moe_config(tokens: int, inter: int, hidden: int, scale_block: int = 0) -> MoeConfig:
    """The measured config for ``tokens`` rows (``scale_block`` 0 = bf16 weights, else fp8 with
    that square scale block): decode kernels below ``GROUPED_FROM`` / ``GROUPED_FROM_FP8``, else
    ``moe_prefill.grouped_config``. Tiles shrink to small models' dims."""
    if tokens >= (GROUPED_FROM_FP8 if scale_block else GROUPED_FROM):
        return grouped_config(tokens, inter, hidden, scale_block)
    fp8 = scale_block > 0
    # fp8 B >= 32: wider down tiles (397 vs 441 us at B = 32); fp8 one more stage in flight (half
    # the bytes per stage). From B = 64 the shared expert leaves the decode kernels.
    bn_down = 128 if fp8 and tokens >= 32 else 64
    stages = 4 if fp8 else 3
    cfg = MoeConfig(
        "decode", 16, (64, bn_down), (128, 128), (4, 4), (stages, stages), dense_shared=tokens >= 64
    )
    return clip_tiles(cfg, inter, hidden, scale_block)


def dequant_blockwise(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 copy of one expert matrix [N, K]; fp8 with scale [N/qb, K/qb] means W = w * scale."""
    if scale is None:
        return w.float()
    n, k = w.shape
    qn, qk = scale.shape
    blocks = w.float().view(qn, n // qn, qk, k // qk) * scale[:, None, :, None]
    return blocks.view(n, k)


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: y_b = sum_k w_bk * down_e(silu(gate_e x_b) * up_e x_b), fp32 math, e = ids[b, k].

    FP8 weights are dequantised one expert at a time (all 257 at once would be 13 GB of fp32).
    """
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        xe = x[rows].float()
        gu = xe @ dequant_blockwise(w13[e], None if w13_scale is None else w13_scale[e]).T
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        h = h.to(x.dtype).float()  # the kernel keeps the intermediate in the activation dtype
        w2e = dequant_blockwise(w2[e], None if w2_scale is None else w2_scale[e])
        out.index_add_(0, rows, (h @ w2e.T) * weights[rows, slots, None].float())
    return out.to(x.dtype)


@triton.jit
def _program_expert(
    ids_ptr,
    B,
    KSEL: tl.constexpr,
    KSTRIDE: tl.constexpr,
    KPAD: tl.constexpr,
    BB: tl.constexpr,
    PAIR_GRID: tl.constexpr,
):
    """The expert this program serves, and whether it is the one to serve it.

    Expert grid: program e serves expert e (it may have no tokens). Pair grid (used when B*K is
    smaller than the expert count, i.e. small decode batches): program p serves the expert of the
    p-th (token, slot) pair if no earlier pair chose the same expert, so no program is launched
    for the ~250 experts nobody chose.
    """
    pid = tl.program_id(0)
    if PAIR_GRID:
        e = tl.load(ids_ptr + (pid // KSEL) * KSTRIDE + pid % KSEL)
        offs_b = tl.arange(0, BB)
        offs_s = tl.arange(0, KPAD)
        flat = offs_b[:, None] * KSEL + offs_s[None, :]
        tmask = (offs_b[:, None] < B) & (offs_s[None, :] < KSEL)
        ids = tl.load(ids_ptr + offs_b[:, None] * KSTRIDE + offs_s[None, :], mask=tmask, other=-1)
        first = tl.min(tl.min(tl.where(ids == e, flat, 1 << 30), axis=1), axis=0)
        return e, first == pid
    else:
        return pid, pid >= 0


@triton.jit
def _select(
    ids_ptr,
    w_ptr,
    e,
    m0,
    B,
    KSEL: tl.constexpr,
    KSTRIDE: tl.constexpr,
    KPAD: tl.constexpr,
    BB: tl.constexpr,
    BM: tl.constexpr,
):
    """Rows m0..m0+BM of the tokens that chose expert e: (token, slot k, weight, valid, count)."""
    offs_b = tl.arange(0, BB)
    offs_s = tl.arange(0, KPAD)
    tmask = (offs_b[:, None] < B) & (offs_s[None, :] < KSEL)
    cell = offs_b[:, None] * KSTRIDE + offs_s[None, :]
    ids = tl.load(ids_ptr + cell, mask=tmask, other=-1)
    hit = (ids == e).to(tl.int32)
    tok_hit = tl.max(hit, axis=1)
    count = tl.sum(tok_hit, axis=0)
    slot = tl.sum(hit * offs_s[None, :], axis=1)
    wt = tl.sum(tl.where(hit != 0, tl.load(w_ptr + cell, mask=tmask, other=0.0), 0.0), axis=1)
    pos = tl.cumsum(tok_hit, axis=0) - 1
    rows = m0 + tl.arange(0, BM)
    match = (pos[None, :] == rows[:, None]) & (tok_hit[None, :] != 0)
    tok = tl.sum(tl.where(match, offs_b[None, :], 0), axis=1)
    k_slot = tl.sum(tl.where(match, slot[None, :], 0), axis=1)
    weight = tl.sum(tl.where(match, wt[None, :], 0.0), axis=1)
    return tok, k_slot, weight, rows < count, count


@triton.jit
def _moe_up_kernel(
    x_ptr,
    w13_ptr,
    s13_ptr,
    ids_ptr,
    wts_ptr,
    h_ptr,
    B,
    stride_xb,
    stride_we,
    stride_se,
    stride_hb,
    stride_hk,
    INTER: tl.constexpr,
    HID: tl.constexpr,
    KSEL: tl.constexpr,
    KSTRIDE: tl.constexpr,
    KPAD: tl.constexpr,
    BB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PAIR_GRID: tl.constexpr,
    QB: tl.constexpr,
    FP8: tl.constexpr,
):
    e, owner = _program_expert(ids_ptr, B, KSEL, KSTRIDE, KPAD, BB, PAIR_GRID)
    nb = tl.program_id(1)
    count = _select(ids_ptr, wts_ptr, e, 0, B, KSEL, KSTRIDE, KPAD, BB, BM)[4]
    if owner:
        # An expert with more tokens than BM (the shared expert, or skewed routing) takes more
        # trips of this loop instead of dropping tokens.
        for m0 in range(0, count, BM):
            tok, k_slot, _, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
            x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xb
            h = up_tile(
                x_rows, valid, w13_ptr, s13_ptr, e, nb, stride_we, stride_se, INTER, HID, BM, BN, BK, QB, FP8
            )
            offs_n = nb * BN + tl.arange(0, BN)
            dst = (
                h_ptr + tok.to(tl.int64)[:, None] * stride_hb + k_slot[:, None] * stride_hk + offs_n[None, :]
            )
            tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _moe_down_kernel(
    h_ptr,
    w2_ptr,
    s2_ptr,
    ids_ptr,
    wts_ptr,
    o_ptr,
    B,
    stride_hb,
    stride_hk,
    stride_we,
    stride_se,
    stride_ob,
    stride_ok,
    INTER: tl.constexpr,
    KSEL: tl.constexpr,
    KSTRIDE: tl.constexpr,
    KPAD: tl.constexpr,
    BB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PAIR_GRID: tl.constexpr,
    QB: tl.constexpr,
    FP8: tl.constexpr,
):
    e, owner = _program_expert(ids_ptr, B, KSEL, KSTRIDE, KPAD, BB, PAIR_GRID)
    nb = tl.program_id(1)
    count = _select(ids_ptr, wts_ptr, e, 0, B, KSEL, KSTRIDE, KPAD, BB, BM)[4]
    if owner:
        for m0 in range(0, count, BM):
            tok, k_slot, weight, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
            h_rows = h_ptr + tok.to(tl.int64)[:, None] * stride_hb + k_slot[:, None] * stride_hk
            acc = down_tile(
                h_rows, valid, w2_ptr, s2_ptr, e, nb, stride_we, stride_se, INTER, BM, BN, BK, QB, FP8
            )
            acc = acc * weight[:, None]
            offs_n = nb * BN + tl.arange(0, BN)
            dst = (
                o_ptr + tok.to(tl.int64)[:, None] * stride_ob + k_slot[:, None] * stride_ok + offs_n[None, :]
            )
            tl.store(dst, acc, mask=valid[:, None])


def _decode_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: MoeConfig,
) -> torch.Tensor:
    """The two decode launches -> per-(token, slot) outputs o [B, K, hidden] fp32, already weighted
    (the last column left unwritten when ``cfg.dense_shared``)."""
    bsz, hid = x.shape
    n_exp, two_i, _ = w13.shape
    inter = two_i // 2
    kstride = ids.shape[1]
    qb = 0 if scales is None else scale_block(w13, scales[0])
    check_tiles(cfg, inter, hid, qb)
    assert ids.stride(1) == 1 and weights.stride() == ids.stride() and ids.stride(0) == kstride
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    ksel = kstride - 1 if cfg.dense_shared else kstride
    h = torch.empty((bsz, kstride, inter), dtype=x.dtype, device=x.device)
    o = torch.empty((bsz, kstride, hid), dtype=torch.float32, device=x.device)
    s13, s2 = scales or (w13, w2)  # unused pointers when bf16
    pair_grid = bsz * ksel < n_exp
    first_dim = bsz * ksel if pair_grid else n_exp
    meta = dict(
        KSEL=ksel,
        KSTRIDE=kstride,
        KPAD=triton.next_power_of_2(ksel),
        BB=max(16, triton.next_power_of_2(bsz)),
        BM=cfg.block_m,
        PAIR_GRID=pair_grid,
        QB=max(qb, 1),
        FP8=qb > 0,
    )
    _moe_up_kernel[(first_dim, inter // cfg.block_n[0])](
        x,
        w13,
        s13,
        ids,
        weights,
        h,
        bsz,
        x.stride(0),
        w13.stride(0),
        s13.stride(0) if qb else 0,
        h.stride(0),
        h.stride(1),
        INTER=inter,
        HID=hid,
        BN=cfg.block_n[0],
        BK=cfg.block_k[0],
        num_warps=cfg.num_warps[0],
        num_stages=cfg.num_stages[0],
        **meta,
    )
    _moe_down_kernel[(first_dim, hid // cfg.block_n[1])](
        h,
        w2,
        s2,
        ids,
        weights,
        o,
        bsz,
        h.stride(0),
        h.stride(1),
        w2.stride(0),
        s2.stride(0) if qb else 0,
        o.stride(0),
        o.stride(1),
        INTER=inter,
        BN=cfg.block_n[1],
        BK=cfg.block_k[1],
        num_warps=cfg.num_warps[1],
        num_stages=cfg.num_stages[1],
        **meta,
    )
    return o


def _shared_expert(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The shared expert (last id column, every token) for all B rows: fp32 [B, hidden], weighted.
    fp8 as a one-expert grouped GEMM (its weights read once per BM-row tile pass, all tiles of one
    N block running together, so L2 serves the repeats: still 1 byte per weight); bf16 as cuBLAS."""
    if scales is not None:
        return fused_moe_grouped(
            x,
            w13,
            w2,
            ids[:, -1:].contiguous(),
            weights[:, -1:].contiguous(),
            *scales,
            pair_dtype=torch.float32,
            out_dtype=torch.float32,
        )
    shared = w13.shape[0] - 1
    inter = w2.shape[2]
    gu = x @ w13[shared].T
    hs = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    return (hs @ w2[shared].T).float() * weights[:, -1:]


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    config: MoeConfig | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """MoE: x [B, hidden] bf16, w13 [E', 2I, hidden], w2 [E', hidden, I], ids/weights [B, K].

    Weights bf16, or fp8 e4m3 with fp32 block scales w13_scale [E', 2I/128, hidden/128] and
    w2_scale [E', hidden/128, I/128] (W = w * scale), widened to fp16 in registers against x and h
    scaled by a power of two per row per K block (``moe_prefill.quant_rows``: no overflow for
    activations above 65504, no accuracy lost), so the weights are read once per distinct expert,
    at 1 byte each. ``config`` defaults to ``moe_config`` (measured tiles by B and dtype).

    Path ``decode``: two launches (gate/up with the SwiGLU epilogue, then down with the routing
    weight), each over (expert, N tile); the per-(token, slot) outputs are summed in fp32 at the
    end, in a fixed order, so the result is deterministic. Paths ``grouped`` / ``dequant``: the
    sort-based grouped GEMM (``moe_prefill.fused_moe_grouped``). Graph-capturable at every size.

    ``reduce=False`` (decode path only) returns the per-(token, slot) fp32 outputs [B, K, hidden]
    un-summed, for a consumer that sums them itself in the same launch
    (``norms.add_rmsnorm_partials``): no reduce and cast launches.
    """
    bsz, hid = x.shape
    qb = scale_block(w13, w13_scale)
    assert scale_block(w2, w2_scale) == qb
    cfg = config or moe_config(bsz, w2.shape[2], hid, qb)
    scales = (w13_scale, w2_scale) if w13_scale is not None and w2_scale is not None else None
    if cfg.path != "decode":
        assert reduce, "reduce=False: only the decode kernels have per-slot outputs"
        return fused_moe_grouped(
            x, w13, w2, ids.contiguous(), weights.contiguous(), w13_scale, w2_scale, config=cfg
        )
    o = _decode_experts(x, w13, w2, ids, weights, scales, cfg)
    if not cfg.dense_shared:
        return o.sum(1).to(x.dtype) if reduce else o
    ys = _shared_expert(x, w13, w2, ids, weights, scales)
    if not reduce:
        o[:, -1].copy_(ys)
        return o
    return (o[:, :-1].sum(1) + ys).to(x.dtype)
