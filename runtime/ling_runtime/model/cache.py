"""``LingCache``: per-rank storage the model reads and writes during a step.

- Linear-attention states ``linear_state[num_linear_layers, num_slots, H/tp, D, D]`` in float32 (one
  slot per running sequence; the state does not grow with context).
- MLA latent KV ``mla_kv[num_mla_layers (+1 for MTP), num_pages, page_size, kv_lora_rank + rope_dim]``
  in the model dtype: ``[c_kv ‖ k_pe]`` per token, replicated on every TP rank.
- For speculative verify, ``spec_linear_state[num_linear_layers, num_slots, max_spec_tokens, H/tp, D, D]``
  holds the state after every verified position so ``commit_linear_state`` can roll back.
- For the prefix cache, ``snapshot_state[num_linear_layers, num_snapshots, H/tp, D, D]`` holds saved
  linear states (a sequence's state at a block boundary) that later sequences restore into their slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ling_runtime.config import LingConfig


class LingCache:
    def __init__(
        self,
        config: LingConfig,
        num_slots: int,
        num_pages: int,
        page_size: int = 16,
        tp_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        include_mtp: bool = False,
        max_spec_tokens: int = 0,
        num_snapshots: int = 0,
    ) -> None:
        for name, value in (("num_slots", num_slots), ("num_pages", num_pages), ("page_size", page_size)):
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        config.validate_tp(tp_size)
        self.config = config
        self.page_size = page_size
        self.num_slots = num_slots
        self.num_pages = num_pages
        heads = config.num_attention_heads // tp_size
        d = config.head_dim
        n_lin = len(config.linear_layer_ids)
        n_mla = len(config.mla_layer_ids) + (1 if include_mtp else 0)
        self.include_mtp = include_mtp
        self.mtp_mla_index = len(config.mla_layer_ids) if include_mtp else None
        self.linear_state = torch.zeros(n_lin, num_slots, heads, d, d, dtype=torch.float32, device=device)
        self.mla_kv = torch.zeros(
            n_mla, num_pages, page_size, config.kv_cache_dim, dtype=dtype, device=device
        )
        self.max_spec_tokens = max_spec_tokens
        self.spec_linear_state = (
            torch.zeros(n_lin, num_slots, max_spec_tokens, heads, d, d, dtype=torch.float32, device=device)
            if max_spec_tokens > 0
            else None
        )
        self.num_snapshots = num_snapshots
        self.snapshot_state = (
            torch.zeros(n_lin, num_snapshots, heads, d, d, dtype=torch.float32, device=device)
            if num_snapshots > 0
            else None
        )

    def reset_slots(self, slots: Sequence[int] | torch.Tensor) -> None:
        """Zero the linear-attention state of ``slots`` (a new sequence starts from zero state)."""
        idx = torch.as_tensor(slots, dtype=torch.int64, device=self.linear_state.device)
        self.linear_state[:, idx] = 0

    # ---- prefix-cache snapshots -------------------------------------------------------------------
    def _snapshots(self) -> torch.Tensor:
        if self.snapshot_state is None:
            raise ValueError("num_snapshots: the cache was built without snapshot buffers (need > 0)")
        return self.snapshot_state

    def _index(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(ids, torch.Tensor):
            # A pinned host tensor (the runner's): the copy does not wait for the device's queue.
            return ids.to(self.linear_state.device, torch.int64, non_blocking=True)
        return torch.as_tensor(list(ids), dtype=torch.int64, device=self.linear_state.device)

    def save_snapshots(self, slots: Sequence[int], snapshots: Sequence[int]) -> None:
        """``snapshot_state[:, snapshots[i]] = linear_state[:, slots[i]]`` (the states after a step)."""
        self._snapshots()[:, self._index(snapshots)] = self.linear_state[:, self._index(slots)]

    def restore_snapshots(self, slots: Sequence[int], snapshots: Sequence[int]) -> None:
        """``linear_state[:, slots[i]] = snapshot_state[:, snapshots[i]]``: the slots resume there."""
        self.linear_state[:, self._index(slots)] = self._snapshots()[:, self._index(snapshots)]

    def save_verify_snapshots(
        self, rows: Sequence[int], counts: Sequence[int], snapshots: Sequence[int]
    ) -> None:
        """Save the state after the first ``counts[i]`` positions of the last verify pass, kept in
        ``spec_linear_state[:, rows[i]]`` (row = the slot for an eager verify, the batch row for a
        graphed one)."""
        if self.spec_linear_state is None:
            raise ValueError("max_spec_tokens: the cache was built without speculative state buffers")
        positions = self._index([c - 1 for c in counts])
        self._snapshots()[:, self._index(snapshots)] = self.spec_linear_state[:, self._index(rows), positions]

    def commit_linear_state(
        self, slots: Sequence[int] | torch.Tensor, accepted_len: Sequence[int] | torch.Tensor
    ) -> None:
        """After a verify pass, set each slot's state to the one after its first ``accepted_len`` tokens.

        ``accepted_len[i]`` counts verify-input tokens kept for ``slots[i]`` (>= 1: the first input
        token is always real). Requires the verify step to have run with ``keep_linear_states``.
        """
        if self.spec_linear_state is None:
            raise ValueError(
                "max_spec_tokens: the cache was built without speculative state buffers (need > 0)"
            )
        slots_t = torch.as_tensor(slots, dtype=torch.int64, device=self.linear_state.device)
        acc = torch.as_tensor(accepted_len, dtype=torch.int64, device=self.linear_state.device)
        if slots_t.shape != acc.shape:
            raise ValueError(
                f"accepted_len: expected one entry per slot ({slots_t.numel()}), got {acc.numel()}"
            )
        if bool((acc < 1).any()) or bool((acc > self.max_spec_tokens).any()):
            raise ValueError(f"accepted_len: each must be in [1, {self.max_spec_tokens}], got {acc.tolist()}")
        self.linear_state[:, slots_t] = self.spec_linear_state[:, slots_t, acc - 1]

    def commit_rows(self, slots: torch.Tensor, num_emitted: torch.Tensor, use_kernels: bool) -> None:
        """Device-side commit after a graph-safe verify (``ForwardBatch.graph_safe``): for batch row b,
        ``linear_state[:, slots[b]] = spec_linear_state[:, b, num_emitted[b] - 1]``. No validation and
        no host read (it runs inside a CUDA graph); rows with slot < 0 are padding and skipped."""
        assert self.spec_linear_state is not None
        b = slots.shape[0]
        if use_kernels:
            from ling_runtime.kernels import lightning_commit

            for li in range(self.linear_state.shape[0]):
                lightning_commit(self.linear_state[li], slots, self.spec_linear_state[li, :b], num_emitted)
            return
        rows = torch.arange(b, device=slots.device)
        chosen = self.spec_linear_state[:, rows, (num_emitted - 1).clamp(0, self.max_spec_tokens - 1)]
        scatter_slot_rows(self.linear_state, slots, chosen)

    # ---- MLA pages -------------------------------------------------------------------------------
    def check_block_tables(self, seq_lens: list[int], prefix_lens: list[int], table_width: int) -> None:
        """Fail before any write (on GPU an out-of-range page is a device assert) when a sequence's
        ``prefix + seq_len`` tokens need more pages than its block-table row holds."""
        for b, (n, p) in enumerate(zip(seq_lens, prefix_lens, strict=True)):
            need = -(-(p + n) // self.page_size)
            if need > table_width:
                raise ValueError(
                    f"block_tables: sequence {b} needs {need} pages of {self.page_size} for {p + n} tokens, "
                    f"its row holds {table_width}"
                )

    def write_latent(
        self, mla_index: int, block_table: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor
    ) -> None:
        """Store ``latent`` [n, kv_dim] of one sequence at absolute ``positions`` [n]."""
        pages = block_table[positions // self.page_size]
        rows = positions % self.page_size
        self.mla_kv[mla_index, pages, rows] = latent.to(self.mla_kv.dtype)

    def read_latent(self, mla_index: int, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """The latents of positions ``[0, length)`` of one sequence, [length, kv_dim]."""
        n_pages = -(-length // self.page_size)
        if n_pages > block_table.shape[0]:
            raise ValueError(
                f"block_tables: {length} tokens need {n_pages} pages, the table has {block_table.shape[0]}"
            )
        return self.mla_kv[mla_index, block_table[:n_pages]].reshape(-1, self.mla_kv.shape[-1])[:length]


def scatter_slot_rows(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``pool[:, slots[b]] = rows[:, b]`` where padding rows (slot < 0) change nothing, without a
    boolean mask (which would read the device): a padding row rewrites row 0's slot with row 0's
    value, so the duplicate index carries the same value and the result is deterministic. Row 0 is
    always a real sequence (padding only fills the tail of a bucket)."""
    pad = slots < 0
    idx = torch.where(pad, slots[0], slots)
    vals = torch.where(pad.view(1, -1, *([1] * (rows.dim() - 2))), rows[:, :1], rows)
    pool[:, idx] = vals
