"""FP8 block-scaled linear against dequantise-then-matmul (interpreter, small sizes)."""

from __future__ import annotations

import torch
from ling_runtime.kernels.fp8 import fp8_linear, fp8_linear_ref, quantize_fp8_blockwise

from tests.kernels.util import relerr


def test_fp8_linear_block_scales(gen: torch.Generator) -> None:
    # Blocks with very different magnitudes: a single per-tensor scale would lose the small ones.
    w = torch.randn(256, 384, generator=gen) * torch.tensor(
        [[1.0, 1e-3, 30.0], [0.1, 5.0, 1e-2]]
    ).repeat_interleave(128, 0).repeat_interleave(128, 1)
    wq, scale = quantize_fp8_blockwise(w)
    assert relerr(fp8_linear_ref(torch.eye(384), wq, scale).T, w) < 0.05  # quantisation itself
    x = torch.randn(5, 384, generator=gen).bfloat16()
    y = fp8_linear(x, wq, scale, block_m=16, block_n=64)
    assert relerr(y, fp8_linear_ref(x, wq, scale)) < 1e-2
