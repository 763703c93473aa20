"""One rank's model and cache, executing `StepPlan`s: the same code on every tensor-parallel rank.

Per step: load prefix-cache snapshots into resumed slots (`restore`), copy snapshots out of the
previous verify's per-position states (`commit_snapshots`), roll back linear state after that
verify (`commit`), zero new slots, run the MTP layer over positions whose next token became known
and draft from it, then one target pass over the step's tokens (plus drafts), saving snapshots
mid-row inside the Lightning layers and at row ends from the slots afterwards. On CUDA (`enable_cuda_graphs`) a plain decode step is one replay
that also samples (runner/cuda_graphs.py), and an MTP decode step is a draft replay plus a verify
replay that samples, accepts and commits the linear state on the device (runner/spec_graphs.py),
then one host read; prefill, mixed and oversize steps run eagerly. Every rank computes the same
drafts: logits are identical on all ranks after the collectives, so a greedy draft needs no extra
broadcast (device temperature sampling is only used at TP 1, where no other rank must agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ling_runtime.model.batch import ForwardBatch
from ling_runtime.runner.cuda_graphs import DecodeGraphs
from ling_runtime.runner.plan import SeqResult, SeqWork, StepPlan, StepResult
from ling_runtime.runner.spec_graphs import SpecGraphs


@dataclass
class _Hidden:
    start: int  # absolute position of the first row
    rows: torch.Tensor | None  # [n, hidden] of the last target pass; None: in the MTP graphs' pool


class ModelRunner:
    def __init__(self, model, cache, device: torch.device, return_logits: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.return_logits = return_logits  # only rank 0 hands logits back
        self._hidden: dict[int, _Hidden] = {}
        self.graphs: DecodeGraphs | None = None
        self.spec_graphs: SpecGraphs | None = None
        self.graph_steps = 0  # target passes served by a replay (tests and benchmarks read it)
        self.spec_graph_steps = 0  # MTP steps served by the draft + verify replays
        # slot -> tokens the last graphed verify committed on the device (the plan's commit repeats it)
        self._device_commits: dict[int, int] = {}
        # slot -> its batch row in the last graphed verify (where its per-position states are kept)
        self._device_rows: dict[int, int] = {}

    def enable_cuda_graphs(
        self,
        max_batch: int,
        max_pages: int,
        scratch_page: int,
        buckets: list[int] | None = None,
        num_drafts: int = 0,
        eager: bool = False,
    ) -> None:
        """Capture decode graphs for batch buckets up to ``max_batch`` (see ``DecodeGraphs``) and,
        with ``num_drafts`` = k > 0 and an MTP model, the MTP draft/verify graphs for k drafts
        (``SpecGraphs``; the cache needs ``max_spec_tokens >= k + 1``). ``eager``: build the same
        bodies without capturing (CPU tests)."""
        graphs = DecodeGraphs(
            self.model, self.cache, self.device, max_batch, max_pages, scratch_page, buckets, eager=eager
        )
        graphs.capture()
        self.graphs = graphs
        if num_drafts > 0 and getattr(self.model, "mtp", None) is not None:
            spec = SpecGraphs(
                self.model, self.cache, self.device, max_batch, max_pages, scratch_page, num_drafts,
                buckets, eager=eager,
            )  # fmt: skip
            spec.capture()
            self.spec_graphs = spec

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        works = plan.seqs
        # Restores first: this step may write the snapshot buffers they read (after an eviction).
        restores = [w for w in works if w.restore is not None]
        if restores:
            self.cache.restore_snapshots([w.slot for w in restores], [int(w.restore) for w in restores])  # type: ignore[arg-type]
            for w in restores:
                self._hidden.pop(w.slot, None)
        commits = []
        kept: tuple[list[int], list[int], list[int]] = ([], [], [])  # verify rows, counts, snapshot ids
        for w in works:
            done = self._device_commits.pop(w.slot, None)
            row = self._device_rows.pop(w.slot, None)
            for j, sid in w.commit_snapshots:
                kept[0].append(w.slot if row is None else row)
                kept[1].append(j)
                kept[2].append(sid)
            if not w.commit:
                continue
            if done is None:
                commits.append((w.slot, w.commit))
            elif done != w.commit:
                # The graphed verify kept its per-position states by batch row, not by slot: a
                # different count cannot be rolled back to. The engine emits what the device
                # accepted (or finishes the sequence), so this is a bug, not a condition.
                raise RuntimeError(f"slot {w.slot}: commit {w.commit}, but the device committed {done}")
        if kept[2]:
            self.cache.save_verify_snapshots(*kept)
        if commits:
            self.cache.commit_linear_state([s for s, _ in commits], [n for _, n in commits])
        resets = [w.slot for w in works if w.reset]
        if resets:
            self.cache.reset_slots(resets)
            for slot in resets:
                self._hidden.pop(slot, None)
        bucket = self._spec_bucket(works)
        if bucket is not None:
            result = self._spec_graph_step(works, bucket)
        else:
            result = self._target(works, self._draft(works))
        # Snapshots at row ends: the slot's state after the step (verify rows never ask for one).
        ends = [(w.slot, sid) for w in works for n, sid in w.snapshots if n == len(w.tokens)]
        if ends:
            self.cache.save_snapshots([s for s, _ in ends], [i for _, i in ends])
        return result

    def _device_sampling(self, w: SeqWork) -> bool:
        """Whether this sequence's tokens may be sampled on the device: greedy always; temperature
        only at TP 1 (each rank draws its own noise; at TP > 1 they would disagree)."""
        if w.temperature is None:
            return False
        return w.temperature == 0.0 or self.model.tp.size == 1

    def _stored_rows(self, slot: int, start: int, n: int) -> torch.Tensor:
        stored = self._hidden[slot]
        rows = stored.rows
        if rows is None:
            assert self.spec_graphs is not None
            rows = self.spec_graphs.hidden_rows(slot, self.spec_graphs.t)
        offset = start - stored.start
        if offset < 0 or offset + n > rows.shape[0]:
            raise RuntimeError(f"slot {slot}: no target hidden for MTP positions {start}..+{n}")
        return rows[offset : offset + n]

    # ---- MTP decode step in graphs: draft replay, verify replay, one read -------------------------
    def _spec_bucket(self, works: tuple[SeqWork, ...]) -> int | None:
        """A captured bucket when the step is all MTP decodes the graphs can take: one pending token,
        k drafts, 1..k+1 newly known positions right before it, device sampling, a stored hidden."""
        spec = self.spec_graphs
        if spec is None or not works:
            return None
        for w in works:
            n = len(w.mtp_next_tokens)
            if len(w.tokens) != 1 or w.start == 0 or w.reset or w.num_drafts != spec.k:
                return None
            if not 1 <= n <= spec.t or w.mtp_start + n != w.start or not self._device_sampling(w):
                return None
            stored = self._hidden.get(w.slot)
            if stored is None:
                return None
            if stored.rows is None and stored.start != w.mtp_start:
                return None
            if stored.rows is not None:
                offset = w.mtp_start - stored.start
                if offset < 0 or offset + n > stored.rows.shape[0]:
                    return None
        return spec.bucket_for(len(works), max(len(w.pages) for w in works))

    def _spec_graph_step(self, works: tuple[SeqWork, ...], bucket: int) -> StepResult:
        spec = self.spec_graphs
        assert spec is not None
        for w in works:
            stored = self._hidden[w.slot]
            if stored.rows is not None:  # the last target pass was eager (a prefill chunk, a verify)
                spec.load_hidden(w.slot, self._stored_rows(w.slot, w.mtp_start, len(w.mtp_next_tokens)))
        spec.set_sequences(bucket, [w.slot for w in works], [list(w.pages) for w in works])
        spec.draft(bucket, [list(w.mtp_next_tokens) for w in works], [w.mtp_start for w in works])
        out = spec.verify(
            bucket,
            [w.tokens[0] for w in works],
            [w.start for w in works],
            [float(w.temperature or 0.0) for w in works],
        )
        self.spec_graph_steps += 1
        results = []
        for i, w in enumerate(works):
            self._hidden[w.slot] = _Hidden(w.start, None)
            self._device_commits[w.slot] = out.num_accepted[i] + 1
            self._device_rows[w.slot] = i
            results.append(SeqResult(None, out.drafts[i], out.tokens[i], out.num_accepted[i]))
        return StepResult(results)

    # ---- MTP: extend over newly known positions, then draft k tokens -----------------------------
    def _draft(self, works: tuple[SeqWork, ...]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in works]
        extend = [i for i, w in enumerate(works) if w.mtp_next_tokens]
        if not extend:
            return drafts
        tokens, prev, prefix, slots, tables = [], [], [], [], []
        for i in extend:
            w = works[i]
            tokens.append(list(w.mtp_next_tokens))
            prev.append(self._stored_rows(w.slot, w.mtp_start, len(w.mtp_next_tokens)))
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
            snapshots=[
                (b, n, sid) for b, w in enumerate(works) for n, sid in w.snapshots if n < len(w.tokens)
            ],
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
        on_device = [self._device_sampling(w) for w in works]
        hidden, logits, sampled = self.graphs.replay(
            [w.tokens[0] for w in works],
            [w.start for w in works],
            [w.slot for w in works],
            [list(w.pages) for w in works],
            bucket,
            [float(w.temperature or 0.0) if d else 0.0 for w, d in zip(works, on_device, strict=True)],
        )
        self.graph_steps += 1
        if getattr(self.model, "enable_mtp", False):
            # Copies: the static outputs are overwritten by the next replay.
            for b, w in enumerate(works):
                self._hidden[w.slot] = _Hidden(w.start, hidden[b : b + 1].clone())
        # Logits go to the host only for rows sampled there; token ids are read for the rest
        # (one read each, the step's synchronisation).
        wanted = [b for b, w in enumerate(works) if w.logits > 0 and not on_device[b]]
        host = logits.cpu() if (wanted and self.return_logits) else None
        ids = sampled.cpu().tolist() if any(on_device) else []
        return StepResult(
            [
                SeqResult(
                    host[b : b + 1] if (host is not None and b in wanted) else None,
                    [],
                    [ids[b]] if on_device[b] else None,
                )
                for b, w in enumerate(works)
            ]
        )
