"""MTP (NEXTN) steps in CUDA graphs: draft and verify replay costs, and the speed-up vs acceptance.

1. Check (tiny model, float32): greedy generation through the runner with the graph bodies (decode
   k=0, MTP k=1,2) == the runner's eager reference path, step by step. On CUDA the bodies are
   captured and replayed; with --tiny on the CPU they run eagerly (same code minus the capture)
   with the Triton kernels interpreted.
2. (CUDA only) Ling-2.6-flash dimensions, --layers N (default 2: Lightning+MoE, MLA+MoE) plus the
   MTP layer, bf16, random weights on the device, context --ctx: per batch B in --batches, replay
   time of the plain decode graph (t_decode, samples in the graph), the draft graph for k drafts
   (t_draft(k): MTP extend over k+1 rows + k-1 chained MTP steps, each with lm_head + greedy) and
   the verify graph (t_verify(k): target over B x (k+1) tokens, sampling, accept, commit), k=1..3,
   and the modelled speed-up at per-draft acceptance a:
   (1 + sum_{i=1..k} a^i) * t_decode / (t_draft + t_verify).

    python bench/gpu/mtp_graphs.py            # H200: writes $OUT/gpu-mtp-graphs.json (~1-2 min)
    python bench/gpu/mtp_graphs.py --tiny     # CPU smoke run: part 1 only, kernels interpreted
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch
from common import CUDA, DEV, environment, write_results
from ling_runtime.config import LingConfig
from ling_runtime.model import LingForCausalLM
from ling_runtime.runner.model_runner import ModelRunner
from ling_runtime.runner.plan import GREEDY, SeqWork, StepPlan
from ling_runtime.runner.spec_graphs import SpecGraphs
from ling_runtime.tiny import init_random_weights, tiny_config
from runtime_graphs import FLASH_DIMS, PAGE, fill_random

RESULTS: dict = {"env": environment()}
ACCEPTANCE = (0.5, 0.7, 0.9)


def save() -> None:
    write_results("gpu-mtp-graphs", RESULTS)


# ---- part 1: correctness through the engine's runner --------------------------------------------
def generate(
    runner: ModelRunner, prompts: list[list[int]], steps: int, k: int
) -> tuple[list[list[int]], int]:
    """Greedy decode driven like the engine (plans with commits, MTP extends, drafts): returns the
    tokens and the number of accepted drafts."""
    n = len(prompts)
    tables = [tuple(range(b * 8, b * 8 + 8)) for b in range(n)]
    res = runner.execute(
        StepPlan(
            tuple(
                SeqWork(slot=b, pages=tables[b], start=0, tokens=tuple(p), reset=True)
                for b, p in enumerate(prompts)
            )
        )
    )
    seqs = [[*p, int(r.logits[-1].argmax())] for p, r in zip(prompts, res.seqs, strict=True)]
    commit: list[int | None] = [None] * n
    mtp_start = [0] * n
    mtp_next = [tuple(s[1 : len(p) + 1]) for s, p in zip(seqs, prompts, strict=True)]
    accepted = 0
    while min(len(s) - len(p) for s, p in zip(seqs, prompts, strict=True)) < steps:
        works = tuple(
            SeqWork(
                slot=b, pages=tables[b], start=len(seqs[b]) - 1, tokens=(seqs[b][-1],), commit=commit[b],
                num_drafts=k, mtp_start=mtp_start[b], mtp_next_tokens=mtp_next[b] if k else (),
                logits=k + 1, sampling=GREEDY,
            )
            for b in range(n)
        )  # fmt: skip
        res = runner.execute(StepPlan(works))
        for b, r in enumerate(res.seqs):
            position = len(seqs[b]) - 1
            if r.tokens is not None:  # sampled on the device; an eager verify leaves the count to us
                took = r.num_accepted
                if took is None:
                    took = 0
                    while took < len(r.drafts) and r.tokens[took] == r.drafts[took]:
                        took += 1
                emitted = r.tokens[: took + 1]
            else:  # the eager path: host greedy acceptance over the returned logits
                targets = r.logits.argmax(-1).tolist()
                emitted = []
                for j, t in enumerate(targets):
                    emitted.append(t)
                    if j == len(r.drafts) or t != r.drafts[j]:
                        break
            accepted += len(emitted) - 1
            seqs[b].extend(emitted)
            commit[b] = len(emitted) if k else None
            mtp_start[b] = position
            mtp_next[b] = tuple(seqs[b][position + 1 : position + 1 + len(emitted)])
    return [s[len(p) : len(p) + steps] for s, p in zip(seqs, prompts, strict=True)], accepted


def tiny_part(steps: int) -> dict:
    cfg = LingConfig.from_hf(tiny_config(qk_rope_head_dim=16, vocab_size=8))
    model = LingForCausalLM(cfg, device=DEV, dtype=torch.float32, chunk_size=16, enable_mtp=True)
    init_random_weights(model, seed=5)
    prompts = [[(7 * i + 3 * b) % 8 for i in range(n)] for b, n in enumerate((5, 12, 20))]
    scratch = 3 * 8
    out: dict = {"cuda_graphs": CUDA}
    for k in (0, 1, 2):
        tokens = {}
        for name, kernels in (("reference", False), ("graphs", True)):
            model.set_use_kernels(kernels)
            cache = model.make_cache(
                num_slots=4, num_pages=scratch + 1, page_size=PAGE, max_spec_tokens=k + 1 if k else 0
            )
            runner = ModelRunner(model, cache, DEV)
            if kernels:
                runner.enable_cuda_graphs(
                    max_batch=4, max_pages=8, scratch_page=scratch, num_drafts=k, eager=not CUDA
                )
            tokens[name], acc = generate(runner, prompts, steps, k)
            out[f"k{k}_{name}_accepted"] = acc
        out[f"k{k}_greedy_equal"] = tokens["reference"] == tokens["graphs"]
        out[f"k{k}_tokens"] = tokens["graphs"]
        out[f"k{k}_graph_steps"] = runner.graph_steps
        out[f"k{k}_spec_graph_steps"] = runner.spec_graph_steps
    model.set_use_kernels(CUDA)
    return out


# ---- part 2: replay times at real dimensions -----------------------------------------------------
def wall(fn, n: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def time_spec(
    g: SpecGraphs,
    b: int,
    slots: list[int],
    pages: list[list[int]],
    toks: list[int],
    ctx: int,
    iters: int,
    t_dec: float,
) -> dict | None:
    """Draft and verify replay times of one bucket (inputs set once: every sequence knows k + 1
    new tokens, the most a step can bring), the whole step with its host copies and read, and the
    modelled speed-up."""
    if b not in g.buckets:
        return None  # b * (k + 1) above the grouped-MoE token limit
    k = g.k
    pos = [ctx] * b
    known = [[(t + j) % 1000 + 5 for j in range(k + 1)] for t in toks]
    starts = [ctx - k - 1] * b

    def step() -> None:
        g.draft(b, known, starts)
        g.verify(b, toks, pos)

    g.set_sequences(b, slots, pages)
    g.draft(b, known, starts)
    out = g.verify(b, toks, pos)
    t_draft = wall(lambda: g.replay_draft(b), iters)
    t_verify = wall(lambda: g.replay_verify(b), iters)
    t_step = wall(step, max(3, iters // 4))
    return {
        "t_draft_ms": t_draft * 1e3,
        "t_verify_ms": t_verify * 1e3,
        "t_step_with_host_ms": t_step * 1e3,
        "verify_over_decode": t_verify / t_dec,
        "draft_over_decode": t_draft / t_dec,
        "speedup": {
            str(a): (1 + sum(a**i for i in range(1, k + 1))) * t_dec / (t_draft + t_verify)
            for a in ACCEPTANCE
        },
        "accepted_random_weights": sum(out.num_accepted),
    }


def real_part(layers: int, batches: list[int], ks: list[int], ctx: int, iters: int) -> dict:
    dims = {**FLASH_DIMS, "num_hidden_layers": layers, "layer_group_size": min(layers, 8)}
    cfg = LingConfig.from_hf(tiny_config(**dims))
    t0 = time.time()
    model = LingForCausalLM(cfg, device=DEV, dtype=torch.bfloat16, enable_mtp=True)
    with torch.no_grad():
        fill_random(model, 0)
    init_s = time.time() - t0
    top = max(batches)
    pages_per = -(-(ctx + 8) // PAGE)
    scratch = top * pages_per
    cache = model.make_cache(
        num_slots=top, num_pages=scratch + 1, page_size=PAGE, max_spec_tokens=max(ks) + 1
    )
    runner = ModelRunner(model, cache, DEV)
    t0 = time.time()
    runner.enable_cuda_graphs(max_batch=top, max_pages=pages_per, scratch_page=scratch, buckets=batches)
    capture = {"decode_s": time.time() - t0}
    assert runner.graphs is not None
    spec: dict[int, SpecGraphs] = {}
    for k in ks:
        t0 = time.time()
        spec[k] = SpecGraphs(model, cache, DEV, top, pages_per, scratch, k, buckets=batches)
        spec[k].capture()
        capture[f"spec_k{k}_s"] = time.time() - t0
        RESULTS["capture_so_far"] = capture
        save()
    rows = []
    with torch.inference_mode():
        for b in batches:
            slots = list(range(b))
            pages = [list(range(s * pages_per, (s + 1) * pages_per)) for s in slots]
            toks = [(17 * s) % 1000 + 5 for s in slots]
            pos = [ctx] * b
            runner.graphs.replay(toks, pos, slots, pages, b)
            decode_graph = runner.graphs.graph_of(b, pages_per)
            assert decode_graph is not None
            row: dict = {"batch": b, "t_decode_ms": wall(decode_graph.replay, iters) * 1e3}
            for k in ks:
                row[f"k{k}"] = time_spec(spec[k], b, slots, pages, toks, ctx, iters, row["t_decode_ms"] / 1e3)
            rows.append(row)
            print(row, flush=True)
            RESULTS["rows_so_far"] = rows
            save()
    return {
        "config": f"flash dims, {layers} layers + MTP layer, bf16, lm_head 157184, random weights",
        "ctx": ctx,
        "init_s": init_s,
        "capture_s": capture,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: part 1 only, kernels interpreted")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--ks", default="1,2,3")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    t = time.time()
    RESULTS["tiny"] = tiny_part(args.steps)
    RESULTS["tiny"]["seconds"] = time.time() - t
    print("tiny:", RESULTS["tiny"], flush=True)
    save()
    if CUDA and not args.tiny:
        RESULTS["real_dims"] = real_part(
            args.layers,
            [int(b) for b in args.batches.split(",")],
            [int(k) for k in args.ks.split(",")],
            args.ctx,
            args.iters,
        )
        save()
    print("wrote gpu-mtp-graphs.json", flush=True)


if __name__ == "__main__":
    main()
