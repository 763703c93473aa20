"""Checkpoint loading: key layout, errors naming key and shapes, MTP on/off, dtype, FP8 dequant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ling_runtime.config import LingConfig
from ling_runtime.loader import CheckpointError, hf_tensor_shapes
from ling_runtime.model import ForwardBatch, LingForCausalLM, greedy_generate
from ling_runtime.tiny import tiny_config, write_checkpoint
from safetensors.torch import load_file, save_file

from .conftest import load


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A single-file copy of ``src`` holding ``tensors`` (exercises the no-index path too)."""
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = config or json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_checkpoint_layout_is_the_hugging_face_one_and_deterministic(checkpoint, tmp_path) -> None:
    path = checkpoint("base")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert {"model.word_embeddings.weight", "lm_head.weight", "model.norm.weight"} <= keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense first layer
    assert "model.layers.1.attention.query_key_value.weight" in keys
    assert "model.layers.3.attention.kv_b_proj.weight" in keys
    assert "model.layers.4.eh_proj.weight" in keys  # MTP at index num_hidden_layers
    assert len(set(index["weight_map"].values())) == 2
    again = write_checkpoint(tmp_path / "again", tiny_config(), seed=0)
    a, b = _all_tensors(path), _all_tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.layers.1.mlp.gate.expert_bias"].abs().min() > 0
    assert not torch.allclose(a["model.norm.weight"], torch.ones(64))


def test_model_pieces_cover_exactly_the_checkpoint_keys() -> None:
    cfg = LingConfig.from_hf(tiny_config())
    model = LingForCausalLM(cfg, dtype=torch.float32, enable_mtp=True)
    used = {p.key for _, t in model.named_parameters() for p in t.ckpt_pieces}
    assert used == set(hf_tensor_shapes(cfg, include_mtp=True))


def test_missing_tensor_is_named(checkpoint, tmp_path) -> None:
    src = checkpoint("base")
    tensors = _all_tensors(src)
    del tensors["model.layers.2.attention.g_norm.weight"]
    bad = _rewrite(src, tmp_path / "bad", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.attention\.g_norm\.weight: missing"):
        load(bad)


def test_misshaped_tensor_names_key_and_both_shapes(checkpoint, tmp_path) -> None:
    src = checkpoint("base")
    tensors = _all_tensors(src)
    tensors["model.layers.3.attention.kv_b_proj.weight"] = torch.zeros(64, 31)
    bad = _rewrite(src, tmp_path / "bad", tensors)
    with pytest.raises(
        CheckpointError, match=r"kv_b_proj\.weight: checkpoint shape \[64, 31\] != model shape \[128, 32\]"
    ):
        load(bad)


def test_unexpected_tensor_is_named(checkpoint, tmp_path) -> None:
    src = checkpoint("base")
    tensors = _all_tensors(src)
    tensors["model.layers.1.attention.extra.weight"] = torch.zeros(2)
    tensors["model.layers.1.attention.slope"] = torch.zeros(4)  # ignored, recomputed from config
    bad = _rewrite(src, tmp_path / "bad", tensors)
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor\(s\).*model\.layers\.1\.attention\.extra\.weight"
    ):
        load(bad)


def test_mtp_weights_only_when_speculative_is_on(checkpoint, tmp_path) -> None:
    src = checkpoint("base")
    tensors = {k: v for k, v in _all_tensors(src).items() if not k.startswith("model.layers.4.")}
    no_mtp = _rewrite(src, tmp_path / "nomtp", tensors)
    load(no_mtp)  # fine without MTP
    with pytest.raises(CheckpointError, match=r"model\.layers\.4\.enorm\.weight: missing"):
        load(no_mtp, enable_mtp=True)
    model = load(src, enable_mtp=True)
    want = _all_tensors(src)["model.layers.4.eh_proj.weight"]
    assert torch.equal(model.mtp.eh_proj.weight, want)


def test_dtype_conversion_on_load(checkpoint) -> None:
    model = LingForCausalLM.from_pretrained(checkpoint("base"), dtype=torch.bfloat16)
    assert model.model.layers[1].attention.dense.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the fp32 router stays fp32
    ref = _all_tensors(checkpoint("base"))["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(model.model.norm.weight, ref)
    # The bf16 path runs end to end and stays near float32 (bf16 has ~3 significant digits).
    ids = [4, 8, 15, 16, 23, 42, 108, 77]
    logits = {}
    for dtype, m in ((torch.bfloat16, model), (torch.float32, load(checkpoint("base")))):
        cache = m.make_cache(num_slots=1, num_pages=1)
        logits[dtype] = m.compute_logits(m(ForwardBatch.build([ids], [0], [0], [[0]]), cache))
    assert logits[torch.bfloat16].dtype == torch.float32
    err = (logits[torch.bfloat16] - logits[torch.float32]).abs().max()
    assert 0 < err < 0.05 * logits[torch.float32].abs().max()


@pytest.mark.parametrize("tp_size", [1, 2])
def test_fp8_block_scaled_checkpoint_is_dequantized_on_load(tmp_path, tp_size: int) -> None:
    # 24x40 blocks do not align with the per-rank slices, so slicing must crop block scales.
    path = write_checkpoint(tmp_path / "fp8", tiny_config(), seed=2, fp8_block=(24, 40))
    raw = _all_tensors(path)
    key = "model.layers.1.attention.dense.weight"  # [64, 64], row-parallel: rank slices columns
    assert raw[key].dtype == torch.float8_e4m3fn
    scale = raw[key.replace("weight", "weight_scale_inv")]
    assert scale.shape == (3, 2)
    full = raw[key].float() * scale.repeat_interleave(24, 0).repeat_interleave(40, 1)[:64, :64]
    cfg = LingConfig.from_hf(path)
    for rank in range(tp_size):
        model = LingForCausalLM(cfg, tp_rank=rank, tp_size=tp_size, dtype=torch.float32)
        model.load_weights(path)
        cols = slice(rank * 64 // tp_size, (rank + 1) * 64 // tp_size)
        torch.testing.assert_close(
            model.model.layers[1].attention.dense.weight, full[:, cols], rtol=0, atol=0
        )
    if tp_size == 1:
        assert len(greedy_generate(model, [5, 6, 7], 4)) == 4
    shutil.rmtree(path)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_each_rank_reads_only_its_shard(checkpoint, tp_size: int) -> None:
    path = checkpoint("base")
    cfg = LingConfig.from_hf(path)
    full = LingForCausalLM(cfg, dtype=torch.float32)
    whole_model = full.load_weights(path)
    assert whole_model.elements == sum(p.numel() for p in full.parameters())
    replicated = 0
    for rank in range(tp_size):
        m = LingForCausalLM(cfg, tp_rank=rank, tp_size=tp_size, dtype=torch.float32)
        report = m.load_weights(path)
        # Exactly the rank's own parameters are read (tiny dims divide evenly: no vocab padding).
        assert report.elements == sum(p.numel() for p in m.parameters())
        assert report.tensors == whole_model.tensors
        replicated = sum(
            p.numel() for n, p in m.named_parameters() if "norm" in n or "_a_proj" in n or "gate.w" in n
        )
    # Everything but the replicated tensors (norms, q_a/kv_a, router) is split tp_size ways.
    assert report.elements < (whole_model.elements - replicated) / tp_size + replicated + 1


def test_random_init_without_files_equals_loading_the_written_checkpoint(checkpoint) -> None:
    from ling_runtime.tiny import init_random_weights

    path = checkpoint("base")
    cfg = LingConfig.from_hf(path)
    for rank in range(2):
        loaded = LingForCausalLM(cfg, tp_rank=rank, tp_size=2, dtype=torch.float32, enable_mtp=True)
        loaded.load_weights(path)
        drawn = LingForCausalLM(cfg, tp_rank=rank, tp_size=2, dtype=torch.float32, enable_mtp=True)
        init_random_weights(drawn, seed=0)
        for (name, a), (_, b) in zip(loaded.named_parameters(), drawn.named_parameters(), strict=True):
            assert torch.equal(a, b), name


def test_router_bias_under_its_deepseek_name_loads(checkpoint, tmp_path) -> None:
    src = checkpoint("base")
    tensors = _all_tensors(src)
    bias = tensors.pop("model.layers.2.mlp.gate.expert_bias")
    tensors["model.layers.2.mlp.gate.e_score_correction_bias"] = bias
    model = load(_rewrite(src, tmp_path / "alias", tensors))
    assert torch.equal(model.model.layers[2].mlp.gate.expert_bias, bias)
