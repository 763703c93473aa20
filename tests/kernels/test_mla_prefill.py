"""MLA prefill (192-d qk, 128-d v, causal varlen with prefixes) against its fp32 reference."""

from __future__ import annotations

import torch
from ling_runtime.kernels.mla_prefill import MlaPrefillConfig, mla_prefill, mla_prefill_ref

from tests.kernels.util import relerr

H, NOPE, ROPE, DV = 2, 32, 16, 32
SCALE = (NOPE + ROPE) ** -0.5
SMALL = MlaPrefillConfig(block_m=16, block_n=16)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def test_prefill_varlen_with_prefixes(gen: torch.Generator) -> None:
    # (len_q, len_k): plain prefill, a chunk after a cached prefix, a single decode-like token, and
    # an empty sequence in the batch.
    lens_q, lens_k = [37, 20, 1, 0], [37, 53, 9, 0]
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, H, NOPE + ROPE, generator=gen).bfloat16()
    k = torch.randn(tk, H, NOPE + ROPE, generator=gen).bfloat16()
    v = torch.randn(tk, H, DV, generator=gen).bfloat16()
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    ref = mla_prefill_ref(q, k, v, cu_q, cu_k, SCALE)
    for bm, bn in ((16, 16), (32, 16)):
        cfg = MlaPrefillConfig(block_m=bm, block_n=bn)
        out = mla_prefill(q, k, v, cu_q, cu_k, SCALE, rope_dim=ROPE, config=cfg)
        assert relerr(out, ref) < 1e-2, (bm, bn)
    # The prefix matters: without it (len_k = len_q) the chunk's answer must differ.
    ref_noprefix = mla_prefill_ref(q[37:57], k[37 + 33 : 90], v[37 + 33 : 90], _cu([20]), _cu([20]), SCALE)
    assert relerr(ref[37:57], ref_noprefix) > 1e-1
    # Keys past len_k (and rows past len_q) are never read: poisoning the padding changes nothing.
    kp = torch.cat([k, torch.full((5, H, NOPE + ROPE), float("nan")).bfloat16()])
    vp = torch.cat([v, torch.full((5, H, DV), float("nan")).bfloat16()])
    out = mla_prefill(q, kp, vp, cu_q, cu_k, SCALE, rope_dim=ROPE, config=SMALL)
    assert relerr(out, ref) < 1e-2


def test_prefill_model_pieces_shared_rope_key(gen: torch.Generator) -> None:
    # The model's form: k_nope and v as strided views of one kv_b_proj output, k_pe one row per token.
    lens = [24, 40]
    t = sum(lens)
    kvb = torch.randn(t, H, NOPE + DV, generator=gen).bfloat16()
    k_nope, v = kvb[..., :NOPE], kvb[..., NOPE:]
    k_pe = torch.randn(t, ROPE, generator=gen).bfloat16()
    q = torch.randn(t, H, NOPE + ROPE, generator=gen).bfloat16()
    cu = _cu(lens)
    k_full = torch.cat([k_nope, k_pe[:, None].expand(-1, H, -1)], dim=-1)
    ref = mla_prefill_ref(q, k_full, v, cu, cu, SCALE)
    out = mla_prefill(q[..., :NOPE], k_nope, v, cu, cu, SCALE, q_pe=q[..., NOPE:], k_pe=k_pe, config=SMALL)
    assert relerr(out, ref) < 1e-2
