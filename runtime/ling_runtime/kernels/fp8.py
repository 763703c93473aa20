"""FP8 (e4m3) weight linear with 128x128 block scales, for decode-sized activations.

y = x W^T with W stored as fp8 ``w[N, K]`` and fp32 ``scale[ceil(N/128), ceil(K/128)]``, the
layout of DeepSeek-style block-quantised checkpoints: W_true[n, k] = w[n, k] * scale[n//128, k//128].
Decode is bandwidth-bound, so reading 1 byte per weight instead of 2 is the whole point; the
weights are widened to bf16 in registers and the block scale is applied to each K-block's partial
product in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import interpret_mode, mma

QBLOCK = 128


def quantize_fp8_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16/fp32 [N, K] (multiples of 128) -> (fp8 e4m3 [N, K], fp32 scales [N/128, K/128])."""
    n, k = w.shape
    blocks = w.float().view(n // QBLOCK, QBLOCK, k // QBLOCK, QBLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(n, k)
    return q, scale


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference: dequantise and multiply in fp32."""
    n, k = w.shape
    wf = w.float().view(n // QBLOCK, QBLOCK, k // QBLOCK, QBLOCK) * scale[:, None, :, None]
    return (x.float() @ wf.view(n, k).T).to(x.dtype)


@triton.jit
def _fp8_linear_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, M, N, stride_x, stride_w, stride_s, stride_y,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    nb = tl.program_id(0)
    mb = tl.program_id(1)
    offs_m = mb * BM + tl.arange(0, BM)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, 128)
    mmask = offs_m < M
    s_row = s_ptr + ((nb * BN) // 128) * stride_s
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, 128):
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + k0 + offs_k[None, :], mask=mmask[:, None], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_w + k0 + offs_k[:, None])
        part = mma(x, w.to(tl.bfloat16), INTERPRET)
        acc += part * tl.load(s_row + k0 // 128)
    tl.store(
        y_ptr + offs_m[:, None] * stride_y + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mmask[:, None],
    )


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    block_m: int = 16,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """x [M, K] bf16, w [N, K] fp8 e4m3, scale [N/128, K/128] fp32 -> y [M, N] bf16."""
    m, k = x.shape
    n = w.shape[0]
    assert k % QBLOCK == 0 and QBLOCK % block_n == 0 and n % block_n == 0 and x.stride(1) == 1
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (n // block_n, triton.cdiv(m, block_m))
    _fp8_linear_kernel[grid](
        x, w, scale, y, m, n, x.stride(0), w.stride(0), scale.stride(0), y.stride(0),
        K=k, BM=block_m, BN=block_n, INTERPRET=interpret_mode(), num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y
