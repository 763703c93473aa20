"""Tensor parallelism on CPU: TP 2 and 4 ranks (gloo, loopback) give the logits of TP 1."""

from __future__ import annotations

import pytest
import torch

from .conftest import load
from .tp_worker import run_ranks, run_scenario

# TP 2 runs the MTP layer and the expert-parallel MoE variant in one process group.
CASES = {2: [{"enable_mtp": True}, {"expert_parallel": True}], 4: [{"enable_mtp": True}]}


@pytest.mark.parametrize("world", sorted(CASES))
def test_tp_shards_reproduce_tp1_logits(checkpoint, tmp_path, world: int) -> None:
    path = checkpoint("base", seed=7)
    variants = CASES[world]
    run_ranks(world, str(path), str(tmp_path), variants)
    for i, kwargs in enumerate(variants):
        baseline = run_scenario(load(path, **kwargs))
        assert ("mtp" in baseline) == bool(kwargs.get("enable_mtp"))
        for rank in range(world):
            got = torch.load(tmp_path / f"rank{rank}-{i}.pt")
            assert got.keys() == baseline.keys()
            for name, want in baseline.items():
                torch.testing.assert_close(
                    got[name], want, atol=1e-4, rtol=1e-4, msg=f"{kwargs} rank {rank}: {name}"
                )
