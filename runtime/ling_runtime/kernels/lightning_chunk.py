"""Chunk-parallel Lightning prefill (two launches), same function as ``lightning_prefill``.

The fused prefill kernel walks every chunk in order inside one program per (sequence, head,
value block), so a long prompt runs on few programs doing four matmuls per step. Here only the
state recurrence stays sequential, and it is one matmul per chunk:

1. ``_states_kernel`` (grid: key block x value block x sequence*head) walks the chunks and stores
   the state *entering* each chunk (bf16, like fla's chunk kernels) plus the final fp32 state to
   the sequence's slot.
2. ``_output_kernel`` (grid: value block x chunk x head) computes every chunk independently:
   O = (Q K^T * decay mask) V + diag(lambda^(i+1)) Q S_chunk.

Chunks never straddle sequences: each sequence's chunks start at its own first token. Which
chunks belong to which sequence is worked out inside both kernels from ``cu_seqlens`` (a scan
over the sequences, cheap next to one chunk's loads) rather than by torch ops on the host side:
in a CUDA graph each of those ~10 tiny ops is its own node at ~1-2 us, which at T=1K was as much
as the two kernels together.

The launch configuration (``PrefillConfig``) is chosen by the average sequence length
(``prefill_config``): short prompts are latency-bound (few chunks per serial walk) and want more,
smaller programs; long ones are bound by the serial walk's per-chunk cost. ``_DISPATCH`` holds
what bench/gpu/lightning_sweep.py measured fastest on the H200. Each stage has a pointer-tensor
and a block-pointer form of the same loads (both measured winners, at different lengths).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import interpret_mode, mma

# Sequences scanned per step when a program looks up its chunk's sequence; one block covers
# any batch up to this many sequences in a single pass.
_SEQ_BLOCK = 64


@dataclass(frozen=True)
class PrefillConfig:
    """Launch configuration of the two kernels (stage 1 = state walk, stage 2 = outputs)."""

    chunk: int = 64
    block_k: int = 64
    block_v: int = 64
    warps1: int = 4
    stages1: int = 4
    block_v_out: int = 64
    warps2: int = 4
    stages2: int = 3
    # Block pointers instead of pointer tensors (per stage): the tiles' 64-bit address tensors
    # push the pointer-tensor kernels to 255 registers and stack spills at 4 warps (cuobjdump
    # -res-usage of the sm_90 build: stage 1 64x64 248 B -> 16 B, stage 2 BV=64 296 B -> 104 B).
    block_ptr1: bool = False
    block_ptr2: bool = False
    # Chunk states (and the state-update products) in fp32 (tf32 on the GPU) instead of the
    # activation dtype (bf16, as fla's chunk kernels: relerr ~3.4e-3 at real sizes), at twice the
    # chunk-state traffic. Never measured on its own (docs/gpu-notes.md); not a default.
    fp32_states: bool = False

    def tag(self) -> str:
        s1 = (
            f"C{self.chunk} s1 {self.block_k}x{self.block_v} w{self.warps1} s{self.stages1}"
            + " bp" * self.block_ptr1
        )
        s2 = f"s2 bv{self.block_v_out} w{self.warps2} s{self.stages2}" + " bp" * self.block_ptr2
        return f"{s1} + {s2}" + (" fp32 states" if self.fp32_states else "")


# (largest average tokens per sequence, config): the first row whose bound is >= the batch's
# average length wins; longer prompts take the last row. Measured on the H200 by
# bench/gpu/lightning_sweep.py (which prints rows to paste here).
_DISPATCH: list[tuple[int, PrefillConfig]] = [
    (1536, PrefillConfig(warps1=8)),  # T=1024: 31.8 us
    (3072, PrefillConfig(warps1=8)),  # varlen 8x2048: 390.9 us
    (8192, PrefillConfig(warps1=8, block_ptr1=True, block_ptr2=True)),  # T=4096: 107.4 us
]


def prefill_config(total_tokens: int, num_seqs: int) -> PrefillConfig:
    """The dispatch row for a batch of ``num_seqs`` packed sequences, ``total_tokens`` in all."""
    avg = total_tokens // max(num_seqs, 1)
    for bound, cfg in _DISPATCH:
        if avg <= bound:
            return cfg
    return _DISPATCH[-1][1]


@triton.jit
def _chunks_before(cu_ptr, n, N, C: tl.constexpr, SB: tl.constexpr):
    """Number of chunks of the sequences before sequence ``n`` (ceil(len / C) each)."""
    acc = n * 0
    for i0 in range(0, N, SB):
        idx = i0 + tl.arange(0, SB)
        m = idx < n
        lo = tl.load(cu_ptr + idx, mask=m, other=0)
        hi = tl.load(cu_ptr + idx + 1, mask=m, other=0)
        acc += tl.sum((hi - lo + C - 1) // C)
    return acc


@triton.jit
def _owner_block(cu_ptr, cid, i0, N, n, first, base, C: tl.constexpr, SB: tl.constexpr):
    idx = i0 + tl.arange(0, SB)
    m = idx < N
    lo = tl.load(cu_ptr + idx, mask=m, other=0)
    hi = tl.load(cu_ptr + idx + 1, mask=m, other=0)
    nch = (hi - lo + C - 1) // C  # 0 where masked
    before = m & (base + tl.cumsum(nch, 0) <= cid)  # sequences that end at or before chunk cid
    n += tl.sum(before.to(tl.int32))
    first += tl.sum(tl.where(before, nch, 0))
    return n, first, base + tl.sum(nch)


@triton.jit
def _chunk_owner(cu_ptr, cid, N, C: tl.constexpr, SB: tl.constexpr):
    """(sequence holding global chunk ``cid``, that sequence's first chunk); sequence N = none."""
    n = cid * 0
    first = cid * 0
    base = cid * 0
    for i0 in range(0, N, SB):
        n, first, base = _owner_block(cu_ptr, cid, i0, N, n, first, base, C, SB)
    return n, first


@triton.jit
def _state_step(
    k_ptr,
    v_ptr,
    h_ptr,
    s,
    c0,
    start,
    length,
    slope,
    tok_h,
    stride_t,
    offs,
    pos,
    D: tl.constexpr,
    C: tl.constexpr,
):
    """Store the state entering chunk c0 (at h_ptr) and return the state leaving it; offs = the
    chunk-row, key and value offsets of this program's tile."""
    offs_c, offs_k, offs_v = offs
    tl.store(h_ptr + offs_k[:, None] * D + offs_v[None, :], s.to(h_ptr.dtype.element_ty))
    rows = c0 + offs_c
    rmask = rows < length
    tok = (start + rows).to(tl.int64) * stride_t + tok_h
    k = tl.load(k_ptr + tok[:, None] + offs_k[None, :], mask=rmask[:, None], other=0.0)
    v = tl.load(v_ptr + tok[:, None] + offs_v[None, :], mask=rmask[:, None], other=0.0)
    nc = tl.minimum(length - c0, C).to(tl.float32)
    k_decay = tl.where(rmask, tl.exp(-slope * (nc - 1.0 - pos)), 0.0)
    kd = k.to(tl.float32) * k_decay[:, None]
    if h_ptr.dtype.element_ty == tl.float32:
        upd = mma(tl.trans(kd), v.to(tl.float32))
    else:
        upd = mma(tl.trans(kd.to(v.dtype)), v)
    return s * tl.exp(-slope * nc) + upd


@triton.jit
def _state_step_bp(
    k_base,
    v_base,
    h_base,
    s,
    c0,
    kb,
    vb,
    length,
    slope,
    stride_t,
    pos,
    D: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
):
    """``_state_step`` with block pointers (decay applied to V's rows, as fla does)."""
    p_h = tl.make_block_ptr(h_base, (D, D), (D, 1), (kb * BK, vb * BV), (BK, BV), (1, 0))
    tl.store(p_h, s.to(h_base.dtype.element_ty))
    # K^T tile loaded transposed ([BK, C]); rows past the sequence end read as zeros.
    p_k = tl.make_block_ptr(k_base, (D, length), (1, stride_t), (kb * BK, c0), (BK, C), (0, 1))
    p_v = tl.make_block_ptr(v_base, (length, D), (stride_t, 1), (c0, vb * BV), (C, BV), (1, 0))
    kt = tl.load(p_k, boundary_check=(1,), padding_option="zero")
    v = tl.load(p_v, boundary_check=(0,), padding_option="zero")
    nc = tl.minimum(length - c0, C).to(tl.float32)
    # where, not the zero padding: past the end exp() grows and 0 * inf would be NaN.
    v_decay = tl.where(pos < nc, tl.exp(-slope * (nc - 1.0 - pos)), 0.0)
    vd = v.to(tl.float32) * v_decay[:, None]
    if h_base.dtype.element_ty == tl.float32:
        upd = mma(kt.to(tl.float32), vd)
    else:
        upd = mma(kt, vd.to(v.dtype))
    return s * tl.exp(-slope * nc) + upd


@triton.jit(do_not_specialize=["N"])
def _states_kernel(
    k_ptr,
    v_ptr,
    h_ptr,
    state_ptr,
    slot_ptr,
    cu_ptr,
    init_ptr,
    slope_ptr,
    N,
    stride_t,
    stride_h,
    stride_hc,
    stride_hh,
    stride_ss,
    stride_sh,
    H: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    SB: tl.constexpr,
    BLOCK_PTR: tl.constexpr,
):
    kb = tl.program_id(0)
    vb = tl.program_id(1)
    n = tl.program_id(2) // H
    h = tl.program_id(2) % H
    start = tl.load(cu_ptr + n)
    length = tl.load(cu_ptr + n + 1) - start
    slot = tl.load(slot_ptr + n).to(tl.int64)
    slope = tl.load(slope_ptr + h).to(tl.float32)
    c_first = _chunks_before(cu_ptr, n, N, C, SB).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = kb * BK + tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    pos = offs_c.to(tl.float32)
    s_ptrs = state_ptr + slot * stride_ss + h * stride_sh + offs_k[:, None] * D + offs_v[None, :]
    has_init = tl.load(init_ptr + n) != 0
    s = tl.load(s_ptrs, mask=(offs_k[:, None] >= 0) & has_init, other=0.0)
    h_base = h_ptr + c_first * stride_hc + h * stride_hh
    tok0 = start.to(tl.int64) * stride_t + h * stride_h  # int64: T_total * H * D passes 2^31
    k_base = k_ptr + tok0
    v_base = v_ptr + tok0
    tok_h = h * stride_h
    for c0 in range(0, length, C):
        if BLOCK_PTR:
            s = _state_step_bp(
                k_base, v_base, h_base, s, c0, kb, vb, length, slope, stride_t, pos, D, BK, BV, C
            )
        else:
            offs = (offs_c, offs_k, offs_v)
            s = _state_step(
                k_ptr, v_ptr, h_base, s, c0, start, length, slope, tok_h, stride_t, offs, pos, D, C
            )
        h_base += stride_hc  # a pointer walk: chunk * stride would overflow int32 past ~4K chunks
    tl.store(s_ptrs, s)


@triton.jit(do_not_specialize=["N"])
def _output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    h_ptr,
    cu_ptr,
    slope_ptr,
    scale,
    N,
    stride_t,
    stride_h,
    stride_hc,
    stride_hh,
    D: tl.constexpr,
    BV: tl.constexpr,
    C: tl.constexpr,
    SB: tl.constexpr,
    BLOCK_PTR: tl.constexpr,
):
    vb = tl.program_id(0)
    cid = tl.program_id(1)
    h = tl.program_id(2)
    n, c_first = _chunk_owner(cu_ptr, cid, N, C, SB)
    if n < N:
        start = tl.load(cu_ptr + n)
        length = tl.load(cu_ptr + n + 1) - start
        c0 = (cid - c_first) * C
        slope = tl.load(slope_ptr + h).to(tl.float32)
        pos = tl.arange(0, C).to(tl.float32)
        if BLOCK_PTR:
            tok0 = start.to(tl.int64) * stride_t + h * stride_h
            p_q = tl.make_block_ptr(q_ptr + tok0, (length, D), (stride_t, 1), (c0, 0), (C, D), (1, 0))
            p_kt = tl.make_block_ptr(k_ptr + tok0, (D, length), (1, stride_t), (0, c0), (D, C), (0, 1))
            p_v = tl.make_block_ptr(v_ptr + tok0, (length, D), (stride_t, 1), (c0, vb * BV), (C, BV), (1, 0))
            q = tl.load(p_q, boundary_check=(0,), padding_option="zero")
            kt = tl.load(p_kt, boundary_check=(1,), padding_option="zero")
            v = tl.load(p_v, boundary_check=(0,), padding_option="zero")
        else:
            offs_c = tl.arange(0, C)
            offs_k = tl.arange(0, D)
            offs_v = vb * BV + tl.arange(0, BV)
            rows = c0 + offs_c
            rmask = rows < length
            tok = (start + rows).to(tl.int64) * stride_t + h * stride_h
            q = tl.load(q_ptr + tok[:, None] + offs_k[None, :], mask=rmask[:, None], other=0.0)
            k = tl.load(k_ptr + tok[:, None] + offs_k[None, :], mask=rmask[:, None], other=0.0)
            v = tl.load(v_ptr + tok[:, None] + offs_v[None, :], mask=rmask[:, None], other=0.0)
            kt = tl.trans(k)
        qs = (q.to(tl.float32) * scale).to(q.dtype)
        diff = pos[:, None] - pos[None, :]
        intra = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0.0)), 0.0)
        a = mma(qs, kt) * intra
        o = mma(a.to(v.dtype), v)
        h_off = cid.to(tl.int64) * stride_hc + h * stride_hh
        if BLOCK_PTR:
            s = tl.load(tl.make_block_ptr(h_ptr + h_off, (D, D), (D, 1), (0, vb * BV), (D, BV), (1, 0)))
        else:
            s = tl.load(h_ptr + h_off + offs_k[:, None] * D + offs_v[None, :])
        if h_ptr.dtype.element_ty == tl.float32:
            inter = mma(qs.to(tl.float32), s)  # tf32 on the GPU
        else:
            inter = mma(qs, s.to(qs.dtype))
        o += inter * tl.exp(-slope * (pos + 1.0))[:, None]
        if BLOCK_PTR:
            p_o = tl.make_block_ptr(o_ptr + tok0, (length, D), (stride_t, 1), (c0, vb * BV), (C, BV), (1, 0))
            tl.store(p_o, o.to(o_ptr.dtype.element_ty), boundary_check=(0,))
        else:
            tl.store(
                o_ptr + tok[:, None] + offs_v[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None]
            )


def _max_chunks(total: int, n_seq: int, chunk: int) -> int:
    # No host sync: every sequence wastes at most one partial chunk.
    return total // chunk + n_seq


def chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial: torch.Tensor,
    slope: torch.Tensor,
    cfg: PrefillConfig,
) -> torch.Tensor:
    """Stage 1: the state entering every chunk, h_states [max chunks, H, D, D] (one launch).

    Chunk rows past the batch's real chunk count are left unwritten (stage 2 skips them).
    """
    total, heads, dim = k.shape
    n_seq = slot_ids.shape[0]
    # A block larger than the head dim would give an empty grid that silently computes nothing.
    assert dim % cfg.block_k == 0 and dim % cfg.block_v == 0
    upper = _max_chunks(total, n_seq, cfg.chunk)
    dtype = torch.float32 if cfg.fp32_states else k.dtype
    h_states = torch.empty((upper, heads, dim, dim), dtype=dtype, device=k.device)
    _states_kernel[(dim // cfg.block_k, dim // cfg.block_v, n_seq * heads)](
        k,
        v,
        h_states,
        state,
        slot_ids,
        cu_seqlens,
        has_initial,
        slope,
        n_seq,
        k.stride(0),
        k.stride(1),
        h_states.stride(0),
        h_states.stride(1),
        state.stride(0),
        state.stride(1),
        H=heads,
        D=dim,
        BK=cfg.block_k,
        BV=cfg.block_v,
        C=cfg.chunk,
        SB=_SEQ_BLOCK,
        BLOCK_PTR=cfg.block_ptr1,
        num_warps=cfg.warps1,
        num_stages=cfg.stages1,
    )
    return h_states


def chunk_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    n_seq: int,
    slope: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    cfg: PrefillConfig,
) -> torch.Tensor:
    """Stage 2: every chunk's outputs from its entering state (one launch); returns ``out``."""
    _, heads, dim = q.shape
    assert dim % cfg.block_v_out == 0
    if cfg.block_v_out < min(64, dim) and not interpret_mode():
        # H200 (Triton 3.6): BV=32 of D=128 with 8 warps raised "illegal memory access" (sticky:
        # the process's CUDA context is lost). Every global index here is bounded
        # (tests/kernels/test_lightning.py runs that exact configuration with poisoned memory
        # around every buffer), so the fault is in the compiled code: that build splits the
        # B operands of 64B-swizzled [K, 32] tiles into m64n16 wgmmas across two warp groups,
        # the shape Triton's Hopper wgmma IMA reports (issues 10486, 11366) share.
        raise ValueError(f"stage-2 block_v={cfg.block_v_out} < 64 faults on sm_90 with Triton 3.6; use 64")
    _output_kernel[(dim // cfg.block_v_out, h_states.shape[0], heads)](
        q,
        k,
        v,
        out,
        h_states,
        cu_seqlens,
        slope,
        scale,
        n_seq,
        q.stride(0),
        q.stride(1),
        h_states.stride(0),
        h_states.stride(1),
        D=dim,
        BV=cfg.block_v_out,
        C=cfg.chunk,
        SB=_SEQ_BLOCK,
        BLOCK_PTR=cfg.block_ptr2,
        num_warps=cfg.warps2,
        num_stages=cfg.stages2,
    )
    return out


def lightning_prefill_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Packed varlen prefill: q/k/v [T_total, H, D]; cu_seqlens [N+1] int32; has_initial [N]
    (0 = start from a zero state); each sequence's final state goes to its slot.

    Exactly two kernel launches and no other device work (so two nodes in a CUDA graph). The
    launch configuration is ``config`` if given, else the ``_DISPATCH`` row for the batch's average
    sequence length, its blocks clamped to the head dim.
    """
    total, _, dim = q.shape
    n_seq = slot_ids.shape[0]
    assert k.stride() == q.stride() and v.stride() == q.stride() and q.stride(2) == 1
    cfg = config
    if cfg is None:
        cfg = prefill_config(total, n_seq)
        cfg = replace(
            cfg,
            block_k=min(cfg.block_k, dim),
            block_v=min(cfg.block_v, dim),
            block_v_out=min(cfg.block_v_out, dim),
        )
    if out is None:
        out = torch.empty_like(q)
    assert out.stride() == q.stride()
    h_states = chunk_states(k, v, state, slot_ids, cu_seqlens, has_initial, slope, cfg)
    return chunk_outputs(q, k, v, h_states, cu_seqlens, n_seq, slope, scale, out, cfg)
