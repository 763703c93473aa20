"""Sparse MoE: fp32 sigmoid router with selection-only expert bias, group-limited top-k,
renormalisation and routed scaling, routed SwiGLU experts plus an unscaled shared expert.

TP splits every expert on its intermediate dim (vLLM/SGLang FusedMoE); ``expert_parallel`` instead
gives each rank ``num_experts/tp`` whole experts. Either way each rank produces a partial sum and
routed + shared partials are summed with one all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ling_runtime.config import LingConfig
from ling_runtime.distributed.parallel import TPGroup
from ling_runtime.loader import Piece, shard, whole
from ling_runtime.model.linear import make_param
from ling_runtime.model.mlp import DenseMLP


def moe_route_reference(
    router_logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64) from router logits [T, E].

    Scores ``p = sigmoid(logits)`` (fp32). Selection uses ``p + bias``: each group is scored by the
    sum of its top-2, only the best ``topk_group`` groups stay, then the top ``top_k`` experts.
    Weights use the unbiased ``p``, renormalised to sum 1 (when ``renormalize`` and k > 1), times
    ``routed_scaling_factor``.
    """
    scores = torch.sigmoid(router_logits.float())
    choice = scores + expert_bias.float() if expert_bias is not None else scores
    t, e = choice.shape
    if topk_group < n_group:
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        # -inf, not 0: the bias can make a kept score negative.
        choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize and top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def experts_reference(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    first_expert: int = 0,
) -> torch.Tensor:
    """``Σ_k weights[t,k] · down_e(silu(gate_e x) ⊙ up_e x)`` over the experts held here.

    w13 [E_local, 2I, H] (gate rows then up rows), w2 [E_local, H, I]; ``first_expert`` is the global
    id of local expert 0 (expert parallelism); experts not held here contribute nothing.
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for local in range(w13.shape[0]):
        tok, slot = (ids == first_expert + local).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], w13[local]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[local]).float()
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


class SparseMoE(nn.Module):
    def __init__(
        self,
        cfg: LingConfig,
        prefix: str,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        expert_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        h, n, inter = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        # Router weight and bias stay float32 whatever the model dtype (the fp32 router).
        self.gate = nn.Module()
        self.gate.weight = make_param((n, h), torch.float32, device, whole(f"{prefix}.gate.weight", (n, h)))
        self.gate.expert_bias = (
            make_param((n,), torch.float32, device, whole(f"{prefix}.gate.expert_bias", (n,)))
            if cfg.moe_router_enable_expert_bias
            else None
        )
        if expert_parallel:
            n_local, local_inter = n // tp.size, inter
            self.first_expert = tp.rank * n_local
        else:
            n_local, local_inter = n, inter // tp.size
            self.first_expert = 0
        w13_pieces: list[Piece] = []
        w2_pieces: list[Piece] = []
        for local in range(n_local):
            e = self.first_expert + local
            ep = f"{prefix}.experts.{e}"
            for j, name in enumerate(("gate_proj", "up_proj")):
                if expert_parallel:
                    src = (slice(0, inter), slice(0, h))
                else:
                    src = shard(f"{ep}.{name}.weight", (inter, h), 0, tp.rank, tp.size).src
                w13_pieces.append(
                    Piece(
                        f"{ep}.{name}.weight",
                        (inter, h),
                        src,
                        (slice(local, local + 1), slice(j * local_inter, (j + 1) * local_inter), slice(0, h)),
                    )
                )
            src2 = (
                (slice(0, h), slice(0, inter))
                if expert_parallel
                else shard(f"{ep}.down_proj.weight", (h, inter), 1, tp.rank, tp.size).src
            )
            w2_pieces.append(
                Piece(
                    f"{ep}.down_proj.weight",
                    (h, inter),
                    src2,
                    (slice(local, local + 1), slice(0, h), slice(0, local_inter)),
                )
            )
        self.w13 = make_param((n_local, 2 * local_inter, h), dtype, device, w13_pieces)
        self.w2 = make_param((n_local, h, local_inter), dtype, device, w2_pieces)
        self.shared_experts = (
            DenseMLP(
                f"{prefix}.shared_experts",
                h,
                cfg.shared_expert_intermediate_size,
                tp,
                dtype,
                device,
                reduce=False,
            )
            if cfg.num_shared_experts > 0
            else None
        )
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self._zero_bias = torch.zeros(n, dtype=torch.float32, device=device)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.gate.weight)
        c = self.cfg
        return moe_route_reference(
            logits,
            self.gate.expert_bias,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.norm_topk_prob,
            c.routed_scaling_factor,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and self._kernel_ok(x):
            return self._forward_kernels(x)
        weights, ids = self.route(x)
        out = experts_reference(x, weights, ids, self.w13, self.w2, self.first_expert)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return self.tp.all_reduce(out).to(x.dtype)

    # ---- Triton path ---------------------------------------------------------------------------------
    # The grouped kernel compacts each expert's token rows in registers (a decode kernel): above this
    # many tokens (prefill chunks) the plain path is used.
    MAX_KERNEL_TOKENS = 128

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        c = self.cfg
        return (
            x.shape[0] <= self.MAX_KERNEL_TOKENS
            and self.first_expert == 0
            and self.w13.shape[0] == c.num_experts  # no expert parallelism (ids are global)
            and c.norm_topk_prob  # the fused router always renormalises
            and c.num_experts % c.n_group == 0
            and self._stackable()
        )

    def _stackable(self) -> bool:
        """The shared expert joins the grouped launch as expert E only if its shard has the routed
        experts' shape (Ling: shared intermediate == moe intermediate)."""
        if self.shared_experts is None:
            return True
        return (
            self.shared_experts.gate_up_proj.weight.shape == self.w13.shape[1:]
            and self.shared_experts.down_proj.weight.shape == self.w2.shape[1:]
        )

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E(+1), 2I, H], w2 [E(+1), H, I]) with the shared expert last, as ``fused_moe`` wants.

        Built once: the parameters are re-pointed at views of the stacked storage, so memory is not
        doubled and a later in-place weight load (``copy_``) still lands in what the kernel reads.
        """
        if self._stacked is not None and self._stacked[0].data_ptr() == self.w13.data_ptr():
            return self._stacked
        if self.shared_experts is None:
            self._stacked = (self.w13.data, self.w2.data)
            return self._stacked
        gu, down = self.shared_experts.gate_up_proj.weight, self.shared_experts.down_proj.weight
        w13 = torch.cat([self.w13.data, gu.data[None]], dim=0)
        w2 = torch.cat([self.w2.data, down.data[None]], dim=0)
        e = self.w13.shape[0]
        self.w13.data, self.w2.data = w13[:e], w2[:e]
        gu.data, down.data = w13[e], w2[e]
        self._stacked = (w13, w2)
        return self._stacked

    def _forward_kernels(self, x: torch.Tensor) -> torch.Tensor:
        from ling_runtime.kernels import fused_moe, moe_route

        c = self.cfg
        w13, w2 = self.stacked_weights()
        logits = F.linear(x.float(), self.gate.weight)
        bias = self.gate.expert_bias if self.gate.expert_bias is not None else self._zero_bias
        ids, weights = moe_route(
            logits,
            bias,
            c.num_experts_per_tok,
            c.n_group,
            c.topk_group,
            c.routed_scaling_factor,
            append_shared=self.shared_experts is not None,
        )
        inter, hid = w2.shape[2], w2.shape[1]
        out = fused_moe(
            x.contiguous(),
            w13,
            w2,
            ids,
            weights,
            block_n=(min(64, inter), min(64, hid)),
            block_k=(min(128, hid), min(128, inter)),
        )
        return self.tp.all_reduce(out.float()).to(x.dtype) if self.tp.size > 1 else out
