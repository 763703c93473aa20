"""The tiny model with ``use_kernels=True`` vs the plain-torch path, step by step (run by
test_model_kernels.py in a subprocess: TRITON_INTERPRET=1 must be set before triton is imported).

Prints one JSON line: per step, the max |logit difference| and whether the greedy tokens agree.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from ling_runtime.config import LingConfig
from ling_runtime.model import ForwardBatch, LingForCausalLM
from ling_runtime.tiny import init_random_weights, tiny_config

PAGE = 16


def _count_kernel_calls() -> dict[str, int]:
    """Wrap the kernel entry points the model calls, so the test can tell the kernels really ran
    (the model looks them up on the module at call time)."""
    from ling_runtime import kernels

    calls: dict[str, int] = {}
    names = ("qk_norm_rope", "lightning_decode", "lightning_verify", "lightning_prefill_chunked",
             "group_rmsnorm_gate", "mla_decode", "moe_route", "fused_moe", "add_rmsnorm")  # fmt: skip
    for name in names:
        fn = getattr(kernels, name)

        def wrapped(*a: object, _fn: object = fn, _name: str = name, **kw: object) -> object:
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **kw)  # type: ignore[operator]

        setattr(kernels, name, wrapped)
        calls[name] = 0
    return calls


def run() -> dict[str, object]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before starting"
    calls = _count_kernel_calls()
    torch.manual_seed(0)
    # qk_rope_head_dim 16: the MLA kernel's tl.dot needs >= 16 wide operands.
    cfg = LingConfig.from_hf(tiny_config(qk_rope_head_dim=16))
    # chunk_size 16: a 40-token prompt spans three Lightning chunks, carried state included.
    model = LingForCausalLM(cfg, dtype=torch.float32, chunk_size=16, use_kernels=False)
    init_random_weights(model, seed=3)
    caches = {
        flag: model.make_cache(num_slots=4, num_pages=32, page_size=PAGE, max_spec_tokens=3)
        for flag in (0, 1)
    }
    for c in caches.values():  # stale state in every slot: new sequences must not see it
        c.linear_state.normal_()
    tables = {1: list(range(0, 8)), 3: list(range(8, 16)), 0: list(range(16, 24))}
    steps: list[dict[str, float | bool]] = []

    def step(
        name: str, tokens: list[list[int]], prefix: list[int], slots: list[int], keep: bool = False
    ) -> torch.Tensor:
        logits = {}
        for flag in (0, 1):
            model.set_use_kernels(bool(flag))
            batch = ForwardBatch.build(
                tokens, prefix, slots, [tables[s] for s in slots], keep_linear_states=keep
            )
            logits[flag] = model.compute_logits(model(batch, caches[flag])).float()
        diff = float((logits[0] - logits[1]).abs().max())
        same = bool(torch.equal(logits[0].argmax(-1), logits[1].argmax(-1)))
        steps.append({"step": name, "max_abs_diff": diff, "greedy_equal": same})  # type: ignore[dict-item]
        return logits[0]

    def last_tokens(logits: torch.Tensor, lens: list[int]) -> list[int]:
        ends = torch.tensor(lens).cumsum(0) - 1
        return logits[ends].argmax(-1).tolist()

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (11, 40)]
    slots = [1, 3]
    lg = step("prefill", prompts, [0, 0], slots)
    nxt = last_tokens(lg, [11, 40])
    pos = [11, 40]
    for i in range(3):
        lg = step(f"decode{i}", [[t] for t in nxt], pos, slots)
        nxt = lg.argmax(-1).tolist()
        pos = [p + 1 for p in pos]
    # Spec verify of the next token plus two drafts, then a commit of 2 and 3 of them (as if a
    # sampler accepted them): the rollback must leave both paths' states equal.
    drafts = [[nxt[0], 5, 6], [nxt[1], 9, 10]]
    lg = step("verify", drafts, pos, slots, keep=True)
    preds = lg.argmax(-1).view(2, 3).tolist()
    accepted = [2, 3]
    for c in caches.values():
        c.commit_linear_state(slots, accepted)
    nxt = [preds[b][accepted[b] - 1] for b in range(2)]
    pos = [p + a for p, a in zip(pos, accepted, strict=True)]
    for i in range(2):
        lg = step(f"after_commit{i}", [[t] for t in nxt], pos, slots)
        nxt = lg.argmax(-1).tolist()
        pos = [p + 1 for p in pos]
    # A one-token prompt takes the decode path with prefix 0 in a stale slot.
    step("one_token_prompt", [[42]], [0], [0])
    return {"steps": steps, "calls": calls}


if __name__ == "__main__":
    json.dump(run(), sys.stdout)
