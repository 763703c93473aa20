"""GPU tier (``pytest -m gpu tests/gpu`` on a CUDA machine): the production Triton kernels, compiled,
against their torch references at the model's real sizes. Without CUDA (CI) every test here is
skipped, with that reason.

Triton decides interpreter or compiled once per process, when the kernels are first imported:
tests/kernels asks for the interpreter (its tensors live on the CPU). On a CUDA machine this
conftest asks for compiled kernels first, so a root ``pytest -m gpu`` (which imports both
directories) runs this tier compiled; tests/kernels then skips itself in that process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "0")


def _skip_reason() -> str | None:
    if not CUDA:
        return "no CUDA device: the GPU tier runs on the GPU machine"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 in this process: run tests/gpu in its own pytest process"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A mark, not a fixture: the module-scoped weight fixtures must not even be built without CUDA.
    reason = _skip_reason()
    here = Path(__file__).parent
    for item in items:
        if reason and here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def gen() -> torch.Generator:
    """Seeded CUDA generator: fresh, non-trivial inputs that repeat from run to run."""
    return torch.Generator(device="cuda").manual_seed(1234)
