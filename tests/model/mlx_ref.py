"""The independent implementation: mlx-lm's ``bailing_hybrid`` loaded from the same checkpoint dir."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_model


@cache
def mlx_model(path: Path):
    model, _ = load_model(Path(path))
    return model


def mlx_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Full-recomputation logits [len(ids), vocab] in float32."""
    out = mlx_model(path)(mx.array([ids]))
    return np.array(out.astype(mx.float32))[0]


def mlx_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation with mlx-lm's own caches (prefill once, then step), and each step's logits."""
    model = mlx_model(path)
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    tokens, steps = [], []
    for _ in range(max_new_tokens):
        steps.append(np.array(logits.astype(mx.float32))[0])
        tok = int(mx.argmax(logits, axis=-1).item())
        tokens.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)[:, -1]
    return tokens, np.stack(steps)
