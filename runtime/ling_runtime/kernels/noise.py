"""Counter-based sampling noise: plain torch (no Triton), shared by the sampling kernel's reference
(``kernels/sampling.py``) and the runner's sampler on every device, so the two cannot drift.

A row's uniform draw for vocabulary entry ``i`` is a hash of (request seed, position, i): no generator
state, so the same request gives the same token at the same position wherever it is sampled (a CUDA
graph, an eager step, a speculative verify, any tensor-parallel rank), and a graph needs no RNG offset.
Values are uint32 held in int64; every product is split into 16-bit halves so nothing overflows
int64 (the Triton kernel does the same arithmetic and gets the same bits).
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # 2^32 / phi: spreads consecutive counters over the hash's input
# lowbias32's multipliers (Chris Wellons' hash-prospector), a well-mixing bijection on uint32.
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
INV_2_24 = 1.0 / 16777216.0


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for uint32 values x in int64, without an int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = mul32(x, MUL1)
    x = x ^ (x >> 15)
    x = mul32(x, MUL2)
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One uint32 key (in int64) per row from its request seed (int64) and the position of the token
    the row's logits were computed at (int64)."""
    seeds = seeds.to(torch.int64)
    lo, hi = seeds & M32, (seeds >> 32) & M32
    k = mix32(lo ^ mix32((hi + GOLDEN) & M32))
    return mix32((k + mul32(positions.to(torch.int64) & M32, GOLDEN)) & M32)


def uniform_from_keys(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 uniform in (0, 1): entry i of row b hashes (keys[b], i)."""
    idx = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    bits = mix32((keys[:, None] + mul32(idx, GOLDEN)[None, :]) & M32)
    return ((bits >> 8).to(torch.float32) + 0.5) * INV_2_24


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniform draws (argmax of logits / T + this = a draw from softmax)."""
    return -torch.log(-torch.log(uniform.float().clamp(1e-20, 1.0 - 1e-7)))
