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
  The chunked one is two launches (sequence bookkeeping in-kernel), picks its tiles by average
  tokens per sequence from ``_DISPATCH`` (measured on the H200; ``config=PrefillConfig(..)``
  forces one) and keeps per-chunk states in bf16 (``states_dtype=torch.float32`` for fp32).
- ``lightning_slopes(H, layer_idx, num_layers)``: the model's slopes (``model.lightning``), re-exported.

MoE (``moe``); experts stacked with the shared expert last: ``w13[E+1, 2I, hidden]`` (gate rows
then up rows), ``w2[E+1, hidden, I]``:

- ``router_logits(x[B, hidden] bf16, w[E, hidden] fp32) -> logits fp32`` (fp32 FMA, 128 programs;
  the model uses it up to 8 tokens, cuBLAS above).
- ``moe_route(logits_fp32[B, E], bias[E], top_k, n_group, topk_group, scaling) -> (ids, weights)``
  sigmoid + bias + group-limited top-k, renormalised unbiased weights x scaling; the shared expert
  is appended as column ``top_k`` (id E, weight 1).
- ``fused_moe(x[B, hidden], w13, w2, ids, weights, ..., w13_scale=None, w2_scale=None) -> y``
  SwiGLU experts and the weighted combine: bf16 weights, or fp8 e4m3 with fp32 128x128 block scales
  ``w13_scale[E+1, 2I/128, hidden/128]``, ``w2_scale[E+1, hidden/128, I/128]`` (W = w x scale),
  widened to fp16 in registers against power-of-two-scaled activations (``act_fp8=True``: fp8 x fp8).
  Decode kernels below ``GROUPED_FROM`` (128 bf16 / ``GROUPED_FROM_FP8`` 256) tokens, else
  ``moe_prefill.fused_moe_grouped`` (sort by expert on the device, grouped GEMMs; fp8 expands the
  experts to bf16 from ``FP8_DEQUANT_FROM`` tokens). Graph-capturable at every size.
- ``moe_align(ids, n_experts, block_m)``, ``fused_moe_grouped(...)`` (``moe_prefill``).

MLA (``mla``): ``mla_decode(q[B, H, 576], kv_cache[P, page, 576], block_table[B, pages],
seq_lens[B], scale, kv_lora_rank=512, num_splits=..) -> u[B, H, 512]`` (absorbed; caller applies
W_UV and o_proj). seq_lens must be >= 1. Also q ``[B, S_Q, H, 576]`` (MTP verify: S_Q positions per
sequence, causal, one KV read). Any power-of-two page size; splits default to one wave (2 smaller
programs per sequence from B = 66) and always keep a split inside one page chunk.
``mla_prefill.mla_prefill(q[Tq, H, 128], k, v[Tk, H, 128], cu_seqlens_q, cu_seqlens_k, scale, q_pe=,
k_pe=)`` (import it from its module; the name is the module's): varlen causal flash attention, queries = the last len_q of len_k keys (prefix
from the cache), qk 192 / v 128, k_pe shared by all heads.

Small ops (``norms``, ``sampling``): ``add_rmsnorm(x, residual, w, eps) -> (y, residual)``
(residual updated in place), ``qk_norm_rope(qkv[B, 3HD], wq, wk, cos, sin, H, eps) -> (q, k, v)``
(per-head RMSNorm + NeoX RoPE on the first 2*cos.shape[1] dims), ``rope_cos_sin(pos, rot, theta)``,
``group_rmsnorm_gate(o, gate, w, group, eps)``, ``sample(logits, temperature, uniform=None) -> ids``
(greedy where temperature == 0, else Gumbel-max; no top-k/top-p filtering).

FP8 (``fp8``): ``quantize_fp8_blockwise(w) -> (w_fp8, scale[N/128, K/128])`` and
``fp8_linear(x, w_fp8, scale, *, config=None) -> y`` (e4m3, 128x128 block scales; N need not be a
multiple of 128): picks from the measured ``DISPATCH`` by (N, K, M bucket), else ``default_config``:
CUDA-core GEMV for M <= 4, fp16-widening swap-AB tensor-core kernel (or ``dot``/``w8a8``) up to 128,
dequantize to a bf16 scratch + cuBLAS above; split-K reduced by the last program (``lastred``), so
one launch and capture-safe. ``dequant_fp8(w, scale)`` gives a bf16 copy.

``rms_norm(x, w, eps)`` (``rms_norm``): one-launch RMSNorm (the model's first input norm).
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
from ling_runtime.kernels.moe import fused_moe, fused_moe_ref, moe_route, moe_route_ref, router_logits
from ling_runtime.kernels.moe_prefill import fused_moe_grouped, moe_align
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
    "fused_moe_grouped",
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
    "moe_align",
    "moe_route",
    "moe_route_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "quantize_fp8_blockwise",
    "rope_cos_sin",
    "router_logits",
    "sample",
    "sample_ref",
]
