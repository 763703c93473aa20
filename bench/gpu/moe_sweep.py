# ruff: noqa: B023  (each lambda is called at once by time_calls, inside its loop iteration)
"""MoE sweep, round 3: fp8 decode kernels swap-AB with one activation scale per row (the new default)
against round 2's kernels; fp8 prefill and the crossovers stay available (--only prefill,cross).

Real sizes (E=256 routed + 1 shared, I=1024, hidden 4096, top-8, n_group 8 / topk_group 4, routing
from moe_route on random logits). Every variant is checked against fused_moe_ref at full size before
it is timed; a failing variant is recorded and the sweep goes on; results are rewritten after every
row, and variants are skipped (recorded as such) once --budget seconds have passed.

dtype labels: bf16; fp8 = the default fp8 path (weights widened to fp16, activations scaled by a
power of two: per row (rs, default) or per K block (blk)); fp8raw = the same without the scaling (what the scaling costs);
fp8a8 = fp8 x fp8 (activations quantised in the kernel); fp8dq = prefill only: experts expanded to
bf16 in one launch, then the bf16 grouped GEMM.

Decode: x_read = distinct-expert bytes / time / read ceiling (bf16 25.2 MB per expert, fp8 12.6 MB
+ scales). Prefill: MFU = 2 * pairs * 3 * I * hidden / time / the bf16 (and fp8) GEMM ceiling.
The "cross" rows time decode and grouped at the same B: the THRESHOLDS lines say where
``GROUPED_FROM`` (bf16) and ``GROUPED_FROM_FP8`` belong.

    python3 bench/gpu/moe_sweep.py                       # H200: decode only, $OUT/gpu-moe-sweep.json, ~70 s
    TRITON_INTERPRET=1 python3 bench/gpu/moe_sweep.py --tiny   # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable

import torch
from common import CUDA, DEV, environment, measure_ceilings, relerr, table, time_calls, write_results
from ling_runtime.kernels.moe import fused_moe, fused_moe_ref, moe_route
from ling_runtime.kernels.moe_prefill import fused_moe_grouped

REAL = dict(hid=4096, E=256, I=1024, topk=8, ngroup=8, topkg=4, decode=[1, 8, 32], cross=[128, 256],
            prefill=[8192, 1024])  # fmt: skip
TINY = dict(hid=256, E=8, I=128, topk=2, ngroup=4, topkg=2, decode=[2, 70], cross=[70], prefill=[100])
QB = 128

# Decode variants per (dtype, B): (block_m, block_n, block_k, warps, stages, m_progs, dense_shared, extra
# fused_moe kwargs). The first is the library default. Round 3 tests the swap-AB decode kernels
# (now the fp8 default: weight rows on the wgmma's M side, sm_90 SASS HGMMA.64x16x16 instead of
# mma.sync at M=16) with the fp16 activation scale once per row (rs) or per K block (blk), against
# round 2's unswapped default (old); at B=1 the up projection split over K (split_k, default 4:
# 576 programs instead of 144 on 132 SMs; sk= marks an explicit split). Round 2 (old): fp8 B=1 65 us (0.41; without the scaling 57 us),
# B=8 210 us (0.67), B=32 397 us with bn=(64, 128) (0.72); bf16 B=1 0.73, B=32 0.954.
DEC = (16, (64, 64), (128, 128), 4, 4, 1, None, {})
OLD = {"swap": False}
BLK = {"row_scale": False}
DECODE: dict[tuple[str, int], list[tuple]] = {
    ("fp8", 1): [
        DEC,  # split_k 4 by default at B=1 (SPLIT_BELOW)
        (16, (64, 64), (128, 128), 4, 4, 1, None, {"split_k": 1}),
        (16, (64, 64), (128, 128), 4, 4, 1, None, {"split_k": 2}),
        (16, (64, 64), (128, 128), 4, 4, 1, None, BLK),
        (16, (64, 64), (128, 128), 4, 3, 1, None, {}),
        (16, (64, 64), (256, 256), 4, 3, 1, None, {"split_k": 2}),
        (16, (128, 64), (128, 128), 8, 4, 1, None, {}),
        (16, (64, 64), (128, 128), 4, 4, 1, None, OLD),
    ],
    ("fp8raw", 1): [DEC],
    ("fp8", 8): [
        DEC,
        (16, (64, 64), (128, 128), 4, 4, 1, None, BLK),
        (16, (64, 64), (128, 128), 4, 4, 1, None, OLD),
    ],
    ("fp8", 32): [
        DEC,
        (16, (64, 128), (128, 128), 4, 4, 1, None, {}),
        (16, (64, 64), (128, 128), 4, 4, 1, None, BLK),
        (16, (64, 128), (128, 128), 4, 4, 1, None, OLD),
    ],
    ("bf16", 1): [
        (16, (64, 64), (128, 128), 4, 3, 1, None, {}),
        (16, (64, 64), (128, 128), 4, 3, 1, None, {"swap": True}),
    ],
    ("bf16", 32): [
        (16, (64, 64), (128, 128), 4, 3, 1, None, {}),
        (16, (64, 64), (128, 128), 4, 3, 1, None, {"swap": True}),
    ],
    ("fp8", 128): [(16, (64, 64), (128, 128), 4, 4, 1, True, {})],
    ("fp8", 256): [(16, (64, 64), (128, 128), 4, 4, 1, True, {})],
    ("bf16", 128): [(16, (64, 64), (128, 128), 4, 3, 1, True, {})],
}
TOL = {"bf16": 2e-2, "fp8": 2e-2, "fp8raw": 2e-2, "fp8a8": 8e-2, "fp8dq": 2e-2}
FP8_FLAGS = {"fp8raw": {"fp16_scaled": False}, "fp8a8": {"act_fp8": True}, "fp8dq": {"dequant": True}}
# Grouped variants: (block_m, block_n (up, down), block_k (up, down), warps, stages). The up tile
# holds two fp32 accumulators (gate and up): at 8 warps BM x BN(up) = 128 x 128 spills (sm_90
# SASS: 40-350 bytes of stack), 128 x 64 x BK=128 and 64 x 128 x 64 do not.
G_BF16 = (128, (64, 128), (64, 64), (8, 8), (3, 3))  # round-1 bf16 winner at T=8192 (4.92 ms)
G_SMALL = (64, (64, 128), (64, 64), (4, 8), (4, 3))  # round-1 winner at T<=1024 and B=128
G_N128 = (64, (128, 128), (64, 64), (8, 8), (3, 3))  # round-1 fp8a8 winner at T=8192 (7.22 ms)
G_K128 = (128, (64, 128), (128, 64), (8, 8), (3, 3))  # up 128x64x128: fewer K trips, no spill
G_A8 = (128, (64, 128), (128, 128), (8, 8), (3, 3))  # fp8 x fp8 with K=128 = one scale block
PREFILL: dict[tuple[str, int], list[tuple]] = {
    ("bf16", 8192): [G_BF16, (128, (64, 128), (64, 128), (8, 8), (3, 3))],
    ("fp8", 8192): [G_SMALL, G_N128, G_K128],
    ("fp8a8", 8192): [G_N128, G_A8],
    ("fp8dq", 8192): [G_BF16],
    ("bf16", 1024): [G_SMALL],
    ("fp8", 1024): [G_SMALL, G_N128],
}
CROSS_GROUPED: dict[str, list[tuple]] = {"bf16": [G_SMALL], "fp8": [G_SMALL, G_N128]}

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
    ap.add_argument("--only", default="decode", help="comma list of: decode,prefill,cross (round 3: decode)")
    args = ap.parse_args()
    BUDGET[0] = args.budget
    if args.tiny:
        TOL["fp8a8"] = 0.15  # the interpreter truncates e4m3 subnormals (tests/kernels/test_moe.py)
        TOL["fp8dq"] = 3e-2  # and fp32 -> bf16 (biased): see test_grouped_dequant_path_matches_reference
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
    fp8_names = ("fp8", "fp8raw", "fp8a8", "fp8dq")
    weights = {"bf16": (w13, w2, None, None)} | {k: (q13, q2, s13, s2) for k in fp8_names}
    fp8_bytes = 3 * inter * hid + 3 * inter * hid // QB**2 * 4
    expert_bytes = {"bf16": 3 * inter * hid * 2} | {k: fp8_bytes for k in fp8_names}
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

    def decode_rows(b: int, key_b: int, dtype: str, section: str, grouped_cfgs: list[tuple]) -> None:
        if not DECODE.get((dtype, key_b)) and not grouped_cfgs:
            return
        a13, a2, sc13, sc2 = weights[dtype]
        sets = 4
        xs, ids, wts, distinct = routing(b, sets)
        nbytes = distinct * expert_bytes[dtype]
        ref = fused_moe_ref(xs[0], a13, a2, ids[0], wts[0], sc13, sc2)
        flags = FP8_FLAGS.get(dtype, {})
        for bm, bn, bk, nw, ns, mp, ds, extra in DECODE.get((dtype, key_b), []):  # all: --tiny checks each
            if args.tiny:  # tiny sizes: tiles shrunk so that hid still splits 4 ways (split_k)
                bk0 = min(bk[0], d["hid"] // 4)
                bn, bk = (min(bn[0], d["I"] // 2), min(bn[1], 64)), (bk0, min(bk[1], d["I"]))
            kw = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, m_progs=mp, dense_shared=ds,
                      w13_scale=sc13, w2_scale=sc2, grouped_from=1 << 30, **flags, **extra)  # fmt: skip
            base = dict(section=section, dtype=dtype, B=b, path="decode", distinct=distinct,
                        variant=f"bm={bm} bn={bn} bk={bk} w={nw} s={ns} mp={mp} ds={ds} {tag(dtype, extra)}")  # fmt: skip
            attempt(base, lambda: relerr(fused_moe(xs[0], a13, a2, ids[0], wts[0], **kw), ref),
                    lambda i: fused_moe(xs[i % sets], a13, a2, ids[i % sets], wts[i % sets], **kw), iters=8,
                    tol=TOL[dtype])  # fmt: skip
            finish(ROWS[-1], nbytes, b, topk)
        for cfg in tiny_pick(grouped_cfgs):
            gkw = grouped_kw(cfg, flags)
            base = dict(
                section=section, dtype=dtype, B=b, path="grouped", distinct=distinct, variant=gname(cfg)
            )
            attempt(base, lambda: relerr(fused_moe_grouped(xs[0], a13, a2, ids[0], wts[0], sc13, sc2, **gkw), ref),
                    lambda i: fused_moe_grouped(xs[i % sets], a13, a2, ids[i % sets], wts[i % sets], sc13, sc2,
                                                **gkw), iters=8, tol=TOL[dtype])  # fmt: skip
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

    def prefill_rows(t: int, key_t: int, dtypes: tuple[str, ...]) -> None:
        sets = 2
        xs, ids, wts, distinct = routing(t, sets)
        iters = 3 if t >= 4096 else 6
        for dtype in dtypes:
            a13, a2, sc13, sc2 = weights[dtype]
            ref = fused_moe_ref(xs[0], a13, a2, ids[0], wts[0], sc13, sc2)
            nbytes = distinct * expert_bytes[dtype]
            for cfg in tiny_pick(PREFILL.get((dtype, key_t), [])):
                gkw = grouped_kw(cfg, FP8_FLAGS.get(dtype, {}))
                base = dict(section="prefill", dtype=dtype, B=t, path="grouped", distinct=distinct,
                            variant=gname(cfg))  # fmt: skip
                attempt(base, lambda: relerr(fused_moe_grouped(xs[0], a13, a2, ids[0], wts[0], sc13, sc2, **gkw),
                                             ref),
                        lambda i: fused_moe_grouped(xs[i % sets], a13, a2, ids[i % sets], wts[i % sets], sc13,
                                                    sc2, **gkw), iters=iters, tol=TOL[dtype])  # fmt: skip
                finish(ROWS[-1], nbytes, t, topk)

    # Most informative first, so a run cut short by the budget loses the least.
    real_b = {1: d["decode"][0], 32: d["decode"][1]} if args.tiny else {b: b for b in d["decode"]}
    if "decode" in only:
        for key_b, b in real_b.items():
            for dtype in ("fp8", "fp8raw") if key_b < 128 else ():  # fp8 B=128 runs in "cross"
                decode_rows(b, key_b, dtype, "decode", [])
    if "prefill" in only:
        for key_t, t in zip(REAL["prefill"], d["prefill"], strict=False):
            prefill_rows(t, key_t, ("fp8", "fp8a8", "fp8dq", "bf16"))
    if "cross" in only:
        for key_b, b in zip(REAL["cross"], d["cross"], strict=False):
            for dtype in ("fp8", "bf16") if key_b == 128 else ("fp8",):
                decode_rows(b, key_b, dtype, "cross", CROSS_GROUPED[dtype])
    if "decode" in only:
        for key_b, b in real_b.items():
            if key_b < 128:  # bf16 B=128 runs in "cross"
                decode_rows(b, key_b, "bf16", "decode", [])
    report()


def tag(dtype: str, extra: dict) -> str:
    """Short name of a decode variant's extra kwargs (swap/row_scale, see DECODE)."""
    if dtype == "bf16":  # unswapped by default, no activation scaling
        return "swap" if extra.get("swap") else "old"
    if extra.get("swap") is False:
        return "old"
    split = f" sk={extra['split_k']}" if "split_k" in extra else ""
    return "swap " + ("blk" if extra.get("row_scale") is False else "rs") + split


def grouped_kw(cfg: tuple, flags: dict) -> dict:
    bm, bn, bk, nw, ns = cfg
    return dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, **flags)


def gname(cfg: tuple) -> str:
    bm, bn, bk, nw, ns = cfg
    return f"bm={bm} bn={bn} bk={bk} w={nw} s={ns}"


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
    print("\nFP8 PREFILL (fastest fp8 path per T; fp8 = fused_moe_grouped default, fp8a8 = act_fp8=True,")
    print("fp8dq = dequant=True; paste the path and its tiles as the fp8 prefill default)")
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
