"""The Ling-2.6 hybrid model in PyTorch: layers with plain-torch references, TP shards, cache, batch.

Public API for the engine: ``LingConfig``, ``LingForCausalLM``, ``ForwardBatch``, ``LingCache``,
``greedy_generate`` (the oracle generator).
"""

from ling_runtime.config import ConfigError, LingConfig
from ling_runtime.loader import CheckpointError
from ling_runtime.model.batch import ForwardBatch
from ling_runtime.model.cache import LingCache
from ling_runtime.model.generate import greedy_generate
from ling_runtime.model.ling import LingForCausalLM

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ForwardBatch",
    "LingCache",
    "LingConfig",
    "LingForCausalLM",
    "greedy_generate",
]
