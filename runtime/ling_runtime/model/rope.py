"""Rotary position embeddings: NeoX (rotate-half) for Lightning layers, interleaved for MLA, and YaRN.

YaRN follows DeepSeek-V3 / mlx-lm ``YarnRoPE``: per-frequency blend of interpolated and extrapolated
inverse frequencies over the correction range of ``beta_fast``/``beta_slow``, and cos/sin scaled by
``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``. Both Ling layer kinds read the same
``rope_scaling`` (as mlx-lm, vLLM and SGLang do).
"""

from __future__ import annotations

import math
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


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of ``positions[:, None] * inv_freq`` ([T, rotary_dim/2], float32), times ``mscale``."""
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()


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
