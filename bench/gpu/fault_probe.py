"""Find the kernel behind a CUDA fault in a decode step: one eager step of the real-dims model (FP8,
random weights) at batch B with CUDA_LAUNCH_BLOCKING=1, so the traceback names the launch that
faulted (in a graph replay the error surfaces only at the next synchronisation).

    python3 bench/gpu/fault_probe.py --batch 128 --layers 8     # prints OK or the faulting launch
"""

from __future__ import annotations

import os
import sys

os.environ["CUDA_LAUNCH_BLOCKING"] = "1"  # before torch initialises CUDA

import argparse
import traceback

import torch
from full_model import PAGE, build_config, fill_random
from ling_runtime.kernels import sample
from ling_runtime.model import ForwardBatch, LingForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--weights", choices=("fp8", "bf16"), default="fp8")
    args = ap.parse_args()
    args.tiny = False
    model = LingForCausalLM(
        build_config(args),
        device="cuda",
        dtype=torch.bfloat16,
        enable_mtp=False,
        weight_dtype="fp8" if args.weights == "fp8" else "model",
    )
    fill_random(model, seed=0)
    b, ctx = args.batch, args.ctx
    pages_per = -(-(ctx + 8) // PAGE)
    cache = model.make_cache(num_slots=b, num_pages=b * pages_per + 1, page_size=PAGE)
    pages = [list(range(s * pages_per, (s + 1) * pages_per)) for s in range(b)]
    toks = [(17 * s) % 1000 + 5 for s in range(b)]
    try:
        with torch.inference_mode():
            batch = ForwardBatch.build([[t] for t in toks], [ctx] * b, list(range(b)), pages, device="cuda")
            logits = model.compute_logits(model(batch, cache))
            temps = torch.full((b,), 0.7, device="cuda")
            sample(logits.float(), temps, torch.rand(b, logits.shape[-1], device="cuda"))
            torch.cuda.synchronize()
        print(f"OK batch={b} layers={args.layers}: logits finite={bool(torch.isfinite(logits).all())}")
        return 0
    except Exception:
        print(f"FAULT batch={b} layers={args.layers}:")
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
