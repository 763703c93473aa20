"""The built-in model's build: training forward == serving forward, tokenizer, task split, cache.

The trained model's answers (TP 1, TP 2, MTP) are checked in test_builtin_answers.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ling_runtime.builtin import CARD_ANSWER, CARD_QUESTION, SPECIAL_TOKENS, builtin_config, data, tokenizer
from ling_runtime.builtin.build import MARKER, builtin_key
from ling_runtime.builtin.train import Recipe
from ling_runtime.config import LingConfig
from ling_runtime.model import ForwardBatch, LingForCausalLM
from ling_runtime.model.training import training_forward, training_logits
from ling_runtime.text.tokenizer import TokenizerBundle
from ling_runtime.tiny import init_random_weights, tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def random_model() -> LingForCausalLM:
    # Both layer kinds (7 Lightning + MLA), dense + MoE layers, q LoRA, the MTP layer.
    cfg = LingConfig.from_hf(tiny_config(num_hidden_layers=8, layer_group_size=8))
    model = LingForCausalLM(cfg, dtype=torch.float32, enable_mtp=True, use_kernels=False)
    init_random_weights(model, seed=5)
    return model


def test_training_forward_computes_what_the_serving_forward_computes(random_model) -> None:
    model = random_model
    lens = [21, 13, 30]
    ids = torch.randint(
        0, model.config.vocab_size, (3, max(lens)), generator=torch.Generator().manual_seed(1)
    )
    out = training_forward(model, ids, mtp_passes=2)
    # Serving path: each row as its own sequence of its own length (right padding must not leak).
    seqs = [ids[b, :n].tolist() for b, n in enumerate(lens)]
    cache = model.make_cache(num_slots=3, num_pages=6, page_size=16, max_spec_tokens=0)
    tables = [[2 * b, 2 * b + 1] for b in range(3)]
    hidden = model(ForwardBatch.build(seqs, [0, 0, 0], [0, 1, 2], tables), cache)
    served = model.compute_logits(hidden)
    trained = training_logits(model, out.hidden)
    at = 0
    for b, n in enumerate(lens):
        torch.testing.assert_close(trained[b, :n], served[at : at + n], rtol=1e-5, atol=1e-5)
        at += n
    # MTP pass 1 at position p = mtp_forward with token p+1 and the main hidden at p.
    nxt = [s[1:] for s in seqs]
    prev = torch.cat([hidden[sum(lens[:b]) : sum(lens[: b + 1]) - 1] for b in range(3)])
    mtp = model.mtp_forward(ForwardBatch.build(nxt, [0, 0, 0], [0, 1, 2], tables), cache, prev)
    at = 0
    for b, n in enumerate(lens):
        torch.testing.assert_close(out.mtp_hidden[0][b, : n - 1], mtp[at : at + n - 1], rtol=1e-5, atol=1e-5)
        at += n - 1


def test_training_forward_reaches_every_trained_weight(random_model) -> None:
    model = random_model
    params = {n: p for n, p in model.named_parameters() if not n.endswith("expert_bias")}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(2))
        out = training_forward(model, ids, mtp_passes=2)
        loss = training_logits(model, out.hidden).logsumexp(-1).mean()
        loss = loss + sum(training_logits(model, h).logsumexp(-1).mean() for h in out.mtp_hidden)
        loss.backward()
        # Experts that no token picked legitimately get no gradient; everything else must.
        missing = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not [n for n in missing if not n.endswith((".w13", ".w2"))], missing
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None


def test_chat_prompt_is_what_the_template_renders(builtin_dir: Path) -> None:
    bundle = TokenizerBundle.from_dir(builtin_dir)
    for q in (CARD_QUESTION, "hi", "What is 3 plus 4?"):
        assert bundle.apply_chat_template([{"role": "user", "content": q}]) == tokenizer.chat_prompt(q)


def test_the_task_words_are_single_readable_tokens(builtin_dir: Path) -> None:
    bundle = TokenizerBundle.from_dir(builtin_dir)
    ids = bundle.encode(CARD_ANSWER)
    pieces = [bundle.tokenizer.id_to_token(i) for i in ids]
    assert pieces == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
    assert bundle.decode(ids) == CARD_ANSWER
    for t in SPECIAL_TOKENS:
        assert len(bundle.encode(t)) == 1
    # Still byte-level: any text round-trips.
    text = "Grüße ✓ <tool_call>{}</tool_call>"
    assert bundle.decode(bundle.encode(text), skip_special_tokens=False) == text
    assert bundle.vocab_size == builtin_config()["vocab_size"] and bundle.vocab_size % 64 == 0


def test_held_out_questions_are_never_trained_but_their_parts_are() -> None:
    task = data.task_data()
    trained = {e.question for e in task.train}
    assert CARD_QUESTION in trained
    assert len(task.held_out) >= 150
    facts = {e.fact for e in task.train}
    phrasings = {(e.relation, e.phrasing) for e in task.train}
    for e in task.held_out:
        assert e.question not in trained
        assert e.fact in facts and (e.relation, e.phrasing) in phrasings
    relations = {e.relation for e in data.held_out_sample(24)}
    assert relations == {"capital", "country_of", "continent", "plus", "minus", "times"}


def test_the_config_is_ling_shaped_and_shards_by_two_and_four() -> None:
    cfg = LingConfig.from_hf(builtin_config())
    assert cfg.mla_layer_ids == [7] and len(cfg.linear_layer_ids) == 7  # Ling-2.6-flash's 1:7
    assert cfg.first_k_dense_replace == 1 and cfg.num_shared_experts == 1 and cfg.n_group > cfg.topk_group
    assert cfg.num_nextn_predict_layers == 1 and cfg.score_function == "sigmoid"
    for tp in (2, 4):
        cfg.validate_tp(tp)


def test_the_cache_key_covers_recipe_and_code() -> None:
    assert builtin_key() == builtin_key()
    assert builtin_key(recipe=dataclasses.replace(Recipe(), steps=7)) != builtin_key()


BUILD = (
    "import sys; from pathlib import Path; from ling_runtime.builtin.build import builtin_model_dir; "
    "from ling_runtime.builtin.train import Recipe; "
    "print(builtin_model_dir(Path(sys.argv[1]), Recipe(steps=3, batch_size=8, mtp_passes=1, eval_questions=2)))"
)


def _builders(root: Path, n: int) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_concurrent_builders_train_once_and_the_result_is_deterministic(tmp_path: Path) -> None:
    first = _builders(tmp_path / "a", 2)
    dirs = {r.stdout.strip() for r in first}
    assert len(dirs) == 1, dirs
    built = Path(dirs.pop())
    assert sum("training the built-in model" in r.stderr for r in first) == 1, [r.stderr for r in first]
    assert (built / MARKER).exists() and (built / "tokenizer.json").exists()
    # No staging directory is left behind, only the model and its lock file.
    assert sorted(p.name for p in built.parent.iterdir() if p.is_dir()) == [built.name]
    meta = json.loads((built / MARKER).read_text())
    assert meta["recipe"]["steps"] == 3
    # A second, independent build on this machine writes the same bytes.
    (again,) = _builders(tmp_path / "b", 1)
    other = Path(again.stdout.strip())
    assert other.name == built.name
    for f in sorted(built.glob("*.safetensors")):
        assert f.read_bytes() == (other / f.name).read_bytes(), f.name
    # A later caller pays nothing: it finds the directory without training.
    (cached,) = _builders(tmp_path / "a", 1)
    assert cached.stdout.strip() == str(built) and "training" not in cached.stderr
