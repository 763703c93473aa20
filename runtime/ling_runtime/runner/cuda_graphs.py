"""CUDA graphs for decode steps: one capture per batch-size bucket, one replay per step.

A decode step (every sequence one token, no drafts, none new) is captured once per bucket of the
batch sizes the scheduler produces (1, 2, 4, ..., max running requests) over static input buffers:
token ids, positions, state slots and block tables. A step of ``n`` sequences copies its inputs
into the first ``n`` rows of the smallest bucket ``>= n`` and pads the rest so that padding
computes harmlessly: slot ``-1`` (the Lightning decode kernel skips it) and a block table pointing
at a scratch page that no sequence owns (the MLA latent write of a padding row lands there).
Everything inside the graph is the model's Triton path, which reads lengths from device tensors
only (no host synchronisation inside a step). Prefill and oversize steps run eagerly; MTP draft and
verify steps have their own graphs (runner/spec_graphs.py).

The replay samples too (``sample_on_device``: greedy, or temperature by Gumbel-max over uniform
noise drawn on the device with the graph-safe default generator), so a step hands back token ids;
the logits stay in a static buffer for callers that want them (host sampling, logprobs).

``eager=True`` runs the same bodies without capturing (any device): the CPU tests compare them with
the runner's eager path, since a capture needs a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
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


def sample_on_device(
    model: torch.nn.Module, logits: torch.Tensor, temperature: torch.Tensor | None
) -> torch.Tensor:
    """Token ids [N] int64 from float32 logits [N, V]: greedy where ``temperature`` is 0 (or None:
    all greedy, no noise drawn), else a draw from softmax(logits / T). No host read (graph-safe)."""
    # Imported here: the kernels import Triton, which only graph-enabled runners need.
    from ling_runtime.kernels.sampling import sample, sample_ref

    kernels = getattr(model, "use_kernels", False)
    if temperature is None:
        if kernels:
            zero = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
            return sample(logits, zero).long()
        return torch.argmax(logits, dim=-1)
    uniform = torch.rand(logits.shape, dtype=torch.float32, device=logits.device)
    return (sample if kernels else sample_ref)(logits, temperature, uniform).long()


def check_graphable(model: torch.nn.Module, device: torch.device, eager: bool) -> None:
    """Refuse what a capture cannot serve (``eager`` runs the bodies anywhere, for CPU tests)."""
    if device.type != "cuda" and not eager:
        raise ValueError(f"CUDA graphs need a cuda device, got {device}")
    if not getattr(model, "use_kernels", False) and not eager:
        # The plain-torch decode reads host-side lengths, which a replay would not update.
        raise ValueError("CUDA graphs need the model's Triton path (use_kernels=True)")


def capture_graphs(
    device: torch.device, keys: list[int], body: Callable[[int], object], eager: bool
) -> dict[int, torch.cuda.CUDAGraph | None]:
    """Capture ``body(key)`` once per key (largest first, one shared memory pool), after two eager
    warm-up calls that compile the Triton kernels for the shape. ``eager``: capture nothing (None)."""
    out: dict[int, torch.cuda.CUDAGraph | None] = {}
    if eager:
        return {key: None for key in keys}
    pool = torch.cuda.graph_pool_handle()
    for key in sorted(keys, reverse=True):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                body(key)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            body(key)
        out[key] = graph
    torch.cuda.synchronize(device)
    return out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: eager mode (the body runs at each "replay")
    hidden: torch.Tensor  # [bucket, hidden] static output of the replay
    logits: torch.Tensor  # [bucket, vocab] float32
    tokens: torch.Tensor  # [bucket] int64 sampled with the per-row temperature


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
        eager: bool = False,
    ) -> None:
        check_graphable(model, device, eager)
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
        self.temperature = torch.zeros(top, dtype=torch.float32, device=device)  # 0 = greedy
        self.eager = eager
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
            graph_safe=True,
        )

    def body(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The captured step of bucket ``b``: static buffers in, (hidden, logits, tokens) out."""
        batch = self._batches[b]
        hidden = self.model(batch, self.cache)
        logits = self.model.compute_logits(hidden).float()
        return hidden, logits, sample_on_device(self.model, logits, self.temperature[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        # Padding everywhere while capturing: warm-up and capture only touch the scratch page.
        self.slots.fill_(-1)
        self.tables.fill_(self.scratch_page)
        self.positions.zero_()
        self.input_ids.zero_()
        self.temperature.zero_()
        for b in self.buckets:
            self._batches[b] = self._batch(b)  # built outside the capture (__post_init__ reads the host)
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def run(b: int) -> None:
            outputs[b] = self.body(b)

        graphs = capture_graphs(self.device, self.buckets, run, self.eager)
        for b, graph in graphs.items():
            if graph is None:  # eager: outputs come from each call; placeholders until then
                outputs[b] = (torch.empty(0), torch.empty(0), torch.empty(0))
            self._graphs[b] = _Captured(graph, *outputs[b])

    def bucket_for(self, n: int, widest_table: int) -> int | None:
        """The captured bucket for a decode step of ``n`` sequences, or None (run it eagerly)."""
        if widest_table > self.max_pages:
            return None
        for b in self.buckets:
            if b >= n and b in self._graphs:
                return b
        return None

    def replay(
        self,
        tokens: list[int],
        positions: list[int],
        slots: list[int],
        pages: list[list[int]],
        bucket: int,
        temperatures: list[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step of ``len(tokens)`` sequences: (hidden [n, H], logits [n, V], sampled
        tokens [n]) views of the static outputs, valid until the next replay. ``temperatures``
        (default all 0 = greedy) selects each row's sampling."""
        n, b = len(tokens), bucket
        pad = b - n
        self.input_ids[:b].copy_(torch.tensor(tokens + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(positions + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots + [-1] * pad, dtype=torch.int64), non_blocking=True)
        self.tables[:b].copy_(padded_tables(pages, b, self.max_pages, self.scratch_page), non_blocking=True)
        temps = list(temperatures) if temperatures is not None else [0.0] * n
        self.temperature[:b].copy_(torch.tensor(temps + [0.0] * pad, dtype=torch.float32), non_blocking=True)
        captured = self._graphs[b]
        if captured.graph is None:
            captured.hidden, captured.logits, captured.tokens = self.body(b)
        else:
            captured.graph.replay()
        return captured.hidden[:n], captured.logits[:n], captured.tokens[:n]


def padded_tables(pages: list[list[int]], rows: int, width: int, scratch_page: int) -> torch.Tensor:
    """Host block tables [rows, width]: each sequence's pages, then the scratch page (padding rows
    and the unused tail write there, never into a page some sequence owns)."""
    table = torch.full((rows, width), scratch_page, dtype=torch.int64)
    for i, row in enumerate(pages):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return table
