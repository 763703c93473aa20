"""Router and grouped-expert MoE kernels against their torch references (interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.kernels.moe import fused_moe, fused_moe_ref, moe_route, moe_route_ref

from tests.kernels.util import relerr


def test_router_matches_reference(gen: torch.Generator) -> None:
    logits = torch.randn(7, 64, generator=gen) * 3
    bias = torch.randn(64, generator=gen) * 0.5
    ids, w = moe_route(logits, bias, top_k=4, n_group=8, topk_group=3, scaling=2.5)
    ref_ids, ref_w = moe_route_ref(logits, bias, top_k=4, n_group=8, topk_group=3, scaling=2.5)
    assert torch.equal(ids, ref_ids)
    assert relerr(w, ref_w) < 1e-6
    assert (ids[:, -1] == 64).all() and (w[:, -1] == 1.0).all()  # the shared expert rides along
    # Group limiting: every chosen routed expert lies in one of the 3 kept groups.
    assert all(len(set((row[:-1] // 8).tolist())) <= 3 for row in ids)


# bsz 20: expert grid, and the shared expert's 20 tokens take two trips of the 16-row M loop;
# bsz 2: pair grid. dense_shared: the shared expert as plain GEMMs instead of in the grouped kernels.
@pytest.mark.parametrize(("bsz", "dense_shared"), [(20, False), (2, False), (20, True)])
def test_fused_moe_matches_reference_with_shared_expert(
    gen: torch.Generator, bsz: int, dense_shared: bool
) -> None:
    n_routed, hid, inter = 8, 64, 32
    w13 = (torch.randn(n_routed + 1, 2 * inter, hid, generator=gen) * hid**-0.5).bfloat16()
    w2 = (torch.randn(n_routed + 1, hid, inter, generator=gen) * inter**-0.5).bfloat16()
    x = torch.randn(bsz, hid, generator=gen).bfloat16()
    logits = torch.randn(bsz, n_routed, generator=gen)
    ids, w = moe_route_ref(logits, torch.zeros(n_routed), top_k=2, n_group=4, topk_group=2, scaling=2.5)
    ref = fused_moe_ref(x, w13, w2, ids, w)
    out = fused_moe(
        x, w13, w2, ids, w, block_m=16, block_n=(16, 32), block_k=(32, 16), dense_shared=dense_shared
    )
    assert relerr(out, ref) < 1e-2
    # A token's output changes when its routing changes: the kernel really reads the ids.
    ids2 = ids.clone()
    ids2[0, 0] = (
        (ids[0, 0] + 1) % n_routed if (ids[0, 0] + 1) % n_routed != ids[0, 1] else (ids[0, 0] + 2) % n_routed
    )
    out2 = fused_moe(
        x, w13, w2, ids2, w, block_m=16, block_n=(16, 32), block_k=(32, 16), dense_shared=dense_shared
    )
    assert relerr(out2[0], out[0]) > 1e-2 and torch.equal(out2[1:], out[1:])
