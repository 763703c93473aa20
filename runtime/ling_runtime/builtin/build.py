"""Build the built-in model once per machine and cache it; every later caller gets the directory.

The directory ``<cache>/builtin-<key>`` is a normal Hugging Face checkpoint (config.json, sharded
safetensors + index, tokenizer.json, tokenizer_config.json with the chat template,
generation_config.json) plus ``builtin.json`` (what was built, how long it took, the held-out
accuracy). ``key`` hashes everything the weights depend on: this package's source, the training
forward (``model/training.py``) and the checkpoint writer (``tiny.py``), the config, the recipe
and the generated data. The model's serving code is not in the key: it must compute what the
training forward computes, and the tests check that it does.

Concurrent builders (two pods starting at once, parallel test sessions) take an exclusive file
lock; the winner trains into a temporary sibling directory and renames it into place, the others
wait for the lock and find the finished directory. A directory without ``builtin.json`` (written
last) is never returned.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any, TextIO

from ling_runtime.builtin import data, tokenizer
from ling_runtime.builtin.train import Recipe

RECIPE = Recipe()
# The card's question must come out right in `make run`; the held-out accuracy is reported.
MARKER = "builtin.json"


def cache_root() -> Path:
    # The same cache root as the test fixtures (LING_CACHE, else $XDG_CACHE_HOME/ling).
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("LING_CACHE", xdg / "ling"))


def training_texts() -> list[str]:
    """Every training turn as the server sees it (prompt rendered by the chat template + answer)."""
    return [tokenizer.chat_prompt(e.question) + e.answer + "<|role_end|>" for e in data.task_data().train]


@cache
def tokenizer_json() -> str:
    return tokenizer.build_tokenizer_json(training_texts())


def builtin_config() -> dict[str, Any]:
    """config.json of the built-in model: Ling-2.6's structure at a size that trains on a laptop CPU.

    Eight layers in one layer group of 8 (seven Lightning layers, then MLA: Ling-2.6-flash's 1:7),
    a dense first layer, then MoE layers of 8 routed experts (top 2 of 2 kept groups out of 4,
    sigmoid scores with a selection bias) plus a shared expert, q LoRA, one MTP layer. Heads,
    experts' and MLPs' intermediate sizes and ``group_norm_size`` divide by 2 and 4, so TP 2 and 4
    shard it as they shard the real model.
    """
    from tokenizers import Tokenizer

    from ling_runtime.tiny import tiny_config

    vocab = Tokenizer.from_str(tokenizer_json()).get_vocab_size()
    special = tokenizer.special_ids()
    return tiny_config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=8,
        layer_group_size=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        group_norm_size=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        n_group=4,
        topk_group=2,
        max_position_embeddings=4096,
        bos_token_id=special[tokenizer.BOS_TOKEN],
        eos_token_id=[special[t] for t in tokenizer.EOS_TOKENS],
        pad_token_id=special[tokenizer.BOS_TOKEN],
    )


def _source_digest() -> str:
    from ling_runtime import tiny
    from ling_runtime.model import training

    h = hashlib.sha256()
    here = Path(__file__).parent
    # What the weights depend on (not __init__/__main__, which only re-export and parse flags).
    files = [here / f for f in ("build.py", "data.py", "tokenizer.py", "train.py")]
    for f in [*files, Path(training.__file__), Path(tiny.__file__)]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def builtin_key(config: dict[str, Any] | None = None, recipe: Recipe = RECIPE) -> str:
    material = {
        "config": config or builtin_config(),
        "recipe": recipe.as_dict(),
        "data": data.task_data().digest(),
        "code": _source_digest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every ~10 % otherwise."""

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.last_decile = -1

    def __call__(self, done: int, total: int, stats: dict[str, float]) -> None:
        elapsed = time.monotonic() - self.started
        left = elapsed / done * (total - done) if done else 0.0
        width = 30
        filled = width * done // total
        bar = "#" * filled + "." * (width - filled)
        losses = " ".join(f"{k} {v:.3f}" for k, v in stats.items())
        line = f"{self.what} [{bar}] {done}/{total} {elapsed:4.0f}s elapsed ~{left:3.0f}s left  {losses}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done == total else ""))
            self.stream.flush()
        elif 10 * done // total != self.last_decile or done == total:
            self.last_decile = 10 * done // total
            self.stream.write(line + "\n")
            self.stream.flush()


def say(msg: str) -> None:
    sys.stderr.write(f"[ling builtin] {msg}\n")
    sys.stderr.flush()


def builtin_model_dir(root: Path | None = None, recipe: Recipe = RECIPE) -> Path:
    """The cached built-in checkpoint directory, trained and written on first use (see module doc)."""
    config = builtin_config()
    root = root or cache_root()
    key = builtin_key(config, recipe)
    target = root / f"builtin-{key}"
    if (target / MARKER).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".builtin-{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another process is building the built-in model {key}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MARKER).exists():
            return target
        if target.exists():  # a directory without the marker: left by a crash mid-rename
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".builtin-{key}-", dir=root))
        try:
            build(staging, config, recipe, key)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def build(out: Path, config: dict[str, Any], recipe: Recipe, key: str) -> dict[str, Any]:
    """Train the model and write the checkpoint under ``out`` (``builtin.json`` last)."""
    import torch
    from tokenizers import Tokenizer

    from ling_runtime.builtin.train import checkpoint_tensors, encode_examples, train
    from ling_runtime.config import LingConfig
    from ling_runtime.loader import hf_tensor_shapes
    from ling_runtime.tiny import save_checkpoint

    say(
        f"training the built-in model {key} once for this machine (cached in {out.parent}; "
        f"{recipe.steps} steps on {recipe.threads} CPU thread(s), a few minutes)"
    )
    tok = Tokenizer.from_str(tokenizer_json())
    special = tokenizer.special_ids()

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    task = data.task_data()
    examples = encode_examples(task.train, encode, special["<|role_end|>"])
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        model, summary = train(
            config, examples, special[tokenizer.BOS_TOKEN], recipe, Progress("[ling builtin] training")
        )
        accuracy = held_out_accuracy(model, encode, tok.decode, special, recipe.eval_questions)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    cfg = LingConfig.from_hf(config)
    tensors = checkpoint_tensors(model)
    ordered = {k: tensors[k].contiguous() for k in hf_tensor_shapes(cfg, include_mtp=True)}
    save_checkpoint(out, dict(config, torch_dtype="float32"), ordered)
    for name, text in tokenizer.tokenizer_side_files(tokenizer_json()).items():
        (out / name).write_text(text)
    meta = {
        "key": key,
        "what": "the built-in Ling-2.6 tiny model, trained on ling_runtime.builtin.data",
        "parameters": sum(t.numel() for t in ordered.values()),
        "train_examples": len(task.train),
        "held_out_examples": len(task.held_out),
        "held_out_accuracy_eager": accuracy,
        "recipe": recipe.as_dict(),
        "torch": torch.__version__,
        **summary,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    say(
        f"built in {summary['train_seconds']:.0f}s: held-out accuracy {accuracy:.3f} "
        f"({len(task.held_out)} questions never seen in training)"
    )
    return meta


def held_out_accuracy(model, encode, decode, special: dict[str, int], limit: int | None = None) -> float:
    """Exact-match accuracy of greedy answers (the eager model) on the held-out questions."""
    import torch

    from ling_runtime.model.generate import greedy_generate

    held = data.task_data().held_out[:limit]
    prompts = [encode(tokenizer.chat_prompt(e.question)) for e in held]
    stops = [special[t] for t in tokenizer.EOS_TOKENS]
    right = 0
    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            outs = greedy_generate(model, prompts[i : i + 64], 24, stop_token_ids=stops)
            for e, ids in zip(held[i : i + 64], outs, strict=True):
                right += decode([t for t in ids if t not in stops]) == e.answer
    return right / max(1, len(held))
