"""MLA absorbed decode over a paged latent cache: split-K (flash-decoding) in two launches.

Math (reference/model.md §3): with the query absorbed into the latent space, every head attends
over the same per-token key [c_kv (512) | k_pe (64)] and value c_kv (512), i.e. MQA with a
576-d key and a 512-d value:

    s_hj = (q_h . key_j) * scale        u_h = sum_j softmax_j(s_h) c_kv_j      (u: [B, H, 512])

The caller applies W_UV and o_proj to u. The cache is paged: ``kv_cache[num_pages, page, 576]``
with ``block_table[B, max_pages]`` and ``seq_lens[B]``. Stage 1 splits each sequence's tokens
into ``num_splits`` ranges (one program each, all heads together so a key block is loaded once
for all 32 heads); stage 2 merges the partial results by their log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import interpret_mode, mma


def mla_decode_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int = 512,
) -> torch.Tensor:
    """Reference in fp32: q [B, H, 576] -> u [B, H, 512]."""
    page = kv_cache.shape[1]
    out = torch.empty(q.shape[0], q.shape[1], kv_lora_rank, dtype=q.dtype, device=q.device)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        pages = block_table[b, : (n + page - 1) // page].long()
        keys = kv_cache[pages].reshape(-1, kv_cache.shape[2])[:n].float()
        p = torch.softmax(q[b].float() @ keys.T * scale, dim=-1)
        out[b] = (p @ keys[:, :kv_lora_rank]).to(q.dtype)
    return out


@triton.jit
def _mla_block(
    q_nope,
    q_pe,
    kv_ptr,
    bt_ptr,
    t0,
    end,
    m_i,
    l_i,
    acc,
    scale,
    stride_page,
    stride_tok,
    offs_n,
    offs_c,
    offs_r,
    LORA: tl.constexpr,
    PAGE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    page = tl.load(bt_ptr + t0 // PAGE).to(tl.int64)
    rows = t0 % PAGE + offs_n
    valid = t0 + offs_n < end
    base = kv_ptr + page * stride_page + rows[:, None] * stride_tok
    k = tl.load(base + offs_c[None, :], mask=valid[:, None], other=0.0)  # [BN, 512], also V
    k_pe = tl.load(base + LORA + offs_r[None, :], mask=valid[:, None], other=0.0)  # [BN, 64]
    s = (mma(q_nope, tl.trans(k), INTERPRET) + mma(q_pe, tl.trans(k_pe), INTERPRET)) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(k.dtype), k, INTERPRET)
    return m_new, l_i, acc


@triton.jit
def _mla_split_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    len_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_page,
    stride_tok,
    stride_bt,
    stride_mb,
    stride_ms,
    stride_mh,
    stride_lb,
    stride_ls,
    H: tl.constexpr,
    BH: tl.constexpr,
    LORA: tl.constexpr,
    ROPE: tl.constexpr,
    PAGE: tl.constexpr,
    BN: tl.constexpr,
    SPLITS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    sp = tl.program_id(1)
    seq_len = tl.load(len_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, SPLITS), BN) * BN
    start = sp * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_h = tl.arange(0, BH)
    offs_c = tl.arange(0, LORA)
    offs_r = tl.arange(0, ROPE)
    offs_n = tl.arange(0, BN)
    hmask = offs_h < H
    q_rows = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh
    q_nope = tl.load(q_rows + offs_c[None, :], mask=hmask[:, None], other=0.0)
    q_pe = tl.load(q_rows + LORA + offs_r[None, :], mask=hmask[:, None], other=0.0)
    m_i = tl.full((BH,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BH,), dtype=tl.float32)
    acc = tl.zeros((BH, LORA), dtype=tl.float32)
    bt = bt_ptr + b * stride_bt
    if INTERPRET:
        # The interpreter cannot range() over a loaded bound.
        t0 = start
        while t0 < end:
            m_i, l_i, acc = _mla_block(
                q_nope, q_pe, kv_ptr, bt, t0, end, m_i, l_i, acc, scale, stride_page, stride_tok,
                offs_n, offs_c, offs_r, LORA, PAGE, INTERPRET,
            )  # fmt: skip
            t0 += BN
    else:
        for t0 in range(start, end, BN):
            m_i, l_i, acc = _mla_block(
                q_nope, q_pe, kv_ptr, bt, t0, end, m_i, l_i, acc, scale, stride_page, stride_tok,
                offs_n, offs_c, offs_r, LORA, PAGE, INTERPRET,
            )  # fmt: skip
    # An empty split leaves l = 0 and lse = -inf; stage 2 gives it zero weight.
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
    dst = mid_o_ptr + b * stride_mb + sp * stride_ms + offs_h[:, None] * stride_mh + offs_c[None, :]
    tl.store(dst, o, mask=hmask[:, None])
    tl.store(mid_lse_ptr + b * stride_lb + sp * stride_ls + offs_h, lse, mask=hmask)


@triton.jit
def _mla_merge_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    stride_mb,
    stride_ms,
    stride_mh,
    stride_lb,
    stride_ls,
    stride_ob,
    stride_oh,
    LORA: tl.constexpr,
    SPLITS: tl.constexpr,
    SPAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPAD)
    offs_c = tl.arange(0, LORA)
    smask = offs_s < SPLITS
    lse = tl.load(mid_lse_ptr + b * stride_lb + offs_s * stride_ls + h, mask=smask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    parts = tl.load(
        mid_o_ptr + b * stride_mb + offs_s[:, None] * stride_ms + h * stride_mh + offs_c[None, :],
        mask=smask[:, None],
        other=0.0,
    )
    o = tl.sum(parts * w[:, None], axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, o.to(out_ptr.dtype.element_ty))


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int = 512,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, 576] (absorbed q_nope | q_pe), kv_cache [P, page, 576] -> u [B, H, 512].

    Defaults are the fastest measured on the H200 at 4K context (bench/results/gpu.md): about two
    programs per SM in total (num_splits = ceil(264 / B), 2..32), 64-token key blocks, 4 warps.
    """
    bsz, heads, dim = q.shape
    if num_splits is None:
        num_splits = max(2, min(32, -(-264 // bsz)))
    block_n = min(block_n, kv_cache.shape[1])
    page = kv_cache.shape[1]
    assert page % block_n == 0 and kv_cache.stride(2) == 1 and q.stride(2) == 1
    rope = dim - kv_lora_rank
    mid_o = torch.empty((bsz, num_splits, heads, kv_lora_rank), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bsz, num_splits, heads), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty((bsz, heads, kv_lora_rank), dtype=q.dtype, device=q.device)
    _mla_split_kernel[(bsz, num_splits)](
        q,
        kv_cache,
        block_table,
        seq_lens,
        mid_o,
        mid_lse,
        scale,
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_table.stride(0),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        H=heads,
        BH=max(16, triton.next_power_of_2(heads)),
        LORA=kv_lora_rank,
        ROPE=rope,
        PAGE=page,
        BN=block_n,
        SPLITS=num_splits,
        INTERPRET=interpret_mode(),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _mla_merge_kernel[(bsz, heads)](
        mid_o,
        mid_lse,
        out,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out.stride(0),
        out.stride(1),
        LORA=kv_lora_rank,
        SPLITS=num_splits,
        SPAD=triton.next_power_of_2(num_splits),
        num_warps=4,
    )
    return out
