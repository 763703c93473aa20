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
sm_90 TTGIR: ``memdesc<1x..>`` and ``async_wait 0`` per iteration; this was the 0.52-0.63 of v1,
docs/gpu-notes.md). With the page numbers in registers (``tl.gather`` per key row) the key loads
depend on no load in the loop and get num_stages - 1 buffers; a block may then span pages.

MTP verify: q may be ``[B, S_Q, H, 576]`` (S_Q query positions per sequence, the last S_Q tokens
of the sequence; position j sees ``seq_len - (S_Q - 1 - j)`` keys). All S_Q * H rows share each
key block, so the bytes are those of one decode and the MMA M dimension grows to S_Q * H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import mma

# Pages of the block table one program holds in registers at a time (one chunk of its split).
PAGES_PER_CHUNK = 256


@dataclass(frozen=True)
class MlaConfig:
    """Launch choices of ``mla_decode``; ``mla_config`` picks the measured ones.

    ``num_splits``: programs per sequence over its keys (flash-decoding; 1 = the split kernel
    writes the output, no merge launch). ``block_n``: keys per block (any power of two: a block
    may span pages). ``num_stages``: key-block buffers + 1 (two 64 x 576 buffers plus q fit in
    shared memory, three do not). ``rows_per_program``: query rows (S_Q * H) per program; a
    [128, 512] fp32 accumulator does not fit one program's registers, and row groups that share
    a key range run side by side, so the second reads the keys from L2.
    """

    num_splits: int
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    rows_per_program: int = 64

    def tag(self) -> str:
        return (
            f"splits={self.num_splits} bn={self.block_n} w={self.num_warps} s={self.num_stages} "
            f"rows={self.rows_per_program}"
        )


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
    q, keys, pv, c0, t0, end, row_end, state, scale, LORA: tl.constexpr, PAGE: tl.constexpr, SQ: tl.constexpr
):
    """One key block [t0, t0 + BN) of the online softmax for all BM query rows: q = (q_nope, q_pe),
    keys = (kv_ptr, page stride, token stride, block/latent/rope offsets), state = (m, l, acc)."""
    q_nope, q_pe = q
    kv_ptr, stride_page, stride_tok, offs_n, offs_c, offs_r = keys
    m_i, l_i, acc = state
    tok = t0 + offs_n
    valid = tok < end
    # Page of every key row from the page numbers already in registers (no load in the chain).
    page = tl.gather(pv, (tok - c0) // PAGE, 0).to(tl.int64)
    base = kv_ptr + (page * stride_page + (tok % PAGE) * stride_tok)[:, None]
    k = tl.load(base + offs_c[None, :], mask=valid[:, None], other=0.0)  # [BN, 512], also V
    k_pe = tl.load(base + LORA + offs_r[None, :], mask=valid[:, None], other=0.0)  # [BN, 64]
    s = (mma(q_nope, tl.trans(k)) + mma(q_pe, tl.trans(k_pe))) * scale
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
    acc = acc * alpha[:, None] + mma(p.to(k.dtype), k)
    return m_new, l_i, acc


@triton.jit
def _split_range(len_ptr, b, sp, splits, BN: tl.constexpr, PAGE: tl.constexpr):
    """(seq_len, first key, end key) of split ``sp`` of sequence ``b``. Boundaries fall on whole
    pages and whole key blocks, so every chunk of pages starts on a block boundary and every
    block's rows index inside its chunk's page vector."""
    seq_len = tl.load(len_ptr + b)
    ALIGN: tl.constexpr = BN if BN > PAGE else PAGE
    split_len = tl.cdiv(tl.cdiv(seq_len, splits), ALIGN) * ALIGN
    start = sp * split_len
    return seq_len, start, tl.minimum(start + split_len, seq_len)


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
):
    # Row groups fastest in launch order: programs that share a key range run side by side, so
    # the second one's key reads hit L2.
    g = tl.program_id(0)
    b = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len, start, end = _split_range(len_ptr, b, sp, splits, BN, PAGE)
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
    q_nope = tl.load(q_rows[:, None] + offs_c[None, :], mask=rmask[:, None], other=0.0)
    q_pe = tl.load(q_rows[:, None] + LORA + offs_r[None, :], mask=rmask[:, None], other=0.0)
    state = (
        tl.full((BM,), float("-inf"), dtype=tl.float32),
        tl.zeros((BM,), dtype=tl.float32),
        tl.zeros((BM, LORA), dtype=tl.float32),
    )
    keys = (kv_ptr, stride_page, stride_tok, offs_n, offs_c, offs_r)
    for c0 in range(start, end, CHUNK):
        pv = tl.load(bt + c0 // PAGE + offs_p, mask=c0 // PAGE + offs_p < max_pages, other=0)
        c1 = tl.minimum(c0 + CHUNK, end)
        for t0 in range(c0, c1, BN):
            state = _mla_block((q_nope, q_pe), keys, pv, c0, t0, end, row_end, state, scale, LORA, PAGE, SQ)
    m_i, l_i, acc = state
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
    alone, so a 1.2-wave grid would cost a second wave), 1..32."""
    return max(1, min(32, 132 // bsz))


def mla_config(bsz: int, s_q: int = 1, heads: int = 32) -> MlaConfig:
    """Measured on the H200 (bench/gpu/mla_sweep.py, ctx 4096, page 64 and 16). Up to 32 query
    rows: 64-key blocks, 3 stages, 8 warps while the sequence is split (B = 1/8/32: 0.066 / 0.33 /
    0.51 of the read ceiling), 4 warps at one split. From B = 66 (one split would leave < 2
    programs per SM): two splits of 32-key blocks with 4 warps, whose 113 KB of shared memory lets
    two programs share an SM (B = 128: 224-226 us in three runs, where one split measured 205 us
    once and 316 us once). 64 rows (MTP verify): 32-key blocks, 8 warps (B = 32, S_Q = 2: 104 us
    against 123 us as B * S_Q decode rows)."""
    if bsz >= 66 and s_q == 1:
        return MlaConfig(num_splits=2, block_n=32, num_warps=4)
    splits = default_splits(bsz)
    wide = min(s_q * heads, MlaConfig.rows_per_program) > 32
    return MlaConfig(splits, block_n=32 if wide else 64, num_warps=8 if wide or splits > 1 else 4)


def _merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out4: torch.Tensor, splits: int) -> None:
    bsz, _, rows, lora = mid_o.shape
    _mla_merge_kernel[(bsz, rows)](
        mid_o,
        mid_lse,
        out4,
        splits,
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        out4.stride(0),
        out4.stride(2),
        LORA=lora,
        SPAD=max(2, triton.next_power_of_2(splits)),
        num_warps=4,
    )


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int = 512,
    *,
    config: MlaConfig | None = None,
) -> torch.Tensor:
    """q [B, H, 576] (absorbed q_nope | q_pe) or [B, S_Q, H, 576] (MTP verify), kv_cache
    [P, page, 576] (any power-of-two page) -> u [B, H, 512] (or [B, S_Q, H, 512]).

    ``config`` defaults to ``mla_config``; whatever it says, each split gets at least the pages
    of one chunk of the block table's width (``single_chunk_splits``).
    """
    q4 = q[:, None] if q.dim() == 3 else q
    bsz, s_q, heads, dim = q4.shape
    rows = s_q * heads
    cfg = config or mla_config(bsz, s_q, heads)
    page = kv_cache.shape[1]
    assert kv_cache.stride(2) == 1 and q4.stride(3) == 1
    # Pages one chunk covers: the whole table row when it is <= PAGES_PER_CHUNK (one chunk per
    # split), at least one key block. Independent of the split count, so that is no recompile.
    width = block_table.shape[1]
    n_pages = triton.next_power_of_2(max(min(width, PAGES_PER_CHUNK), -(-cfg.block_n // page), 2))
    splits = single_chunk_splits(cfg.num_splits, width, n_pages, cfg.block_n, page)
    out = torch.empty((*q.shape[:-1], kv_lora_rank), dtype=q.dtype, device=q.device)
    out4 = out[:, None] if out.dim() == 3 else out
    if splits == 1:
        mid_o, mid_lse = out4.view(bsz, 1, rows, kv_lora_rank), out4  # lse unused
    else:
        mid_o = torch.empty((bsz, splits, rows, kv_lora_rank), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((bsz, splits, rows), dtype=torch.float32, device=q.device)
    bm = max(16, triton.next_power_of_2(min(rows, cfg.rows_per_program)))
    _mla_split_kernel[(triton.cdiv(rows, bm), bsz, splits)](
        q4,
        kv_cache,
        block_table,
        seq_lens,
        mid_o,
        mid_lse,
        scale,
        width,
        splits,
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
        ROPE=dim - kv_lora_rank,
        PAGE=page,
        BN=cfg.block_n,
        NP=n_pages,
        DIRECT=splits == 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        _merge_splits(mid_o, mid_lse, out4, splits)
    return out
