"""The engine's model runner with the Triton path and decode CUDA graphs, end to end.

1. Tiny model (float32): greedy tokens of the runner (kernels + graphs on CUDA; kernels eagerly
   under TRITON_INTERPRET=1 with --tiny on CPU) == the plain-torch eager reference, 3 sequences of
   different prompt lengths (decode steps pad 3 -> bucket 4), then the max |logit diff|.
2. (CUDA only) Ling-2.6-flash dimensions, 2 layers (Lightning+MoE, MLA+MoE), bf16, random weights
   drawn on the device: decode step time at batch 1/8/32 (context --ctx) as graph replay vs the same
   kernels eagerly vs the plain-torch reference (batch 1), against the step's bytes over the read
   bandwidth measured in this run (GEMV over the model's own 1.29 GB lm_head).

    python bench/gpu/runtime_graphs.py          # on the H200: writes $OUT/gpu-runtime-graphs.json
    python bench/gpu/runtime_graphs.py --tiny   # CPU smoke run (part 1 only)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch
from common import CUDA, DEV, environment, time_calls, write_results
from ling_runtime.config import LingConfig
from ling_runtime.model import ForwardBatch, LingForCausalLM
from ling_runtime.runner.model_runner import ModelRunner
from ling_runtime.runner.plan import SeqWork, StepPlan
from ling_runtime.tiny import init_random_weights, tiny_config

PAGE = 16
# Ling-2.6-flash's dimensions (as tests/model/conftest.py flash_config, which imports pytest: the
# GPU image has none), cut to 2 layers: layer 0 Lightning, layer 1 MLA, both MoE.
FLASH_DIMS = {
    "vocab_size": 157184, "hidden_size": 4096, "intermediate_size": 9216, "moe_intermediate_size": 1024,
    "num_hidden_layers": 2, "layer_group_size": 2, "first_k_dense_replace": 0, "num_attention_heads": 32,
    "num_key_value_heads": 32, "head_dim": 128, "group_norm_size": 4, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "rope_theta": 6_000_000.0, "max_position_embeddings": 131072, "num_experts": 256,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "torch_dtype": "bfloat16",
}  # fmt: skip
RESULTS: dict = {"env": environment()}


def save() -> None:
    """Write what exists so far: a run cut short by its time limit still reports its parts."""
    write_results("gpu-runtime-graphs", RESULTS)


def tiny_part(steps: int) -> dict:
    cfg = LingConfig.from_hf(tiny_config(qk_rope_head_dim=16))
    model = LingForCausalLM(cfg, device=DEV, dtype=torch.float32, chunk_size=16, use_kernels=False)
    init_random_weights(model, seed=5)
    prompts = [[(7 * i + 3 * b) % 500 + 3 for i in range(n)] for b, n in enumerate((5, 23, 40))]
    tables = [list(range(b * 8, b * 8 + 8)) for b in range(3)]
    scratch = 3 * 8
    tokens: dict[str, list[list[int]]] = {}
    last_logits: dict[str, torch.Tensor] = {}
    runners = {}
    for name, kernels in (("reference", False), ("kernels", True)):
        model.set_use_kernels(kernels)
        cache = model.make_cache(num_slots=4, num_pages=scratch + 1, page_size=PAGE)
        runner = ModelRunner(model, cache, DEV)
        if kernels and CUDA:
            runner.enable_cuda_graphs(max_batch=4, max_pages=8, scratch_page=scratch)
        runners[name] = runner
        works = tuple(
            SeqWork(slot=b, pages=tuple(tables[b]), start=0, tokens=tuple(p), reset=True)
            for b, p in enumerate(prompts)
        )
        res = runner.execute(StepPlan(works))
        out = [[int(r.logits[-1].argmax())] for r in res.seqs]
        for s in range(steps):
            works = tuple(
                SeqWork(slot=b, pages=tuple(tables[b]), start=len(prompts[b]) + s, tokens=(out[b][-1],))
                for b in range(3)
            )
            res = runner.execute(StepPlan(works))
            for b, r in enumerate(res.seqs):
                out[b].append(int(r.logits[-1].argmax()))
        tokens[name] = out
        last_logits[name] = torch.cat([r.logits for r in res.seqs])
    return {
        "greedy_equal": tokens["reference"] == tokens["kernels"],
        "tokens_kernels": tokens["kernels"],
        "tokens_reference": tokens["reference"],
        "last_step_max_abs_logit_diff": float(
            (last_logits["reference"] - last_logits["kernels"]).abs().max()
        ),
        "graph_steps": runners["kernels"].graph_steps,
        "cuda_graphs": CUDA,
    }


def fill_random(model: torch.nn.Module, seed: int) -> None:
    """Random weights drawn on the device (seconds, where tiny.init_random_weights draws 8B values on
    the CPU): norms 1, router/expert bias small, everything else N(0, 1/fan_in)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            if "bias" in name:
                p.normal_(0, 0.01, generator=g)
            else:
                p.fill_(1.0)
        else:
            p.normal_(0, p.shape[-1] ** -0.5, generator=g)


def real_part(batches: list[int], ctx: int, iters: int) -> dict:
    cfg = LingConfig.from_hf(tiny_config(**FLASH_DIMS))
    t0 = time.time()
    model = LingForCausalLM(cfg, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        fill_random(model, 0)
    init_s = time.time() - t0
    top = max(batches)
    pages_per = -(-(ctx + 8) // PAGE)
    scratch = top * pages_per
    cache = model.make_cache(num_slots=top, num_pages=scratch + 1, page_size=PAGE)
    runner = ModelRunner(model, cache, DEV)
    t0 = time.time()
    runner.enable_cuda_graphs(max_batch=top, max_pages=pages_per, scratch_page=scratch, buckets=batches)
    capture_s = time.time() - t0
    assert runner.graphs is not None
    w = model.lm_head.weight
    x = torch.randn(1, w.shape[1], device=DEV, dtype=w.dtype)
    read_bps = w.numel() * w.element_size() / time_calls(lambda i: torch.mm(x, w.T), iters=5, reps=10)

    # Bytes one decode step must read (+ write for the Lightning state), per layer kind.
    c = cfg
    expert_bytes = 3 * c.moe_intermediate_size * c.hidden_size * 2
    dense = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if not n.endswith(("w13", "w2")) and "word_embeddings" not in n
    )
    heads, d = c.num_attention_heads, c.head_dim

    def step_bytes(b: int) -> float:
        e, k = c.num_experts, c.num_experts_per_tok
        distinct = e * (1 - (1 - k / e) ** b)  # expected distinct experts under uniform routing
        moe_layers = sum(1 for i in range(c.num_hidden_layers) if c.is_moe_layer(i))
        lin_layers = len(c.linear_layer_ids)
        mla_layers = len(c.mla_layer_ids)
        return (
            dense
            + moe_layers * distinct * expert_bytes
            + lin_layers * b * heads * d * d * 4 * 2
            + mla_layers * b * (ctx + 1) * c.kv_cache_dim * 2
        )

    def bench_batch(b: int) -> dict:
        slots = list(range(b))
        pages = [list(range(s * pages_per, (s + 1) * pages_per)) for s in slots]
        toks = [(17 * s) % 1000 + 5 for s in slots]
        pos = [ctx] * b
        bucket = runner.graphs.bucket_for(b, pages_per)
        assert bucket == b

        def replay() -> None:
            runner.graphs.replay(toks, pos, slots, pages, b)  # type: ignore[union-attr]

        def eager(kernels: bool) -> None:
            model.set_use_kernels(kernels)
            batch = ForwardBatch.build([[t] for t in toks], pos, slots, pages, device=DEV)
            model.compute_logits(model(batch, cache))

        def wall(fn: Callable[[], object], n: int) -> float:
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t) / n

        with torch.inference_mode():
            t_graph = wall(replay, iters)
            t_eager = wall(lambda: eager(True), max(3, iters // 4))
            t_ref = wall(lambda: eager(False), 3) if b == 1 else None
            model.set_use_kernels(True)
            plan = StepPlan(
                tuple(SeqWork(slot=s, pages=tuple(pages[s]), start=ctx, tokens=(toks[s],)) for s in slots)
            )
            t_runner = wall(lambda: runner.execute(plan), max(3, iters // 4))
        by = step_bytes(b)
        roof = by / read_bps
        return {
            "batch": b,
            "graph_step_ms": t_graph * 1e3,
            "eager_kernels_step_ms": t_eager * 1e3,
            "eager_reference_step_ms": t_ref * 1e3 if t_ref else None,
            "runner_execute_ms": t_runner * 1e3,
            "graph_tok_s": b / t_graph,
            "eager_kernels_tok_s": b / t_eager,
            "graph_speedup_vs_eager_kernels": t_eager / t_graph,
            "step_bytes": by,
            "roofline_step_ms": roof * 1e3,
            "graph_fraction_of_roofline": roof / t_graph,
        }

    rows = []
    for b in batches:
        rows.append(bench_batch(b))
        print(rows[-1], flush=True)
        RESULTS["real_dims_rows_so_far"] = rows
        save()
    return {
        "config": "flash dims, 2 layers (0 Lightning+MoE, 1 MLA+MoE), bf16, lm_head 157184, random weights",
        "ctx": ctx,
        "read_Bps": read_bps,
        "init_s": init_s,
        "capture_s": capture_s,
        "graph_steps_from_runner": runner.graph_steps,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: part 1 only, kernels interpreted")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    t = time.time()
    RESULTS["tiny"] = tiny_part(args.steps)
    RESULTS["tiny"]["seconds"] = time.time() - t
    print("tiny:", RESULTS["tiny"], flush=True)
    save()
    if CUDA and not args.tiny:
        RESULTS["real_dims"] = real_part([int(b) for b in args.batches.split(",")], args.ctx, args.iters)
        save()
    print("wrote gpu-runtime-graphs.json", flush=True)


if __name__ == "__main__":
    main()
