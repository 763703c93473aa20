"""CUDA graphs for decode steps: one capture per batch-size bucket, one replay per step.

A decode step (every sequence one token, no drafts, none new) is captured once per bucket of the
batch sizes the scheduler produces (1, 2, 4, ..., max running requests) over static input buffers:
token ids, positions, state slots and block tables. A step of ``n`` sequences copies its inputs
into the first ``n`` rows of the smallest bucket ``>= n`` and pads the rest so that padding
computes harmlessly: slot ``-1`` (the Lightning decode kernel skips it) and a block table pointing
at a scratch page that no sequence owns (the MLA latent write of a padding row lands there).
Everything inside the graph is the model's Triton path, which reads lengths from device tensors
only (no host synchronisation inside a step). Prefill, verify and oversize steps run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ling_runtime.model.batch import ForwardBatch


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


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [bucket, hidden] static output of the replay
    logits: torch.Tensor  # [bucket, vocab] float32


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``cache``; ``scratch_page`` must be a cache page that
    the engine never hands to a sequence, ``max_pages`` the widest block-table row a step may have."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: object,
        device: torch.device,
        max_batch: int,
        max_pages: int,
        scratch_page: int,
        buckets: list[int] | None = None,
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a cuda device, got {device}")
        if not getattr(model, "use_kernels", False):
            # The plain-torch decode reads host-side lengths, which a replay would not update.
            raise ValueError("CUDA graphs need the model's Triton path (use_kernels=True)")
        self.model = model
        self.cache = cache
        self.device = device
        self.buckets = sorted(buckets) if buckets else graph_buckets(max_batch)
        self.max_pages = max_pages
        self.scratch_page = scratch_page
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slots = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.tables = torch.full((top, max_pages), scratch_page, dtype=torch.int64, device=device)
        self._graphs: dict[int, _Captured] = {}
        self._batches: dict[int, ForwardBatch] = {}

    def _batch(self, b: int) -> ForwardBatch:
        """The static batch of bucket ``b``: views of the buffers; host lengths say 'one token after
        a prefix' (prefix 1: not a new sequence, so no slot is zeroed inside the graph)."""
        return ForwardBatch(
            input_ids=self.input_ids[:b],
            positions=self.positions[:b],
            seq_lens=[1] * b,
            prefix_lens=[1] * b,
            state_slots=self.slots[:b],
            block_tables=self.tables[:b],
        )

    def _step(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(batch, self.cache)
        return hidden, self.model.compute_logits(hidden).float()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        pool = torch.cuda.graph_pool_handle()
        # Padding everywhere while capturing: warm-up and capture only touch the scratch page.
        self.slots.fill_(-1)
        self.tables.fill_(self.scratch_page)
        self.positions.zero_()
        self.input_ids.zero_()
        for b in reversed(self.buckets):
            batch = self._batch(b)  # built outside the capture (its __post_init__ reads the host)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compile the Triton kernels for this shape before capturing
                    self._step(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden, logits = self._step(batch)
            self._graphs[b] = _Captured(graph, hidden, logits)
            self._batches[b] = batch
        torch.cuda.synchronize(self.device)

    def bucket_for(self, n: int, widest_table: int) -> int | None:
        """The captured bucket for a decode step of ``n`` sequences, or None (run it eagerly)."""
        if widest_table > self.max_pages:
            return None
        for b in self.buckets:
            if b >= n and b in self._graphs:
                return b
        return None

    def replay(
        self, tokens: list[int], positions: list[int], slots: list[int], pages: list[list[int]], bucket: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of ``len(tokens)`` sequences: (hidden [n, H], logits [n, V]) views of the
        static outputs, valid until the next replay."""
        n, b = len(tokens), bucket
        pad = b - n
        self.input_ids[:b].copy_(torch.tensor(tokens + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(positions + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots + [-1] * pad, dtype=torch.int64), non_blocking=True)
        table = torch.full((b, self.max_pages), self.scratch_page, dtype=torch.int64)
        for i, row in enumerate(pages):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        self.tables[:b].copy_(table, non_blocking=True)
        captured = self._graphs[b]
        captured.graph.replay()
        return captured.hidden[:n], captured.logits[:n]
