"""The built-in model: a trained tiny Ling-2.6, served when `--model-path` is left out.

Same architecture as Ling-2.6-flash at laptop size, trained here (deterministically, on the CPU, in
a few minutes) on a task this package generates: short facts and arithmetic in the Ling chat
format, e.g. "What is the capital of France?" -> "The capital of France is Paris.". Built once per
machine and cached; nothing is downloaded and no weights are committed.

- ``data``: the task (training and held-out questions).
- ``tokenizer``: byte-level BPE whose merges make each of the task's words one token; chat template.
- ``train``: the training loop over ``ling_runtime.model.training.training_forward``.
- ``build``: the cache (key, lock, atomic rename), the progress bar, ``builtin_model_dir()``.

``python -m ling_runtime.builtin`` builds it (or prints where it is) ahead of serving.
"""

from ling_runtime.builtin.build import builtin_config, builtin_key, builtin_model_dir, cache_root
from ling_runtime.builtin.data import CARD_ANSWER, CARD_QUESTION
from ling_runtime.builtin.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKENS, SPECIAL_TOKENS

__all__ = [
    "BOS_TOKEN",
    "CARD_ANSWER",
    "CARD_QUESTION",
    "CHAT_TEMPLATE",
    "EOS_TOKENS",
    "SPECIAL_TOKENS",
    "builtin_config",
    "builtin_key",
    "builtin_model_dir",
    "cache_root",
]
