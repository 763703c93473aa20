"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def interpret_mode() -> bool:
    """True when Triton runs its CPU interpreter (the CI path for kernel tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Decided once, at import, exactly as ``triton.jit`` decides it when it decorates the kernels below
# this module: a kernel is either interpreted or compiled for its whole life.
INTERPRET: tl.constexpr = tl.constexpr(interpret_mode())


def _interpreter_accepts_loaded_loop_bounds() -> None:
    """Let the interpreter run ``for i in range(start, end, STEP)`` over loaded or argument bounds.

    Triton 3.6's interpreter turns a loop bound into a Python int with ``int(ndarray)``, which
    numpy >= 2.4 refuses for the one-element arrays its scalars are (``.item()`` takes both). Without
    this every kernel needed a ``while`` twin of each such loop for the CPU tests, beside the
    ``for`` the compiler pipelines; with it the kernels have one loop, compiled unchanged.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_ling_loop_bounds", False):
        return

    def patch(tensor: object, scope: interpreter._LangPatchScope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch._ling_loop_bounds = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patch


if INTERPRET:
    _interpreter_accepts_loaded_loop_bounds()


@triton.jit
def mma(a, b):
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
