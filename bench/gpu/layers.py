"""Decode layer steps at real Ling-2.6-flash sizes: one Lightning+MoE and one MLA+MoE layer at
batch 1/8/32/128 (context 4K), bf16 weights, captured in a CUDA graph, against the bytes roofline
(weights touched + state/KV traffic) / read bandwidth measured in the same run. Also the same
step run eagerly (the launch-bound cost a graph removes).

    python3 bench/gpu/layers.py              # on the H200 (writes $OUT/gpu-layers.json)
    TRITON_INTERPRET=1 python3 bench/gpu/layers.py --tiny
"""

# ruff: noqa: B023  (each lambda is called at once by time_calls, inside its loop iteration)
from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F
from common import CUDA, DEV, environment, measure_ceilings, table, time_calls, write_results
from ling_runtime.kernels.lightning import lightning_decode, lightning_slopes
from ling_runtime.kernels.mla import MlaConfig, mla_decode
from ling_runtime.kernels.moe import fused_moe, moe_route
from ling_runtime.kernels.moe_prefill import MoeConfig
from ling_runtime.kernels.norms import add_rmsnorm, group_rmsnorm_gate, qk_norm_rope, rope_cos_sin

REAL = dict(hid=4096, H=32, D=128, E=256, I=1024, topk=8, ngroup=8, topkg=4, qlora=1536, lora=512, rope=64,
            nope=128, vdim=128, ctx=4096, page=64, batches=[1, 8, 32, 128])  # fmt: skip
TINY = dict(hid=128, H=2, D=32, E=16, I=64, topk=4, ngroup=4, topkg=2, qlora=64, lora=32, rope=16,
            nope=32, vdim=32, ctx=64, page=16, batches=[2])  # fmt: skip
EPS = 1e-6


def w(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.randn(*shape, device=DEV) * shape[-1] ** -0.5).to(dtype)


class MoE:
    """Router (fp32 GEMM + fused top-k kernel) and the grouped expert kernels, shared expert inside."""

    def __init__(self, d: dict) -> None:
        self.d = d
        self.wr = w(d["E"], d["hid"], dtype=torch.float32)
        self.bias = torch.randn(d["E"], device=DEV) * 0.1
        self.w13 = w(d["E"] + 1, 2 * d["I"], d["hid"])
        self.w2 = w(d["E"] + 1, d["hid"], d["I"])

    def cfg(self, b: int) -> MoeConfig | None:
        if not CUDA:
            return MoeConfig("decode", 16, (16, 16), (32, 32), (4, 4), (3, 3))
        return None  # the dispatch: decode tiles below GROUPED_FROM, the shared expert via cuBLAS from 64

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        ids, wts = moe_route(x.float() @ self.wr.T, self.bias, d["topk"], d["ngroup"], d["topkg"], 2.5)
        return fused_moe(x, self.w13, self.w2, ids, wts, config=self.cfg(x.shape[0])), ids

    def bytes(self, ids: torch.Tensor) -> float:
        d = self.d
        return self.wr.numel() * 4 + len(torch.unique(ids)) * 3 * d["I"] * d["hid"] * 2


class LightningLayer:
    def __init__(self, d: dict, b: int) -> None:
        hd = d["H"] * d["D"]
        self.d, self.b = d, b
        self.w_in, self.w_post = (
            torch.rand(d["hid"], device=DEV) + 0.5,
            torch.rand(d["hid"], device=DEV) + 0.5,
        )
        self.wqkv, self.wg, self.wo = w(3 * hd, d["hid"]), w(hd, d["hid"]), w(d["hid"], hd)
        self.wq, self.wk = torch.rand(d["D"], device=DEV) + 0.5, torch.rand(d["D"], device=DEV) + 0.5
        self.wn = torch.rand(hd, device=DEV) + 0.5
        self.slope = lightning_slopes(d["H"], 3, 32).to(DEV)
        self.state = torch.randn(b, d["H"], d["D"], d["D"], device=DEV) * 0.05
        self.slots = torch.arange(b, device=DEV, dtype=torch.int32)
        self.cos, self.sin = rope_cos_sin(torch.full((b,), d["ctx"], device=DEV), d["D"] // 2, 6e6)

    def attn(self, x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d
        h, res = add_rmsnorm(x, res, self.w_in, EPS)
        q, k, v = qk_norm_rope(h @ self.wqkv.T, self.wq, self.wk, self.cos, self.sin, d["H"], EPS)
        o = lightning_decode(q, k, v, self.state, self.slots, self.slope, d["D"] ** -0.5,
                             block_v=64 if (CUDA and self.b >= 32) else 32 if CUDA else 16)  # fmt: skip
        y = group_rmsnorm_gate(o.view(self.b, -1), h @ self.wg.T, self.wn, o.shape[1] * o.shape[2] // 4, EPS)
        return y @ self.wo.T, res

    def bytes(self) -> float:
        weights = (self.wqkv.numel() + self.wg.numel() + self.wo.numel()) * 2
        return weights + self.state.numel() * 4 * 2


class MLALayer:
    def __init__(self, d: dict, b: int) -> None:
        self.d, self.b = d, b
        h = d["H"]
        self.w_in, self.w_post = (
            torch.rand(d["hid"], device=DEV) + 0.5,
            torch.rand(d["hid"], device=DEV) + 0.5,
        )
        self.wa = w(d["qlora"] + d["lora"] + d["rope"], d["hid"])
        # bf16 norm weights: F.rms_norm falls back to an unfused path on a dtype mismatch.
        self.wqa_n = (torch.rand(d["qlora"], device=DEV) + 0.5).bfloat16()
        self.wkv_n = (torch.rand(d["lora"], device=DEV) + 0.5).bfloat16()
        self.wqb = w(h * (d["nope"] + d["rope"]), d["qlora"])
        self.w_uk = w(h, d["nope"], d["lora"])  # absorbed: q_nope (128) -> latent (512)
        self.w_uv = w(h, d["lora"], d["vdim"])  # latent (512) -> v (128)
        self.wo = w(d["hid"], h * d["vdim"])
        pages_per = d["ctx"] // d["page"] + 1
        self.kv = torch.randn(
            b * pages_per, d["page"], d["lora"] + d["rope"], device=DEV, dtype=torch.bfloat16
        )
        self.table = torch.randperm(b * pages_per, device=DEV).view(b, pages_per).to(torch.int32)
        self.lens = torch.full((b,), d["ctx"], device=DEV, dtype=torch.int32)
        pos = d["ctx"] - 1  # the new token's slot in each sequence's cache
        self.dst_page = self.table[:, pos // d["page"]].long()
        self.dst_off = torch.full((b,), pos % d["page"], device=DEV, dtype=torch.long)
        cos, sin = rope_cos_sin(torch.full((b,), pos, device=DEV), d["rope"], 6e6)
        self.cos, self.sin = cos[:, None, :], sin[:, None, :]

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """Interleaved (GPT-J) RoPE on the last dim (x [B, n, 64])."""
        x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
        return (
            torch.stack([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], -1)
            .flatten(-2)
            .to(x.dtype)
        )

    def attn(self, x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, b, h = self.d, self.b, self.d["H"]
        hn, res = add_rmsnorm(x, res, self.w_in, EPS)
        a = hn @ self.wa.T
        cq = F.rms_norm(a[:, : d["qlora"]], (d["qlora"],), self.wqa_n, EPS)
        ckv = F.rms_norm(a[:, d["qlora"] : d["qlora"] + d["lora"]], (d["lora"],), self.wkv_n, EPS)
        kpe = self.rope(a[:, None, d["qlora"] + d["lora"] :])[:, 0]
        self.kv[self.dst_page, self.dst_off] = torch.cat([ckv, kpe], -1)
        q = (cq @ self.wqb.T).view(b, h, d["nope"] + d["rope"])
        q_abs = torch.bmm(q[..., : d["nope"]].transpose(0, 1), self.w_uk).transpose(0, 1)
        qf = torch.cat([q_abs, self.rope(q[..., d["nope"] :])], -1)
        cfg = None if CUDA else MlaConfig(2, 16, 4)  # the dispatch on the GPU
        u = mla_decode(qf, self.kv, self.table, self.lens, (d["nope"] + d["rope"]) ** -0.5, kv_lora_rank=d["lora"],
                       config=cfg)  # fmt: skip
        o = torch.bmm(u.transpose(0, 1), self.w_uv).transpose(0, 1).reshape(b, -1)
        return o @ self.wo.T, res

    def bytes(self) -> float:
        d = self.d
        weights = (
            self.wa.numel() + self.wqb.numel() + self.w_uk.numel() + self.w_uv.numel() + self.wo.numel()
        ) * 2
        return weights + self.b * d["ctx"] * (d["lora"] + d["rope"]) * 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    d = TINY if args.tiny else REAL
    torch.manual_seed(0)
    ceil = measure_ceilings(args.tiny)
    print("ceilings", ceil, flush=True)
    moe = MoE(d)
    rows: list[dict] = []
    for kind in ("lightning+moe", "mla+moe"):
        for b in d["batches"]:
            try:
                layer = LightningLayer(d, b) if kind == "lightning+moe" else MLALayer(d, b)
                sets = 4
                xs = torch.randn(sets, b, d["hid"], device=DEV, dtype=torch.bfloat16)
                res = torch.randn(b, d["hid"], device=DEV, dtype=torch.bfloat16)

                def step(i: int) -> torch.Tensor:
                    a, r = layer.attn(xs[i % sets], res)
                    h, r = add_rmsnorm(a, r, layer.w_post, EPS)
                    out, _ = moe(h)
                    return out

                # Roofline bytes: this layer's weights + state/KV + router + distinct experts per step.
                nbytes = 0.0
                for i in range(sets):
                    h, _ = add_rmsnorm(*layer.attn(xs[i], res.clone()), layer.w_post, EPS)
                    nbytes += layer.bytes() + moe.bytes(moe(h)[1]) / 1.0
                nbytes /= sets
                t_graph = time_calls(step, iters=8, reps=10)
                t_eager = time_calls(step, iters=8, reps=5, graph=False)
                roof = nbytes / ceil["read_Bps"]
                row = {"layer": kind, "B": b, "bytes_MB": nbytes / 1e6, "roofline_us": roof * 1e6,
                       "graph_us": t_graph * 1e6, "eager_us": t_eager * 1e6, "x_roofline": roof / t_graph,
                       "graph_speedup": t_eager / t_graph, "attn_MB": layer.bytes() / 1e6}  # fmt: skip
            except Exception:
                row = {"layer": kind, "B": b, "error": traceback.format_exc()[-1500:]}
            print(row, flush=True)
            rows.append(row)
            layer = None  # free the state / KV pool before the next size
            if CUDA:
                torch.cuda.empty_cache()
            write_results("gpu-layers", {"env": environment(), "ceilings": ceil, "rows": rows})
    ok = [r for r in rows if "graph_us" in r]
    cols = ["layer", "B", "bytes_MB", "roofline_us", "graph_us", "eager_us", "x_roofline", "graph_speedup"]
    print(table(ok, cols))
    for r in rows:
        if "error" in r:
            print("ERROR", r["layer"], r["B"], r["error"][-500:])


if __name__ == "__main__":
    main()
