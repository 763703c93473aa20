"""MLA absorbed decode over a paged latent cache: split-K (flash-decoding) in two launches.

Math (reference/model.md §3): with the query absorbed into the latent space, every head attends
over the same per-token key [c_kv (512) | k_pe (64)] and value c_kv (512), i.e. MQA with a
576-d key and a 512-d value:

    s_hj = (q_h . key_j) * scale        u_h = sum_j softmax_j(s_h) c_kv_j      (u: [B, H, 512])

The caller applies W_UV and o_proj to u. The cache is paged: ``kv_cache[num_pages, page, 576]``
with ``block_table[B, max_pages]`` and ``seq_lens[B]``. Stage 1 splits each sequence's tokens
into ``num_splits`` ranges (one program each, all heads together so a key block is loaded once
for all 32 heads); stage 2 merges the partial results by their log-sum-exp (skipped when
num_splits == 1: stage 1 then writes the output itself).

Why the block table is read NP pages at a time outside the key loop: when each key block's page
number is a load inside the loop, Triton 3.6's pipeliner gives the key tiles one shared-memory
buffer whatever num_stages says, so every block waits for its own HBM round trip (seen in the
sm_90 TTGIR: ``memdesc<1x..>`` and ``async_wait 0`` per iteration; this was the 0.52-0.63 of v1).
With the page numbers in registers (``tl.gather`` per key row) the key loads depend on no load in
the loop and get num_stages - 1 buffers.

MTP verify: q may be ``[B, S_Q, H, 576]`` (S_Q query positions per sequence, the last S_Q tokens
of the sequence; position j sees ``seq_len - (S_Q - 1 - j)`` keys). All S_Q * H rows share each
key block, so the bytes are those of one decode and the MMA M dimension grows to S_Q * H.
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
    """Reference in fp32: q [B, H, 576] -> u [B, H, 512]; q [B, S_Q, H, 576] -> u [B, S_Q, H, 512]
    (query position j of S_Q attends the first seq_len - (S_Q - 1 - j) tokens)."""
    page = kv_cache.shape[1]
    q4 = q if q.dim() == 4 else q[:, None]
    s_q = q4.shape[1]
    out = torch.empty(*q4.shape[:3], kv_lora_rank, dtype=q.dtype, device=q.device)
    for b in range(q4.shape[0]):
        n = int(seq_lens[b])
        pages = block_table[b, : (n + page - 1) // page].long()
        keys = kv_cache[pages].reshape(-1, kv_cache.shape[2])[:n].float()
        for j in range(s_q):
            kj = keys[: n - (s_q - 1 - j)]
            p = torch.softmax(q4[b, j].float() @ kj.T * scale, dim=-1)
            out[b, j] = (p @ kj[:, :kv_lora_rank]).to(q.dtype)
    return out if q.dim() == 4 else out[:, 0]


@triton.jit
def _mla_block(
    q_nope,
    q_pe,
    kv_ptr,
    bt_ptr,
    pv,
    c0,
    t0,
    end,
    row_end,
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
    HOIST: tl.constexpr,
    SQ: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    tok = t0 + offs_n
    valid = tok < end
    if HOIST:
        # Page of every key row from the page numbers already in registers (no load in the chain).
        page = tl.gather(pv, (tok - c0) // PAGE, 0).to(tl.int64)
        rows = page * stride_page + (tok % PAGE) * stride_tok
    else:
        # v1: one page per block, read from the block table inside the loop (BN <= PAGE).
        page = tl.load(bt_ptr + t0 // PAGE).to(tl.int64)
        rows = page * stride_page + (t0 % PAGE + offs_n) * stride_tok
    base = kv_ptr + rows[:, None]
    k = tl.load(base + offs_c[None, :], mask=valid[:, None], other=0.0)  # [BN, 512], also V
    k_pe = tl.load(base + LORA + offs_r[None, :], mask=valid[:, None], other=0.0)  # [BN, 64]
    s = (mma(q_nope, tl.trans(k), INTERPRET) + mma(q_pe, tl.trans(k_pe), INTERPRET)) * scale
    if SQ == 1:
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = m_new
    else:
        # Causal among the S_Q verify positions: a row may see no key of this block (or split).
        s = tl.where(tok[None, :] < row_end[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(k.dtype), k, INTERPRET)
    return m_new, l_i, acc


@triton.jit
def _mla_block_t(
    qt_nope,
    qt_pe,
    kv_ptr,
    pv,
    c0,
    t0,
    end,
    row_end,
    m_i,
    l_i,
    acc_t,
    scale,
    stride_page,
    stride_tok,
    offs_n,
    offs_c,
    offs_r,
    LORA: tl.constexpr,
    PAGE: tl.constexpr,
    SQ: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """_mla_block with keys as the M side: S^T = K Q^T ([BN, BM]), U^T += K^T P^T ([LORA, BM]).

    With BN = 64 both products have M >= 64 and both big operands (the key block, q) sit in shared
    memory, so Triton can use wgmma, which reads them from shared memory once per warpgroup; the
    row-major form has M = 32 heads, so it is mma.sync with q re-read from shared memory by every
    warp each block.
    """
    tok = t0 + offs_n
    valid = tok < end
    page = tl.gather(pv, (tok - c0) // PAGE, 0).to(tl.int64)
    base = kv_ptr + (page * stride_page + (tok % PAGE) * stride_tok)[:, None]
    k = tl.load(base + offs_c[None, :], mask=valid[:, None], other=0.0)  # [BN, 512], also V
    k_pe = tl.load(base + LORA + offs_r[None, :], mask=valid[:, None], other=0.0)  # [BN, 64]
    s = (mma(k, qt_nope, INTERPRET) + mma(k_pe, qt_pe, INTERPRET)) * scale  # [BN, BM]
    if SQ == 1:
        s = tl.where(valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = m_new
    else:
        s = tl.where(tok[:, None] < row_end[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[None, :])
    l_i = l_i * alpha + tl.sum(p, axis=0)
    acc_t = acc_t * alpha[None, :] + mma(tl.trans(k), p.to(k.dtype), INTERPRET)
    return m_new, l_i, acc_t


@triton.jit(do_not_specialize=["splits"])  # a split count is a runtime choice, not a recompile
def _mla_split_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    len_ptr,
    mid_o_ptr,
    mid_lse_ptr,
    scale,
    max_pages,
    splits,
    stride_qb,
    stride_qs,
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
    SQ: tl.constexpr,
    BM: tl.constexpr,
    LORA: tl.constexpr,
    ROPE: tl.constexpr,
    PAGE: tl.constexpr,
    BN: tl.constexpr,
    NP: tl.constexpr,
    DIRECT: tl.constexpr,
    HOIST: tl.constexpr,
    TRANS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Row groups fastest in launch order: programs that share a key range run side by side, so
    # the second one's key reads hit L2.
    g = tl.program_id(0)
    b = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    # Split boundaries on whole pages and whole key blocks, so every NP-page chunk below starts
    # on a block boundary and every block's rows index inside its chunk's page vector.
    ALIGN: tl.constexpr = BN if BN > PAGE else PAGE
    split_len = tl.cdiv(tl.cdiv(seq_len, splits), ALIGN) * ALIGN
    start = sp * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_m = g * BM + tl.arange(0, BM)
    offs_c = tl.arange(0, LORA)
    offs_r = tl.arange(0, ROPE)
    offs_n = tl.arange(0, BN)
    offs_p = tl.arange(0, NP)
    rmask = offs_m < SQ * H
    pos = offs_m // H
    row_end = seq_len - (SQ - 1 - pos)
    q_rows = q_ptr + b * stride_qb + pos * stride_qs + (offs_m % H) * stride_qh
    bt = bt_ptr + b * stride_bt
    CHUNK: tl.constexpr = NP * PAGE
    if TRANS:
        tl.static_assert(HOIST)
        qt_nope = tl.load(q_rows[None, :] + offs_c[:, None], mask=rmask[None, :], other=0.0)  # [LORA, BM]
        qt_pe = tl.load(q_rows[None, :] + LORA + offs_r[:, None], mask=rmask[None, :], other=0.0)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc_t = tl.zeros((LORA, BM), dtype=tl.float32)
        if INTERPRET:
            c0 = start
            while c0 < end:
                pv = tl.load(bt + c0 // PAGE + offs_p, mask=c0 // PAGE + offs_p < max_pages, other=0)
                c1 = tl.minimum(c0 + CHUNK, end)
                t0 = c0
                while t0 < c1:
                    m_i, l_i, acc_t = _mla_block_t(
                        qt_nope, qt_pe, kv_ptr, pv, c0, t0, end, row_end, m_i, l_i, acc_t, scale,
                        stride_page, stride_tok, offs_n, offs_c, offs_r, LORA, PAGE, SQ, INTERPRET,
                    )  # fmt: skip
                    t0 += BN
                c0 += CHUNK
        else:
            for c0 in range(start, end, CHUNK):
                pv = tl.load(bt + c0 // PAGE + offs_p, mask=c0 // PAGE + offs_p < max_pages, other=0)
                c1 = tl.minimum(c0 + CHUNK, end)
                for t0 in range(c0, c1, BN):
                    m_i, l_i, acc_t = _mla_block_t(
                        qt_nope, qt_pe, kv_ptr, pv, c0, t0, end, row_end, m_i, l_i, acc_t, scale,
                        stride_page, stride_tok, offs_n, offs_c, offs_r, LORA, PAGE, SQ, INTERPRET,
                    )  # fmt: skip
        acc = tl.trans(acc_t)
    else:
        q_nope = tl.load(q_rows[:, None] + offs_c[None, :], mask=rmask[:, None], other=0.0)
        q_pe = tl.load(q_rows[:, None] + LORA + offs_r[None, :], mask=rmask[:, None], other=0.0)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, LORA), dtype=tl.float32)
        if INTERPRET:
            # The interpreter cannot range() over a loaded bound.
            c0 = start
            while c0 < end:
                pv = tl.load(bt + c0 // PAGE + offs_p, mask=c0 // PAGE + offs_p < max_pages, other=0)
                c1 = tl.minimum(c0 + CHUNK, end)
                t0 = c0
                while t0 < c1:
                    m_i, l_i, acc = _mla_block(
                        q_nope, q_pe, kv_ptr, bt, pv, c0, t0, end, row_end, m_i, l_i, acc, scale,
                        stride_page, stride_tok, offs_n, offs_c, offs_r, LORA, PAGE, HOIST, SQ, INTERPRET,
                    )  # fmt: skip
                    t0 += BN
                c0 += CHUNK
        else:
            for c0 in range(start, end, CHUNK):
                pv = tl.load(bt + c0 // PAGE + offs_p, mask=c0 // PAGE + offs_p < max_pages, other=0)
                c1 = tl.minimum(c0 + CHUNK, end)
                for t0 in range(c0, c1, BN):
                    m_i, l_i, acc = _mla_block(
                        q_nope, q_pe, kv_ptr, bt, pv, c0, t0, end, row_end, m_i, l_i, acc, scale,
                        stride_page, stride_tok, offs_n, offs_c, offs_r, LORA, PAGE, HOIST, SQ, INTERPRET,
                    )  # fmt: skip
    # An empty split (or row) leaves l = 0 and lse = -inf; stage 2 gives it zero weight.
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    dst = mid_o_ptr + b * stride_mb + sp * stride_ms + offs_m[:, None] * stride_mh + offs_c[None, :]
    if DIRECT:  # one split: this is the output
        tl.store(dst, o.to(mid_o_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(dst, o, mask=rmask[:, None])
        tl.store(mid_lse_ptr + b * stride_lb + sp * stride_ls + offs_m, lse, mask=rmask)


@triton.jit(do_not_specialize=["splits"])
def _mla_merge_kernel(
    mid_o_ptr,
    mid_lse_ptr,
    out_ptr,
    splits,
    stride_mb,
    stride_ms,
    stride_mh,
    stride_lb,
    stride_ls,
    stride_ob,
    stride_oh,
    LORA: tl.constexpr,
    SPAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPAD)
    offs_c = tl.arange(0, LORA)
    smask = offs_s < splits
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


def single_chunk_splits(num_splits: int, table_width: int, chunk_pages: int, block_n: int, page: int) -> int:
    """At least enough splits that each one's pages fit one chunk of ``chunk_pages`` (less the pages a
    split's end may round up by, to a whole key block). The compiled multi-chunk loop faulted on the
    H200 (B = 128, ctx 4096, page 16: 257 pages in one split, "illegal memory access", found with
    bench/gpu/fault_probe.py) while the interpreter ran it correctly, so it is never taken: long
    contexts get more splits instead."""
    margin = max(1, -(-max(block_n, page) // page))
    return max(num_splits, -(-table_width // max(chunk_pages - margin, 1)))


def default_splits(bsz: int) -> int:
    """Programs per sequence: one wave over the 132 SMs, rounded down (a 188 KB program holds an SM
    alone, so a 1.2-wave grid would cost a second wave), 1..32 (``mla_decode`` takes 2 smaller
    programs per sequence from B = 66 on)."""
    return max(1, min(32, 132 // bsz))


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int = 512,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    out: torch.Tensor | None = None,
    hoist_pages: bool = True,
    pages_per_chunk: int = 256,
    keys_as_m: bool | None = None,
    rows_per_program: int = 64,
) -> torch.Tensor:
    """q [B, H, 576] (absorbed q_nope | q_pe) or [B, S_Q, H, 576] (MTP verify), kv_cache
    [P, page, 576] -> u [B, H, 512] (or [B, S_Q, H, 512]).

    Any power-of-two page size works with any block_n (a block may span pages) when
    hoist_pages is on; hoist_pages=False is v1 (page number loaded per block, block_n <= page),
    kept for the sweep. Query rows (S_Q * H) are cut into programs of rows_per_program (each
    re-reads the keys, from L2 when they run together): a [128, 512] fp32 accumulator does not fit
    one program's registers. keys_as_m computes S^T and U^T (see _mla_block_t; needs hoist_pages).
    Key-block buffers: num_stages - 1 in the row-major (mma.sync) form, num_stages with wgmma
    (keys_as_m, or 64 rows); two 64 x 576 buffers plus q fit in shared memory, three do not.
    """
    q4 = q[:, None] if q.dim() == 3 else q
    bsz, s_q, heads, dim = q4.shape
    rows = s_q * heads
    pair = num_splits is None and bsz >= 66 and s_q == 1
    if num_splits is None:
        num_splits = default_splits(bsz)
    # Defaults measured on the H200 (round 1 of bench/gpu/mla_sweep.py, ctx 4096, page 64 and 16):
    # 32 rows -> row-major h64s3 with 8 warps while the sequence is split (B = 1/8/32: 0.066/0.33/
    # 0.51 of the read ceiling; keys_as_m T64s2w4 lost at every B), 4 warps at one split (B = 128:
    # 0.666, 8 warps 0.60). 64 rows (MTP verify) -> h32s3w8 (B = 32, S_Q = 2: 104 us against 123 us
    # as B * S_Q decode rows; S_Q = 4: 206 against 217).
    # Default at B >= 66 (one split would leave < 2 programs per SM): two splits of h32s3w4, whose 113 KB of
    # shared memory lets two programs share an SM. B = 128 measured 225-226 us (0.63) in two runs,
    # where one split of h64s3w4 measured 205 us in one run and 316 us in another (rounds 2 and 5).
    if pair:
        num_splits = 2
    wide = min(rows, rows_per_program) > 32
    if keys_as_m is None:
        keys_as_m = False
    if block_n is None:
        block_n = 32 if wide or pair else 64
    if num_stages is None:
        num_stages = 2 if keys_as_m else 3
    if num_warps is None:
        num_warps = 4 if pair else 8 if wide or num_splits > 1 else 4
    page = kv_cache.shape[1]
    if not hoist_pages:
        block_n = min(block_n, page)
        assert page % block_n == 0
    assert kv_cache.stride(2) == 1 and q4.stride(3) == 1
    # Pages one chunk covers: the whole table row when it is <= pages_per_chunk (one chunk per
    # split), at least one key block. Independent of num_splits so a split count is no recompile.
    n_pages = triton.next_power_of_2(max(min(block_table.shape[1], pages_per_chunk), -(-block_n // page), 2))
    if hoist_pages:
        num_splits = single_chunk_splits(num_splits, block_table.shape[1], n_pages, block_n, page)
    rope = dim - kv_lora_rank
    if out is None:
        out = torch.empty((*q.shape[:-1], kv_lora_rank), dtype=q.dtype, device=q.device)
    out4 = out[:, None] if out.dim() == 3 else out
    assert out4.is_contiguous()
    if num_splits == 1:
        mid_o, mid_lse = out4.view(bsz, 1, rows, kv_lora_rank), out4  # lse unused
    else:
        mid_o = torch.empty((bsz, num_splits, rows, kv_lora_rank), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((bsz, num_splits, rows), dtype=torch.float32, device=q.device)
    bm = max(16, triton.next_power_of_2(min(rows, rows_per_program)))
    _mla_split_kernel[(triton.cdiv(rows, bm), bsz, num_splits)](
        q4,
        kv_cache,
        block_table,
        seq_lens,
        mid_o,
        mid_lse,
        scale,
        block_table.shape[1],
        num_splits,
        q4.stride(0),
        q4.stride(1),
        q4.stride(2),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_table.stride(0),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        H=heads,
        SQ=s_q,
        BM=bm,
        LORA=kv_lora_rank,
        ROPE=rope,
        PAGE=page,
        BN=block_n,
        NP=n_pages,
        DIRECT=num_splits == 1,
        HOIST=hoist_pages,
        TRANS=keys_as_m,
        INTERPRET=interpret_mode(),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _mla_merge_kernel[(bsz, rows)](
            mid_o,
            mid_lse,
            out4,
            num_splits,
            mid_o.stride(0),
            mid_o.stride(1),
            mid_o.stride(2),
            mid_lse.stride(0),
            mid_lse.stride(1),
            out4.stride(0),
            out4.stride(2),
            LORA=kv_lora_rank,
            SPAD=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4,
        )
    return out
