"""What every tensor-parallel rank executes in one step: plain picklable data, broadcast from rank 0.

Rank 0 decides (scheduling, sampling, acceptance); every rank runs the same forward passes on its
shard from this description, so the ranks stay in lock step without a Ray call per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A token id the engine does not know yet: the token this slot's previous step sampled on the device
# (the overlap scheduler builds step n+1 before step n's tokens reach the host). Every rank resolves
# it from its own copy, which is identical: ranks sample the same logits with the same noise.
FUTURE_TOKEN = -1


@dataclass(frozen=True)
class RowSampling:
    """How the runner samples a sequence's tokens on the device (runner/sampler.py): greedy at
    temperature 0, else a draw from softmax(logits / temperature) after top-k (<= 0: off) and top-p
    filtering, with noise hashed from (seed, position). `logprobs` >= 0 also returns the chosen
    token's log-probability and the top `logprobs` (-1: none)."""

    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int = 0
    logprobs: int = -1

    @property
    def filtered(self) -> bool:
        return self.temperature > 0.0 and (self.top_k > 0 or self.top_p < 1.0)


GREEDY = RowSampling()


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
    - `tokens` may be `(FUTURE_TOKEN,)` for a one-token decode row: the token its slot's previous
      step sampled on the device (that step's result has not reached the engine yet).
    - `pages`: the sequence's MLA pages, as many as the positions this step reaches (not its whole
      reservation): the block table, and the MLA splits, follow the batch's real context.
    - `logits`: return target logits (or device-sampled tokens) for the last `logits` positions
      (0: none).
    - `sampling`: not None when the runner samples this sequence on the device (`RowSampling`) and
      hands back token ids (and logprobs) instead of logits; a graphed MTP verify then also accepts
      its drafts on the device. None: the engine samples the logits on the host (penalties, logit
      bias, min-p, min_new_tokens, grammars).
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
    sampling: RowSampling | None = None
    restore: int | None = None
    snapshots: tuple[tuple[int, int], ...] = ()
    commit_snapshots: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[SeqWork, ...] = ()
    stop: bool = False  # ends the workers' step loops


# One position's log-probabilities: (the chosen token's, ((token, logprob) of the top n, ...)).
Logprob = tuple[float, tuple[tuple[int, float], ...]]


@dataclass
class SeqResult:
    logits: object  # torch.Tensor [n, vocab] float32 on CPU (rank 0 only); None when not asked
    drafts: list[int] = field(default_factory=list)
    # Sampled on the device (the work had `sampling`): the target token at each returned position,
    # and for a graphed verify the drafts accepted (the engine emits tokens[: num_accepted + 1];
    # None: the engine counts them); None: sample `logits` on the host.
    tokens: list[int] | None = None
    num_accepted: int | None = None
    logprobs: list[Logprob] | None = None  # per returned position, when the sampling asked


@dataclass
class StepResult:
    seqs: list[SeqResult]
