"""The MTP (NEXTN) draft layer, checkpoint index ``num_hidden_layers``.

``z = eh_proj([enorm(embed(t_{i+1})) ‖ hnorm(h_i)])``, one MLA + MoE decoder block, ``final_layernorm``;
logits come from the main model's shared ``lm_head``. Its MLA has its own latent-KV layer in the cache
(``LingCache.mtp_mla_index``).
"""

from __future__ import annotations

import torch
from torch import nn

from ling_runtime.config import LingConfig
from ling_runtime.model.batch import ForwardBatch
from ling_runtime.model.cache import LingCache
from ling_runtime.model.linear import ReplicatedLinear
from ling_runtime.model.mla import MLAttention
from ling_runtime.model.moe import SparseMoE, mlp_add_rmsnorm
from ling_runtime.model.norms import RMSNorm
from ling_runtime.model.parallel import TPGroup


class MTPLayer(nn.Module):
    def __init__(
        self,
        cfg: LingConfig,
        mla_index: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        expert_parallel: bool = False,
    ) -> None:
        super().__init__()
        p = f"model.layers.{cfg.num_hidden_layers}"
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(f"{p}.enorm.weight", h, eps, dtype, device)
        self.hnorm = RMSNorm(f"{p}.hnorm.weight", h, eps, dtype, device)
        self.eh_proj = ReplicatedLinear(f"{p}.eh_proj.weight", 2 * h, h, dtype, device)
        self.input_layernorm = RMSNorm(f"{p}.input_layernorm.weight", h, eps, dtype, device)
        self.attention = MLAttention(cfg, mla_index, f"{p}.attention", tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(f"{p}.post_attention_layernorm.weight", h, eps, dtype, device)
        self.mlp = SparseMoE(cfg, f"{p}.mlp", tp, dtype, device, expert_parallel)
        self.final_layernorm = RMSNorm(f"{p}.final_layernorm.weight", h, eps, dtype, device)

    def forward(
        self, embeds: torch.Tensor, prev_hidden: torch.Tensor, batch: ForwardBatch, cache: LingCache
    ) -> torch.Tensor:
        z = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden.to(embeds.dtype))], dim=-1))
        z = z + self.attention(self.input_layernorm(z), batch, cache)
        z = z + self.mlp(self.post_attention_layernorm(z))
        return self.final_layernorm(z)

    def forward_fused_norms(
        self, embeds: torch.Tensor, prev_hidden: torch.Tensor, batch: ForwardBatch, cache: LingCache
    ) -> torch.Tensor:
        """``forward`` on the Triton path: each residual add fused into the next norm (the MoE's
        partials go straight into ``final_layernorm``), as the main model's layers do."""
        from ling_runtime.kernels import add_rmsnorm

        z = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(prev_hidden.to(embeds.dtype))], dim=-1))
        residual = z.contiguous()
        a = self.attention(self.input_layernorm(residual), batch, cache)
        ln2 = self.post_attention_layernorm
        y, residual = add_rmsnorm(a.contiguous(), residual, ln2.weight, ln2.eps)
        y, _ = mlp_add_rmsnorm(self.mlp, y, residual, self.final_layernorm)
        return y
