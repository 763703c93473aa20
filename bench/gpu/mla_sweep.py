# ruff: noqa: B023  (each lambda is called at once by time_calls, inside its loop iteration)
"""MLA kernel sweep on the H200: absorbed decode (+ MTP verify shapes) and expanded prefill.

Every variant is checked against its torch reference at the real size before it is timed (relerr
recorded); a failing variant is recorded with its error and the sweep goes on; results are
written after every row to $OUT/gpu-mla-sweep.json; a time budget skips what is left.

    python3 bench/gpu/mla_sweep.py                  # round 2 (defaults + candidates), < 60 s on the H200
    python3 bench/gpu/mla_sweep.py --full           # round 1's wide sweep, ~45 s + compiles
    TRITON_INTERPRET=1 python3 bench/gpu/mla_sweep.py --tiny [--full]   # CPU smoke run of the same code

Decode: x_read = KV bytes (B * ctx * 576 * 2) / time / read ceiling (target >= 0.7 at B*ctx >=
256K). Prefill: TFLOP/s with causal FLOPs = 2 * H * (192 + 128) * Tq * Tk / 2 (minus nothing for
the diagonal), as a fraction of the bf16 GEMM ceiling; peer = torch SDPA with v zero-padded to
192, is_causal=True, whatever backend torch picks.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import traceback
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from common import CUDA, DEV, environment, measure_ceilings, relerr, table, time_calls, write_results
from ling_runtime.kernels.mla import MlaConfig, default_splits, mla_decode, mla_decode_ref
from ling_runtime.kernels.mla_prefill import MlaPrefillConfig, mla_prefill, mla_prefill_ref

REAL = dict(H=32, lora=512, rope=64, nope=128, dv=128, ctx=4096, pages=(64, 16), batches=[1, 8, 32, 128],
            mtp_b=32, prefill=[1024, 8192], varlen=[2048] * 4, bn=(64, 32, 16), tol=2e-2, sms=132)  # fmt: skip
TINY = dict(H=4, lora=32, rope=16, nope=32, dv=32, ctx=64, pages=(16, 8), batches=[1, 3],
            mtp_b=2, prefill=[40], varlen=[24, 17], bn=(16, 16, 16), tol=2e-2, sms=4)  # fmt: skip

ROWS: list[dict] = []
CEIL: dict[str, float] = {}
T0 = time.time()
BUDGET = [110.0]


def save() -> None:
    write_results("gpu-mla-sweep", {"env": environment(), "ceilings": CEIL, "rows": ROWS})


def over_budget() -> bool:
    return time.time() - T0 > BUDGET[0]


def attempt(op: str, shape: str, variant: str, run, ref: torch.Tensor | None, timed, **extra: object) -> dict:
    """Check run() against ref, then time timed(i); any failure becomes an error row."""
    row: dict = {"op": op, "shape": shape, "variant": variant, **extra}
    if over_budget():
        row["error"] = "skipped: time budget"
        ROWS.append(row)
        return row
    try:
        out = run()
        row["relerr"] = relerr(out, ref) if ref is not None else None
        row["sec"] = time_calls(timed, iters=16 if CUDA else 1, reps=10)
        row["us"] = row["sec"] * 1e6
    except Exception:
        row["error"] = traceback.format_exc()[-1200:]
        print(f"FAILED {op} {shape} {variant}\n{row['error']}", flush=True)
    ROWS.append(row)
    save()
    return row


# ---- decode ------------------------------------------------------------------------------------
def decode_variants(b: int, bns: tuple[int, ...]) -> list[tuple[str, MlaConfig]]:
    """Why each is here (sm_90 compiles on a CPU box, ptxas: regs / spill stack / smem):

    h64s3w4: 2 buffers of 64x576 (188 KB, 1 CTA/SM), mma.sync M=32, 255 regs + 160 B spill stack.
    h64s3w8: same buffers, 177 regs, no spill; but mma layout [1, 8]: q re-read by 8 warps a block.
    h32s4w4: 3 buffers of 32x576 (149 KB), small spill.  h32s3w4: 2 buffers (112 KB): 2 CTAs/SM.
    h16s6w4: 5 buffers of 16x576 (130 KB), 243 regs, no spill.
    (v1, the page number loaded per block, and the keys-as-M wgmma form lost: docs/gpu-notes.md.)
    """
    bn64, bn32, bn16 = bns
    auto = default_splits(b)
    return [
        ("h64s3w4", MlaConfig(auto, bn64, 4, 3)),
        ("h64s3w8", MlaConfig(auto, bn64, 8, 3)),
        ("h32s4w4", MlaConfig(auto, bn32, 4, 4)),
        ("h32s3w4", MlaConfig(auto, bn32, 4, 3)),
        ("h16s6w4", MlaConfig(auto, bn16, 4, 6)),
    ]


def split_choices(b: int, sms: int) -> list[int]:
    """Programs per sequence: one wave rounded down (the default) and up, two waves (v1's
    default), three; 1 (no merge launch) from B = sms - 4."""
    c = {max(1, min(32, math.ceil(k * sms / b))) for k in (1, 2, 3)} | {max(1, min(32, sms // b))}
    if b >= sms - 4:
        c.add(1)
    return sorted(c)


def _mla_cfg(kw: dict) -> MlaConfig:
    return MlaConfig(**{k: v for k, v in kw.items() if k != "name"})


def _decode_row(op: str, shape: str, name: str, cfg: MlaConfig | None, q, kv, tables, lens, sets, per_call, ref,
                d: dict) -> dict:  # fmt: skip
    """One checked and timed mla_decode variant (``cfg`` None: the dispatched config)."""
    lora, scale = d["lora"], (128 + 64) ** -0.5
    label = f"{name} splits={cfg.num_splits}" if cfg else name
    return attempt(
        op, shape, label,
        lambda: mla_decode(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora, config=cfg), ref,
        lambda i: mla_decode(q[i % sets], kv, tables[i % sets], lens, scale, kv_lora_rank=lora, config=cfg),
        kw=dict(asdict(cfg) if cfg else {}, name=name), bytes=per_call,
    )  # fmt: skip


def _decode_inputs(d: dict, b: int, page: int, s_q: int = 1):
    heads, lora, rope, ctx = d["H"], d["lora"], d["rope"], d["ctx"]
    per_call = b * ctx * (lora + rope) * 2
    sets = max(2, min(64, math.ceil(256e6 / per_call))) if CUDA else 1
    ppseq = ctx // page
    kv = torch.randn(sets * b * ppseq, page, lora + rope, device=DEV, dtype=torch.bfloat16)
    tables = torch.randperm(sets * b * ppseq, device=DEV).view(sets, b, ppseq).to(torch.int32)
    lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
    lens[0] = ctx - 37  # one ragged sequence
    shape = (sets, b, heads, lora + rope) if s_q == 1 else (sets, b, s_q, heads, lora + rope)
    q = torch.randn(*shape, device=DEV, dtype=torch.bfloat16)
    return q, kv, tables, lens, sets, per_call


def bench_decode(d: dict) -> None:
    lora, ctx, scale = d["lora"], d["ctx"], (128 + 64) ** -0.5
    for page in d["pages"]:
        for b in d["batches"]:
            if over_budget():
                break
            q, kv, tables, lens, sets, per_call = _decode_inputs(d, b, page)
            ref = mla_decode_ref(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora)
            shape = f"B={b} ctx={ctx} page={page}"
            variants = decode_variants(b, d["bn"])
            if page != d["pages"][0]:
                # Second page size: the winner at the first page size only.
                best = _best("mla_decode", f"B={b} ctx={ctx} page={d['pages'][0]}")
                variants = [(best["kw"]["name"], _mla_cfg(best["kw"]))] if best else []
            rows = [_decode_row("mla_decode", shape, name, cfg, q, kv, tables, lens, sets, per_call, ref, d)
                    for name, cfg in variants]  # fmt: skip
            # The winning config at other split counts (a split count is a runtime argument: no
            # recompile, except splits=1 which skips the merge).
            good = [r for r in rows if _ok(r)]
            if good and page == d["pages"][0]:
                top = min(good, key=lambda r: r["sec"])
                for sp in split_choices(b, d["sms"]):
                    if sp != top["kw"]["num_splits"]:
                        cfg = replace(_mla_cfg(top["kw"]), num_splits=sp)
                        _decode_row("mla_decode", shape, top["kw"]["name"], cfg, q, kv, tables, lens, sets, per_call,
                                    ref, d)  # fmt: skip
            q = kv = tables = None  # free before the next shape
            if CUDA:
                torch.cuda.empty_cache()


def bench_mtp(d: dict) -> None:
    """Verify shapes: S_Q query positions per sequence over one KV read (M = S_Q * 32 rows)."""
    lora, ctx, scale, b, page = d["lora"], d["ctx"], (128 + 64) ** -0.5, d["mtp_b"], d["pages"][0]
    _, bn32, bn16 = d["bn"]
    for s_q in (2, 4):
        if over_budget():
            break
        q, kv, tables, lens, sets, per_call = _decode_inputs(d, b, page, s_q)
        ref = mla_decode_ref(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora)
        shape = f"B={b} S_Q={s_q} ctx={ctx} page={page}"
        auto = default_splits(b)
        # sm_90 compiles: S_Q=2 (M=64, 8 warps) gets wgmma; bn32 s3 184 KB, bn16 s3 131 KB no spill.
        # S_Q=4 runs as two 64-row programs (rows_per_program=64).
        for name, cfg in (("h32s3w8", MlaConfig(auto, bn32, 8, 3)), ("h16s3w8", MlaConfig(auto, bn16, 8, 3))):
            _decode_row("mla_verify", shape, name, cfg, q, kv, tables, lens, sets, per_call, ref, d)
        # Baseline: the same queries as B * S_Q separate decode rows (each re-reads its history).
        qf = q.flatten(1, 2)
        tab_f = tables.repeat_interleave(s_q, dim=1)
        lens_f = (lens[:, None] - (s_q - 1) + torch.arange(s_q, device=DEV, dtype=torch.int32)).flatten()
        attempt(
            "mla_verify", shape, "as B*S_Q decode rows (decode defaults)",
            lambda: mla_decode(qf[0], kv, tab_f[0], lens_f, scale, kv_lora_rank=lora).view_as(ref), ref,
            lambda i: mla_decode(qf[i % sets], kv, tab_f[i % sets], lens_f, scale, kv_lora_rank=lora),
            kw={}, bytes=per_call,
        )  # fmt: skip
        q = kv = tables = qf = None
        if CUDA:
            torch.cuda.empty_cache()


# ---- prefill -----------------------------------------------------------------------------------
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """Peer: per sequence, [1, H, T, 192] with v zero-padded to 192, causal (len_q == len_k)."""
    outs = []
    for a, b in itertools.pairwise(cu):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        vs = F.pad(vs, (0, q.shape[-1] - v.shape[-1]))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=q.shape[-1] ** -0.5)
        outs.append(o[0, :, :, : v.shape[-1]].transpose(0, 1))
    return torch.cat(outs)


def bench_prefill(d: dict) -> None:
    h, nope, rope, dv = d["H"], d["nope"], d["rope"], d["dv"]
    dqk = nope + rope
    scale = dqk**-0.5
    cases = [[t] for t in d["prefill"]] + [d["varlen"]]
    # sm_90 compiles (regs / smem, all wgmma, no spills): 128x64 w8 s3 194 / 172 KB; s4 213 KB;
    # 128x32 w8 s4 178 / 131 KB; 64x64 w4 s3 253 / 147 KB; 128x128 w8 s2 255 / 213 KB.
    configs = [MlaPrefillConfig(*c) for c in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 3),
                                              (128, 128, 8, 2))]  # fmt: skip
    if not CUDA:
        configs = [MlaPrefillConfig(16, 16, 4, 2), MlaPrefillConfig(32, 16, 4, 2)]
    for lens in cases:
        if over_budget():
            break
        t = sum(lens)
        cu_l = [0, *torch.tensor(lens).cumsum(0).tolist()]
        cu = torch.tensor(cu_l, dtype=torch.int32, device=DEV)
        sets = 4 if CUDA and t <= 2048 else (2 if CUDA else 1)  # rotate inputs past L2 at small T
        qs = [torch.randn(t, h, dqk, device=DEV, dtype=torch.bfloat16) for _ in range(sets)]
        ks = [torch.randn(t, h, dqk, device=DEV, dtype=torch.bfloat16) for _ in range(sets)]
        vs = [torch.randn(t, h, dv, device=DEV, dtype=torch.bfloat16) for _ in range(sets)]
        ref = mla_prefill_ref(qs[0], ks[0], vs[0], cu, cu, scale)
        flops = sum(2 * h * (dqk + dv) * n * n / 2 for n in lens)
        shape = "T=" + "+".join(map(str, lens))
        mx = max(lens)
        for cfg in configs:
            kw = dict(config=cfg, max_seqlen_q=mx, rope_dim=rope)
            attempt(
                "mla_prefill", shape, f"bm={cfg.block_m} bn={cfg.block_n} w={cfg.num_warps} s={cfg.num_stages}",
                lambda: mla_prefill(qs[0], ks[0], vs[0], cu, cu, scale, **kw), ref,
                lambda i: mla_prefill(qs[i % sets], ks[i % sets], vs[i % sets], cu, cu, scale, **kw),
                kw=asdict(cfg), flops=flops,
            )  # fmt: skip
        # The model's form: k_nope / v strided views of one kv_b_proj output, k_pe [T, 64] shared.
        best = _best("mla_prefill", shape)
        if best:
            kvb = torch.cat([ks[0][..., :nope], vs[0]], dim=-1)
            k_pe = ks[0][:, 0, nope:].contiguous()
            k_full = torch.cat([kvb[..., :nope], k_pe[:, None].expand(-1, h, -1)], dim=-1)
            ref2 = mla_prefill_ref(qs[0], k_full, kvb[..., nope:], cu, cu, scale)
            kw = dict(config=MlaPrefillConfig(**best["kw"]), max_seqlen_q=mx, rope_dim=rope)
            attempt(
                "mla_prefill", shape, "best, model form (k_pe shared, strided k/v)",
                lambda: mla_prefill(qs[0], kvb[..., :nope], kvb[..., nope:], cu, cu, scale, k_pe=k_pe, **kw), ref2,
                lambda i: mla_prefill(qs[0], kvb[..., :nope], kvb[..., nope:], cu, cu, scale, k_pe=k_pe, **kw),
                kw=best["kw"], flops=flops,
            )  # fmt: skip
        attempt(
            "mla_prefill", shape, "torch SDPA (v padded to 192)",
            lambda: _sdpa(qs[0], ks[0], vs[0], cu_l), ref,
            lambda i: _sdpa(qs[i % sets], ks[i % sets], vs[i % sets], cu_l),
            kw={}, flops=flops,
        )  # fmt: skip
        qs = ks = vs = ref = None
        if CUDA:
            torch.cuda.empty_cache()


# ---- round 2: the defaults against a few reasoned candidates ---------------------------------------
def round2_candidates(b: int, bns: tuple[int, ...]) -> list[tuple[str, MlaConfig | None]]:
    """The dispatched config (None) and candidates per batch (sm_90 compiles, ptxas regs / smem per CTA).

    h32s3w4 at twice the default splits: 112 KB smem and 255 registers x 128 threads fit 2 CTAs
    per SM (2 x 113 KB <= 228 KB, 2 x 32K regs = 64K), so 2 x 132 CTAs run as one wave: two
    independent load/compute pipelines per SM where the h64s3 defaults (188 KB) hold one. B = 32:
    4 -> 8 splits (256 CTAs); B = 128: 1 -> 2 splits (merge of 2); B = 8: 16 -> 32.
    Few CTAs (B = 1: 32 of 132 SMs busy, 2 key blocks each): 64 splits, one 64-key block each.
    """
    bn64, bn32, _ = bns
    d = default_splits(b)
    v: list[tuple[str, MlaConfig | None]] = [("default", None), ("h32s3w4", MlaConfig(2 * d, bn32, 4, 3))]
    if 2 * b * d <= 132:  # under half of default_splits' 132-SM wave busy
        v.append(("h64s3w8", MlaConfig(2 * d, bn64, 8, 3)))
    return v


def bench_decode_r2(d: dict) -> None:
    lora, ctx, scale, page = d["lora"], d["ctx"], (128 + 64) ** -0.5, d["pages"][0]
    for b in d["batches"]:
        if over_budget():
            break
        q, kv, tables, lens, sets, per_call = _decode_inputs(d, b, page)
        ref = mla_decode_ref(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora)
        shape = f"B={b} ctx={ctx} page={page}"
        for name, cfg in round2_candidates(b, d["bn"]):
            _decode_row("mla_decode", shape, name, cfg, q, kv, tables, lens, sets, per_call, ref, d)
        q = kv = tables = None
        if CUDA:
            torch.cuda.empty_cache()


def bench_mtp_r2(d: dict) -> None:
    """Verify (S_Q = 2, 4) with the defaults against the same queries as B * S_Q decode rows."""
    lora, ctx, scale, b, page = d["lora"], d["ctx"], (128 + 64) ** -0.5, d["mtp_b"], d["pages"][0]
    for s_q in (2, 4):
        if over_budget():
            break
        q, kv, tables, lens, sets, per_call = _decode_inputs(d, b, page, s_q)
        ref = mla_decode_ref(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora)
        shape = f"B={b} S_Q={s_q} ctx={ctx} page={page}"
        attempt(
            "mla_verify", shape, "default",
            lambda: mla_decode(q[0], kv, tables[0], lens, scale, kv_lora_rank=lora), ref,
            lambda i: mla_decode(q[i % sets], kv, tables[i % sets], lens, scale, kv_lora_rank=lora),
            kw={"name": "default"}, bytes=per_call,
        )  # fmt: skip
        qf = q.flatten(1, 2)
        tab_f = tables.repeat_interleave(s_q, dim=1)
        lens_f = (lens[:, None] - (s_q - 1) + torch.arange(s_q, device=DEV, dtype=torch.int32)).flatten()
        attempt(
            "mla_verify", shape, "as B*S_Q decode rows (decode defaults)",
            lambda: mla_decode(qf[0], kv, tab_f[0], lens_f, scale, kv_lora_rank=lora).view_as(ref), ref,
            lambda i: mla_decode(qf[i % sets], kv, tab_f[i % sets], lens_f, scale, kv_lora_rank=lora),
            kw={}, bytes=per_call,
        )  # fmt: skip
        q = kv = tables = qf = None
        if CUDA:
            torch.cuda.empty_cache()


def bench_prefill_r2(d: dict) -> None:
    """The longest prefill: the kernel's defaults in the model's form (k_pe shared, k/v strided
    views of one kv_b_proj output, as model/mla.py calls it) against torch SDPA."""
    h, nope, rope, dv = d["H"], d["nope"], d["rope"], d["dv"]
    dqk, t = nope + rope, max(d["prefill"])
    scale = dqk**-0.5
    cu = torch.tensor([0, t], dtype=torch.int32, device=DEV)
    sets = 2 if CUDA else 1
    qs = [torch.randn(t, h, dqk, device=DEV, dtype=torch.bfloat16) for _ in range(sets)]
    kvbs = [torch.randn(t, h, nope + dv, device=DEV, dtype=torch.bfloat16) for _ in range(sets)]
    kpes = [torch.randn(t, rope, device=DEV, dtype=torch.bfloat16) for _ in range(sets)]
    k_fulls = [
        torch.cat([kvb[..., :nope], kp[:, None].expand(-1, h, -1)], dim=-1)
        for kvb, kp in zip(kvbs, kpes, strict=True)
    ]
    ref = mla_prefill_ref(qs[0], k_fulls[0], kvbs[0][..., nope:], cu, cu, scale)
    flops = 2 * h * (dqk + dv) * t * t / 2
    shape = f"T={t}"

    def ours(i: int) -> torch.Tensor:
        q, kvb = qs[i % sets], kvbs[i % sets]
        return mla_prefill(
            q[..., :nope], kvb[..., :nope], kvb[..., nope:], cu, cu, scale, q_pe=q[..., nope:],
            k_pe=kpes[i % sets], max_seqlen_q=t,
        )  # fmt: skip

    attempt("mla_prefill", shape, "default, model form", lambda: ours(0), ref, ours,
            kw={"name": "default"}, flops=flops)  # fmt: skip
    attempt(
        "mla_prefill", shape, "torch SDPA (v padded to 192)",
        lambda: _sdpa(qs[0], k_fulls[0], kvbs[0][..., nope:], [0, t]), ref,
        lambda i: _sdpa(qs[i % sets], k_fulls[i % sets], kvbs[i % sets][..., nope:], [0, t]),
        kw={}, flops=flops,
    )  # fmt: skip
    qs = kvbs = kpes = k_fulls = ref = None
    if CUDA:
        torch.cuda.empty_cache()


# ---- report ------------------------------------------------------------------------------------
def _ok(r: dict) -> bool:
    """Timed and within 2e-2 of the fp32 reference (bf16 output)."""
    return "sec" in r and r.get("relerr") is not None and r["relerr"] < 2e-2


def _best(op: str, shape: str, ours: bool = False) -> dict | None:
    good = [r for r in ROWS if r["op"] == op and r["shape"] == shape and _ok(r) and (r.get("kw") or not ours)]
    return min(good, key=lambda r: r["sec"]) if good else None


def finish() -> None:
    for r in ROWS:
        if "sec" in r and "bytes" in r:
            r["x_read"] = r["bytes"] / r["sec"] / CEIL["read_Bps"]
            r["TBps"] = r["bytes"] / r["sec"] / 1e12
        if "sec" in r and "flops" in r:
            r["TFLOPs"] = r["flops"] / r["sec"] / 1e12
            r["x_bf16"] = r["flops"] / r["sec"] / CEIL["bf16_flops"]
    save()
    ok = [r for r in ROWS if "sec" in r]
    print(table(ok, ["op", "shape", "variant", "us", "x_read", "TFLOPs", "x_bf16", "relerr"]))
    print("\nWINNERS (fastest of our kernel's variants with relerr < 2e-2; kw = defaults to paste):")
    for op, shape in dict.fromkeys((r["op"], r["shape"]) for r in ROWS):
        best = _best(op, shape, ours=True)
        peer = [r for r in ROWS if r["op"] == op and r["shape"] == shape and _ok(r) and not r.get("kw")]
        if peer:
            print(f"  {'':12s} {'':28s} peer {peer[0]['variant']}: {peer[0]['us']:9.1f} us")
        if best:
            ratio = f"x_read={best['x_read']:.3f}" if "x_read" in best else f"x_bf16={best['x_bf16']:.3f}"
            print(f"  {op:12s} {shape:28s} {best['us']:9.1f} us  {ratio}  {best['variant']}  kw={best['kw']}")
    for r in ROWS:
        if "error" in r:
            print("ERROR", r["op"], r["shape"], r["variant"], r["error"][-300:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--only", default="", help="comma list of sections: decode,mtp,prefill")
    ap.add_argument("--full", action="store_true", help="round 1's wide sweep instead of round 2")
    ap.add_argument("--budget", type=float, default=None, help="seconds; later variants are skipped")
    args = ap.parse_args()
    BUDGET[0] = (
        args.budget if args.budget is not None else (1e9 if args.tiny else 95.0 if args.full else 50.0)
    )
    d = TINY if args.tiny else REAL
    torch.manual_seed(0)
    CEIL.update(measure_ceilings(args.tiny))
    print("ceilings", CEIL, f"({time.time() - T0:.0f} s)", flush=True)
    sections = {"decode": bench_decode, "prefill": bench_prefill, "mtp": bench_mtp}
    if not args.full:
        sections = {"decode": bench_decode_r2, "prefill": bench_prefill_r2, "mtp": bench_mtp_r2}
    for name, fn in sections.items():
        if not args.only or name in args.only.split(","):
            fn(d)
            print(f"section {name} done at {time.time() - T0:.0f} s", flush=True)
    finish()


if __name__ == "__main__":
    main()
