"""Kernel tests run the Triton kernels under the interpreter on CPU (CI has no GPU).

TRITON_INTERPRET must be set before triton is first imported, hence here at collection time.
The GPU checks at real sizes live in tests/gpu/ (``pytest -m gpu``, same references).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# "0" here means tests/gpu/conftest.py asked for compiled kernels first in this process (a root
# `pytest -m gpu` on a GPU machine): these CPU-tensor tests cannot run compiled.
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture(autouse=True)
def _needs_interpreter() -> None:
    if not INTERPRETED:
        pytest.skip("Triton runs compiled in this process (tests/gpu): run tests/kernels in its own process")


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: deterministic, but not zeros or a fixed pattern."""
    return torch.Generator().manual_seed(1234)
