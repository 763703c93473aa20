"""Lightning (constant-decay linear) attention: decode, spec-verify and chunked prefill.

Math (reference/model.md §2): per head h with decay lambda_h = exp(-slope_h) (``slopes.py``) and
a fp32 state S in R^{D x D} (rows indexed by the key dim, columns by the value dim),

    S_t = lambda_h * S_{t-1} + k_t^T v_t          o_t = (scale * q_t) S_t

States live in a slot pool ``state[num_slots, H, D, D]`` (fp32) indexed by per-sequence slot ids;
decode updates a slot in place so each step moves the state once in and once out of HBM.
Each Triton kernel has a plain-torch reference beside it (``*_ref``) computing the same function
in fp32 token by token; tests compare the two. Prefill is ``lightning_chunk``'s two-launch
``lightning_prefill_chunked`` (its reference, ``lightning_prefill_ref``, is here); the fused
one-program-per-sequence prefill that walked every chunk serially lost to it at every length
(docs/gpu-notes.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ling_runtime.kernels.slopes import lightning_slopes

__all__ = [
    "lightning_commit",
    "lightning_commit_ref",
    "lightning_decode",
    "lightning_decode_ref",
    "lightning_prefill_ref",
    "lightning_slopes",
    "lightning_verify",
    "lightning_verify_ref",
]

# ---------------------------------------------------------------------------------------------
# References (plain torch, fp32, token-by-token recurrence)
# ---------------------------------------------------------------------------------------------


def lightning_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One decode step for a batch; q/k/v [B, H, D]; updates ``state[slot_ids]`` in place."""
    decay = torch.exp(-slope.float())[None, :, None, None]
    valid = slot_ids >= 0
    slots = slot_ids[valid].long()
    s = state[slots] * decay + k[valid].float()[..., :, None] * v[valid].float()[..., None, :]
    state[slots] = s
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    out[valid] = torch.einsum("bhk,bhkv->bhv", q[valid].float() * scale, s).to(q.dtype)
    return out


def lightning_verify_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec-verify over T draft positions; q/k/v [B, T, H, D].

    Returns (o [B, T, H, D], per-position states [B, T, H, D, D]); the pool is left untouched so
    a rejected draft needs no undo. ``lightning_commit_ref`` copies the accepted position back.
    """
    decay = torch.exp(-slope.float())[None, :, None, None]
    s = state[slot_ids.long()].clone()
    outs, states = [], []
    for t in range(q.shape[1]):
        s = s * decay + k[:, t].float()[..., :, None] * v[:, t].float()[..., None, :]
        states.append(s)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float() * scale, s))
    return torch.stack(outs, 1).to(q.dtype), torch.stack(states, 1)


def lightning_commit_ref(
    state: torch.Tensor, slot_ids: torch.Tensor, inter: torch.Tensor, num_accepted: torch.Tensor
) -> None:
    """state[slot_ids[b]] = inter[b, num_accepted[b] - 1] (num_accepted >= 1: the verified token)."""
    b = torch.arange(slot_ids.shape[0], device=slot_ids.device)
    state[slot_ids.long()] = inter[b, num_accepted.long() - 1]


def lightning_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    has_initial: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Packed varlen prefill; q/k/v [T_total, H, D]; writes each sequence's final state to its slot."""
    decay = torch.exp(-slope.float())[:, None, None]
    out = torch.empty_like(q)
    h, d = q.shape[1], q.shape[2]
    for n in range(slot_ids.shape[0]):
        lo, hi = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
        slot = int(slot_ids[n])
        s = state[slot].clone() if bool(has_initial[n]) else q.new_zeros((h, d, d), dtype=torch.float32)
        for t in range(lo, hi):
            s = s * decay + k[t].float()[:, :, None] * v[t].float()[:, None, :]
            out[t] = torch.einsum("hk,hkv->hv", q[t].float() * scale, s).to(q.dtype)
        state[slot] = s
    return out


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    state_ptr,
    slot_ptr,
    slope_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_ss,
    stride_sh,
    D: tl.constexpr,
    BV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    # int64: slot * stride_ss overflows int32 beyond 4096 slots of a 32x128x128 state.
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        offs_k = tl.arange(0, D)
        offs_v = vb * BV + tl.arange(0, BV)
        base = b * stride_qb + h * stride_qh
        q = tl.load(q_ptr + base + offs_k).to(tl.float32) * scale
        k = tl.load(k_ptr + base + offs_k).to(tl.float32)
        v = tl.load(v_ptr + base + offs_v).to(tl.float32)
        decay = tl.exp(-tl.load(slope_ptr + h).to(tl.float32))
        s_ptrs = state_ptr + slot * stride_ss + h * stride_sh + offs_k[:, None] * D + offs_v[None, :]
        s = tl.load(s_ptrs) * decay + k[:, None] * v[None, :]
        tl.store(s_ptrs, s)
        o = tl.sum(q[:, None] * s, axis=0)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_v, o.to(o_ptr.dtype.element_ty))


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_v: int = 32,
) -> torch.Tensor:
    """Decode step; q/k/v [B, H, D] (last dim contiguous, same strides); state [S, H, D, D] fp32.

    Rows with slot id < 0 (CUDA-graph padding) are skipped and their output is left unwritten.
    """
    bsz, heads, dim = q.shape
    assert k.stride() == q.stride() and v.stride() == q.stride() and q.stride(2) == 1
    assert dim % block_v == 0  # else an empty grid would silently compute nothing
    assert state.dtype == torch.float32 and state.is_contiguous()
    if out is None:
        out = torch.empty_like(q)
    grid = (bsz, heads, dim // block_v)
    _decode_kernel[grid](
        q,
        k,
        v,
        out,
        state,
        slot_ids,
        slope,
        scale,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        state.stride(0),
        state.stride(1),
        D=dim,
        BV=block_v,
        num_warps=4,
    )
    return out


@triton.jit
def _verify_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    state_ptr,
    inter_ptr,
    slot_ptr,
    slope_ptr,
    scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_ss,
    stride_sh,
    stride_ib,
    stride_it,
    stride_ih,
    T: tl.constexpr,
    D: tl.constexpr,
    BV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        offs_k = tl.arange(0, D)
        offs_v = vb * BV + tl.arange(0, BV)
        decay = tl.exp(-tl.load(slope_ptr + h).to(tl.float32))
        tile = offs_k[:, None] * D + offs_v[None, :]
        s = tl.load(state_ptr + slot * stride_ss + h * stride_sh + tile)
        b64 = b.to(tl.int64)
        for t in range(T):
            base = b * stride_qb + t * stride_qt + h * stride_qh
            q = tl.load(q_ptr + base + offs_k).to(tl.float32) * scale
            k = tl.load(k_ptr + base + offs_k).to(tl.float32)
            v = tl.load(v_ptr + base + offs_v).to(tl.float32)
            s = s * decay + k[:, None] * v[None, :]
            tl.store(inter_ptr + b64 * stride_ib + t * stride_it + h * stride_ih + tile, s)
            o = tl.sum(q[:, None] * s, axis=0)
            tl.store(
                o_ptr + b * stride_ob + t * stride_ot + h * stride_oh + offs_v, o.to(o_ptr.dtype.element_ty)
            )


def lightning_verify(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    slope: torch.Tensor,
    scale: float,
    inter: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_v: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec-verify; q/k/v [B, T, H, D]; returns (o, inter [B, T, H, D, D] fp32). Pool untouched."""
    bsz, steps, heads, dim = q.shape
    assert k.stride() == q.stride() and v.stride() == q.stride() and q.stride(3) == 1
    assert dim % block_v == 0  # else an empty grid would silently compute nothing
    if inter is None:
        inter = torch.empty((bsz, steps, heads, dim, dim), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    grid = (bsz, heads, dim // block_v)
    _verify_kernel[grid](
        q,
        k,
        v,
        out,
        state,
        inter,
        slot_ids,
        slope,
        scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        state.stride(0),
        state.stride(1),
        inter.stride(0),
        inter.stride(1),
        inter.stride(2),
        T=steps,
        D=dim,
        BV=block_v,
        num_warps=4,
    )
    return out, inter


@triton.jit
def _commit_kernel(
    state_ptr, inter_ptr, slot_ptr, nacc_ptr, stride_ss, stride_ib, stride_it, BLOCK: tl.constexpr
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if slot >= 0:
        t = (tl.load(nacc_ptr + b) - 1).to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(inter_ptr + b.to(tl.int64) * stride_ib + t * stride_it + offs)
        tl.store(state_ptr + slot * stride_ss + offs, x)


def lightning_commit(
    state: torch.Tensor, slot_ids: torch.Tensor, inter: torch.Tensor, num_accepted: torch.Tensor
) -> None:
    """After verification: state[slot_ids[b]] = inter[b, num_accepted[b] - 1]; graph-safe, no sync."""
    per_slot = state[0].numel()
    block = math.gcd(per_slot, 4096)
    assert block >= 256 and state.is_contiguous() and inter.is_contiguous()
    grid = (slot_ids.shape[0], per_slot // block)
    _commit_kernel[grid](
        state, inter, slot_ids, num_accepted, state.stride(0), inter.stride(0), inter.stride(1), BLOCK=block
    )
