"""CUDA graphs for MTP (NEXTN) steps: the draft chain and the verify + accept + commit, per bucket.

One MTP decode step of B sequences with k drafts each is one input copy, two replays and one
device-to-host copy:

1. **draft** (``draft_body``): the MTP layer over the T = k + 1 positions whose next token became
   known at the previous verify (SGLang's draft-extend; a sequence had ``n`` of them, 1..T, the
   rest of its T rows are padding whose outputs are ignored and whose MTP latents land at positions
   that later steps overwrite before reading), previous hidden gathered on the device from the
   hidden pool by slot; then lm_head + greedy on row ``n - 1``, and k - 1 more single-token MTP
   steps each feeding its own hidden and token to the next. Output: ``drafts[k, bucket]``.
2. **verify** (``verify_body``): the target model over [pending token, k drafts] per sequence (the
   drafts read straight from the draft graph's output buffer), Lightning layers keeping the state
   after every position by batch row (pool untouched), MLA over the paged cache with the T new
   latent rows written; then logits, sampling with the per-row temperature and seed (noise hashed
   from the seed and each position, runner/sampler.py), the accepted count (drafts equal to the
   sampled target token at the position before them, up to the first miss) and the commit of the
   accepted state into each slot (``LingCache.commit_rows``), all on the device. The T target hidden
   rows go to the hidden pool for the next step's draft.
3. The host reads ``result[bucket, 2T]``: sampled tokens [T], drafts [k], accepted count.

Graphs are captured per (batch bucket, block-table width) as the decode graphs
(runner/cuda_graphs.py), reading the step's block table from the runner's ``SlotPages`` by slot.
Padding rows (``n`` real sequences in a bucket of ``b``) use slot -1 (kernels skip it; the hidden
pool's extra last row takes its writes) and the scratch page. Top-k / top-p and logprob rows are not
served here (the runner's eager MTP path samples them on the device). ``eager=True`` runs the bodies
without capturing, on any device (CPU tests compare them with the runner's eager path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ling_runtime.model.batch import ForwardBatch
from ling_runtime.runner.cuda_graphs import (
    SlotPages,
    apply_updates,
    capture_graphs,
    check_graphable,
    graph_buckets,
    graph_widths,
    stage_updates,
)
from ling_runtime.runner.inputs import Segment, StepBuffers
from ling_runtime.runner.sampler import sample_plain


@dataclass
class SpecReadout:
    """Host copy of one verify step: per real sequence."""

    tokens: list[list[int]]  # [n][T] target tokens sampled at every verified position
    drafts: list[list[int]]  # [n][k]
    num_accepted: list[int]  # [n] drafts accepted (0..k); tokens[:num_accepted + 1] are emitted


def spec_segments(b: int, t: int) -> list[Segment]:
    i64, f32 = torch.int64, torch.float32
    return [
        Segment("slots", i64, b),
        Segment("ext_ids", i64, b * t),  # the tokens after the newly known positions
        Segment("ext_start", i64, b),
        Segment("ext_n", i64, b),
        Segment("first", i64, b),  # the pending (last emitted) token
        Segment("start", i64, b),  # its position
        Segment("seeds", i64, b),
        Segment("upd_slot", i64, 3 * b),  # page-table cells that changed (a verify may cross two)
        Segment("upd_col", i64, 3 * b),
        Segment("upd_page", i64, 3 * b),
        Segment("temp", f32, b),
    ]


class SpecGraphs:
    """Draft and verify graphs for ``num_drafts`` = k drafts per sequence, buckets up to
    ``max_batch``. ``max_tokens`` caps bucket x (k + 1) (the grouped MoE kernel takes up to 128
    tokens; a larger bucket is not captured and such steps run eagerly). ``slot_pages``: the
    runner's page table (shared with the decode graphs); left out, the graphs keep their own."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: object,
        device: torch.device,
        max_batch: int,
        max_pages: int,
        scratch_page: int,
        num_drafts: int,
        buckets: list[int] | None = None,
        eager: bool = False,
        max_tokens: int = 128,
        slot_pages: SlotPages | None = None,
        widths: list[int] | None = None,
    ) -> None:
        check_graphable(model, device, eager)
        if getattr(model, "mtp", None) is None:
            raise ValueError("enable_mtp: MTP graphs need the model's MTP layer")
        k = num_drafts
        spec = getattr(cache, "max_spec_tokens", 0)
        if k < 1 or k + 1 > spec:
            raise ValueError(
                f"num_drafts: need 1 <= k and k + 1 <= the cache's max_spec_tokens ({spec}), got {k}"
            )
        self.model, self.cache, self.device = model, cache, device
        self.k, self.t = k, k + 1
        self.eager = eager
        self.max_pages, self.scratch_page = max_pages, scratch_page
        page_size = int(getattr(cache, "page_size", 16))
        self.widths = sorted(widths) if widths else graph_widths(max_pages, page_size)
        wanted = sorted(buckets) if buckets else graph_buckets(max_batch)
        self.buckets = [b for b in wanted if b * self.t <= max_tokens]
        top = max(wanted)
        t, hid = self.t, model.config.hidden_size
        i64 = {"dtype": torch.int64, "device": device}
        num_slots = int(cache.linear_state.shape[1])  # type: ignore[attr-defined]
        self.pages = slot_pages or SlotPages(num_slots, max_pages, scratch_page, device)
        self.buffers = StepBuffers(device)
        self.layouts = self.buffers.layouts({b: spec_segments(b, t) for b in self.buckets})
        self.steps = torch.arange(t, **i64)
        self.ext_pos = torch.zeros(top * t, **i64)
        self.draft_pos = torch.zeros(k, top, **i64)  # positions of draft steps 2..k (row 0 unused)
        self.drafts = torch.zeros(k, top, **i64)  # draft s+1 of every row: also the verify's input
        self.verify_ids = torch.zeros(top * t, **i64)
        self.verify_pos = torch.zeros(top * t, **i64)
        # Target hidden after every verified position, by slot (+1 row: padding slot -1 lands there).
        self.hidden_pool = torch.zeros(num_slots + 1, t, hid, dtype=model.dtype, device=device)
        self.result = torch.zeros(top, 2 * t, **i64)  # [tokens T | drafts k | accepted 1]
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [b * T, V] float32 of the last verify
        self._ext_batch: dict[tuple[int, int], ForwardBatch] = {}
        self._step_batch: dict[tuple[int, int, int], ForwardBatch] = {}
        self._verify_batch: dict[tuple[int, int], ForwardBatch] = {}
        self._draft_graphs: dict[object, torch.cuda.CUDAGraph | None] = {}
        self._verify_graphs: dict[object, torch.cuda.CUDAGraph | None] = {}
        self._width = self.widths[-1]  # of the step being set up (set_sequences / stage)

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(b, w) for b in self.buckets for w in self.widths]

    # ---- static batches (built outside any capture) -----------------------------------------------
    def _batches(self, b: int, w: int) -> None:
        t, k = self.t, self.k
        d = self.layouts[b].dev
        placeholder = self.pages.table[:1, :w].expand(b, w)  # the body gathers the real table
        common = {
            "state_slots": d["slots"], "block_tables": placeholder, "graph_safe": True, "host_slots": [-1] * b,
        }  # fmt: skip
        self._ext_batch[(b, w)] = ForwardBatch(
            input_ids=d["ext_ids"], positions=self.ext_pos[: b * t], seq_lens=[t] * b,
            prefix_lens=[1] * b, **common,
        )  # fmt: skip
        for s in range(1, k):
            self._step_batch[(b, w, s)] = ForwardBatch(
                input_ids=self.drafts[s - 1, :b], positions=self.draft_pos[s, :b], seq_lens=[1] * b,
                prefix_lens=[1] * b, **common,
            )  # fmt: skip
        self._verify_batch[(b, w)] = ForwardBatch(
            input_ids=self.verify_ids[: b * t], positions=self.verify_pos[: b * t], seq_lens=[t] * b,
            prefix_lens=[1] * b, keep_linear_states=True, **common,
        )  # fmt: skip

    # ---- the bodies (device tensors only: no .item(), no host branch on data) ---------------------
    def draft_body(self, b: int, w: int) -> None:
        m, t, hid = self.model, self.t, self.hidden_pool.shape[-1]
        layout = self.layouts[b]
        d = layout.dev
        apply_updates(self.pages, layout)
        slots = d["slots"]
        table = self.pages.table[slots, :w]
        self.ext_pos[: b * t].copy_((d["ext_start"][:, None] + self.steps).view(-1))
        prev = self.hidden_pool[slots].view(b * t, hid)
        ext = self._ext_batch[(b, w)]
        ext.block_tables = table
        h = m.mtp_forward(ext, self.cache, prev).view(b, t, hid)
        rows = torch.arange(b, device=self.device)
        h = h[rows, d["ext_n"] - 1]  # [b, H]: the last known position of each sequence
        self.drafts[0, :b].copy_(sample_plain(m, m.compute_logits(h).float(), None))
        for s in range(1, self.k):
            # Draft s+1: the MTP layer at position start + s - 1 (the pending token's position is
            # ext_start + ext_n) over draft s and its own previous hidden.
            self.draft_pos[s, :b].copy_(d["ext_start"] + d["ext_n"] + (s - 1))
            step = self._step_batch[(b, w, s)]
            step.block_tables = table
            h = m.mtp_forward(step, self.cache, h)
            self.drafts[s, :b].copy_(sample_plain(m, m.compute_logits(h).float(), None))

    def verify_body(self, b: int, w: int) -> None:
        m, t, k = self.model, self.t, self.k
        layout = self.layouts[b]
        d = layout.dev
        apply_updates(self.pages, layout)  # (again: a verify may run without a draft replay)
        slots = d["slots"]
        ids = torch.cat([d["first"][:, None], self.drafts[:, :b].T], dim=1)  # [b, T]
        self.verify_ids[: b * t].copy_(ids.reshape(-1))
        self.verify_pos[: b * t].copy_((d["start"][:, None] + self.steps).view(-1))
        batch = self._verify_batch[(b, w)]
        batch.block_tables = self.pages.table[slots, :w]
        hidden = m(batch, self.cache)  # [b * T, H]
        logits = m.compute_logits(hidden).float()
        temps = d["temp"].repeat_interleave(t)
        tokens = sample_plain(m, logits, temps, d["seeds"], self.verify_pos[: b * t], seed_div=t).view(b, t)
        # Drafts accepted: the leading run of drafts equal to the target token sampled before them.
        accepted = (tokens[:, :k] == ids[:, 1:]).long().cumprod(dim=1).sum(dim=1)
        self.cache.commit_rows(slots, accepted + 1, bool(getattr(m, "use_kernels", False)))  # type: ignore[attr-defined]
        self.hidden_pool[slots] = hidden.view(b, t, -1).to(self.hidden_pool.dtype)
        self.result[:b, :t].copy_(tokens)
        self.result[:b, t : t + k].copy_(ids[:, 1:])
        self.result[:b, 2 * t - 1].copy_(accepted)
        self.logits[b] = logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket's draft and verify graphs (eager: only build the static batches)."""
        for buf in (self.drafts, self.verify_ids, self.verify_pos, self.ext_pos, self.draft_pos):
            buf.zero_()
        for b, w in self.keys:
            self._batches(b, w)
        prep = lambda key: self._stage_padding(key[0])  # noqa: E731
        self._draft_graphs = capture_graphs(self.device, self.keys, self.draft_body, self.eager, prep)
        self._verify_graphs = capture_graphs(self.device, self.keys, self.verify_body, self.eager, prep)

    def _stage_padding(self, b: int) -> None:
        layout = self.layouts[b]
        h = layout.host()
        self._fill(h, [], [], [], [], [], [], [], [])
        stage_updates(h, self.pages, [])
        layout.upload()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- host side ---------------------------------------------------------------------------------
    def bucket_for(self, n: int, widest_table: int) -> int | None:
        if self.width_for(widest_table) is None:
            return None
        return next((b for b in self.buckets if b >= n and (b, self.widths[-1]) in self._verify_graphs), None)

    def width_for(self, widest_table: int) -> int | None:
        return next((w for w in self.widths if w >= widest_table), None)

    def _fill(
        self,
        h: dict,
        slots: Sequence[int],
        next_tokens: Sequence[Sequence[int]],
        ext_starts: Sequence[int],
        first: Sequence[int],
        starts: Sequence[int],
        temperatures: Sequence[float],
        seeds: Sequence[int],
        counts: Sequence[int],
    ) -> None:
        t, n = self.t, len(slots)
        b = len(h["slots"])
        pad = b - n
        h["slots"][:n] = slots
        h["slots"][n:] = -1
        ids = h["ext_ids"].reshape(b, t)
        ids[:] = 0
        for i, x in enumerate(next_tokens):
            ids[i, : len(x)] = x
        h["ext_start"][:n] = ext_starts
        h["ext_n"][:n] = counts
        h["first"][:n] = first
        h["start"][:n] = starts
        h["temp"][:n] = temperatures
        h["seeds"][:n] = seeds
        if pad:
            for name, value in (
                ("ext_start", 0),
                ("ext_n", 1),
                ("first", 0),
                ("start", 0),
                ("temp", 0.0),
                ("seeds", 0),
            ):
                h[name][n:] = value

    def stage(
        self,
        bucket: int,
        slots: list[int],
        cells: list[tuple[int, int, int]],
        widest_table: int,
        next_tokens: list[list[int]],
        ext_starts: list[int],
        first: list[int],
        starts: list[int],
        temperatures: list[float],
        seeds: list[int],
    ) -> int:
        """Fill and upload one MTP step's inputs (one copy); returns the block-table width."""
        width = self.width_for(widest_table)
        if width is None:
            raise ValueError(f"block table of {widest_table} pages: wider than the graphs' {self.max_pages}")
        layout = self.layouts[bucket]
        h = layout.host()
        self._fill(
            h,
            slots,
            next_tokens,
            ext_starts,
            first,
            starts,
            temperatures,
            seeds,
            [len(x) for x in next_tokens],
        )
        stage_updates(h, self.pages, cells)
        layout.upload()
        self._width = width
        return width

    def launch(self, bucket: int) -> torch.Tensor:
        """Replay the staged step's draft and verify: the device result [bucket, 2T] (see the module
        docstring), valid until the next verify."""
        self.replay_draft(bucket)
        self.replay_verify(bucket)
        return self.result[:bucket]

    def readout(self, host: torch.Tensor, n: int) -> SpecReadout:
        rows = host[:n].tolist()
        t, k = self.t, self.k
        return SpecReadout([r[:t] for r in rows], [r[t : t + k] for r in rows], [r[2 * t - 1] for r in rows])

    # ---- step by step (tests and the bench: each call copies its own inputs) -----------------------
    def set_sequences(self, bucket: int, slots: list[int], pages: list[list[int]]) -> None:
        """Slots and block tables of the step's sequences (shared by its draft and verify)."""
        d = self.layouts[bucket].dev
        pad = bucket - len(slots)
        d["slots"].copy_(torch.tensor(slots + [-1] * pad, dtype=torch.int64))
        self.pages.write(
            [c for s, row in zip(slots, pages, strict=True) for c in self.pages.changes(s, row, False)]
        )
        d["upd_slot"].fill_(-1)
        d["upd_col"].zero_()
        d["upd_page"].fill_(self.scratch_page)
        width = self.width_for(max((len(p) for p in pages), default=1))
        if width is None:
            raise ValueError(f"block tables wider than the graphs' {self.max_pages} pages")
        self._width = width

    def load_hidden(self, slot: int, rows: torch.Tensor) -> None:
        """Put target hidden rows from an eager pass into the pool (the draft graph reads it)."""
        self.hidden_pool[slot, : rows.shape[0]] = rows.to(self.hidden_pool.dtype)

    def hidden_rows(self, slot: int, n: int) -> torch.Tensor:
        return self.hidden_pool[slot, :n]

    def draft(self, bucket: int, next_tokens: list[list[int]], starts: list[int]) -> None:
        """Replay the draft graph: sequence i's known next tokens (1..T of them) after position
        ``starts[i]``; the drafts stay on the device (``self.drafts``) for ``verify``."""
        t, pad = self.t, bucket - len(next_tokens)
        d = self.layouts[bucket].dev
        ids = [list(x) + [0] * (t - len(x)) for x in next_tokens] + [[0] * t] * pad
        d["ext_ids"].copy_(torch.tensor(ids, dtype=torch.int64).view(-1))
        d["ext_start"].copy_(torch.tensor(starts + [0] * pad, dtype=torch.int64))
        d["ext_n"].copy_(torch.tensor([len(x) for x in next_tokens] + [1] * pad, dtype=torch.int64))
        self.replay_draft(bucket)

    def set_drafts(self, bucket: int, drafts: list[list[int]]) -> None:
        """Drafts computed elsewhere (the eager MTP path) as the verify's input."""
        rows = drafts + [[0] * self.k] * (bucket - len(drafts))
        self.drafts[:, :bucket].copy_(torch.tensor(rows, dtype=torch.int64).T)

    def verify(
        self,
        bucket: int,
        first: list[int],
        starts: list[int],
        temperatures: list[float] | None = None,
        seeds: list[int] | None = None,
    ) -> SpecReadout:
        """Replay the verify graph over [first[i], drafts of row i] at positions starts[i].. and
        read the step's result (a host synchronisation)."""
        n = len(first)
        pad = bucket - n
        d = self.layouts[bucket].dev
        d["first"].copy_(torch.tensor(first + [0] * pad, dtype=torch.int64))
        d["start"].copy_(torch.tensor(starts + [0] * pad, dtype=torch.int64))
        temps = list(temperatures) if temperatures is not None else [0.0] * n
        d["temp"].copy_(torch.tensor(temps + [0.0] * pad, dtype=torch.float32))
        d["seeds"].copy_(torch.tensor(list(seeds or [0] * n) + [0] * pad, dtype=torch.int64))
        self.replay_verify(bucket)
        return self.readout(self.result[:n].cpu(), n)

    def replay_draft(self, bucket: int) -> None:
        key = (bucket, self._width)
        graph = self._draft_graphs[key]
        self.draft_body(*key) if graph is None else graph.replay()

    def replay_verify(self, bucket: int) -> None:
        key = (bucket, self._width)
        graph = self._verify_graphs[key]
        self.verify_body(*key) if graph is None else graph.replay()
