"""Token selection over a large vocabulary (157184): greedy argmax and temperature sampling.

Temperature sampling uses the Gumbel-max trick (argmax of logits / T + Gumbel noise equals a draw
from softmax(logits / T)), so both modes are one split-vocabulary argmax: stage 1 reduces each
vocab slice, stage 2 the slices. No host synchronisation, so it can sit inside a CUDA graph.
Top-k / top-p filtering is not fused here (the engine's torch sampler does it when asked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Reference: greedy where temperature == 0, else argmax(logits / T - log(-log(u)))."""
    lf = logits.float()
    t = temperature.float()[:, None]
    gumbel = -torch.log(-torch.log(uniform.float().clamp(1e-20, 1.0 - 1e-7)))
    noisy = torch.where(t > 0, lf / t.clamp_min(1e-6) + gumbel, lf)
    return noisy.argmax(-1).to(torch.int32)


@triton.jit
def _sample_stage1(
    logits_ptr,
    temp_ptr,
    u_ptr,
    val_ptr,
    idx_ptr,
    V,
    stride_l,
    stride_u,
    SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    t = tl.load(temp_ptr + row).to(tl.float32)
    offs = sp * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if t > 0:
        u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.5).to(tl.float32)
        u = tl.minimum(tl.maximum(u, 1e-20), 1.0 - 1e-7)
        x = tl.where(mask, x / tl.maximum(t, 1e-6) - tl.log(-tl.log(u)), float("-inf"))
    best = tl.max(x, axis=0)
    # Lowest index among equal maxima, matching torch.argmax.
    idx = tl.min(tl.where(x == best, offs, V), axis=0)
    tl.store(val_ptr + row * SPLITS + sp, best)
    tl.store(idx_ptr + row * SPLITS + sp, idx)


@triton.jit
def _sample_stage2(val_ptr, idx_ptr, out_ptr, SPLITS: tl.constexpr, SPAD: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, SPAD)
    mask = offs < SPLITS
    v = tl.load(val_ptr + row * SPLITS + offs, mask=mask, other=float("-inf"))
    i = tl.load(idx_ptr + row * SPLITS + offs, mask=mask, other=2147483647)
    best = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(v == best, i, 2147483647), axis=0))


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor | None = None, block: int = 4096
) -> torch.Tensor:
    """logits [B, V]; temperature [B] (0 = greedy); uniform [B, V] in (0, 1) or None for all-greedy."""
    rows, vocab = logits.shape
    splits = triton.cdiv(vocab, block)
    vals = torch.empty((rows, splits), dtype=torch.float32, device=logits.device)
    idxs = torch.empty((rows, splits), dtype=torch.int32, device=logits.device)
    out = torch.empty((rows,), dtype=torch.int32, device=logits.device)
    u = uniform if uniform is not None else logits
    _sample_stage1[(rows, splits)](
        logits,
        temperature,
        u,
        vals,
        idxs,
        vocab,
        logits.stride(0),
        u.stride(0),
        SPLITS=splits,
        BLOCK=block,
        num_warps=8,
    )
    _sample_stage2[(rows,)](vals, idxs, out, SPLITS=splits, SPAD=triton.next_power_of_2(splits), num_warps=4)
    return out
