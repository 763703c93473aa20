"""Decode step of one full layer group of Ling-2.6-flash (8 layers: layer 0 Lightning + dense MLP,
layers 1-6 Lightning + MoE, layer 7 MLA + MoE, each with its own random bf16 weights) plus the
final norm, lm_head and greedy sampling, captured as CUDA graphs at batch 1/8/32/128 (context 4K).

The 32-layer model is four such groups, so its decode step is extrapolated as
4 x group + head, and compared with the same extrapolation of the bytes roofline (weights touched
+ Lightning state + MLA KV) over the read bandwidth measured in this run. The whole bf16 model
(208 GB) does not fit one H200; this measures what one H200 does per group of layers and says
what the full model would do at TP1 if its weights fit (they do in FP8: see docs/gpu-notes.md).

    python3 bench/gpu/model_step.py             # on the H200 (writes $OUT/gpu-model-step.json)
    TRITON_INTERPRET=1 python3 bench/gpu/model_step.py --tiny
"""

# ruff: noqa: B023  (closures are called at once by time_calls, inside their loop iteration)
from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F
from common import CUDA, DEV, environment, measure_ceilings, table, time_calls, write_results
from layers import EPS, REAL, TINY, LightningLayer, MLALayer, MoE, w
from ling_runtime.kernels.norms import add_rmsnorm
from ling_runtime.kernels.sampling import sample


class DenseMLP:
    def __init__(self, d: dict) -> None:
        inter = 9216 if CUDA else 96
        self.w_gu, self.w_d = w(2 * inter, d["hid"]), w(d["hid"], inter)
        self.inter = inter

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gu = x @ self.w_gu.T
        return (F.silu(gu[:, : self.inter]) * gu[:, self.inter :]) @ self.w_d.T

    def bytes(self) -> float:
        return (self.w_gu.numel() + self.w_d.numel()) * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    d = TINY if args.tiny else REAL
    vocab = 157184 if CUDA else 5000
    torch.manual_seed(0)
    ceil = measure_ceilings(args.tiny)
    print("ceilings", ceil, flush=True)
    dense = DenseMLP(d)
    moes = [MoE(d) for _ in range(7)]
    lm_head = w(vocab, d["hid"])
    w_final = torch.rand(d["hid"], device=DEV) + 0.5
    rows: list[dict] = []
    for b in d["batches"]:
        try:
            attn = [LightningLayer(d, b) for _ in range(7)] + [MLALayer(d, b)]
            x = torch.randn(b, d["hid"], device=DEV, dtype=torch.bfloat16)
            res = torch.zeros(b, d["hid"], device=DEV, dtype=torch.bfloat16)
            temp = torch.zeros(b, device=DEV)
            touched: list[torch.Tensor] = []

            def group(i: int, record: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
                h, r = x, res
                for li, layer in enumerate(attn):
                    a, r = layer.attn(h, r)
                    hn, r = add_rmsnorm(a, r, layer.w_post, EPS)
                    if li == 0:
                        h = dense(hn)
                    else:
                        h, ids = moes[li - 1](hn)
                        if record:
                            touched.append(ids)
                return h, r

            def head(i: int) -> torch.Tensor:
                hn, _ = add_rmsnorm(x, res, w_final, EPS)
                return sample(hn @ lm_head.T, temp)

            group(0, record=True)
            t_group = time_calls(group, iters=2, reps=10)
            t_head = time_calls(head, iters=4, reps=10)
            t_eager = time_calls(group, iters=1, reps=3, graph=False)
            g_bytes = dense.bytes() + sum(layer.bytes() for layer in attn)
            g_bytes += sum(m.bytes(ids) for m, ids in zip(moes, touched, strict=True))
            h_bytes = lm_head.numel() * 2
            t_model = 4 * t_group + t_head
            roof = (4 * g_bytes + h_bytes) / ceil["read_Bps"]
            row = {"B": b, "group_us": t_group * 1e6, "head_us": t_head * 1e6, "group_eager_us": t_eager * 1e6,
                   "model_step_ms": t_model * 1e3, "roofline_ms": roof * 1e3, "x_roofline": roof / t_model,
                   "tok_s": b / t_model, "roofline_tok_s": b / roof, "GB_per_step": (4 * g_bytes + h_bytes) / 1e9}  # fmt: skip
        except Exception:
            row = {"B": b, "error": traceback.format_exc()[-1500:]}
        print(row, flush=True)
        rows.append(row)
        attn = None  # free the states and caches before the next batch size
        if CUDA:
            torch.cuda.empty_cache()
        write_results("gpu-model-step", {"env": environment(), "ceilings": ceil, "rows": rows})
    ok = [r for r in rows if "tok_s" in r]
    cols = [
        "B",
        "group_us",
        "head_us",
        "group_eager_us",
        "model_step_ms",
        "roofline_ms",
        "x_roofline",
        "tok_s",
    ]
    print(table(ok, cols))
    for r in rows:
        if "error" in r:
            print("ERROR", r["B"], r["error"][-600:])


if __name__ == "__main__":
    main()
