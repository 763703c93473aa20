"""Decode CUDA graphs: what can be checked without a GPU (the buckets, the flag, the guards, and the
runner's eager path on a step the graphs must not take). The replay itself is checked on the H200
by bench/gpu/runtime_graphs.py (greedy tokens with graphs == the eager reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ling_runtime.cli import parse_serve_args
from ling_runtime.config import LingConfig
from ling_runtime.model import LingForCausalLM
from ling_runtime.runner.cuda_graphs import DecodeGraphs, graph_buckets
from ling_runtime.tiny import tiny_config


def test_buckets_are_powers_of_two_then_the_maximum() -> None:
    assert graph_buckets(1) == [1]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="max_batch"):
        graph_buckets(0)


def test_disable_cuda_graph_flag_reaches_the_settings(builtin_dir: Path) -> None:
    on = parse_serve_args(["--device", "cuda"]).resolve(str(builtin_dir))
    off = parse_serve_args(["--device", "cuda", "--disable-cuda-graph"]).resolve(str(builtin_dir))
    assert on.cuda_graph is True and off.cuda_graph is False


def test_graphs_refuse_cpu_and_the_plain_torch_path() -> None:
    model = LingForCausalLM(LingConfig.from_hf(tiny_config()), dtype=torch.float32)
    assert model.use_kernels is False  # the default on CPU
    cache = model.make_cache(num_slots=2, num_pages=4)
    with pytest.raises(ValueError, match="cuda device"):
        DecodeGraphs(model, cache, torch.device("cpu"), 2, 2, 3)
    # A CUDA device with the plain-torch path is refused before anything is allocated: its decode
    # reads host-side lengths that a replay would not update.
    with pytest.raises(ValueError, match="use_kernels"):
        DecodeGraphs(model, cache, torch.device("cuda"), 2, 2, 3)
