"""Lightning's per-head slopes: one definition (``kernels.slopes``) that the model imports, for
non-power-of-two head counts too (they once differed there) and without dividing by zero for a
one-layer model."""

from __future__ import annotations

import math

import torch
from ling_runtime import kernels
from ling_runtime.kernels.slopes import lightning_slopes
from ling_runtime.model import lightning as model_lightning


def test_model_uses_the_kernels_slopes() -> None:
    assert model_lightning.lightning_slopes is lightning_slopes is kernels.lightning_slopes


def test_non_power_of_two_heads_use_alibi_interleaving() -> None:
    got = lightning_slopes(6, 0, 4)
    # ALiBi for 6 heads: the 4-head slopes, then every other one of the 8-head slopes.
    four = [2 ** (-2 * (i + 1)) for i in range(4)]
    eight = [2 ** (-1 * (i + 1)) for i in range(8)][::2][:2]
    want = torch.tensor(four + eight) * (1 + 1e-5)
    assert torch.allclose(got.float(), want, rtol=1e-6)


def test_single_layer_model_has_finite_slopes() -> None:
    got = lightning_slopes(4, 0, 1)
    assert all(math.isfinite(v) and v > 0 for v in got.tolist())
