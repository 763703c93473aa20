"""Plain RMSNorm in one launch (MLA's q_a / kv_a latent norms): the torch reference is ~9 launches
(cast, pow, mean, add, rsqrt, two muls, weight cast, cast back), graph nodes of ~1-2 us each."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim in fp32, in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, eps, stride_x, stride_y, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    y = x * inv * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_ref`` of ``x`` [T, N] (rows may be strided, e.g. a column slice) -> new [T, N]."""
    rows, n = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous() and weight.numel() == n
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        _rms_norm_kernel[(rows,)](
            x,
            weight,
            out,
            eps,
            x.stride(0),
            out.stride(0),
            N=n,
            BLOCK=triton.next_power_of_2(n),
            num_warps=4 if n <= 1024 else 8,
        )
    return out
