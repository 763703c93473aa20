"""The prefix cache against independent oracles and through every layer: mlx-lm's own greedy decode,
a tensor-parallel group of two ranks (TP 2, with and without MTP), the Triton prefill path's
snapshots (kernels interpreted on the CPU) and the OpenAI usage field. Plus `--load-format dummy`."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from ling_runtime.cli import parse_serve_args
from ling_runtime.config import LingConfig
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.loader import LING_2_6_FLASH_CONFIG, fill_dummy
from ling_runtime.model import LingForCausalLM, greedy_generate
from ling_runtime.runner.build import build_runner
from ling_runtime.tiny import tiny_config, write_checkpoint

from tests.runtime.conftest import RunningServer, free_port
from tests.runtime.test_groups import spawn, stop, wait_healthy

from .engine_utils import generate_all, make_engine, output_ids

ROOT = Path(__file__).resolve().parents[2]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def words(seed: int, n: int, hi: int = 250) -> list[int]:
    return torch.randint(3, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_cached_turns_and_branches_match_mlx(tmp_path_factory, tokenizer) -> None:
    from tests.model.mlx_ref import mlx_greedy

    path = write_checkpoint(tmp_path_factory.mktemp("mlxpc"), tiny_config(), seed=4)
    system = words(40, 140, 512)
    first = system + words(41, 20, 512)
    engine = make_engine(path, tokenizer)
    try:
        (ev1,) = generate_all(engine, [first], [greedy(16)])
        later = [first + output_ids(ev1) + words(42, 30, 512), system[:100] + words(43, 50, 512)]
        events = [ev1, *generate_all(engine, later, [greedy(16)] * 2)]
    finally:
        engine.stop()
    assert [e[-1].cached_tokens for e in events] == [0, 128, 64]
    assert [output_ids(e) for e in events] == [mlx_greedy(path, p, 16)[0] for p in [first, *later]]


# ---- TP 2 ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("steps", [0, 2])
def test_tp2_group_reuses_prefixes_on_every_rank(tmp_path: Path, builtin_dir, steps: int) -> None:
    port = free_port()
    argv = ["--tp-size", "2", "--launcher", "mp", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    if steps:
        argv += ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", str(steps)]
    log = tmp_path / "tp2.log"
    proc = spawn([*argv, "--host", "127.0.0.1", "--port", str(port)], log)
    url = f"http://127.0.0.1:{port}"

    def generate(ids: list[int]) -> dict:
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
        }
        return httpx.post(f"{url}/generate", json=body, timeout=120).json()

    try:
        wait_healthy(url, [proc], [log], timeout=180)
        first = words(50, 200)
        r1 = generate(first)
        second = first + r1["output_ids"] + words(51, 40)
        r2 = generate(second)
        branch = generate(first[:150] + words(52, 30))
    finally:
        stop(proc)
    oracle = LingForCausalLM.from_pretrained(builtin_dir, dtype=torch.float32)
    prompts = [first, second, first[:150] + words(52, 30)]
    assert [r["output_ids"] for r in (r1, r2, branch)] == [greedy_generate(oracle, p, 12) for p in prompts]
    assert [r["meta_info"]["cached_tokens"] for r in (r1, r2, branch)] == [0, 192, 128]


# ---- the Triton prefill path keeps the same snapshots --------------------------------------------
_KERNEL_SCRIPT = """
import json, torch
from ling_runtime.model import ForwardBatch, LingForCausalLM
from ling_runtime.tiny import tiny_config
from ling_runtime.config import LingConfig

cfg = LingConfig.from_hf(tiny_config())
model = LingForCausalLM(cfg, dtype=torch.float32, use_kernels=False)
g = torch.Generator().manual_seed(0)
for p in model.parameters():
    p.data.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 if p.dim() > 1 else torch.ones(p.shape))
layer = model.model.layers[cfg.linear_layer_ids[0]].attention
ids = torch.randint(3, 500, (300,), generator=g).tolist()
# Row 0: a 192-token chunk resuming at 64 with snapshots after 64 and 128 of its tokens; row 1: a
# decode row riding along; row 2: a fresh 40-token prompt.
batch = ForwardBatch.build([ids[64:256], [7], ids[:40]], [64, 10, 0], [0, 1, 2],
                           [list(range(0, 20)), list(range(20, 40)), list(range(40, 60))],
                           snapshots=[(0, 64, 0), (0, 128, 1)])
x = torch.randn(batch.num_tokens, cfg.hidden_size, generator=g)
out = {}
for kernels in (False, True):
    cache = model.make_cache(num_slots=3, num_pages=64, num_snapshots=2)
    cache.linear_state.copy_(torch.randn(cache.linear_state.shape, generator=torch.Generator().manual_seed(1)))
    layer.use_kernels = kernels
    y = layer(x, batch, cache)
    out[kernels] = (y, cache.snapshot_state.clone(), cache.linear_state.clone())
print(json.dumps({
    "out": (out[True][0] - out[False][0]).abs().max().item(),
    "snapshots": (out[True][1] - out[False][1]).abs().max().item(),
    "state": (out[True][2] - out[False][2]).abs().max().item(),
    "scale": out[False][1].abs().max().item(),
}))
"""


def test_the_triton_prefill_takes_the_same_snapshots_as_the_reference() -> None:
    # TRITON_INTERPRET must be set before triton is first imported: a process of its own.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _KERNEL_SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = json.loads(proc.stdout.strip().splitlines()[-1])
    assert diff["scale"] > 0.1  # the snapshots were written at all
    assert diff["snapshots"] < 1e-4 and diff["state"] < 1e-4 and diff["out"] < 1e-4, diff


# ---- the OpenAI usage field and the metrics ------------------------------------------------------
def test_usage_reports_cached_prompt_tokens(builtin_dir) -> None:
    system = "You are a careful assistant. " * 30
    with RunningServer(["--served-model-name", "ling-tiny"]) as server:
        client = server.openai()
        replies = [
            client.chat.completions.create(
                model="ling-tiny",
                messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
                max_tokens=4,
                temperature=0,
            )
            for q in ("What is the capital of France?", "What is 2 + 2?")
        ]
        stream = client.chat.completions.create(
            model="ling-tiny",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in stream if c.usage is not None][-1]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert replies[0].usage.prompt_tokens_details.cached_tokens == 0
    hit = replies[1].usage.prompt_tokens_details.cached_tokens
    assert hit > 0 and hit % 64 == 0 and hit <= replies[1].usage.prompt_tokens - 1
    assert usage.prompt_tokens_details.cached_tokens == hit
    cached = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("ling_runtime_cached_prompt_tokens_total")
    )
    assert cached == 2 * hit and "ling_runtime_prefix_cache_hit_rate" in metrics


# ---- --load-format dummy --------------------------------------------------------------------------
def config_only_dir(tmp_path: Path, builtin_dir: Path, **overrides) -> Path:
    """A checkpoint directory without weights: config.json and the built-in tokenizer files."""
    path = tmp_path / "config-only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_config(vocab_size=1024, **overrides)))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(builtin_dir / name, path / name)
    return path


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_dummy_weights_serve_a_config_without_a_checkpoint(
    tmp_path: Path, builtin_dir, tokenizer, quantization
) -> None:
    path = config_only_dir(tmp_path, builtin_dir)
    settings = parse_serve_args(["--model-path", str(path), "--load-format", "dummy"]).resolve(str(path))
    settings = dataclasses.replace(settings, quantization=quantization)
    runner, _ = build_runner(settings)
    assert not list(path.glob("*.safetensors"))
    weights = dict(runner.model.named_parameters())
    dtypes = {p.dtype for p in weights.values()}
    assert (torch.float8_e4m3fn in dtypes) == (quantization == "fp8")
    assert all(p.float().abs().sum() > 0 for p in weights.values())  # every tensor was filled
    engine = make_engine(path, tokenizer, load_format="dummy", quantization=quantization)
    try:
        (a,) = generate_all(engine, [words(1, 30)], [greedy(6)])
        (b,) = generate_all(engine, [words(1, 30)], [greedy(6)])
    finally:
        engine.stop()
    assert len(output_ids(a)) == 6 and output_ids(a) == output_ids(b)


def test_dummy_replicated_weights_agree_across_ranks_and_shards_differ() -> None:
    cfg = LingConfig.from_hf(tiny_config())
    shards = [LingForCausalLM(cfg, tp_rank=r, tp_size=2, dtype=torch.float32) for r in range(2)]
    for r, model in enumerate(shards):
        fill_dummy(model, seed=5, tp_rank=r)
    mla = cfg.mla_layer_ids[0]
    a, b = (dict(m.named_parameters()) for m in shards)
    kv_a = f"model.layers.{mla}.attention.kv_a_proj_with_mqa.weight"  # replicated on every rank
    dense = f"model.layers.{mla}.attention.dense.weight"  # row-parallel: a shard each
    assert torch.equal(a[kv_a], b[kv_a]) and not torch.equal(a[dense], b[dense])


def test_dummy_without_a_model_path_is_ling_2_6_flash(tmp_path: Path, monkeypatch) -> None:
    from ling_runtime.builtin.dummy import dummy_model_dir
    from ling_runtime.server.launch import resolve_model_dir

    monkeypatch.setenv("LING_CACHE", str(tmp_path))
    settings = parse_serve_args(["--load-format", "dummy"])
    path = resolve_model_dir(settings)
    assert Path(path) == dummy_model_dir() and not list(Path(path).glob("*.safetensors"))
    resolved = settings.resolve(path)
    cfg = LingConfig.from_hf(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.vocab_size) == (
        4096,
        32,
        256,
        157184,
    )
    assert list(cfg.mla_layer_ids) == [7, 15, 23, 31] and resolved.context_length == 131072
    assert json.loads((Path(path) / "config.json").read_text()) == json.loads(
        json.dumps(LING_2_6_FLASH_CONFIG)
    )


def test_the_prefix_cache_and_scheduling_flags() -> None:
    from ling_runtime.settings import SettingsError

    s = parse_serve_args([])
    assert s.prefix_cache and s.mamba_track_interval == 64 and s.schedule_policy == "fcfs"
    assert s.num_snapshots == 64 and s.load_format == "auto"
    s = parse_serve_args(
        ["--schedule-policy", "lpm", "--mamba-track-interval", "128", "--max-mamba-snapshots", "9"]
    )
    assert (s.schedule_policy, s.mamba_track_interval, s.num_snapshots) == ("lpm", 128, 9)
    assert parse_serve_args(["--max-running-requests", "4"]).num_snapshots == 32
    assert parse_serve_args(["--disable-radix-cache"]).num_snapshots == 0
    # SGLang's no_buffer keeps no Lightning snapshots: nothing to resume from in this hybrid model.
    assert not parse_serve_args(["--mamba-scheduler-strategy", "no_buffer"]).prefix_cache
    assert parse_serve_args(["--mamba-scheduler-strategy", "extra_buffer"]).prefix_cache
    with pytest.raises(SettingsError, match="--mamba-track-interval 96: must be a multiple of 64"):
        parse_serve_args(["--mamba-track-interval", "96"])
    with pytest.raises(SettingsError, match="invalid choice: 'sjf'"):
        parse_serve_args(["--schedule-policy", "sjf"])
