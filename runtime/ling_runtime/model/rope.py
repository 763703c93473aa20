"""Rotary position embeddings: NeoX (rotate-half) for Lightning layers, interleaved for MLA, and YaRN.

YaRN follows DeepSeek-V3 / mlx-lm ``YarnRoPE``: per-frequency blend of interpolated and extrapolated
inverse frequencies over the correction range of ``beta_fast``/``beta_slow``, and cos/sin scaled by
``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``. Both Ling layer kinds read the same
``rope_scaling`` (as mlx-lm, vLLM and SGLang do).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from ling_runtime.config import yarn_mscale


def rope_kind(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("type") or scaling.get("rope_type", "default"))


def rope_inv_freq(
    rotary_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim/2] float64, cos/sin magnitude scale)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_extra = 1.0 / theta**exponents
    if rope_kind(scaling) == "default":
        return inv_extra, 1.0
    assert scaling is not None
    factor = float(scaling["factor"])
    orig = int(scaling.get("original_max_position_embeddings", max_position_embeddings))
    beta_fast = float(scaling.get("beta_fast", 32))
    beta_slow = float(scaling.get("beta_slow", 1))

    def correction_dim(rotations: float) -> float:
        return (rotary_dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp
    inv = inv_extra / factor * (1 - extrapolate) + inv_extra * extrapolate
    mscale = yarn_mscale(factor, float(scaling.get("mscale", 1))) / yarn_mscale(
        factor, float(scaling.get("mscale_all_dim", 0))
    )
    return inv, mscale


# One forward step's cos/sin (and MLA's complex rotations), shared by every layer with the same
# frequencies: ~8 small launches per layer otherwise, i.e. ~250 graph nodes per full-model step.
_STEP = threading.local()


@contextlib.contextmanager
def rope_step_memo() -> Iterator[None]:
    """Within this block ``rope_cos_sin(..., freq_key=k)`` computes each (positions, k) once. Only
    for one forward step: ``positions`` may be rewritten in place between steps (graph inputs)."""
    prev = getattr(_STEP, "memo", None)
    _STEP.memo = {}
    try:
        yield
    finally:
        _STEP.memo = prev


def step_cached(key: Hashable, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per ``rope_step_memo`` block for ``key`` (every call outside one).
    For values that depend only on the step's batch (e.g. MLA's cache write indices); the key must
    name the tensors it reads (their ``id``s live as long as the batch, i.e. the whole step)."""
    memo = getattr(_STEP, "memo", None)
    if memo is None:
        return make()
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _memo_key(positions: torch.Tensor, freq_key: Hashable | None, what: str) -> tuple | None:
    if freq_key is None or getattr(_STEP, "memo", None) is None:
        return None
    return (what, id(positions), positions.data_ptr(), tuple(positions.shape), freq_key)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float, freq_key: Hashable | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of ``positions[:, None] * inv_freq`` ([T, rotary_dim/2], float32), times ``mscale``.

    ``freq_key`` names ``(inv_freq, mscale)`` (equal keys, equal frequencies): inside
    ``rope_step_memo`` the result is then computed once per step and shared."""
    key = _memo_key(positions, freq_key, "cos_sin")
    if key is not None and key in _STEP.memo:
        return _STEP.memo[key]
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    cos, sin = angles.cos(), angles.sin()
    if mscale != 1.0:  # x * 1.0 is exact: skip the two launches
        cos, sin = cos * mscale, sin * mscale
    out = cos.float(), sin.float()
    if key is not None:
        _STEP.memo[key] = out
    return out


def rope_cis(
    positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float, freq_key: Hashable | None = None
) -> torch.Tensor:
    """``cos + i sin`` [T, rotary_dim/2] complex64 (``rope_cos_sin``'s values), memoised likewise."""
    key = _memo_key(positions, freq_key, "cis")
    if key is not None and key in _STEP.memo:
        return _STEP.memo[key]
    cos, sin = rope_cos_sin(positions, inv_freq, mscale, freq_key)
    out = torch.complex(cos, sin)
    if key is not None:
        _STEP.memo[key] = out
    return out


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ``2*cos.shape[-1]`` dims of ``x`` [T, heads, d]; the rest pass."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half].float(), x[..., 2 * half :]
    x1, x2 = rot[..., :half], rot[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([out, rest], dim=-1)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J (interleaved pairs) RoPE on all dims of ``x`` [T, heads, rotary_dim]."""
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    return out.to(x.dtype)


def apply_rope_interleaved_cis(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """``apply_rope_interleaved`` as one complex multiply (pairs as complex numbers, ``cis`` from
    ``rope_cis``): three launches instead of nine, the same products up to fp32 rounding."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[:, None, :]).flatten(-2).to(x.dtype)
