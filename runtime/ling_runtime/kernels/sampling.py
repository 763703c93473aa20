"""Token selection over a large vocabulary (157184): greedy argmax and temperature sampling.

Temperature sampling uses the Gumbel-max trick (argmax of logits / T + Gumbel noise equals a draw
from softmax(logits / T)), so both modes are one split-vocabulary argmax: stage 1 reduces each
vocab slice, stage 2 the slices. No host synchronisation, so it can sit inside a CUDA graph.

The noise is either given (``uniform``) or, with ``seeds`` and ``positions``, hashed in the kernel
from (request seed, position, vocabulary index) (``kernels/noise.py``; no [B, V] tensor is read, and
the same request gets the same draw wherever it is sampled). Top-k / top-p filtering is not fused
here: the runner's sampler (runner/sampler.py) applies it to the rows that ask, with the same noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels.noise import GOLDEN, MUL1, MUL2, gumbel, row_keys, uniform_from_keys

# The hash's constants as 16-bit halves (Triton kernels read globals only as constexpr).
_M1_LO, _M1_HI = tl.constexpr(MUL1 & 0xFFFF), tl.constexpr(MUL1 >> 16)
_M2_LO, _M2_HI = tl.constexpr(MUL2 & 0xFFFF), tl.constexpr(MUL2 >> 16)
_G_LO, _G_HI = tl.constexpr(GOLDEN & 0xFFFF), tl.constexpr(GOLDEN >> 16)
_GOLDEN = tl.constexpr(GOLDEN)


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    uniform: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    seed_div: int = 1,
) -> torch.Tensor:
    """Reference: greedy where temperature == 0, else argmax(logits / T - log(-log(u))), u given or
    hashed from ``seeds[row // seed_div]`` and ``positions[row]``."""
    lf = logits.float()
    t = temperature.float()[:, None]
    if uniform is None:
        if seeds is None or positions is None:
            return lf.argmax(-1).to(torch.int32)
        keys = row_keys(seeds.repeat_interleave(seed_div), positions)
        uniform = uniform_from_keys(keys, lf.shape[-1])
    noisy = torch.where(t > 0, lf / t.clamp_min(1e-6) + gumbel(uniform), lf)
    return noisy.argmax(-1).to(torch.int32)


@triton.jit
def _mul32(x, LO: tl.constexpr, HI: tl.constexpr):
    # (x * c) mod 2^32 with c = HI << 16 | LO, in int64 without overflow (kernels/noise.py).
    return (x * LO + (((x * HI) & 0xFFFF) << 16)) & 0xFFFFFFFF


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, _M1_LO, _M1_HI)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2_LO, _M2_HI)
    return x ^ (x >> 16)


@triton.jit
def _sample_stage1(
    logits_ptr,
    temp_ptr,
    u_ptr,
    seed_ptr,
    pos_ptr,
    val_ptr,
    idx_ptr,
    V,
    stride_l,
    stride_u,
    SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,
    HASHED: tl.constexpr,
    SEED_DIV: tl.constexpr,
):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    t = tl.load(temp_ptr + row).to(tl.float32)
    offs = sp * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if t > 0:
        if HASHED:
            seed = tl.load(seed_ptr + row // SEED_DIV).to(tl.int64)
            pos = tl.load(pos_ptr + row).to(tl.int64)
            lo = seed & 0xFFFFFFFF
            hi = (seed >> 32) & 0xFFFFFFFF
            k = _mix32(lo ^ _mix32((hi + _GOLDEN) & 0xFFFFFFFF))
            key = _mix32((k + _mul32(pos & 0xFFFFFFFF, _G_LO, _G_HI)) & 0xFFFFFFFF)
            bits = _mix32((key + _mul32(offs.to(tl.int64), _G_LO, _G_HI)) & 0xFFFFFFFF)
            u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        else:
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
    logits: torch.Tensor,
    temperature: torch.Tensor,
    uniform: torch.Tensor | None = None,
    block: int = 4096,
    *,
    seeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    seed_div: int = 1,
) -> torch.Tensor:
    """logits [B, V]; temperature [B] (0 = greedy); noise from uniform [B, V] in (0, 1), or hashed
    from seeds [B / seed_div] int64 (row b uses seeds[b // seed_div]) and positions [B] int64; with
    neither, every row is greedy."""
    rows, vocab = logits.shape
    splits = triton.cdiv(vocab, block)
    vals = torch.empty((rows, splits), dtype=torch.float32, device=logits.device)
    idxs = torch.empty((rows, splits), dtype=torch.int32, device=logits.device)
    out = torch.empty((rows,), dtype=torch.int32, device=logits.device)
    hashed = uniform is None and seeds is not None and positions is not None
    if uniform is None and not hashed:
        temperature = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    u = uniform if uniform is not None else logits
    _sample_stage1[(rows, splits)](
        logits,
        temperature,
        u,
        seeds if hashed else temperature,
        positions if hashed else temperature,
        vals,
        idxs,
        vocab,
        logits.stride(0),
        u.stride(0),
        SPLITS=splits,
        BLOCK=block,
        HASHED=hashed,
        SEED_DIV=seed_div,
        num_warps=8,
    )
    _sample_stage2[(rows,)](vals, idxs, out, SPLITS=splits, SPAD=triton.next_power_of_2(splits), num_warps=4)
    return out
