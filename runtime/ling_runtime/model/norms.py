"""RMSNorm variants used by Ling-2.6 (computed in float32, cast back to the input dtype)."""

from __future__ import annotations

import torch
from torch import nn

from ling_runtime.loader import Piece, whole
from ling_runtime.model.linear import make_param


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim, in float32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def group_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """RMSNorm of each of ``groups`` equal channel groups of the last dim separately, then ``* weight``."""
    shape = x.shape
    xg = x.float().reshape(*shape[:-1], groups, shape[-1] // groups)
    y = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return (y.reshape(shape) * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """Replicated RMSNorm over the last dim."""

    def __init__(
        self, key: str, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = make_param((dim,), dtype, device, whole(key, (dim,)))
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and x.dim() == 2 and x.stride(-1) == 1:
            from ling_runtime.kernels.rms_norm import rms_norm  # triton only once kernels are on

            return rms_norm(x, self.weight, self.eps)  # one launch instead of ~9
        return rms_norm_reference(x, self.weight, self.eps)


class GroupRMSNorm(nn.Module):
    """The Lightning output norm: ``group_norm_size`` groups over ``H*D`` channels.

    Under TP a rank owns ``H*D/tp`` channels = ``group_norm_size/tp`` whole groups, so it normalises
    locally with its slice of the weight and needs no communication (hence ``tp | group_norm_size``).
    """

    def __init__(
        self,
        key: str,
        full_dim: int,
        groups: int,
        eps: float,
        rank: int,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.groups = groups // size
        local = full_dim // size
        piece = Piece(key, (full_dim,), (slice(rank * local, (rank + 1) * local),), (slice(0, local),))
        self.weight = make_param((local,), dtype, device, [piece])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_rms_norm_reference(x, self.weight, self.groups, self.eps)
