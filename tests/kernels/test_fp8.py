"""FP8 block-scaled linear against dequantise-then-matmul (interpreter, small sizes)."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.kernels.fp8 import (
    Fp8Config,
    _tile_counters,
    auto_split,
    dequant_fp8,
    dequant_scratch,
    fp8_linear,
    fp8_linear_ref,
    m_bucket,
    pick_config,
    quantize_act_fp8,
    quantize_act_fp8_ref,
    quantize_fp8_blockwise,
)

from tests.kernels.util import relerr


def _weights(gen: torch.Generator, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Blocks with very different magnitudes: a kernel that applies the wrong block's scale (or a
    # per-tensor one) is off by orders of magnitude, not by rounding.
    mags = torch.logspace(-3, 1.5, 7)[torch.randint(0, 7, (-(-n // 128), k // 128), generator=gen)]
    w = torch.randn(n, k, generator=gen) * mags.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    wq, scale = quantize_fp8_blockwise(w)
    return w, wq, scale


def test_quantize_block_scales(gen: torch.Generator) -> None:
    w, wq, scale = _weights(gen, 200, 384)  # N not a multiple of 128: last block is partial
    assert wq.shape == (200, 384) and scale.shape == (2, 3)
    assert relerr(fp8_linear_ref(torch.eye(384), wq, scale).T, w) < 0.05  # quantisation itself


# Every path, with M not a multiple of the token tile and N not a multiple of the row tile
# (N=200 also leaves a partial 128-row scale block, as MLA kv_a's 576 does), plus split-K with a
# split count that leaves one split empty (K=768: 6 steps of 128 over 4 splits of 2). gemv and f16
# sum their split-K partials in the launch (the last split of a tile), dot in a reduce launch.
CASES = [
    Fp8Config("gemv", bm=1, bn=32, bk=256, split=1),
    Fp8Config("gemv", bm=1, bn=16, bk=256, split=4),  # 3 steps over 4 splits: one empty
    Fp8Config("gemv", bm=4, bn=32, bk=128, split=4),  # 3-D accumulator
    Fp8Config("gemv", bm=2, bn=64, bk=512, split=1),  # 512 does not divide 768: falls back to 128
    Fp8Config("gemv", bm=1, bn=32, bk=256, split=2, chunk=True),  # 128-column chunks
    Fp8Config("gemv", bm=1, bn=16, bk=256, split=4, chunk=True),
    Fp8Config("dot", bm=16, bn=64, kb=1, split=1),
    Fp8Config("dot", bm=16, bn=32, kb=3, split=1),
    Fp8Config("dot", bm=32, bn=128, kb=2, split=4),  # reduce launch
    Fp8Config("f16", bm=16, bn=64, kb=2, split=1),
    Fp8Config("f16", bm=16, bn=32, kb=1, split=4),  # one split empty
    Fp8Config("f16", bm=32, bn=64, kb=3, split=2, xpre=True),
    Fp8Config("w8a8", bm=16, bn=64, group_m=2),
    Fp8Config("dequant"),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.tag())
@pytest.mark.parametrize("m", [1, 5])
def test_fp8_linear_paths(gen: torch.Generator, cfg: Fp8Config, m: int) -> None:
    _, wq, scale = _weights(gen, 200, 768)
    x = torch.randn(m, 768, generator=gen).bfloat16()
    ref = fp8_linear_ref(x, wq, scale)
    y = fp8_linear(x, wq, scale, config=cfg)
    assert y.shape == (m, 200) and y.dtype == torch.bfloat16
    # w8a8 also rounds x to e4m3 (~2^-4 relative per element), the others only round y to bf16.
    assert relerr(y, ref) < (0.06 if cfg.kind == "w8a8" else 1e-2)


def test_w8a8_matches_quantised_activation_ref(gen: torch.Generator) -> None:
    # The w8a8 error must be only the activation rounding: against a reference fed the same
    # quantised x it is as exact as the other paths.
    _, wq, scale = _weights(gen, 128, 256)
    x = torch.randn(20, 256, generator=gen).bfloat16()
    xq, xs = quantize_act_fp8(x)
    xq_ref, xs_ref = quantize_act_fp8_ref(x)
    assert torch.allclose(xs, xs_ref, rtol=1e-6)
    assert relerr(xq.float(), xq_ref.float()) < 1e-2
    x_deq = (xq_ref.float().view(20, 2, 128) * xs_ref[..., None]).view(20, 256).bfloat16()
    y = fp8_linear(x, wq, scale, config=Fp8Config("w8a8", bm=16, bn=32))
    assert relerr(y, fp8_linear_ref(x_deq, wq, scale)) < 1e-2


def test_dequant_matches_ref(gen: torch.Generator) -> None:
    _, wq, scale = _weights(gen, 200, 256)
    assert (
        relerr(dequant_fp8(wq, scale, torch.float32), fp8_linear_ref(torch.eye(256), wq, scale).T.float())
        < 1e-2
    )


@pytest.mark.parametrize("m", [1, 3, 40, 300])
def test_default_dispatch(gen: torch.Generator, m: int) -> None:
    # The automatic choice (no config) for decode, verify and prefill sizes.
    _, wq, scale = _weights(gen, 256, 512)
    x = torch.randn(m, 512, generator=gen).bfloat16()
    cfg = pick_config(m, 256, 512)
    assert cfg.kind == ("gemv" if m == 1 else "f16" if m <= 128 else "dequant")
    assert cfg.kind != "f16" or cfg.xpre == (cfg.bm >= 64)
    tol = 0.06 if cfg.kind == "w8a8" else 1e-2
    assert relerr(fp8_linear(x, wq, scale), fp8_linear_ref(x, wq, scale)) < tol


@pytest.mark.parametrize(
    "cfg", [Fp8Config("f16", bm=16, bn=64, kb=2), Fp8Config("f16", bm=32, xpre=True)], ids=lambda c: c.tag()
)
def test_f16_activation_range(gen: torch.Generator, cfg: Fp8Config) -> None:
    # fp16 overflows above 65504 and flushes below 6e-8: a row with ~1e6 outliers, a row of ~1e-6
    # values and an all-zero row must all come out at bf16 accuracy (per row, not only overall).
    _, wq, scale = _weights(gen, 200, 384)
    x = torch.randn(4, 384, generator=gen)
    x[0, 5], x[0, 300], x[0, 200:256] = 1.0e6, -3.0e5, 7.0e4
    x[1] *= 1e-6
    x[2] = 0.0
    x = x.bfloat16()
    ref = fp8_linear_ref(x, wq, scale).double()
    y = fp8_linear(x, wq, scale, config=cfg).double()
    assert torch.isfinite(y).all() and (y[2] == 0).all()
    for r in (0, 1, 3):
        assert relerr(y[r], ref[r]) < 1e-2, r


@pytest.mark.parametrize(
    ("cfg", "m"),
    [
        (Fp8Config("f16", bm=16, bn=64, kb=1, split=3), 3),
        # gemv at M = 1 (K = 512 is 2 steps of 256 over 3 splits: the last split is empty and must
        # still count itself in) and at M = 3 with one token per program (3 token tiles).
        (Fp8Config("gemv", bm=1, bn=32, bk=256, split=3, warps=8, stages=1), 1),
        (Fp8Config("gemv", bm=1, bn=16, bk=256, split=3, chunk=True), 1),
        (Fp8Config("gemv", bm=1, bn=32, bk=128, split=3, chunk=True), 3),
    ],
    ids=lambda v: v.tag() if isinstance(v, Fp8Config) else f"m{v}",
)
def test_split_fixup_leaves_counters_zero(gen: torch.Generator, cfg: Fp8Config, m: int) -> None:
    # The in-kernel split-K fix-up must reset its tile counters, or the next launch (or graph
    # replay) would pick the wrong last split: run twice, compare, check the counters. A counter
    # left at a nonzero value makes the second run's fix-up fire early (or never): y2 != y1.
    _, wq, scale = _weights(gen, 200, 512)
    x = torch.randn(m, 512, generator=gen).bfloat16()
    y1 = fp8_linear(x, wq, scale, config=cfg)
    assert int(_tile_counters(x.device).abs().sum()) == 0
    y2 = fp8_linear(x, wq, scale, config=cfg)
    assert torch.equal(y1, y2) and relerr(y1, fp8_linear_ref(x, wq, scale)) < 1e-2
    assert int(_tile_counters(x.device).abs().sum()) == 0


@pytest.mark.parametrize("kind", ["gemv", "f16"])
def test_split_fixup_needs_no_reduce_launch(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # Split-K gemv / f16 must not launch _splitk_reduce_kernel (the in-kernel fix-up is the point),
    # and y must be complete without it; with more tiles than counters the reduce launch is what
    # completes y.
    from ling_runtime.kernels import fp8 as fp8_mod

    launches: list[int] = []
    _, wq, scale = _weights(gen, 200, 512)
    x = torch.randn(1, 512, generator=gen).bfloat16()
    real = fp8_mod._splitk_reduce_kernel

    class Spy:
        def __getitem__(self, grid: object) -> object:
            launches.append(1)
            return real[grid]

    monkeypatch.setattr(fp8_mod, "_splitk_reduce_kernel", Spy())
    ref = fp8_linear_ref(x, wq, scale)
    cfg = Fp8Config(kind, bm=16 if kind == "f16" else 1, bn=32, bk=128, split=4)
    y = fp8_linear(x, wq, scale, config=cfg)
    assert not launches and relerr(y, ref) < 1e-2
    monkeypatch.setattr(fp8_mod, "MAX_TILES", 1)
    y = fp8_linear(x, wq, scale, config=cfg)
    assert launches == [1] and relerr(y, ref) < 1e-2


def test_dequant_scratch_reused(gen: torch.Generator) -> None:
    _, wq, scale = _weights(gen, 256, 256)
    x = torch.randn(4, 256, generator=gen).bfloat16()
    y1 = fp8_linear(x, wq, scale, config=Fp8Config("dequant"))
    buf = dequant_scratch(1, torch.bfloat16, x.device)
    _, wq2, scale2 = _weights(gen, 128, 256)  # smaller: same buffer, not a new allocation
    y2 = fp8_linear(x, wq2, scale2, config=Fp8Config("dequant"))
    assert dequant_scratch(1, torch.bfloat16, x.device).data_ptr() == buf.data_ptr()
    assert (
        relerr(y1, fp8_linear_ref(x, wq, scale)) < 1e-2 and relerr(y2, fp8_linear_ref(x, wq2, scale2)) < 1e-2
    )


def test_split_and_bucket_rules() -> None:
    # qkv 12288x4096 at M=1 with 32-row tiles has 384 tiles: ~1.4 per SM, so split to reach ~4.
    assert auto_split(384, 8, 132) == 1
    assert auto_split(128, 8, 132) == 4  # dense 4096 rows / 32: 4 splits -> 512 programs
    assert auto_split(18, 8, 132) == 4  # kv_a 576 rows: capped by >= 2 K steps per split
    assert auto_split(4912, 8, 132) == 1  # lm_head already has 37 programs per SM
    assert [m_bucket(m) for m in (1, 3, 9, 100, 129, 5000, 10**5)] == [1, 4, 16, 128, 256, 8192, 8192]
