"""``ForwardBatch``: the flat token layout of one model step over B sequences.

Tokens of all sequences are concatenated (sequence b owns ``input_ids[cu_seqlens[b]:cu_seqlens[b+1]]``).
A sequence may be a prefill chunk (``seq_lens[b] > 1``), a decode step (1 token) or a speculative
verify of k+1 tokens (set ``keep_linear_states`` so each linear-attention layer keeps the state after
every position for ``LingCache.commit_linear_state``; only sequences of at most the cache's
``max_spec_tokens`` tokens keep them, so prefill chunks may share a verify batch). The MLA latent cache is paged: token at
absolute position p of sequence b lives in page ``block_tables[b, p // page_size]`` at row
``p % page_size``; ``block_tables`` must cover positions ``[0, prefix_lens[b] + seq_lens[b])``.

``snapshots`` (row, n, id): the Lightning layers save sequence ``row``'s state after its first ``n``
tokens of this step (0 < n < its length) into ``LingCache.snapshot_state[:, id]`` (the prefix
cache; a state after a whole row is the slot's state after the step and is copied by the caller).

``graph_safe`` marks a CUDA-graph body's batch (engine/cuda_graphs.py, engine/spec_graphs.py): every
sequence has ``seq_lens[0]`` tokens, the host lists are placeholders (prefix 1: nobody is new), and
the layers must read lengths from the device ``positions`` only. A graph-safe batch of more than one
token per sequence with ``keep_linear_states`` is a verify whose per-position linear states go to
``spec_linear_state[:, row]`` (by batch row, not slot) with the pool untouched; the caller commits
with ``LingCache.commit_rows`` once the accepted counts are known on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: prefix_lens[b] + 0..seq_lens[b]-1
    seq_lens: list[int]  # query tokens per sequence in this step
    prefix_lens: list[int]  # tokens already in the cache per sequence (0 = new sequence)
    state_slots: torch.Tensor  # [B] int64: linear-attention state slot per sequence
    block_tables: torch.Tensor  # [B, max_pages] int64: MLA latent pages per sequence
    keep_linear_states: bool = False
    graph_safe: bool = False
    snapshots: tuple[tuple[int, int, int], ...] = ()  # (row, n, snapshot id), see the module doc
    # What `build` already has on the host / the device: the slots as a list and cu_seqlens on the
    # device (so no step reads a device tensor back, and nothing is copied twice).
    host_slots: list[int] | None = field(default=None, repr=False)
    device_cu_seqlens: torch.Tensor | None = field(default=None, repr=False)
    cu_seqlens: torch.Tensor = field(init=False)  # [B+1] int64
    # Host copies, so per-sequence loops never synchronise with the device.
    offsets: list[int] = field(init=False)  # cu_seqlens as a list
    slots: list[int] = field(init=False)  # state_slots as a list
    _subs: dict = field(init=False, default_factory=dict, repr=False)  # select()'s, per row set

    def __post_init__(self) -> None:
        b = len(self.seq_lens)
        if len(self.prefix_lens) != b:
            raise ValueError(
                f"prefix_lens: expected {b} entries (one per sequence), got {len(self.prefix_lens)}"
            )
        if any(n < 1 for n in self.seq_lens):
            raise ValueError(f"seq_lens: every sequence needs at least one token, got {self.seq_lens}")
        if any(n < 0 for n in self.prefix_lens):
            raise ValueError(f"prefix_lens: must be >= 0, got {self.prefix_lens}")
        total = sum(self.seq_lens)
        if self.input_ids.shape != (total,) or self.positions.shape != (total,):
            raise ValueError(
                f"input_ids/positions: expected shape [{total}] (sum of seq_lens), got "
                f"{list(self.input_ids.shape)} / {list(self.positions.shape)}"
            )
        if self.state_slots.shape != (b,):
            raise ValueError(f"state_slots: expected shape [{b}], got {list(self.state_slots.shape)}")
        if self.block_tables.dim() != 2 or self.block_tables.shape[0] != b:
            raise ValueError(
                f"block_tables: expected shape [{b}, max_pages], got {list(self.block_tables.shape)}"
            )
        for row, n, sid in self.snapshots:
            if not (0 <= row < b and 0 < n < self.seq_lens[row]) or sid < 0:
                raise ValueError(
                    f"snapshots: (row {row}, n {n}, id {sid}) must name a row and a position inside it"
                )
        offsets = [0]
        for n in self.seq_lens:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        self.slots = list(self.host_slots) if self.host_slots is not None else self.state_slots.tolist()
        if self.device_cu_seqlens is not None:
            self.cu_seqlens = self.device_cu_seqlens
        else:
            self.cu_seqlens = torch.tensor(offsets, dtype=torch.int64).to(self.input_ids.device)

    @property
    def is_decode(self) -> bool:
        """Every sequence contributes exactly one token (the batched decode paths apply)."""
        return all(n == 1 for n in self.seq_lens)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def decode_rows(self) -> list[int]:
        """Rows of one token in a mixed batch (decode steps riding along prefill chunks), which the
        plain-torch layers run as one batched decode; none in a verify batch (its one-token rows
        keep per-position states) or a graph body."""
        if self.keep_linear_states or self.graph_safe or self.is_decode:
            return []
        return [b for b, n in enumerate(self.seq_lens) if n == 1]

    def select(self, rows: list[int]) -> tuple[ForwardBatch, torch.Tensor]:
        """The sub-batch of one-token ``rows`` and the flat token index of each (snapshots dropped:
        one-token rows have no mid-row cut). Built once per batch (every layer asks)."""
        key = tuple(rows)
        if key in self._subs:
            return self._subs[key]
        idx = torch.tensor([self.offsets[b] for b in rows], dtype=torch.int64, device=self.input_ids.device)
        rows_t = torch.tensor(rows, dtype=torch.int64, device=self.state_slots.device)
        sub = ForwardBatch(
            input_ids=self.input_ids[idx],
            positions=self.positions[idx],
            seq_lens=[1] * len(rows),
            prefix_lens=[self.prefix_lens[b] for b in rows],
            state_slots=self.state_slots[rows_t],
            block_tables=self.block_tables[rows_t.to(self.block_tables.device)],
            host_slots=[self.slots[b] for b in rows],
        )
        self._subs[key] = (sub, idx)
        return sub, idx

    def snapshot_cuts(self, row: int) -> list[tuple[int, int]]:
        """(n, snapshot id) of ``row``, by position: where its Lightning state is saved mid-row."""
        return sorted((n, sid) for r, n, sid in self.snapshots if r == row)

    def last_token_indices(self) -> torch.Tensor:
        """Row of each sequence's last token in the flat layout (where its next-token logits come from)."""
        return self.cu_seqlens[1:] - 1

    def to(self, device: torch.device | str) -> ForwardBatch:
        """The same batch with its tensors on ``device`` (host lists are shared)."""
        return ForwardBatch(
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            seq_lens=self.seq_lens,
            prefix_lens=self.prefix_lens,
            state_slots=self.state_slots.to(device),
            block_tables=self.block_tables.to(device),
            keep_linear_states=self.keep_linear_states,
            graph_safe=self.graph_safe,
            snapshots=self.snapshots,
            host_slots=self.slots,
        )

    @classmethod
    def build(
        cls,
        tokens: Sequence[Sequence[int]],
        prefix_lens: Sequence[int],
        state_slots: Sequence[int],
        block_tables: torch.Tensor | Sequence[Sequence[int]],
        keep_linear_states: bool = False,
        device: torch.device | str | None = None,
        snapshots: Sequence[tuple[int, int, int]] = (),
    ) -> ForwardBatch:
        """Build from per-sequence token lists; positions continue after each prefix. Token ids,
        positions, slots, cu_seqlens and the block tables go to the device in one copy."""
        seq_lens = [len(t) for t in tokens]
        flat = [t for seq in tokens for t in seq]
        pos = [p + i for p, n in zip(prefix_lens, seq_lens, strict=True) for i in range(n)]
        slots = [int(s) for s in state_slots]
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        if isinstance(block_tables, torch.Tensor):
            table_rows = None
            width = int(block_tables.shape[1])
        else:
            table_rows = [list(r) for r in block_tables]
            width = max((len(r) for r in table_rows), default=0)
        total, b = len(flat), len(slots)
        # Pinned on CUDA, so the one copy does not wait for the device (a pageable copy would).
        cuda = device is not None and torch.device(device).type == "cuda"
        host = torch.empty(2 * total + b + (b + 1) + b * width, dtype=torch.int64, pin_memory=cuda)
        host[:total] = torch.tensor(flat, dtype=torch.int64)
        host[total : 2 * total] = torch.tensor(pos, dtype=torch.int64)
        at = 2 * total
        host[at : at + b] = torch.tensor(slots, dtype=torch.int64)
        host[at + b : at + 2 * b + 1] = torch.tensor(cu, dtype=torch.int64)
        tab = host[at + 2 * b + 1 :].view(b, width)
        if table_rows is None:
            tab.copy_(block_tables)
        else:
            tab.zero_()
            for i, r in enumerate(table_rows):
                if r:
                    tab[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        dev = host.to(device, non_blocking=cuda) if device is not None else host
        return cls(
            input_ids=dev[:total],
            positions=dev[total : 2 * total],
            seq_lens=seq_lens,
            prefix_lens=list(prefix_lens),
            state_slots=dev[at : at + b],
            block_tables=dev[at + 2 * b + 1 :].view(b, width),
            keep_linear_states=keep_linear_states,
            snapshots=tuple(snapshots),
            host_slots=slots,
            device_cu_seqlens=dev[at + b : at + 2 * b + 1],
        )
