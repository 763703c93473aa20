"""MLA absorbed split-K decode against the fp32 reference over a paged cache (interpreter, tiny sizes)."""

from __future__ import annotations

import torch
from ling_runtime.kernels.mla import mla_decode, mla_decode_ref

from tests.kernels.util import relerr


def test_mla_decode_paged_split_k(gen: torch.Generator) -> None:
    heads, lora, rope, page = 4, 32, 16, 16
    seq_lens = torch.tensor([1, 37, 50], dtype=torch.int32)  # one token, partial pages, empty splits
    n_pages = 12
    kv = torch.randn(n_pages, page, lora + rope, generator=gen).bfloat16()
    # Pages handed out in a scrambled order, as a cache manager would after churn.
    block_table = torch.randperm(n_pages, generator=gen)[:12].view(3, 4).to(torch.int32)
    q = torch.randn(3, heads, lora + rope, generator=gen).bfloat16()
    scale = (128 + 64) ** -0.5
    ref = mla_decode_ref(q, kv, block_table, seq_lens, scale, kv_lora_rank=lora)
    for splits in (1, 3):
        out = mla_decode(
            q, kv, block_table, seq_lens, scale, kv_lora_rank=lora, num_splits=splits, block_n=16
        )
        assert relerr(out, ref) < 1e-2, splits
    # Defaults (32 splits here): most splits are empty and must carry zero weight in the merge.
    assert relerr(mla_decode(q, kv, block_table, seq_lens, scale, kv_lora_rank=lora), ref) < 1e-2
    # Tokens past seq_len are ignored: poisoning them changes nothing.
    kv_poison = kv.clone()
    kv_poison[block_table[1, 2], 37 - 32 :] = float("nan")
    out = mla_decode(q, kv_poison, block_table, seq_lens, scale, kv_lora_rank=lora, num_splits=3, block_n=16)
    assert relerr(out, ref) < 1e-2
