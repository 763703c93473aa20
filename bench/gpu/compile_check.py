"""Compile every Triton launch of the production entry points for sm_90 without a GPU, and diff
two trees' PTX: a kernel refactor that should change nothing can be shown to, for free.

Each scenario calls an entry point at the model's real sizes on (unallocated) CPU tensors, with
``JITFunction.run`` replaced by a compile for ``GPUTarget("cuda", 90, 32)``: the launch is
specialised exactly as on the GPU (alignment, ints equal to 1, constexprs, options), compiled with
the ptxas Triton ships, and its PTX stored normalised (no debug lines, the kernel name as ``K``,
parameters by name). ``diff`` compares two dumps launch by launch: identical text, else the PTX
instruction histogram difference (register renumbering alone shows as "same histogram").

    python3 bench/gpu/compile_check.py dump /tmp/new.json [SCENARIO-SUBSTRING ...]
    python3 <other tree>/bench/gpu/compile_check.py dump /tmp/old.json     # its own runtime
    python3 bench/gpu/compile_check.py diff /tmp/old.json /tmp/new.json
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("compile_check compiles for sm_90: run it without TRITON_INTERPRET=1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "runtime"))

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import (
    ASTSource,
    compile,
    make_backend,
)
from triton.runtime import jit as tjit

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
LAUNCHES: list[dict] = []


def normalise(ptx: str, name: str, argnames: list[str]) -> str:
    """PTX without debug info and declarations, the kernel named K, parameters by Python name (so
    a removed unused argument does not renumber every load of the others)."""
    out = []
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith(".section") and "debug" in s:
            break
        if s.startswith((".loc", ".file", "//", "$L__func_begin", "$L__func_end", "$L__tmp")) or not s:
            continue
        if s.startswith(".param") or s.startswith(".entry") or s.startswith(".visible"):
            continue
        line = line.replace(name, "K")

        def par(m: re.Match) -> str:
            i = int(m.group(1))
            return "P:" + (argnames[i] if i < len(argnames) else f"extra{i - len(argnames)}")

        line = re.sub(r"K_param_(\d+)", par, line)
        out.append(line)
    return "\n".join(out)


def fake_run(self, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` without a device: bind and specialise the arguments as a launch would,
    compile for sm_90 and record the PTX instead of launching."""
    kwargs["debug"] = False
    binder = tjit.create_function_from_signature(self.signature, self.params, BACKEND)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(
        BACKEND, kwargs, bound_args, specialization, options
    )
    src = ASTSource(self, signature, constexprs, attrs)
    rec = {"kernel": self.fn.__name__, "grid": str(grid if not callable(grid) else "fn")}
    try:
        k = compile(src, target=TARGET, options=options.__dict__)
        names = [n for n, v in signature.items() if v != "constexpr"]
        rec["ptx"] = normalise(k.asm["ptx"], k.metadata.name, names)
        rec["shared"] = k.metadata.shared
        rec["warps"] = options.num_warps
        rec["stages"] = options.num_stages
    except Exception:
        rec["error"] = traceback.format_exc()[-800:]
    LAUNCHES.append(rec)
    return None


tjit.JITFunction.run = fake_run

E, INTER, H = 256, 1024, 4096
FP8 = torch.float8_e4m3fn
BF = torch.bfloat16


def moe_weights(fp8: bool):
    if fp8:
        w13 = torch.empty(E + 1, 2 * INTER, H, dtype=FP8)
        w2 = torch.empty(E + 1, H, INTER, dtype=FP8)
        s13 = torch.ones(E + 1, 2 * INTER // 128, H // 128)
        s2 = torch.ones(E + 1, H // 128, INTER // 128)
        return w13, w2, s13, s2
    return torch.empty(E + 1, 2 * INTER, H, dtype=BF), torch.empty(E + 1, H, INTER, dtype=BF), None, None


def routing(b: int):
    g = torch.Generator().manual_seed(b)
    ids = torch.stack([torch.randperm(E, generator=g)[:8] for _ in range(b)]).to(torch.int32)
    ids = torch.cat([ids, torch.full((b, 1), E, dtype=torch.int32)], 1).contiguous()
    w = torch.rand(b, 9, generator=g)
    return ids, w


def sc_moe(fp8: bool, b: int, reduce: bool = True):
    from ling_runtime.kernels.moe import fused_moe

    w13, w2, s13, s2 = moe_weights(fp8)
    ids, w = routing(b)
    x = torch.randn(b, H).to(BF)
    if fp8:
        fused_moe(x, w13, w2, ids, w, w13_scale=s13, w2_scale=s2, reduce=reduce)
    else:
        fused_moe(x, w13, w2, ids, w, reduce=reduce)


def sc_router(b: int):
    from ling_runtime.kernels.moe import moe_route, router_logits

    x = torch.randn(b, H).to(BF)
    router_logits(x, torch.randn(E, H))
    moe_route(torch.randn(b, E), torch.randn(E), 8, 8, 4, 2.5)


def sc_mla(b: int, s_q: int = 1, ctx: int = 4096, page: int = 64, width: int | None = None):
    from ling_runtime.kernels.mla import mla_decode

    pages = ctx // page
    width = width or pages
    kv = torch.empty(b * pages + 1, page, 576, dtype=BF)
    table = torch.arange(b * width, dtype=torch.int32).view(b, width) % (b * pages)
    lens = torch.full((b,), ctx, dtype=torch.int32)
    q = torch.randn(b, 32, 576).to(BF) if s_q == 1 else torch.randn(b, s_q, 32, 576).to(BF)
    mla_decode(q, kv, table, lens, 0.07, kv_lora_rank=512)


def sc_fp8(n: int, k: int, m: int):
    from ling_runtime.kernels.fp8 import fp8_linear

    w = torch.empty(n, k, dtype=FP8)
    s = torch.ones(-(-n // 128), k // 128)
    fp8_linear(torch.randn(m, k).to(BF), w, s)


def sc_lightning(b: int):
    from ling_runtime.kernels import lightning_commit, lightning_decode, lightning_verify

    pool = torch.empty(b + 4, 32, 128, 128)
    slots = torch.arange(b, dtype=torch.int32)
    slope = torch.rand(32)
    q = torch.randn(b, 32, 128).to(BF)
    lightning_decode(q, q.clone(), q.clone(), pool, slots, slope, 0.08, out=torch.zeros_like(q), block_v=32)
    qv = torch.randn(b, 4, 32, 128).to(BF)
    inter = torch.empty(b, 4, 32, 128, 128)
    lightning_verify(qv, qv.clone(), qv.clone(), pool, slots, slope, 0.08, inter=inter, block_v=32)
    lightning_commit(pool, slots, inter, torch.ones(b, dtype=torch.int32))


def sc_lprefill(lens: list[int]):
    from ling_runtime.kernels.lightning_chunk import lightning_prefill_chunked

    t = sum(lens)
    q = torch.randn(t, 32, 128).to(BF)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    n = len(lens)
    pool = torch.empty(n + 2, 32, 128, 128)
    lightning_prefill_chunked(q, q.clone(), q.clone(), pool, torch.arange(n, dtype=torch.int32), cu,
                              torch.zeros(n, dtype=torch.int32), torch.rand(32), 0.08)  # fmt: skip


def sc_mla_prefill(t: int):
    from ling_runtime.kernels.mla_prefill import mla_prefill

    q = torch.randn(t, 32, 128).to(BF)
    kvb = torch.randn(t, 32, 256).to(BF)
    lat = torch.randn(t, 576).to(BF)
    cu = torch.tensor([0, t], dtype=torch.int32)
    mla_prefill(q, kvb[..., :128], kvb[..., 128:], cu, cu, 0.07, q_pe=torch.randn(t, 32, 64).to(BF),
                k_pe=lat[:, 512:], max_seqlen_q=t)  # fmt: skip


def sc_small(b: int):
    from ling_runtime.kernels import add_rmsnorm, group_rmsnorm_gate, qk_norm_rope, sample
    from ling_runtime.kernels.norms import add_rmsnorm_partials
    from ling_runtime.kernels.rms_norm import rms_norm

    x = torch.randn(b, H).to(BF)
    add_rmsnorm(x, x.clone(), torch.ones(H), 1e-6)
    add_rmsnorm_partials(torch.randn(b, 9, H), x.clone(), torch.ones(H), 1e-6)
    group_rmsnorm_gate(x, x.clone(), torch.ones(H), 512, 1e-6)
    qk_norm_rope(torch.randn(b, 3 * H).to(BF), torch.ones(128), torch.ones(128), torch.randn(b, 32),
                 torch.randn(b, 32), 32, 1e-6)  # fmt: skip
    rms_norm(torch.randn(b, 1536).to(BF), torch.ones(1536), 1e-6)
    sample(torch.randn(b, 157184), torch.zeros(b), torch.rand(b, 157184))


SCEN: dict[str, object] = {}
for fp8 in (True, False):
    for b in (1, 8, 32, 64, 128, 256, 1024):
        SCEN[f"moe fp8={fp8} B={b}"] = (sc_moe, fp8, b)
SCEN["moe fp8 B=8192"] = (sc_moe, True, 8192)
SCEN["moe bf16 B=8192"] = (sc_moe, False, 8192)
SCEN["moe fp8 B=1 partials"] = (sc_moe, True, 1, False)
SCEN["moe fp8 B=64 partials"] = (sc_moe, True, 64, False)
SCEN["moe bf16 B=64 partials"] = (sc_moe, False, 64, False)
for b in (1, 8):
    SCEN[f"router B={b}"] = (sc_router, b)
for b in (1, 8, 32, 65, 66, 128):
    SCEN[f"mla B={b}"] = (sc_mla, b)
SCEN["mla B=1 wide table"] = (sc_mla, 1, 1, 4096, 16, 8193)
SCEN["mla B=128 page16"] = (sc_mla, 128, 1, 4096, 16)
SCEN["mla B=8 SQ=4"] = (sc_mla, 8, 4)
SCEN["mla B=32 SQ=2"] = (sc_mla, 32, 2)
for nk in ((576, 4096), (1536, 4096), (4096, 4096), (4096, 8192), (4096, 9216), (6144, 1536), (12288, 4096),
           (18432, 4096), (157184, 4096), (3072, 2048)):  # fmt: skip
    for m in (1, 2, 4, 8, 16, 32, 64, 128, 300):
        if nk[0] == 157184 and m > 128:
            continue
        SCEN[f"fp8 {nk[0]}x{nk[1]} M={m}"] = (sc_fp8, *nk, m)
for b in (1, 32):
    SCEN[f"lightning B={b}"] = (sc_lightning, b)
for lens in ([1024], [2048] * 8, [4096], [16384], [37, 5]):
    SCEN[f"lprefill {lens}"] = (sc_lprefill, lens)
for t in (1024, 8192):
    SCEN[f"mla_prefill T={t}"] = (sc_mla_prefill, t)
for b in (1, 32):
    SCEN[f"small B={b}"] = (sc_small, b)


def dump(path: str, pick: list[str]) -> None:
    torch.manual_seed(0)
    res = {}
    for name, (fn, *a) in SCEN.items():
        if pick and not any(p in name for p in pick):
            continue
        LAUNCHES.clear()
        try:
            fn(*a)
            res[name] = list(LAUNCHES)
        except Exception:
            res[name] = [*LAUNCHES, {"error": traceback.format_exc()[-1500:]}]
        print(name, [(r.get("kernel"), "ERR" if "error" in r else len(r.get("ptx", ""))) for r in res[name]],
              flush=True)  # fmt: skip
    Path(path).write_text(json.dumps(res))


def histogram(ptx: str) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.endswith(":") or s.startswith((".", "{", "}", ")", "(")):
            continue
        words = s.split()
        c[(words[1] if words[0].startswith("@") else words[0]).rstrip(";")] += 1
    return c


def diff(path_a: str, path_b: str) -> None:
    a, b = json.loads(Path(path_a).read_text()), json.loads(Path(path_b).read_text())
    same = differ = 0
    for name in a.keys() & b.keys():
        la, lb = a[name], b[name]
        if len(la) != len(lb):
            print("LAUNCHES", name, [x.get("kernel") for x in la], [x.get("kernel") for x in lb])
            differ += 1
            continue
        for x, y in zip(la, lb, strict=True):
            if "error" in x or "error" in y:
                print("ERROR", name, (x.get("error") or "")[-200:], "|", (y.get("error") or "")[-300:])
                differ += 1
                continue
            meta = [(x[k], y[k]) for k in ("shared", "warps", "stages")]
            if x["ptx"] == y["ptx"] and all(p == q for p, q in meta):
                same += 1
                continue
            differ += 1
            hx, hy = histogram(x["ptx"]), histogram(y["ptx"])
            ops = {k: hy[k] - hx[k] for k in set(hx) | set(hy) if hy[k] != hx[k]}
            print(f"DIFF {name} {x['kernel']} -> {y['kernel']}: shared/warps/stages {meta} "
                  f"ops {ops or 'same histogram'}")  # fmt: skip
    print(
        f"identical launches {same}, different {differ}; scenarios in one dump only: {len(a.keys() ^ b.keys())}"
    )


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "diff":
        diff(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
