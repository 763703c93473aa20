"""Multi-head latent attention (MLA) layers: math references + the TP-sharded layer module.

Per token the cache keeps ``[c_kv ‖ k_pe]`` (kv_lora_rank + rope dims), shared by all heads and
replicated on every TP rank. Prefill/extend expands the latent to per-head keys and values
(``mla_attention_reference``); decode uses the absorbed form (``mla_attention_absorbed_reference``):
queries are mapped into the latent space with ``W_UK`` and outputs out of it with ``W_UV``.
"""

from __future__ import annotations

import torch
from torch import nn

from ling_runtime.config import LingConfig, yarn_mscale
from ling_runtime.model.batch import ForwardBatch
from ling_runtime.model.cache import LingCache
from ling_runtime.model.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from ling_runtime.model.norms import RMSNorm
from ling_runtime.model.parallel import TPGroup
from ling_runtime.model.rope import (
    apply_rope_interleaved,
    apply_rope_interleaved_cis,
    rope_cis,
    rope_cos_sin,
    rope_inv_freq,
    rope_kind,
    step_cached,
)


def _causal_bias(q_positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    kv_pos = torch.arange(kv_len, device=q_positions.device)
    allowed = kv_pos[None, :] <= q_positions[:, None]
    return torch.where(allowed, 0.0, float("-inf"))  # [Tq, Tk]


def mla_attention_reference(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    scale: float,
    q_positions: torch.Tensor,
) -> torch.Tensor:
    """Expanded (prefill) MLA of one sequence.

    q_nope [Tq, h, nope], q_pe [Tq, h, rope] (rotated), c_kv [Tk, r] (normed latent), k_pe [Tk, rope]
    (rotated), w_uk [h, nope, r], w_uv [h, v, r]; query i attends keys at positions <= q_positions[i].
    Returns [Tq, h, v] float32.
    """
    c = c_kv.float()
    k_nope = torch.einsum("kr,hnr->hkn", c, w_uk.float())  # [h, Tk, nope]
    v = torch.einsum("kr,hvr->hkv", c, w_uv.float())  # [h, Tk, v]
    scores = torch.einsum("qhn,hkn->hqk", q_nope.float(), k_nope) + torch.einsum(
        "qhp,kp->hqk", q_pe.float(), k_pe.float()
    )
    scores = scores * scale + _causal_bias(q_positions, c.shape[0])
    return torch.einsum("hqk,hkv->qhv", torch.softmax(scores, dim=-1), v)


def mla_attention_absorbed_reference(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    scale: float,
    q_positions: torch.Tensor,
) -> torch.Tensor:
    """Absorbed (decode) MLA, same contract as :func:`mla_attention_reference`: MQA over the
    576-wide latent key with ``q̃ = q_nope W_UK`` and ``o = (softmax · c_kv) W_UV^T``."""
    q_lat = torch.einsum("qhn,hnr->qhr", q_nope.float(), w_uk.float())
    scores = torch.einsum("qhr,kr->hqk", q_lat, c_kv.float()) + torch.einsum(
        "qhp,kp->hqk", q_pe.float(), k_pe.float()
    )
    scores = scores * scale + _causal_bias(q_positions, c_kv.shape[0])
    u = torch.einsum("hqk,kr->qhr", torch.softmax(scores, dim=-1), c_kv.float())
    return torch.einsum("qhr,hvr->qhv", u, w_uv.float())


def mla_decode_batched_reference(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latents: torch.Tensor,
    kv_lens: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode of B sequences (one query each) over padded latents.

    q_nope [B, h, nope], q_pe [B, h, rope], latents [B, L, r + rope] (``[c_kv ‖ k_pe]``, rows at or
    past ``kv_lens[b]`` ignored), w_uk [h, nope, r], w_uv [h, v, r]. Returns [B, h, v] float32.
    """
    r = w_uk.shape[-1]
    lat = latents.float()
    q_lat = torch.einsum("bhn,hnr->bhr", q_nope.float(), w_uk.float())
    scores = torch.einsum("bhr,blr->bhl", q_lat, lat[..., :r]) + torch.einsum(
        "bhp,blp->bhl", q_pe.float(), lat[..., r:]
    )
    valid = torch.arange(lat.shape[1], device=lat.device)[None, :] < kv_lens[:, None]
    scores = (scores * scale).masked_fill(~valid[:, None, :], float("-inf"))
    u = torch.einsum("bhl,blr->bhr", torch.softmax(scores, dim=-1), lat[..., :r])
    return torch.einsum("bhr,hvr->bhv", u, w_uv.float())


def mla_softmax_scale(cfg: LingConfig) -> float:
    """``1/sqrt(qk_head_dim)``, times ``mscale(factor, mscale_all_dim)^2`` under YaRN with mscale_all_dim."""
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rope_kind(rs) != "default" and rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs.get("factor", 1.0)), float(rs["mscale_all_dim"]))
        scale *= m * m
    return scale


class MLAttention(nn.Module):
    """MLA with optional q LoRA; q_b/q_proj/kv_b split by heads, q_a/kv_a replicated, dense row-parallel."""

    def __init__(
        self,
        cfg: LingConfig,
        mla_index: int,
        prefix: str,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.mla_index = mla_index
        h, nh = cfg.hidden_size, cfg.num_attention_heads
        self.local_heads = nh // tp.size
        self.nope, self.rope, self.vdim, self.rank = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        )
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear([(f"{prefix}.q_proj.weight", nh * qk)], h, tp, dtype, device)
        else:
            self.q_a_proj = ReplicatedLinear(f"{prefix}.q_a_proj.weight", h, cfg.q_lora_rank, dtype, device)
            self.q_a_layernorm = RMSNorm(
                f"{prefix}.q_a_layernorm.weight", cfg.q_lora_rank, cfg.rms_norm_eps, dtype, device
            )
            self.q_b_proj = ColumnParallelLinear(
                [(f"{prefix}.q_b_proj.weight", nh * qk)], cfg.q_lora_rank, tp, dtype, device
            )
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            f"{prefix}.kv_a_proj_with_mqa.weight", h, cfg.kv_cache_dim, dtype, device
        )
        self.kv_a_layernorm = RMSNorm(
            f"{prefix}.kv_a_layernorm.weight", cfg.kv_lora_rank, cfg.rms_norm_eps, dtype, device
        )
        self.kv_b_proj = ColumnParallelLinear(
            [(f"{prefix}.kv_b_proj.weight", nh * (self.nope + self.vdim))],
            cfg.kv_lora_rank,
            tp,
            dtype,
            device,
        )
        self.dense = RowParallelLinear(f"{prefix}.dense.weight", nh * self.vdim, h, tp, dtype, device)
        self.scale = mla_softmax_scale(cfg)
        inv_freq, mscale = rope_inv_freq(
            self.rope, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.rope_mscale = mscale
        # Names these frequencies for the per-step rotation memo (rope.rope_step_memo).
        self.rope_key = ("mla", self.rope, cfg.rope_theta, repr(cfg.rope_scaling),
                         cfg.max_position_embeddings)  # fmt: skip
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, nope, r], W_UV [h, v, r]) of this rank's heads, views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.local_heads, self.nope + self.vdim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LingCache) -> torch.Tensor:
        t = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.local_heads, self.nope + self.rope)
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope :]
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[:, : self.rank])
        if self.use_kernels:
            # Kernel path: one complex multiply per rotation, the rotations shared by the step's layers.
            cis = rope_cis(batch.positions, self.inv_freq, self.rope_mscale, self.rope_key)
            q_pe = apply_rope_interleaved_cis(q_pe, cis)
            k_pe = apply_rope_interleaved_cis(kv[:, None, self.rank :], cis)[:, 0]
        else:
            cos, sin = rope_cos_sin(batch.positions, self.inv_freq, self.rope_mscale)
            q_pe = apply_rope_interleaved(q_pe, cos, sin)
            k_pe = apply_rope_interleaved(kv[:, None, self.rank :], cos, sin)[:, 0]
        latent = torch.cat([c_kv, k_pe], dim=-1)
        w_uk, w_uv = self.absorbed_weights()
        if (batch.is_decode and self.use_kernels) or batch.graph_safe:
            # Graph-safe batches (decode, verify or MTP extend of T tokens per sequence) take the
            # absorbed path with per-token lengths from the device positions.
            out = self._decode_kernel(q_nope, q_pe, latent, w_uk, w_uv, batch, cache)
        elif batch.is_decode:
            out = self._decode(q_nope, q_pe, latent, w_uk, w_uv, batch, cache)
        elif self._prefill_kernel_fits(x):
            out = self._prefill_kernel(q_nope, q_pe, latent, batch, cache)
        else:
            out = torch.empty(t, self.local_heads, self.vdim, dtype=torch.float32, device=x.device)
            singles = batch.decode_rows()
            if len(singles) > 1:  # decode rows of a mixed batch: one batched step, not one each
                sub, idx = batch.select(singles)
                out[idx] = self._decode(q_nope[idx], q_pe[idx], latent[idx], w_uk, w_uv, sub, cache).float()
            skip = set(singles) if len(singles) > 1 else set()
            for b in range(batch.batch_size):
                if b in skip:
                    continue
                lo, hi = batch.offsets[b], batch.offsets[b + 1]
                pos = batch.positions[lo:hi]
                table = batch.block_tables[b]
                cache.write_latent(self.mla_index, table, pos, latent[lo:hi])
                cached = cache.read_latent(self.mla_index, table, batch.prefix_lens[b] + (hi - lo))
                r = self.rank
                out[lo:hi] = mla_attention_reference(
                    q_nope[lo:hi], q_pe[lo:hi], cached[:, :r], cached[:, r:], w_uk, w_uv, self.scale, pos
                )
        return self.dense(out.reshape(t, -1).to(x.dtype))

    def _decode(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        w_uk: torch.Tensor,
        w_uv: torch.Tensor,
        batch: ForwardBatch,
        cache: LingCache,
    ) -> torch.Tensor:
        """All sequences one token: scatter their latents, gather padded histories, absorbed attention."""
        ps = cache.page_size
        rows = torch.arange(batch.batch_size, device=latent.device)
        pos = batch.positions
        cache.mla_kv[self.mla_index, batch.block_tables[rows, pos // ps], pos % ps] = latent.to(
            cache.mla_kv.dtype
        )
        longest = max(batch.prefix_lens) + 1
        n_pages = -(-longest // ps)
        if n_pages > batch.block_tables.shape[1]:
            raise ValueError(
                f"block_tables: {longest} tokens need {n_pages} pages, the table has {batch.block_tables.shape[1]}"
            )
        pages = cache.mla_kv[self.mla_index, batch.block_tables[:, :n_pages]]  # [B, n_pages, ps, kv]
        histories = pages.reshape(batch.batch_size, n_pages * ps, -1)[:, :longest]
        return mla_decode_batched_reference(q_nope, q_pe, histories, pos + 1, w_uk, w_uv, self.scale)

    def _prefill_kernel_fits(self, x: torch.Tensor) -> bool:
        """The Triton prefill takes bf16 on CUDA (fp32 tl.dot would run as tf32 there) and any dtype
        under the interpreter (the CPU tests); its tl.arange widths must be powers of two >= 16."""
        if not self.use_kernels:
            return False
        from ling_runtime.kernels._common import interpret_mode  # triton only once kernels are on

        if not (interpret_mode() or (x.is_cuda and x.dtype == torch.bfloat16)):
            return False
        return all(n >= 16 and n & (n - 1) == 0 for n in (self.nope, self.rope, self.vdim))

    def _prefill_kernel(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        batch: ForwardBatch,
        cache: LingCache,
    ) -> torch.Tensor:
        """Expanded prefill/extend with the Triton flash kernel: every sequence's latents (cached
        prefix + this chunk) are read back from the paged cache, so the keys are exactly the cache's
        (rounded to its dtype), as on the plain path; one kv_b_proj over all of them gives per-head
        k_nope and v as strided views, and k_pe stays one row per token (head stride 0 in the
        kernel), so nothing is broadcast or concatenated. Returns [T, h, v] in q's dtype."""
        from ling_runtime.kernels import mla_prefill as prefill_mod  # looked up per call (tests wrap it)

        lat, cu_k = [], [0]
        for b in range(batch.batch_size):
            lo, hi = batch.offsets[b], batch.offsets[b + 1]
            table = batch.block_tables[b]
            cache.write_latent(self.mla_index, table, batch.positions[lo:hi], latent[lo:hi])
            n = batch.prefix_lens[b] + (hi - lo)
            lat.append(cache.read_latent(self.mla_index, table, n))
            cu_k.append(cu_k[-1] + n)
        kv_lat = torch.cat(lat).to(q_nope.dtype)  # [Tk, r + rope]
        tk = kv_lat.shape[0]
        kvb = self.kv_b_proj(kv_lat[:, : self.rank]).view(tk, self.local_heads, self.nope + self.vdim)
        dev = q_nope.device
        return prefill_mod.mla_prefill(
            q_nope,
            kvb[..., : self.nope],
            kvb[..., self.nope :],
            torch.tensor(batch.offsets, dtype=torch.int32, device=dev),
            torch.tensor(cu_k, dtype=torch.int32, device=dev),
            self.scale,
            q_pe=q_pe.to(q_nope.dtype),
            k_pe=kv_lat[:, self.rank :],
            max_seqlen_q=max(batch.seq_lens),
        )

    def _kernel_fits(self, page_size: int) -> bool:
        def pow2(n: int) -> bool:
            return n >= 16 and n & (n - 1) == 0

        return pow2(self.rope) and pow2(self.rank) and pow2(min(64, page_size))

    def _decode_kernel(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        w_uk: torch.Tensor,
        w_uv: torch.Tensor,
        batch: ForwardBatch,
        cache: LingCache,
    ) -> torch.Tensor:
        """Absorbed decode over the paged cache with the split-K Triton kernel: no gather of padded
        histories and no host-side lengths, so it is CUDA-graph safe (lengths = positions + 1).
        A graph-safe batch of T tokens per sequence is T*B such queries: every token's latent is
        written first, then each attends to the positions up to its own (causal within the chunk)."""
        from ling_runtime.kernels import mla_decode

        ps = cache.page_size
        kv = cache.mla_kv[self.mla_index]  # [pages, page_size, r + rope]
        pos = batch.positions

        def indices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            tables = batch.block_tables
            if not batch.is_decode:
                tables = tables.repeat_interleave(batch.num_tokens // batch.batch_size, dim=0)
            rows = torch.arange(tables.shape[0], device=latent.device)
            return tables, tables[rows, pos // ps], pos % ps, pos + 1

        # The same for every MLA layer of the step: computed once (rope_step_memo) on the kernel path.
        key = ("mla_indices", id(batch), id(batch.block_tables), id(pos), ps)
        tables, page, slot, lengths = step_cached(key, indices) if self.use_kernels else indices()
        kv[page, slot] = latent.to(kv.dtype)
        if not self._kernel_fits(ps) or not self.use_kernels:
            # Shapes the kernel's tl.dot cannot take (rope or page < 16, e.g. the built-in tiny
            # model): the same math over the whole block-table width, masked on device, so this
            # path needs no host-side lengths either and stays CUDA-graph safe.
            hist = kv[tables].reshape(tables.shape[0], -1, kv.shape[-1])
            return mla_decode_batched_reference(q_nope, q_pe, hist, lengths, w_uk, w_uv, self.scale)
        # q~ = q_nope W_UK per head as one batched matmul over heads: [h, B, nope] @ [h, nope, r].
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk.to(q_nope.dtype)).transpose(0, 1)
        q = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).to(kv.dtype).contiguous()
        if batch.is_decode:
            u = mla_decode(q, kv, tables, lengths, self.scale, kv_lora_rank=self.rank)
        else:
            # T queries per sequence in one program (the kernel's S_Q form): each key block is read
            # once for all T, where T separate decode rows would read the history T times.
            b = batch.batch_size
            t = batch.num_tokens // b
            u = mla_decode(
                q.view(b, t, *q.shape[1:]), kv, batch.block_tables, pos.view(b, t)[:, -1] + 1, self.scale,
                kv_lora_rank=self.rank,
            ).reshape(b * t, *q.shape[1:-1], self.rank)  # fmt: skip
        # o = u W_UV^T per head: [h, B, r] @ [h, r, v].
        return torch.bmm(u.transpose(0, 1).to(w_uv.dtype), w_uv.transpose(1, 2)).transpose(0, 1)
