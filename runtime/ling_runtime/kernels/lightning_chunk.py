"""Chunk-parallel Lightning prefill (two launches), same function as ``lightning_prefill``.

The fused prefill kernel walks every chunk in order inside one program per (sequence, head,
value block), so a long prompt runs on few programs doing four matmuls per step. Here only the
state recurrence stays sequential, and it is one matmul per chunk:

1. ``_states_kernel`` (grid: key block x value block x sequence*head) walks the chunks and stores
   the state *entering* each chunk (bf16, like fla's chunk kernels) plus the final fp32 state to
   the sequence's slot.
2. ``_output_kernel`` (grid: value block x chunk x head) computes every chunk independently:
   O = (Q K^T * decay mask) V + diag(lambda^(i+1)) Q S_chunk.

Chunks never straddle sequences: each sequence's chunks start at its own first token, and
``chunk_seq`` maps a global chunk index to its sequence (built on the device, no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import interpret_mode, mma


@triton.jit
def _state_step(k_ptr, v_ptr, h_ptr, s, c0, start, length, slope, tok_h, stride_t,
                offs_c, offs_k, offs_v, pos, D: tl.constexpr, C: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
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
        upd = mma(tl.trans(kd), v.to(tl.float32), INTERPRET)
    else:
        upd = mma(tl.trans(kd.to(v.dtype)), v, INTERPRET)
    return s * tl.exp(-slope * nc) + upd


@triton.jit
def _states_kernel(
    k_ptr, v_ptr, h_ptr, state_ptr, slot_ptr, cu_ptr, init_ptr, coff_ptr, slope_ptr,
    stride_t, stride_h, stride_hc, stride_hh, stride_ss, stride_sh,
    H: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    kb = tl.program_id(0)
    vb = tl.program_id(1)
    n = tl.program_id(2) // H
    h = tl.program_id(2) % H
    start = tl.load(cu_ptr + n)
    length = tl.load(cu_ptr + n + 1) - start
    slot = tl.load(slot_ptr + n).to(tl.int64)
    slope = tl.load(slope_ptr + h).to(tl.float32)
    c_first = tl.load(coff_ptr + n).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_k = kb * BK + tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    pos = offs_c.to(tl.float32)
    s_ptrs = state_ptr + slot * stride_ss + h * stride_sh + offs_k[:, None] * D + offs_v[None, :]
    has_init = tl.load(init_ptr + n) != 0
    s = tl.load(s_ptrs, mask=(offs_k[:, None] >= 0) & has_init, other=0.0)
    h_base = h_ptr + c_first * stride_hc + h * stride_hh
    tok_h = h * stride_h
    if INTERPRET:
        # The interpreter cannot range() over a loaded bound.
        c0 = 0
        while c0 < length:
            s = _state_step(k_ptr, v_ptr, h_base, s, c0, start, length, slope, tok_h, stride_t,
                            offs_c, offs_k, offs_v, pos, D, C, INTERPRET)  # fmt: skip
            h_base += stride_hc  # a pointer walk: chunk * stride would overflow int32 past ~4K chunks
            c0 += C
    else:
        for c0 in range(0, length, C):
            s = _state_step(k_ptr, v_ptr, h_base, s, c0, start, length, slope, tok_h, stride_t,
                            offs_c, offs_k, offs_v, pos, D, C, INTERPRET)  # fmt: skip
            h_base += stride_hc
    tl.store(s_ptrs, s)


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, h_ptr, cu_ptr, coff_ptr, cseq_ptr, slope_ptr, scale, N,
    stride_t, stride_h, stride_hc, stride_hh,
    D: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    vb = tl.program_id(0)
    cid = tl.program_id(1)
    h = tl.program_id(2)
    n = tl.load(cseq_ptr + cid)
    if n < N:
        start = tl.load(cu_ptr + n)
        length = tl.load(cu_ptr + n + 1) - start
        c0 = (cid - tl.load(coff_ptr + n)) * C
        slope = tl.load(slope_ptr + h).to(tl.float32)
        offs_c = tl.arange(0, C)
        offs_k = tl.arange(0, D)
        offs_v = vb * BV + tl.arange(0, BV)
        pos = offs_c.to(tl.float32)
        rows = c0 + offs_c
        rmask = rows < length
        tok = (start + rows).to(tl.int64) * stride_t + h * stride_h
        q = tl.load(q_ptr + tok[:, None] + offs_k[None, :], mask=rmask[:, None], other=0.0)
        k = tl.load(k_ptr + tok[:, None] + offs_k[None, :], mask=rmask[:, None], other=0.0)
        v = tl.load(v_ptr + tok[:, None] + offs_v[None, :], mask=rmask[:, None], other=0.0)
        s = tl.load(
            h_ptr + cid.to(tl.int64) * stride_hc + h * stride_hh + offs_k[:, None] * D + offs_v[None, :]
        )
        qs = (q.to(tl.float32) * scale).to(q.dtype)
        diff = pos[:, None] - pos[None, :]
        intra = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0.0)), 0.0)
        a = mma(qs, tl.trans(k), INTERPRET) * intra
        o = mma(a.to(v.dtype), v, INTERPRET)
        if h_ptr.dtype.element_ty == tl.float32:
            inter = mma(qs.to(tl.float32), s, INTERPRET)  # tf32 on the GPU
        else:
            inter = mma(qs, s.to(qs.dtype), INTERPRET)
        o += inter * tl.exp(-slope * (pos + 1.0))[:, None]
        tl.store(o_ptr + tok[:, None] + offs_v[None, :], o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])


def chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial: torch.Tensor,
    slope: torch.Tensor,
    chunk: int = 64,
    block_k: int = 64,
    block_v: int = 64,
    num_warps: int = 4,
    num_stages: int = 4,
    states_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1: the state entering every chunk -> (h_states [chunks, H, D, D], chunk_off, chunk_seq).

    ``states_dtype`` defaults to the activation dtype (bf16 chunk states and bf16 state-update
    products, as fla's chunk kernels: relerr ~3.4e-3 at real sizes); float32 keeps them in fp32
    (tf32 products on the GPU) at twice the chunk-state traffic.
    """
    total, heads, dim = k.shape
    n_seq = slot_ids.shape[0]
    # A block larger than the head dim would give an empty grid that silently computes nothing.
    assert dim % block_k == 0 and dim % block_v == 0
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    n_chunks = (lens + chunk - 1) // chunk
    ends = torch.cumsum(n_chunks, 0)
    chunk_off = (ends - n_chunks).to(torch.int32)
    upper = total // chunk + n_seq  # no host sync: a bound on the number of chunks
    chunk_seq = torch.searchsorted(ends, torch.arange(upper, device=k.device), right=True).to(torch.int32)
    h_states = torch.empty((upper, heads, dim, dim), dtype=states_dtype or k.dtype, device=k.device)
    _states_kernel[(dim // block_k, dim // block_v, n_seq * heads)](
        k, v, h_states, state, slot_ids, cu_seqlens, has_initial, chunk_off, slope,
        k.stride(0), k.stride(1), h_states.stride(0), h_states.stride(1), state.stride(0), state.stride(1),
        H=heads, D=dim, BK=block_k, BV=block_v, C=chunk, INTERPRET=interpret_mode(),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return h_states, chunk_off, chunk_seq


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
    chunk: int = 64,
    block_k: int = 64,
    block_v: int = 64,
    block_v_out: int = 64,
    num_warps: tuple[int, int] = (4, 4),
    num_stages: tuple[int, int] = (4, 3),
    states_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as ``lightning_prefill``: q/k/v [T_total, H, D]; final states go to the slots.

    Defaults are the fastest measured on the H200 (bench/results/gpu.md): 4 pipeline stages in the
    sequential state walk hide the chunk loads that otherwise bound it (353 -> 196 us at T=16K).
    """
    _, heads, dim = q.shape
    assert k.stride() == q.stride() and v.stride() == q.stride() and q.stride(2) == 1
    assert dim % block_v_out == 0
    if out is None:
        out = torch.empty_like(q)
    assert out.stride() == q.stride()
    h_states, chunk_off, chunk_seq = chunk_states(
        k,
        v,
        state,
        slot_ids,
        cu_seqlens,
        has_initial,
        slope,
        chunk,
        block_k,
        block_v,
        num_warps[0],
        num_stages[0],
    )
    _output_kernel[(dim // block_v_out, h_states.shape[0], heads)](
        q, k, v, out, h_states, cu_seqlens, chunk_off, chunk_seq, slope, scale, slot_ids.shape[0],
        q.stride(0), q.stride(1), h_states.stride(0), h_states.stride(1),
        D=dim, BV=block_v_out, C=chunk, INTERPRET=interpret_mode(), num_warps=num_warps[1],
        num_stages=num_stages[1],
    )  # fmt: skip
    return out
