"""MLA absorbed split-K decode against the fp32 reference over a paged cache (interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.kernels import mla as mla_mod
from ling_runtime.kernels.mla import MlaConfig, mla_config, mla_decode, mla_decode_ref, single_chunk_splits

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
def test_mla_decode_paged_split_k(gen: torch.Generator, page: int, monkeypatch: pytest.MonkeyPatch) -> None:
    q, kv, block_table, seq_lens = _case(gen, page)
    ref = mla_decode_ref(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA)
    # (splits, pages per chunk): one split (stage 1 writes the output, no merge), empty splits,
    # 2-page chunks (several page vectors per sequence: more splits); 16-key blocks span two
    # 8-token pages.
    for splits, ppc in ((1, 256), (3, 256), (2, 2), (5, 2)):
        monkeypatch.setattr(mla_mod, "PAGES_PER_CHUNK", ppc)
        out = mla_decode(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA, config=MlaConfig(splits, 16))
        assert relerr(out, ref) < 1e-2, (splits, ppc)
    monkeypatch.undo()
    # The dispatched config (32 splits here): most splits are empty and must carry zero weight in
    # the merge (its 64-key blocks are wider than the 64-token sequences' pages, too).
    assert mla_config(3).num_splits == 32
    assert relerr(mla_decode(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA), ref) < 1e-2
    # Tokens past seq_len are ignored: poisoning them changes nothing.
    kv_poison = kv.clone()
    for b, n in enumerate(seq_lens.tolist()):
        kv_poison[block_table[b, n // page], n % page :] = float("nan")
    out = mla_decode(q, kv_poison, block_table, seq_lens, SCALE, kv_lora_rank=LORA, config=MlaConfig(3, 16))
    assert relerr(out, ref) < 1e-2


@pytest.mark.parametrize("s_q", [2, 4])
def test_mla_decode_mtp_verify(gen: torch.Generator, s_q: int) -> None:
    q, kv, block_table, seq_lens = _case(gen, 16, s_q, heads=8)
    ref = mla_decode_ref(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA)
    # Each verify position sees a different number of keys: the reference must reflect that.
    assert relerr(ref[:, 0], ref[:, -1]) > 1e-2
    # 7 splits: some splits hold only keys the earlier positions may not see.
    # rows_per_program 16: the 8 * s_q rows in one program (s_q = 2) or two (s_q = 4).
    for splits, rpp in ((1, 64), (3, 16), (7, 64)):
        cfg = MlaConfig(splits, 16, rows_per_program=rpp)
        out = mla_decode(q, kv, block_table, seq_lens, SCALE, kv_lora_rank=LORA, config=cfg)
        assert out.shape == ref.shape
        assert relerr(out, ref) < 1e-2, (splits, rpp)


def test_dispatch_follows_the_measured_rules() -> None:
    # One wave of splits with 64-key blocks while the rows fit 32; two splits of 32-key blocks at
    # 4 warps from B = 66; 32-key blocks at 8 warps for the 64-row verify programs.
    assert mla_config(1) == MlaConfig(32, 64, 8)
    assert mla_config(32) == MlaConfig(4, 64, 8)
    assert mla_config(65) == MlaConfig(2, 64, 8)
    assert mla_config(128) == MlaConfig(2, 32, 4)
    assert mla_config(32, s_q=2) == MlaConfig(4, 32, 8)


def test_splits_keep_every_split_inside_one_chunk() -> None:
    # The H200 case that faulted: 257 pages of 16 at one split -> two splits of <= 256 - 4 pages.
    assert single_chunk_splits(1, 257, 256, 64, 16) == 2
    assert single_chunk_splits(4, 257, 256, 64, 16) == 4  # already enough
    assert single_chunk_splits(1, 8192, 256, 64, 16) == 33  # 128K context
    assert single_chunk_splits(1, 100, 128, 16, 16) == 1
