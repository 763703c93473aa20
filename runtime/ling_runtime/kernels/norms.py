"""Small fused ops of a decode step: residual add + RMSNorm (also straight from the MoE's fp32
per-slot partials), QK-norm + partial NeoX RoPE, and the Lightning output's group RMSNorm +
sigmoid gate. At decode sizes these are launch-bound, so the
win is doing each in one kernel (reference/performance.md §3d)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Residual add + RMSNorm
# ---------------------------------------------------------------------------------------------


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * w, x + residual); the sum is rounded to the residual dtype first."""
    r = (x.float() + residual.float()).to(residual.dtype)
    rf = r.float()
    y = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), r


@triton.jit
def _store_residual_and_norm(r, r_ptr, w_ptr, y_ptr, row, offs, stride_r, stride_y, eps, N: tl.constexpr):
    """Store the new residual row r (residual dtype) and y = rmsnorm(r) * w (fp32 math)."""
    tl.store(r_ptr + row * stride_r + offs, r)
    rf = r.to(tl.float32)
    inv = tl.rsqrt(tl.sum(rf * rf, axis=0) / N + eps)
    y = rf * inv * tl.load(w_ptr + offs).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty))


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, eps, stride_x, stride_r, stride_y, N: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    r = tl.load(x_ptr + row * stride_x + offs).to(tl.float32) + tl.load(r_ptr + row * stride_r + offs).to(
        tl.float32
    )
    _store_residual_and_norm(
        r.to(r_ptr.dtype.element_ty), r_ptr, w_ptr, y_ptr, row, offs, stride_r, stride_y, eps, N
    )


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Updates ``residual`` in place to x + residual and returns (rmsnorm(residual) * w, residual)."""
    rows, n = x.shape
    assert triton.next_power_of_2(n) == n and x.stride(1) == 1 and residual.stride(1) == 1
    if out is None:
        out = torch.empty_like(x)
    _add_rmsnorm_kernel[(rows,)](
        x, residual, weight, out, eps, x.stride(0), residual.stride(0), out.stride(0), N=n, num_warps=8
    )
    return out, residual


def add_rmsnorm_partials_ref(
    partials: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm_ref(partials.sum(1), residual, ...)`` with the S partials [B, S, H] (fp32)
    summed in slot order 0..S-1 and that sum rounded to the residual dtype before the add, as the
    unfused path (``fused_moe`` reduce, ``.to(bf16)``, ``add_rmsnorm``) rounds it. Not in place."""
    acc = partials[:, 0].float()
    for s in range(1, partials.shape[1]):
        acc = acc + partials[:, s].float()
    y, r = add_rmsnorm_ref(acc.to(residual.dtype), residual.clone(), weight, eps)
    return y.to(residual.dtype), r


@triton.jit
def _add_rmsnorm_partials_kernel(
    p_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    eps,
    stride_pb,
    stride_ps,
    stride_r,
    stride_y,
    S: tl.constexpr,
    N: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    src = p_ptr + row.to(tl.int64) * stride_pb + offs
    # Unrolled, so all S loads are in flight together; the adds stay in slot order (deterministic).
    acc = tl.load(src)
    for s in tl.static_range(1, S):
        acc += tl.load(src + s * stride_ps)
    m = acc.to(r_ptr.dtype.element_ty).to(tl.float32)
    r = (m + tl.load(r_ptr + row * stride_r + offs).to(tl.float32)).to(r_ptr.dtype.element_ty)
    _store_residual_and_norm(r, r_ptr, w_ptr, y_ptr, row, offs, stride_r, stride_y, eps, N)


def add_rmsnorm_partials(
    partials: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm`` of an un-reduced MoE output: partials [B, S, H] fp32 (``fused_moe(...,
    reduce=False)``) are summed in slot order in the same launch, so the separate reduce and cast
    launches disappear. Updates ``residual`` in place; returns (y in the residual dtype, residual)."""
    rows, slots, n = partials.shape
    assert partials.dtype == torch.float32 and partials.stride(2) == 1
    assert residual.shape == (rows, n) and residual.stride(1) == 1 and triton.next_power_of_2(n) == n
    if out is None:
        out = torch.empty_like(residual)
    _add_rmsnorm_partials_kernel[(rows,)](
        partials,
        residual,
        weight,
        out,
        eps,
        partials.stride(0),
        partials.stride(1),
        residual.stride(0),
        out.stride(0),
        S=slots,
        N=n,
        num_warps=8,
    )
    return out, residual


# ---------------------------------------------------------------------------------------------
# Group RMSNorm + sigmoid gate (Lightning output)
# ---------------------------------------------------------------------------------------------


def group_rmsnorm_gate_ref(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group: int, eps: float
) -> torch.Tensor:
    """GroupRMSNorm(o) * w * sigmoid(gate); o/gate [B, N], groups of ``group`` channels."""
    b, n = o.shape
    of = o.float().view(b, n // group, group)
    of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)
    return (of.view(b, n) * weight.float() * torch.sigmoid(gate.float())).to(gate.dtype)


@triton.jit
def _group_norm_gate_kernel(
    o_ptr, g_ptr, w_ptr, y_ptr, eps, stride_o, stride_g, stride_y, GROUP: tl.constexpr
):
    row = tl.program_id(0)
    grp = tl.program_id(1)
    offs = grp * GROUP + tl.arange(0, GROUP)
    o = tl.load(o_ptr + row * stride_o + offs).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + offs).to(tl.float32)
    inv = tl.rsqrt(tl.sum(o * o, axis=0) / GROUP + eps)
    y = o * inv * tl.load(w_ptr + offs).to(tl.float32) * tl.sigmoid(g)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty))


def group_rmsnorm_gate(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, group: int, eps: float
) -> torch.Tensor:
    """One program per (row, group); output in the gate's dtype (what dense consumes)."""
    b, n = o.shape
    y = torch.empty_like(gate)
    _group_norm_gate_kernel[(b, n // group)](
        o, gate, weight, y, eps, o.stride(0), gate.stride(0), y.stride(0), GROUP=group, num_warps=4
    )
    return y


# ---------------------------------------------------------------------------------------------
# QK-norm + partial NeoX RoPE, splitting the fused qkv projection
# ---------------------------------------------------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [len(positions), rot_dim // 2] in fp32 (plain RoPE; YaRN scaling is the model's job)."""
    inv = 1.0 / (
        theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device=positions.device) / rot_dim)
    )
    ang = positions.double()[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def qk_norm_rope_ref(
    qkv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [B, 3*H*D] -> q, k, v [B, H, D]: per-head RMSNorm on q/k, rotate-half RoPE on the first
    2*cos.shape[1] dims (cos/sin [B, rot/2] for each row's position)."""
    b = qkv.shape[0]
    q, k, v = qkv.float().view(b, 3, heads, -1).unbind(1)
    half = cos.shape[1]

    def norm_rope(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)

    return norm_rope(q, wq).to(qkv.dtype), norm_rope(k, wk).to(qkv.dtype), v.to(qkv.dtype).contiguous()


@triton.jit
def _norm_rope_row(src, w_ptr, dst, cs_row, cos_ptr, sin_ptr, eps, D: tl.constexpr, HALF: tl.constexpr):
    offs = tl.arange(0, D)
    x = tl.load(src + offs).to(tl.float32)
    # Rotate-half partner of each rotary lane (the second load hits L1).
    rot = offs < 2 * HALF
    partner = tl.where(offs < HALF, offs + HALF, offs - HALF)
    xp = tl.load(src + partner, mask=rot, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    xn = x * inv * tl.load(w_ptr + offs).to(tl.float32)
    xpn = xp * inv * tl.load(w_ptr + partner, mask=rot, other=0.0).to(tl.float32)
    freq = tl.where(offs < HALF, offs, offs - HALF)
    c = tl.load(cos_ptr + cs_row + freq, mask=rot, other=1.0)
    s = tl.load(sin_ptr + cs_row + freq, mask=rot, other=0.0)
    sign = tl.where(offs < HALF, -1.0, 1.0)
    y = tl.where(rot, xn * c + sign * xpn * s, xn)
    tl.store(dst + offs, y.to(dst.dtype.element_ty))


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    wq_ptr,
    wk_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    eps,
    stride_in,
    stride_cs,
    stride_out,
    H: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    which = tl.program_id(2)  # 0 = q, 1 = k, 2 = v
    src = qkv_ptr + row * stride_in + which * H * D + h * D
    dst = row * stride_out + h * D
    cs_row = row * stride_cs
    if which == 0:
        _norm_rope_row(src, wq_ptr, q_ptr + dst, cs_row, cos_ptr, sin_ptr, eps, D, HALF)
    elif which == 1:
        _norm_rope_row(src, wk_ptr, k_ptr + dst, cs_row, cos_ptr, sin_ptr, eps, D, HALF)
    else:
        offs = tl.arange(0, D)
        tl.store(v_ptr + dst + offs, tl.load(src + offs))


def qk_norm_rope(
    qkv: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for q, k and v of a Lightning layer: qkv [B, 3*H*D] -> q, k, v [B, H, D]."""
    b, n = qkv.shape
    dim = n // (3 * heads)
    q = torch.empty((b, heads, dim), dtype=qkv.dtype, device=qkv.device)
    k, v = torch.empty_like(q), torch.empty_like(q)
    _qk_norm_rope_kernel[(b, heads, 3)](
        qkv,
        wq,
        wk,
        cos,
        sin,
        q,
        k,
        v,
        eps,
        qkv.stride(0),
        cos.stride(0),
        heads * dim,
        H=heads,
        D=dim,
        HALF=cos.shape[1],
        num_warps=1,
    )
    return q, k, v
