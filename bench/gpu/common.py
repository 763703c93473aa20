"""Shared pieces of the GPU benchmark suites: device ceilings, CUDA-graph timing, result records.

Imports only torch/triton/numpy and ling_runtime.kernels, so it runs on the bare GPU image.
On a machine without CUDA (``--tiny`` smoke runs under TRITON_INTERPRET=1) timings are wall-clock
and meaningless; they exist so a typo is caught before device minutes are spent.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "runtime"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN propagates and fails every bound)."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def time_calls(fn: Callable[[int], object], iters: int = 20, reps: int = 10, graph: bool = True) -> float:
    """Median seconds per call of fn(i), i = 0..iters-1 (callers rotate inputs on i to beat L2).

    On CUDA the iters calls are captured in one CUDA graph (so launch overhead is the graph's,
    as in the serving step) and the graph is replayed ``reps`` times, timed by events.
    """
    if not CUDA:
        t0 = time.perf_counter()
        fn(0)
        return time.perf_counter() - t0
    for i in range(min(iters, 3)):
        fn(i)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=s):
                for i in range(iters):
                    fn(i)
        torch.cuda.current_stream().wait_stream(s)
        run = g.replay
    else:

        def run() -> None:
            for i in range(iters):
                fn(i)

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / iters)
    return statistics.median(times)


def measure_ceilings(tiny: bool) -> dict[str, float]:
    """HBM copy and read bandwidth, bf16 and fp8 matmul rate, measured now on this card."""
    if tiny:
        return {"copy_Bps": 1e9, "read_Bps": 1e9, "bf16_flops": 1e12, "fp8_flops": 1e12}
    out: dict[str, float] = {}
    # Copy: the best of a few sizes (all far past the 60 MB L2); the first run's single 2 GiB
    # copy_ gave 2.77 TB/s, well under the 4.3 TB/s seen by others here, so take the max.
    best = 0.0
    for n in (1 << 27, 1 << 28, 1 << 29):
        a = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        b = torch.empty_like(a)
        t = time_calls(lambda i: b.copy_(a), iters=10, reps=10)  # noqa: B023 (called at once)
        best = max(best, 2 * a.numel() * 2 / t)
        a = b = None  # free before the next size
    out["copy_Bps"] = best
    # Read-only streaming as decode sees it: a GEMV over an lm_head-sized matrix (1.29 GB).
    w = torch.randn(157184, 4096, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device=DEV, dtype=torch.bfloat16)
    t = time_calls(lambda i: torch.mm(x, w.T), iters=5, reps=10)
    out["read_Bps"] = w.numel() * 2 / t
    x32 = torch.randn(32, 4096, device=DEV, dtype=torch.bfloat16)
    out["read_Bps_m32"] = w.numel() * 2 / time_calls(lambda i: torch.mm(x32, w.T), iters=5, reps=10)
    w = None  # free the memory before the next section
    m = 8192
    a = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=DEV, dtype=torch.bfloat16)
    out["bf16_flops"] = 2 * m**3 / time_calls(lambda i: torch.mm(a, b), iters=3, reps=10)
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).T  # column-major second operand, as _scaled_mm wants
        one = torch.ones((), device=DEV)
        f = lambda i: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        out["fp8_flops"] = 2 * m**3 / time_calls(f, iters=3, reps=10)
    except Exception as exc:  # the fp8 ceiling is informative only; report why it is missing
        out["fp8_error"] = repr(exc)[:200]  # type: ignore[assignment]
    a = b = None  # free the memory before the next section
    torch.cuda.empty_cache()
    return out


def environment() -> dict[str, str]:
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter smoke run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }


def write_results(name: str, payload: dict) -> Path:
    """Writes $OUT/<name>.json when OUT is set (the device machine), else bench/results/."""
    out_dir = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    """A fixed-width text table of the given columns."""
    fmt = []
    for r in rows:
        fmt.append([(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in cols])
    widths = [max(len(c), *(len(f[i]) for f in fmt)) if fmt else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(f, widths, strict=True)) for f in fmt]
    return "\n".join(lines)
