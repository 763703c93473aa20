"""CUDA graphs for MTP (NEXTN) steps: the draft chain and the verify + accept + commit, per bucket.

One MTP decode step of B sequences with k drafts each is two replays and one host read:

1. **draft** (``draft_body``): the MTP layer over the T = k + 1 positions whose next token became
   known at the previous verify (SGLang's draft-extend; a sequence had ``n`` of them, 1..T, the
   rest of its T rows are padding whose outputs are ignored and whose MTP latents land at positions
   that later steps overwrite before reading), previous hidden gathered on the device from the
   hidden pool by slot; then lm_head + greedy on row ``n - 1``, and k - 1 more single-token MTP
   steps each feeding its own hidden and token to the next. Output: ``drafts[k, bucket]``.
2. **verify** (``verify_body``): the target model over [pending token, k drafts] per sequence (the
   drafts read straight from the draft graph's output buffer), Lightning layers keeping the state
   after every position by batch row (pool untouched), MLA over the paged cache with the T new
   latent rows written; then logits, sampling with the per-row temperature, the accepted count
   (drafts equal to the sampled target token at the position before them, up to the first miss)
   and the commit of the accepted state into each slot (``LingCache.commit_rows``), all on the
   device. The T target hidden rows go to the hidden pool for the next step's draft.
3. The host reads ``result[bucket, 2T]`` once: sampled tokens [T], drafts [k], accepted count.

Padding rows (``n`` real sequences in a bucket of ``b``) use slot -1 (kernels skip it; the hidden
pool's extra last row takes its writes) and the scratch page. ``eager=True`` runs the bodies
without capturing, on any device (CPU tests compare them with the runner's eager path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ling_runtime.model.batch import ForwardBatch
from ling_runtime.runner.cuda_graphs import (
    capture_graphs,
    check_graphable,
    graph_buckets,
    padded_tables,
    sample_on_device,
)


@dataclass
class SpecReadout:
    """Host copy of one verify step: per real sequence."""

    tokens: list[list[int]]  # [n][T] target tokens sampled at every verified position
    drafts: list[list[int]]  # [n][k]
    num_accepted: list[int]  # [n] drafts accepted (0..k); tokens[:num_accepted + 1] are emitted


class SpecGraphs:
    """Draft and verify graphs for ``num_drafts`` = k drafts per sequence, buckets up to
    ``max_batch``. ``max_tokens`` caps bucket x (k + 1) (the grouped MoE kernel takes up to 128
    tokens; a larger bucket is not captured and such steps run eagerly)."""

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
        wanted = sorted(buckets) if buckets else graph_buckets(max_batch)
        self.buckets = [b for b in wanted if b * self.t <= max_tokens]
        top = max(wanted)
        t, hid = self.t, model.config.hidden_size
        i64 = {"dtype": torch.int64, "device": device}
        self.slots = torch.full((top,), -1, **i64)
        self.tables = torch.full((top, max_pages), scratch_page, **i64)
        self.steps = torch.arange(t, **i64)
        # draft inputs: the tokens after the newly known positions, their start and count
        self.ext_ids = torch.zeros(top * t, **i64)
        self.ext_start = torch.zeros(top, **i64)
        self.ext_n = torch.ones(top, **i64)
        self.ext_pos = torch.zeros(top * t, **i64)
        self.draft_pos = torch.zeros(k, top, **i64)  # positions of draft steps 2..k (row 0 unused)
        self.drafts = torch.zeros(k, top, **i64)  # draft s+1 of every row: also the verify's input
        # verify inputs
        self.first = torch.zeros(top, **i64)  # the pending (last emitted) token
        self.start = torch.zeros(top, **i64)  # its position
        self.verify_ids = torch.zeros(top * t, **i64)
        self.verify_pos = torch.zeros(top * t, **i64)
        self.temperature = torch.zeros(top, dtype=torch.float32, device=device)
        # Target hidden after every verified position, by slot (+1 row: padding slot -1 lands there).
        num_slots = int(cache.linear_state.shape[1])  # type: ignore[attr-defined]
        self.hidden_pool = torch.zeros(num_slots + 1, t, hid, dtype=model.dtype, device=device)
        self.result = torch.zeros(top, 2 * t, **i64)  # [tokens T | drafts k | accepted 1]
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [b * T, V] float32 of the last verify
        self._ext_batch: dict[int, ForwardBatch] = {}
        self._step_batch: dict[tuple[int, int], ForwardBatch] = {}
        self._verify_batch: dict[int, ForwardBatch] = {}
        self._draft_graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        self._verify_graphs: dict[int, torch.cuda.CUDAGraph | None] = {}

    # ---- static batches (built outside any capture: __post_init__ reads host lists) ---------------
    def _batches(self, b: int) -> None:
        t, k = self.t, self.k
        common = {"state_slots": self.slots[:b], "block_tables": self.tables[:b], "graph_safe": True}
        self._ext_batch[b] = ForwardBatch(
            input_ids=self.ext_ids[: b * t], positions=self.ext_pos[: b * t], seq_lens=[t] * b,
            prefix_lens=[1] * b, **common,
        )  # fmt: skip
        for s in range(1, k):
            self._step_batch[(b, s)] = ForwardBatch(
                input_ids=self.drafts[s - 1, :b], positions=self.draft_pos[s, :b], seq_lens=[1] * b,
                prefix_lens=[1] * b, **common,
            )  # fmt: skip
        self._verify_batch[b] = ForwardBatch(
            input_ids=self.verify_ids[: b * t], positions=self.verify_pos[: b * t], seq_lens=[t] * b,
            prefix_lens=[1] * b, keep_linear_states=True, **common,
        )  # fmt: skip

    # ---- the bodies (device tensors only: no .item(), no host branch on data) ---------------------
    def draft_body(self, b: int) -> None:
        m, t, hid = self.model, self.t, self.hidden_pool.shape[-1]
        slots = self.slots[:b]
        self.ext_pos[: b * t].copy_((self.ext_start[:b, None] + self.steps).view(-1))
        prev = self.hidden_pool[slots].view(b * t, hid)
        h = m.mtp_forward(self._ext_batch[b], self.cache, prev).view(b, t, hid)
        rows = torch.arange(b, device=self.device)
        h = h[rows, self.ext_n[:b] - 1]  # [b, H]: the last known position of each sequence
        self.drafts[0, :b].copy_(sample_on_device(m, m.compute_logits(h).float(), None))
        for s in range(1, self.k):
            # Draft s+1: the MTP layer at position start + s - 1 (the pending token's position is
            # ext_start + ext_n) over draft s and its own previous hidden.
            self.draft_pos[s, :b].copy_(self.ext_start[:b] + self.ext_n[:b] + (s - 1))
            h = m.mtp_forward(self._step_batch[(b, s)], self.cache, h)
            self.drafts[s, :b].copy_(sample_on_device(m, m.compute_logits(h).float(), None))

    def verify_body(self, b: int) -> None:
        m, t, k = self.model, self.t, self.k
        slots = self.slots[:b]
        ids = torch.cat([self.first[:b, None], self.drafts[:, :b].T], dim=1)  # [b, T]
        self.verify_ids[: b * t].copy_(ids.reshape(-1))
        self.verify_pos[: b * t].copy_((self.start[:b, None] + self.steps).view(-1))
        hidden = m(self._verify_batch[b], self.cache)  # [b * T, H]
        logits = m.compute_logits(hidden).float()
        tokens = sample_on_device(m, logits, self.temperature[:b].repeat_interleave(t)).view(b, t)
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
        self.slots.fill_(-1)
        self.tables.fill_(self.scratch_page)
        for buf in (self.ext_ids, self.ext_start, self.start, self.first, self.drafts):
            buf.zero_()
        self.ext_n.fill_(1)
        self.temperature.zero_()
        for b in self.buckets:
            self._batches(b)
        self._draft_graphs = capture_graphs(self.device, self.buckets, self.draft_body, self.eager)
        self._verify_graphs = capture_graphs(self.device, self.buckets, self.verify_body, self.eager)

    # ---- host side ---------------------------------------------------------------------------------
    def bucket_for(self, n: int, widest_table: int) -> int | None:
        if widest_table > self.max_pages:
            return None
        return next((b for b in self.buckets if b >= n and b in self._verify_graphs), None)

    def set_sequences(self, bucket: int, slots: list[int], pages: list[list[int]]) -> None:
        """Slots and block tables of the step's sequences (shared by its draft and verify)."""
        pad = bucket - len(slots)
        self.slots[:bucket].copy_(torch.tensor(slots + [-1] * pad, dtype=torch.int64), non_blocking=True)
        table = padded_tables(pages, bucket, self.max_pages, self.scratch_page)
        self.tables[:bucket].copy_(table, non_blocking=True)

    def load_hidden(self, slot: int, rows: torch.Tensor) -> None:
        """Put target hidden rows from an eager pass into the pool (the draft graph reads it)."""
        self.hidden_pool[slot, : rows.shape[0]] = rows.to(self.hidden_pool.dtype)

    def hidden_rows(self, slot: int, n: int) -> torch.Tensor:
        return self.hidden_pool[slot, :n]

    def draft(self, bucket: int, next_tokens: list[list[int]], starts: list[int]) -> None:
        """Replay the draft graph: sequence i's known next tokens (1..T of them) after position
        ``starts[i]``; the drafts stay on the device (``self.drafts``) for ``verify``."""
        t, pad = self.t, bucket - len(next_tokens)
        ids = [list(x) + [0] * (t - len(x)) for x in next_tokens] + [[0] * t] * pad
        self.ext_ids[: bucket * t].copy_(torch.tensor(ids, dtype=torch.int64).view(-1), non_blocking=True)
        self.ext_start[:bucket].copy_(torch.tensor(starts + [0] * pad, dtype=torch.int64), non_blocking=True)
        counts = [len(x) for x in next_tokens] + [1] * pad
        self.ext_n[:bucket].copy_(torch.tensor(counts, dtype=torch.int64), non_blocking=True)
        self.replay_draft(bucket)

    def set_drafts(self, bucket: int, drafts: list[list[int]]) -> None:
        """Drafts computed elsewhere (the eager MTP path) as the verify's input."""
        rows = drafts + [[0] * self.k] * (bucket - len(drafts))
        self.drafts[:, :bucket].copy_(torch.tensor(rows, dtype=torch.int64).T, non_blocking=True)

    def verify(
        self, bucket: int, first: list[int], starts: list[int], temperatures: list[float] | None = None
    ) -> SpecReadout:
        """Replay the verify graph over [first[i], drafts of row i] at positions starts[i].. and
        read the step's result (the one host synchronisation)."""
        n = len(first)
        pad = bucket - n
        self.first[:bucket].copy_(torch.tensor(first + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.start[:bucket].copy_(torch.tensor(starts + [0] * pad, dtype=torch.int64), non_blocking=True)
        temps = list(temperatures) if temperatures is not None else [0.0] * n
        self.temperature[:bucket].copy_(
            torch.tensor(temps + [0.0] * pad, dtype=torch.float32), non_blocking=True
        )
        self.replay_verify(bucket)
        host = self.result[:n].cpu().tolist()
        t, k = self.t, self.k
        return SpecReadout([r[:t] for r in host], [r[t : t + k] for r in host], [r[2 * t - 1] for r in host])

    def replay_draft(self, bucket: int) -> None:
        graph = self._draft_graphs[bucket]
        self.draft_body(bucket) if graph is None else graph.replay()

    def replay_verify(self, bucket: int) -> None:
        graph = self._verify_graphs[bucket]
        self.verify_body(bucket) if graph is None else graph.replay()
