"""Lightning attention's per-head decay rates: plain math (no Triton), shared by the kernels'
tests and benchmarks and by the model (``model.lightning`` imports them from here), so the two
cannot drift and the kernels never import the model."""

from __future__ import annotations

import math

import torch


def alibi_base_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes ``2^(-8(h+1)/H)``; non-power-of-two H interleaves the next power (as ALiBi)."""

    def pow2(n: int) -> list[float]:
        return [2 ** (-(2 ** -(math.log2(n) - 3)) * (i + 1)) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return pow2(num_heads)
    p = 2 ** math.floor(math.log2(num_heads))
    return pow2(p) + pow2(2 * p)[::2][: num_heads - p]


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Decay rates ``s_h`` [H] (float32) of layer ``layer_idx``: ALiBi base times ``1 - l/(L-1) + 1e-5``.

    The layer factor is the vLLM / SGLang-CUDA / mlx-lm one (absolute layer index l); the HF remote
    code and sglang-jax use ``l-1`` instead (see docs/model.md). A single layer divides by 1.
    """
    factor = 1 - layer_idx / max(1, num_layers - 1) + 1e-5
    return torch.tensor(alibi_base_slopes(num_heads), dtype=torch.float32) * factor
