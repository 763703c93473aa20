"""Tensor-parallel linears and embeddings, sharded exactly as vLLM/SGLang shard Ling-2.6.

Each parameter carries ``ckpt_pieces`` (see ``ling_runtime.loader.Piece``): which checkpoint tensors
and regions fill it on this rank. Column-parallel splits the output dim (no communication),
row-parallel splits the input dim and sums partial outputs over the TP group, vocab-parallel splits
the vocabulary rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ling_runtime.distributed.parallel import TPGroup
from ling_runtime.loader import Piece, shard, whole


def make_param(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None, pieces: list[Piece]
) -> nn.Parameter:
    """An inference-only parameter (zeros until loaded) tagged with its checkpoint pieces."""
    p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
    p.ckpt_pieces = pieces  # type: ignore[attr-defined]
    return p


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
        self.weight = make_param(
            (out_features, in_features), dtype, device, whole(key, (out_features, in_features))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


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
        self.weight = make_param((offset, in_features), dtype, device, pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


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
        self.weight = make_param((out_features, in_features // tp.size), dtype, device, [piece])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
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
