"""The whole Ling-2.6-flash (32 layers + MTP, real dimensions, random weights) on one H200, FP8.

Builds ``LingForCausalLM`` with block-scaled FP8 projection/expert weights (``weight_dtype="fp8"``;
embedding, lm_head, norms, router and MLA kv_b_proj stay bf16/fp32), fills it with random weights
drawn and quantized on the device, and measures, writing ``$OUT/gpu-full-model.json`` after every part:

1. ``ttft``: one prefill of 1K and 8K tokens (one sequence, eager: prefill is not graphed), wall time
   to the first sampled token, chunked by each of ``--prefill-chunk`` (2048, then 8192 in one chunk).
2. ``decode``: the CUDA-graph decode step (``ModelRunner.enable_cuda_graphs``) at B = 1/8/32/128,
   context ``--ctx``: tokens/s and the fraction of the bytes roofline (weights actually read: FP8
   non-expert weights + distinct experts x expert bytes + bf16 lm_head + Lightning state r+w + MLA KV)
   over the read bandwidth measured in this run (GEMV over the model's 1.29 GB lm_head).
3. ``mtp``: one draft step (``mtp_forward`` over B tokens + lm_head + argmax) and one verify step
   (target over B x (1+k) tokens keeping per-position Lightning states, k = 1..3), eagerly; speed-up
   vs plain graphed decode as a function of per-token acceptance a.
4. ``profile_decode`` / ``profile_prefill``: one B=1 decode step at ``--ctx`` and one
   ``--profile-prefill``-token prefill chunk, eager with kernels, under torch.profiler: device time
   by kernel group (fp8 linears, MoE, router, Lightning, MLA, norms, lm_head, sampling, cuBLAS,
   torch small ops) beside each group's bytes roofline (decode) or TFLOP/s (prefill).
5. ``eager``: the same model in plain torch (``set_use_kernels(False)``) and the kernels without
   graphs, one decode step at B=1, for the speed-up.

    python3 bench/gpu/full_model.py                 # H200: 32 layers + MTP, FP8, ~5-7 min
    python3 bench/gpu/full_model.py --layers 8      # a quicker first check (one layer group)
    python3 bench/gpu/full_model.py --tiny          # CPU smoke run (tiny config, < 3 min)

Every part is wrapped: a failure is recorded (``error``) and the next part runs; ``--budget``
seconds bound the whole run (parts that would start after it are recorded as skipped).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
# Before torch touches CUDA: the random fill and the per-part caches otherwise leave ~28 GB reserved
# but unusable (round 1: decode and MTP caches hit OOM with 28 GB "reserved but unallocated").
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
from common import CUDA, DEV, environment, table, time_calls, write_results
from ling_runtime.config import LingConfig
from ling_runtime.loader import quantize_blocks
from ling_runtime.model import ForwardBatch, LingForCausalLM
from ling_runtime.model.linear import (
    FP8,
    ColumnParallelLinear,
    PiecesLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from ling_runtime.runner.model_runner import ModelRunner
from ling_runtime.tiny import tiny_config
from runtime_graphs import FLASH_DIMS, PAGE

# Ling-2.6-flash (reference/model.md §1): the real dims of runtime_graphs.py, with its 32 layers
# (MLA at 7/15/23/31), layer 0 dense and one MTP layer.
FLASH = {
    **FLASH_DIMS, "num_hidden_layers": 32, "layer_group_size": 8, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
}  # fmt: skip
RESULTS: dict = {"env": environment()}
T0 = time.time()
# The Triton path: on CUDA, and in the --tiny smoke run under the interpreter (same code, eagerly).
KERNELS = CUDA or "--tiny" in sys.argv


RANK = 0  # this process's tensor-parallel rank (--tp); rank 0 records and writes the results
WORLD = 1


def save() -> None:
    """Write what exists so far: a run cut short still reports its parts."""
    if RANK == 0:
        write_results("gpu-full-model" if WORLD == 1 else f"gpu-full-model-tp{WORLD}", RESULTS)


def mem(phase: str) -> None:
    """Record allocated / peak device memory after ``phase`` (GB)."""
    if not CUDA:
        return
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    row = {
        "phase": phase,
        "allocated_GB": torch.cuda.memory_allocated() / 1e9,
        "max_allocated_GB": torch.cuda.max_memory_allocated() / 1e9,
        "reserved_GB": torch.cuda.memory_reserved() / 1e9,
        "free_GB": free / 1e9,
        "t_s": time.time() - T0,
    }
    RESULTS.setdefault("memory", []).append(row)
    print(
        f"[mem] {phase}: {row['allocated_GB']:.1f} GB allocated, {row['reserved_GB']:.1f} reserved, "
        f"{row['free_GB']:.1f} free, peak {row['max_allocated_GB']:.1f} ({row['t_s']:.0f} s)",
        flush=True,
    )


def release() -> None:
    """Give cached blocks back (after a part drops its cache and graphs)."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def part(name: str, budget: float, fn: Callable[[], object]) -> object:
    """Run one part; record its result, its error (and carry on), or that the budget skipped it."""
    skip = [time.time() - T0 > budget]
    if WORLD > 1:  # every rank must take the same decision, or the next collective hangs
        torch.distributed.broadcast_object_list(skip, src=0)
    if skip[0]:
        RESULTS[name] = {"skipped": f"time budget {budget:.0f} s spent"}
        save()
        return None
    t = time.time()
    try:
        out = fn()
        if isinstance(out, dict):
            out["seconds"] = time.time() - t
        RESULTS[name] = out
    except Exception as exc:  # one failing part must not lose the others
        traceback.print_exc()
        RESULTS[name] = {"error": repr(exc)[:500], "seconds": time.time() - t}
        out = None
    # The part's cache and graphs are garbage now: give their memory back before the next part.
    release()
    mem(f"after {name}")
    save()
    return out


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def wall(fn: Callable[[], object], n: int, warm: int = 1) -> float:
    """Seconds per call, host wall clock around ``n`` calls (device synchronised)."""
    for _ in range(warm):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


# ---- model ------------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace) -> LingConfig:
    if args.tiny:
        # Small, but every FP8 kernel shape condition of the real model holds (128-blocks nest);
        # layers 0 dense, 1-2 Lightning, 3 MLA, plus MTP.
        extra = {
            "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "head_dim": 32,
            "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "kv_lora_rank": 64,
            "q_lora_rank": 128, "num_hidden_layers": 4, "layer_group_size": 4, "num_nextn_predict_layers": 1,
        }  # fmt: skip
        block = [128, 128]
    else:
        layers = args.layers
        extra = dict(FLASH, num_hidden_layers=layers, layer_group_size=min(8, layers))
        block = [128, 128]
    if args.weights == "fp8":
        extra["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block}
    return LingConfig.from_hf(tiny_config(**extra))


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int) -> None:
    """Weights drawn on the device: norms 1, expert bias small, matrices N(0, 1/fan_in); FP8 weights
    are drawn in chunks and quantized block-wise (with their scales) on the device."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, p in model.named_parameters():
        if hasattr(p, "ckpt_scale_of"):
            continue  # filled with its weight
        std = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.0
        if p.dim() == 1:
            if "bias" in name:
                p.normal_(0, 0.01, generator=g)
            else:
                p.fill_(1.0)
        elif p.dtype == FP8:
            scale, block = p.ckpt_scale, p.fp8_block  # type: ignore[attr-defined]
            if p.dim() == 3:  # stacked experts: a few at a time
                step = 8
                for i in range(0, p.shape[0], step):
                    w = torch.randn(p[i : i + step].shape, device=DEV, generator=g) * std
                    q, s = quantize_blocks(w, block)
                    p[i : i + step].copy_(q)
                    scale[i : i + step].copy_(s)
            else:
                rows = max(block[0], (1 << 26) // p.shape[1] // block[0] * block[0])
                for r in range(0, p.shape[0], rows):
                    w = torch.randn(p[r : r + rows].shape, device=DEV, generator=g) * std
                    q, s = quantize_blocks(w, block)
                    p[r : r + rows].copy_(q)
                    scale[r // block[0] : r // block[0] + s.shape[0]].copy_(s)
        else:
            p.normal_(0, std, generator=g)


def weight_bytes(model: LingForCausalLM) -> dict[str, float]:
    """Bytes of what a decode step reads, from the parameters as built (dtype as stored)."""
    cfg = model.config
    nonexpert = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or "word_embeddings" in name or name.endswith(("mlp.w13", "mlp.w2")):
            continue
        if name.endswith(("mlp.w13_scale_inv", "mlp.w2_scale_inv")):
            continue
        nonexpert += p.numel() * p.element_size()
    moe = next(m for m in model.model.layers if hasattr(m.mlp, "w13")).mlp
    per_expert = sum(
        t[0].numel() * t[0].element_size()
        for t in (moe.w13, moe.w2, getattr(moe, "w13_scale_inv", None), getattr(moe, "w2_scale_inv", None))
        if t is not None
    )
    lm = model.lm_head.weight
    return {
        "nonexpert_bytes": float(nonexpert),
        "lm_head_bytes": float(lm.numel() * lm.element_size()),
        "expert_bytes": float(per_expert),
        "moe_layers": float(sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))),
        "total_param_bytes": float(sum(p.numel() * p.element_size() for p in model.parameters())),
    }


def step_bytes(
    model: LingForCausalLM, wb: dict[str, float], b: int, ctx: int, distinct: float | None = None
) -> float:
    c = model.config
    e, k = c.num_experts, c.num_experts_per_tok
    if distinct is None:
        distinct = e * (1 - (1 - k / e) ** b)  # expected distinct experts, uniform routing
    heads, d = c.num_attention_heads // model.tp.size, c.head_dim
    return (
        wb["nonexpert_bytes"]
        + wb["moe_layers"] * distinct * wb["expert_bytes"]
        + len(c.linear_layer_ids) * b * heads * d * d * 4 * 2
        + len(c.mla_layer_ids) * b * (ctx + 1) * c.kv_cache_dim * 2
        + b * c.hidden_size * 2
    )


# ---- parts ------------------------------------------------------------------------------------------
def ttft_part(model: LingForCausalLM, lengths: list[int], chunks: list[int]) -> dict:
    """Prefill one sequence of each length (chunks of ``chunk`` tokens) and sample its next token.

    The first chunk size times every length; a further one only the lengths it splits differently.
    Each (chunk, length) runs once untimed (new shapes compile) and reports the best of two."""
    model.set_use_kernels(KERNELS)
    top = max(lengths)
    pages = -(-(top + 8) // PAGE)
    cache = model.make_cache(num_slots=1, num_pages=pages + 1, page_size=PAGE)
    table = [list(range(pages))]
    gen = torch.Generator().manual_seed(1)

    def prefill(n: int, chunk: int) -> int:
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist()
        h = None
        for lo in range(0, n, chunk):
            part_ids = ids[lo : lo + chunk]
            batch = ForwardBatch.build([part_ids], [lo], [0], table, device=DEV)
            h = model(batch, cache)
        assert h is not None
        return int(torch.argmax(model.compute_logits(h[-1:]), dim=-1))

    rows = []
    for chunk in chunks:
        for n in lengths:
            if chunk != chunks[0] and n <= min(chunks[0], chunk):
                continue  # one chunk either way: the same run as the first chunk size's
            row: dict = {"chunk": chunk, "prompt": n}
            try:
                prefill(n, chunk)  # compile this shape outside the timing
                times = []
                for _ in range(2 if CUDA else 1):
                    sync()
                    t = time.perf_counter()
                    prefill(n, chunk)
                    sync()
                    times.append(time.perf_counter() - t)
                row["ttft_ms"] = min(times) * 1e3
                row["prefill_tok_s"] = n / min(times)
            except Exception as exc:  # e.g. OOM at the large chunk: keep the other rows
                traceback.print_exc()
                row["error"] = repr(exc)[:300]
            rows.append(row)
            print("ttft", row, flush=True)
            RESULTS["ttft_rows_so_far"] = rows
            save()
    mem("ttft")
    return {"chunks": chunks, "rows": rows}


# ---- where the time goes ------------------------------------------------------------------------------
# Kernel name -> group, first match wins. Triton kernels carry their @jit function's name; cuBLAS is
# split by dtype (decode: fp32 = the router's gate GEMV, bf16 = MLA's absorbed W_UK/W_UV products;
# prefill: bf16 also holds the fp8 linears' dequant + cuBLAS path for M > 128).
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("fp8 linears", ("_fp8_gemv", "_fp8_dot", "_splitk_reduce", "_act_quant", "_w8a8", "_dequant_kernel")),
    ("MoE", ("_moe_up", "_moe_down", "_grouped_up", "_grouped_down")),
    ("router", ("_route_kernel",)),
    ("Lightning", ("_decode_kernel", "_verify_kernel", "_commit_kernel", "_prefill_chunk", "_prefill_kernel",
                   "_states_kernel", "_output_kernel")),
    ("MLA", ("_mla_",)),
    ("norms", ("_add_rmsnorm", "_group_norm_gate", "_qk_norm_rope")),
    ("sampling", ("_sample_stage", "argmax")),
]  # fmt: skip
CUBLAS = ("gemm", "gemv", "xmma", "cutlass", "cublas", "sm90_", "nvjet")
# cuBLAS fp32 kernels name their type (sgemm, f32f32 tiles, float template arguments); the rest
# (bf16 names, and nvjet kernels, which carry no type) count as bf16.
FP32_MARKS = ("sgemm", "f32f32_f32", "f32f32_tf32", "<float", " float,")


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    if any(k in low for k in CUBLAS):
        bf16 = "bf16" in low or "bfloat16" in low
        return "cuBLAS fp32" if not bf16 and any(m in low for m in FP32_MARKS) else "cuBLAS bf16"
    if "at::native" in name or "memcpy" in low or "memset" in low or "catarray" in low:
        return "torch small ops"
    return "other"


def kernel_times(fn: Callable[[], object], n: int) -> dict[str, list[float]]:
    """Device time (ms per call) and launches per call of each kernel name over ``n`` calls of ``fn``.

    The CPU smoke run has no device events: aten ops' own CPU time stands in (exercises the code)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    fn()  # warm: nothing compiles inside the profile
    sync()
    with profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        sync()
    out: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if CUDA:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = e.self_cuda_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            out[e.key] = [us / n / 1e3, e.count / n]
    return out


def group_rows(
    sessions: dict[str, dict[str, list[float]]],
    bytes_by_group: dict[str, float],
    read_bps: float,
    alias: dict[str, str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Per group: ms, launches, bytes, roofline ms; and the ten slowest kernels. ``sessions`` maps a
    fixed group ("lm_head") or "" (classify by name) to that session's kernel times; ``alias``
    renames groups whose owner the caller knows (decode: cuBLAS fp32 is the router's gate)."""
    acc: dict[str, list[float]] = {}
    kernels: list[dict] = []
    for fixed, times in sessions.items():
        for name, (ms, count) in times.items():
            g = fixed or kernel_group(name)
            g = (alias or {}).get(g, g)
            a = acc.setdefault(g, [0.0, 0.0])
            a[0] += ms
            a[1] += count
            kernels.append({"kernel": name[:70], "group": g, "ms": ms, "launches": count})
    rows = []
    for g, (ms, count) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
        row: dict = {"group": g, "ms": ms, "launches": count}
        by = bytes_by_group.get(g)
        if by:
            row["GB"] = by / 1e9
            row["roofline_ms"] = by / read_bps * 1e3
            row["fraction"] = row["roofline_ms"] / ms if ms > 0 else None
        rows.append(row)
    total = sum(r["ms"] for r in rows)
    roof = sum(r.get("roofline_ms", 0.0) for r in rows)
    rows.append({"group": "total", "ms": total, "launches": sum(r["launches"] for r in rows),
                 "GB": sum(r.get("GB", 0.0) for r in rows), "roofline_ms": roof,
                 "fraction": roof / total if total > 0 else None})  # fmt: skip
    kernels.sort(key=lambda k: -k["ms"])
    return rows, kernels[:10]


def linear_param_bytes(model: LingForCausalLM) -> tuple[float, float, float]:
    """(bytes, elements) of the target's projection linears outside the MoE kernel, and the
    MLA kv_b_proj bytes (read by MLA as W_UK/W_UV, not through a linear)."""
    lin = elems = kvb = 0.0
    for name, mod in model.named_modules():
        if name.startswith("mtp") or ".shared_experts" in name:
            continue  # MTP is not in the step; the shared expert runs inside the MoE kernel
        if not isinstance(mod, ReplicatedLinear | PiecesLinear | ColumnParallelLinear | RowParallelLinear):
            continue
        w = mod.weight
        by = w.numel() * w.element_size()
        s = getattr(mod, "weight_scale_inv", None)
        if s is not None:
            by += s.numel() * s.element_size()
        if name.endswith("kv_b_proj"):
            kvb += by
        else:
            lin += by
            elems += w.numel()
    return lin, elems, kvb


def decode_group_bytes(
    model: LingForCausalLM, wb: dict[str, float], b: int, ctx: int, distinct: float
) -> dict:
    """Bytes each group must read in one decode step of ``b`` tokens at context ``ctx``."""
    c = model.config
    lin, _, kvb = linear_param_bytes(model)
    heads, d = c.num_attention_heads // model.tp.size, c.head_dim
    router = 0.0
    for m in model.model.layers:
        gate = getattr(m.mlp, "gate", None)
        if gate is not None:
            router += sum(p.numel() * p.element_size() for p in gate.parameters())
    lm = model.lm_head.weight
    return {
        "fp8 linears": lin,
        "MoE": wb["moe_layers"] * (distinct + 1) * wb["expert_bytes"],  # + the shared expert
        "router": router,
        "Lightning": len(c.linear_layer_ids) * b * heads * d * d * 4 * 2,  # fp32 state read + write
        "MLA": len(c.mla_layer_ids) * b * (ctx + 1) * c.kv_cache_dim * 2 + kvb,
        "lm_head": lm.numel() * lm.element_size(),
        "sampling": b * c.vocab_size * 4,
    }


@torch.inference_mode()
def profile_decode_part(
    model: LingForCausalLM, ctx: int, wb: dict, read_bps: float, graph_ms: float | None
) -> dict:
    """One B=1 decode step at ``ctx``, eager with kernels, under the profiler: device time by group
    beside each group's bytes roofline and the graphed step time."""
    model.set_use_kernels(KERNELS)
    pages_per = -(-(ctx + 8) // PAGE)
    cache = model.make_cache(num_slots=1, num_pages=pages_per, page_size=PAGE)
    pages = [list(range(pages_per))]
    batch = ForwardBatch.build([[11]], [ctx], [0], pages, device=DEV)
    h = model(batch, cache)
    logits = model.compute_logits(h)
    n = 3 if CUDA else 1
    sessions = {
        "": kernel_times(lambda: model(batch, cache), n),
        "lm_head": kernel_times(lambda: model.compute_logits(h), n),
        "sampling": kernel_times(lambda: torch.argmax(logits, dim=-1), n),
    }
    e = model.config.num_experts_per_tok
    # In a decode step the only fp32 matmul is the router's gate GEMV and the only bf16 cuBLAS
    # products are MLA's absorbed W_UK / W_UV bmm's (fp8 linears never reach cuBLAS at M = 1).
    alias = {"cuBLAS fp32": "router", "cuBLAS bf16": "MLA"}
    rows, top = group_rows(sessions, decode_group_bytes(model, wb, 1, ctx, float(e)), read_bps, alias)
    total = rows[-1]
    out = {
        "batch": 1,
        "ctx": ctx,
        "read_Bps": read_bps,
        "graph_step_ms": graph_ms,
        "groups": rows,
        "top": top,
    }
    if graph_ms:
        out["kernel_sum_over_graph_step"] = total["ms"] / graph_ms
        out["roofline_over_graph_step"] = total["roofline_ms"] / graph_ms
    print(table(rows, ["group", "ms", "launches", "GB", "roofline_ms", "fraction"]))
    print(
        f"B=1 step: kernels {total['ms']:.2f} ms, graph {graph_ms} ms, roofline {total['roofline_ms']:.2f} ms"
    )
    print(table(top, ["kernel", "group", "ms", "launches"]), flush=True)
    return out


def profile_prefill_any(model: LingForCausalLM, tokens: int) -> dict:
    """``profile_prefill_part`` at ``tokens``, or a quarter of it if that runs out of memory."""
    try:
        return profile_prefill_part(model, tokens)
    except torch.OutOfMemoryError as exc:
        traceback.print_exc()
        note = f"{tokens} tokens: {repr(exc)[:200]}"
    release()
    out = profile_prefill_part(model, max(1, tokens // 4))
    out["oom_at_requested"] = note
    return out


@torch.inference_mode()
def profile_prefill_part(model: LingForCausalLM, tokens: int) -> dict:
    """One prefill chunk of ``tokens`` (one sequence, prefix 0), eager with kernels, under the
    profiler: device time by group and the TFLOP/s of the two matmul-heavy groups."""
    model.set_use_kernels(KERNELS)
    pages = -(-(tokens + 8) // PAGE)
    cache = model.make_cache(num_slots=1, num_pages=pages + 1, page_size=PAGE)
    ids = torch.randint(3, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(2))
    batch = ForwardBatch.build([ids.tolist()], [0], [0], [list(range(pages))], device=DEV)
    sessions = {"": kernel_times(lambda: model(batch, cache), 1)}
    rows, top = group_rows(sessions, {}, 1.0)
    c = model.config
    _, lin_elems, _ = linear_param_bytes(model)
    moe = next(m for m in model.model.layers if hasattr(m.mlp, "w13")).mlp
    per_expert = moe.w13[0].numel() + moe.w2[0].numel()
    moe_layers = sum(1 for i in range(c.num_hidden_layers) if c.is_moe_layer(i))
    flops = {
        "fp8 linears": 2.0 * tokens * lin_elems,
        "MoE": 2.0 * tokens * (c.num_experts_per_tok + 1) * per_expert * moe_layers,
    }
    total = rows[-1]["ms"]
    for r in rows:
        r["share"] = r["ms"] / total if total > 0 else None
        if r["group"] in flops and r["ms"] > 0:
            r["TFLOP_s"] = flops[r["group"]] / (r["ms"] * 1e-3) / 1e12
    print(table(rows, ["group", "ms", "share", "launches", "TFLOP_s"]))
    print(table(top, ["kernel", "group", "ms", "launches"]), flush=True)
    return {"tokens": tokens, "groups": rows, "top": top}


def distinct_experts(model: LingForCausalLM, cache, toks, pos, slots, pages) -> float | None:
    """Mean distinct experts per MoE layer in one eager kernel step (the router's real choices)."""
    import ling_runtime.kernels as K

    seen: list[int] = []
    orig = K.moe_route

    def spy(*a, **kw):
        ids, w = orig(*a, **kw)
        seen.append(int(torch.unique(ids[:, : model.config.num_experts_per_tok]).numel()))
        return ids, w

    K.moe_route = spy
    try:
        model.set_use_kernels(True)
        batch = ForwardBatch.build([[t] for t in toks], pos, slots, pages, device=DEV)
        model.compute_logits(model(batch, cache))
    finally:
        K.moe_route = orig
    return sum(seen) / len(seen) if seen else None


def decode_part(
    model: LingForCausalLM, batches: list[int], ctx: int, iters: int, wb: dict, read_bps: float
) -> dict:
    top = max(batches)
    pages_per = -(-(ctx + 8) // PAGE)
    scratch = top * pages_per
    cache = model.make_cache(num_slots=top, num_pages=scratch + 1, page_size=PAGE)
    mem("decode cache")
    runner = ModelRunner(model, cache, DEV)
    out: dict = {"ctx": ctx, "read_Bps": read_bps, "rows": []}
    model.set_use_kernels(KERNELS)
    t = time.time()
    # On the CPU smoke run the same graph bodies run eagerly at each "replay" (engine eager mode).
    runner.enable_cuda_graphs(
        max_batch=top, max_pages=pages_per, scratch_page=scratch, buckets=batches, eager=not CUDA
    )
    out["capture_s"] = time.time() - t
    mem("graphs captured")
    for b in batches:
        row: dict = {"batch": b}
        try:
            row.update(decode_row(model, runner, b, ctx, pages_per, iters, wb, read_bps))
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)[:400]
        out["rows"].append(row)
        print("decode", row, flush=True)
        RESULTS["decode_rows_so_far"] = out["rows"]
        save()
    out["graph_steps"] = runner.graph_steps
    return out


@torch.inference_mode()
def decode_row(
    model: LingForCausalLM,
    runner: ModelRunner,
    b: int,
    ctx: int,
    pages_per: int,
    iters: int,
    wb: dict,
    read_bps: float,
) -> dict:
    """One batch size: B sequences, each one token after ``ctx`` cached positions."""
    slots = list(range(b))
    pages = [list(range(s * pages_per, (s + 1) * pages_per)) for s in slots]
    toks = [(17 * s) % 1000 + 5 for s in slots]
    pos = [ctx] * b
    row: dict = {}
    graphs = runner.graphs
    if graphs is not None:
        graphs.replay(toks, pos, slots, pages, b)  # set the static inputs once
        g = graphs.graph_of(b, pages_per)
        if g is not None:
            t_step = time_calls(lambda i: g.replay(), iters=iters, reps=5, graph=False)
        else:  # eager bodies (CPU smoke run)
            t_step = wall(lambda: graphs.replay(toks, pos, slots, pages, b), 1, warm=0)
        row["replay_with_inputs_ms"] = 1e3 * wall(
            lambda: graphs.replay(toks, pos, slots, pages, b), max(3, iters // 2) if CUDA else 1, warm=0
        )
    else:  # the CPU smoke run: the same step eagerly, kernels interpreted
        model.set_use_kernels(KERNELS)

        def step() -> None:
            batch = ForwardBatch.build([[t] for t in toks], pos, slots, pages, device=DEV)
            model.compute_logits(model(batch, runner.cache))

        t_step = wall(step, 1)
    row["step_ms"] = t_step * 1e3
    row["tok_s"] = b / t_step
    by = step_bytes(model, wb, b, ctx)
    row["step_GB_uniform"] = by / 1e9
    row["roofline_ms_uniform"] = by / read_bps * 1e3
    row["fraction_of_roofline_uniform"] = by / read_bps / t_step
    d = distinct_experts(model, runner.cache, toks, pos, slots, pages) if KERNELS else None
    if d is not None:
        row["distinct_experts_measured"] = d
        row["fraction_of_roofline_measured"] = step_bytes(model, wb, b, ctx, d) / read_bps / t_step
    return row


def mtp_part(
    model: LingForCausalLM, batches: list[int], ctx: int, ks: list[int], decode_rows: list[dict]
) -> dict:
    model.set_use_kernels(KERNELS)
    top = max(batches)
    pages_per = -(-(ctx + max(ks) + 8) // PAGE)
    cache = model.make_cache(
        num_slots=top, num_pages=top * pages_per, page_size=PAGE, max_spec_tokens=max(ks) + 1
    )
    mem("mtp cache")
    t_decode = {r["batch"]: r["step_ms"] for r in decode_rows if "step_ms" in r}
    rows = []
    for b in batches:
        row: dict = {"batch": b}
        try:
            row.update(mtp_row(model, cache, b, ctx, ks, pages_per))
            td = t_decode.get(b)
            if td is not None:
                row["decode_graph_ms"] = td
                for k in ks:
                    cost = row[f"verify_k{k}_ms"] + k * row["draft_ms"]
                    for a in (0.5, 0.6, 0.7, 0.8, 0.9):
                        accepted = sum(a**i for i in range(1, k + 1))
                        row[f"speedup_k{k}_a{a}"] = (1 + accepted) * td / cost
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)[:400]
        rows.append(row)
        print("mtp", row, flush=True)
        RESULTS["mtp_rows_so_far"] = rows
        save()
    return {
        "ctx": ctx,
        "ks": ks,
        "note": "eager draft/verify (the verify's MLA uses the plain-torch prefill path); speed-up = "
        "(1 + sum_i a^i) x t_decode_graph / (t_verify + k t_draft)",
        "rows": rows,
    }


@torch.inference_mode()
def mtp_row(model: LingForCausalLM, cache, b: int, ctx: int, ks: list[int], pages_per: int) -> dict:
    """Draft (MTP layer + lm_head + argmax over B tokens) and verify (target over B x (1+k)) times."""
    slots = list(range(b))
    pages = [list(range(s * pages_per, (s + 1) * pages_per)) for s in slots]
    prev = torch.randn(b, model.config.hidden_size, device=DEV, dtype=model.dtype)
    n = 3 if CUDA else 1
    row: dict = {}

    def draft() -> torch.Tensor:
        batch = ForwardBatch.build([[7 + s] for s in slots], [ctx] * b, slots, pages, device=DEV)
        return torch.argmax(model.compute_logits(model.mtp_forward(batch, cache, prev)), dim=-1)

    row["draft_ms"] = wall(draft, n) * 1e3
    for k in ks:

        def verify(k: int = k) -> torch.Tensor:
            toks = [[5 + i for i in range(k + 1)] for _ in slots]
            batch = ForwardBatch.build(toks, [ctx] * b, slots, pages, keep_linear_states=True, device=DEV)
            return torch.argmax(model.compute_logits(model(batch, cache)), dim=-1)

        row[f"verify_k{k}_ms"] = wall(verify, n) * 1e3
    return row


def mtp_graph_part(
    model: LingForCausalLM, batches: list[int], ctx: int, k: int, iters: int, decode_rows: list[dict]
) -> dict:
    """The engine's graphed MTP step (``SpecGraphs``: draft chain of k, verify + accept + commit on
    the device), replay times per bucket, and the speed-up vs graphed plain decode."""
    model.set_use_kernels(KERNELS)
    top = max(batches)
    pages_per = -(-(ctx + k + 8) // PAGE)
    scratch = top * pages_per
    cache = model.make_cache(num_slots=top, num_pages=scratch + 1, page_size=PAGE, max_spec_tokens=k + 1)
    runner = ModelRunner(model, cache, DEV)
    t = time.time()
    runner.enable_cuda_graphs(
        max_batch=top,
        max_pages=pages_per,
        scratch_page=scratch,
        buckets=batches,
        num_drafts=k,
        eager=not CUDA,
    )
    out: dict = {"k": k, "ctx": ctx, "capture_s": time.time() - t, "rows": []}
    mem("mtp graphs captured")
    spec = runner.spec_graphs
    t_decode = {r["batch"]: r["step_ms"] for r in decode_rows if "step_ms" in r}
    for b in batches:
        row: dict = {"batch": b}
        try:
            row.update(mtp_graph_row(spec, b, ctx, k, pages_per, iters))
            td = t_decode.get(b)
            if td is not None and "draft_ms" in row:
                row["decode_graph_ms"] = td
                cost = row["draft_ms"] + row["verify_ms"]
                for a in (0.5, 0.6, 0.7, 0.8, 0.9):
                    row[f"speedup_a{a}"] = (1 + sum(a**i for i in range(1, k + 1))) * td / cost
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)[:400]
        out["rows"].append(row)
        print("mtp graphs", row, flush=True)
        RESULTS["mtp_graph_rows_so_far"] = out["rows"]
        save()
    return out


@torch.inference_mode()
def mtp_graph_row(spec, b: int, ctx: int, k: int, pages_per: int, iters: int) -> dict:
    if spec is None or spec.bucket_for(b, pages_per) != b:
        return {"skipped": "no captured MTP bucket (bucket x (k+1) above the graphs' token cap?)"}
    slots = list(range(b))
    spec.set_sequences(b, slots, [list(range(s * pages_per, (s + 1) * pages_per)) for s in slots])
    spec.draft(b, [[5 + s] * (k + 1) for s in slots], [ctx] * b)  # static inputs, one full draft
    spec.verify(b, [9] * b, [ctx] * b)
    draft = time_calls(lambda i: spec.replay_draft(b), iters=iters, reps=5, graph=False)
    verify = time_calls(lambda i: spec.replay_verify(b), iters=iters, reps=5, graph=False)
    return {"draft_ms": draft * 1e3, "verify_ms": verify * 1e3, "tokens_per_verify": b * (k + 1)}


def eager_part(model: LingForCausalLM, ctx: int, graph_ms: float | None) -> dict:
    pages_per = -(-(ctx + 8) // PAGE)
    cache = model.make_cache(num_slots=1, num_pages=pages_per, page_size=PAGE)
    pages = [list(range(pages_per))]
    out: dict = {"batch": 1, "ctx": ctx}

    def step() -> None:
        batch = ForwardBatch.build([[11]], [ctx], [0], pages, device=DEV)
        model.compute_logits(model(batch, cache))

    with torch.inference_mode():
        for name, kernels in (("eager_kernels", True), ("eager_torch", False)):
            model.set_use_kernels(kernels)
            try:
                out[f"{name}_ms"] = wall(step, 2 if kernels else 1) * 1e3
                if graph_ms:
                    out[f"graph_speedup_vs_{name}"] = out[f"{name}_ms"] / graph_ms
            except Exception as exc:
                traceback.print_exc()
                out[f"{name}_error"] = repr(exc)[:400]
            print("eager", out, flush=True)
            save()
    model.set_use_kernels(KERNELS)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny config, interpreter")
    ap.add_argument("--weights", choices=("fp8", "bf16"), default="fp8")
    ap.add_argument("--fp8", action="store_const", const="fp8", dest="weights", help="same as --weights fp8")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prefill", default="1024,8192")
    ap.add_argument("--prefill-chunk", default="2048,8192", help="chunk sizes: one TTFT row set each")
    ap.add_argument("--profile-prefill", type=int, default=8192, help="tokens of the profiled chunk")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--mtp-batches", default="1,8,32")
    ap.add_argument("--mtp-k", default="1,2,3")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-mtp", action="store_true")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; later parts are skipped")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel ranks (one process and GPU each)")
    args = ap.parse_args()
    if args.tp > 1:
        import torch.multiprocessing as mp
        from ling_runtime.model.parallel import free_loopback_port

        mp.start_processes(
            run, args=(args, args.tp, free_loopback_port()), nprocs=args.tp, start_method="spawn"
        )
    else:
        run(0, args, 1, 0)


def run(rank: int, args: argparse.Namespace, world: int, port: int) -> None:
    """The whole benchmark on one rank (TP: every rank runs the same steps; rank 0 reports)."""
    global RANK, WORLD
    RANK, WORLD = rank, world
    tp_kwargs: dict = {}
    if world > 1:
        from ling_runtime.model.parallel import init_process_group

        if CUDA:
            torch.cuda.set_device(rank)  # "cuda" below is this rank's GPU
        else:
            torch.set_num_threads(1)
        tp = init_process_group(rank, world, "127.0.0.1", port, backend="nccl" if CUDA else "gloo")
        tp_kwargs = {"tp_rank": rank, "tp_size": world, "tp_group": tp.group}
    if args.tiny:
        args.batches, args.ctx, args.prefill, args.prefill_chunk = "1,4", 40, "24,48", "32,48"
        args.profile_prefill = 48
        args.mtp_batches, args.mtp_k, args.iters = "1,2", "1,3", 1
    batches = [int(b) for b in args.batches.split(",")]
    cfg = build_config(args)
    dtype = torch.bfloat16 if CUDA else torch.float32
    fill_seed = 0
    RESULTS["config"] = {
        "layers": cfg.num_hidden_layers,
        "mla_layers": cfg.mla_layer_ids,
        "weights": args.weights,
        "fp8_block": cfg.fp8_block_size,
        "dtype": str(dtype),
        "mtp": True,
        "tiny": args.tiny,
        "tp": world,
    }
    t = time.time()
    model = LingForCausalLM(
        cfg,
        device=DEV,
        dtype=dtype,
        enable_mtp=True,
        weight_dtype="fp8" if args.weights == "fp8" else "model",
        **tp_kwargs,
    )
    RESULTS["build_s"] = time.time() - t
    release()  # MoE stacking at construction freed each layer's first expert tensors
    mem("built (zeros)")
    t = time.time()
    fill_random(model, seed=fill_seed)  # same seed on every rank: replicated weights agree
    sync()
    RESULTS["fill_s"] = time.time() - t
    release()  # the fill's fp32 draws are bounded chunks; hand their blocks back
    mem("random weights")
    wb = weight_bytes(model)
    RESULTS["weights"] = wb
    by_dtype: dict[str, float] = {}
    for p in model.parameters():
        by_dtype[str(p.dtype)] = by_dtype.get(str(p.dtype), 0.0) + p.numel() * p.element_size() / 1e9
    RESULTS["param_GB_by_dtype"] = by_dtype
    print("weights", wb, by_dtype, flush=True)
    # Read bandwidth as decode sees it: a GEMV over the model's own lm_head (1.29 GB bf16).
    w = model.lm_head.weight
    x = torch.randn(1, w.shape[1], device=DEV, dtype=w.dtype)
    read_bps = w.numel() * w.element_size() / time_calls(lambda i: torch.mm(x, w.T), iters=5, reps=10)
    if not CUDA:
        read_bps = 1e9
    RESULTS["read_Bps"] = read_bps
    save()

    # Most important first (the budget skips what would start late): graphed decode, TTFT, the
    # B=1 / prefill profiles, the eager speed-up at B=1, graphed MTP, eager MTP draft/verify.
    dec = part("decode", args.budget, lambda: decode_part(model, batches, args.ctx, args.iters, wb, read_bps))
    rows = dec["rows"] if isinstance(dec, dict) else RESULTS.get("decode_rows_so_far", [])
    if not args.skip_ttft:
        lengths = [int(n) for n in args.prefill.split(",")]
        chunks = [int(c) for c in str(args.prefill_chunk).split(",")]
        part("ttft", args.budget, lambda: ttft_part(model, lengths, chunks))
    g1 = next((r.get("step_ms") for r in rows if r.get("batch") == 1), None)
    if not args.skip_profile:
        part("profile_decode", args.budget, lambda: profile_decode_part(model, args.ctx, wb, read_bps, g1))
        part("profile_prefill", args.budget, lambda: profile_prefill_any(model, args.profile_prefill))
    if not args.skip_eager:
        part("eager", args.budget, lambda: eager_part(model, args.ctx, g1))
    if not args.skip_mtp:
        mtp_b = [int(b) for b in args.mtp_batches.split(",")]
        ks = [int(k) for k in args.mtp_k.split(",")]
        part(
            "mtp_graphs",
            args.budget,
            lambda: mtp_graph_part(model, mtp_b, args.ctx, max(ks), args.iters, rows),
        )
        part("mtp", args.budget, lambda: mtp_part(model, mtp_b, args.ctx, ks, rows))
    RESULTS["total_s"] = time.time() - T0
    mem("end")
    save()
    if RANK != 0:
        return
    if rows:
        cols = ["batch", "step_ms", "tok_s", "step_GB_uniform", "fraction_of_roofline_uniform",
                "distinct_experts_measured", "fraction_of_roofline_measured"]  # fmt: skip
        print(table(rows, cols))
    if isinstance(RESULTS.get("ttft"), dict) and "rows" in RESULTS["ttft"]:
        print(table(RESULTS["ttft"]["rows"], ["chunk", "prompt", "ttft_ms", "prefill_tok_s"]))
    if isinstance(RESULTS.get("mtp"), dict) and "rows" in RESULTS["mtp"]:
        print(table(RESULTS["mtp"]["rows"], ["batch", "draft_ms", *[f"verify_k{k}_ms" for k in (1, 2, 3)],
                                              "decode_graph_ms", "speedup_k3_a0.7", "speedup_k3_a0.8"]))  # fmt: skip
    if isinstance(RESULTS.get("mtp_graphs"), dict) and "rows" in RESULTS["mtp_graphs"]:
        cols = [
            "batch",
            "draft_ms",
            "verify_ms",
            "decode_graph_ms",
            "speedup_a0.6",
            "speedup_a0.7",
            "speedup_a0.8",
        ]
        print(table(RESULTS["mtp_graphs"]["rows"], cols))
    if isinstance(RESULTS.get("eager"), dict):
        print("eager B=1:", RESULTS["eager"])
    print(f"wrote gpu-full-model.json in {RESULTS['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
