# ruff: noqa: B023  (each lambda is called at once by time_calls, inside its loop iteration)
"""Per-op GPU microbenchmarks: each op is checked against its torch reference (and fla where it has
a peer) at real sizes, then timed in CUDA graphs and reported as a ratio of the ceilings measured
in the same run.

    python3 bench/gpu/kernels.py            # on the H200 (writes $OUT/gpu-kernels.json)
    TRITON_INTERPRET=1 python3 bench/gpu/kernels.py --tiny   # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import math
import traceback

import torch
from common import CUDA, DEV, environment, measure_ceilings, relerr, table, time_calls, write_results
from ling_runtime.kernels.fp8 import fp8_linear, fp8_linear_ref, pick_config, quantize_fp8_blockwise
from ling_runtime.kernels.lightning import (
    lightning_decode,
    lightning_decode_ref,
    lightning_prefill_ref,
    lightning_slopes,
    lightning_verify,
    lightning_verify_ref,
)
from ling_runtime.kernels.lightning_chunk import (
    PrefillConfig,
    chunk_states,
    lightning_prefill_chunked,
    prefill_config,
)
from ling_runtime.kernels.mla import MlaConfig, mla_config, mla_decode, mla_decode_ref
from ling_runtime.kernels.moe import fused_moe, fused_moe_ref, moe_config, moe_route, moe_route_ref
from ling_runtime.kernels.moe_prefill import MoeConfig
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

REAL = dict(H=32, D=128, hid=4096, E=256, I=1024, topk=8, ngroup=8, topkg=4, vocab=157184, mh=32, lora=512,
            rope=64, ctx=4096, page=64, batches=[1, 8, 32, 128], prefill=[1024, 4096, 16384], bv=32, chunk=64)  # fmt: skip
TINY = dict(H=2, D=32, hid=128, E=16, I=64, topk=4, ngroup=4, topkg=2, vocab=5000, mh=4, lora=32,
            rope=16, ctx=64, page=16, batches=[1, 3], prefill=[40], bv=16, chunk=16)  # fmt: skip

ROWS: list[dict] = []
CEIL: dict[str, float] = {}


def record(
    op: str, shape: str, variant: str, sec: float, nbytes: float, err: float | None, **extra: object
) -> None:
    row = {"op": op, "shape": shape, "variant": variant, "us": sec * 1e6, "GBps": nbytes / sec / 1e9}
    row["x_read"] = nbytes / sec / CEIL["read_Bps"]
    row["x_copy"] = nbytes / sec / CEIL["copy_Bps"]
    row["relerr"] = err
    row.update(extra)
    ROWS.append(row)
    print(row, flush=True)


def guarded(fn):
    """Run a section; a failure is recorded and the suite goes on (one call must return everything)."""

    def run(*a, **k):
        try:
            fn(*a, **k)
        except Exception:
            tb = traceback.format_exc()
            print(f"SECTION {fn.__name__} FAILED\n{tb}", flush=True)
            ROWS.append({"op": fn.__name__, "error": tb[-1500:]})

    return run


def fla_ops():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        return chunk_simple_gla, fused_recurrent_simple_gla
    except Exception as exc:
        print("fla not available:", repr(exc))
        return None, None


@guarded
def bench_lightning_decode(d: dict) -> None:
    h, dim = d["H"], d["D"]
    scale = dim**-0.5
    slope = lightning_slopes(h, 3, 32).to(DEV)
    sets = 8
    nslots = sets * max(d["batches"])
    state = torch.randn(nslots, h, dim, dim, device=DEV) * 0.05
    _, fla_rec = fla_ops()
    for b in d["batches"]:
        slots = torch.randperm(nslots, device=DEV)[: sets * b].view(sets, b).to(torch.int32)
        q, k, v = (torch.randn(sets, b, h, dim, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        mini = state[slots[0].long()].clone()
        ref = lightning_decode_ref(q[0], k[0], v[0], mini, torch.arange(b, device=DEV), slope, scale)
        before = state[slots[0].long()].clone()
        out = lightning_decode(q[0], k[0], v[0], state, slots[0], slope, scale, block_v=d["bv"])
        err = max(relerr(out, ref), relerr(state[slots[0].long()], mini))
        nbytes = b * h * dim * dim * 4 * 2 + 4 * b * h * dim * 2
        for bv in sorted({d["bv"], 2 * d["bv"]}):
            t = time_calls(lambda i, bv=bv: lightning_decode(q[i % sets], k[i % sets], v[i % sets], state,
                                                            slots[i % sets], slope, scale, block_v=bv), iters=16)  # fmt: skip
            record("lightning_decode", f"B={b} H={h} D={dim} fp32 state", f"ours bv={bv}", t, nbytes, err)
        if fla_rec is not None:
            h0 = [before.clone() for _ in range(2)]
            o_fla, _ = fla_rec(q[0][:, None], k[0][:, None], v[0][:, None], g_gamma=-slope, scale=scale,
                               initial_state=h0[0], output_final_state=True)  # fmt: skip
            err_peer = relerr(out, o_fla[:, 0])
            t = time_calls(lambda i: fla_rec(q[i % sets][:, None], k[i % sets][:, None], v[i % sets][:, None],
                                             g_gamma=-slope, scale=scale, initial_state=h0[i % 2],
                                             output_final_state=True), iters=16)  # fmt: skip
            record("lightning_decode", f"B={b} H={h} D={dim} fp32 state", "fla fused_recurrent (out-of-place)",
                   t, nbytes, err_peer)  # fmt: skip


@guarded
def bench_lightning_verify(d: dict) -> None:
    h, dim, steps = d["H"], d["D"], 4
    scale = dim**-0.5
    slope = lightning_slopes(h, 9, 32).to(DEV)
    for b in [x for x in d["batches"] if x <= 32]:
        state = torch.randn(2 * b, h, dim, dim, device=DEV) * 0.05
        slots = torch.arange(b, device=DEV, dtype=torch.int32)
        q, k, v = (torch.randn(b, steps, h, dim, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        inter = torch.empty(b, steps, h, dim, dim, device=DEV)
        ro, ri = lightning_verify_ref(q, k, v, state, slots, slope, scale)
        o, _ = lightning_verify(q, k, v, state, slots, slope, scale, inter=inter, block_v=d["bv"])
        err = max(relerr(o, ro), relerr(inter, ri))
        nbytes = b * h * dim * dim * 4 * (1 + steps)
        t = time_calls(lambda i: lightning_verify(q, k, v, state, slots, slope, scale, inter=inter,
                                                  block_v=d["bv"]), iters=10)  # fmt: skip
        record("lightning_verify", f"B={b} T={steps}", "ours", t, nbytes, err)


@guarded
def bench_lightning_prefill(d: dict) -> None:
    h, dim = d["H"], d["D"]
    scale = dim**-0.5
    slope = lightning_slopes(h, 1, 32).to(DEV)
    fla_chunk, _ = fla_ops()
    state = torch.zeros(4, h, dim, dim, device=DEV)
    slots = torch.tensor([0], device=DEV, dtype=torch.int32)
    no_init = torch.tensor([0], device=DEV, dtype=torch.int32)
    for t_len in d["prefill"]:
        q, k, v = (torch.randn(t_len, h, dim, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, t_len], device=DEV, dtype=torch.int32)
        nbytes = 4 * t_len * h * dim * 2
        ref = None
        if t_len <= 4096:
            ref_state = state.clone()
            ref = lightning_prefill_ref(q, k, v, ref_state, slots, cu, no_init, slope, scale)
        o_fla = None
        if fla_chunk is not None:
            o_fla, _ = fla_chunk(
                q[None], k[None], v[None], g_gamma=-slope, scale=scale, output_final_state=True
            )
            o_fla = o_fla[0]
            t_fla_eager = time_calls(lambda i: fla_chunk(q[None], k[None], v[None], g_gamma=-slope, scale=scale,
                                                         output_final_state=True), iters=5, graph=False)  # fmt: skip
            try:
                t_fla = time_calls(lambda i: fla_chunk(q[None], k[None], v[None], g_gamma=-slope, scale=scale,
                                                       output_final_state=True), iters=5)  # fmt: skip
            except Exception as exc:
                print("fla chunk in graph failed:", repr(exc)[:200])
                t_fla = t_fla_eager
            err_fla = relerr(o_fla, ref) if ref is not None else None
            record(
                "lightning_prefill",
                f"T={t_len} H={h}",
                "fla chunk_simple_gla (graph)",
                t_fla,
                nbytes,
                err_fla,
            )
            record("lightning_prefill", f"T={t_len} H={h}", "fla chunk_simple_gla (eager)", t_fla_eager, nbytes,
                   err_fla)  # fmt: skip
        # The dispatched config first, then a few others (block sizes, warps, stages per stage).
        cvars = [
            prefill_config(t_len, 1),
            PrefillConfig(64, 64, 64, 4, 2, 64, 4, 2),
            PrefillConfig(64, 64, 64, 4, 4, 64, 4, 3),
            PrefillConfig(128, 64, 64, 4, 2, 64, 8, 2),
            PrefillConfig(64, 64, 64, 8, 4, 64, 4, 3, block_ptr1=True, block_ptr2=True),
            PrefillConfig(64, 64, 64, 8, 4, 64, 4, 3, fp32_states=True),  # fp32 chunk states: accuracy, cost
        ]
        if not CUDA:
            cvars = [PrefillConfig(16, 16, 16, 4, 2, 16, 4, 2)]
        for cfg in cvars:
            out = lightning_prefill_chunked(q, k, v, state, slots, cu, no_init, slope, scale, config=cfg)
            err = relerr(out, ref) if ref is not None else None
            err_peer = relerr(out, o_fla) if o_fla is not None else None
            t = time_calls(
                lambda i, cfg=cfg: lightning_prefill_chunked(
                    q, k, v, state, slots, cu, no_init, slope, scale, config=cfg
                ),
                iters=5,
            )
            record("lightning_prefill", f"T={t_len} H={h}", f"ours chunk-parallel {cfg.tag()}", t, nbytes, err,
                   relerr_vs_fla=err_peer)  # fmt: skip
        for cfg in cvars[:1] if CUDA else []:  # stage 1 (the sequential state walk) alone
            t = time_calls(
                lambda i, cfg=cfg: chunk_states(k, v, state, slots, cu, no_init, slope, cfg), iters=5
            )
            record("lightning_prefill", f"T={t_len} H={h}", f"ours chunk-parallel stage 1 only {cfg.tag()}", t,
                   2 * t_len * h * dim * 2, None)  # fmt: skip
    if CUDA:  # varlen: 8 sequences of 2K packed, each with its own carried state
        n, each = 8, 2048
        q, k, v = (torch.randn(n * each, h, dim, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        cu = torch.arange(0, n * each + 1, each, device=DEV, dtype=torch.int32)
        st = torch.randn(n, h, dim, dim, device=DEV) * 0.05
        sl = torch.arange(n, device=DEV, dtype=torch.int32)
        init = torch.ones(n, device=DEV, dtype=torch.int32)
        t = time_calls(lambda i: lightning_prefill_chunked(q, k, v, st, sl, cu, init, slope, scale), iters=5)
        record(
            "lightning_prefill",
            "varlen 8x2K H=32",
            "ours chunk-parallel",
            t,
            4 * n * each * h * dim * 2,
            None,
        )
        if fla_chunk is not None:
            cu64 = cu.long()
            t = time_calls(lambda i: fla_chunk(q[None], k[None], v[None], g_gamma=-slope, scale=scale,
                                               initial_state=st, output_final_state=True, cu_seqlens=cu64),
                           iters=5, graph=False)  # fmt: skip
            record(
                "lightning_prefill",
                "varlen 8x2K H=32",
                "fla chunk (eager)",
                t,
                4 * n * each * h * dim * 2,
                None,
            )


@guarded
def bench_moe(d: dict) -> None:
    hid, n_exp, inter, topk = d["hid"], d["E"], d["I"], d["topk"]
    w13 = torch.randn(n_exp + 1, 2 * inter, hid, device=DEV, dtype=torch.bfloat16) * hid**-0.5
    w2 = torch.randn(n_exp + 1, hid, inter, device=DEV, dtype=torch.bfloat16) * inter**-0.5
    wg = torch.randn(n_exp, hid, device=DEV) * hid**-0.5
    bias = torch.randn(n_exp, device=DEV) * 0.1
    expert_bytes = 3 * inter * hid * 2
    sets = 4
    for b in d["batches"]:
        xs = torch.randn(sets, b, hid, device=DEV, dtype=torch.bfloat16)
        routed = [
            moe_route_ref(xs[s].float() @ wg.T, bias, topk, d["ngroup"], d["topkg"], 2.5) for s in range(sets)
        ]
        ids = torch.stack([r[0] for r in routed])
        wts = torch.stack([r[1] for r in routed])
        # Router kernel: same ids as the reference, and its time with the fp32 logits GEMM.
        logits = xs[0].float() @ wg.T
        rid, rw = moe_route(logits, bias, topk, d["ngroup"], d["topkg"], 2.5)
        r_err = 0.0 if torch.equal(rid, ids[0]) else 1.0
        t = time_calls(lambda i: moe_route(logits, bias, topk, d["ngroup"], d["topkg"], 2.5), iters=20)
        record(
            "moe_router",
            f"B={b} E={n_exp}",
            "fused kernel only",
            t,
            0.0,
            r_err,
            weight_err=relerr(rw, wts[0]),
        )
        t = time_calls(lambda i: moe_route(xs[i % sets].float() @ wg.T, bias, topk, d["ngroup"], d["topkg"], 2.5),
                       iters=20)  # fmt: skip
        record("moe_router", f"B={b} E={n_exp}", "fp32 GEMM + fused kernel", t, n_exp * hid * 4, r_err)
        distinct = sum(len(torch.unique(ids[s])) for s in range(sets)) / sets
        nbytes = distinct * expert_bytes
        ref = fused_moe_ref(xs[0], w13, w2, ids[0], wts[0])
        # The dispatched config first, then decode-tile alternatives.
        variants = [moe_config(b, inter, hid)]
        if not CUDA:
            variants = [MoeConfig("decode", 16, (16, 16), (32, 32), (4, 4), (3, 3))]
        elif b < 128:
            variants += [
                MoeConfig("decode", 16, (32, 64), (128, 128), (4, 4), (4, 4)),
                MoeConfig("decode", 16, (64, 64), (128, 128), (4, 4), (3, 3), dense_shared=b < 64),
                MoeConfig("decode", 32, (64, 64), (128, 128), (4, 4), (3, 3), dense_shared=b >= 32),
            ]
        for cfg in variants:
            out = fused_moe(xs[0], w13, w2, ids[0], wts[0], config=cfg)
            err = relerr(out, ref)
            t = time_calls(
                lambda i, cfg=cfg: fused_moe(xs[i % sets], w13, w2, ids[i % sets], wts[i % sets], config=cfg),
                iters=8,
            )
            record(
                "fused_moe", f"B={b} E={n_exp}+1 I={inter} distinct={distinct:.0f}", cfg.tag(), t, nbytes, err
            )
        if b in (1, 8):
            t = time_calls(lambda i: fused_moe_ref(xs[i % sets], w13, w2, ids[i % sets], wts[i % sets]), iters=4,
                           graph=False)  # fmt: skip
            record("fused_moe", f"B={b} E={n_exp}+1 I={inter} distinct={distinct:.0f}", "torch eager reference",
                   t, nbytes, 0.0)  # fmt: skip
    w13 = w2 = None  # free the memory before the next section


@guarded
def bench_mla(d: dict) -> None:
    heads, lora, rope, ctx, page = d["mh"], d["lora"], d["rope"], d["ctx"], d["page"]
    scale = (128 + 64) ** -0.5
    for b in d["batches"]:
        per_call = b * ctx * (lora + rope) * 2
        sets = max(2, min(64, math.ceil(256e6 / per_call))) if CUDA else 1
        ppseq = ctx // page
        kv = torch.randn(sets * b * ppseq, page, lora + rope, device=DEV, dtype=torch.bfloat16)
        tables = torch.randperm(sets * b * ppseq, device=DEV).view(sets, b, ppseq).to(torch.int32)
        lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
        lens[0] = ctx - 37  # one ragged sequence
        q = torch.randn(sets, b, heads, lora + rope, device=DEV, dtype=torch.bfloat16)
        ref = mla_decode_ref(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora)
        out = mla_decode(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora)
        t = time_calls(
            lambda i: mla_decode(q[i % sets], kv, tables[i % sets], lens, scale, kv_lora_rank=lora), iters=16
        )
        record("mla_decode", f"B={b} ctx={ctx} h={heads}", "library defaults", t, per_call, relerr(out, ref))
        # Split counts and tiles around the dispatched config (a split count is no recompile).
        base = mla_config(b)
        bn = base.block_n if CUDA else 16
        for cfg in [
            MlaConfig(base.num_splits, bn, base.num_warps, 2),
            MlaConfig(2 * base.num_splits, bn, base.num_warps),
            MlaConfig(max(1, base.num_splits // 2), bn, base.num_warps),
            MlaConfig(base.num_splits, bn, 12 - base.num_warps),
        ]:
            out = mla_decode(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora, config=cfg)
            err = relerr(out, ref)
            t = time_calls(
                lambda i, cfg=cfg: mla_decode(
                    q[i % sets], kv, tables[i % sets], lens, scale, kv_lora_rank=lora, config=cfg
                ),
                iters=16,
            )
            record("mla_decode", f"B={b} ctx={ctx} h={heads}", cfg.tag(), t, per_call, err)
        kv = None  # free the memory before the next section


@guarded
def bench_small_ops(d: dict) -> None:
    hid, h, dim, vocab = d["hid"], d["H"], d["D"], d["vocab"]
    for b in [1, 32] if CUDA else [2]:
        x = torch.randn(b, hid, device=DEV, dtype=torch.bfloat16)
        res = torch.randn(b, hid, device=DEV, dtype=torch.bfloat16)
        w = torch.rand(hid, device=DEV) + 0.5
        ry, _ = add_rmsnorm_ref(x, res.clone(), w, 1e-6)
        y, _ = add_rmsnorm(x, res.clone(), w, 1e-6)
        nb = 3 * b * hid * 2
        record("add_rmsnorm", f"B={b} N={hid}", "ours", time_calls(lambda i: add_rmsnorm(x, res, w, 1e-6)), nb,
               relerr(y, ry))  # fmt: skip
        record("add_rmsnorm", f"B={b} N={hid}", "torch ref", time_calls(lambda i: add_rmsnorm_ref(x, res, w, 1e-6)),
               nb, 0.0)  # fmt: skip
        qkv = torch.randn(b, 3 * h * dim, device=DEV, dtype=torch.bfloat16)
        wq, wk = torch.rand(dim, device=DEV) + 0.5, torch.rand(dim, device=DEV) + 0.5
        cos, sin = rope_cos_sin(torch.arange(b, device=DEV) * 97, dim // 2, 6e6)
        got = qk_norm_rope(qkv, wq, wk, cos, sin, h, 1e-6)
        want = qk_norm_rope_ref(qkv, wq, wk, cos, sin, h, 1e-6)
        err = max(relerr(a, c) for a, c in zip(got, want, strict=True))
        nb = 2 * qkv.numel() * 2
        record("qk_norm_rope", f"B={b} H={h} D={dim}", "ours",
               time_calls(lambda i: qk_norm_rope(qkv, wq, wk, cos, sin, h, 1e-6)), nb, err)  # fmt: skip
        record("qk_norm_rope", f"B={b} H={h} D={dim}", "torch ref",
               time_calls(lambda i: qk_norm_rope_ref(qkv, wq, wk, cos, sin, h, 1e-6)), nb, 0.0)  # fmt: skip
        o = torch.randn(b, h * dim, device=DEV)
        g = torch.randn(b, h * dim, device=DEV, dtype=torch.bfloat16)
        wn = torch.rand(h * dim, device=DEV) + 0.5
        grp = h * dim // 4
        err = relerr(group_rmsnorm_gate(o, g, wn, grp, 1e-6), group_rmsnorm_gate_ref(o, g, wn, grp, 1e-6))
        nb = o.numel() * 4 + 2 * g.numel() * 2
        record("group_rmsnorm_gate", f"B={b} N={h * dim}", "ours",
               time_calls(lambda i: group_rmsnorm_gate(o, g, wn, grp, 1e-6)), nb, err)  # fmt: skip
        record("group_rmsnorm_gate", f"B={b} N={h * dim}", "torch ref",
               time_calls(lambda i: group_rmsnorm_gate_ref(o, g, wn, grp, 1e-6)), nb, 0.0)  # fmt: skip
        logits = torch.randn(b, vocab, device=DEV)
        u = torch.rand(b, vocab, device=DEV)
        temp = torch.full((b,), 0.8, device=DEV)
        zero = torch.zeros(b, device=DEV)
        err = 0.0 if torch.equal(sample(logits, temp, u), sample_ref(logits, temp, u)) else 1.0
        err_g = 0.0 if torch.equal(sample(logits, zero), logits.argmax(-1).int()) else 1.0
        nb = logits.numel() * 4
        record(
            "sample_greedy", f"B={b} V={vocab}", "ours", time_calls(lambda i: sample(logits, zero)), nb, err_g
        )
        record(
            "sample_greedy",
            f"B={b} V={vocab}",
            "torch argmax",
            time_calls(lambda i: logits.argmax(-1)),
            nb,
            0.0,
        )
        record("sample_temperature", f"B={b} V={vocab}", "ours (gumbel)",
               time_calls(lambda i: sample(logits, temp, u)), 2 * nb, err)  # fmt: skip
        record("sample_temperature", f"B={b} V={vocab}", "torch ref",
               time_calls(lambda i: sample_ref(logits, temp, u)), 2 * nb, 0.0)  # fmt: skip


@guarded
def bench_fp8(d: dict) -> None:
    hid = d["hid"]
    shapes = [("qkv", 3 * hid, hid), ("dense", hid, hid), ("lm_head", d["vocab"] // 128 * 128, hid)]
    for name, n, k in shapes:
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * k**-0.5
        wq, sc = quantize_fp8_blockwise(w)
        for m in [1, 32, 128] if CUDA else [3]:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            err = relerr(fp8_linear(x, wq, sc), fp8_linear_ref(x, wq, sc))
            cfg = pick_config(m, n, k)
            t = time_calls(lambda i: fp8_linear(x, wq, sc), iters=10)
            record("fp8_linear", f"{name} {n}x{k} M={m}", f"ours default {cfg.tag()}", t, n * k, err)
            t = time_calls(lambda i: torch.mm(x, w.T), iters=10)
            record("bf16_linear", f"{name} {n}x{k} M={m}", "cuBLAS bf16", t, n * k * 2, 0.0)
        w = wq = None  # free the memory before the next section


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--only", default="", help="comma list of sections")
    args = ap.parse_args()
    d = TINY if args.tiny else REAL
    torch.manual_seed(0)
    CEIL.update(measure_ceilings(args.tiny))
    print("ceilings", CEIL, flush=True)
    sections = {
        "ldecode": bench_lightning_decode,
        "lverify": bench_lightning_verify,
        "moe": bench_moe,
        "mla": bench_mla,
        "small": bench_small_ops,
        "fp8": bench_fp8,
        "lprefill": bench_lightning_prefill,
    }
    for name, fn in sections.items():
        if not args.only or name in args.only.split(","):
            fn(d)
            if CUDA:
                torch.cuda.empty_cache()
            # Written after every section so a run cut short still returns what it measured.
            write_results("gpu-kernels", {"env": environment(), "ceilings": CEIL, "rows": ROWS})
    ok = [r for r in ROWS if "us" in r]
    print(table(ok, ["op", "shape", "variant", "us", "GBps", "x_read", "x_copy", "relerr"]))
    for r in ROWS:
        if "error" in r:
            print("ERROR in", r["op"], r["error"][-400:])


if __name__ == "__main__":
    main()
