# ruff: noqa: B023  (each lambda is called at once by time_calls, inside its loop iteration)
"""What production gets: every kernel entry point with the config its dispatch picks (no tile
arguments), checked against its torch reference and timed in CUDA graphs at the real sizes of the
rows that bench/results/gpu.md records (MoE, MLA, FP8 linears, Lightning, small ops).

It calls only the entry points' stable signatures, so the same script measures two trees in one
GPU call: copy it into the other tree's bench/gpu/ (its common.py puts that tree's runtime first
on the path) and compare the two JSON files.

    python3 bench/gpu/defaults.py --label after            # $OUT/gpu-defaults-after.json
    python3 bench/gpu/defaults.py --warm                   # compile only (run several in parallel)
    TRITON_INTERPRET=1 python3 bench/gpu/defaults.py --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable

import torch
from common import CUDA, DEV, environment, measure_ceilings, relerr, table, time_calls, write_results
from ling_runtime.kernels import (
    add_rmsnorm,
    add_rmsnorm_ref,
    fp8_linear,
    fp8_linear_ref,
    fused_moe,
    fused_moe_ref,
    lightning_decode,
    lightning_decode_ref,
    lightning_prefill_chunked,
    lightning_prefill_ref,
    lightning_slopes,
    mla_decode,
    mla_decode_ref,
    moe_route,
    quantize_fp8_blockwise,
    sample,
)
from ling_runtime.kernels.mla_prefill import mla_prefill, mla_prefill_ref

REAL = dict(hid=4096, E=256, I=1024, H=32, D=128, lora=512, rope=64, ctx=4096, page=64, vocab=157184,
            moe=[("fp8", 1), ("fp8", 8), ("fp8", 32), ("fp8", 128), ("bf16", 1), ("fp8", 1024)],
            mla=[1, 8, 32, 128], ldecode=[1, 128], lprefill=[1024, 4096, 16384], mla_prefill=8192,
            fp8=[("qkv", 12288, 4096, 1), ("dense", 4096, 4096, 1), ("gate_up", 18432, 4096, 1),
                 ("down", 4096, 9216, 1), ("lm_head", 157184, 4096, 1), ("qkv", 12288, 4096, 8),
                 ("gate_up", 18432, 4096, 32), ("qkv", 12288, 4096, 128)])  # fmt: skip
TINY = dict(hid=256, E=8, I=128, H=2, D=32, lora=32, rope=16, ctx=64, page=16, vocab=5000,
            moe=[("fp8", 2), ("bf16", 2)], mla=[2], ldecode=[2], lprefill=[40], mla_prefill=40,
            fp8=[("qkv", 384, 256, 1), ("qkv", 384, 256, 5)])  # fmt: skip
QB = 128
ROWS: list[dict] = []
ARGS = argparse.Namespace(warm=False, label="")


def row(op: str, shape: str, run: Callable[[int], torch.Tensor], ref: torch.Tensor | None, nbytes: float,
        iters: int = 10) -> None:  # fmt: skip
    """Check run(0) against ref (None: too slow a reference at this size), then time run(i)
    (inputs rotated on i); failures become rows."""
    r: dict = {"op": op, "shape": shape}
    try:
        out = run(0)
        r["relerr"] = relerr(out, ref) if ref is not None else None
        if not ARGS.warm:
            r["us"] = time_calls(run, iters=iters, reps=10 if CUDA else 1) * 1e6
            r["x_read"] = nbytes / (r["us"] * 1e-6) / CEIL["read_Bps"]
    except Exception:
        r["error"] = traceback.format_exc()[-1000:]
        print("FAILED", op, shape, r["error"][-400:], flush=True)
    ROWS.append(r)
    print({k: v for k, v in r.items() if k != "error"}, flush=True)


CEIL: dict[str, float] = {}


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [quantize_fp8_blockwise(c.reshape(-1, c.shape[-1])) for c in w.split(16)]
    scale = torch.cat([p[1] for p in parts]).view(w.shape[0], w.shape[1] // QB, w.shape[2] // QB)
    return torch.cat([p[0] for p in parts]).view_as(w), scale


def bench_moe(d: dict) -> None:
    hid, e, inter = d["hid"], d["E"], d["I"]
    w13 = torch.randn(e + 1, 2 * inter, hid, device=DEV, dtype=torch.bfloat16) * hid**-0.5
    w2 = torch.randn(e + 1, hid, inter, device=DEV, dtype=torch.bfloat16) * inter**-0.5
    (q13, s13), (q2, s2) = quantize_experts(w13), quantize_experts(w2)
    weights = {"bf16": (w13, w2, None, None), "fp8": (q13, q2, s13, s2)}
    per_expert = {"bf16": 3 * inter * hid * 2, "fp8": 3 * inter * hid + 3 * inter * hid // QB**2 * 4}
    bias = torch.randn(e, device=DEV) * 0.1
    for dtype, b in d["moe"]:
        a13, a2, sc13, sc2 = weights[dtype]
        sets = 4 if b <= 128 else 2
        xs = torch.randn(sets, b, hid, device=DEV, dtype=torch.bfloat16)
        routed = [moe_route(torch.randn(b, e, device=DEV), bias, min(8, e // 2), 8 if e >= 64 else 4,
                            4 if e >= 64 else 2, 2.5) for _ in range(sets)]  # fmt: skip
        ids, wts = torch.stack([r[0] for r in routed]), torch.stack([r[1] for r in routed])
        distinct = sum(len(torch.unique(ids[s])) for s in range(sets)) / sets
        ref = fused_moe_ref(xs[0], a13, a2, ids[0], wts[0], sc13, sc2)

        def run(i: int) -> torch.Tensor:
            s = i % sets
            return fused_moe(xs[s], a13, a2, ids[s], wts[s], w13_scale=sc13, w2_scale=sc2)

        row("fused_moe", f"{dtype} B={b}", run, ref, distinct * per_expert[dtype], iters=8 if b <= 128 else 3)


def bench_mla(d: dict) -> None:
    lora, rope, ctx, page, h = d["lora"], d["rope"], d["ctx"], d["page"], d["H"]
    scale = (128 + 64) ** -0.5
    for b in d["mla"]:
        per_call = b * ctx * (lora + rope) * 2
        sets = max(2, min(16, int(256e6 // per_call))) if CUDA else 1
        pages = ctx // page
        kv = torch.randn(sets * b * pages, page, lora + rope, device=DEV, dtype=torch.bfloat16)
        tables = torch.randperm(sets * b * pages, device=DEV).view(sets, b, pages).to(torch.int32)
        lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
        q = torch.randn(sets, b, h, lora + rope, device=DEV, dtype=torch.bfloat16)
        ref = mla_decode_ref(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora)
        row("mla_decode", f"B={b} ctx={ctx}",
            lambda i: mla_decode(q[i % sets], kv, tables[i % sets], lens, scale, kv_lora_rank=lora), ref,
            per_call, iters=16)  # fmt: skip


def bench_mla_prefill(d: dict) -> None:
    h, t, nope, rope = d["H"], d["mla_prefill"], 128 if CUDA else 32, d["rope"]
    q = torch.randn(t, h, nope + rope, device=DEV, dtype=torch.bfloat16)
    kvb = torch.randn(t, h, 2 * nope, device=DEV, dtype=torch.bfloat16)
    k_pe = torch.randn(t, rope, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, t], dtype=torch.int32, device=DEV)
    scale = (nope + rope) ** -0.5
    k_full = torch.cat([kvb[..., :nope], k_pe[:, None].expand(-1, h, -1)], dim=-1)
    # The reference holds [H, T, T] fp32 scores (26 GB at T = 8192): tests/gpu checks T = 4096.
    ref = mla_prefill_ref(q, k_full, kvb[..., nope:], cu, cu, scale) if t <= 4096 else None
    row("mla_prefill", f"T={t} model form",
        lambda i: mla_prefill(q[..., :nope], kvb[..., :nope], kvb[..., nope:], cu, cu, scale, q_pe=q[..., nope:],
                              k_pe=k_pe, max_seqlen_q=t), ref, 0.0, iters=3)  # fmt: skip


def bench_fp8(d: dict) -> None:
    for name, n, k, m in d["fp8"]:
        w = torch.randn(n, k, device=DEV) * k**-0.5
        copies = max(1, min(8, int(200e6 // (n * k)))) if CUDA else 1
        qs = [quantize_fp8_blockwise(w) for _ in range(copies)]
        w = None
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        ref = fp8_linear_ref(x, *qs[0])
        row("fp8_linear", f"{name} {n}x{k} M={m}", lambda i: fp8_linear(x, *qs[i % copies]), ref,
            n * k + qs[0][1].numel() * 4, iters=max(copies, 4))  # fmt: skip


def bench_lightning(d: dict) -> None:
    h, dim = d["H"], d["D"]
    scale = dim**-0.5
    slope = lightning_slopes(h, 3, 32).to(DEV)
    for b in d["ldecode"]:
        sets = 8 if CUDA else 1
        pool = torch.randn(sets * b, h, dim, dim, device=DEV) * 0.05
        slots = torch.arange(sets * b, device=DEV, dtype=torch.int32).view(sets, b)
        q, k, v = (torch.randn(sets, b, h, dim, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        mini = pool[slots[0].long()].clone()
        ref = lightning_decode_ref(q[0], k[0], v[0], mini, torch.arange(b, device=DEV), slope, scale)
        out = torch.zeros_like(q[0])
        row("lightning_decode", f"B={b}",
            lambda i: lightning_decode(q[i % sets], k[i % sets], v[i % sets], pool, slots[i % sets], slope, scale,
                                       out=out, block_v=32), ref, b * h * dim * dim * 8, iters=16)  # fmt: skip
    for t in d["lprefill"]:
        q, k, v = (torch.randn(t, h, dim, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        pool = torch.zeros(2, h, dim, dim, device=DEV)
        one = torch.tensor([0], device=DEV, dtype=torch.int32)
        cu = torch.tensor([0, t], device=DEV, dtype=torch.int32)
        ref = lightning_prefill_ref(q, k, v, pool.clone(), one, cu, one, slope, scale) if t <= 4096 else None
        run = lambda i: lightning_prefill_chunked(q, k, v, pool, one, cu, one, slope, scale)  # noqa: E731
        row("lightning_prefill", f"T={t}", run, ref, 4 * t * h * dim * 2, iters=5)


def bench_small(d: dict) -> None:
    hid, vocab = d["hid"], d["vocab"]
    x, res = (torch.randn(1, hid, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(hid, device=DEV) + 0.5
    row("add_rmsnorm", "B=1", lambda i: add_rmsnorm(x, res.clone(), w, 1e-6)[0],
        add_rmsnorm_ref(x, res.clone(), w, 1e-6)[0], 0.0)  # fmt: skip
    logits = torch.randn(1, vocab, device=DEV)
    zero = torch.zeros(1, device=DEV)
    row("sample_greedy", f"B=1 V={vocab}", lambda i: sample(logits, zero).float(),
        logits.argmax(-1).float(), logits.numel() * 4)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--warm", action="store_true", help="check only (compiles), no timing")
    ap.add_argument("--label", default="", help="suffix of the JSON file name")
    ap.add_argument("--only", default="", help="comma list of: moe,mla,mla_prefill,fp8,lightning,small")
    ARGS.__dict__.update(vars(ap.parse_args()))
    d = TINY if ARGS.tiny else REAL
    torch.manual_seed(0)
    CEIL.update(measure_ceilings(ARGS.tiny or ARGS.warm))
    sections = {"moe": bench_moe, "mla": bench_mla, "mla_prefill": bench_mla_prefill, "fp8": bench_fp8,
                "lightning": bench_lightning, "small": bench_small}  # fmt: skip
    name = "gpu-defaults" + (f"-{ARGS.label}" if ARGS.label else "")
    for sec in ARGS.only.split(",") if ARGS.only else sections:  # in the order asked for
        try:
            sections[sec](d)
        except Exception:
            ROWS.append({"op": sec, "error": traceback.format_exc()[-1500:]})
            print("SECTION FAILED", sec, ROWS[-1]["error"], flush=True)
        if CUDA:
            torch.cuda.empty_cache()
        if not ARGS.warm:
            write_results(name, {"env": environment(), "ceilings": CEIL, "rows": ROWS})
    print(table([r for r in ROWS if "us" in r or ARGS.warm], ["op", "shape", "us", "x_read", "relerr"]))


if __name__ == "__main__":
    main()
