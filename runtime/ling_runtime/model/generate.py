"""A plain greedy generator over the model API: the oracle the engine is tested against.

Every step batches all live sequences: a sequence still in its prompt contributes its next chunk of
up to ``prefill_chunk`` tokens, one past its prompt contributes its last sampled token. So a batch
mixes prefill chunks and decode steps exactly as a continuous-batching scheduler would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ling_runtime.model.batch import ForwardBatch
from ling_runtime.model.ling import LingForCausalLM


def greedy_generate(
    model: LingForCausalLM,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    prefill_chunk: int = 32,
    page_size: int = 16,
    stop_token_ids: Sequence[int] = (),
) -> list[int] | list[list[int]]:
    """Greedy continuation(s) of ``prompt_ids`` (one list of ids, or a list of them).

    Returns the new tokens only (a list per prompt when given several); a sequence stops after
    ``max_new_tokens`` or after emitting one of ``stop_token_ids`` (which is included).
    """
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], int)
    prompts: list[list[int]] = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]  # type: ignore[arg-type]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    if max_new_tokens < 1 or prefill_chunk < 1:
        raise ValueError("max_new_tokens/prefill_chunk: must be >= 1")
    n = len(prompts)
    pages_per_seq = -(-(max(len(p) for p in prompts) + max_new_tokens) // page_size)
    cache = model.make_cache(num_slots=n, num_pages=n * pages_per_seq, page_size=page_size)
    tables = torch.arange(n * pages_per_seq, dtype=torch.int64).view(n, pages_per_seq)
    done_tokens = [0] * n  # tokens already in the cache per sequence
    outputs: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    stops = set(stop_token_ids)
    while not all(finished):
        live = [b for b in range(n) if not finished[b]]
        chunks = []
        for b in live:
            if done_tokens[b] < len(prompts[b]):
                chunks.append(prompts[b][done_tokens[b] : done_tokens[b] + prefill_chunk])
            else:
                chunks.append([outputs[b][-1]])
        batch = ForwardBatch.build(
            chunks, [done_tokens[b] for b in live], live, tables[live], device=model.device
        )
        hidden = model(batch, cache)
        logits = model.compute_logits(hidden[batch.last_token_indices()])
        next_ids = logits.argmax(-1).tolist()
        for b, chunk, tok in zip(live, chunks, next_ids, strict=True):
            done_tokens[b] += len(chunk)
            if done_tokens[b] < len(prompts[b]):
                continue  # mid-prompt chunk: its logits are not a new token
            outputs[b].append(int(tok))
            if len(outputs[b]) >= max_new_tokens or tok in stops:
                finished[b] = True
    return outputs[0] if single else outputs
