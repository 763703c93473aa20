"""Lightning (linear) attention layers: math references + the TP-sharded layer module.

Per head h with decay rate s_h (lambda = exp(-s_h)) and state S [D, Dv]:
``S_t = lambda * S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` (q pre-scaled by 1/sqrt(D)).
Prefill runs Lightning-Attention-2 chunks over a carried state; decode is one recurrent step.
"""

from __future__ import annotations

import torch
from torch import nn

from ling_runtime.config import LingConfig
from ling_runtime.kernels.slopes import lightning_slopes
from ling_runtime.loader import Piece
from ling_runtime.model.batch import ForwardBatch
from ling_runtime.model.cache import LingCache, scatter_slot_rows
from ling_runtime.model.linear import ColumnParallelLinear, PiecesLinear, RowParallelLinear
from ling_runtime.model.norms import GroupRMSNorm, RMSNorm, rms_norm_reference
from ling_runtime.model.parallel import TPGroup
from ling_runtime.model.rope import apply_rope_neox, rope_cos_sin, rope_inv_freq, step_cached


def lightning_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked Lightning attention of one sequence over a carried state.

    q, k: [T, h, D]; v: [T, h, Dv] (float32, q already scaled); slopes: [h]; state: [h, D, Dv].
    Returns (o [T, h, Dv], new state). Per chunk of B tokens: intra ``(Q K^T ⊙ M) V`` with
    ``M_ij = λ^(i-j)`` (i >= j), inter ``λ^(i+1) Q S``, then ``S ← λ^B S + (λ^(B-1-j) K)^T V``.
    """
    qh, kh, vh = (t.float().transpose(0, 1) for t in (q, k, v))  # [h, T, *]
    s = slopes.float().to(q.device)[:, None, None]
    state = state.float()
    outs = []
    full = qh.shape[1] // chunk_size * chunk_size
    if full > chunk_size:
        # The whole chunks at once: the same formulas, batched over chunks ([h, n, B, *]), so the
        # per-chunk ops run once; only the state recurrence (one multiply-add each) stays a loop.
        h, n, c = qh.shape[0], full // chunk_size, chunk_size
        qc, kc, vc = (t[:, :full].reshape(h, n, c, t.shape[-1]) for t in (qh, kh, vh))
        s4 = s[:, None]
        idx = torch.arange(c, device=q.device, dtype=torch.float32)
        diff = idx[:, None] - idx[None, :]
        mask = torch.where(diff >= 0, torch.exp(-s4 * diff.clamp(min=0)), torch.zeros((), device=q.device))
        intra = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
        deltas = (kc * torch.exp(-s4 * (c - 1 - idx)[None, :, None])).transpose(-1, -2) @ vc
        decay = torch.exp(-s * c)
        entering = []
        for j in range(n):
            entering.append(state)
            state = decay * state + deltas[:, j]
        inter = torch.exp(-s4 * (idx[None, :, None] + 1)) * (qc @ torch.stack(entering, dim=1))
        outs.append((intra + inter).reshape(h, full, -1))
    else:
        full = 0
    for start in range(full, qh.shape[1], chunk_size):
        qc, kc, vc = (
            qh[:, start : start + chunk_size],
            kh[:, start : start + chunk_size],
            vh[:, start : start + chunk_size],
        )
        b = qc.shape[1]
        idx = torch.arange(b, device=q.device, dtype=torch.float32)
        diff = idx[:, None] - idx[None, :]
        mask = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), torch.zeros((), device=q.device))
        intra = ((qc @ kc.transpose(1, 2)) * mask) @ vc
        inter = torch.exp(-s * (idx[None, :, None] + 1)) * (qc @ state)
        outs.append(intra + inter)
        k_decay = torch.exp(-s * (b - 1 - idx)[None, :, None])
        state = torch.exp(-s * b) * state + (kc * k_decay).transpose(1, 2) @ vc
    return torch.cat(outs, dim=1).transpose(0, 1), state


def lightning_recurrent_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence (decode / speculative verify): returns (o [T, h, Dv], states [T, h, D, Dv])
    where ``states[t]`` is the state after position t (what verify keeps for rollback)."""
    lam = torch.exp(-slopes.float().to(q.device))[:, None, None]
    state = state.float()
    outs, states = [], []
    for t in range(q.shape[0]):
        state = lam * state + k[t].float()[:, :, None] * v[t].float()[:, None, :]
        outs.append((q[t].float()[:, None, :] @ state)[:, 0])
        states.append(state)
    return torch.stack(outs), torch.stack(states)


def lightning_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step for B sequences at once: q, k [B, h, D], v [B, h, Dv], states [B, h, D, Dv].

    Returns (o [B, h, Dv], new states) with ``S' = λ S + k^T v`` and ``o = q S'``.
    """
    lam = torch.exp(-slopes.float().to(q.device))[None, :, None, None]
    new = lam * states.float() + k.float()[..., :, None] * v.float()[..., None, :]
    return (q.float()[..., None, :] @ new)[..., 0, :], new


class LightningAttention(nn.Module):
    """Fused QKV, per-head QK RMSNorm, partial NeoX RoPE, Lightning attention over the slot's state,
    group RMSNorm ⊙ sigmoid(g_proj(x)), dense. Heads (and their slopes) are split over TP ranks."""

    def __init__(
        self,
        cfg: LingConfig,
        layer_id: int,
        linear_index: int,
        prefix: str,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.linear_index = linear_index
        self.chunk_size = chunk_size
        nh, d, h = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        self.local_heads = nh // tp.size
        self.head_dim = d
        self.scale = d**-0.5
        lh = self.local_heads
        # Rows are [Q heads | K heads | V heads]; rank r takes its heads from each of the three.
        key = f"{prefix}.query_key_value.weight"
        pieces = [
            Piece(
                key,
                (3 * nh * d, h),
                (slice(j * nh * d + tp.rank * lh * d, j * nh * d + (tp.rank + 1) * lh * d), slice(0, h)),
                (slice(j * lh * d, (j + 1) * lh * d), slice(0, h)),
            )
            for j in range(3)
        ]
        # FP8 under ``fp8_weights`` like the other projections (the largest Lightning weight).
        self.query_key_value = PiecesLinear(pieces, h, 3 * lh * d, dtype, device)
        self.query_layernorm = (
            RMSNorm(f"{prefix}.query_layernorm.weight", d, cfg.rms_norm_eps, dtype, device)
            if cfg.use_qk_norm
            else None
        )
        self.key_layernorm = (
            RMSNorm(f"{prefix}.key_layernorm.weight", d, cfg.rms_norm_eps, dtype, device)
            if cfg.use_qk_norm
            else None
        )
        self.g_proj = ColumnParallelLinear([(f"{prefix}.g_proj.weight", nh * d)], h, tp, dtype, device)
        self.g_norm = GroupRMSNorm(
            f"{prefix}.g_norm.weight",
            nh * d,
            cfg.group_norm_size,
            cfg.rms_norm_eps,
            tp.rank,
            tp.size,
            dtype,
            device,
        )
        self.dense = RowParallelLinear(f"{prefix}.dense.weight", nh * d, h, tp, dtype, device)
        slopes = lightning_slopes(nh, layer_id, cfg.num_hidden_layers)
        self.register_buffer("slopes", slopes[tp.rank * lh : (tp.rank + 1) * lh].to(device), persistent=False)
        inv_freq, mscale = rope_inv_freq(
            cfg.linear_rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.rope_mscale = mscale
        # Names these frequencies for the per-step cos/sin memo (rope.rope_step_memo).
        self.rope_key = ("lightning", cfg.linear_rotary_dim, cfg.rope_theta, repr(cfg.rope_scaling),
                         cfg.max_position_embeddings)  # fmt: skip
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels

    def qkv(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected, normed, rotated and scaled q, k, v of ``x`` [T, H]: each [T, h_local, D] float32."""
        t = x.shape[0]
        qkv = self.query_key_value(x).float()
        q, k, v = qkv.view(t, 3, self.local_heads, self.head_dim).unbind(1)
        if self.query_layernorm is not None and self.key_layernorm is not None:
            q = rms_norm_reference(q, self.query_layernorm.weight, self.query_layernorm.eps)
            k = rms_norm_reference(k, self.key_layernorm.weight, self.key_layernorm.eps)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_mscale)
        q = apply_rope_neox(q, cos, sin) * self.scale
        k = apply_rope_neox(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: LingCache) -> torch.Tensor:
        if batch.keep_linear_states and cache.spec_linear_state is None:
            raise ValueError(
                "max_spec_tokens: keep_linear_states needs a cache built with max_spec_tokens > 0"
            )
        if self.use_kernels:
            mode = self._kernel_mode(batch, cache)
            if mode is not None:
                return self._forward_kernels(x, batch, cache, mode)
        q, k, v = self.qkv(x, batch.positions)
        if batch.is_decode:
            out = self._decode(q, k, v, batch, cache)
        elif batch.graph_safe:
            out = self._verify_rows(q, k, v, batch, cache)
        else:
            out = torch.empty_like(v)
            singles = batch.decode_rows()
            if len(singles) > 1:  # decode rows of a mixed batch: one batched step, not one each
                sub, idx = batch.select(singles)
                out[idx] = self._decode(q[idx], k[idx], v[idx], sub, cache)
            skip = set(singles) if len(singles) > 1 else set()
            for b in range(batch.batch_size):
                if b in skip:
                    continue
                lo, hi = batch.offsets[b], batch.offsets[b + 1]
                out[lo:hi] = self._sequence(
                    q[lo:hi], k[lo:hi], v[lo:hi], batch.slots[b], batch.prefix_lens[b] == 0, batch, cache,
                    batch.snapshot_cuts(b) if batch.snapshots else [],
                )  # fmt: skip
        o = out.reshape(x.shape[0], -1)
        gate = torch.sigmoid(self.g_proj(x).float())
        o = (self.g_norm(o).float() * gate).to(x.dtype)
        return self.dense(o)

    def _decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, cache: LingCache
    ) -> torch.Tensor:
        """All sequences one token: one batched recurrent step over their gathered slots."""
        li = self.linear_index
        slots = batch.state_slots
        states = cache.linear_state[li, slots]
        fresh = torch.tensor([p == 0 for p in batch.prefix_lens], device=states.device)
        states = states.masked_fill(fresh[:, None, None, None], 0.0)
        out, new = lightning_decode_reference(q, k, v, self.slopes, states)
        # Padding rows of a graph bucket (slot -1) must not land in the last slot.
        scatter_slot_rows(cache.linear_state[li : li + 1], slots, new[None])
        if batch.keep_linear_states and cache.max_spec_tokens >= 1:
            assert cache.spec_linear_state is not None
            scatter_slot_rows(cache.spec_linear_state[li, :, 0][None], slots, new[None])
        return out

    def _verify_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, cache: LingCache
    ) -> torch.Tensor:
        """Graph-safe verify (plain torch): B sequences of T tokens; the state after every position
        goes to ``spec_linear_state[li, row]``, the pool is untouched (``LingCache.commit_rows``)."""
        assert cache.spec_linear_state is not None and batch.keep_linear_states
        li, b = self.linear_index, batch.batch_size
        n = q.shape[0] // b
        lam = torch.exp(-self.slopes.float())[None, :, None, None]
        state = cache.linear_state[li, batch.state_slots].float()  # slot -1 (padding) reads junk, unused
        shape = (b, n, *q.shape[1:])
        qb, kb, vb = q.float().view(shape), k.float().view(shape), v.float().view(shape)
        outs = []
        for t in range(n):
            state = lam * state + kb[:, t, :, :, None] * vb[:, t, :, None, :]
            outs.append((qb[:, t, :, None, :] @ state)[..., 0, :])
            cache.spec_linear_state[li, :b, t] = state
        return torch.stack(outs, dim=1).reshape(q.shape[0], *q.shape[1:])

    def _sequence(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot: int,
        fresh: bool,
        batch: ForwardBatch,
        cache: LingCache,
        cuts: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """One sequence's chunk (prefill, extend or verify) over its slot's carried state; ``cuts``
        (n, id): save the state after the first n tokens into prefix-cache snapshot id."""
        li = self.linear_index
        state = cache.linear_state[li, slot]
        if fresh:
            state = torch.zeros_like(state)  # a new sequence never sees a stale slot
        n = q.shape[0]
        if batch.keep_linear_states and n <= cache.max_spec_tokens:
            # Verify: keep the state after every position for commit_linear_state. Longer
            # sequences in the same batch (prefill chunks) are not verifies and skip this.
            assert cache.spec_linear_state is not None
            o, states = lightning_recurrent_reference(q, k, v, self.slopes, state)
            cache.spec_linear_state[li, slot, :n] = states
            new_state = states[-1]
        elif cuts:
            # The same chunks as one call when every cut is on the chunk grid (the scheduler's
            # chunks start on it and snapshots sit on multiples of it): the same arithmetic.
            assert cache.snapshot_state is not None
            outs, lo = [], 0
            for cut, sid in [*cuts, (n, -1)]:
                o, state = lightning_attention_reference(
                    q[lo:cut], k[lo:cut], v[lo:cut], self.slopes, state, self.chunk_size
                )
                outs.append(o)
                if sid >= 0:
                    cache.snapshot_state[li, sid] = state
                lo = cut
            o, new_state = torch.cat(outs), state
        else:
            o, new_state = lightning_attention_reference(q, k, v, self.slopes, state, self.chunk_size)
        cache.linear_state[li, slot] = new_state
        return o

    # ---- Triton path (CUDA; CPU only under TRITON_INTERPRET=1 in tests) ----------------------------
    def _kernel_mode(self, batch: ForwardBatch, cache: LingCache) -> str | None:
        """Which kernel serves this batch, from host-side lengths only (no device sync, graph-safe):
        ``decode`` (one token each), ``verify`` (equal short verify chunks keeping per-position
        states), ``prefill`` (packed varlen). None: a verify batch mixed with longer prefill chunks,
        which the reference handles sequence by sequence."""
        if batch.is_decode:
            return "decode"
        if batch.graph_safe:
            return "verify_rows"
        if batch.snapshots:
            # Prefix-cache snapshots mid-row come from the prefill kernel's chunk states, so each
            # must sit on its row's chunk grid; otherwise (and with verifies) the reference cuts.
            from ling_runtime.kernels.lightning_chunk import prefill_config

            grid = prefill_config(batch.num_tokens, batch.batch_size).chunk
            aligned = all(n % grid == 0 for _, n, _ in batch.snapshots)
            return "prefill" if aligned and not batch.keep_linear_states else None
        if not batch.keep_linear_states:
            return "prefill"
        n = batch.seq_lens[0]
        same = all(m == n for m in batch.seq_lens)
        if same and n <= cache.max_spec_tokens and all(p > 0 for p in batch.prefix_lens):
            return "verify"
        return None

    def _forward_kernels(
        self, x: torch.Tensor, batch: ForwardBatch, cache: LingCache, mode: str
    ) -> torch.Tensor:
        from ling_runtime import kernels as K

        t, lh, d = x.shape[0], self.local_heads, self.head_dim
        cos, sin = rope_cos_sin(batch.positions, self.inv_freq, self.rope_mscale, self.rope_key)
        qkv = self.query_key_value(x)
        if self.query_layernorm is not None and self.key_layernorm is not None and _pow2(d):
            # One launch: per-head RMSNorm + partial NeoX RoPE (cos/sin carry the YaRN mscale).
            q, k, v = K.qk_norm_rope(
                qkv, self.query_layernorm.weight, self.key_layernorm.weight, cos, sin, lh,
                self.query_layernorm.eps,
            )  # fmt: skip
            scale = self.scale
        else:
            q, k, v = self.qkv(x, batch.positions)  # already scaled; kernels want equal strides
            q, k, v, scale = q.contiguous(), k.contiguous(), v.contiguous(), 1.0
        li = self.linear_index
        pool = cache.linear_state[li]  # [slots, h, D, D] fp32, contiguous: the kernels' slot pool
        slots = batch.state_slots
        if mode == "decode":
            fresh = [s for s, p in zip(batch.slots, batch.prefix_lens, strict=True) if p == 0]
            if fresh:  # a new sequence never sees a stale slot (host list: no sync)
                pool[fresh] = 0.0
            # Zeros, not empty: CUDA-graph padding rows (slot -1) are skipped by the kernel and
            # must not feed garbage (NaN) into the router of the padded rows.
            # One buffer for every Lightning layer of the step (each layer's output is consumed by
            # its group norm before the next layer writes): one memset per step, not one per layer.
            out = step_cached(("lightning_out", id(batch), q.shape, q.dtype), lambda: torch.zeros_like(q))
            K.lightning_decode(q, k, v, pool, slots, self.slopes, scale, out=out, block_v=min(32, d))
            if batch.keep_linear_states and cache.max_spec_tokens >= 1:
                assert cache.spec_linear_state is not None
                cache.spec_linear_state[li, slots, 0] = pool[slots]
        elif mode == "verify":
            b, n = batch.batch_size, batch.seq_lens[0]
            o, inter = K.lightning_verify(
                q.view(b, n, lh, d), k.view(b, n, lh, d), v.view(b, n, lh, d), pool, slots, self.slopes,
                scale, block_v=min(32, d),
            )  # fmt: skip
            assert cache.spec_linear_state is not None
            cache.spec_linear_state[li, slots, :n] = inter
            pool[slots] = inter[:, -1]  # as the reference: the pool holds the last state until commit
            out = o.view(t, lh, d)
        elif mode == "verify_rows":
            # Graph-safe verify: per-position states by batch row, pool untouched; the caller
            # commits them after acceptance (LingCache.commit_rows), all on the device.
            assert cache.spec_linear_state is not None and batch.keep_linear_states
            b = batch.batch_size
            n = t // b
            o, _ = K.lightning_verify(
                q.view(b, n, lh, d), k.view(b, n, lh, d), v.view(b, n, lh, d), pool, slots, self.slopes,
                scale, inter=cache.spec_linear_state[li, :b, :n], out=torch.zeros_like(q).view(b, n, lh, d),
                block_v=min(32, d),
            )  # fmt: skip
            out = o.view(t, lh, d)
        else:
            has_initial = torch.tensor(
                [int(p > 0) for p in batch.prefix_lens], dtype=torch.int32, device=x.device
            )
            if batch.snapshots:
                out = self._prefill_snapshots(q, k, v, pool, batch, has_initial, scale, cache)
            else:
                # No chunk/block arguments: the kernel's _DISPATCH picks them by average prompt
                # length (measured on the H200; blocks clamped to the head dim).
                out = K.lightning_prefill_chunked(
                    q, k, v, pool, slots, batch.cu_seqlens.to(torch.int32), has_initial, self.slopes, scale
                )  # fmt: skip
        o = out.reshape(t, -1)
        gate = self.g_proj(x)
        group = o.shape[1] // self.g_norm.groups
        if _pow2(group):
            y = K.group_rmsnorm_gate(o, gate, self.g_norm.weight, group, self.g_norm.eps)
        else:
            y = (self.g_norm(o).float() * torch.sigmoid(gate.float())).to(x.dtype)
        return self.dense(y.to(x.dtype))

    def _prefill_snapshots(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pool: torch.Tensor,
        batch: ForwardBatch,
        has_initial: torch.Tensor,
        scale: float,
        cache: LingCache,
    ) -> torch.Tensor:
        """``lightning_prefill_chunked``'s two launches, keeping the prefix-cache snapshots: the
        first stage stores the state entering every chunk (here in fp32, as the slot's state), so a
        snapshot after n tokens of a row is its chunk n / C's entering state, copied out between."""
        from dataclasses import replace

        from ling_runtime.kernels.lightning_chunk import chunk_outputs, chunk_states, prefill_config

        d = self.head_dim
        cfg = prefill_config(batch.num_tokens, batch.batch_size)
        cfg = replace(
            cfg,
            block_k=min(cfg.block_k, d),
            block_v=min(cfg.block_v, d),
            block_v_out=min(cfg.block_v_out, d),
            fp32_states=True,
        )
        cu = batch.cu_seqlens.to(torch.int32)
        h = chunk_states(k, v, pool, batch.state_slots, cu, has_initial, self.slopes, cfg)
        first, starts = 0, []
        for n in batch.seq_lens:  # chunks never straddle rows: ceil(len / C) chunks per row
            starts.append(first)
            first += -(-n // cfg.chunk)
        rows = [starts[row] + n // cfg.chunk for row, n, _ in batch.snapshots]
        assert cache.snapshot_state is not None
        ids = torch.tensor([sid for _, _, sid in batch.snapshots], dtype=torch.int64, device=q.device)
        cache.snapshot_state[self.linear_index, ids] = h[torch.tensor(rows, device=q.device)].float()
        out = torch.empty_like(q)
        return chunk_outputs(q, k, v, h, cu, batch.batch_size, self.slopes, scale, out, cfg)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
