"""Tensor-parallel process-group helpers: the only place the model touches ``torch.distributed``.

A :class:`TPGroup` names this rank, the group size and the process group. With ``size == 1`` every
collective is the identity, so the single-process path never needs ``torch.distributed``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This shard's place in its tensor-parallel group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tp_size: must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp_rank: must be in [0, {self.size}), got {self.rank}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group (in place when distributed); identity for one rank."""
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_cat(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` in rank order; identity for one rank."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def backend_for(device: str) -> str:
    """The torch.distributed backend for the model's collectives on ``device`` (NCCL on GPU)."""
    return "nccl" if device == "cuda" else "gloo"


def init_process_group(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str = "gloo",
    timeout_s: float = 300.0,
) -> TPGroup:
    """Join the default process group at ``master_addr:master_port`` and return the TP group over it."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: accepted 'gloo' or 'nccl', got {backend!r}")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{int(master_port)}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return TPGroup(rank=rank, size=world_size, group=dist.group.WORLD)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
