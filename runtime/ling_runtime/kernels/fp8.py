"""FP8 (e4m3) weight linear with 128x128 block scales: decode GEMV/skinny GEMM and prefill GEMM.

y = x W^T with W stored as fp8 ``w[N, K]`` and fp32 ``scale[ceil(N/128), K/128]`` (the
``weight_scale_inv`` of DeepSeek/Ling block-quantised checkpoints):
W_true[n, k] = w[n, k] * scale[n // 128, k // 128]. K must be a multiple of 128; N need not be
(MLA kv_a is 576 rows: the last scale row covers a partial block and rows past N are masked).

Decode is bound by reading W, so the kernels are built to keep many bytes in flight per SM, and
``fp8_linear`` takes an ``Fp8Config`` (``pick_config``: the measured ``DISPATCH`` by (N, K,
M bucket), else ``default_config``; bench/gpu/fp8_sweep.py prints a ready-to-paste table). Kinds:

- ``gemv`` (M = 1): no tensor cores. Each program widens a [BN, BK] fp8 tile (BK = 256..512,
  several scale blocks at once) to fp32 and multiplies it by the scaled x row(s); for BN dividing
  128 the block scale is constant over the program's rows, so it is folded into x ([BK]
  multiplies instead of [BN, BK]). Reduction over K happens once, at the end (2-D / 3-D
  accumulators). ``stages`` > 1 makes the weight loads cp.async pipelined (``tl.range``).
  ``chunk`` (M = 1) walks each step in 128-column chunks into a [BN, 128] accumulator: x and its
  block scale load straight into the broadcast layout (no shared-memory shuffle), fewer registers.
- ``f16`` (M 2..128): swap-AB tensor-core GEMM (wgmma), acc[BN, BM] += W_tile @ x^T, so the
  weight rows fill the MMA's 64-wide M side and the few tokens its narrow N side (M pads to 16).
  Weights widen to fp16 (one cvt per two values; fp16 holds every e4m3 value exactly), x is fed
  as fp16 scaled per (token, 128-column block) by a power of two (overflow-safe for any bf16
  activation, exact within 2^-29 of the block's amax); both scales go on each K block's fp32
  partial. ``xpre`` converts x in a separate small pass.
- ``dot``: the same tiling with the weights widened to bf16 (1.5 converts per weight); still the
  measured winner at M 16..128 on the 4096-row shapes.
- ``split`` > 1 (all three): split-K over programs so that small-N shapes still put several
  programs on every SM; fp32 partials [split, M, N]. gemv and f16 sum them in the same launch
  (the last split of a tile to finish does it); dot, or a grid with more tiles than the counter
  buffer, runs a tiny reduce launch. CUDA-graph safe: the partial buffer is a plain allocation,
  no host sync, shapes depend only on (M, N, K).
- ``w8a8``: activations quantised per token per 128 columns to e4m3 by a small kernel, then an
  fp8 x fp8 tl.dot (Hopper QGMMA, fp32 accumulate) with both scales applied per K block. Adds
  ~2^-4 relative rounding to x (DeepSeek-V3's own inference recipe); the winner at M 64..128 on
  the wide shapes.
- ``dequant`` (M > 128, prefill): W widened to a reusable bf16 scratch by a kernel, then cuBLAS.

Every kind is checked against ``fp8_linear_ref`` (tests/kernels/test_fp8.py under the
interpreter, tests/gpu and bench/gpu/fp8_sweep.py at real sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ling_runtime.kernels._common import INTERPRET, mma

QBLOCK = 128
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
NUM_SMS_DEFAULT = 132  # H200; the real count is read from the device when there is one


def quantize_fp8_blockwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16/fp32 [N, K] (K a multiple of 128) -> (fp8 e4m3 [N, K], fp32 scales [ceil(N/128), K/128])."""
    n, k = w.shape
    pad = -n % QBLOCK
    wf = torch.nn.functional.pad(w.float(), (0, 0, 0, pad)) if pad else w.float()
    blocks = wf.view((n + pad) // QBLOCK, QBLOCK, k // QBLOCK, QBLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(n + pad, k)
    return q[:n].contiguous(), scale


def _expand_scale(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(QBLOCK, 0)[:n].repeat_interleave(QBLOCK, 1)[:, :k]


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference: dequantise and multiply in fp32."""
    n, k = w.shape
    return (x.float() @ (w.float() * _expand_scale(scale.float(), n, k)).T).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _store_out(y_ptr, p_ptr, val, offs_m, offs_n, M, N, stride_y, sk, SPLIT: tl.constexpr):
    # val is [len(offs_m), len(offs_n)] fp32; split-K writes fp32 partials p[sk, M, N].
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if not SPLIT:
        tl.store(
            y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], val.to(y_ptr.dtype.element_ty), mask=mask
        )
    else:
        tl.store(p_ptr + (sk * M + offs_m[:, None]) * N + offs_n[None, :], val, mask=mask)


@triton.jit
def _ld_w(w_ptrs, kk, nmask, kin):
    return tl.load(w_ptrs + kk, mask=nmask[:, None] & kin, other=0.0)


@triton.jit
def _ld_xs(x_ptrs, s_row, kk, kin):
    # One 128-column chunk of x times its block scale (a scalar: the chunk is one scale block).
    sx = tl.load(s_row + kk // 128, mask=kin, other=0.0)
    return tl.load(x_ptrs + kk, mask=kin, other=0.0).to(tl.float32) * sx


@triton.jit
def _gemv_step1(acc, k0, w_ptrs, x_ptrs, s_row, nmask, K, KB: tl.constexpr):
    # M = 1: the step is KB (1, 2, 4 or 8) chunks of 128 columns, one scale block each, summed
    # into one [BN, 128] accumulator. Why chunks: a [BK] x vector with BK >= 32 * num_warps is
    # loaded in its own layout and moved into the weight tile's column layout through shared
    # memory (barriers in every step, seen in the SASS at BK = 512); a 128-vector at 8 warps is
    # loaded straight into the broadcast layout, its block scale is one scalar load instead of a
    # [BK] gather, and the accumulator shrinks from BN*BK to BN*128 fp32 (128 -> 89 registers
    # at BN = 32, 8 warps). The loads are written first and by hand: in a static_range loop
    # ptxas issued chunk j+1's loads after chunk j's FMAs (one memory latency per chunk); even so
    # it still sinks some weight loads below the first FMAs (sm_90 SASS), so whether this beats
    # the one-tile step is for the GPU sweep to say. At 4 warps a 128-vector is not below the
    # thread count and still goes through shared memory. Both steps: weights in LDG.E.128, then
    # per two weights one F2FP.F16.E4M3.UNPACK_B + two HADD2.F32 (f16 -> f32) + two FFMA: ~2.5
    # issue slots per weight, ~40 of the SM's 128 thread-instructions per clock at the full HBM
    # rate (~16.5 B/clk/SM), so converts are not what bounds M = 1; fp16 products would cut them
    # but need a second rounding and an overflow-safe x scale.
    kin = k0 < K
    x0 = _ld_xs(x_ptrs, s_row, k0, kin)
    if KB > 1:
        x1 = _ld_xs(x_ptrs, s_row, k0 + 128, kin)
    if KB > 2:
        x2 = _ld_xs(x_ptrs, s_row, k0 + 256, kin)
        x3 = _ld_xs(x_ptrs, s_row, k0 + 384, kin)
    if KB > 4:
        x4 = _ld_xs(x_ptrs, s_row, k0 + 512, kin)
        x5 = _ld_xs(x_ptrs, s_row, k0 + 640, kin)
        x6 = _ld_xs(x_ptrs, s_row, k0 + 768, kin)
        x7 = _ld_xs(x_ptrs, s_row, k0 + 896, kin)
    w0 = _ld_w(w_ptrs, k0, nmask, kin)
    if KB > 1:
        w1 = _ld_w(w_ptrs, k0 + 128, nmask, kin)
    if KB > 2:
        w2 = _ld_w(w_ptrs, k0 + 256, nmask, kin)
        w3 = _ld_w(w_ptrs, k0 + 384, nmask, kin)
    if KB > 4:
        w4 = _ld_w(w_ptrs, k0 + 512, nmask, kin)
        w5 = _ld_w(w_ptrs, k0 + 640, nmask, kin)
        w6 = _ld_w(w_ptrs, k0 + 768, nmask, kin)
        w7 = _ld_w(w_ptrs, k0 + 896, nmask, kin)
    acc += w0.to(tl.float32) * x0[None, :]
    if KB > 1:
        acc += w1.to(tl.float32) * x1[None, :]
    if KB > 2:
        acc += w2.to(tl.float32) * x2[None, :]
        acc += w3.to(tl.float32) * x3[None, :]
    if KB > 4:
        acc += w4.to(tl.float32) * x4[None, :]
        acc += w5.to(tl.float32) * x5[None, :]
        acc += w6.to(tl.float32) * x6[None, :]
        acc += w7.to(tl.float32) * x7[None, :]
    return acc


@triton.jit
def _gemv_step(acc, k0, w_ptrs, x_ptr, s_row, offs_m, offs_k, nmask, M, K, stride_x, BM: tl.constexpr):
    # Split s walks `steps` whole tiles from s * steps * tile; the last splits may run past K
    # (short or empty: they write zero partials). One scalar compare per step.
    kin = k0 < K
    w = tl.load(w_ptrs + k0, mask=nmask[:, None] & kin, other=0.0).to(tl.float32)
    sx = tl.load(s_row + (k0 + offs_k) // 128, mask=kin, other=0.0)
    if BM == 1:
        # 2-D accumulator: pure FMAs in the loop, one cross-thread reduction at the end.
        xs = tl.load(x_ptr + offs_m * stride_x + k0 + offs_k, mask=kin, other=0.0).to(tl.float32) * sx
        acc += w * xs[None, :]
    else:
        mmask = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_x + k0 + offs_k[None, :]
        xs = tl.load(x_ptrs, mask=mmask[:, None] & kin, other=0.0).to(tl.float32) * sx[None, :]
        acc += w[None, :, :] * xs[:, None, :]
    return acc


# Sizes and the step count are not specialised: one binary per tile recipe serves every shape.
@triton.jit(do_not_specialize=["M", "N", "K", "steps", "stride_s"])
def _fp8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    p_ptr,
    c_ptr,
    M,
    N,
    K,
    steps,
    stride_x,
    stride_w,
    stride_s,
    stride_y,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
    NS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # Grid (N/BN, splits, M/BM); BN divides 128, so one scale row serves the whole program and the
    # block scale is folded into x ([BK] multiplies per step instead of [BN, BK]).
    # SPLIT: 0 none; 1 fp32 partials + _splitk_reduce_kernel; 2 fp32 partials fixed up by the last
    # split of each tile (_last_split_reduce: no second launch, which at M = 1 costs about as much
    # as the small GEMVs themselves).
    nb = tl.program_id(0)
    sk = tl.program_id(1)
    mb = tl.program_id(2)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    nmask = offs_n < N
    lo = sk * steps * BK
    s_row = s_ptr + ((nb * BN) // 128) * stride_s
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    if CHUNK:  # M = 1 in 128-column chunks (_gemv_step1); the launcher sets it only at BM = 1
        offs_m = mb
        offs_c = tl.arange(0, 128)
        w1_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_c[None, :]
        x1_ptrs = x_ptr + mb * stride_x + offs_c
        acc = tl.zeros((BN, 128), dtype=tl.float32)
    elif BM == 1:
        offs_m = mb
        acc = tl.zeros((BN, BK), dtype=tl.float32)
    else:
        offs_m = mb * BM + tl.arange(0, BM)
        acc = tl.zeros((BM, BN, BK), dtype=tl.float32)
    # Plain loads are not software-pipelined unless the loop asks: NS > 1 turns the weight loads
    # into cp.async stages (NS - 1 tiles in flight per program); NS = 1 keeps them in registers
    # (fewer bytes in flight, but no shared-memory round trip).
    for i in tl.range(0, steps, num_stages=NS):
        if CHUNK:
            acc = _gemv_step1(acc, lo + i * BK, w1_ptrs, x1_ptrs, s_row, nmask, K, BK // 128)
        else:
            acc = _gemv_step(
                acc, lo + i * BK, w_ptrs, x_ptr, s_row, offs_m, offs_k, nmask, M, K, stride_x, BM
            )
    if BM == 1:
        out = tl.sum(acc, axis=1)[None, :]
        offs_m = mb + tl.arange(0, 1)
    else:
        out = tl.sum(acc, axis=2)
    _store_out(y_ptr, p_ptr, out, offs_m, offs_n, M, N, stride_y, sk, SPLIT > 0)
    if SPLIT == 2:
        _last_split_reduce(y_ptr, p_ptr, c_ptr, offs_m, offs_n, M, N, stride_y, BM, BN)


@triton.jit
def _x_pow2(amax):
    # fp16 holds |x| < 65504 only (activations reach ~1e6 in rare rows) and loses bits below
    # 2^-14: each (token row, 128-column block) is scaled by a power of two that puts its amax in
    # [2^14, 2^15), so every bf16 value within 2^-29 of the amax converts exactly; the exact
    # inverse goes into the fp32 partial's scale. Exponent arithmetic on the fp32 bits (no
    # log2/exp2): k = 141 - biased_exp(amax), clamped so that 2^k and 2^-k stay normal fp32 (an
    # all-zero or padded row gets k = 100, harmless). Returns (2^k, 2^-k).
    k = tl.minimum(141 - ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF), 100)
    return ((k + 127) << 23).to(tl.float32, bitcast=True), ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _swap_step(
    acc,
    k0,
    w_ptrs,
    x_ptrs,
    xs_ptrs,
    s_ptrs,
    nmask,
    mmask,
    K,
    KB: tl.constexpr,
    F16: tl.constexpr,
    XPRE: tl.constexpr,
):
    # KB scale blocks of 128 columns per step. Split s walks `steps` whole steps from
    # s * steps * step; the last splits may run past K (short or empty: they write zero partials).
    kin = k0 < K
    for j in tl.static_range(KB):
        kk = k0 + j * 128
        w = tl.load(w_ptrs + kk, mask=nmask[:, None] & kin, other=0.0)
        if F16:
            s = tl.load(s_ptrs + kk // 128, mask=nmask & kin, other=0.0)
            if XPRE:  # x already fp16 with its inverse scales (_x_f16_kernel)
                x16 = tl.load(x_ptrs + kk, mask=mmask[None, :] & kin, other=0.0)
                down = tl.load(xs_ptrs + kk // 128, mask=mmask & kin, other=0.0)
            else:
                xt = tl.load(x_ptrs + kk, mask=mmask[None, :] & kin, other=0.0).to(tl.float32)
                up, down = _x_pow2(tl.max(tl.abs(xt), axis=0))
                x16 = (xt * up[None, :]).to(tl.float16)
            acc += mma(w.to(tl.float16), x16) * (s[:, None] * down[None, :])
        else:
            xt = tl.load(x_ptrs + kk, mask=mmask[None, :] & kin, other=0.0)
            s = tl.load(s_ptrs + kk // 128, mask=nmask & kin, other=0.0)
            acc += mma(w.to(tl.bfloat16), xt) * s[:, None]
    return acc


@triton.jit(do_not_specialize=["M", "N", "K", "steps", "stride_s"])
def _fp8_swap_kernel(
    x_ptr,
    xs_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    p_ptr,
    c_ptr,
    M,
    N,
    K,
    steps,
    stride_x,
    stride_w,
    stride_s,
    stride_y,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KB: tl.constexpr,
    SPLIT: tl.constexpr,
    F16: tl.constexpr,
    XPRE: tl.constexpr,
):
    # Swap-AB: acc[BN, BM] = W_tile @ x^T, the weight rows on the wgmma's 64-wide side. F16: fp16
    # operands, where sm_90 SASS has one F2FP.F16.E4M3.UNPACK_B per two weights; else (``dot``)
    # bf16, which adds an F2F.BF16.F16 per weight (1.5 converts per weight, against ~16
    # converts/clk/SM and ~16 fp8 bytes/clk/SM at full HBM rate).
    # SPLIT: 0 none; 1 fp32 partials + _splitk_reduce_kernel; 2 fp32 partials, and the last
    # split to finish a tile sums them (no second launch, see _last_split_reduce).
    nb = tl.program_id(0)
    sk = tl.program_id(1)
    mb = tl.program_id(2)
    offs_n = nb * BN + tl.arange(0, BN)
    offs_m = mb * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, 128)
    nmask = offs_n < N
    mmask = offs_m < M
    lo = sk * steps * (KB * 128)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_x + offs_k[:, None]
    xs_ptrs = xs_ptr + offs_m * (K // 128)
    s_ptrs = s_ptr + (offs_n // 128) * stride_s
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for i in range(0, steps):
        acc = _swap_step(
            acc, lo + i * (KB * 128), w_ptrs, x_ptrs, xs_ptrs, s_ptrs, nmask, mmask, K, KB, F16, XPRE
        )
    _store_out(y_ptr, p_ptr, tl.trans(acc), offs_m, offs_n, M, N, stride_y, sk, SPLIT > 0)
    if SPLIT == 2:
        _last_split_reduce(y_ptr, p_ptr, c_ptr, offs_m, offs_n, M, N, stride_y, BM, BN)


@triton.jit
def _last_split_reduce(
    y_ptr, p_ptr, c_ptr, offs_m, offs_n, M, N, stride_y, BM: tl.constexpr, BN: tl.constexpr
):
    # Split-K fix-up inside the GEMM launch: every split has stored its fp32 partial; it bumps the
    # tile's counter (release: the barrier first, so all of this program's stores are ordered
    # before it), and the split that sees count == splits - 1 (acquire) sums the partials in
    # split order (deterministic) and writes y, then resets the counter to 0 for the next launch
    # (CUDA-graph replays included). Saves the ~2 us second launch of the reduce kernel.
    tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    nsplit = tl.num_programs(1)
    tl.debug_barrier()
    done = tl.atomic_add(c_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if done == nsplit - 1:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        ptrs = p_ptr + offs_m[:, None] * N + offs_n[None, :]
        tot = tl.zeros((BM, BN), dtype=tl.float32)
        for s in range(0, nsplit):
            tot += tl.load(ptrs + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(
            y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], tot.to(y_ptr.dtype.element_ty), mask=mask
        )
        tl.atomic_xchg(c_ptr + tile, 0)


@triton.jit
def _x_f16_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, BR: tl.constexpr):
    # x [M, K] bf16 -> fp16 [M, K] scaled per (row, 128-block) by _x_pow2, and the inverses [M, K/128].
    offs_m = tl.program_id(0) * BR + tl.arange(0, BR)
    kb = tl.program_id(1)
    offs_k = kb * 128 + tl.arange(0, 128)
    mmask = offs_m < M
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mmask[:, None], other=0.0)
    up, down = _x_pow2(tl.max(tl.abs(x.to(tl.float32)), axis=1))
    tl.store(
        q_ptr + offs_m[:, None] * K + offs_k[None, :],
        (x.to(tl.float32) * up[:, None]).to(tl.float16),
        mask=mmask[:, None],
    )
    tl.store(s_ptr + offs_m * (K // 128) + kb, down, mask=mmask)


@triton.jit(do_not_specialize=["M", "N", "split"])
def _splitk_reduce_kernel(p_ptr, y_ptr, M, N, stride_y, split, BLOCK: tl.constexpr):
    # The split count is a runtime value: one binary for every shape's split factor.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, split):
        acc += tl.load(p_ptr + s * M * N + offs, mask=mask, other=0.0)
    m = offs // N
    tl.store(y_ptr + m * stride_y + offs % N, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _e4m3_round_interp(v):
    # Triton 3.6's interpreter gets fp32 -> e4m3 wrong when rounding carries into the exponent
    # (127.35 -> 64, not 128); rounding to the e4m3 grid in fp32 first makes its cast exact.
    # Ties go up instead of to even: rare, and only in the CPU tests.
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(v), 1e-30))), -6.0)
    step = tl.exp2(e - 3.0)
    return tl.floor(v / step + 0.5) * step


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_s, BR: tl.constexpr):
    # One program per (BR rows, one 128-column group): per-token, per-group e4m3 scaling.
    offs_m = tl.program_id(0) * BR + tl.arange(0, BR)
    kb = tl.program_id(1)
    offs_k = kb * 128 + tl.arange(0, 128)
    mmask = offs_m < M
    x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=mmask[:, None], other=0.0).to(
        tl.float32
    )
    s = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0
    v = x / s[:, None]
    if INTERPRET:
        v = _e4m3_round_interp(v)
    q = v.to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q, mask=mmask[:, None])
    tl.store(s_ptr + offs_m * stride_s + kb, s, mask=mmask)


@triton.jit
def _w8a8_step(acc, kb, a_ptrs, w_ptrs, as_ptrs, s_ptrs, mmask, nmask):
    a = tl.load(a_ptrs + kb * 128, mask=mmask[:, None], other=0.0)
    w = tl.load(w_ptrs + kb * 128, mask=nmask[None, :], other=0.0)
    sa = tl.load(as_ptrs + kb, mask=mmask, other=0.0)
    sw = tl.load(s_ptrs + kb, mask=nmask, other=0.0)
    return acc + mma(a, w) * sa[:, None] * sw[None, :]


# K stays a (16-divisible) runtime value: one binary per tile recipe for every K.
@triton.jit(do_not_specialize=["M", "N", "stride_s"])
def _w8a8_kernel(
    a_ptr,
    as_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_as,
    stride_w,
    stride_s,
    stride_y,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order so consecutive programs share W tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gm
    pid_n = (pid % width) // gm
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, 128)
    mmask = offs_m < M
    nmask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None]
    as_ptrs = as_ptr + offs_m * stride_as
    s_ptrs = s_ptr + (offs_n // 128) * stride_s
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, K // 128):
        acc = _w8a8_step(acc, kb, a_ptrs, w_ptrs, as_ptrs, s_ptrs, mmask, nmask)
    tl.store(
        y_ptr + offs_m[:, None] * stride_y + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, N, K, stride_w, stride_s, BR: tl.constexpr):
    # One program per (BR rows, one 128-column block); BR divides 128.
    offs_n = tl.program_id(0) * BR + tl.arange(0, BR)
    kb = tl.program_id(1)
    offs_k = kb * 128 + tl.arange(0, 128)
    nmask = offs_n < N
    w = tl.load(
        w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :], mask=nmask[:, None], other=0.0
    )
    s = tl.load(s_ptr + ((tl.program_id(0) * BR) // 128) * stride_s + kb)
    tl.store(
        o_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
        (w.to(tl.float32) * s).to(o_ptr.dtype.element_ty),
        mask=nmask[:, None],
    )


# --------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class Fp8Config:
    """One launch recipe. kind: gemv | dot | f16 | w8a8 | dequant.

    gemv: bm (tokens per program, power of 2), bn (rows, divides 128), bk (columns per step,
    multiple of 128), split. dot and f16: bm (tokens, >= 16), bn (rows), kb (128-blocks per
    step), split. w8a8: bm, bn (tile), group_m. dequant: none of the tile fields matter.
    """

    kind: str
    bm: int = 1
    bn: int = 32
    bk: int = 512
    kb: int = 1
    split: int = 1
    warps: int = 4
    stages: int = 3
    group_m: int = 8
    xpre: bool = False  # f16: convert x in a separate pass (else each program converts its tile)
    chunk: bool = False  # gemv M = 1: 128-column chunks into a [BN, 128] accumulator (_gemv_step1)

    def tag(self) -> str:
        if self.kind == "gemv":
            t = f"gemv bm{self.bm} bn{self.bn} bk{self.bk} s{self.split} w{self.warps} st{self.stages}"
            return t + (" ch" if self.chunk else "")
        if self.kind in ("dot", "f16"):
            t = f"{self.kind} bm{self.bm} bn{self.bn} kb{self.kb} s{self.split} w{self.warps} st{self.stages}"
            return t + (" xp" if self.xpre and self.kind == "f16" else "")
        if self.kind == "w8a8":
            return f"w8a8 bm{self.bm} bn{self.bn} w{self.warps} st{self.stages}"
        return self.kind


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(v))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_DEFAULT


def auto_split(n_tiles: int, k_steps: int, num_sms: int, waves: float = 4.0) -> int:
    """Split-K factor that brings the grid to ~``waves`` programs per SM, keeping >= 2 K steps each.

    Why: a decode GEMV with N=4096 has only 64-256 row tiles, i.e. 1-2 programs per SM, too few
    loads in flight to stream HBM; splitting K multiplies the programs at the cost of one tiny
    fp32 partial pass (M x N x split x 8 bytes).
    """
    want = max(1, round(waves * num_sms / max(n_tiles, 1)))
    return max(1, min(want, k_steps // 2, 16))


_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_TILES = 1 << 16  # split-K tiles one launch may fix up in place (lm_head never splits)


def _tile_counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for the in-kernel split-K fix-up, one buffer per device, allocated once
    and never replaced (a captured CUDA graph keeps its pointer); every launch leaves them at 0."""
    c = _COUNTERS.get(device)
    if c is None:
        c = _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return c


def _split_buffers(
    x: torch.Tensor, n: int, split: int, tiles: int, fixup: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(y, partials, tile counters, SPLIT mode) for a split-K launch: mode 0 without split, 2 when
    the kernel sums the partials itself (``fixup`` and the tiles fit the counters), else 1."""
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    mode = 0 if split == 1 else 2 if fixup and tiles <= MAX_TILES else 1
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    cnt = _tile_counters(x.device) if mode == 2 else part
    return y, part, cnt, mode


def _reduce_splits(part: torch.Tensor, y: torch.Tensor, mode: int) -> None:
    if mode == 1:
        m, n = y.shape
        _splitk_reduce_kernel[(triton.cdiv(m * n, 1024),)](
            part, y, m, n, y.stride(0), part.shape[0], BLOCK=1024
        )


def fp8_gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, cfg: Fp8Config) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    bm = _pow2_at_least(min(cfg.bm, m), 1)
    bk = cfg.bk if k % cfg.bk == 0 else QBLOCK
    assert QBLOCK % cfg.bn == 0, "gemv folds one scale row per program: bn must divide 128"
    chunk = cfg.chunk and bm == 1
    assert not chunk or bk // QBLOCK in (1, 2, 4, 8), "chunked gemv: bk must be 128, 256, 512 or 1024"
    grid_n, grid_m = triton.cdiv(n, cfg.bn), triton.cdiv(m, bm)
    y, part, cnt, mode = _split_buffers(x, n, cfg.split, grid_n * grid_m, fixup=True)
    steps = triton.cdiv(k // bk, cfg.split)
    _fp8_gemv_kernel[(grid_n, cfg.split, grid_m)](
        x,
        w,
        scale,
        y,
        part,
        cnt,
        m,
        n,
        k,
        steps,
        x.stride(0),
        w.stride(0),
        scale.stride(0),
        y.stride(0),
        BM=bm,
        BN=cfg.bn,
        BK=bk,
        SPLIT=mode,
        NS=cfg.stages,
        CHUNK=chunk,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    _reduce_splits(part, y, mode)
    return y


def fp8_swap_ab(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, cfg: Fp8Config) -> torch.Tensor:
    """Kinds ``f16`` and ``dot`` (only f16 sums its split-K partials in the same launch)."""
    m, k = x.shape
    n = w.shape[0]
    f16 = cfg.kind == "f16"
    bm = _pow2_at_least(min(cfg.bm, m), 16)  # tl.dot needs every dim >= 16: M = 1..15 pads to 16
    kb = cfg.kb if (k // QBLOCK) % cfg.kb == 0 else 1
    grid_n, grid_m = triton.cdiv(n, cfg.bn), triton.cdiv(m, bm)
    xpre = f16 and cfg.xpre
    if xpre:  # one pass converts x for all programs (at BM >= 32 each would redo [BM, K])
        xin = torch.empty((m, k), dtype=torch.float16, device=x.device)
        xs = torch.empty((m, k // QBLOCK), dtype=torch.float32, device=x.device)
        _x_f16_kernel[(triton.cdiv(m, 16), k // QBLOCK)](x, xin, xs, m, k, x.stride(0), BR=16, num_warps=4)
    else:
        xin, xs = x, x  # xs unused
    y, part, cnt, mode = _split_buffers(x, n, cfg.split, grid_n * grid_m, fixup=f16)
    steps = triton.cdiv(k // (kb * QBLOCK), cfg.split)
    _fp8_swap_kernel[(grid_n, cfg.split, grid_m)](
        xin,
        xs,
        w,
        scale,
        y,
        part,
        cnt,
        m,
        n,
        k,
        steps,
        xin.stride(0),
        w.stride(0),
        scale.stride(0),
        y.stride(0),
        BM=bm,
        BN=cfg.bn,
        KB=kb,
        SPLIT=mode,
        F16=f16,
        XPRE=xpre,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    _reduce_splits(part, y, mode)
    return y


def quantize_act_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, K/128]) per token per 128-column group."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, k // QBLOCK), dtype=torch.float32, device=x.device)
    br = 16
    _act_quant_kernel[(triton.cdiv(m, br), k // QBLOCK)](
        x, q, s, m, k, x.stride(0), s.stride(0), BR=br, num_warps=4
    )
    return q, s


def quantize_act_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    g = x.float().view(m, k // QBLOCK, QBLOCK)
    s = g.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    return (g / s[..., None]).to(torch.float8_e4m3fn).view(m, k), s


def fp8_w8a8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, cfg: Fp8Config) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    xq, xs = quantize_act_fp8(x)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn),)
    _w8a8_kernel[grid](
        xq,
        xs,
        w,
        scale,
        y,
        m,
        n,
        k,
        xs.stride(0),
        w.stride(0),
        scale.stride(0),
        y.stride(0),
        BM=cfg.bm,
        BN=cfg.bn,
        GROUP_M=cfg.group_m,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    return y


def dequant_fp8(
    w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp8 [N, K] + block scales -> dense [N, K] in ``dtype`` (one pass; for the cuBLAS prefill path)."""
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.device) if out is None else out
    assert out.shape == (n, k) and out.is_contiguous()
    br = 32
    _dequant_kernel[(triton.cdiv(n, br), k // QBLOCK)](
        w, scale, out, n, k, w.stride(0), scale.stride(0), BR=br, num_warps=4
    )
    return out


_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # scratch replaced while a graph was being captured stays alive


def dequant_scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat reusable buffer of >= numel elements (one per device and dtype) for the prefill
    dequantisation: the layers run one after another on one stream, so one buffer serves them
    all (the largest, gate_up 18432x4096, is 151 MB in bf16) instead of an allocation per call.
    It only grows; a buffer replaced during CUDA-graph capture is kept alive, because the
    captured kernels still point at it. Call it once with the largest size before capture."""
    key = (device, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            _RETIRED.append(buf)
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def fp8_dequant_mm(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, cfg: Fp8Config | None = None
) -> torch.Tensor:
    n, k = w.shape
    wd = dequant_fp8(w, scale, x.dtype, out=dequant_scratch(n * k, x.dtype, x.device).view(n, k))
    return torch.mm(x, wd.T)


_RUNNERS = {
    "gemv": fp8_gemv,
    "dot": fp8_swap_ab,
    "f16": fp8_swap_ab,
    "w8a8": fp8_w8a8,
    "dequant": fp8_dequant_mm,
}


def run_config(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, cfg: Fp8Config) -> torch.Tensor:
    return _RUNNERS[cfg.kind](x, w, scale, cfg)


# --------------------------------------------------------------------------------------------
# Dispatch

# Measured winners on the H200 (bench/gpu/fp8_sweep.py, 2026-11-29), keyed by (N, K, M bucket);
# "from M=x" marks a bucket that copies the nearest measured one. Shapes not listed fall back to
# the reasoned defaults in ``default_config``. How each entry won: docs/gpu-notes.md.
DISPATCH: dict[tuple[int, int, int], Fp8Config] = {
    (576, 4096, 1): Fp8Config("gemv", bn=16, bk=1024, split=4, stages=1),
    (1536, 4096, 1): Fp8Config("gemv", bn=16, split=4, warps=8, stages=1, chunk=True),
    (4096, 4096, 1): Fp8Config("gemv", split=2, warps=8, stages=1),
    (4096, 4096, 2): Fp8Config("f16", bm=16, bn=128, split=8, warps=8, stages=4),
    (4096, 4096, 4): Fp8Config("f16", bm=16, bn=64, kb=2, split=4, stages=4),  # from M=8
    (4096, 4096, 8): Fp8Config("f16", bm=16, bn=64, kb=2, split=4, stages=4),
    (4096, 4096, 16): Fp8Config("dot", bm=32, bn=64, kb=2, split=4),  # from M=32
    (4096, 4096, 32): Fp8Config("dot", bm=32, bn=64, kb=2, split=4),
    (4096, 4096, 64): Fp8Config("dot", bm=128, bn=64, split=4),  # from M=128
    (4096, 4096, 128): Fp8Config("dot", bm=128, bn=64, split=4),
    (4096, 8192, 1): Fp8Config("gemv", split=2, warps=8, chunk=True),
    (4096, 9216, 1): Fp8Config("gemv", split=2, warps=8, chunk=True),
    (4096, 9216, 2): Fp8Config("f16", bm=16, bn=128, split=8, warps=8, stages=4),
    (4096, 9216, 4): Fp8Config("f16", bm=16, bn=128, split=8, warps=8, stages=4),  # from M=8
    (4096, 9216, 8): Fp8Config("f16", bm=16, bn=128, split=8, warps=8, stages=4),
    (4096, 9216, 16): Fp8Config("dot", bm=32, bn=64, kb=2, split=4),  # from M=32
    (4096, 9216, 32): Fp8Config("dot", bm=32, bn=64, kb=2, split=4),
    (4096, 9216, 64): Fp8Config("dot", bm=128, bn=64, split=4),  # from M=128
    (4096, 9216, 128): Fp8Config("dot", bm=128, bn=64, split=4),
    (4096, 9216, 256): Fp8Config("dequant"),  # from M=8192
    (4096, 9216, 1024): Fp8Config("dequant"),  # from M=8192
    (4096, 9216, 8192): Fp8Config("dequant"),
    (6144, 1536, 1): Fp8Config("gemv", warps=8, stages=1),
    (12288, 4096, 1): Fp8Config("gemv", warps=8, stages=1, chunk=True),
    (12288, 4096, 2): Fp8Config("gemv", bm=2, bk=128, stages=4),
    (12288, 4096, 4): Fp8Config("f16", bm=16, bn=64, kb=2, stages=4),  # from M=8
    (12288, 4096, 8): Fp8Config("f16", bm=16, bn=64, kb=2, stages=4),
    (12288, 4096, 16): Fp8Config("dot", bm=32, bn=64, split=2, stages=4),  # from M=32
    (12288, 4096, 32): Fp8Config("dot", bm=32, bn=64, split=2, stages=4),
    (12288, 4096, 64): Fp8Config("w8a8", bm=64, bn=128, stages=4),  # from M=128
    (12288, 4096, 128): Fp8Config("w8a8", bm=64, bn=128, stages=4),
    (12288, 4096, 256): Fp8Config("dequant"),  # from M=8192
    (12288, 4096, 1024): Fp8Config("dequant"),  # from M=8192
    (12288, 4096, 8192): Fp8Config("dequant"),
    (18432, 4096, 1): Fp8Config("gemv", bn=16, warps=8, stages=1, chunk=True),
    (18432, 4096, 2): Fp8Config("f16", bm=16, bn=128, split=2, warps=8, stages=4),
    (18432, 4096, 4): Fp8Config("f16", bm=16, bn=128, split=2, warps=8, stages=4),  # from M=8
    (18432, 4096, 8): Fp8Config("f16", bm=16, bn=128, split=2, warps=8, stages=4),
    (18432, 4096, 16): Fp8Config("f16", bm=32, bn=64, kb=2, xpre=True),  # from M=32
    (18432, 4096, 32): Fp8Config("f16", bm=32, bn=64, kb=2, xpre=True),
    (18432, 4096, 64): Fp8Config("w8a8", bm=64, bn=128, stages=4),  # from M=128
    (18432, 4096, 128): Fp8Config("w8a8", bm=64, bn=128, stages=4),
    (18432, 4096, 256): Fp8Config("dequant"),  # from M=8192
    (18432, 4096, 1024): Fp8Config("dequant"),  # from M=8192
    (18432, 4096, 8192): Fp8Config("dequant"),
    (157184, 4096, 1): Fp8Config("gemv", warps=8, chunk=True),
    (157184, 4096, 2): Fp8Config("f16", bm=16, bn=128, warps=8, stages=4),
    (157184, 4096, 4): Fp8Config("f16", bm=16, bn=128, warps=8, stages=4),  # from M=8
    (157184, 4096, 8): Fp8Config("f16", bm=16, bn=128, warps=8, stages=4),
    (157184, 4096, 16): Fp8Config("f16", bm=32, bn=64, kb=2, xpre=True),  # from M=32
    (157184, 4096, 32): Fp8Config("f16", bm=32, bn=64, kb=2, xpre=True),
    (157184, 4096, 64): Fp8Config("w8a8", bm=64, bn=128, stages=4),  # from M=128
    (157184, 4096, 128): Fp8Config("w8a8", bm=64, bn=128, stages=4),
}

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 8192)


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the last bucket for anything larger)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def default_config(m: int, n: int, k: int, num_sms: int = NUM_SMS_DEFAULT) -> Fp8Config:
    """Defaults for shapes DISPATCH does not list.

    M = 1: the first sweep's winner on every shape (H200): gemv, 32 rows x 512 columns, 8 warps,
    loads in registers (no cp.async), split-K to ~2 programs per SM (reproduces each measured
    split), fixed up by the last split in the same launch (no reduce launch).
    M 2..128: the fp16 tensor-core path (one convert per two weights instead of three per two on
    the bf16 path, SASS-counted), 64 weight rows, split-K to ~2 programs per SM; x converted in a
    separate pass from BM = 64 on (each program would otherwise convert its [BM, K] x: at
    BM = 128 twice as many converts as its 64-row weight tile needs).
    M > 128: dequantise to a bf16 scratch + cuBLAS: fastest on every prefill row measured
    (M = 1024 and 8192, all shapes), ahead of w8a8 and torch._scaled_mm.
    """
    if m == 1:
        bn, bk = 32, (512 if k % 512 == 0 else QBLOCK)
        split = auto_split(triton.cdiv(n, bn), k // bk, num_sms, waves=2.0)
        return Fp8Config("gemv", bm=1, bn=bn, bk=bk, split=split, warps=8, stages=1)
    if m <= 128:
        bm = _pow2_at_least(m, 16)
        kb = 2 if (k // QBLOCK) % 2 == 0 and bm <= 32 else 1
        split = auto_split(triton.cdiv(n, 64) * triton.cdiv(m, bm), k // (kb * QBLOCK), num_sms, waves=2.0)
        return Fp8Config(
            "f16", bm=bm, bn=64, kb=kb, split=split, warps=4, stages=4 if bm == 16 else 3, xpre=bm >= 64
        )
    return Fp8Config("dequant")


def pick_config(m: int, n: int, k: int, num_sms: int = NUM_SMS_DEFAULT) -> Fp8Config:
    return DISPATCH.get((n, k, m_bucket(m))) or default_config(m, n, k, num_sms)


def fp8_linear(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, *, config: Fp8Config | None = None
) -> torch.Tensor:
    """x [M, K] bf16, w [N, K] fp8 e4m3, scale [ceil(N/128), K/128] fp32 -> y [M, N] bf16.

    ``config`` overrides the dispatch (benchmarks and tests); otherwise ``pick_config``.
    """
    m, k = x.shape
    n = w.shape[0]
    assert k % QBLOCK == 0 and w.shape[1] == k and x.stride(1) == 1 and w.stride(1) == 1
    assert scale.shape == (triton.cdiv(n, QBLOCK), k // QBLOCK), "scale must be [ceil(N/128), K/128]"
    return run_config(x, w, scale, config or pick_config(m, n, k, _num_sms(x.device)))
