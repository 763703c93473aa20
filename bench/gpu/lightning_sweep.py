# ruff: noqa: B023  (each lambda is called at once by time_calls, inside its loop iteration)
"""Lightning prefill sweep, round 2: which chunk-kernel configuration to dispatch at which length.

Cases: T = 1K, 4K, 16K (one sequence) and a packed varlen 8 x 2K batch, H=32, D=128, bf16 q/k/v,
fp32 state slots, the model's slopes; each without and with an initial state. Variants: the base
(defaults), round 1's leaders (stage 1 with 8 warps, with and without block pointers) and a few
stage-2 change on top of the leader (block pointers). Every variant
is checked against an fp32 chunked torch reference (itself checked against the token loop) at the
real size before it is timed in CUDA graphs (inputs rotated past the 60 MB L2), next to fla's
``chunk_simple_gla`` (g_gamma = -slope) timed in the same process.

Each case runs in its own child process: an illegal memory access poisons the whole CUDA context
of the process it happens in (round 1 lost every later case to one faulting variant). The parent
does no GPU work; when a child dies, the variant it had started is recorded as faulted and a fresh
child carries on with the rest of that case. Prints the winners and the ``_DISPATCH`` table to
paste into runtime/ling_runtime/kernels/lightning_chunk.py.

    python3 bench/gpu/lightning_sweep.py          # H200: <= 100 s incl. compiles and fla autotune
    python3 bench/gpu/lightning_sweep.py --tiny   # CPU smoke run (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import os
import sys

TINY = "--tiny" in sys.argv
if TINY:  # before triton is imported (by common)
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import CUDA, DEV, environment, relerr, table, time_calls, write_results  # noqa: E402
from ling_runtime.kernels.lightning import lightning_prefill_ref, lightning_slopes  # noqa: E402
from ling_runtime.kernels.lightning_chunk import PrefillConfig, lightning_prefill_chunked  # noqa: E402

NAME = "gpu-lightning-sweep"
BUDGET_S = 95.0  # the lead's limit is 100 s for this script, compiles and fla autotune included
BASE = PrefillConfig()
LEAD = dict(warps1=8, block_ptr1=True)  # round 1's fastest stage 1 at T=1K (32.1 us vs base 34.2)
# Proven on the H200 first (a child that faults loses only what comes after), then the stage-2
# changes. Stage-2 BV=32 is left out: it faulted (see chunk_outputs); PDL (stage 2 launched while
# stage 1 walks) measured 10-17% slower and is gone (docs/gpu-notes.md).
VARIANTS: dict[str, dict] = {
    "base": {},
    "s1 64x64 w8": dict(warps1=8),
    "s1 bp 64x64 w8": LEAD,
    "s1 bp w8 + s2 bp 64 w4": dict(**LEAD, block_ptr2=True),
}
# (case, sequence lengths, dispatch bound: the largest average tokens per sequence it stands for).
CASES = [("T=1024", [1024], 1536), ("T=4096", [4096], 8192), ("varlen 8x2048", [2048] * 8, 3072),
         ("T=16384", [16384], 1 << 62)]  # fmt: skip
TINY_CASES = [("T=40", [40], 48), ("varlen 3x(20,12,17)", [20, 12, 17], 1 << 62)]
FLA_STATE_MIN_S = 30.0  # fla's with-state kernels autotune afresh (~20 s): only with this much left


def fit(cfg: PrefillConfig, dim: int) -> PrefillConfig:
    """The same variant at tiny sizes (chunk 16, blocks <= 16)."""
    if not TINY:
        return cfg
    small = min(16, dim)
    return replace(
        cfg, chunk=16, block_k=min(cfg.block_k, small), block_v=min(cfg.block_v, small),
        block_v_out=min(cfg.block_v_out, small), stages1=min(cfg.stages1, 2),
    )  # fmt: skip


def ref_chunked(q, k, v, pool, slots, cu, init, slope, scale, chunk: int = 64):
    """fp32 chunk-form reference (exact algebra of the recurrence; fast enough at T=16K)."""
    total, h, d = q.shape
    lam = slope.float().to(q.device)
    o = torch.empty(total, h, d, dtype=torch.float32, device=q.device)
    pos = torch.arange(chunk, dtype=torch.float32, device=q.device)
    finals = []
    bounds = cu.tolist()
    for n in range(len(bounds) - 1):
        lo, hi = bounds[n], bounds[n + 1]
        s = pool[int(slots[n])].float().clone() if int(init[n]) else torch.zeros(h, d, d, device=q.device)
        for c0 in range(lo, hi, chunk):
            c1 = min(c0 + chunk, hi)
            p = pos[: c1 - c0]
            qc = q[c0:c1].float().transpose(0, 1) * scale
            kc = k[c0:c1].float().transpose(0, 1)
            vc = v[c0:c1].float().transpose(0, 1)
            diff = p[:, None] - p[None, :]
            mask = torch.where(diff >= 0, torch.exp(-lam[:, None, None] * diff.clamp(min=0)), 0.0)
            oc = ((qc @ kc.transpose(1, 2)) * mask) @ vc + (qc @ s) * torch.exp(-lam[:, None] * (p + 1))[
                ..., None
            ]
            o[c0:c1] = oc.transpose(0, 1)
            kd = kc * torch.exp(-lam[:, None] * (c1 - c0 - 1 - p))[..., None]
            s = s * torch.exp(-lam * (c1 - c0))[:, None, None] + kd.transpose(1, 2) @ vc
        finals.append(s)
    return o, torch.stack(finals)


def check_reference(h: int, d: int) -> dict:
    """The chunked fp32 reference against the token-by-token loop (varlen, with and without state)."""
    lens = [100, 37, 64] if not TINY else [20, 9]
    total = sum(lens)
    slope = lightning_slopes(h, 1, 32).to(DEV)
    q, k, v = (torch.randn(total, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    slots = torch.arange(len(lens), dtype=torch.int32, device=DEV)
    init = torch.tensor([1, 0, 1][: len(lens)], dtype=torch.int32, device=DEV)
    pool = torch.randn(len(lens), h, d, d, device=DEV) * 0.05
    ref_pool = pool.clone()
    o_loop = lightning_prefill_ref(q, k, v, ref_pool, slots, cu, init, slope, d**-0.5)
    o_chunk, s_chunk = ref_chunked(
        q, k, v, pool, slots, cu, init, slope, d**-0.5, chunk=64 if not TINY else 16
    )
    check = {
        "relerr_out_bf16": relerr(o_chunk.to(q.dtype), o_loop),
        "relerr_state": relerr(s_chunk, ref_pool),
    }
    print("chunked fp32 reference vs token loop:", check, flush=True)
    assert check["relerr_out_bf16"] < 1e-2 and check["relerr_state"] < 1e-4, check
    return check


def fla_chunk_fn() -> tuple[Callable | None, str | None]:
    if TINY:
        return None, None
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla, None
    except Exception as exc:
        return None, f"fla not available: {exc!r}"[:300]


class Child:
    """Runs cases in this process; every row (and a marker before each variant) goes to a file."""

    def __init__(self, path: str, deadline: float, skip: set[str], fla_us: dict[str, float]) -> None:
        self.path = path
        self.deadline = deadline
        self.skip = skip
        self.fla_us = fla_us

    def emit(self, **obj: object) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj, default=str) + "\n")

    def record(self, case: str, variant: str, sec: float | None, **extra: object) -> None:
        row = {"case": case, "variant": variant, "us": None if sec is None else sec * 1e6, **extra}
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        self.emit(event="row", **row)

    def left(self) -> float:
        return self.deadline - time.time()

    def run_case(
        self, case: str, lens: list[int], with_init: bool, h: int, d: int, fla: Callable | None
    ) -> None:
        scale = d**-0.5
        slope = lightning_slopes(h, 1, 32).to(DEV)
        n = len(lens)
        total = sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        slots = torch.arange(n, dtype=torch.int32, device=DEV)
        init = torch.full((n,), int(with_init), dtype=torch.int32, device=DEV)
        pool0 = torch.randn(n, h, d, d, device=DEV) * 0.05
        set_bytes = 3 * total * h * d * 2
        n_sets = 1 if TINY else max(2, min(8, -(-200_000_000 // set_bytes)))  # past the 60 MB L2
        sets = [
            tuple(torch.randn(total, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
            for _ in range(n_sets)
        ]
        q, k, v = sets[0]
        o_ref, s_ref = ref_chunked(
            q, k, v, pool0, slots, cu, init, slope, scale, chunk=64 if not TINY else 16
        )
        name = f"{case} init={int(with_init)}"
        fla_us = self.fla_us.get(name)

        if fla is not None and fla_us is None and f"{name}|fla" not in self.skip:
            self.emit(event="start", key=f"{name}|fla")
            try:
                neg = -slope  # hoisted: not an fla cost
                h0 = pool0.clone() if with_init else None
                # Equal lengths go in as a batch [N, L]: fla's cu_seqlens path syncs on the host (no
                # graph capture) and would autotune its kernels once more (new key) for the same math.
                assert len(set(lens)) == 1, "fla peer: equal-length batches only"

                def call_fla(i: int):
                    qq, kk, vv = (x.view(n, lens[0], h, d) for x in sets[i % n_sets])
                    o, st = fla(
                        qq, kk, vv, g_gamma=neg, scale=scale, initial_state=h0, output_final_state=True
                    )
                    return o.view(total, h, d), st

                t0 = time.perf_counter()
                o_fla, s_fla = call_fla(0)
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                err, err_s = relerr(o_fla, o_ref), relerr(s_fla, s_ref)
                t = time_calls(call_fla, iters=10)
                fla_us = t * 1e6
                self.record(
                    name, "fla chunk_simple_gla", t, relerr=err, relerr_state=err_s, first_call_s=warm
                )
            except Exception as exc:
                traceback.print_exc()
                self.record(name, "fla chunk_simple_gla", None, error=repr(exc)[:300])

        for vname, upd in VARIANTS.items():
            key = f"{name}|{vname}"
            if key in self.skip:
                continue
            cfg = fit(replace(BASE, **upd), d)
            if CUDA and self.left() < 3:
                self.record(name, vname, None, error="skipped: time budget", cfg=asdict(cfg))
                continue
            self.emit(event="start", key=key)  # a fault before the matching row pins it on this one
            try:
                pool = pool0.clone()
                out = lightning_prefill_chunked(q, k, v, pool, slots, cu, init, slope, scale, config=cfg)
                err = relerr(out, o_ref)
                err_s = relerr(pool[slots.long()], s_ref)
                ok = err < (2e-2 if TINY else 6e-3) and err_s < (2e-2 if TINY else 6e-3)

                def call(i: int, cfg=cfg):
                    qq, kk, vv = sets[i % n_sets]
                    return lightning_prefill_chunked(
                        qq, kk, vv, pool, slots, cu, init, slope, scale, config=cfg
                    )

                extra: dict = {}
                t = time_calls(call, iters=10) if ok else None
                x_fla = None if (t is None or fla_us is None) else t * 1e6 / fla_us
                self.record(
                    name,
                    vname,
                    t,
                    relerr=err,
                    relerr_state=err_s,
                    ok=ok,
                    x_fla=x_fla,
                    cfg=asdict(cfg),
                    **extra,
                )
            except Exception as exc:
                traceback.print_exc()
                self.record(name, vname, None, error=repr(exc)[:300], cfg=asdict(cfg))
                if "illegal memory access" in repr(exc) or "CUDA error" in repr(exc):
                    raise SystemExit(3) from exc  # the context is gone: let the parent start afresh


def child_main(tasks: list[tuple[int, int]], path: str, deadline: float, skip: set[str],
               fla_us: dict[str, float]) -> None:  # fmt: skip
    """Runs (case index, with initial state) tasks in order, in this process."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is fp32
    torch.manual_seed(len(skip))
    h, d = (2, 32) if TINY else (32, 128)
    ch = Child(path, deadline, skip, fla_us)
    if "reference" not in skip:
        ch.emit(event="meta", key="reference_check", value=check_reference(h, d))
    fla, note = fla_chunk_fn()
    if note:
        ch.emit(event="meta", key="note", value=note)
    fla_state_warm = False
    for idx, with_init in tasks:
        case, lens, _ = (TINY_CASES if TINY else CASES)[idx]
        peer = fla
        if with_init and fla is not None and not fla_state_warm:
            # fla's with-state kernels autotune afresh (h0 is in their key): only with budget left.
            if ch.left() > FLA_STATE_MIN_S:
                fla_state_warm = True
            else:
                peer = None
                ch.emit(event="meta", key="note", value=f"{case} init=1: fla skipped (time budget)")
        ch.run_case(case, lens, bool(with_init), h, d, peer)


def spawn(tasks: list[tuple[int, int]], deadline: float, skip: set[str],
          fla_us: dict[str, float]) -> tuple[int, list[dict]]:  # fmt: skip
    """Runs ``tasks`` in a child process; its return code and the events it wrote."""
    fd, path = tempfile.mkstemp(prefix="lightning_sweep_", suffix=".jsonl")
    os.close(fd)
    argv = [sys.executable, __file__, "--child", json.dumps(tasks), path, repr(deadline),
            json.dumps(sorted(skip)), json.dumps(fla_us)] + (["--tiny"] if TINY else [])  # fmt: skip
    env = {**os.environ, "TRITON_CACHE_AUTOTUNING": "1"}  # fla's autotune results carry over children
    try:
        rc = subprocess.run(argv, env=env, timeout=max(5.0, deadline - time.time() + 5)).returncode
    except subprocess.TimeoutExpired:
        rc = -9
    events = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    os.unlink(path)
    return rc, events


def main() -> None:
    t0 = time.time()
    deadline = t0 + BUDGET_S
    cases = TINY_CASES if TINY else CASES
    rows: list[dict] = []
    meta: dict = {"env": environment(), "notes": [], "faults": []}

    def save() -> None:
        meta["elapsed_s"] = time.time() - t0
        write_results(NAME, {**meta, "rows": rows})

    # One child per no-state case (the dispatch target), then one for every with-state twin (those
    # share fla's with-state autotune, which a fresh process would pay again).
    # --cases T=16384[,T=1024]: only those cases (a re-measurement inside a small device budget).
    only = sys.argv[sys.argv.index("--cases") + 1].split(",") if "--cases" in sys.argv else None
    keep = [i for i, c in enumerate(cases) if only is None or c[0] in only]
    groups = [[(i, 0)] for i in keep] + [[(i, 1) for i in keep]]
    done: set[str] = set()
    fla_us: dict[str, float] = {}
    for group in groups:
        label = ", ".join(f"{cases[i][0]} init={w}" for i, w in group)
        for attempt in range(3):
            if CUDA and time.time() > deadline - 5:
                meta["notes"].append(f"{label}: not run (time budget)")
                break
            print(f"--- {label} (child attempt {attempt + 1})", flush=True)
            skip = done | ({"reference"} if "reference_check" in meta else set())
            rc, events = spawn(group, deadline, skip, fla_us)
            started = None
            for ev in events:
                kind = ev.pop("event")
                if kind == "meta":
                    if ev["key"] == "note":
                        meta["notes"].append(ev["value"])
                    else:
                        meta[ev["key"]] = ev["value"]
                elif kind == "start":
                    started = ev["key"]
                else:
                    rows.append(ev)
                    key = f"{ev['case']}|{ev['variant'].replace('fla chunk_simple_gla', 'fla')}"
                    done.add(key)
                    if ev["variant"].startswith("fla") and ev.get("us"):
                        fla_us[ev["case"]] = ev["us"]
                    if key == started:
                        started = None
                    if "CUDA error" in str(ev.get("error", "")):
                        meta["faults"].append(key)
            save()
            if rc == 0:
                break
            # The child died (fault, timeout): the variant it had started but not finished is the culprit.
            if started is not None:
                c, v = started.split("|", 1)
                rows.append(
                    {"case": c, "variant": v, "us": None, "error": f"child died (rc={rc}) in this variant"}
                )
                meta["faults"].append(started)
                done.add(started)
            print(f"child rc={rc}: died in {started!r}; a fresh child takes the rest of: {label}", flush=True)
            save()
    report(cases, rows, meta)
    save()
    print(f"done in {time.time() - t0:.1f} s", flush=True)


def report(cases: list[tuple[str, list[int], int]], rows: list[dict], meta: dict) -> None:
    timed = [r for r in rows if r.get("us") is not None]
    print(table(timed, ["case", "variant", "us", "x_fla", "relerr", "relerr_state"]))
    winners: dict[str, dict] = {}
    lines = []
    for case, _, _ in cases:
        for init in (0, 1):
            name = f"{case} init={init}"
            ours = [r for r in timed if r["case"] == name and "cfg" in r and r.get("ok")]
            if not ours:
                continue
            win = min(ours, key=lambda r: r["us"])
            fla = next((r["us"] for r in timed if r["case"] == name and r["variant"].startswith("fla")), None)
            base = next((r["us"] for r in ours if r["variant"] == "base"), None)
            ratio = f"{win['us'] / fla:.2f}x fla" if fla else "no fla"
            lines.append(
                f"{name}: {win['variant']} {win['us']:.1f} us ({ratio}; base {base and f'{base:.1f}'} us)"
            )
            if init == 0:
                winners[case] = win
    meta["winners"] = lines
    print("\nWinners:\n" + "\n".join(lines))
    dispatch = ["_DISPATCH: list[tuple[int, PrefillConfig]] = ["]
    for case, _, bound in sorted(cases, key=lambda c: c[2]):
        if case in winners:
            b = "1 << 62" if bound == 1 << 62 else str(bound)
            cfg = PrefillConfig(**winners[case]["cfg"])
            dispatch.append(
                f"    ({b}, {cfg!r}),  # {case}: {winners[case]['variant']} {winners[case]['us']:.1f} us"
            )
    dispatch.append("]")
    meta["dispatch"] = "\n".join(dispatch)
    if meta["faults"]:
        print("\nFaulted (each in its own child):", meta["faults"])
    print("\nPaste into lightning_chunk.py (init=0 winners):\n" + meta["dispatch"], flush=True)


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        tasks, path, deadline, skip, fla_us = sys.argv[i + 1 : i + 6]
        child_main([tuple(t) for t in json.loads(tasks)], path, float(deadline), set(json.loads(skip)),
                   json.loads(fla_us))  # fmt: skip
    else:
        main()
