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
W_true = w * scale) are widened to fp16 in registers against fp16 activations scaled by a power of
two per row per K block (so they cannot overflow), and the scale is applied to each K block's
partial product, which needs BN and BK to divide the scale block; or (path ``dequant``, long
prefills) the experts are expanded to bf16 first. The tile helpers ``up_tile`` / ``down_tile``
are shared with the decode kernels (``moe.py``), which differ only in how a program finds its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import mma


@dataclass(frozen=True)
class MoeConfig:
    """Tiles and launch choices of one fused MoE call (pairs are (gate/up GEMM, down GEMM));
    ``moe.moe_config`` picks the measured ones by token count.

    ``path``: ``"decode"`` (``moe.fused_moe``'s kernels: each program compacts its expert's rows
    from the id table in registers), ``"grouped"`` (sort by expert, then grouped GEMMs) or
    ``"dequant"`` (fp8 experts expanded to bf16, then the bf16 grouped GEMMs). ``dense_shared``
    (decode): the last id column, the shared expert every token uses, runs outside the decode
    kernels (cuBLAS for bf16, a one-expert grouped GEMM for fp8), so its B rows do not cost
    B / block_m passes over its weights inside one program.
    """

    path: str
    block_m: int
    block_n: tuple[int, int]
    block_k: tuple[int, int]
    num_warps: tuple[int, int]
    num_stages: tuple[int, int]
    dense_shared: bool = False

    def tag(self) -> str:
        shared = " ds" if self.dense_shared else ""
        return (
            f"{self.path} bm{self.block_m} bn{self.block_n} bk{self.block_k} w{self.num_warps} "
            f"s{self.num_stages}{shared}"
        )


# Grouped tiles (block_m, block_n, block_k, num_warps, num_stages) by token count: the first row
# whose bound is above the token count (bench/gpu/moe_sweep.py, H200 2026-11-29): bf16 T <= 1024
# and B = 128 the 64-row tiles (1.50 ms at 1K), T = 8192 128 rows (4.92 vs 5.32 ms); fp8 the
# 64-row tiles throughout (7.93 ms at 8K).
GROUPED_TILES: dict[str, list[tuple[int, tuple]]] = {
    "bf16": [
        (4096, (64, (64, 128), (64, 64), (4, 8), (4, 3))),
        (1 << 62, (128, (64, 128), (64, 64), (8, 8), (3, 3))),
    ],
    "fp8": [(1 << 62, (64, (64, 128), (64, 64), (4, 8), (4, 3)))],
}
# From this many tokens on, fp8 prefill expands the experts to bf16 first and runs the bf16 tiles.
# H200, T = 8192: dequant + bf16 7.52 ms against 10.2 ms for the fp16-widening fp8 kernel;
# T = 1024: the fp8 kernel 2.3 ms, about what the expansion of all 257 experts alone costs.
FP8_DEQUANT_FROM = 4096


def clip_tiles(cfg: MoeConfig, inter: int, hidden: int, scale_block: int) -> MoeConfig:
    """Tiles no larger than the dims they cut (small models, tests) nor the fp8 scale block."""
    cap = scale_block or 1 << 30
    bn = (min(cfg.block_n[0], inter, cap), min(cfg.block_n[1], hidden, cap))
    bk = (min(cfg.block_k[0], hidden, cap), min(cfg.block_k[1], inter, cap))
    return replace(cfg, block_n=bn, block_k=bk)


def grouped_config(tokens: int, inter: int, hidden: int, scale_block: int = 0) -> MoeConfig:
    """The measured grouped-GEMM config for ``tokens`` rows (``scale_block`` 0 = bf16 weights)."""
    dequant = scale_block > 0 and tokens >= FP8_DEQUANT_FROM
    table = GROUPED_TILES["fp8" if scale_block and not dequant else "bf16"]
    bm, bn, bk, warps, stages = next(tiles for bound, tiles in table if tokens < bound)
    cfg = MoeConfig("dequant" if dequant else "grouped", bm, bn, bk, warps, stages)
    return clip_tiles(cfg, inter, hidden, 0 if dequant else scale_block)


@triton.jit
def quant_rows(a, BM: tl.constexpr, FP8: tl.constexpr):
    """Activations [BM, BK] as the A operand of ``scaled_dot``, and one fp32 factor per row that
    the partial product is multiplied by.

    FP8: fp16 times the power of two that puts the row's amax in [2^14, 2^15), so no value
    overflows fp16's 65504 (activations of ~1e5 occur, rarely) and tiny rows keep their bits; a
    power of two is exact, so this costs no accuracy, and it is per K block (BK values) rather
    than per row so the kernel needs no pre-pass over the row. bf16: a unchanged, factor 1.
    """
    if FP8:
        af = a.to(tl.float32)
        # Biased fp32 exponent of the amax (0 for an all-zero row), clamped so both powers of
        # two below stay normal fp32 numbers.
        e = (tl.max(tl.abs(af), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.minimum(tl.maximum(e, 30), 220)
        up = ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(14 - (e - 127))
        down = ((e - 14) << 23).to(tl.float32, bitcast=True)  # its inverse
        return (af * up[:, None]).to(tl.float16), down
    else:
        return a, tl.full((BM,), 1.0, tl.float32)


@triton.jit
def scaled_dot(a, sa, w, s_ptr, FP8: tl.constexpr):
    """One K block's fp32 partial product a @ w with the block scales applied (a, sa from quant_rows).

    FP8: e4m3 weights widened to fp16 (one cvt per weight pair, and fp16 holds every e4m3 value;
    the bf16 widening needs several converts per pair and ran at 0.6x the speed) against the
    scaled fp16 activations. bf16: a plain bf16 product.
    """
    if FP8:
        return mma(a, w.to(tl.float16)) * (sa[:, None] * tl.load(s_ptr))
    else:
        return mma(a, w)


@triton.jit
def up_tile(
    x_rows,
    valid,
    w13_ptr,
    s13_ptr,
    e,
    nb,
    stride_we,
    stride_se,
    INTER: tl.constexpr,
    HID: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    QB: tl.constexpr,
    FP8: tl.constexpr,
):
    """SwiGLU of expert e's gate and up products for BM token rows (``x_rows`` [BM, 1] pointers,
    ``valid`` [BM]) and N block ``nb``: [BM, BN] fp32."""
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    w_base = w13_ptr + e.to(tl.int64) * stride_we
    g_cols = w_base + offs_n[None, :] * HID
    u_cols = w_base + (offs_n[None, :] + INTER) * HID
    # FP8: BN and BK nest in the QB x QB scale blocks, so each partial product takes one scale:
    # the gate block's row, and the up block's I / QB rows further down.
    sg_ptr = s13_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (HID // QB)
    su_ptr = sg_ptr + (INTER // QB) * (HID // QB)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, HID, BK):
        x, sx = quant_rows(tl.load(x_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0), BM, FP8)
        wg = tl.load(g_cols + k0 + offs_k[:, None])
        wu = tl.load(u_cols + k0 + offs_k[:, None])
        acc_g += scaled_dot(x, sx, wg, sg_ptr + k0 // QB, FP8)
        acc_u += scaled_dot(x, sx, wu, su_ptr + k0 // QB, FP8)
    return acc_g * tl.sigmoid(acc_g) * acc_u


@triton.jit
def down_tile(
    h_rows,
    valid,
    w2_ptr,
    s2_ptr,
    e,
    nb,
    stride_we,
    stride_se,
    INTER: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    QB: tl.constexpr,
    FP8: tl.constexpr,
):
    """Expert e's down product of BM rows of h (``h_rows`` [BM, 1] pointers) for N block ``nb``:
    [BM, BN] fp32, before the routing weight."""
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    w_cols = w2_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * INTER
    s_ptr = s2_ptr + e.to(tl.int64) * stride_se + ((nb * BN) // QB) * (INTER // QB)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, INTER, BK):
        h, sh = quant_rows(tl.load(h_rows + k0 + offs_k[None, :], mask=valid[:, None], other=0.0), BM, FP8)
        w = tl.load(w_cols + k0 + offs_k[:, None])
        acc += scaled_dot(h, sh, w, s_ptr + k0 // QB, FP8)
    return acc


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
def _tile_rows(order_ptr, tiles_ptr, max_tiles, t, BM: tl.constexpr):
    """(first sorted position, row offsets, valid rows, pair index per row) of tile t."""
    pos0 = tl.load(tiles_ptr + max_tiles + t)
    nrows = tl.load(tiles_ptr + 2 * max_tiles + t)
    offs_m = tl.arange(0, BM)
    valid = offs_m < nrows
    pair = tl.load(order_ptr + pos0 + offs_m, mask=valid, other=0)
    return pos0, offs_m, valid, pair


@triton.jit
def _grouped_up_kernel(
    x_ptr,
    w13_ptr,
    s13_ptr,
    order_ptr,
    tiles_ptr,
    h_ptr,
    n_exp,
    max_tiles,
    stride_xb,
    stride_we,
    stride_se,
    stride_h,
    INTER: tl.constexpr,
    HID: tl.constexpr,
    KSTRIDE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    QB: tl.constexpr,
    FP8: tl.constexpr,
    N_BLOCKS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid // N_BLOCKS
    nb = pid % N_BLOCKS
    e = tl.load(tiles_ptr + t)
    if e < n_exp:
        pos0, offs_m, valid, pair = _tile_rows(order_ptr, tiles_ptr, max_tiles, t, BM)
        x_rows = x_ptr + (pair // KSTRIDE).to(tl.int64)[:, None] * stride_xb
        h = up_tile(
            x_rows, valid, w13_ptr, s13_ptr, e, nb, stride_we, stride_se, INTER, HID, BM, BN, BK, QB, FP8
        )
        offs_n = nb * BN + tl.arange(0, BN)
        dst = h_ptr + (pos0 + offs_m).to(tl.int64)[:, None] * stride_h + offs_n[None, :]
        tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _grouped_down_kernel(
    h_ptr,
    w2_ptr,
    s2_ptr,
    order_ptr,
    tiles_ptr,
    wts_ptr,
    o_ptr,
    n_exp,
    max_tiles,
    stride_h,
    stride_we,
    stride_se,
    stride_o,
    INTER: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    QB: tl.constexpr,
    FP8: tl.constexpr,
    N_BLOCKS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid // N_BLOCKS
    nb = pid % N_BLOCKS
    e = tl.load(tiles_ptr + t)
    if e < n_exp:
        pos0, offs_m, valid, pair = _tile_rows(order_ptr, tiles_ptr, max_tiles, t, BM)
        h_rows = h_ptr + (pos0 + offs_m).to(tl.int64)[:, None] * stride_h
        acc = down_tile(
            h_rows, valid, w2_ptr, s2_ptr, e, nb, stride_we, stride_se, INTER, BM, BN, BK, QB, FP8
        )
        acc = acc * tl.load(wts_ptr + pair, mask=valid, other=0.0)[:, None]
        offs_n = nb * BN + tl.arange(0, BN)
        dst = o_ptr + pair.to(tl.int64)[:, None] * stride_o + offs_n[None, :]
        tl.store(dst, acc.to(o_ptr.dtype.element_ty), mask=valid[:, None])


def scale_block(w: torch.Tensor, scale: torch.Tensor | None) -> int:
    """Side of the square scale block implied by the shapes (128 for real checkpoints); 0 for bf16."""
    if scale is None:
        assert w.dtype != torch.float8_e4m3fn, "fp8 weights need their block scales"
        return 0
    qb = w.shape[2] // scale.shape[2]
    assert w.shape[1] == qb * scale.shape[1] and w.shape[2] == qb * scale.shape[2], (w.shape, scale.shape)
    assert scale.is_contiguous() and scale.dtype == torch.float32
    return qb


def check_tiles(cfg: MoeConfig, inter: int, hidden: int, qb: int) -> None:
    """Tiles must cut the dims evenly and, for fp8, nest in the scale blocks."""
    bn, bk = cfg.block_n, cfg.block_k
    assert inter % bn[0] == 0 and hidden % bk[0] == 0 and hidden % bn[1] == 0 and inter % bk[1] == 0, cfg
    if qb:
        assert all(qb % b == 0 for b in (*bn, *bk)) and inter % qb == 0, "tiles must nest in scale blocks"


def _grouped_gemms(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: MoeConfig,
    pair_dtype: torch.dtype,
) -> torch.Tensor:
    """Align, then the up and down grouped launches -> per-pair outputs o [T * K, hidden]."""
    n_exp, two_i, hid = w13.shape
    inter = two_i // 2
    qb = 0 if scales is None else scale_block(w13, scales[0])
    order, tiles = moe_align(ids, n_exp, cfg.block_m)
    max_tiles = tiles.shape[1]
    pairs = order.numel()
    h = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    o = torch.empty((pairs, hid), dtype=pair_dtype, device=x.device)
    s13, s2 = scales or (w13, w2)  # unused pointers when bf16
    nb_up, nb_down = inter // cfg.block_n[0], hid // cfg.block_n[1]
    meta = dict(BM=cfg.block_m, QB=max(qb, 1), FP8=qb > 0)
    _grouped_up_kernel[(max_tiles * nb_up,)](
        x,
        w13,
        s13,
        order,
        tiles,
        h,
        n_exp,
        max_tiles,
        x.stride(0),
        w13.stride(0),
        s13.stride(0) if qb else 0,
        h.stride(0),
        INTER=inter,
        HID=hid,
        KSTRIDE=ids.shape[1],
        BN=cfg.block_n[0],
        BK=cfg.block_k[0],
        N_BLOCKS=nb_up,
        num_warps=cfg.num_warps[0],
        num_stages=cfg.num_stages[0],
        **meta,
    )
    _grouped_down_kernel[(max_tiles * nb_down,)](
        h,
        w2,
        s2,
        order,
        tiles,
        weights,
        o,
        n_exp,
        max_tiles,
        h.stride(0),
        w2.stride(0),
        s2.stride(0) if qb else 0,
        o.stride(0),
        INTER=inter,
        BN=cfg.block_n[1],
        BK=cfg.block_k[1],
        N_BLOCKS=nb_down,
        num_warps=cfg.num_warps[1],
        num_stages=cfg.num_stages[1],
        **meta,
    )
    return o


def fused_moe_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    config: MoeConfig | None = None,
    pair_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Prefill MoE: x [T, hidden], w13 [E', 2I, hidden], w2 [E', hidden, I], ids/weights [T, K].

    Weights bf16, or fp8 e4m3 with w13_scale [E', 2I/128, hidden/128] and w2_scale
    [E', hidden/128, I/128] fp32. ``config`` (path ``grouped`` or ``dequant``) defaults to
    ``grouped_config`` by token count: fp8 from ``FP8_DEQUANT_FROM`` tokens expands all experts to
    bf16 in a reused scratch first (one launch, ~2.3 ms at real size). ``pair_dtype`` (default
    x.dtype) is the per-pair output buffer: the routing weight is applied in fp32 before it is
    rounded, and the K-way sum is in fp32; ``out_dtype`` (default x.dtype) is y's.
    """
    tokens, hid = x.shape
    qb = scale_block(w13, w13_scale)
    assert scale_block(w2, w2_scale) == qb
    cfg = config or grouped_config(tokens, w2.shape[2], hid, qb)
    assert cfg.path in ("grouped", "dequant"), cfg
    if cfg.path == "dequant" and qb:
        w13, w2 = dequant_experts(w13, w13_scale), dequant_experts(w2, w2_scale)
        w13_scale = w2_scale = None
        qb = 0
    inter = w13.shape[1] // 2
    kstride = ids.shape[1]
    check_tiles(cfg, inter, hid, qb)
    assert ids.is_contiguous() and weights.is_contiguous() and ids.shape == weights.shape
    assert x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()
    scales = (w13_scale, w2_scale) if w13_scale is not None and w2_scale is not None else None
    o = _grouped_gemms(x, w13, w2, ids, weights, scales, cfg, pair_dtype or x.dtype)
    return o.view(tokens, kstride, hid).sum(1, dtype=torch.float32).to(out_dtype or x.dtype)
