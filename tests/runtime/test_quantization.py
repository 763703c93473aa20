"""`--quantization fp8`: the flag reaches the model, whose projection and expert weights are then FP8
and whose greedy output equals the same FP8 weights dequantized (the kernels' CPU reference)."""

from __future__ import annotations

import torch
from ling_runtime.cli import parse_serve_args
from ling_runtime.engine.sampling import SamplingParams
from ling_runtime.model import greedy_generate
from ling_runtime.runner.build import build_runner
from ling_runtime.settings import Settings

from .engine_utils import generate_all, make_engine, output_ids


def test_quantization_flag_reaches_the_settings(builtin_dir) -> None:
    args = parse_serve_args(["--model-path", str(builtin_dir), "--quantization", "fp8"])
    assert args.resolve(str(builtin_dir)).quantization == "fp8"
    assert parse_serve_args(["--model-path", str(builtin_dir)]).resolve(str(builtin_dir)).quantization is None


def test_fp8_engine_serves_fp8_weights_greedily(builtin_dir, tokenizer) -> None:
    runner, _ = build_runner(Settings(quantization="fp8").resolve(str(builtin_dir)))
    dtypes = {p.dtype for p in runner.model.parameters()}
    assert torch.float8_e4m3fn in dtypes, dtypes
    prompt = list(range(10, 40))
    expected = greedy_generate(runner.model, prompt, 8)
    engine = make_engine(builtin_dir, tokenizer, quantization="fp8")
    try:
        (events,) = generate_all(
            engine, [prompt], [SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)]
        )
    finally:
        engine.stop()
    assert output_ids(events) == expected
