"""MoE for decode: fused router (sigmoid + bias + group top-k) and grouped expert kernels.

Math (reference/model.md §4): p = sigmoid(x W_g^T) in fp32; selection score p + expert_bias; each
of n_group groups scores the sum of its top-2; the top topk_group groups stay; the top-k experts of
those are chosen; weights are the *unbiased* p renormalised and scaled by routed_scaling_factor;
y = sum_e w_e SwiGLU_e(x) + SwiGLU_shared(x).

The shared expert is handled as one more expert: stack its weights as expert index E (so w13 is
[E + 1, 2I, hidden], gate rows then up rows, and w2 is [E + 1, hidden, I]); the router appends it
to every token's selection with weight 1, so routed and shared experts run in the same launches.

The decode expert kernels need no sort/align pass (which costs several launches at decode sizes):
each program owns one expert, finds the tokens that chose it in the [B, K] id table, compacts their
row indices in registers and runs its M-tile, so an expert's weights are streamed once per M-tile.
From ``GROUPED_FROM`` tokens on (prefill chunks), ``fused_moe`` hands over to the sort-based grouped
GEMM in ``moe_prefill``, whose cost does not grow with B per program.

Weights are bf16, or fp8 e4m3 with fp32 128x128 block scales (DeepSeek ``weight_scale_inv``,
W = w * scale; w13_scale [E + 1, 2I/128, hidden/128], w2_scale [E + 1, hidden/128, I/128]): fp8 is
widened to fp16 in registers (against power-of-two scaled fp16 activations) and each K block's
partial product takes its block scale, so decode still reads each distinct expert once, at 1 byte
per weight. ``act_fp8`` instead quantises the activations per token per K block inside the
kernels and multiplies fp8 x fp8 (no per-weight convert, ~4% relerr from rounding x and h).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import interpret_mode, mma
from ling_runtime.kernels.fp8 import _x_pow2
from ling_runtime.kernels.moe_prefill import fp8_mode, fused_moe_grouped, quant_rows, scale_block, scaled_dot

# Batch size from which fused_moe switches to the sort-based grouped GEMM, per weight dtype
# (bench/gpu/moe_sweep.py "THRESHOLDS"). H200 round 1: bf16 grouped 973 us vs decode 1145 us at
# B=128. fp8: decode with the fp16 widening 928 us at B=128 vs grouped (bf16 widening) 1031 us;
# grouped won 2.8x at 512; 256 until round 2 times the fp16 grouped path at 128.
GROUPED_FROM = 128
GROUPED_FROM_FP8 = 256
# Up-projection split-K of the swap-AB decode kernels when the up grid is this small (B = 1:
# 9 x 1024/64 = 144 programs on 132 SMs). Best guess before round 3 measures it (moe_sweep.py).
SPLIT_K = 4
SPLIT_BELOW = 264

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
def _router_logits_kernel(x_ptr, w_ptr, o_ptr, B, stride_x, stride_w, stride_o, K: tl.constexpr, E: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
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
        w = tl.load(w_ptr + offs_e[:, None].to(tl.int64) * stride_w + (k0 + offs_k)[None, :],
                    mask=emask[:, None] & kin[None, :], other=0.0).to(tl.float32)  # fmt: skip
        # The activation cast to fp32 happens here, not as a separate launch.
        x = tl.load(x_ptr + offs_b[:, None].to(tl.int64) * stride_x + (k0 + offs_k)[None, :],
                    mask=bmask[:, None] & kin[None, :], other=0.0).to(tl.float32)  # fmt: skip
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
        x, weight, out, bsz, x.stride(0), weight.stride(0), out.stride(0),
        K=k, E=n_exp, BLOCK_B=block_b, BLOCK_E=block_e, BLOCK_K=block_k, num_warps=8,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------


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
    ids_ptr, B, KSEL: tl.constexpr, KSTRIDE: tl.constexpr, KPAD: tl.constexpr, BB: tl.constexpr,
    PAIR_GRID: tl.constexpr,
):  # fmt: skip
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
    ids_ptr, w_ptr, e, m0, B, KSEL: tl.constexpr, KSTRIDE: tl.constexpr, KPAD: tl.constexpr, BB: tl.constexpr,
    BM: tl.constexpr,
):  # fmt: skip
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
def _up_tile_n(x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_se,
             stride_hb, stride_hk, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr,
             KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             QB: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    tok, k_slot, _, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xb
    w_base = w13_ptr + e.to(tl.int64) * stride_we
    g_cols = w_base + offs_n[None, :] * HID
    u_cols = w_base + (offs_n[None, :] + INTER) * HID
    # FP8: BN and BK nest in the QB x QB scale blocks, so each partial product takes one scale.
    sg_ptr = s13_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (HID // QB)
    su_ptr = sg_ptr + (INTER // QB) * (HID // QB)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, HID, BK):
        x, sx = quant_rows(tl.load(x_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0), BM, FP8)
        wg = tl.load(g_cols + k0 + offs_k[:, None])
        wu = tl.load(u_cols + k0 + offs_k[:, None])
        acc_g += scaled_dot(x, sx, wg, sg_ptr + k0 // QB, FP8, INTERPRET)
        acc_u += scaled_dot(x, sx, wu, su_ptr + k0 // QB, FP8, INTERPRET)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    dst = h_ptr + tok.to(tl.int64)[:, None] * stride_hb + k_slot[:, None] * stride_hk + offs_n[None, :]
    tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _down_tile_n(h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we,
               stride_se, stride_ob, stride_ok, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr,
               KSTRIDE: tl.constexpr, KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    tok, k_slot, weight, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    h_rows = h_ptr + tok.to(tl.int64)[:, None] * stride_hb + k_slot[:, None] * stride_hk
    w_cols = w2_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * INTER
    s_ptr = s2_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (INTER // QB)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, INTER, BK):
        h, sh = quant_rows(tl.load(h_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0), BM, FP8)
        w = tl.load(w_cols + k0 + offs_k[:, None])
        acc += scaled_dot(h, sh, w, s_ptr + k0 // QB, FP8, INTERPRET)
    acc = acc * weight[:, None]
    dst = o_ptr + tok.to(tl.int64)[:, None] * stride_ob + k_slot[:, None] * stride_ok + offs_n[None, :]
    tl.store(dst, acc, mask=valid[:, None])


@triton.jit
def _act_t(a, FP8: tl.constexpr, ROWSCALE: tl.constexpr, up):
    """Activations [SUBK, BM] (token on the narrow side) as the B operand of ``_wdot_t``, and the
    per-token factor of this step's partial (1 when the scale is per row: applied at the end)."""
    one = tl.full((a.shape[1],), 1.0, tl.float32)
    if FP8 == 3:
        af = a.to(tl.float32)
        if ROWSCALE:
            return (af * up[None, :]).to(tl.float16), one
        else:
            u, d = _x_pow2(tl.max(tl.abs(af), axis=0))
            return (af * u[None, :]).to(tl.float16), d
    elif FP8 == 4:
        return a.to(tl.float16), one
    else:
        return a, one


@triton.jit
def _wdot_t(w, a, s_ptr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    # acc[BN, BM] partial = W_tile @ a with the block scale (one per step: BN and SUBK nest in it).
    if FP8 == 0:
        return mma(w, a, INTERPRET)
    elif FP8 == 1:
        return mma(w.to(tl.bfloat16), a, INTERPRET) * tl.load(s_ptr)
    else:
        return mma(w.to(tl.float16), a, INTERPRET) * tl.load(s_ptr)


@triton.jit
def _row_pow2(a_ptrs, valid, K: tl.constexpr, BM: tl.constexpr):
    """One power of two per token for its whole K extent (a pass over the row before the main
    loop, from L2: [K] values per token against [BN, K] weight bytes), so the K loop has no amax
    reduction. Exact as the per-block scaling for the row's largest values; values below amax *
    2^-29 lose low bits (relative error to the row's amax stays below 2^-39). Unrolled in chunks
    of up to 512 values: a rolled loop of 128-value loads waits one L2 round trip per trip
    (sm_90 SASS), and the weight prologue is only issued after this pass; 1024-value chunks cost
    216 registers in the down kernel (160 at 512, 124 without the pass)."""
    CH: tl.constexpr = min(K, 512)
    offs_k = tl.arange(0, CH)
    amax = tl.zeros((BM,), dtype=tl.float32)
    for c in tl.static_range(K // CH):
        a = tl.load(a_ptrs + c * CH + offs_k[:, None], mask=valid[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=0))
    return _x_pow2(amax)


@triton.jit
def _up_tile_t(x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_se,
               stride_hb, stride_hk, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr,
               KSTRIDE: tl.constexpr, KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, SUBK: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, ROWSCALE: tl.constexpr,
               INTERPRET: tl.constexpr, p_ptr, c_ptr, sk, SPLIT: tl.constexpr):  # fmt: skip
    # Swap-AB: acc[BN, BM] = W_tile @ x^T, so the weight rows fill the MMA's 64-wide M side
    # (Hopper wgmma with the widened weights from registers) and the padded token tile its
    # narrow N side; with BM tokens on M (``_up_tile_n``) sm_90 gets mma.sync with BM = 16.
    tok, k_slot, _, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, SUBK)
    x_cols = x_ptr + tok.to(tl.int64)[None, :] * stride_xb
    w_base = w13_ptr + e.to(tl.int64) * stride_we
    g_rows = w_base + offs_n[:, None] * HID
    u_rows = w_base + (offs_n[:, None] + INTER) * HID
    sg_ptr = s13_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (HID // QB)
    su_ptr = sg_ptr + (INTER // QB) * (HID // QB)
    KS: tl.constexpr = HID // SPLIT  # split-K: this program's K range (its own row scale)
    lo = sk * KS
    up = tl.full((BM,), 1.0, tl.float32)
    down = up
    if FP8 == 3 and ROWSCALE:
        up, down = _row_pow2(x_cols + lo, valid, KS, BM)
    acc_g = tl.zeros((BN, BM), dtype=tl.float32)
    acc_u = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, KS, BK):
        for j in tl.static_range(BK // SUBK):  # BK > SUBK: several scale blocks per trip
            kk = lo + k0 + j * SUBK
            a, f = _act_t(
                tl.load(x_cols + kk + offs_k[:, None], mask=valid[None, :], other=0.0), FP8, ROWSCALE, up
            )
            pg = _wdot_t(tl.load(g_rows + kk + offs_k[None, :]), a, sg_ptr + kk // QB, FP8, INTERPRET)
            pu = _wdot_t(tl.load(u_rows + kk + offs_k[None, :]), a, su_ptr + kk // QB, FP8, INTERPRET)
            if FP8 == 3 and not ROWSCALE:
                pg = pg * f[None, :]
                pu = pu * f[None, :]
            acc_g += pg
            acc_u += pu
    acc_g = acc_g * down[None, :]
    acc_u = acc_u * down[None, :]
    if SPLIT > 1:
        acc_g, acc_u, last = _split_fixup(acc_g, acc_u, p_ptr, c_ptr, sk, tok, k_slot, valid, offs_n, B, m0, INTER,
                                          KSTRIDE, BB, BM, SPLIT, INTERPRET)  # fmt: skip
    else:
        last = True
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    dst = h_ptr + tok.to(tl.int64)[None, :] * stride_hb + k_slot[None, :] * stride_hk + offs_n[:, None]
    tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=valid[None, :] & last)


@triton.jit
def _split_fixup(acc_g, acc_u, p_ptr, c_ptr, sk, tok, k_slot, valid, offs_n, B, m0, INTER: tl.constexpr,
                 KSTRIDE: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr,
                 INTERPRET: tl.constexpr):  # fmt: skip
    """Split-K of the up projection (more programs in flight at B = 1: 9 experts x I/BN tiles are
    ~1 per SM): every split stores its fp32 gate/up partials p[split, token, slot, 2I], bumps the
    tile's counter (release, after a barrier orders this program's stores), and the split that
    sees SPLIT - 1 (acquire) sums all partials in split order (deterministic), returns them for
    the SwiGLU epilogue and resets the counter for the next launch (CUDA-graph replays too): the
    pattern of ``fp8._last_split_reduce``. One counter per (grid column, N tile, M tile)."""
    per_split = B * KSTRIDE * (2 * INTER)
    row = (tok.to(tl.int64) * KSTRIDE + k_slot)[None, :] * (2 * INTER) + offs_n[:, None]
    mask = valid[None, :]
    tl.store(p_ptr + sk * per_split + row, acc_g, mask=mask)
    tl.store(p_ptr + sk * per_split + row + INTER, acc_u, mask=mask)
    n_mt: tl.constexpr = BB // BM
    tile = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * n_mt + m0 // BM
    tl.debug_barrier()
    done = tl.atomic_add(c_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = done == SPLIT - 1
    if last:
        acc_g = tl.zeros_like(acc_g)
        acc_u = tl.zeros_like(acc_u)
        for s in tl.static_range(SPLIT):
            if INTERPRET:
                acc_g += tl.load(p_ptr + s * per_split + row, mask=mask, other=0.0)
                acc_u += tl.load(p_ptr + s * per_split + row + INTER, mask=mask, other=0.0)
            else:
                acc_g += tl.load(p_ptr + s * per_split + row, mask=mask, other=0.0, cache_modifier=".cg")
                acc_u += tl.load(
                    p_ptr + s * per_split + row + INTER, mask=mask, other=0.0, cache_modifier=".cg"
                )
        tl.atomic_xchg(c_ptr + tile, 0)
    return acc_g, acc_u, last


@triton.jit
def _down_tile_t(h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we,
                 stride_se, stride_ob, stride_ok, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr,
                 KSTRIDE: tl.constexpr, KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, SUBK: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr,
                 ROWSCALE: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    tok, k_slot, weight, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, SUBK)
    h_cols = h_ptr + tok.to(tl.int64)[None, :] * stride_hb + k_slot[None, :] * stride_hk
    w_rows = w2_ptr + e.to(tl.int64) * stride_we + offs_n[:, None] * INTER
    s_ptr = s2_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (INTER // QB)
    up = tl.full((BM,), 1.0, tl.float32)
    down = up
    if FP8 == 3 and ROWSCALE:
        up, down = _row_pow2(h_cols, valid, INTER, BM)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, INTER, BK):
        for j in tl.static_range(BK // SUBK):
            kk = k0 + j * SUBK
            a, f = _act_t(
                tl.load(h_cols + kk + offs_k[:, None], mask=valid[None, :], other=0.0), FP8, ROWSCALE, up
            )
            p = _wdot_t(tl.load(w_rows + kk + offs_k[None, :]), a, s_ptr + kk // QB, FP8, INTERPRET)
            if FP8 == 3 and not ROWSCALE:
                p = p * f[None, :]
            acc += p
    acc = acc * (down * weight)[None, :]
    dst = o_ptr + tok.to(tl.int64)[None, :] * stride_ob + k_slot[None, :] * stride_ok + offs_n[:, None]
    tl.store(dst, acc, mask=valid[None, :])


@triton.jit
def _up_tile(x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_se,
             stride_hb, stride_hk, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr,
             KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
             SUBK: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, SWAP: tl.constexpr, ROWSCALE: tl.constexpr,
             INTERPRET: tl.constexpr, p_ptr, c_ptr, sk, SPLIT: tl.constexpr):  # fmt: skip
    if SWAP:
        _up_tile_t(x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_se,
                   stride_hb, stride_hk, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, SUBK, QB, FP8, ROWSCALE,
                   INTERPRET, p_ptr, c_ptr, sk, SPLIT)  # fmt: skip
    else:
        _up_tile_n(x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_se,
                   stride_hb, stride_hk, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, QB, FP8,
                   INTERPRET)  # fmt: skip


@triton.jit
def _down_tile(h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we,
               stride_se, stride_ob, stride_ok, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr,
               KSTRIDE: tl.constexpr, KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, SUBK: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, SWAP: tl.constexpr,
               ROWSCALE: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    if SWAP:
        _down_tile_t(h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we,
                     stride_se, stride_ob, stride_ok, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, SUBK, QB, FP8,
                     ROWSCALE, INTERPRET)  # fmt: skip
    else:
        _down_tile_n(h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we,
                     stride_se, stride_ob, stride_ok, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, QB, FP8,
                     INTERPRET)  # fmt: skip


@triton.jit
def _moe_up_kernel(
    x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, p_ptr, c_ptr, B, stride_xb, stride_we, stride_se, stride_hb, stride_hk,
    INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr, KPAD: tl.constexpr,
    BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, M_PROGS: tl.constexpr,
    PAIR_GRID: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
    SUBK: tl.constexpr = 128, SWAP: tl.constexpr = False, ROWSCALE: tl.constexpr = False, SPLIT: tl.constexpr = 1,
):  # fmt: skip
    e, owner = _program_expert(ids_ptr, B, KSEL, KSTRIDE, KPAD, BB, PAIR_GRID)
    nb = tl.program_id(1)
    sk = tl.program_id(2) % SPLIT
    m_first = (tl.program_id(2) // SPLIT) * BM
    count = _select(ids_ptr, wts_ptr, e, m_first, B, KSEL, KSTRIDE, KPAD, BB, BM)[4]
    if owner:
        # M tiles in a grid-stride loop: an expert with more tokens than BM * M_PROGS (the shared
        # expert, or skewed routing) takes more trips instead of dropping tokens.
        if INTERPRET:
            m0 = m_first
            while m0 < count:
                _up_tile(x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we,
                         stride_se, stride_hb, stride_hk, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, SUBK, QB, FP8,
                         SWAP, ROWSCALE, INTERPRET, p_ptr, c_ptr, sk, SPLIT)  # fmt: skip
                m0 += BM * M_PROGS
        else:
            for m0 in range(m_first, count, BM * M_PROGS):
                _up_tile(x_ptr, w13_ptr, s13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we,
                         stride_se, stride_hb, stride_hk, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, SUBK, QB, FP8,
                         SWAP, ROWSCALE, INTERPRET, p_ptr, c_ptr, sk, SPLIT)  # fmt: skip


@triton.jit
def _moe_down_kernel(
    h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, B, stride_hb, stride_hk, stride_we, stride_se, stride_ob,
    stride_ok, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr,
    KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    M_PROGS: tl.constexpr, PAIR_GRID: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr,
    SUBK: tl.constexpr = 128, SWAP: tl.constexpr = False, ROWSCALE: tl.constexpr = False,
):  # fmt: skip
    e, owner = _program_expert(ids_ptr, B, KSEL, KSTRIDE, KPAD, BB, PAIR_GRID)
    nb = tl.program_id(1)
    m_first = tl.program_id(2) * BM
    count = _select(ids_ptr, wts_ptr, e, m_first, B, KSEL, KSTRIDE, KPAD, BB, BM)[4]
    if owner:
        if INTERPRET:
            m0 = m_first
            while m0 < count:
                _down_tile(h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk,
                           stride_we, stride_se, stride_ob, stride_ok, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN,
                           BK, SUBK, QB, FP8, SWAP, ROWSCALE, INTERPRET)  # fmt: skip
                m0 += BM * M_PROGS
        else:
            for m0 in range(m_first, count, BM * M_PROGS):
                _down_tile(h_ptr, w2_ptr, s2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk,
                           stride_we, stride_se, stride_ob, stride_ok, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN,
                           BK, SUBK, QB, FP8, SWAP, ROWSCALE, INTERPRET)  # fmt: skip


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 tile counters for the up kernel's split-K fix-up: one buffer per device,
    allocated once and never replaced (a captured CUDA graph keeps its pointer); every launch
    leaves them at 0. 2^18 covers the expert grid (257 x I/BN x B/BM) up to the grouped switch."""
    c = _COUNTERS.get(device)
    if c is None:
        c = _COUNTERS[device] = torch.zeros(1 << 18, dtype=torch.int32, device=device)
    return c


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    block_m: int = 16,
    block_n: tuple[int, int] | None = None,
    block_k: tuple[int, int] | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    m_progs: int = 1,
    dense_shared: bool | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    grouped_from: int | None = None,
    grouped: dict | None = None,
    act_fp8: bool = False,
    wide_fp16: bool | None = None,
    fp16_scaled: bool = True,
    swap: bool | None = None,
    row_scale: bool = True,
    split_k: int | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """MoE: x [B, hidden] bf16, w13 [E', 2I, hidden], w2 [E', hidden, I], ids/weights [B, K].

    Weights bf16, or fp8 e4m3 with fp32 block scales w13_scale [E', 2I/128, hidden/128] and
    w2_scale [E', hidden/128, I/128] (W = w * scale); fp8 is widened in registers, so the weights
    are still read once per distinct expert, at 1 byte each. By default to fp16 (one convert per
    weight pair; e4m3 is exact in fp16) against x and h scaled by a power of two per row per K block
    (``moe_prefill.quant_rows``: no overflow for activations above 65504, no accuracy lost);
    ``wide_fp16=False`` widens to bf16 (several converts per pair: 0.6x the speed); ``act_fp8``
    quantises the activations per token per BK group and multiplies fp8 x fp8 (fp8 rounding of x
    and h); ``fp16_scaled=False`` drops the activation scaling (benchmark only).

    B >= ``grouped_from`` (default ``GROUPED_FROM`` / ``GROUPED_FROM_FP8``) goes to the sort-based grouped GEMM (``moe_prefill.fused_moe_grouped``
    with the tile arguments in ``grouped``, default its own; the block_* arguments here are the
    decode kernels'). Below it: two launches
    (gate/up with SwiGLU epilogue, then down with the routing weight), each over (expert, N tile,
    M program); the per-(token, slot) outputs are summed in fp32 at the end, in a fixed order, so
    the result is deterministic.

    ``dense_shared`` (default: B >= 64) takes the last column of ``ids`` (the shared expert, which
    every token uses) out of the grouped kernels: at large batch its B rows would otherwise cost
    B / block_m passes over its weights inside one program. bf16 runs it as cuBLAS GEMMs; fp8 as
    the grouped GEMM over that one column (one expert, B rows in BM tiles), so it stays 1 byte/weight.
    ``workspace`` = (h [B, K, I], o [B, K, hidden] fp32) lets CUDA-graph callers keep buffers static.

    ``swap`` (opt-in: it lost to the default kernels on the H200) runs the decode kernels swap-AB: the weight
    rows (block_n, 64 per warpgroup) on the MMA's M side, the token tile on N, as ``fp8.py``'s f16
    path does; block_k may then be a multiple of the scale block (several per K trip).
    ``row_scale`` (swap with the fp16 widening): one power of two per token row over all of K,
    found by a pass over the row before the K loop, instead of an amax per K block in the loop.
    ``split_k`` (swap only) splits the up projection's hidden dim over that many programs (fp32
    partials; the last split of a tile sums them and applies SwiGLU, no extra launch). Default:
    ``SPLIT_K`` when the up grid has fewer than ``SPLIT_BELOW`` programs (B = 1: 9 experts x I/BN
    = 144 programs of 512 KB, ~1 per SM with ~48 KB in flight each), else 1.
    ``reduce=False`` (decode kernels only, B < ``grouped_from``) returns the per-(token, slot) fp32
    outputs [B, K, hidden] un-summed, for a consumer that sums them itself in the same launch
    (``norms.add_rmsnorm_partials``): no reduce and cast launches.
    """
    bsz, hid = x.shape
    if grouped_from is None:
        grouped_from = GROUPED_FROM if w13_scale is None else GROUPED_FROM_FP8
    if bsz >= grouped_from:
        assert reduce, "reduce=False: only the decode kernels (B < grouped_from) have per-slot outputs"
        return fused_moe_grouped(
            x, w13, w2, ids.contiguous(), weights.contiguous(), w13_scale, w2_scale, act_fp8=act_fp8,
            wide_fp16=wide_fp16, fp16_scaled=fp16_scaled, **(grouped or {}),
        )  # fmt: skip
    n_exp, two_i, _ = w13.shape
    inter = two_i // 2
    kstride = ids.shape[1]
    qb = scale_block(w13, w13_scale)
    assert scale_block(w2, w2_scale) == qb
    fp8 = qb > 0
    mode = fp8_mode(fp8, act_fp8, wide_fp16, fp16_scaled)
    if num_stages is None:
        num_stages = 4 if fp8 else 3  # half the bytes per stage: one more stage in flight (round 1)
    if swap is None:
        # Measured on the H200 (bench/gpu/moe_sweep.py, round 4): the swap-AB kernels lost at every
        # batch (fp8 B=1 87.8 vs 65.7 us, B=8 325 vs 207 us, B=32 548 vs 397 us), so they are opt-in.
        swap = False
    if block_n is None:
        # fp8 B >= 32: wider down tiles (round 2: 397 vs 441 us at B=32); otherwise 64 x 64. Default
        # tiles shrink to small models' dims (the up tile spans I, the down tile the hidden size).
        bn_down = 128 if fp8 and bsz >= 32 and not swap else 64
        block_n = (min(64, inter), min(bn_down, hid))
    if block_k is None:
        block_k = (min(128, hid), min(128, inter))
    assert not (swap and mode == 2), "act_fp8 runs the unswapped decode kernels"
    subk = [min(bk, qb) if fp8 and swap else bk for bk in block_k]
    assert ids.stride(1) == 1 and weights.stride() == ids.stride() and ids.stride(0) == kstride
    assert (
        inter % block_n[0] == 0
        and hid % block_k[0] == 0
        and hid % block_n[1] == 0
        and inter % block_k[1] == 0
    )
    if fp8:
        nest = (*block_n, *subk)
        assert all(qb % b == 0 for b in nest) and all(
            b % q == 0 for b, q in zip(block_k, subk, strict=True)
        ), "tiles must nest in scale blocks"
        assert inter % qb == 0
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    if dense_shared is None:
        dense_shared = bsz >= 64
    ksel = kstride - 1 if dense_shared else kstride
    if workspace is None:
        h = torch.empty((bsz, kstride, inter), dtype=x.dtype, device=x.device)
        o = torch.empty((bsz, kstride, hid), dtype=torch.float32, device=x.device)
    else:
        h, o = workspace
    s13 = w13_scale if fp8 else w13  # an unused pointer when bf16
    s2 = w2_scale if fp8 else w2
    bb = max(16, triton.next_power_of_2(bsz))
    kpad = triton.next_power_of_2(ksel)
    interp = interpret_mode()
    pair_grid = bsz * ksel < n_exp
    first_dim = bsz * ksel if pair_grid else n_exp
    if split_k is None:
        small = first_dim * (inter // block_n[0]) < SPLIT_BELOW
        split_k = SPLIT_K if swap and small and hid % (SPLIT_K * block_k[0]) == 0 else 1
    assert split_k == 1 or (swap and hid % (split_k * block_k[0]) == 0), "split_k needs swap and K to divide"
    common = dict(KSEL=ksel, KSTRIDE=kstride, KPAD=kpad, BB=bb, BM=block_m, M_PROGS=m_progs, PAIR_GRID=pair_grid,
                  QB=max(qb, 1), FP8=mode, INTERPRET=interp, num_warps=num_warps, num_stages=num_stages, SWAP=swap,
                  ROWSCALE=row_scale)  # fmt: skip
    if split_k > 1:
        part = torch.empty((split_k, bsz, kstride, two_i), dtype=torch.float32, device=x.device)
        cnt = _split_counters(x.device)
        assert first_dim * (inter // block_n[0]) * (bb // block_m) <= cnt.numel()
    else:
        part, cnt = h, h  # unused
    _moe_up_kernel[(first_dim, inter // block_n[0], m_progs * split_k)](
        x, w13, s13, ids, weights, h, part, cnt, bsz, x.stride(0), w13.stride(0), s13.stride(0) if fp8 else 0, h.stride(0),
        h.stride(1), INTER=inter, HID=hid, BN=block_n[0], BK=block_k[0], SUBK=subk[0], SPLIT=split_k, **common,
    )  # fmt: skip
    _moe_down_kernel[(first_dim, hid // block_n[1], m_progs)](
        h, w2, s2, ids, weights, o, bsz, h.stride(0), h.stride(1), w2.stride(0), s2.stride(0) if fp8 else 0,
        o.stride(0), o.stride(1), INTER=inter, HID=hid, BN=block_n[1], BK=block_k[1], SUBK=subk[1], **common,
    )  # fmt: skip
    if not dense_shared:
        return o.sum(1).to(x.dtype) if reduce else o
    shared = n_exp - 1
    if fp8:
        # The shared column as a one-expert grouped GEMM (its weights read once per BM-row tile
        # pass, all tiles of one N block running together, so L2 serves the repeats).
        ys = fused_moe_grouped(
            x, w13, w2, ids[:, -1:].contiguous(), weights[:, -1:].contiguous(), w13_scale, w2_scale,
            pair_dtype=torch.float32, out_dtype=torch.float32, act_fp8=act_fp8, wide_fp16=wide_fp16,
            fp16_scaled=fp16_scaled, **(grouped or {}),
        )  # fmt: skip
        if not reduce:
            o[:, ksel].copy_(ys)
            return o
        return (o[:, :ksel].sum(1) + ys).to(x.dtype)
    gu = x @ w13[shared].T
    hs = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    ys = (hs @ w2[shared].T).float() * weights[:, -1:]
    if not reduce:
        o[:, ksel].copy_(ys)
        return o
    return (o[:, :ksel].sum(1) + ys).to(x.dtype)
