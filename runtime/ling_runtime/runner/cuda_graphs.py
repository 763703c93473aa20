"""CUDA graphs for decode steps: one capture per (batch bucket, block-table width), one replay per step.

A decode step (every sequence one token, no drafts, none new) is captured once per batch-size
bucket the scheduler produces (1, 2, 4, ..., --cuda-graph-max-bs) and per block-table *width*
bucket (`graph_widths`: 4K, 16K, 64K tokens, then the context), so the MLA decode's split count and
table follow the batch's real context, not the configured maximum (a 131072-token context is 8193
pages at page 16: 33 splits at every batch if the table always had that width).

Inputs go in one host-to-device copy (runner/inputs.py): token ids, positions, state slots and the
per-row sampling parameters (temperature, seed, top-k, top-p, which rows filter or want logprobs),
plus the few page-table cells that changed. Block tables are not sent per step: `SlotPages` keeps
every state slot's pages on the device, updated from the plans, and the graph gathers the step's
table by slot. A step of ``n`` sequences fills the first ``n`` rows of the smallest bucket ``>= n``;
padding rows use slot ``-1`` (the Lightning decode kernel skips it; its page row is all scratch, so
a padding row's MLA latent write lands on a page no sequence owns).

A token id may be the engine's `FUTURE_TOKEN`: the graph takes that row's token from ``next_tokens``
(by slot), where the previous step's sampling left it on the device. Every replay stores its own
sampled tokens there, so the overlap scheduler can launch step n+1 before step n reaches the host.

The replay samples too (runner/sampler.py: greedy, or temperature with noise hashed from the row's
seed and position), so a step hands back token ids; top-k / top-p rows and logprobs are computed
from the replay's logits right after it, on the device (``DecodeGraphs.finish``). Everything inside
the graph is the model's Triton path, which reads lengths from device tensors only.

``eager=True`` runs the same bodies without capturing (any device): the CPU tests compare them with
the runner's eager path, since a capture needs a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ling_runtime.model.batch import ForwardBatch
from ling_runtime.runner.inputs import Layout, Segment, StepBuffers, to_device
from ling_runtime.runner.plan import GREEDY, RowSampling
from ling_runtime.runner.sampler import logprobs, sample_filtered, sample_plain

# Block-table width buckets, in tokens (then the full context): the MLA decode's splits follow these.
WIDTH_TOKENS = (4096, 16384, 65536)


def graph_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself (SGLang-style decode buckets)."""
    if max_batch < 1:
        raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


def graph_widths(max_pages: int, page_size: int) -> list[int]:
    """Block-table widths (pages) to capture: `WIDTH_TOKENS` where they are at most half the widest
    table (a width close to the maximum saves little), then ``max_pages``."""
    out = sorted({-(-t // page_size) for t in WIDTH_TOKENS if 2 * -(-t // page_size) <= max_pages})
    return [*out, max_pages]


def check_graphable(model: torch.nn.Module, device: torch.device, eager: bool) -> None:
    """Refuse what a capture cannot serve (``eager`` runs the bodies anywhere, for CPU tests)."""
    if device.type != "cuda" and not eager:
        raise ValueError(f"CUDA graphs need a cuda device, got {device}")
    if not getattr(model, "use_kernels", False) and not eager:
        # The plain-torch decode reads host-side lengths, which a replay would not update.
        raise ValueError("CUDA graphs need the model's Triton path (use_kernels=True)")


def capture_graphs(
    device: torch.device,
    keys: list,
    body: Callable[..., object],
    eager: bool,
    prepare: Callable[[object], None] | None = None,
) -> dict[object, torch.cuda.CUDAGraph | None]:
    """Capture ``body(key)`` (``body(*key)`` for tuple keys) once per key, largest first, one shared
    memory pool, after two eager warm-up calls that compile the Triton kernels for the shape.
    ``prepare(key)`` runs first, outside the capture (staging padding inputs: a copy inside a capture
    would be recorded). ``eager``: capture nothing (None)."""

    def call(key: object) -> object:
        return body(*key) if isinstance(key, tuple) else body(key)

    out: dict[object, torch.cuda.CUDAGraph | None] = {}
    if eager:
        return {key: None for key in keys}
    pool = torch.cuda.graph_pool_handle()
    for key in sorted(keys, reverse=True):
        if prepare is not None:
            prepare(key)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                call(key)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            call(key)
        out[key] = graph
    torch.cuda.synchronize(device)
    return out


class SlotPages:
    """Every state slot's MLA pages on the device, row ``slot`` (+1 row, all scratch, for padding slot
    -1), in step with the plans: a slot's row is rewritten when a new sequence takes it and extended
    as its sequence reaches new pages. Graphs gather a step's block table from it by slot, so a
    step sends only the cells that changed. Columns past a sequence's pages hold stale or scratch
    ids, which no kernel reads (lengths come from the positions)."""

    def __init__(self, num_slots: int, max_pages: int, scratch_page: int, device: torch.device) -> None:
        self.max_pages = max_pages
        self.scratch_page = scratch_page
        self.table = torch.full((num_slots + 1, max_pages), scratch_page, dtype=torch.int64, device=device)
        self._host: dict[int, list[int]] = {}  # what each slot's row holds (its first pages)

    def changes(self, slot: int, pages: Sequence[int], new_owner: bool) -> list[tuple[int, int, int]]:
        """The (slot, column, page) cells to write so row ``slot`` starts with ``pages``; records them."""
        if len(pages) > self.max_pages:
            # Wider than any graph: such steps run eagerly; the row is rewritten when it fits again.
            self._host.pop(slot, None)
            return []
        before = self._host.get(slot)
        held = None if new_owner else before
        if held is None or len(held) > len(pages) or list(pages[: len(held)]) != held:
            self._host[slot] = list(pages)
            cells = [(slot, i, p) for i, p in enumerate(pages)]
            # Columns a previous owner used point at the scratch page again (nothing reads them,
            # but no row should name another sequence's page).
            stale = len(before) if before is not None else 0
            return cells + [(slot, i, self.scratch_page) for i in range(len(pages), stale)]
        out = [(slot, i, pages[i]) for i in range(len(held), len(pages))]
        held.extend(pages[len(held) :])
        return out

    def write(self, cells: list[tuple[int, int, int]]) -> None:
        """Apply cells now (eager steps and overflow: a few small copies)."""
        if not cells:
            return
        dev = self.table.device
        idx = to_device([s * self.table.shape[1] + i for s, i, _ in cells], torch.int64, dev)
        self.table.view(-1)[idx] = to_device([p for _, _, p in cells], torch.int64, dev)

    def host_row(self, slot: int) -> list[int]:
        return self._host.get(slot, [])


def decode_segments(b: int, updates: int) -> list[Segment]:
    i64, f32 = torch.int64, torch.float32
    return [
        Segment("ids", i64, b),
        Segment("pos", i64, b),
        Segment("slots", i64, b),
        Segment("seeds", i64, b),
        Segment("top_k", i64, b),
        Segment("rows_f", i64, b),  # rows with top-k / top-p, first n_f entries
        Segment("rows_lp", i64, b),  # rows that want logprobs, first n_lp entries
        Segment("upd_slot", i64, updates),  # page-table cells that changed (padding: slot -1)
        Segment("upd_col", i64, updates),
        Segment("upd_page", i64, updates),
        Segment("temp", f32, b),
        Segment("top_p", f32, b),
    ]


@dataclass
class Staged:
    """What the host staged for one replay: the rows and the post-replay work."""

    n: int
    bucket: int
    width: int
    filtered: int  # rows_f[:filtered]
    logprob_rows: list[int]  # rows_lp[: len(...)]
    top_logprobs: int


def stage_rows(
    h: dict,
    tokens: Sequence[int],
    positions: Sequence[int],
    slots: Sequence[int],
    sampling: Sequence[RowSampling | None],
) -> tuple[int, list[int], int]:
    """Fill a decode-like layout's per-row host views; returns (filtered rows, logprob rows, top n)."""
    n, b = len(tokens), len(h["ids"])
    pad = b - n
    h["ids"][:n] = tokens
    h["pos"][:n] = positions
    h["slots"][:n] = slots
    h["ids"][n:] = 0
    h["pos"][n:] = 0
    h["slots"][n:] = -1
    rows = [s or GREEDY for s in sampling]
    h["temp"][:n] = [r.temperature for r in rows]
    h["seeds"][:n] = [r.seed for r in rows]
    h["top_k"][:n] = [r.top_k for r in rows]
    h["top_p"][:n] = [r.top_p for r in rows]
    if pad:
        h["temp"][n:] = 0.0
        h["seeds"][n:] = 0
        h["top_k"][n:] = -1
        h["top_p"][n:] = 1.0
    filtered = [i for i, r in enumerate(rows) if r.filtered]
    h["rows_f"][: len(filtered)] = filtered
    lp = [i for i, r in enumerate(rows) if r.logprobs >= 0]
    h["rows_lp"][: len(lp)] = lp
    return len(filtered), lp, max((rows[i].logprobs for i in lp), default=0)


def stage_updates(h: dict, pages: SlotPages, cells: list[tuple[int, int, int]]) -> None:
    """Put page-table cells into the layout's update segment; what does not fit is written now."""
    room = len(h["upd_slot"])
    now, rest = cells[:room], cells[room:]
    pages.write(rest)
    k = len(now)
    if k:
        h["upd_slot"][:k] = [c[0] for c in now]
        h["upd_col"][:k] = [c[1] for c in now]
        h["upd_page"][:k] = [c[2] for c in now]
    h["upd_slot"][k:] = -1
    h["upd_col"][k:] = 0
    h["upd_page"][k:] = pages.scratch_page


def apply_updates(pages: SlotPages, layout: Layout) -> None:
    """(In a graph body.) Write the staged page-table cells."""
    d = layout.dev
    pages.table[d["upd_slot"], d["upd_col"]] = d["upd_page"]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: eager mode (the body runs at each "replay")
    hidden: torch.Tensor  # [bucket, hidden] static output of the replay
    logits: torch.Tensor  # [bucket, vocab] float32
    tokens: torch.Tensor  # [bucket] int64 sampled with the per-row temperature and seed


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``cache``; ``scratch_page`` must be a cache page that
    the engine never hands to a sequence, ``max_pages`` the widest block-table row a step may have.
    ``slot_pages`` and ``next_tokens`` are the runner's (shared with the MTP graphs); left out, the
    graphs keep their own."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: object,
        device: torch.device,
        max_batch: int,
        max_pages: int,
        scratch_page: int,
        buckets: list[int] | None = None,
        eager: bool = False,
        slot_pages: SlotPages | None = None,
        next_tokens: torch.Tensor | None = None,
        widths: list[int] | None = None,
    ) -> None:
        check_graphable(model, device, eager)
        self.model = model
        self.cache = cache
        self.device = device
        self.buckets = sorted(buckets) if buckets else graph_buckets(max_batch)
        self.max_pages = max_pages
        page_size = int(getattr(cache, "page_size", 16))
        self.widths = sorted(widths) if widths else graph_widths(max_pages, page_size)
        self.scratch_page = scratch_page
        num_slots = int(cache.linear_state.shape[1])  # type: ignore[attr-defined]
        self.pages = slot_pages or SlotPages(num_slots, max_pages, scratch_page, device)
        self.next_tokens = (
            next_tokens
            if next_tokens is not None
            else torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
        )
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)  # the resolved token ids
        self.buffers = StepBuffers(device)
        self.layouts = self.buffers.layouts({b: decode_segments(b, 2 * b) for b in self.buckets})
        self.eager = eager
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._batches: dict[tuple[int, int], ForwardBatch] = {}

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(b, w) for b in self.buckets for w in self.widths]

    def _batch(self, b: int, w: int) -> ForwardBatch:
        """The static batch of bucket ``(b, w)``: views of the buffers; host lengths say 'one token
        after a prefix' (prefix 1: not a new sequence, so no slot is zeroed inside the graph). The
        block table is a placeholder, gathered by slot in the body."""
        d = self.layouts[b].dev
        return ForwardBatch(
            input_ids=self.input_ids[:b],
            positions=d["pos"],
            seq_lens=[1] * b,
            prefix_lens=[1] * b,
            state_slots=d["slots"],
            block_tables=self.pages.table[:1, :w].expand(b, w),  # replaced in the body
            graph_safe=True,
            host_slots=[-1] * b,
        )

    def body(self, b: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured step of bucket ``(b, w)``: static buffers in, (hidden, logits, tokens) out."""
        layout = self.layouts[b]
        d = layout.dev
        apply_updates(self.pages, layout)
        slots = d["slots"]
        # Tokens the previous step sampled on the device stand in for FUTURE_TOKEN.
        self.input_ids[:b].copy_(torch.where(d["ids"] >= 0, d["ids"], self.next_tokens[slots]))
        batch = self._batches[(b, w)]
        batch.block_tables = self.pages.table[slots, :w]
        hidden = self.model(batch, self.cache)
        logits = self.model.compute_logits(hidden).float()
        tokens = sample_plain(self.model, logits, d["temp"], d["seeds"], d["pos"])
        self.next_tokens[slots] = tokens
        return hidden, logits, tokens

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        for b, w in self.keys:
            self._batches[(b, w)] = self._batch(b, w)  # built outside the capture
        outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def run(b: int, w: int) -> None:
            outputs[(b, w)] = self.body(b, w)

        graphs = capture_graphs(
            self.device, self.keys, run, self.eager, lambda key: self.stage_padding(key[0])
        )
        for key, graph in graphs.items():
            if graph is None:  # eager: outputs come from each call; placeholders until then
                outputs[key] = (torch.empty(0), torch.empty(0), torch.empty(0))
            self._graphs[key] = _Captured(graph, *outputs[key])  # type: ignore[index]

    def stage_padding(self, b: int) -> None:
        """Padding in every row of bucket ``b`` (capture: warm-up and capture touch the scratch page
        only; the layouts share one buffer, so each bucket is staged right before its capture)."""
        h = self.layouts[b].host()
        stage_rows(h, [], [], [], [])
        stage_updates(h, self.pages, [])
        self.layouts[b].upload()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bucket_for(self, n: int, widest_table: int) -> int | None:
        """The captured batch bucket for a decode step of ``n`` sequences, or None (run it eagerly)."""
        if self.width_for(widest_table) is None:
            return None
        return next((b for b in self.buckets if b >= n and (b, self.widths[-1]) in self._graphs), None)

    def width_for(self, widest_table: int) -> int | None:
        return next((w for w in self.widths if w >= widest_table), None)

    def graph_of(self, bucket: int, widest_table: int) -> torch.cuda.CUDAGraph | None:
        """The captured graph a step of this bucket and table width replays (benchmarks time it)."""
        width = self.width_for(widest_table)
        return self._graphs[(bucket, width)].graph if width is not None else None

    def stage(
        self,
        bucket: int,
        tokens: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        cells: list[tuple[int, int, int]],
        sampling: Sequence[RowSampling | None],
        widest_table: int,
    ) -> Staged:
        """Fill and upload the inputs of one replay (one copy)."""
        width = self.width_for(widest_table)
        if width is None:
            raise ValueError(f"block table of {widest_table} pages: wider than the graphs' {self.max_pages}")
        layout = self.layouts[bucket]
        h = layout.host()
        n_f, lp, top = stage_rows(h, tokens, positions, slots, sampling)
        stage_updates(h, self.pages, cells)
        layout.upload()
        return Staged(len(tokens), bucket, width, n_f, lp, top)

    def launch(self, staged: Staged) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay a staged step: (hidden [n, H], logits [n, V], tokens [n]) views of the static
        outputs, valid until the next replay."""
        n = staged.n
        captured = self._graphs[(staged.bucket, staged.width)]
        if captured.graph is None:
            captured.hidden, captured.logits, captured.tokens = self.body(staged.bucket, staged.width)
        else:
            captured.graph.replay()
        return captured.hidden[:n], captured.logits[:n], captured.tokens[:n]

    def finish(
        self, staged: Staged, logits: torch.Tensor, tokens: torch.Tensor, with_logprobs: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """After the replay, on the device: top-k / top-p rows re-drawn (and their next tokens), then
        logprobs of the rows that asked (returned as (rows' chosen, top ids, top values); not on
        ranks that return nothing, ``with_logprobs`` False)."""
        d = self.layouts[staged.bucket].dev
        if staged.filtered:
            rows = d["rows_f"][: staged.filtered]
            drawn = sample_filtered(
                logits[rows],
                d["temp"][rows],
                d["top_k"][rows],
                d["top_p"][rows],
                d["seeds"][rows],
                d["pos"][rows],
            )
            tokens[rows] = drawn
            self.next_tokens[d["slots"][rows]] = drawn
        if not staged.logprob_rows or not with_logprobs:
            return None
        rows = d["rows_lp"][: len(staged.logprob_rows)]
        return logprobs(logits[rows], tokens[rows], staged.top_logprobs)

    def replay(
        self,
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        pages: list[list[int]],
        bucket: int,
        temperatures: list[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step of ``len(tokens)`` sequences (their page rows written where they differ
        from what the slots hold): (hidden [n, H], logits [n, V], sampled tokens [n]), valid until
        the next replay. ``temperatures`` (default all 0 = greedy) selects each row's sampling (seed
        0)."""
        cells = [c for s, row in zip(slots, pages, strict=True) for c in self.pages.changes(s, row, False)]
        temps = temperatures or [0.0] * len(tokens)
        sampling = [RowSampling(temperature=t) for t in temps]
        staged = self.stage(bucket, tokens, positions, slots, cells, sampling, max(len(p) for p in pages))
        hidden, logits, sampled = self.launch(staged)
        self.finish(staged, logits, sampled)
        return hidden, logits, sampled
