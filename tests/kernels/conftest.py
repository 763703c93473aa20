"""Kernel tests run the Triton kernels under the interpreter on CPU (CI has no GPU).

TRITON_INTERPRET must be set before triton is first imported, hence here at collection time.
The GPU checks at real sizes live in bench/gpu/ (they compare against the same references).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: deterministic, but not zeros or a fixed pattern."""
    return torch.Generator().manual_seed(1234)
