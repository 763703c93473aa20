"""MLA prefill/extend attention (expanded form): flash attention with a 192-d qk and a 128-d v.

After ``kv_b_proj`` each head has its own key ``[k_nope (128) | k_pe (64)]`` and value (128); the
rope part of the key is one vector per token shared by every head. SDPA's flash backend wants equal
qk and v dims, so torch would pad v to 192; this kernel keeps the two widths and reads k_pe once
per token row (head stride 0), so the caller never materialises the broadcast or a concatenation.

Packed varlen: sequence n owns query rows ``cu_seqlens_q[n]:cu_seqlens_q[n+1]`` and key rows
``cu_seqlens_k[n]:cu_seqlens_k[n+1]``; its queries are the LAST len_q positions of its len_k keys
(a continued sequence or a prefill chunk after a cached prefix), so query i sees keys
``j <= i + len_k - len_q``. Online softmax in fp32 (exp2 with log2(e) folded into the scale),
bf16 in/out.

Grid: (query blocks, heads, sequences), query blocks in reverse so the long diagonal blocks start
first. Each program walks the keys every row of its block sees without a mask, then the diagonal
blocks with the causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import mma

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class MlaPrefillConfig:
    """Tiles of ``mla_prefill``: query rows x key rows per block (all wgmma, no spills at 8 warps on
    sm_90; 0.60 of the bf16 peak at T = 8192 on the H200, bench/gpu/mla_sweep.py)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def mla_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """fp32 reference: q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] -> o [Tq, H, Dv] (q's dtype)."""
    out = torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    for n in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[n]), int(cu_seqlens_q[n + 1])
        k0, k1 = int(cu_seqlens_k[n]), int(cu_seqlens_k[n + 1])
        if q1 == q0:
            continue
        qi, ki, vi = q[q0:q1].float(), k[k0:k1].float(), v[k0:k1].float()
        off = (k1 - k0) - (q1 - q0)
        allowed = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None] + off
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        s = s.masked_fill(~allowed.to(s.device), float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vi).to(q.dtype)
    return out


@triton.jit
def _prefill_block(
    q, rows, strides, offs_n, cols, j0, offs_i, len_k, off, state, qk_scale, MASK: tl.constexpr
):
    """One key block [j0, j0 + BN) of the online softmax (exp2; qk_scale holds log2 e) for the
    query rows ``offs_i``: q = (q_nope, q_pe), rows/strides/cols = the (k_nope, k_pe, v) bases,
    token strides and column offsets, state = (m, l, acc). MASK: the causal diagonal and the
    sequence end (a block every row sees entirely needs neither)."""
    qa, qb = q
    k_ptr, kp_ptr, v_ptr = rows
    stride_kt, stride_kpt, stride_vt = strides
    offs_a, offs_b, offs_v = cols
    m_i, l_i, acc = state
    offs_j = j0 + offs_n
    if MASK:
        kmask = (offs_j < len_k)[:, None]
        ka = tl.load(k_ptr + offs_j[:, None] * stride_kt + offs_a[None, :], mask=kmask, other=0.0)
        kb = tl.load(kp_ptr + offs_j[:, None] * stride_kpt + offs_b[None, :], mask=kmask, other=0.0)
        vv = tl.load(v_ptr + offs_j[:, None] * stride_vt + offs_v[None, :], mask=kmask, other=0.0)
    else:
        ka = tl.load(k_ptr + offs_j[:, None] * stride_kt + offs_a[None, :])
        kb = tl.load(kp_ptr + offs_j[:, None] * stride_kpt + offs_b[None, :])
        vv = tl.load(v_ptr + offs_j[:, None] * stride_vt + offs_v[None, :])
    s = (mma(qa, tl.trans(ka)) + mma(qb, tl.trans(kb))) * qk_scale
    if MASK:
        ok = (offs_j[None, :] <= offs_i[:, None] + off) & (offs_j[None, :] < len_k)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row may see no key of this block (and none before it): keep exp() finite.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(vv.dtype), vv)
    return m_new, l_i, acc


@triton.jit
def _mla_prefill_kernel(
    q_ptr,
    qp_ptr,
    k_ptr,
    kp_ptr,
    v_ptr,
    o_ptr,
    cu_q_ptr,
    cu_k_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_qpt,
    stride_qph,
    stride_kt,
    stride_kh,
    stride_kpt,
    stride_kph,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    DA: tl.constexpr,
    DB: tl.constexpr,
    DV: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    h = tl.program_id(1)
    n = tl.program_id(2)
    q0 = tl.load(cu_q_ptr + n)
    len_q = tl.load(cu_q_ptr + n + 1) - q0
    k0 = tl.load(cu_k_ptr + n)
    len_k = tl.load(cu_k_ptr + n + 1) - k0
    mblk = tl.cdiv(len_q, BM) - 1 - tl.program_id(0)  # longest (latest) query blocks first
    if mblk >= 0:
        off = len_k - len_q
        offs_i = mblk * BM + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_a = tl.arange(0, DA)
        offs_b = tl.arange(0, DB)
        offs_v = tl.arange(0, DV)
        qmask = (offs_i < len_q)[:, None]
        qrow = (q0 + offs_i).to(tl.int64)
        qa = tl.load(
            q_ptr + qrow[:, None] * stride_qt + h * stride_qh + offs_a[None, :], mask=qmask, other=0.0
        )
        qb = tl.load(
            qp_ptr + qrow[:, None] * stride_qpt + h * stride_qph + offs_b[None, :], mask=qmask, other=0.0
        )
        kbase = k_ptr + k0.to(tl.int64) * stride_kt + h * stride_kh
        kpbase = kp_ptr + k0.to(tl.int64) * stride_kpt + h * stride_kph
        vbase = v_ptr + k0.to(tl.int64) * stride_vt + h * stride_vh
        state = (
            tl.full((BM,), float("-inf"), dtype=tl.float32),
            tl.zeros((BM,), dtype=tl.float32),
            tl.zeros((BM, DV), dtype=tl.float32),
        )
        keys = (
            (qa, qb),
            (kbase, kpbase, vbase),
            (stride_kt, stride_kpt, stride_vt),
            offs_n,
            (offs_a, offs_b, offs_v),
        )
        # Keys every row of the block sees (j <= first row + off) in whole blocks: no mask.
        full_end = (tl.minimum(mblk * BM + off + 1, len_k) // BN) * BN
        hi = tl.minimum(mblk * BM + BM + off, len_k)
        for j0 in range(0, full_end, BN):
            state = _prefill_block(*keys, j0, offs_i, len_k, off, state, qk_scale, False)
        # The diagonal blocks: each row sees keys up to its own position.
        for j0 in range(full_end, hi, BN):
            state = _prefill_block(*keys, j0, offs_i, len_k, off, state, qk_scale, True)
        _, l_i, acc = state
        o = acc / tl.maximum(l_i, 1e-30)[:, None]
        dst = o_ptr + qrow[:, None] * stride_ot + h * stride_oh + offs_v[None, :]
        tl.store(dst, o.to(o_ptr.dtype.element_ty), mask=qmask)


def mla_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    *,
    q_pe: torch.Tensor | None = None,
    k_pe: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    rope_dim: int = 64,
    config: MlaPrefillConfig | None = None,
) -> torch.Tensor:
    """Causal varlen attention -> o [Tq, H, Dv].

    Either q [Tq, H, nope + rope] and k [Tk, H, nope + rope] (rope = rope_dim, the last dims), or
    the model's pieces without copies: q [Tq, H, nope] with q_pe [Tq, H, rope], and k [Tk, H, nope]
    (e.g. a strided view of kv_b_proj's output) with k_pe [Tk, rope] shared by all heads. v
    [Tk, H, Dv] may be strided too (only the last dim must be contiguous). cu_seqlens_* int32
    [N+1]; max_seqlen_q (a host int) avoids reading cu_seqlens_q back from the device.
    """
    cfg = config or MlaPrefillConfig()
    if q_pe is None:
        q, q_pe = q[..., :-rope_dim], q[..., -rope_dim:]
    if k_pe is None:
        k, k_pe = k[..., :-rope_dim], k[..., -rope_dim:]
    elif k_pe.dim() == 2:
        k_pe = k_pe[:, None, :].expand(-1, k.shape[1], -1)  # head stride 0: one row per token
    tq, heads, da = q.shape
    db, dv = q_pe.shape[-1], v.shape[-1]
    for t in (q, q_pe, k, k_pe, v):
        assert t.stride(-1) == 1, "last dim must be contiguous"
    nseq = cu_seqlens_q.numel() - 1
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if nseq > 0 else 0
    out = torch.empty((tq, heads, dv), dtype=q.dtype, device=q.device)
    if nseq == 0 or max_seqlen_q == 0:
        return out
    grid = (triton.cdiv(max_seqlen_q, cfg.block_m), heads, nseq)
    _mla_prefill_kernel[grid](
        q,
        q_pe,
        k,
        k_pe,
        v,
        out,
        cu_seqlens_q,
        cu_seqlens_k,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        k.stride(0),
        k.stride(1),
        k_pe.stride(0),
        k_pe.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        DA=da,
        DB=db,
        DV=dv,
        BM=cfg.block_m,
        BN=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
