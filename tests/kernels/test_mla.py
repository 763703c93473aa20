"""MLA absorbed split-K decode against the fp32 reference over a paged cache (interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.kernels.mla import mla_decode, mla_decode_ref, single_chunk_splits

from tests.kernels.util import relerr

HEADS, LORA, ROPE = 4, 32, 16
SCALE = (128 + 64) ** -0.5


def _case(gen: torch.Generator, page: int, s_q: int = 1, heads: int = HEADS) -> tuple[torch.Tensor, ...]:
    seq_lens = torch.tensor([1 + (s_q - 1), 37, 50], dtype=torch.int32)  # one token, partial pages
    width = -(-64 // page)
    n_pages = 3 * width
    kv = torch.randn(n_pages, page, LORA + ROPE, generator=gen).bfloat16()
    # Pages handed out in a scrambled order, as a cache manager would after churn.
    block_table = torch.randperm(n_pages, generator=gen).view(3, width).to(torch.int32)
    shape = (3, heads, LORA + ROPE) if s_q == 1 else (3, s_q, heads, LORA + ROPE)
    q = torch.randn(*shape, generator=gen).bfloat16()
    return q, kv, block_table, seq_lens


@pytest.mark.parametrize("page", [16, 8])
def test_mla_decode_paged_split_k(gen: torch.Generator, page: int) -> None:
    q, kv, block_table, seq_lens = _case(gen, page)
    ref = mla_decode_ref(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA)
    # (splits, block_n, pages per chunk): a block spanning two pages (16 > 8), several chunks per
    # split (2 pages per chunk), one split (stage 1 writes the output, no merge), empty splits.
    # Both orientations (keys_as_m: S^T = K Q^T, the wgmma-shaped form).
    for splits, bn, ppc, tr in ((1, 16, 256, False), (3, 16, 256, False), (2, 16, 2, False), (5, 16, 2, False),
                                (1, 16, 256, True), (3, 16, 2, True)):  # fmt: skip
        out = mla_decode(
            q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA, num_splits=splits, block_n=bn,
            pages_per_chunk=ppc, keys_as_m=tr,
        )  # fmt: skip
        assert relerr(out, ref) < 1e-2, (splits, bn, ppc, tr)
    # Defaults (32 splits here): most splits are empty and must carry zero weight in the merge.
    assert relerr(mla_decode(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA, block_n=16), ref) < 1e-2
    # Tokens past seq_len are ignored: poisoning them changes nothing.
    kv_poison = kv.clone()
    for b, n in enumerate(seq_lens.tolist()):
        kv_poison[block_table[b, n // page], n % page :] = float("nan")
    out = mla_decode(q, kv_poison, block_table, seq_lens, SCALE, kv_lora_rank=LORA, num_splits=3, block_n=16)
    assert relerr(out, ref) < 1e-2


def test_mla_decode_v1_page_per_block(gen: torch.Generator) -> None:
    q, kv, block_table, seq_lens = _case(gen, 16)
    ref = mla_decode_ref(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA)
    out = mla_decode(
        q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA, num_splits=3, block_n=16, hoist_pages=False
    )
    assert relerr(out, ref) < 1e-2


@pytest.mark.parametrize("s_q", [2, 4])
def test_mla_decode_mtp_verify(gen: torch.Generator, s_q: int) -> None:
    q, kv, block_table, seq_lens = _case(gen, 16, s_q, heads=8)
    ref = mla_decode_ref(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA)
    # Each verify position sees a different number of keys: the reference must reflect that.
    assert relerr(ref[:, 0], ref[:, -1]) > 1e-2
    # 7 splits: some splits hold only keys the earlier positions may not see.
    # rows_per_program 16: the 8 * s_q rows in one program (s_q = 2) or two (s_q = 4).
    for splits, tr, rpp in ((1, False, 64), (3, False, 16), (7, False, 64), (7, True, 64), (3, True, 16)):
        out = mla_decode(
            q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA, num_splits=splits, block_n=16,
            keys_as_m=tr, rows_per_program=rpp,
        )  # fmt: skip
        assert out.shape == ref.shape
        assert relerr(out, ref) < 1e-2, (splits, tr, rpp)


def test_splits_keep_every_split_inside_one_chunk() -> None:
    # The H200 case that faulted: 257 pages of 16 at one split -> two splits of <= 256 - 4 pages.
    assert single_chunk_splits(1, 257, 256, 64, 16) == 2
    assert single_chunk_splits(4, 257, 256, 64, 16) == 4  # already enough
    assert single_chunk_splits(1, 8192, 256, 64, 16) == 33  # 128K context
    assert single_chunk_splits(1, 100, 128, 16, 16) == 1
