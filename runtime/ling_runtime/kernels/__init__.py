"""Triton kernels for the Ling-2.6 decode/prefill hot path, each with a plain-torch reference.

Every kernel module keeps its reference (``*_ref``, fp32 math, token by token where the math is a
recurrence) beside the kernel; tests/kernels/ compares the two on CPU under TRITON_INTERPRET=1 at
small sizes, and bench/gpu/kernels.py compares them at real sizes on the GPU before timing.
The functions below are what the model layers call; shapes are per TP rank (heads = H / tp).

Lightning attention (``lightning``, ``lightning_chunk``); state pool ``state[slots, H, D, D]`` fp32,
rows = key dim, columns = value dim; ``slope[H]`` = per-head decay rate (lambda = exp(-slope)):

- ``lightning_decode(q, k, v, state, slot_ids, slope, scale, out=None, block_v=32) -> o``
  q/k/v/o ``[B, H, D]``; updates ``state[slot_ids]`` in place; slot id < 0 = padding row (skipped).
  block_v=64 is faster for B >= 32 (bench/results/gpu.md).
- ``lightning_verify(q, k, v, state, slot_ids, slope, scale, inter=None, out=None) -> (o, inter)``
  q/k/v ``[B, T, H, D]`` for T speculative positions; per-position states ``inter[B, T, H, D, D]``;
  the pool is not touched. ``lightning_commit(state, slot_ids, inter, num_accepted)`` then copies
  position ``num_accepted - 1`` (>= 1) into the pool: rollback is free.
- ``lightning_prefill(q, k, v, state, slot_ids, cu_seqlens, has_initial, slope, scale) -> o``
  (fused, one program walks all chunks) and ``lightning_prefill_chunked(...)`` (same contract,
  chunk-parallel, faster for long prompts): q/k/v ``[T_total, H, D]`` packed, ``cu_seqlens[N+1]``
  int32, ``has_initial[N]`` (0 = start from a zero state); final states are written to the slots.
  The chunked one keeps per-chunk states in bf16 by default (``states_dtype=torch.float32`` to
  keep them in fp32; measured no accuracy difference at real sizes).
- ``lightning_slopes(H, layer_idx, num_layers)``: the model's slopes (``model.lightning``), re-exported.

MoE (``moe``); experts stacked with the shared expert last: ``w13[E+1, 2I, hidden]`` (gate rows
then up rows), ``w2[E+1, hidden, I]``:

- ``moe_route(logits_fp32[B, E], bias[E], top_k, n_group, topk_group, scaling) -> (ids, weights)``
  sigmoid + bias + group-limited top-k, renormalised unbiased weights x scaling; the shared expert
  is appended as column ``top_k`` (id E, weight 1).
- ``fused_moe(x[B, hidden], w13, w2, ids, weights, ...) -> y[B, hidden]`` SwiGLU experts and the
  weighted combine (two launches; shared expert in cuBLAS for B >= 64).

MLA (``mla``): ``mla_decode(q[B, H, 576], kv_cache[P, page, 576], block_table[B, pages],
seq_lens[B], scale, kv_lora_rank=512, num_splits=..) -> u[B, H, 512]`` (absorbed; caller applies
W_UV and o_proj). seq_lens must be >= 1.

Small ops (``norms``, ``sampling``): ``add_rmsnorm(x, residual, w, eps) -> (y, residual)``
(residual updated in place), ``qk_norm_rope(qkv[B, 3HD], wq, wk, cos, sin, H, eps) -> (q, k, v)``
(per-head RMSNorm + NeoX RoPE on the first 2*cos.shape[1] dims), ``rope_cos_sin(pos, rot, theta)``,
``group_rmsnorm_gate(o, gate, w, group, eps)``, ``sample(logits, temperature, uniform=None) -> ids``
(greedy where temperature == 0, else Gumbel-max; no top-k/top-p filtering).

FP8 (``fp8``): ``quantize_fp8_blockwise(w) -> (w_fp8, scale[N/128, K/128])`` and
``fp8_linear(x, w_fp8, scale) -> y`` (e4m3, 128x128 block scales).
"""

from ling_runtime.kernels.fp8 import fp8_linear, fp8_linear_ref, quantize_fp8_blockwise
from ling_runtime.kernels.lightning import (
    lightning_commit,
    lightning_commit_ref,
    lightning_decode,
    lightning_decode_ref,
    lightning_prefill,
    lightning_prefill_ref,
    lightning_slopes,
    lightning_verify,
    lightning_verify_ref,
)
from ling_runtime.kernels.lightning_chunk import lightning_prefill_chunked
from ling_runtime.kernels.mla import mla_decode, mla_decode_ref
from ling_runtime.kernels.moe import fused_moe, fused_moe_ref, moe_route, moe_route_ref
from ling_runtime.kernels.norms import (
    add_rmsnorm,
    add_rmsnorm_ref,
    group_rmsnorm_gate,
    group_rmsnorm_gate_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
    rope_cos_sin,
)
from ling_runtime.kernels.sampling import sample, sample_ref

__all__ = [
    "add_rmsnorm",
    "add_rmsnorm_ref",
    "fp8_linear",
    "fp8_linear_ref",
    "fused_moe",
    "fused_moe_ref",
    "group_rmsnorm_gate",
    "group_rmsnorm_gate_ref",
    "lightning_commit",
    "lightning_commit_ref",
    "lightning_decode",
    "lightning_decode_ref",
    "lightning_prefill",
    "lightning_prefill_chunked",
    "lightning_prefill_ref",
    "lightning_slopes",
    "lightning_verify",
    "lightning_verify_ref",
    "mla_decode",
    "mla_decode_ref",
    "moe_route",
    "moe_route_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "quantize_fp8_blockwise",
    "rope_cos_sin",
    "sample",
    "sample_ref",
]
