"""Triton kernels for the Ling-2.6 decode/prefill hot path, each with a plain-torch reference.

Every kernel module keeps its reference (``*_ref``, fp32 math, token by token where the math is a
recurrence) beside the kernel; tests/kernels/ compares the two on CPU under TRITON_INTERPRET=1 at
small sizes, and tests/gpu/ (``pytest -m gpu``) at real sizes on a GPU. Entry points take a
frozen config dataclass of tiles and launch choices; left out, a dispatch function picks the one
measured fastest on the H200 (bench/gpu/*_sweep.py; history in docs/gpu-notes.md). The functions
below are what the model layers call; shapes are per TP rank (heads = H / tp).

Names resolve lazily (the first use imports the module, and Triton): importing the package, or
the Triton-free ``slopes`` module the model needs, costs nothing.

Lightning attention (``lightning``, ``lightning_chunk``); state pool ``state[slots, H, D, D]`` fp32,
rows = key dim, columns = value dim; ``slope[H]`` = per-head decay rate (lambda = exp(-slope)):

- ``lightning_decode(q, k, v, state, slot_ids, slope, scale, out=None, block_v=32) -> o``
  q/k/v/o ``[B, H, D]``; updates ``state[slot_ids]`` in place; slot id < 0 = padding row (skipped).
  block_v=64 was faster for B >= 32 (bench/results/gpu.md).
- ``lightning_verify(q, k, v, state, slot_ids, slope, scale, inter=None, out=None) -> (o, inter)``
  q/k/v ``[B, T, H, D]`` for T speculative positions; per-position states ``inter[B, T, H, D, D]``;
  the pool is not touched. ``lightning_commit(state, slot_ids, inter, num_accepted)`` then copies
  position ``num_accepted - 1`` (>= 1) into the pool: rollback is free.
- ``lightning_prefill_chunked(q, k, v, state, slot_ids, cu_seqlens, has_initial, slope, scale,
  config=PrefillConfig | None) -> o``: q/k/v ``[T_total, H, D]`` packed, ``cu_seqlens[N+1]`` int32,
  ``has_initial[N]`` (0 = start from a zero state); final states are written to the slots. Two
  launches (sequence bookkeeping in-kernel); ``prefill_config`` picks tiles by average tokens per
  sequence; chunk states bf16 (``fp32_states`` for fp32). Reference: ``lightning_prefill_ref``.
- ``lightning_slopes(H, layer_idx, num_layers)`` (``slopes``): the per-head decay rates.

MoE (``moe``, ``moe_prefill``); experts stacked with the shared expert last: ``w13[E+1, 2I, hidden]``
(gate rows then up rows), ``w2[E+1, hidden, I]``:

- ``router_logits(x[B, hidden] bf16, w[E, hidden] fp32) -> logits fp32`` (fp32 FMA, 128 programs;
  the model uses it up to 8 tokens, cuBLAS above).
- ``moe_route(logits_fp32[B, E], bias[E], top_k, n_group, topk_group, scaling) -> (ids, weights)``
  sigmoid + bias + group-limited top-k, renormalised unbiased weights x scaling; the shared expert
  is appended as column ``top_k`` (id E, weight 1).
- ``fused_moe(x[B, hidden], w13, w2, ids, weights, w13_scale=None, w2_scale=None, *,
  config=MoeConfig | None, reduce=True) -> y``: SwiGLU experts and the weighted combine: bf16
  weights, or fp8 e4m3 with fp32 128x128 block scales ``w13_scale[E+1, 2I/128, hidden/128]``,
  ``w2_scale[E+1, hidden/128, I/128]`` (W = w x scale), widened to fp16 in registers against
  power-of-two-scaled activations. ``moe_config(tokens, I, hidden, scale_block)``: decode kernels
  below ``GROUPED_FROM`` (128 bf16 / ``GROUPED_FROM_FP8`` 256) tokens, else the sort-based
  ``fused_moe_grouped`` (fp8 expands the experts to bf16 from ``FP8_DEQUANT_FROM`` tokens).
  Graph-capturable at every size. ``reduce=False`` (decode path): per-slot fp32 outputs for
  ``norms.add_rmsnorm_partials``.
- ``moe_align(ids, n_experts, block_m)``, ``fused_moe_grouped(...)`` (``moe_prefill``).

MLA (``mla``, ``mla_prefill``): ``mla_decode(q[B, H, 576], kv_cache[P, page, 576],
block_table[B, pages], seq_lens[B], scale, kv_lora_rank=512, *, config=MlaConfig | None) ->
u[B, H, 512]`` (absorbed; caller applies W_UV and o_proj). seq_lens must be >= 1. Also q
``[B, S_Q, H, 576]`` (MTP verify: S_Q positions per sequence, causal, one KV read). Any
power-of-two page size; ``mla_config`` gives one wave of splits (2 smaller programs per sequence
from B = 66), and a split always stays inside one page chunk. ``mla_prefill.mla_prefill(q[Tq, H,
128], k, v[Tk, H, 128], cu_seqlens_q, cu_seqlens_k, scale, q_pe=, k_pe=, config=)`` (import it
from its module; the name is the module's): varlen causal flash attention, queries = the last
len_q of len_k keys (prefix from the cache), qk 192 / v 128, k_pe shared by all heads.

Small ops (``norms``, ``sampling``, ``rms_norm``): ``add_rmsnorm(x, residual, w, eps) -> (y,
residual)`` (residual updated in place), ``qk_norm_rope(qkv[B, 3HD], wq, wk, cos, sin, H, eps) ->
(q, k, v)`` (per-head RMSNorm + NeoX RoPE on the first 2*cos.shape[1] dims), ``rope_cos_sin(pos,
rot, theta)``, ``group_rmsnorm_gate(o, gate, w, group, eps)``, ``sample(logits, temperature,
uniform=None, *, seeds=None, positions=None) -> ids`` (greedy where temperature == 0, else
Gumbel-max with given noise or noise hashed from (seed, position, token), ``noise.py``; no
top-k/top-p filtering), ``rms_norm.rms_norm(x, w, eps)`` (one launch).

FP8 (``fp8``): ``quantize_fp8_blockwise(w) -> (w_fp8, scale[N/128, K/128])`` and
``fp8_linear(x, w_fp8, scale, *, config=Fp8Config | None) -> y`` (e4m3, 128x128 block scales; N
need not be a multiple of 128): ``pick_config`` takes the measured ``DISPATCH`` by (N, K, M
bucket), else ``default_config``: CUDA-core GEMV for M = 1, fp16-widening swap-AB tensor-core
kernel (or ``dot``/``w8a8``) up to 128, dequantize to a bf16 scratch + cuBLAS above; split-K
partials summed by the last program of a tile, so one launch and capture-safe.
``dequant_fp8(w, scale)`` gives a bf16 copy.
"""

from __future__ import annotations

import importlib

# name -> the kernels module that defines it
_EXPORTS = {
    "fp8_linear": "fp8",
    "fp8_linear_ref": "fp8",
    "quantize_fp8_blockwise": "fp8",
    "lightning_commit": "lightning",
    "lightning_commit_ref": "lightning",
    "lightning_decode": "lightning",
    "lightning_decode_ref": "lightning",
    "lightning_prefill_ref": "lightning",
    "lightning_verify": "lightning",
    "lightning_verify_ref": "lightning",
    "lightning_prefill_chunked": "lightning_chunk",
    "lightning_slopes": "slopes",
    "mla_decode": "mla",
    "mla_decode_ref": "mla",
    "fused_moe": "moe",
    "fused_moe_ref": "moe",
    "moe_config": "moe",
    "moe_route": "moe",
    "moe_route_ref": "moe",
    "router_logits": "moe",
    "MoeConfig": "moe_prefill",
    "fused_moe_grouped": "moe_prefill",
    "moe_align": "moe_prefill",
    "add_rmsnorm": "norms",
    "add_rmsnorm_ref": "norms",
    "group_rmsnorm_gate": "norms",
    "group_rmsnorm_gate_ref": "norms",
    "qk_norm_rope": "norms",
    "qk_norm_rope_ref": "norms",
    "rope_cos_sin": "norms",
    "sample": "sampling",
    "sample_ref": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups (and test wrappers set on the package) skip this hook
    return value
