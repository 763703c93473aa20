"""Sort-based grouped MoE for prefill and large batches (bf16 or fp8 block-scaled weights).

Contract as ``moe.fused_moe`` (shared expert stacked last as id E, gate rows then up rows in w13),
for thousands of (token, slot) pairs, where compacting each expert's rows by scanning the whole
id table (the decode kernels) would cost O(B) per program:

1. ``moe_align``: the pairs are sorted by expert on the device (sort + searchsorted, no host sync,
   so it captures in a CUDA graph) and each expert's run is cut into BM-row tiles; a tile table
   [3, max_tiles] (expert, first sorted position, rows) is sized by the static bound
   ceil(P / BM) + E' so the grid never depends on the routing. Unused tiles exit at once.
2. Grouped up GEMM: one program per (tile, N block), N fastest so the gathered x rows of a tile
   are shared in L2 by its N blocks; SwiGLU in the epilogue; h is written in sorted order, so the
   down GEMM reads it as contiguous rows.
3. Grouped down GEMM: scales by the routing weight and writes each pair's output row to its own
   slot of o[P, hidden] (no atomics); a fixed-order sum over the K slots gives y.

FP8 (e4m3) weights with fp32 128x128 block scales (DeepSeek ``weight_scale_inv``:
W_true = w * scale) are widened in registers (to fp16 by default, against fp16 activations scaled
by a power of two per row per K block so they cannot overflow; or to bf16) and the scale is
applied to each K-block's partial product, which needs BN and BK to divide the scale block; or
(``act_fp8``) the activations are quantised per token per BK group in the kernel and the product
runs fp8 x fp8; or (``dequant``) the experts are expanded to bf16 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import interpret_mode, mma


@triton.jit
def quant_rows(a, BM: tl.constexpr, FP8: tl.constexpr):
    """Activations [BM, BK] as the A operand of ``scaled_dot`` for mode FP8, and one fp32 factor
    per row that the partial product is multiplied by.

    Mode 2: fp8 e4m3 with a = q * s (s from the row's amax over this K block). Mode 3: fp16 times
    the power of two that puts the row's amax in [2^14, 2^15), so no value overflows fp16's 65504
    (activations of ~1e5 occur, rarely) and tiny rows keep their bits; a power of two is exact, so
    this costs no accuracy, and it is per K block (BK values) rather than per row so the kernel
    needs no pre-pass over the row. Mode 4: plain fp16 cast (overflows above 65504: benchmark
    only). Otherwise a unchanged and factor 1.
    """
    if FP8 == 2:
        af = a.to(tl.float32)
        sa = tl.maximum(tl.max(tl.abs(af), axis=1), 1e-12) / 448.0
        return (af / sa[:, None]).to(tl.float8e4nv), sa
    elif FP8 == 3:
        af = a.to(tl.float32)
        # Biased fp32 exponent of the amax (0 for an all-zero row), clamped so both powers of
        # two below stay normal fp32 numbers.
        e = (tl.max(tl.abs(af), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.minimum(tl.maximum(e, 30), 220)
        up = ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(14 - (e - 127))
        down = ((e - 14) << 23).to(tl.float32, bitcast=True)  # its inverse
        return (af * up[:, None]).to(tl.float16), down
    elif FP8 == 4:
        return a.to(tl.float16), tl.full((BM,), 1.0, tl.float32)
    else:
        return a, tl.full((BM,), 1.0, tl.float32)


@triton.jit
def scaled_dot(a, sa, w, s_ptr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """One K block's fp32 partial product a @ w with the block scales applied (a, sa from quant_rows).

    FP8 = 0: bf16 weights. 1: fp8 weights widened to bf16 in registers (e4m3 -> bf16 has no
    single convert instruction: via f16 and f32, several per weight pair). 2: fp8 x fp8 on the
    tensor cores: no weight convert and twice the MMA rate, at the cost of fp8 rounding of the
    activations (~4% relerr). 3: fp8 widened to fp16 (one cvt per weight pair; e4m3 is exact in
    fp16) against power-of-two scaled fp16 activations: as accurate as 1, overflow-safe. 4: as 3
    without the activation scaling (benchmark only: |x|, |h| must stay below 65504).
    """
    if FP8 == 0:
        return mma(a, w, INTERPRET)
    elif FP8 == 1:
        return mma(a, w.to(tl.bfloat16), INTERPRET) * tl.load(s_ptr)
    elif FP8 == 2:
        return mma(a, w, INTERPRET) * (sa[:, None] * tl.load(s_ptr))
    elif FP8 == 3:
        return mma(a, w.to(tl.float16), INTERPRET) * (sa[:, None] * tl.load(s_ptr))
    else:
        return mma(a, w.to(tl.float16), INTERPRET) * tl.load(s_ptr)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, N: tl.constexpr, K: tl.constexpr, QB: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1)
    kb = tl.program_id(2)
    offs = (nb * QB + tl.arange(0, QB))[:, None] * K + kb * QB + tl.arange(0, QB)[None, :]
    scale = tl.load(s_ptr + e * (N // QB) * (K // QB) + nb * (K // QB) + kb)
    w = tl.load(w_ptr + e * N * K + offs).to(tl.float32) * scale
    tl.store(o_ptr + e * N * K + offs, w.to(o_ptr.dtype.element_ty))


def dequant_experts(w: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp8 [E, N, K] with fp32 block scales [E, N/qb, K/qb] -> bf16 W = w * scale (one launch)."""
    qb = scale_block(w, scale)
    e, n, k = w.shape
    out = torch.empty((e, n, k), dtype=torch.bfloat16, device=w.device) if out is None else out
    assert out.shape == w.shape and out.is_contiguous() and w.is_contiguous()
    _dequant_kernel[(e, n // qb, k // qb)](w, scale, out, N=n, K=k, QB=qb, num_warps=4)
    return out


def moe_align(ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, K] int32 -> (order [P] int32 pair indices grouped by expert, tiles [3, max_tiles] int32).

    tiles[0] = expert of the tile (n_experts for an unused tile), tiles[1] = its first position in
    ``order``, tiles[2] = its row count (<= block_m). All device ops: no .item(), no bincount
    (whose CUDA path reads the max back to the host).
    """
    flat = ids.reshape(-1)
    pairs = flat.numel()
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.searchsorted(
        sorted_ids, torch.arange(n_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
    )
    start, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    ntiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(ntiles, 0)
    max_tiles = triton.cdiv(pairs, block_m) + n_experts
    t = torch.arange(max_tiles, device=ids.device, dtype=tiles_end.dtype)
    tile_e = torch.searchsorted(tiles_end, t, right=True)
    ec = tile_e.clamp(max=n_experts - 1)
    m0 = (t - (tiles_end - ntiles)[ec]) * block_m
    rows = torch.where(tile_e < n_experts, (counts[ec] - m0).clamp(max=block_m), 0)
    tiles = torch.stack([tile_e, start[ec] + m0, rows]).to(torch.int32)
    return order.to(torch.int32), tiles


@triton.jit
def _grouped_up_kernel(
    x_ptr, w13_ptr, s13_ptr, order_ptr, tiles_ptr, h_ptr, n_exp, max_tiles, stride_xb, stride_we, stride_se,
    stride_h, INTER: tl.constexpr, HID: tl.constexpr, KSTRIDE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, N_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = pid // N_BLOCKS
    nb = pid % N_BLOCKS
    e = tl.load(tiles_ptr + t)
    if e < n_exp:
        pos0 = tl.load(tiles_ptr + max_tiles + t)
        nrows = tl.load(tiles_ptr + 2 * max_tiles + t)
        offs_m = tl.arange(0, BM)
        valid = offs_m < nrows
        pair = tl.load(order_ptr + pos0 + offs_m, mask=valid, other=0)
        tok = pair // KSTRIDE
        offs_n = nb * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xb
        w_base = w13_ptr + e.to(tl.int64) * stride_we
        g_cols = w_base + offs_n[None, :] * HID
        u_cols = w_base + (offs_n[None, :] + INTER) * HID
        # Scale rows of this N block: gate block, and the up block I / QB rows further down.
        sg_ptr = s13_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (HID // QB)
        su_ptr = sg_ptr + (INTER // QB) * (HID // QB)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, HID, BK):
            x, sx = quant_rows(
                tl.load(x_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0), BM, FP8
            )
            wg = tl.load(g_cols + k0 + offs_k[:, None])
            wu = tl.load(u_cols + k0 + offs_k[:, None])
            acc_g += scaled_dot(x, sx, wg, sg_ptr + k0 // QB, FP8, INTERPRET)
            acc_u += scaled_dot(x, sx, wu, su_ptr + k0 // QB, FP8, INTERPRET)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        dst = h_ptr + (pos0 + offs_m).to(tl.int64)[:, None] * stride_h + offs_n[None, :]
        tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _grouped_down_kernel(
    h_ptr, w2_ptr, s2_ptr, order_ptr, tiles_ptr, wts_ptr, o_ptr, n_exp, max_tiles, stride_h, stride_we,
    stride_se, stride_o, INTER: tl.constexpr, HID: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, QB: tl.constexpr, FP8: tl.constexpr, N_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = pid // N_BLOCKS
    nb = pid % N_BLOCKS
    e = tl.load(tiles_ptr + t)
    if e < n_exp:
        pos0 = tl.load(tiles_ptr + max_tiles + t)
        nrows = tl.load(tiles_ptr + 2 * max_tiles + t)
        offs_m = tl.arange(0, BM)
        valid = offs_m < nrows
        pair = tl.load(order_ptr + pos0 + offs_m, mask=valid, other=0)
        offs_n = nb * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        h_rows = h_ptr + (pos0 + offs_m).to(tl.int64)[:, None] * stride_h
        w_cols = w2_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * INTER
        s_ptr = s2_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (INTER // QB)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, INTER, BK):
            h, sh = quant_rows(
                tl.load(h_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0), BM, FP8
            )
            w = tl.load(w_cols + k0 + offs_k[:, None])
            acc += scaled_dot(h, sh, w, s_ptr + k0 // QB, FP8, INTERPRET)
        acc = acc * tl.load(wts_ptr + pair, mask=valid, other=0.0)[:, None]
        dst = o_ptr + pair.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
        tl.store(dst, acc.to(o_ptr.dtype.element_ty), mask=valid[:, None])


# Default tiles (block_m, block_n, block_k, num_warps, num_stages; (up, down) pairs) by token
# count: the first row whose bound is above the token count (bench/gpu/moe_sweep.py WINNERS). H200
# round 1: bf16 T<=1024 and B=128 the 64-row tiles (1.50 ms at 1K), T=8192 128 rows (4.92 vs
# 5.32 ms); fp8 the 64-row tiles throughout (7.93 ms at 8K).
GROUPED_TILES: dict[str, list[tuple[int, tuple]]] = {
    "bf16": [
        (4096, (64, (64, 128), (64, 64), (4, 8), (4, 3))),
        (1 << 62, (128, (64, 128), (64, 64), (8, 8), (3, 3))),
    ],
    "fp8": [(1 << 62, (64, (64, 128), (64, 64), (4, 8), (4, 3)))],
}
# From this many tokens on, fp8 prefill by default expands the experts to bf16 first (``dequant``)
# and runs the bf16 tiles. H200 round 2, T=8192: dequant + bf16 7.52 ms (relerr 4.5e-3) against
# 10.2 ms for the fp16-widening fp8 kernel and 7.24 ms for fp8 x fp8 (relerr 4.2e-2: activations
# rounded to fp8); T=1024: the fp8 kernel 2.3 ms, while the expansion alone (~2.3 ms for all 257
# experts) would already cost that much, so short chunks stay on the fp8 kernel.
FP8_DEQUANT_FROM = 4096


def fp8_mode(fp8: bool, act_fp8: bool, wide_fp16: bool | None, fp16_scaled: bool = True) -> int:
    """The FP8 constexpr of the kernels (``scaled_dot``). fp8 weights default to the fp16 widening
    (``wide_fp16=None``): 1.6x the bf16 widening's speed in decode (H200 round 1)."""
    assert fp8 or not (act_fp8 or wide_fp16), "act_fp8 / wide_fp16 need fp8 weights"
    assert not (act_fp8 and wide_fp16)
    if not fp8:
        return 0
    if act_fp8:
        return 2
    if wide_fp16 is False:
        return 1
    return 3 if fp16_scaled else 4


def scale_block(w: torch.Tensor, scale: torch.Tensor | None) -> int:
    """Side of the square scale block implied by the shapes (128 for real checkpoints); 0 for bf16."""
    if scale is None:
        assert w.dtype != torch.float8_e4m3fn, "fp8 weights need their block scales"
        return 0
    qb = w.shape[2] // scale.shape[2]
    assert w.shape[1] == qb * scale.shape[1] and w.shape[2] == qb * scale.shape[2], (w.shape, scale.shape)
    assert scale.is_contiguous() and scale.dtype == torch.float32
    return qb


def fused_moe_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: tuple[int, int] | None = None,
    block_k: tuple[int, int] | None = None,
    num_warps: tuple[int, int] | None = None,
    num_stages: tuple[int, int] | None = None,
    pair_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    act_fp8: bool = False,
    wide_fp16: bool | None = None,
    fp16_scaled: bool = True,
    dequant: bool | None = None,
) -> torch.Tensor:
    """Prefill MoE: x [T, hidden], w13 [E', 2I, hidden], w2 [E', hidden, I], ids/weights [T, K].

    Weights bf16, or fp8 e4m3 with w13_scale [E', 2I/128, hidden/128] and w2_scale
    [E', hidden/128, I/128] fp32. ``pair_dtype`` (default x.dtype) is the per-pair output buffer:
    the routing weight is applied in fp32 before it is rounded, and the K-way sum is in fp32;
    ``out_dtype`` (default x.dtype) is y's. FP8 weights (see ``scaled_dot``): by default
    widened to fp16 against power-of-two scaled fp16 activations; ``wide_fp16=False`` widens to
    bf16; ``act_fp8`` quantises x and h per token per BK group on the fly and multiplies fp8 x fp8;
    ``fp16_scaled=False`` drops the activation scaling (benchmark only). ``dequant``: expand all
    experts to bf16 in a scratch buffer first (one launch, ~2.3 ms at real size: pays off only for
    a prefill long enough that the bf16 grouped GEMM gains more than that); default: from
    ``FP8_DEQUANT_FROM`` tokens when no other fp8 path is asked for. Tile arguments left None come
    from ``GROUPED_TILES`` by dtype and token count.
    """
    tokens, hid = x.shape
    if dequant is None:  # the default fp8 path by size, unless a path was asked for
        dequant = tokens >= FP8_DEQUANT_FROM and not act_fp8 and wide_fp16 is None
    if dequant and w13_scale is not None:
        w13 = dequant_experts(w13, w13_scale)
        w2 = dequant_experts(w2, w2_scale)
        w13_scale = w2_scale = None
        act_fp8, wide_fp16 = False, None
    if None in (block_m, block_n, block_k, num_warps, num_stages):
        table = GROUPED_TILES["fp8" if w13_scale is not None else "bf16"]
        tiles_cfg = next(cfg for bound, cfg in table if tokens < bound)
        block_m, block_n, block_k, num_warps, num_stages = (
            tiles_cfg[i] if given is None else given
            for i, given in enumerate((block_m, block_n, block_k, num_warps, num_stages))
        )
    assert block_n is not None and block_k is not None and num_warps is not None and num_stages is not None
    n_exp, two_i, _ = w13.shape
    inter = two_i // 2
    kstride = ids.shape[1]
    qb = scale_block(w13, w13_scale)
    assert scale_block(w2, w2_scale) == qb
    fp8 = qb > 0
    # Small models (tests, toy configs) get tiles clipped to their dims instead of an assert.
    block_n = (min(block_n[0], inter), min(block_n[1], hid))
    block_k = (min(block_k[0], hid), min(block_k[1], inter))
    mode = fp8_mode(fp8, act_fp8, wide_fp16, fp16_scaled)
    assert ids.is_contiguous() and weights.is_contiguous() and ids.shape == weights.shape
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    assert (
        inter % block_n[0] == 0
        and hid % block_k[0] == 0
        and hid % block_n[1] == 0
        and inter % block_k[1] == 0
    )
    if fp8:
        assert all(qb % b == 0 for b in (*block_n, *block_k)) and inter % qb == 0, (
            "tiles must nest in scale blocks"
        )
    order, tiles = moe_align(ids, n_exp, block_m)
    max_tiles = tiles.shape[1]
    pairs = order.numel()
    h = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    o = torch.empty((pairs, hid), dtype=pair_dtype or x.dtype, device=x.device)
    s13 = w13_scale if fp8 else w13  # an unused pointer when bf16
    s2 = w2_scale if fp8 else w2
    interp = interpret_mode()
    nb_up = inter // block_n[0]
    _grouped_up_kernel[(max_tiles * nb_up,)](
        x, w13, s13, order, tiles, h, n_exp, max_tiles, x.stride(0), w13.stride(0),
        s13.stride(0) if fp8 else 0, h.stride(0), INTER=inter, HID=hid, KSTRIDE=kstride, BM=block_m,
        BN=block_n[0], BK=block_k[0], QB=max(qb, 1), FP8=mode, N_BLOCKS=nb_up, INTERPRET=interp,
        num_warps=num_warps[0], num_stages=num_stages[0],
    )  # fmt: skip
    nb_down = hid // block_n[1]
    _grouped_down_kernel[(max_tiles * nb_down,)](
        h, w2, s2, order, tiles, weights, o, n_exp, max_tiles, h.stride(0), w2.stride(0),
        s2.stride(0) if fp8 else 0, o.stride(0), INTER=inter, HID=hid, BM=block_m, BN=block_n[1],
        BK=block_k[1], QB=max(qb, 1), FP8=mode, N_BLOCKS=nb_down, INTERPRET=interp,
        num_warps=num_warps[1], num_stages=num_stages[1],
    )  # fmt: skip
    return o.view(tokens, kstride, hid).sum(1, dtype=torch.float32).to(out_dtype or x.dtype)
