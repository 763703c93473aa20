"""Train the built-in model on the task of ``data.py``, deterministically, on the CPU.

The model is the runtime's own ``LingForCausalLM`` (TP 1, float32, MTP layer built), run through
``model.training.training_forward``. Loss: cross-entropy on the assistant's answer tokens (its
closing ``<|role_end|>`` included) for the main model, plus, for the MTP layer, cross-entropy on the
token after next over the answer, for ``mtp_passes`` chained passes (pass j feeds the layer its own
pass j-1 output, as draft step j does). The router's ``expert_bias`` is trained the Ling /
DeepSeek-V3 way, without an auxiliary loss: after each step every expert's bias moves by
``bias_rate`` towards balance (up if it got fewer tokens than the mean, down otherwise).

Determinism: one seed for the initial weights and the batch order, a fixed thread count, float32,
``torch.use_deterministic_algorithms``. The same code, data and torch build give the same bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ling_runtime.builtin.data import Example
from ling_runtime.config import LingConfig
from ling_runtime.model.ling import LingForCausalLM
from ling_runtime.model.moe import SparseMoE
from ling_runtime.model.training import training_forward, training_logits


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_passes: int = 3
    mtp_weight: float = 0.5
    bias_rate: float = 1e-3
    threads: int = 1
    eval_questions: int | None = None  # held-out questions the build scores (None: all of them)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Encoded:
    ids: list[int]
    answer_start: int  # index of the first answer token


def encode_examples(
    examples: tuple[Example, ...], encode: Callable[[str], list[int]], role_end: int
) -> list[Encoded]:
    from ling_runtime.builtin.tokenizer import chat_prompt

    out = []
    for e in examples:
        prompt = encode(chat_prompt(e.question))
        out.append(Encoded(prompt + encode(e.answer) + [role_end], len(prompt)))
    return out


def make_batch(rows: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, T] right-padded, main-loss mask [B, T], MTP-loss mask [B, T]).

    The main mask marks positions whose next token is an answer token; the MTP mask positions p
    from the last prompt token on whose token p+2 is an answer token (what drafts propose).
    """
    t = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.int64)
    main = torch.zeros(len(rows), t, dtype=torch.bool)
    mtp = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        n, p = len(r.ids), r.answer_start
        ids[i, :n] = torch.tensor(r.ids)
        main[i, p - 1 : n - 1] = True
        mtp[i, p - 1 : n - 2] = True
    return ids, main, mtp


def epoch_batches(lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length within windows of 16 batches so a
    batch pads little, then the batches shuffled again (all from ``gen``: deterministic)."""
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = 16 * batch_size
    batches = []
    for start in range(0, len(perm), window):
        chunk = sorted(perm[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _targets(ids: torch.Tensor, shift: int, pad_id: int) -> torch.Tensor:
    pad = torch.full((ids.shape[0], shift), pad_id, dtype=ids.dtype)
    return torch.cat([ids[:, shift:], pad], dim=1)


def init_weights(model: LingForCausalLM, seed: int) -> None:
    """Seeded draws (``tiny.init_random_weights``), then norms at 1, expert biases at 0 and the
    residual-branch outputs scaled by ``1/sqrt(2 * layers)`` (GPT-2 style) so training starts stable."""
    from ling_runtime.tiny import init_random_weights

    init_random_weights(model, seed)
    depth = model.config.num_hidden_layers + 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(("enorm.weight", "hnorm.weight")):
                p.fill_(1.0)
            elif name.endswith("expert_bias"):
                p.zero_()
            elif name.endswith(("dense.weight", "down_proj.weight", ".w2")):
                p.mul_((2 * depth) ** -0.5)


@torch.no_grad()
def _balance_experts(
    model: LingForCausalLM, inputs: list[torch.Tensor], valid: torch.Tensor, rate: float
) -> None:
    """Aux-loss-free balancing: each expert's selection bias moves ``rate`` towards the mean load.
    ``inputs`` are in the order the forward met the MoE layers: the main model's, then one per
    MTP pass (all of the one MTP layer); only rows of real tokens (``valid``) count."""
    main = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    groups: list[tuple[SparseMoE, list[torch.Tensor]]] = [
        (m, [x]) for m, x in zip(main, inputs, strict=False)
    ]
    if model.mtp is not None and len(inputs) > len(main):
        groups.append((model.mtp.mlp, inputs[len(main) :]))
    for moe, xs in groups:
        if moe.gate.expert_bias is None:
            continue
        counts = torch.zeros(moe.cfg.num_experts)
        for x in xs:
            _, ids = moe.route(x[valid])
            counts += torch.bincount(ids.reshape(-1), minlength=moe.cfg.num_experts).float()
        moe.gate.expert_bias += rate * torch.sign(counts.mean() - counts)


def train(
    config: dict[str, Any],
    examples: list[Encoded],
    pad_id: int,
    recipe: Recipe,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[LingForCausalLM, dict[str, Any]]:
    """Train from scratch; returns the model (eval mode, kernels off) and a summary of the run."""
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(recipe.seed)
    cfg = LingConfig.from_hf(config)
    model = LingForCausalLM(
        cfg, dtype=torch.float32, enable_mtp=cfg.num_nextn_predict_layers > 0, use_kernels=False
    )
    init_weights(model, recipe.seed)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("expert_bias"):
            continue  # moved by the balancing rule, not by gradients
        p.requires_grad_(True)
        (no_decay if p.dim() < 2 or "embeddings" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (
            recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        )

    order = torch.Generator().manual_seed(recipe.seed)
    batches: list[list[int]] = []
    started = time.monotonic()
    stats: dict[str, float] = {}
    mtp_passes = recipe.mtp_passes if model.mtp is not None else 0
    for step in range(recipe.steps):
        if not batches:
            batches = epoch_batches([len(e.ids) for e in examples], recipe.batch_size, order)
        rows = [examples[i] for i in batches.pop()]
        ids, main_mask, mtp_mask = make_batch(rows, pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = training_forward(model, ids, mtp_passes=mtp_passes)
        logits = training_logits(model, out.hidden[main_mask])
        loss_main = F.cross_entropy(logits, _targets(ids, 1, pad_id)[main_mask])
        loss = loss_main
        mtp_losses = []
        for h in out.mtp_hidden:
            lg = training_logits(model, h[mtp_mask])
            mtp_losses.append(F.cross_entropy(lg, _targets(ids, 2, pad_id)[mtp_mask]))
        if mtp_losses:
            loss = loss + recipe.mtp_weight * sum(mtp_losses) / len(mtp_losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], recipe.grad_clip)
        opt.step()
        _balance_experts(model, out.moe_inputs, (ids != pad_id).reshape(-1), recipe.bias_rate)
        stats = {"loss": loss_main.item()} | {f"mtp{i + 1}": x.item() for i, x in enumerate(mtp_losses)}
        if progress is not None:
            progress(step + 1, recipe.steps, stats)
    for p in model.parameters():
        p.requires_grad_(False)
    summary = {
        "train_seconds": round(time.monotonic() - started, 1),
        "final_losses": {k: round(v, 4) for k, v in stats.items()},
        "threads": recipe.threads,
    }
    return model, summary


def checkpoint_tensors(model: LingForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face checkpoint keys (TP 1: every piece is local)."""
    full: dict[str, torch.Tensor] = {}
    for p in model.parameters():
        for piece in getattr(p, "ckpt_pieces", []):
            if piece.key not in full:
                dtype = torch.float32
                full[piece.key] = torch.zeros(piece.shape, dtype=dtype)
            full[piece.key][piece.src] = p.detach()[piece.dst].to(torch.float32)
    return full
