"""SwiGLU MLP (dense first layers and the shared expert): gate+up column-parallel, down row-parallel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ling_runtime.model.linear import ColumnParallelLinear, RowParallelLinear
from ling_runtime.model.parallel import TPGroup


def swiglu_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate x) * up x)`` with ``w_gate_up = [gate; up]`` stacked on the output dim."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


class DenseMLP(nn.Module):
    def __init__(
        self,
        prefix: str,
        hidden: int,
        intermediate: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            [(f"{prefix}.gate_proj.weight", intermediate), (f"{prefix}.up_proj.weight", intermediate)],
            hidden,
            tp,
            dtype,
            device,
        )
        self.down_proj = RowParallelLinear(
            f"{prefix}.down_proj.weight", intermediate, hidden, tp, dtype, device, reduce=reduce
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
