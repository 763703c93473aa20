"""One rank's model and cache, executing `StepPlan`s: the same code on every tensor-parallel rank.

Per step: load prefix-cache snapshots into resumed slots (`restore`), copy snapshots out of the
previous verify's per-position states (`commit_snapshots`), roll back linear state after that
verify (`commit`), zero new slots, run the MTP layer over positions whose next token became known
and draft from it, then one target pass over the step's tokens (plus drafts), saving snapshots
mid-row inside the Lightning layers and at row ends from the slots afterwards. On CUDA
(`enable_cuda_graphs`) a plain decode step is one replay that also samples (runner/cuda_graphs.py),
and an MTP decode step is a draft replay plus a verify replay that samples, accepts and commits the
linear state on the device (runner/spec_graphs.py); prefill, mixed and oversize steps run eagerly.

`launch(plan)` enqueues the step and returns a `PendingStep` without waiting for the device: its
sampled tokens (and logprobs, and the logits of rows the engine samples itself) come back in one
non-blocking copy that `PendingStep.result()` waits for. Sampling happens on the device for every
sequence whose plan says how (`SeqWork.sampling`, runner/sampler.py), in graphs and eager steps
alike, and each slot's last sampled token stays on the device (`next_tokens`), where the next step
finds it when the engine sends `FUTURE_TOKEN` (the overlap scheduler: step n+1 is launched before
step n's tokens reach the host). On CPU everything runs at `launch`. `execute` = launch + result.

Every rank computes the same tokens and drafts: logits are identical on all ranks after the
collectives and the sampling noise is a hash of (seed, position), so no rank needs another's draw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ling_runtime.model.batch import ForwardBatch
from ling_runtime.runner.cuda_graphs import DecodeGraphs, SlotPages
from ling_runtime.runner.inputs import HostCopy, pinned, to_device
from ling_runtime.runner.plan import FUTURE_TOKEN, GREEDY, Logprob, SeqResult, SeqWork, StepPlan, StepResult
from ling_runtime.runner.sampler import logprobs, sample_filtered, sample_plain
from ling_runtime.runner.spec_graphs import SpecGraphs

# `_device_commits` value of a graphed verify whose accepted count has not reached the host (ranks
# other than 0 never read it): the commit was done on the device; only the count is unknown.
_UNREAD = -1


@dataclass
class _Hidden:
    start: int  # absolute position of the first row
    rows: torch.Tensor | None  # [n, hidden] of the last target pass; None: in the MTP graphs' pool


class PendingStep:
    """A launched step. `result()` waits for its one device-to-host copy and returns the
    `StepResult`; `done` holds a result that needed no copy (CPU steps are done at launch too)."""

    def __init__(
        self,
        copy: HostCopy | None = None,
        finish: Callable[[list[torch.Tensor]], StepResult] | None = None,
        done: StepResult | None = None,
    ) -> None:
        self._copy = copy
        self._finish = finish
        self._result = done

    def result(self) -> StepResult:
        if self._result is None:
            assert self._copy is not None and self._finish is not None
            self._result = self._finish(self._copy.wait())
            self._copy = None
        return self._result


def _logprob_rows(chosen: list[float], ids: list[list[int]], values: list[list[float]]) -> list[Logprob]:
    return [(c, tuple(zip(i, v, strict=True))) for c, i, v in zip(chosen, ids, values, strict=True)]


class ModelRunner:
    def __init__(self, model, cache, device: torch.device, return_logits: bool = True) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.return_logits = return_logits  # only rank 0 hands results back
        self._hidden: dict[int, _Hidden] = {}
        self.graphs: DecodeGraphs | None = None
        self.spec_graphs: SpecGraphs | None = None
        self.slot_pages: SlotPages | None = None  # the graphs' device page table (with graphs only)
        self.graph_steps = 0  # target passes served by a replay (tests and benchmarks read it)
        self.spec_graph_steps = 0  # MTP steps served by the draft + verify replays
        # slot -> tokens the last graphed verify committed on the device (the plan's commit repeats it)
        self._device_commits: dict[int, int] = {}
        # slot -> its batch row in the last graphed verify (where its per-position states are kept)
        self._device_rows: dict[int, int] = {}
        # Each slot's last token sampled on the device (+1 row: padding slot -1): FUTURE_TOKEN's value.
        num_slots = int(cache.linear_state.shape[1])
        self.next_tokens = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)

    def enable_cuda_graphs(
        self,
        max_batch: int,
        max_pages: int,
        scratch_page: int,
        buckets: list[int] | None = None,
        num_drafts: int = 0,
        eager: bool = False,
        widths: list[int] | None = None,
    ) -> None:
        """Capture decode graphs for batch buckets up to ``max_batch`` and block-table widths up to
        ``max_pages`` (see ``DecodeGraphs``) and, with ``num_drafts`` = k > 0 and an MTP model, the
        MTP draft/verify graphs for k drafts (``SpecGraphs``; the cache needs ``max_spec_tokens >=
        k + 1``). ``eager``: build the same bodies without capturing (CPU tests)."""
        num_slots = int(self.cache.linear_state.shape[1])
        self.slot_pages = SlotPages(num_slots, max_pages, scratch_page, self.device)
        graphs = DecodeGraphs(
            self.model, self.cache, self.device, max_batch, max_pages, scratch_page, buckets, eager=eager,
            slot_pages=self.slot_pages, next_tokens=self.next_tokens, widths=widths,
        )  # fmt: skip
        graphs.capture()
        self.graphs = graphs
        if num_drafts > 0 and getattr(self.model, "mtp", None) is not None:
            spec = SpecGraphs(
                self.model, self.cache, self.device, max_batch, max_pages, scratch_page, num_drafts,
                buckets, eager=eager, slot_pages=self.slot_pages, widths=widths,
            )  # fmt: skip
            spec.capture()
            self.spec_graphs = spec

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> PendingStep:
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
            elif done != _UNREAD and done != w.commit:
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
        cells: list[tuple[int, int, int]] = []
        if self.slot_pages is not None:
            for w in works:
                cells += self.slot_pages.changes(w.slot, w.pages, w.reset or w.restore is not None)
        bucket = self._spec_bucket(works)
        if bucket is not None:
            pending = self._spec_graph_step(works, bucket, cells)
        else:
            drafts = self._draft(works)
            graph_bucket = self._graph_bucket(works, drafts)
            if graph_bucket is not None:
                pending = self._target_graph(works, graph_bucket, cells)
            else:
                if self.slot_pages is not None:
                    self.slot_pages.write(cells)
                pending = self._launch_target(works, drafts)
        # Snapshots at row ends: the slot's state after the step (verify rows never ask for one).
        ends = [(w.slot, sid) for w in works for n, sid in w.snapshots if n == len(w.tokens)]
        if ends:
            dev = self.device
            self.cache.save_snapshots(
                pinned([s for s, _ in ends], torch.int64, dev), pinned([i for _, i in ends], torch.int64, dev)
            )
        return pending

    @staticmethod
    def _device_sampling(w: SeqWork) -> bool:
        """Whether this sequence's tokens are sampled on the device (its plan says how)."""
        return w.sampling is not None

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
        k drafts, 1..k+1 newly known positions right before it, plain device sampling (no top-k /
        top-p, no logprobs), a stored hidden."""
        spec = self.spec_graphs
        if spec is None or not works:
            return None
        for w in works:
            n = len(w.mtp_next_tokens)
            if len(w.tokens) != 1 or w.start == 0 or w.reset or w.num_drafts != spec.k:
                return None
            if not 1 <= n <= spec.t or w.mtp_start + n != w.start or w.sampling is None:
                return None
            if w.sampling.filtered or w.sampling.logprobs >= 0 or w.tokens[0] == FUTURE_TOKEN:
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

    def _spec_graph_step(
        self, works: tuple[SeqWork, ...], bucket: int, cells: list[tuple[int, int, int]]
    ) -> PendingStep:
        spec = self.spec_graphs
        assert spec is not None
        for w in works:
            stored = self._hidden[w.slot]
            if stored.rows is not None:  # the last target pass was eager (a prefill chunk, a verify)
                spec.load_hidden(w.slot, self._stored_rows(w.slot, w.mtp_start, len(w.mtp_next_tokens)))
        rows = [w.sampling or GREEDY for w in works]
        spec.stage(
            bucket,
            [w.slot for w in works],
            cells,
            max(len(w.pages) for w in works),
            [list(w.mtp_next_tokens) for w in works],
            [w.mtp_start for w in works],
            [w.tokens[0] for w in works],
            [w.start for w in works],
            [r.temperature for r in rows],
            [r.seed for r in rows],
        )
        result = spec.launch(bucket)
        self.spec_graph_steps += 1
        for i, w in enumerate(works):
            self._hidden[w.slot] = _Hidden(w.start, None)
            self._device_commits[w.slot] = _UNREAD
            self._device_rows[w.slot] = i
        n = len(works)
        if not self.return_logits:
            return PendingStep(done=StepResult([SeqResult(None) for _ in works]))

        def finish(host: list[torch.Tensor]) -> StepResult:
            out = spec.readout(host[0], n)
            for i, w in enumerate(works):
                if self._device_commits.get(w.slot) == _UNREAD:
                    self._device_commits[w.slot] = out.num_accepted[i] + 1
            return StepResult(
                [SeqResult(None, out.drafts[i], out.tokens[i], out.num_accepted[i]) for i in range(n)]
            )

        return PendingStep(HostCopy([result[:n]]), finish)

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
            chosen = current.tolist()
            for row, owner in enumerate(owners):
                drafts[owner].append(int(chosen[row]))
            if step == steps - 1:
                break
            # The MTP layer reuses its own output as the "previous hidden" for the next draft.
            batch = ForwardBatch.build(
                [[int(chosen[row])] for row in range(len(owners))],
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

    def _resolve_futures(self, batch: ForwardBatch, tokens: list[list[int]], slots: list[int]) -> None:
        """Replace FUTURE_TOKEN ids in an eager batch by their slot's last device-sampled token."""
        flat, owners = [], []
        for b, row in enumerate(tokens):
            for j, t in enumerate(row):
                if t == FUTURE_TOKEN:
                    flat.append(batch.offsets[b] + j)
                    owners.append(slots[b])
        if flat:
            idx = to_device(flat, torch.int64, self.device)
            batch.input_ids[idx] = self.next_tokens[to_device(owners, torch.int64, self.device)]

    def _target(self, works: tuple[SeqWork, ...], drafts: list[list[int]]) -> StepResult:
        """The eager target pass, waited for (tests compare it with the graph bodies)."""
        return self._launch_target(works, drafts).result()

    def _launch_target(self, works: tuple[SeqWork, ...], drafts: list[list[int]]) -> PendingStep:
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
        self._resolve_futures(batch, tokens, [w.slot for w in works])
        hidden = self.model.forward(batch, self.cache)
        bounds = batch.offsets
        rows: list[int] = []
        counts: list[int] = []
        keep_hidden = getattr(self.model, "enable_mtp", False)  # only the MTP layer reads it back
        for b, w in enumerate(works):
            if keep_hidden:
                self._hidden[w.slot] = _Hidden(w.start, hidden[bounds[b] : bounds[b + 1]])
            n = min(w.logits, bounds[b + 1] - bounds[b])
            rows.extend(range(bounds[b + 1] - n, bounds[b + 1]))
            counts.append(n)
        if not rows:
            return PendingStep(done=StepResult([SeqResult(None, d) for d in drafts]))
        logits = self.model.compute_logits(hidden[rows]).float()
        return self._sample_eager(works, drafts, counts, logits)

    def _sample_eager(
        self, works: tuple[SeqWork, ...], drafts: list[list[int]], counts: list[int], logits: torch.Tensor
    ) -> PendingStep:
        """Device sampling of an eager pass's returned rows (``counts[b]`` last rows of sequence b),
        logits to the host for the rows the engine samples; one copy back."""
        samplings, positions, last_rows, last_slots, host_rows = [], [], [], [], []
        at = 0
        for b, (w, n) in enumerate(zip(works, counts, strict=True)):
            length = len(w.tokens) + len(drafts[b])
            for j in range(n):
                samplings.append(w.sampling or GREEDY)
                positions.append(w.start + length - n + j)  # the position each row's logits are at
            if n and w.sampling is not None:
                last_rows.append(at + n - 1)
                last_slots.append(w.slot)
            if n and w.sampling is None:
                host_rows.extend(range(at, at + n))
            at += n
        dev = self.device

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, dev)

        filtered = [i for i, s in enumerate(samplings) if s.filtered]
        if all(s.temperature == 0.0 for s in samplings):
            sampled = sample_plain(self.model, logits, None)  # all greedy: no noise to draw
        else:
            temps = column([s.temperature for s in samplings], torch.float32)
            seeds = column([s.seed for s in samplings], torch.int64)
            pos = column(positions, torch.int64)
            sampled = sample_plain(self.model, logits, temps, seeds, pos)
        if filtered:  # (only rows with a temperature filter)
            f = column(filtered, torch.int64)
            sampled[f] = sample_filtered(
                logits[f], temps[f], column([samplings[i].top_k for i in filtered], torch.int64),
                column([samplings[i].top_p for i in filtered], torch.float32), seeds[f], pos[f],
            )  # fmt: skip
        if last_rows:
            # What FUTURE_TOKEN stands for in this slot's next step.
            self.next_tokens[column(last_slots, torch.int64)] = sampled[column(last_rows, torch.int64)]
        if not self.return_logits:
            return PendingStep(done=StepResult([SeqResult(None, d) for d in drafts]))
        lp_rows = [i for i, s in enumerate(samplings) if s.logprobs >= 0]
        tensors = [sampled]
        if lp_rows:
            top = max(samplings[i].logprobs for i in lp_rows)
            lr = column(lp_rows, torch.int64)
            tensors.extend(logprobs(logits[lr], sampled[lr], top))
        if host_rows:
            tensors.append(logits[column(host_rows, torch.int64)])

        def finish(host: list[torch.Tensor]) -> StepResult:
            ids = host[0].tolist()
            lp: dict[int, Logprob] = {}
            if lp_rows:
                rows = _logprob_rows(host[1].tolist(), host[2].tolist(), host[3].tolist())
                lp = {r: (rows[i][0], rows[i][1][: samplings[r].logprobs]) for i, r in enumerate(lp_rows)}
            host_logits = host[-1] if host_rows else None
            results, at, hat = [], 0, 0
            for b, (w, n) in enumerate(zip(works, counts, strict=True)):
                if n == 0:
                    results.append(SeqResult(None, drafts[b]))
                elif w.sampling is None:
                    assert host_logits is not None
                    results.append(SeqResult(host_logits[hat : hat + n], drafts[b]))
                    hat += n
                else:
                    wanted = w.sampling.logprobs >= 0
                    results.append(
                        SeqResult(
                            None, drafts[b], ids[at : at + n], None,
                            [lp[r] for r in range(at, at + n)] if wanted else None,
                        )
                    )  # fmt: skip
                at += n
            return StepResult(results)

        return PendingStep(HostCopy(tensors), finish)

    def _target_graph(
        self, works: tuple[SeqWork, ...], bucket: int, cells: list[tuple[int, int, int]]
    ) -> PendingStep:
        graphs = self.graphs
        assert graphs is not None
        staged = graphs.stage(
            bucket,
            [w.tokens[0] for w in works],
            [w.start for w in works],
            [w.slot for w in works],
            cells,
            [w.sampling for w in works],
            max(len(w.pages) for w in works),
        )
        hidden, logits, sampled = graphs.launch(staged)
        lp = graphs.finish(staged, logits, sampled, self.return_logits)
        self.graph_steps += 1
        if getattr(self.model, "enable_mtp", False):
            # Copies: the static outputs are overwritten by the next replay.
            for b, w in enumerate(works):
                self._hidden[w.slot] = _Hidden(w.start, hidden[b : b + 1].clone())
        if not self.return_logits:
            return PendingStep(done=StepResult([SeqResult(None) for _ in works]))
        host_rows = [b for b, w in enumerate(works) if w.sampling is None and w.logits > 0]
        tensors = [sampled]
        if lp is not None:
            tensors.extend(lp)
        if host_rows:
            tensors.append(logits[to_device(host_rows, torch.int64, self.device)])
        lp_rows = staged.logprob_rows

        def finish(host: list[torch.Tensor]) -> StepResult:
            ids = host[0].tolist()
            lps: dict[int, Logprob] = {}
            if lp_rows:
                rows = _logprob_rows(host[1].tolist(), host[2].tolist(), host[3].tolist())
                for i, r in enumerate(lp_rows):
                    top = works[r].sampling.logprobs  # type: ignore[union-attr]
                    lps[r] = (rows[i][0], rows[i][1][:top])
            host_logits = host[-1] if host_rows else None
            results = []
            for b, w in enumerate(works):
                if w.sampling is None:
                    part = None
                    if host_logits is not None and b in host_rows:
                        i = host_rows.index(b)
                        part = host_logits[i : i + 1]
                    results.append(SeqResult(part, []))
                else:
                    results.append(SeqResult(None, [], [ids[b]], None, [lps[b]] if b in lps else None))
            return StepResult(results)

        return PendingStep(HostCopy(tensors), finish)
