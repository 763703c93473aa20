"""Sampling on the device with per-row parameters: the same draws in a CUDA graph, in an eager step and
on the CPU, with no host synchronisation.

Every row draws by Gumbel-max with noise hashed from (request seed, position, token) (kernels/noise.py):

- greedy and plain temperature rows: ``sample_plain`` (the Triton kernel on the model's kernel path,
  its torch reference elsewhere); this is what the decode and verify graphs capture.
- top-k / top-p rows: ``sample_filtered`` keeps the top-k logits (ties at the k-th kept), then the
  smallest prefix of the renormalised distribution whose mass reaches top_p (as the host sampler,
  engine/sampling.py), and draws from what is left with the same noise. Plain torch (one sort over
  the vocabulary of those rows only), run after the graph replay on its logits.
- logprobs (``logprobs``): log-softmax of the model's logits (not temperature-scaled, as OpenAI's),
  the chosen token's and the top n.

A request therefore gets the same token at the same position whichever path served its step, and
at any tensor-parallel size (every rank computes the same noise), which is what lets seeded, top-k /
top-p and logprob requests stay in the graphs. Requests whose logits are adjusted per request
(penalties, logit bias, min-p, min_new_tokens, a grammar) are still sampled on the host.
"""

from __future__ import annotations

import torch

from ling_runtime.kernels.noise import gumbel, row_keys, uniform_from_keys


def sample_plain(
    model: torch.nn.Module,
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    seeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    seed_div: int = 1,
) -> torch.Tensor:
    """Token ids [N] int64 from float32 logits [N, V]: greedy where ``temperature`` is 0 (or None: all
    greedy), else a draw from softmax(logits / T) with the hashed noise of ``seeds[row // seed_div]``
    and ``positions[row]``. Graph-safe."""
    kernels = getattr(model, "use_kernels", False)
    if temperature is None or seeds is None or positions is None:
        if kernels:
            # Imported here: the kernel imports Triton, which only the kernel path needs.
            from ling_runtime.kernels.sampling import sample

            zero = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
            return sample(logits, zero).long()
        return torch.argmax(logits, dim=-1)
    if kernels:
        from ling_runtime.kernels.sampling import sample

        return sample(logits, temperature, seeds=seeds, positions=positions, seed_div=seed_div).long()
    from ling_runtime.kernels.sampling import sample_ref

    return sample_ref(logits, temperature, None, seeds, positions, seed_div).long()


def sample_filtered(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Token ids [N] int64: top-k (k <= 0: off) then top-p filtering, then Gumbel-max with the hashed
    noise; greedy rows (temperature 0) take the argmax. Device ops only (graph-safe)."""
    lf = logits.float()
    vocab = lf.shape[1]
    t = temperature.float()[:, None]
    scaled = lf / t.clamp_min(1e-6)
    values, order = torch.sort(scaled, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).long()
    kth = values.gather(1, (k - 1)[:, None])
    keep = values >= kth
    probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    # The smallest prefix whose mass reaches top_p (the most likely token always stays).
    # (top_p >= 1 is off: a rounding cumsum must not drop the tail.)
    p = top_p.float()[:, None]
    keep &= ((torch.cumsum(probs, dim=-1) - probs) < p) | (p >= 1.0)
    kept = torch.zeros_like(keep).scatter_(1, order, keep)
    noise = gumbel(uniform_from_keys(row_keys(seeds, positions), vocab))
    noisy = torch.where(kept, scaled + noise, torch.full_like(scaled, float("-inf")))
    drawn = noisy.argmax(-1)
    return torch.where(t[:, 0] > 0, drawn, lf.argmax(-1))


def logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [N] float32, top ids [N, k] int64, top values [N, k] float32) of log_softmax(logits),
    k = max(top, 1) (never an empty tensor to copy back; callers keep the first ``top``)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens.long()[:, None])[:, 0]
    values, ids = torch.topk(logp, max(top, 1), dim=-1)
    return chosen, ids, values
