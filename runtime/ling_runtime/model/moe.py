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
from ling_runtime.loader import Piece, shard, whole
from ling_runtime.model.linear import FP8, dequantize, make_param, make_weight
from ling_runtime.model.mlp import DenseMLP
from ling_runtime.model.parallel import TPGroup


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
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``Σ_k weights[t,k] · down_e(silu(gate_e x) ⊙ up_e x)`` over the experts held here.

    w13 [E_local, 2I, H] (gate rows then up rows), w2 [E_local, H, I]; ``first_expert`` is the global
    id of local expert 0 (expert parallelism); experts not held here contribute nothing. FP8 experts
    pass their block scales (``w13_scale [E, 2I/bn, H/bk]``, ``w2_scale``) and ``block``; only the
    experts some token chose are dequantized (all 256 at once would be gigabytes of fp32).
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for local in range(w13.shape[0]):
        tok, slot = (ids == first_expert + local).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        a, b = w13[local], w2[local]
        if a.dtype == FP8:
            assert w13_scale is not None and w2_scale is not None and block is not None
            a = dequantize(a, w13_scale[local], block, x.dtype)
            b = dequantize(b, w2_scale[local], block, x.dtype)
        gate, up = F.linear(x[tok], a).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, b).float()
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


def _expert_pieces(
    prefix: str, h: int, inter: int, tp: TPGroup, experts: range, expert_parallel: bool
) -> tuple[list[Piece], list[Piece]]:
    """Checkpoint pieces of the stacked w13 [E_local, 2I_local, H] (gate rows, then up rows) and
    w2 [E_local, H, I_local] for ``experts``: whole experts under expert parallelism, else every
    expert's I dimension sharded over the TP ranks."""
    local_inter = inter if expert_parallel else inter // tp.size
    w13_pieces: list[Piece] = []
    w2_pieces: list[Piece] = []
    for local, e in enumerate(experts):
        ep = f"{prefix}.experts.{e}"
        row = slice(local, local + 1)
        for j, name in enumerate(("gate_proj", "up_proj")):
            if expert_parallel:
                src = (slice(0, inter), slice(0, h))
            else:
                src = shard(f"{ep}.{name}.weight", (inter, h), 0, tp.rank, tp.size).src
            dst = (row, slice(j * local_inter, (j + 1) * local_inter), slice(0, h))
            w13_pieces.append(Piece(f"{ep}.{name}.weight", (inter, h), src, dst))
        if expert_parallel:
            src2 = (slice(0, h), slice(0, inter))
        else:
            src2 = shard(f"{ep}.down_proj.weight", (h, inter), 1, tp.rank, tp.size).src
        w2_pieces.append(
            Piece(f"{ep}.down_proj.weight", (h, inter), src2, (row, slice(0, h), slice(0, local_inter)))
        )
    return w13_pieces, w2_pieces


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
        w13_pieces, w2_pieces = _expert_pieces(
            prefix, h, inter, tp, range(self.first_expert, self.first_expert + n_local), expert_parallel
        )
        make_weight(self, (n_local, 2 * local_inter, h), dtype, device, w13_pieces, name="w13")
        make_weight(self, (n_local, h, local_inter), dtype, device, w2_pieces, name="w2")
        self.fp8_block: tuple[int, int] | None = getattr(self.w13, "fp8_block", None)
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
        self._stacked: tuple[torch.Tensor, ...] | None = None
        self._zero_bias = torch.zeros(n, dtype=torch.float32, device=device)
        if self._stackable():
            # Stack the shared expert now, while the weights are zeros: the kernel's [E+1] layout
            # then exists from the start and a full-size model never holds two copies of a layer.
            self.stacked_weights()

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

    def forward(self, x: torch.Tensor, partials: bool = False) -> torch.Tensor:
        """[T, H] in x's dtype; with ``partials`` the Triton decode path may instead return its fp32
        per-(token, slot) outputs [T, K+1, H] un-summed (see ``_forward_kernels``): callers check
        ``dim()`` and feed them to ``norms.add_rmsnorm_partials``."""
        if self.use_kernels and self._kernel_ok(x):
            return self._forward_kernels(x, partials)
        weights, ids = self.route(x)
        out = experts_reference(
            x, weights, ids, self.w13, self.w2, self.first_expert,
            getattr(self, "w13_scale_inv", None), getattr(self, "w2_scale_inv", None), self.fp8_block,
        )  # fmt: skip
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return self.tp.all_reduce(out).to(x.dtype)

    # ---- Triton path ---------------------------------------------------------------------------------
    def _kernel_ok(self, x: torch.Tensor) -> bool:
        # Any token count: fused_moe hands prefill-sized batches to its grouped GEMM itself.
        c = self.cfg
        return (
            self.first_expert == 0
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

    def stacked_weights(self) -> tuple[torch.Tensor, ...]:
        """(w13 [E(+1), 2I, H], w2 [E(+1), H, I]) with the shared expert last, as ``fused_moe`` wants;
        FP8 experts add their scales: (w13, w2, w13_scale, w2_scale).

        Built once: the parameters are re-pointed at views of the stacked storage, so memory is not
        doubled and a later in-place weight load (``copy_``) still lands in what the kernel reads.
        """
        fp8 = self.fp8_block is not None
        if self._stacked is not None and self._stacked[0].data_ptr() == self.w13.data_ptr():
            return self._stacked
        names = ["w13", "w2"] + (["w13_scale_inv", "w2_scale_inv"] if fp8 else [])
        own = [getattr(self, name) for name in names]
        if self.shared_experts is None:
            self._stacked = tuple(p.data for p in own)
            return self._stacked
        sh = self.shared_experts
        shared = [sh.gate_up_proj.weight, sh.down_proj.weight]
        if fp8:
            shared += [sh.gate_up_proj.weight_scale_inv, sh.down_proj.weight_scale_inv]
        e = self.w13.shape[0]
        stacked = []
        for mine, theirs in zip(own, shared, strict=True):
            # empty + copy_ rather than cat: plain copies are what every float8 build supports.
            full = torch.empty((e + 1, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
            full[:e].copy_(mine.data)
            full[e].copy_(theirs.data)
            mine.data, theirs.data = full[:e], full[e]
            stacked.append(full)
        self._stacked = tuple(stacked)
        return self._stacked

    def _forward_kernels(self, x: torch.Tensor, partials: bool = False) -> torch.Tensor:
        # The kernels are looked up on the package at each call (tests wrap them there to count calls).
        from ling_runtime.kernels import fused_moe, moe_route
        from ling_runtime.kernels.moe import moe_config, router_logits

        c = self.cfg
        w13, w2, *scales = self.stacked_weights()
        # The gate GEMV reads x in its own dtype (no fp32 copy of x) with an expert-split grid.
        logits = router_logits(x, self.gate.weight)
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
        inter = w2.shape[2]
        # The FP8 kernels need gate and up rows in separate 128-blocks (I/tp a multiple of 128).
        fp8 = bool(scales) and self.fp8_block == (128, 128) and inter % 128 == 0
        cfg = moe_config(x.shape[0], inter, x.shape[1], 128 if fp8 else 0)
        # Un-reduced partials only from the decode kernels (the grouped prefill GEMM reduces itself)
        # and only at TP 1 (TP all-reduces the summed output first).
        raw = partials and self.tp.size == 1 and cfg.path == "decode"
        if fp8:
            out = fused_moe(x.contiguous(), w13, w2, ids, weights, *scales, config=cfg, reduce=not raw)
        elif scales:
            # No FP8 grouped kernel for this block (or yet): the bf16 kernel on dequantized experts.
            assert self.fp8_block is not None
            w13d = dequantize(w13, scales[0], self.fp8_block, x.dtype)
            w2d = dequantize(w2, scales[1], self.fp8_block, x.dtype)
            out = fused_moe(x.contiguous(), w13d, w2d, ids, weights, config=cfg, reduce=not raw)
        else:
            out = fused_moe(x.contiguous(), w13, w2, ids, weights, config=cfg, reduce=not raw)
        return self.tp.all_reduce(out.float()).to(x.dtype) if self.tp.size > 1 else out


def mlp_add_rmsnorm(
    mlp: nn.Module, y: torch.Tensor, residual: torch.Tensor, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm(mlp(y), residual)``; a MoE hands over its un-reduced partials where it can, so
    their sum, the bf16 cast and the add + norm are one launch instead of three."""
    from ling_runtime.kernels import add_rmsnorm
    from ling_runtime.kernels.norms import add_rmsnorm_partials

    m = mlp(y, partials=True) if isinstance(mlp, SparseMoE) else mlp(y)
    if m.dim() == 3:
        return add_rmsnorm_partials(m, residual, norm.weight, norm.eps)
    return add_rmsnorm(m.contiguous(), residual, norm.weight, norm.eps)
