# ruff: noqa: B023  (each lambda is called at once by time_calls, inside its loop iteration)
"""Fused MoE sweep: the dispatched config (``moe_config``) against tile alternatives, decode and
prefill, bf16 and fp8, and the decode/grouped crossover that sets ``GROUPED_FROM(_FP8)``.

Real sizes (E=256 routed + 1 shared, I=1024, hidden 4096, top-8, n_group 8 / topk_group 4, routing
from moe_route on random logits). Every variant is checked against fused_moe_ref at full size before
it is timed; a failing variant is recorded and the sweep goes on; results are rewritten after every
row, and variants are skipped (recorded as such) once --budget seconds have passed.

dtype labels: bf16; fp8 = e4m3 weights widened to fp16 against power-of-two scaled activations
(decode and grouped); fp8dq = prefill only: experts expanded to bf16 in one launch, then the bf16
grouped GEMM (the default from ``FP8_DEQUANT_FROM`` tokens). The variants that lost (swap-AB,
split-K, bf16 widening, fp8 x fp8, unscaled fp16) and their numbers are in docs/gpu-notes.md.

Decode: x_read = distinct-expert bytes / time / read ceiling (bf16 25.2 MB per expert, fp8 12.6 MB
+ scales). Prefill: MFU = 2 * pairs * 3 * I * hidden / time / the bf16 (and fp8) GEMM ceiling.
The "cross" rows time decode and grouped at the same B: the THRESHOLDS lines say where
``GROUPED_FROM`` (bf16) and ``GROUPED_FROM_FP8`` belong.

    python3 bench/gpu/moe_sweep.py                       # decode only, $OUT/gpu-moe-sweep.json, ~70 s
    python3 bench/gpu/moe_sweep.py --only prefill,cross
    TRITON_INTERPRET=1 python3 bench/gpu/moe_sweep.py --tiny   # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch
from common import CUDA, DEV, environment, measure_ceilings, relerr, table, time_calls, write_results
from ling_runtime.kernels.moe import fused_moe, fused_moe_ref, moe_config, moe_route
from ling_runtime.kernels.moe_prefill import MoeConfig, clip_tiles, fused_moe_grouped, grouped_config

REAL = dict(hid=4096, E=256, I=1024, topk=8, ngroup=8, topkg=4, decode=[1, 8, 32], cross=[128, 256],
            prefill=[8192, 1024])  # fmt: skip
TINY = dict(hid=256, E=8, I=128, topk=2, ngroup=4, topkg=2, decode=[2, 70], cross=[70], prefill=[100])
QB = 128


def dec(bn: tuple[int, int] = (64, 64), stages: int = 4, warps: int = 4, ds: bool = False) -> MoeConfig:
    return MoeConfig("decode", 16, bn, (128, 128), (warps, warps), (stages, stages), dense_shared=ds)


def grp(bm: int, bn: tuple[int, int], bk: tuple[int, int], warps: tuple[int, int], stages: tuple[int, int],
        path: str = "grouped") -> MoeConfig:  # fmt: skip
    return MoeConfig(path, bm, bn, bk, warps, stages)


# Decode variants per (dtype, B); None = the dispatched config (first, so it is timed first).
# Measured on the H200: fp8 B=1 65.7 us (0.39), B=8 207 (0.66), B=32 397 with bn=(64, 128)
# (0.72; 441 with 64 x 64); bf16 72.5 / 296 / 611 us (0.73 / 0.95 / 0.95).
DECODE: dict[tuple[str, int], list[MoeConfig | None]] = {
    ("fp8", 1): [None, dec(stages=3), dec(bn=(128, 64), warps=8)],
    ("fp8", 8): [None, dec(stages=3)],
    ("fp8", 32): [None, dec(), dec(bn=(64, 128), stages=3)],
    ("bf16", 1): [None, dec(stages=4)],
    ("bf16", 8): [None],
    ("bf16", 32): [None, dec(stages=4)],
    ("fp8", 128): [None],
    ("fp8", 256): [dec(bn=(64, 128), ds=True)],
    ("bf16", 128): [dec(stages=3, ds=True)],
}
TOL = {"bf16": 2e-2, "fp8": 2e-2, "fp8dq": 2e-2}
# Grouped variants. The up tile holds two fp32 accumulators (gate and up): at 8 warps BM x BN(up)
# = 128 x 128 spills (sm_90 SASS: 40-350 bytes of stack), 128 x 64 x BK=128 and 64 x 128 x 64 do not.
G_BF16 = grp(128, (64, 128), (64, 64), (8, 8), (3, 3))  # bf16 winner at T=8192 (4.92 ms)
G_SMALL = grp(64, (64, 128), (64, 64), (4, 8), (4, 3))  # winner at T<=1024 and B=128
G_N128 = grp(64, (128, 128), (64, 64), (8, 8), (3, 3))
G_K128 = grp(128, (64, 128), (128, 64), (8, 8), (3, 3))  # up 128x64x128: fewer K trips, no spill
PREFILL: dict[tuple[str, int], list[MoeConfig | None]] = {
    ("bf16", 8192): [None, grp(128, (64, 128), (64, 128), (8, 8), (3, 3))],
    ("fp8", 8192): [G_SMALL, G_N128, G_K128],
    ("fp8dq", 8192): [None],
    ("bf16", 1024): [None],
    ("fp8", 1024): [None, G_N128],
}
CROSS_GROUPED: dict[str, list[MoeConfig | None]] = {"bf16": [None], "fp8": [None, G_N128]}

ROWS: list[dict] = []
CEIL: dict[str, float] = {}
T0 = time.monotonic()
BUDGET = [85.0]


def save() -> None:
    write_results("gpu-moe-sweep", {"env": environment(), "ceilings": CEIL, "rows": ROWS})


def attempt(base: dict, check: Callable[[], float], timed: Callable[[int], object], iters: int, graph: bool = True,
            tol: float = 2e-2) -> None:  # fmt: skip
    """Check (relerr at real size), then time; any failure is recorded and the sweep goes on."""
    row = dict(base)
    if time.monotonic() - T0 > BUDGET[0]:
        row["error"] = "skipped: time budget spent"
        ROWS.append(row)
        return
    try:
        err = check()
        row["relerr"] = err
        if not err < tol:  # NaN fails too
            raise AssertionError(f"relerr {err:.3g} >= {tol}")
        row["us"] = time_calls(timed, iters=iters, reps=5 if CUDA else 1, graph=graph) * 1e6
    except Exception:
        row["error"] = traceback.format_exc()[-1200:]
        print("FAILED", base, row["error"][-400:], flush=True)
    finally:
        ROWS.append(row)
        print({k: v for k, v in row.items() if k != "error"}, flush=True)
        save()


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] bf16 -> (fp8 e4m3, fp32 [E, N/128, K/128]); a few experts at a time to bound the fp32 copy."""
    e, n, k = w.shape
    q = torch.empty((e, n, k), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((e, n // QB, k // QB), dtype=torch.float32, device=w.device)
    for i in range(0, e, 16):
        blocks = w[i : i + 16].float().view(-1, n // QB, QB, k // QB, QB)
        sc = blocks.abs().amax(dim=(2, 4)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
        q[i : i + 16] = (blocks / sc[:, :, None, :, None]).to(torch.float8_e4m3fn).view(-1, n, k)
        s[i : i + 16] = sc
    return q, s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--budget", type=float, default=55.0, help="seconds after which variants are skipped")
    ap.add_argument("--only", default="decode", help="comma list of: decode,prefill,cross")
    args = ap.parse_args()
    BUDGET[0] = args.budget
    if args.tiny:
        TOL["fp8dq"] = 3e-2  # the interpreter truncates fp32 -> bf16 (biased): see test_moe.py
    d = TINY if args.tiny else REAL
    only = set(args.only.split(","))
    torch.manual_seed(0)
    CEIL.update(measure_ceilings(args.tiny))
    print("ceilings", CEIL, flush=True)
    hid, n_exp, inter, topk = d["hid"], d["E"], d["I"], d["topk"]
    w13 = torch.randn(n_exp + 1, 2 * inter, hid, device=DEV, dtype=torch.bfloat16) * hid**-0.5
    w2 = torch.randn(n_exp + 1, hid, inter, device=DEV, dtype=torch.bfloat16) * inter**-0.5
    q13, s13 = quantize_experts(w13)
    q2, s2 = quantize_experts(w2)
    weights = {"bf16": (w13, w2, None, None), "fp8": (q13, q2, s13, s2), "fp8dq": (q13, q2, s13, s2)}
    fp8_bytes = 3 * inter * hid + 3 * inter * hid // QB**2 * 4
    expert_bytes = {"bf16": 3 * inter * hid * 2, "fp8": fp8_bytes, "fp8dq": fp8_bytes}
    bias = torch.randn(n_exp, device=DEV) * 0.1
    # --tiny: the real B/T keys map onto the tiny sizes, first variant of each list only.
    tiny_pick = (lambda v: v[:1]) if args.tiny else (lambda v: v)

    def routing(b: int, sets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        xs = torch.randn(sets, b, hid, device=DEV, dtype=torch.bfloat16)
        rs = [
            moe_route(torch.randn(b, n_exp, device=DEV), bias, topk, d["ngroup"], d["topkg"], 2.5)
            for _ in range(sets)
        ]
        ids = torch.stack([r[0] for r in rs])
        wts = torch.stack([r[1] for r in rs])
        distinct = sum(len(torch.unique(ids[s])) for s in range(sets)) / sets
        return xs, ids, wts, distinct

    def pick(cfg: MoeConfig | None, dtype: str, tokens: int, grouped: bool) -> tuple[MoeConfig, str]:
        """(config, label): None is the dispatch (grouped_config for grouped rows); tiles clipped to
        the dims (tiny runs); fp8dq rows run the dequant path."""
        qb = 0 if dtype == "bf16" else QB
        if cfg is None:
            cfg = grouped_config(tokens, inter, hid, qb) if grouped else moe_config(tokens, inter, hid, qb)
            label = "default "
        else:
            cfg, label = clip_tiles(cfg, inter, hid, qb), ""
        if dtype == "fp8dq":
            cfg = replace(cfg, path="dequant")
        return cfg, label + cfg.tag()

    def run_rows(b: int, dtype: str, section: str, cfgs: list, grouped: bool, sets: int, iters: int) -> None:
        a13, a2, sc13, sc2 = weights[dtype]
        xs, ids, wts, distinct = routing(b, sets)
        nbytes = distinct * expert_bytes[dtype]
        ref = fused_moe_ref(xs[0], a13, a2, ids[0], wts[0], sc13, sc2)
        for given in cfgs:
            cfg, label = pick(given, dtype, b, grouped)
            fn = fused_moe_grouped if grouped else fused_moe
            base = dict(section=section, dtype=dtype, B=b, path=cfg.path, distinct=distinct, variant=label)
            attempt(base, lambda: relerr(fn(xs[0], a13, a2, ids[0], wts[0], sc13, sc2, config=cfg), ref),
                    lambda i: fn(xs[i % sets], a13, a2, ids[i % sets], wts[i % sets], sc13, sc2, config=cfg),
                    iters=iters, tol=TOL[dtype])  # fmt: skip
            finish(ROWS[-1], nbytes, b, topk)

    def finish(row: dict, nbytes: float, tokens: int, k: int) -> None:
        if "us" not in row:
            return
        sec = row["us"] * 1e-6
        row["x_read"] = nbytes / sec / CEIL["read_Bps"]
        flops = 2 * tokens * (k + 1) * 3 * inter * hid
        row["mfu_bf16"] = flops / sec / CEIL["bf16_flops"]
        if "fp8_flops" in CEIL:
            row["mfu_fp8"] = flops / sec / CEIL["fp8_flops"]
        save()

    # Most informative first, so a run cut short by the budget loses the least.
    real_b = {1: d["decode"][0], 32: d["decode"][1]} if args.tiny else {b: b for b in d["decode"]}
    for dtype in ("fp8", "bf16") if "decode" in only else ():
        for key_b, b in real_b.items():
            cfgs = DECODE.get((dtype, key_b), [])
            run_rows(b, dtype, "decode", cfgs if not args.tiny else cfgs[:1], False, 4, 8)
    for key_t, t in zip(REAL["prefill"], d["prefill"], strict=False) if "prefill" in only else ():
        for dtype in ("fp8", "fp8dq", "bf16"):
            cfgs = tiny_pick(PREFILL.get((dtype, key_t), []))
            run_rows(t, dtype, "prefill", cfgs, True, 2, 3 if t >= 4096 else 6)
    for key_b, b in zip(REAL["cross"], d["cross"], strict=False) if "cross" in only else ():
        for dtype in ("fp8", "bf16") if key_b == 128 else ("fp8",):
            run_rows(b, dtype, "cross", tiny_pick(DECODE.get((dtype, key_b), [])), False, 4, 8)
            run_rows(b, dtype, "cross", tiny_pick(CROSS_GROUPED[dtype]), True, 4, 8)
    report()


def report() -> None:
    ok = [r for r in ROWS if "us" in r]
    cols = ["section", "dtype", "B", "path", "variant", "us", "x_read", "mfu_bf16", "mfu_fp8", "relerr"]
    print(table(ok, cols))
    best: dict[tuple, dict] = {}
    for r in ok:
        if r["path"] == "peer":
            continue
        key = (r["section"], r["dtype"], r["B"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    print("\nWINNERS (fastest variant that passed its relerr check)")
    print(table(list(best.values()), cols))
    print(
        "\nDECODE DEFAULTS (first variant = fused_moe's default; paste a winner's tiles/flags if it beats it)"
    )
    for (section, dtype, b), r in sorted(best.items()):
        if section != "decode":
            continue
        first = next(x for x in ok if (x["section"], x["dtype"], x["B"]) == (section, dtype, b))
        print(f"  {dtype} B={b}: default {first['us']:.1f} us ({first.get('x_read', 0):.2f}); "
              f"best {r['variant']} {r['us']:.1f} us ({r.get('x_read', 0):.2f})")  # fmt: skip
    # Threshold: the smallest B where the grouped path beats the best decode variant.
    print("\nTHRESHOLDS (paste into kernels/moe.py GROUPED_FROM; per dtype)")
    for dtype in ("bf16", "fp8"):
        sizes = sorted({r["B"] for r in ok if r["section"] == "cross" and r["dtype"] == dtype})
        won = None
        for b in sizes:
            dec = [
                r["us"]
                for r in ok
                if (r["section"], r["dtype"], r["B"], r["path"]) == ("cross", dtype, b, "decode")
            ]
            grp = [
                r["us"]
                for r in ok
                if (r["section"], r["dtype"], r["B"], r["path"]) == ("cross", dtype, b, "grouped")
            ]
            if dec and grp:
                print(f"  {dtype} B={b}: decode {min(dec):.1f} us, grouped {min(grp):.1f} us")
                if won is None and min(grp) < min(dec):
                    won = b
        const = "GROUPED_FROM" if dtype == "bf16" else "GROUPED_FROM_FP8"
        print(
            f"  {const} = {won}" if won else f"  {dtype}: grouped never won up to {sizes} (keep above them)"
        )
    print("\nFP8 PREFILL (fastest fp8 path per T; fp8 = fp16-widening grouped kernels, fp8dq = dequant path;")
    print("the fastest sets FP8_DEQUANT_FROM and GROUPED_TILES)")
    for t in sorted({r["B"] for r in ok if r["section"] == "prefill"}):
        cands = [r for r in ok if r["section"] == "prefill" and r["B"] == t and r["dtype"] != "bf16"]
        bf = [r["us"] for r in ok if r["section"] == "prefill" and r["B"] == t and r["dtype"] == "bf16"]
        if cands:
            r = min(cands, key=lambda r: r["us"])
            print(
                f"  T={t}: {r['dtype']} {r['variant']} {r['us']:.0f} us (bf16 {min(bf, default=float('nan')):.0f} us)"
            )
    for r in ROWS:
        if "error" in r:
            print("ERROR", r["section"], r["dtype"], r["B"], r.get("variant"), r["error"][-300:])


if __name__ == "__main__":
    main()
