"""MoE for decode: fused router (sigmoid + bias + group top-k) and grouped expert kernels.

Math (reference/model.md §4): p = sigmoid(x W_g^T) in fp32; selection score p + expert_bias; each
of n_group groups scores the sum of its top-2; the top topk_group groups stay; the top-k experts of
those are chosen; weights are the *unbiased* p renormalised and scaled by routed_scaling_factor;
y = sum_e w_e SwiGLU_e(x) + SwiGLU_shared(x).

The shared expert is handled as one more expert: stack its weights as expert index E (so w13 is
[E + 1, 2I, hidden], gate rows then up rows, and w2 is [E + 1, hidden, I]); the router appends it
to every token's selection with weight 1, so routed and shared experts run in the same launches.

The expert kernels need no sort/align pass (which costs several launches at decode sizes): each
program owns one expert, finds the tokens that chose it in the [B, K] id table, compacts their row
indices in registers and runs its M-tile, so an expert's weights are streamed once per M-tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import interpret_mode, mma

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


# ---------------------------------------------------------------------------------------------
# Experts
# ---------------------------------------------------------------------------------------------


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Reference: y_b = sum_k w_bk * down_e(silu(gate_e x_b) * up_e x_b), fp32 math, e = ids[b, k]."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        xe = x[rows].float()
        gu = xe @ w13[e].float().T
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        h = h.to(x.dtype).float()  # the kernel keeps the intermediate in the activation dtype
        out.index_add_(0, rows, (h @ w2[e].float().T) * weights[rows, slots, None].float())
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
def _up_tile(x_ptr, w13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_hb, stride_hk,
             INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr, KPAD: tl.constexpr,
             BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    tok, k_slot, _, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xb
    w_base = w13_ptr + e.to(tl.int64) * stride_we
    g_cols = w_base + offs_n[None, :] * HID
    u_cols = w_base + (offs_n[None, :] + INTER) * HID
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, HID, BK):
        x = tl.load(x_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0)
        acc_g += mma(x, tl.load(g_cols + k0 + offs_k[:, None]), INTERPRET)
        acc_u += mma(x, tl.load(u_cols + k0 + offs_k[:, None]), INTERPRET)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    dst = h_ptr + tok.to(tl.int64)[:, None] * stride_hb + k_slot[:, None] * stride_hk + offs_n[None, :]
    tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _down_tile(h_ptr, w2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we, stride_ob,
               stride_ok, INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr,
               KPAD: tl.constexpr, BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               INTERPRET: tl.constexpr):  # fmt: skip
    tok, k_slot, weight, valid, _ = _select(ids_ptr, wts_ptr, e, m0, B, KSEL, KSTRIDE, KPAD, BB, BM)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    h_rows = h_ptr + tok.to(tl.int64)[:, None] * stride_hb + k_slot[:, None] * stride_hk
    w_cols = w2_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * INTER
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, INTER, BK):
        h = tl.load(h_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0)
        acc += mma(h, tl.load(w_cols + k0 + offs_k[:, None]), INTERPRET)
    acc = acc * weight[:, None]
    dst = o_ptr + tok.to(tl.int64)[:, None] * stride_ob + k_slot[:, None] * stride_ok + offs_n[None, :]
    tl.store(dst, acc, mask=valid[:, None])


@triton.jit
def _moe_up_kernel(
    x_ptr, w13_ptr, ids_ptr, wts_ptr, h_ptr, B, stride_xb, stride_we, stride_hb, stride_hk,
    INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr, KPAD: tl.constexpr,
    BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, M_PROGS: tl.constexpr,
    PAIR_GRID: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    e, owner = _program_expert(ids_ptr, B, KSEL, KSTRIDE, KPAD, BB, PAIR_GRID)
    nb = tl.program_id(1)
    m_first = tl.program_id(2) * BM
    count = _select(ids_ptr, wts_ptr, e, m_first, B, KSEL, KSTRIDE, KPAD, BB, BM)[4]
    if owner:
        # M tiles in a grid-stride loop: an expert with more tokens than BM * M_PROGS (the shared
        # expert, or skewed routing) takes more trips instead of dropping tokens.
        if INTERPRET:
            m0 = m_first
            while m0 < count:
                _up_tile(x_ptr, w13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_hb,
                         stride_hk, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, INTERPRET)  # fmt: skip
                m0 += BM * M_PROGS
        else:
            for m0 in range(m_first, count, BM * M_PROGS):
                _up_tile(x_ptr, w13_ptr, ids_ptr, wts_ptr, h_ptr, e, nb, m0, B, stride_xb, stride_we, stride_hb,
                         stride_hk, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, INTERPRET)  # fmt: skip


@triton.jit
def _moe_down_kernel(
    h_ptr, w2_ptr, ids_ptr, wts_ptr, o_ptr, B, stride_hb, stride_hk, stride_we, stride_ob, stride_ok,
    INTER: tl.constexpr, HID: tl.constexpr, KSEL: tl.constexpr, KSTRIDE: tl.constexpr, KPAD: tl.constexpr,
    BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, M_PROGS: tl.constexpr,
    PAIR_GRID: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    e, owner = _program_expert(ids_ptr, B, KSEL, KSTRIDE, KPAD, BB, PAIR_GRID)
    nb = tl.program_id(1)
    m_first = tl.program_id(2) * BM
    count = _select(ids_ptr, wts_ptr, e, m_first, B, KSEL, KSTRIDE, KPAD, BB, BM)[4]
    if owner:
        if INTERPRET:
            m0 = m_first
            while m0 < count:
                _down_tile(h_ptr, w2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we,
                           stride_ob, stride_ok, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, INTERPRET)  # fmt: skip
                m0 += BM * M_PROGS
        else:
            for m0 in range(m_first, count, BM * M_PROGS):
                _down_tile(h_ptr, w2_ptr, ids_ptr, wts_ptr, o_ptr, e, nb, m0, B, stride_hb, stride_hk, stride_we,
                           stride_ob, stride_ok, INTER, HID, KSEL, KSTRIDE, KPAD, BB, BM, BN, BK, INTERPRET)  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    block_m: int = 16,
    block_n: tuple[int, int] = (64, 64),
    block_k: tuple[int, int] = (128, 128),
    num_warps: int = 4,
    num_stages: int = 3,
    m_progs: int = 1,
    dense_shared: bool | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode MoE: x [B, hidden] bf16, w13 [E', 2I, hidden], w2 [E', hidden, I], ids/weights [B, K].

    Two launches (gate/up with SwiGLU epilogue, then down with the routing weight), each over
    (expert, N tile, M program); the per-(token, slot) outputs are summed in fp32 at the end, in a
    fixed order, so the result is deterministic.

    ``dense_shared`` (default: B >= 64) takes the last column of ``ids`` (the shared expert, which
    every token uses) out of the grouped kernels and runs it as plain cuBLAS GEMMs: at large batch
    its B rows would otherwise cost B / block_m passes over its weights inside one program.
    ``workspace`` = (h [B, K, I], o [B, K, hidden] fp32) lets CUDA-graph callers keep buffers static.
    """
    bsz, hid = x.shape
    n_exp, two_i, _ = w13.shape
    inter = two_i // 2
    kstride = ids.shape[1]
    assert ids.stride(1) == 1 and weights.stride() == ids.stride() and ids.stride(0) == kstride
    assert (
        inter % block_n[0] == 0
        and hid % block_k[0] == 0
        and hid % block_n[1] == 0
        and inter % block_k[1] == 0
    )
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    if dense_shared is None:
        dense_shared = bsz >= 64
    ksel = kstride - 1 if dense_shared else kstride
    if workspace is None:
        h = torch.empty((bsz, kstride, inter), dtype=x.dtype, device=x.device)
        o = torch.empty((bsz, kstride, hid), dtype=torch.float32, device=x.device)
    else:
        h, o = workspace
    bb = max(16, triton.next_power_of_2(bsz))
    kpad = triton.next_power_of_2(ksel)
    interp = interpret_mode()
    pair_grid = bsz * ksel < n_exp
    first_dim = bsz * ksel if pair_grid else n_exp
    common = dict(KSEL=ksel, KSTRIDE=kstride, KPAD=kpad, BB=bb, BM=block_m, M_PROGS=m_progs, PAIR_GRID=pair_grid,
                  INTERPRET=interp, num_warps=num_warps, num_stages=num_stages)  # fmt: skip
    _moe_up_kernel[(first_dim, inter // block_n[0], m_progs)](
        x, w13, ids, weights, h, bsz, x.stride(0), w13.stride(0), h.stride(0), h.stride(1),
        INTER=inter, HID=hid, BN=block_n[0], BK=block_k[0], **common,
    )  # fmt: skip
    _moe_down_kernel[(first_dim, hid // block_n[1], m_progs)](
        h, w2, ids, weights, o, bsz, h.stride(0), h.stride(1), w2.stride(0), o.stride(0), o.stride(1),
        INTER=inter, HID=hid, BN=block_n[1], BK=block_k[1], **common,
    )  # fmt: skip
    if not dense_shared:
        return o.sum(1).to(x.dtype)
    shared = n_exp - 1
    gu = x @ w13[shared].T
    hs = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
    ys = (hs @ w2[shared].T).float() * weights[:, -1:]
    return (o[:, :ksel].sum(1) + ys).to(x.dtype)
