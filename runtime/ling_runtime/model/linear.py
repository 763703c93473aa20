"""Tensor-parallel linears and embeddings, sharded exactly as vLLM/SGLang shard Ling-2.6.

Each parameter carries ``ckpt_pieces`` (see ``ling_runtime.loader.Piece``): which checkpoint tensors
and regions fill it on this rank. Column-parallel splits the output dim (no communication),
row-parallel splits the input dim and sums partial outputs over the TP group, vocab-parallel splits
the vocabulary rows.

FP8 weights: while ``fp8_weights(block)`` is active (``LingForCausalLM`` turns it on for an FP8
checkpoint in bf16, or ``weight_dtype="fp8"``), the projection linears built here and the MoE experts
hold ``weight`` as float8_e4m3fn plus ``weight_scale_inv`` fp32 ``[ceil(N/bn), ceil(K/bk)]`` (the
official FP8 / DeepSeek-V3 layout, so a checkpoint loads without conversion) and multiply with
``kernels.fp8.fp8_linear`` on CUDA. Weights other modules read as plain matrices (``FP8_KEEP``) stay
in the model dtype; the loader dequantizes those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ling_runtime.loader import CheckpointError, Piece, shard, whole
from ling_runtime.model.parallel import TPGroup

FP8 = torch.float8_e4m3fn
# MLA reads kv_b_proj as W_UK / W_UV matrices (absorbed decode), never through forward().
FP8_KEEP = ("kv_b_proj.weight",)
_fp8_block: tuple[int, int] | None = None
_fp8_strict = True


@contextmanager
def fp8_weights(block: tuple[int, int] | None, strict: bool = True) -> Iterator[None]:
    """Linears and experts constructed inside hold block-scaled FP8 weights (``None``: off).

    ``strict``: the weights will be loaded from an FP8 checkpoint as stored, so every rank's slice
    must fall on whole blocks: raise at construction otherwise. Not strict (a float checkpoint
    quantized on load, in this rank's own coordinates): a misaligned slice only matters if an FP8
    checkpoint is loaded after all, and the loader raises then."""
    global _fp8_block, _fp8_strict
    saved, _fp8_block, _fp8_strict = (_fp8_block, _fp8_strict), block, strict
    try:
        yield
    finally:
        _fp8_block, _fp8_strict = saved


def fp8_block_for(key: str) -> tuple[int, int] | None:
    """The FP8 block for a weight built now under checkpoint key ``key``, or None (model dtype)."""
    if _fp8_block is None or key.endswith(FP8_KEEP):
        return None
    return _fp8_block


def make_param(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None, pieces: list[Piece]
) -> nn.Parameter:
    """An inference-only parameter (zeros until loaded) tagged with its checkpoint pieces.

    Allocated directly in its final dtype, so an FP8 model never holds a bf16 copy of its weights."""
    p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
    p.ckpt_pieces = pieces  # type: ignore[attr-defined]
    return p


def _scale_slice(s: slice, block: int, full: int, key: str, what: str) -> slice:
    start, stop = s.start or 0, s.stop
    if start % block or (stop % block and stop != full):
        raise CheckpointError(
            f"{key}: {what} [{start}, {stop}) of {full} do not fall on {block}-element FP8 blocks; "
            f"with tensor parallelism every rank's share (e.g. N/tp, K/tp) must be a multiple of {block}"
        )
    return slice(start // block, -(-stop // block))


def scale_pieces(pieces: list[Piece], block: tuple[int, int]) -> list[Piece]:
    """The ``weight_scale_inv`` pieces matching weight pieces: the last two dims of ``src`` and
    ``dst`` in block units. A slice that does not start (and end) on a block boundary would need
    a block scale shared by two ranks' halves: raise, naming the key."""
    out = []
    for p in pieces:
        rows, cols = p.shape[-2:]
        skey = p.key.removesuffix("weight") + "weight_scale_inv"
        sshape = (*p.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
        src = (
            *p.src[:-2],
            _scale_slice(p.src[-2], block[0], rows, p.key, "rows"),
            _scale_slice(p.src[-1], block[1], cols, p.key, "columns"),
        )
        # The destination's extent is the same window; only its start may differ (merged parts).
        d_rows, d_cols = p.dst[-2:]
        dst = (
            *p.dst[:-2],
            _scale_slice(slice(d_rows.start, d_rows.start + (p.src[-2].stop - p.src[-2].start)), block[0],
                         d_rows.start + (p.src[-2].stop - p.src[-2].start), p.key, "destination rows"),
            _scale_slice(slice(d_cols.start, d_cols.start + (p.src[-1].stop - p.src[-1].start)), block[1],
                         d_cols.start + (p.src[-1].stop - p.src[-1].start), p.key, "destination columns"),
        )  # fmt: skip
        out.append(Piece(skey, sshape, src, dst))
    return out


def make_weight(
    module: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str | None,
    pieces: list[Piece],
    name: str = "weight",
) -> None:
    """Register ``name`` (and, for FP8, ``name + "_scale_inv"``) on ``module`` for checkpoint pieces
    ``pieces``; FP8 when ``fp8_weights`` is active and the key is not in ``FP8_KEEP``."""
    block = fp8_block_for(pieces[0].key) if pieces else None
    if block is None:
        setattr(module, name, make_param(shape, dtype, device, pieces))
        return
    w = make_param(shape, FP8, device, pieces)
    sshape = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    try:
        spieces = scale_pieces(pieces, block)
    except CheckpointError as e:
        if _fp8_strict:
            raise
        spieces = []
        w.ckpt_scale_error = str(e)  # type: ignore[attr-defined]  # raised if loaded from FP8 as is
    s = make_param(sshape, torch.float32, device, spieces)
    s.ckpt_scale_of = w  # type: ignore[attr-defined]  # the loader fills it with its weight
    w.ckpt_scale = s  # type: ignore[attr-defined]
    w.fp8_block = block  # type: ignore[attr-defined]
    setattr(module, name, w)
    setattr(module, name + "_scale_inv", s)


def expand_scale(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Block scales ``[..., nR, nC]`` -> element scales ``[..., rows, cols]`` (partial last blocks)."""
    s = scale.float().repeat_interleave(block[0], -2)[..., :rows, :]
    return s.repeat_interleave(block[1], -1)[..., :cols]


def dequantize(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """FP8 ``w [..., N, K]`` x block scales -> ``dtype``."""
    return (w.float() * expand_scale(scale, block, w.shape[-2], w.shape[-1])).to(dtype)


def linear_fp8(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], kernels: bool = True
) -> torch.Tensor:
    """``x W^T`` for a block-scaled FP8 ``w [N, K]``: ``kernels.fp8.fp8_linear`` for bf16 on CUDA (it
    dispatches on M itself), else dequantize and multiply (the reference; other block sizes)."""
    n, k = w.shape
    rows = x.numel() // max(k, 1)
    if (
        kernels
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and block == (128, 128)
        and k % 128 == 0
        and rows > 0
    ):
        from ling_runtime.kernels.fp8 import fp8_linear

        y = fp8_linear(x.reshape(rows, k).contiguous(), w, scale)
        return y.view(*x.shape[:-1], n)
    return F.linear(x, dequantize(w, scale, block, x.dtype))


def _matmul(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = module.weight
    if w.dtype == FP8:
        return linear_fp8(x, w, module.weight_scale_inv, w.fp8_block, module.use_kernels)
    return F.linear(x, w)


class ReplicatedLinear(nn.Module):
    """``y = x W^T`` with the whole weight on every rank."""

    def __init__(
        self,
        key: str,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels (FP8: the Triton GEMM)
        make_weight(self, (out_features, in_features), dtype, device, whole(key, (out_features, in_features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self, x)


class PiecesLinear(nn.Module):
    """``y = x W^T`` over an arbitrary piece layout (e.g. the Lightning fused QKV, whose rank takes
    its heads from each of Q, K and V); FP8 like the other linears."""

    def __init__(
        self,
        pieces: list[Piece],
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels (FP8: the Triton GEMM)
        make_weight(self, (out_features, in_features), dtype, device, pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self, x)


class ColumnParallelLinear(nn.Module):
    """Output features split over ranks; ``parts`` merges several checkpoint tensors along the output
    dim (each split separately, e.g. gate and up), so rank r holds ``[part0_r | part1_r | ...]``."""

    def __init__(
        self,
        parts: list[tuple[str, int]],
        in_features: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        pieces: list[Piece] = []
        offset = 0
        for key, out_full in parts:
            pieces.append(shard(key, (out_full, in_features), 0, tp.rank, tp.size, dst_offset=offset))
            offset += out_full // tp.size
        self.out_features = offset
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels (FP8: the Triton GEMM)
        make_weight(self, (offset, in_features), dtype, device, pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self, x)


class RowParallelLinear(nn.Module):
    """Input features split over ranks; the partial products are summed over the group unless
    ``reduce=False`` (the caller then sums several partials with one all-reduce)."""

    def __init__(
        self,
        key: str,
        in_features: int,
        out_features: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        reduce: bool = True,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.reduce = reduce
        piece = shard(key, (out_features, in_features), 1, tp.rank, tp.size)
        self.use_kernels = False  # set by LingForCausalLM.set_use_kernels (FP8: the Triton GEMM)
        make_weight(self, (out_features, in_features // tp.size), dtype, device, [piece])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _matmul(self, x)
        return self.tp.all_reduce(y) if self.reduce else y


def vocab_range(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    """(start, end, rows per rank) of this rank's vocabulary slice; the last rank may be padded."""
    per = -(-vocab_size // tp.size)
    start = min(tp.rank * per, vocab_size)
    end = min(start + per, vocab_size)
    return start, end, per


def _vocab_pieces(key: str, vocab_size: int, hidden: int, tp: TPGroup) -> list[Piece]:
    start, end, _ = vocab_range(vocab_size, tp)
    if end <= start:
        return []
    return [
        Piece(
            key,
            (vocab_size, hidden),
            (slice(start, end), slice(0, hidden)),
            (slice(0, end - start), slice(0, hidden)),
        )
    ]


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks; each rank looks up its own ids and the group sums."""

    def __init__(
        self,
        key: str,
        vocab_size: int,
        hidden: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.start, self.end, per = vocab_range(vocab_size, tp)
        self.weight = make_param((per, hidden), dtype, device, _vocab_pieces(key, vocab_size, hidden, tp))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        inside = (ids >= self.start) & (ids < self.end)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """lm_head rows split over ranks; logits are gathered to the full vocabulary on every rank."""

    def __init__(
        self,
        key: str,
        vocab_size: int,
        hidden: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        _, _, per = vocab_range(vocab_size, tp)
        self.weight = make_param((per, hidden), dtype, device, _vocab_pieces(key, vocab_size, hidden, tp))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()
        return self.tp.all_gather_cat(logits, dim=-1)[..., : self.vocab_size]
