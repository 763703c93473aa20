"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (the CI path for kernel tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def mma(a, b, INTERPRET: tl.constexpr):
    """tl.dot that works under the interpreter too.

    Triton 3.6's interpreter computes bf16 x bf16 tl.dot from the raw bit patterns (results near
    1e10 on unit-normal data), so there the operands are upcast first; compiled code keeps the
    bf16 tensor-core path with fp32 accumulation. (The same interpreter also rounds fp32 -> bf16
    toward zero where the GPU rounds to nearest, so interpreter results carry a small downward
    bias: the CPU tests' bf16 tolerances allow for it.)
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)
