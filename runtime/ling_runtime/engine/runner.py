"""One rank's model and cache, executing `StepPlan`s: the same code on every tensor-parallel rank.

Per step: roll back linear state after the previous verify (`commit`), zero new slots, run the MTP
layer over positions whose next token became known and draft from it, then one target pass over
the step's tokens (plus drafts). On CUDA a plain decode step's target pass is one CUDA-graph replay
(`enable_cuda_graphs`, engine/cuda_graphs.py); everything else runs eagerly. Every rank computes the same drafts: logits are identical on all
ranks after the collectives, so a greedy draft needs no extra broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ling_runtime.engine.cuda_graphs import DecodeGraphs
from ling_runtime.engine.plan import SeqResult, SeqWork, StepPlan, StepResult
from ling_runtime.model.batch import ForwardBatch


@dataclass
class _Hidden:
    start: int  # absolute position of the first row
    rows: torch.Tensor  # [n, hidden] target hidden states of the last target pass


class ModelRunner:
    def __init__(self, model, cache, device: torch.device, return_logits: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.return_logits = return_logits  # only rank 0 hands logits back
        self._hidden: dict[int, _Hidden] = {}
        self.graphs: DecodeGraphs | None = None
        self.graph_steps = 0  # target passes served by a replay (tests and benchmarks read it)

    def enable_cuda_graphs(
        self, max_batch: int, max_pages: int, scratch_page: int, buckets: list[int] | None = None
    ) -> None:
        """Capture decode graphs for batch buckets up to ``max_batch`` (see ``DecodeGraphs``)."""
        graphs = DecodeGraphs(
            self.model, self.cache, self.device, max_batch, max_pages, scratch_page, buckets
        )
        graphs.capture()
        self.graphs = graphs

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        works = plan.seqs
        commits = [(w.slot, w.commit) for w in works if w.commit]
        if commits:
            self.cache.commit_linear_state([s for s, _ in commits], [n for _, n in commits])
        resets = [w.slot for w in works if w.reset]
        if resets:
            self.cache.reset_slots(resets)
            for slot in resets:
                self._hidden.pop(slot, None)
        drafts = self._draft(works)
        return self._target(works, drafts)

    # ---- MTP: extend over newly known positions, then draft k tokens -----------------------------
    def _draft(self, works: tuple[SeqWork, ...]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in works]
        extend = [i for i, w in enumerate(works) if w.mtp_next_tokens]
        if not extend:
            return drafts
        tokens, prev, prefix, slots, tables = [], [], [], [], []
        for i in extend:
            w = works[i]
            stored = self._hidden[w.slot]
            offset = w.mtp_start - stored.start
            n = len(w.mtp_next_tokens)
            if offset < 0 or offset + n > stored.rows.shape[0]:
                raise RuntimeError(f"slot {w.slot}: no target hidden for MTP positions {w.mtp_start}..+{n}")
            tokens.append(list(w.mtp_next_tokens))
            prev.append(stored.rows[offset : offset + n])
            prefix.append(w.mtp_start)
            slots.append(w.slot)
            tables.append(list(w.pages))
        batch = ForwardBatch.build(tokens, prefix, slots, tables, device=self.device)
        mtp_hidden = self.model.mtp_forward(batch, self.cache, torch.cat(prev))
        last_rows = batch.last_token_indices()
        drafting = [j for j, i in enumerate(extend) if works[i].num_drafts > 0]
        if not drafting:
            return drafts
        hidden = mtp_hidden[last_rows[drafting]]
        current = torch.argmax(self.model.compute_logits(hidden).float(), dim=-1)
        positions = [prefix[j] + len(tokens[j]) for j in drafting]
        owners = [extend[j] for j in drafting]
        steps = works[owners[0]].num_drafts
        for step in range(steps):
            for row, owner in enumerate(owners):
                drafts[owner].append(int(current[row]))
            if step == steps - 1:
                break
            # The MTP layer reuses its own output as the "previous hidden" for the next draft.
            batch = ForwardBatch.build(
                [[int(current[row])] for row in range(len(owners))],
                [p + step for p in positions],
                [works[o].slot for o in owners],
                [list(works[o].pages) for o in owners],
                device=self.device,
            )
            hidden = self.model.mtp_forward(batch, self.cache, hidden)
            current = torch.argmax(self.model.compute_logits(hidden).float(), dim=-1)
        return drafts

    # ---- the target pass --------------------------------------------------------------------------
    def _graph_bucket(self, works: tuple[SeqWork, ...], drafts: list[list[int]]) -> int | None:
        """A captured bucket when this target pass is a plain decode step: one token per sequence,
        no drafts, no new sequence (its slot must be zeroed first, which the eager path does)."""
        if self.graphs is None or not works:
            return None
        if any(len(w.tokens) != 1 or d or w.start == 0 for w, d in zip(works, drafts, strict=True)):
            return None
        return self.graphs.bucket_for(len(works), max(len(w.pages) for w in works))

    def _target(self, works: tuple[SeqWork, ...], drafts: list[list[int]]) -> StepResult:
        bucket = self._graph_bucket(works, drafts)
        if bucket is not None:
            return self._target_graph(works, bucket)
        tokens = [list(w.tokens) + d for w, d in zip(works, drafts, strict=True)]
        verify = any(d for d in drafts)
        batch = ForwardBatch.build(
            tokens,
            [w.start for w in works],
            [w.slot for w in works],
            [list(w.pages) for w in works],
            keep_linear_states=verify,
            device=self.device,
        )
        hidden = self.model.forward(batch, self.cache)
        bounds = batch.cu_seqlens.tolist()
        rows: list[int] = []
        counts: list[int] = []
        keep_hidden = getattr(self.model, "enable_mtp", False)  # only the MTP layer reads it back
        for b, w in enumerate(works):
            if keep_hidden:
                self._hidden[w.slot] = _Hidden(w.start, hidden[bounds[b] : bounds[b + 1]])
            n = min(w.logits, bounds[b + 1] - bounds[b])
            rows.extend(range(bounds[b + 1] - n, bounds[b + 1]))
            counts.append(n)
        logits = self.model.compute_logits(hidden[rows]).float().cpu() if rows else None
        results: list[SeqResult] = []
        at = 0
        for b, n in enumerate(counts):
            part = logits[at : at + n] if (n and self.return_logits and logits is not None) else None
            results.append(SeqResult(part, drafts[b]))
            at += n
        return StepResult(results)

    def _target_graph(self, works: tuple[SeqWork, ...], bucket: int) -> StepResult:
        assert self.graphs is not None
        hidden, logits = self.graphs.replay(
            [w.tokens[0] for w in works],
            [w.start for w in works],
            [w.slot for w in works],
            [list(w.pages) for w in works],
            bucket,
        )
        self.graph_steps += 1
        if getattr(self.model, "enable_mtp", False):
            # Copies: the static outputs are overwritten by the next replay.
            for b, w in enumerate(works):
                self._hidden[w.slot] = _Hidden(w.start, hidden[b : b + 1].clone())
        wanted = [b for b, w in enumerate(works) if w.logits > 0]
        host = logits.cpu() if (wanted and self.return_logits) else None  # the step's one sync
        return StepResult(
            [
                SeqResult(host[b : b + 1] if (host is not None and w.logits > 0) else None, [])
                for b, w in enumerate(works)
            ]
        )
