"""What every tensor-parallel rank executes in one step: plain picklable data, broadcast from rank 0.

Rank 0 decides (scheduling, sampling, acceptance); every rank runs the same forward passes on its
shard from this description, so the ranks stay in lock step without a Ray call per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step.

    - `tokens` enter the target model at positions `start`, `start+1`, ...; with `num_drafts > 0` the
      runner appends that many MTP draft tokens before the target pass (a verify pass).
    - `reset`: the slot is new to this sequence; its linear state starts from zero.
    - `commit`: tokens of the previous verify pass that were accepted; the linear state rolls back to
      the state after that many of them before anything else runs.
    - `mtp_start`, `mtp_next_tokens`: positions whose next token is now known; the MTP layer consumes
      (target hidden at i, embedding of token i+1) there before drafting (SGLang's "draft extend").
    - `logits`: return target logits for the last `logits` positions (0: none).
    - `temperature`: not None when the runner may sample this sequence on the device (0: greedy,
      else plain temperature: no seed, top-k, top-p or logprobs) and hand back token ids instead of
      logits; a graphed MTP verify then also accepts its drafts on the device.
    - Prefix cache: `restore` loads that Lightning-state snapshot into the slot before anything else
      (the sequence resumes at `start` from a cached prefix; its MLA pages are in `pages`);
      `snapshots` (n, id) save the state after the first n of `tokens` into snapshot buffer id;
      `commit_snapshots` (j, id) save the state after the first j tokens of the previous verify pass
      (copied out before `commit` rolls the slot back).
    """

    slot: int
    pages: tuple[int, ...]
    start: int
    tokens: tuple[int, ...]
    reset: bool = False
    commit: int | None = None
    num_drafts: int = 0
    mtp_start: int = 0
    mtp_next_tokens: tuple[int, ...] = ()
    logits: int = 1
    temperature: float | None = None
    restore: int | None = None
    snapshots: tuple[tuple[int, int], ...] = ()
    commit_snapshots: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[SeqWork, ...] = ()
    stop: bool = False  # ends the workers' step loops


@dataclass
class SeqResult:
    logits: object  # torch.Tensor [n, vocab] float32 on CPU (rank 0 only); None when not asked
    drafts: list[int] = field(default_factory=list)
    # Sampled on the device (only when the work had a temperature and a graph served it): the
    # target token at each returned position, and for a verify the drafts accepted (the engine
    # emits tokens[: num_accepted + 1]); None: sample `logits` on the host.
    tokens: list[int] | None = None
    num_accepted: int | None = None


@dataclass
class StepResult:
    seqs: list[SeqResult]
