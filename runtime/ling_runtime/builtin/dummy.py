"""`--load-format dummy` without `--model-path`: a checkpoint directory with Ling-2.6-flash's
config.json and the built-in tokenizer, and no weights (the ranks draw random ones on their device,
`loader.fill_dummy`). The server then resolves, sizes and tokenizes for the real model's dimensions,
so GPU benchmarks and hardware sizing need no 200 GB download. Written once under the cache root.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ling_runtime.builtin import tokenizer
from ling_runtime.builtin.build import cache_root, tokenizer_json
from ling_runtime.loader import LING_2_6_FLASH_CONFIG


def dummy_model_dir(root: Path | None = None) -> Path:
    files = {
        "config.json": json.dumps(LING_2_6_FLASH_CONFIG, indent=2, sort_keys=True),
        **tokenizer.tokenizer_side_files(tokenizer_json()),
    }
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    root = root or cache_root()
    target = root / f"dummy-ling-2.6-flash-{key}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dummy-", dir=root))
    for name, text in files.items():
        (staging / name).write_text(text)
    try:
        os.rename(staging, target)  # atomic; another process may have won the race
    except OSError:
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    return target
