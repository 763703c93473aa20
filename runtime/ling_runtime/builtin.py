"""The built-in tiny model: a checkpoint of the real architecture plus a tokenizer and chat template.

Served when `--model-path` is left out, so the runtime answers on a laptop CPU with no downloads. The
directory is a normal Hugging Face layout (config.json, sharded safetensors + index, tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json), generated deterministically and
cached under ~/.cache/ling/builtin-<hash>, where the hash covers everything that goes into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILTIN_SEED = 0
TOKENIZER_VERSION = "bytes-v1"
# Special tokens in the Ling chat format; <tool_call> is what the qwen25 parser looks for.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|role_end|>",
    "<role>",
    "</role>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
BOS_TOKEN = "<|endoftext|>"
EOS_TOKENS = ("<|role_end|>", "<|endoftext|>")

# Ling's role names; tools go into the system turn and calls come back as <tool_call>{json}</tool_call>.
CHAT_TEMPLATE = (
    "{%- set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT', 'tool': 'OBSERVATION'} -%}"
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- if tools or has_system -%}"
    "{{ '<role>SYSTEM</role>' }}{% if has_system %}{{ messages[0]['content'] }}{% endif %}"
    "{%- if tools -%}"
    "{{ '\\n\\n# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' ~ (tool | tojson) }}{% endfor -%}"
    '{{ \'\\n</tools>\\nFor each call return <tool_call>{"name": <function-name>, '
    '"arguments": <args-json-object>}</tool_call>\' }}'
    "{%- endif -%}"
    "{{ '<|role_end|>' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and has_system) -%}"
    "{%- if message['role'] not in names %}{{ raise_exception('unknown role ' ~ message['role']) }}{% endif -%}"
    "{{ '<role>' ~ names[message['role']] ~ '</role>' }}{{ message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{{ '<tool_call>{\"name\": \"' ~ call['function']['name'] ~ '\", \"arguments\": ' "
    "~ call['function']['arguments'] ~ '}</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|role_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif -%}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what tokenizers' ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tokenizer_json(vocab_size: int) -> str:
    """A byte-level tokenizer (one token per byte, then the special tokens, then reserved fillers).

    Built with `tokenizers` so the serving path is the same one a real checkpoint takes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    needed = 256 + len(SPECIAL_TOKENS)
    if vocab_size < needed:
        raise ValueError(f"vocab_size {vocab_size}: the built-in byte tokenizer needs at least {needed}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - needed)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    if tok.get_vocab_size() != vocab_size:
        raise AssertionError(f"built-in tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    return tok.to_str()


def tokenizer_files(vocab_size: int) -> dict[str, str]:
    """File name -> contents of the tokenizer side of the built-in checkpoint."""
    special_id = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKENS[0],
        "pad_token": BOS_TOKEN,
        "add_bos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": special_id[BOS_TOKEN],
        "eos_token_id": [special_id[t] for t in EOS_TOKENS],
        "pad_token_id": special_id[BOS_TOKEN],
    }
    return {
        "tokenizer.json": tokenizer_json(vocab_size),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "generation_config.json": json.dumps(generation_config, indent=2),
    }


def builtin_config() -> dict[str, Any]:
    from ling_runtime.tiny import tiny_config

    # Stop ids in config.json agree with generation_config.json (the tokenizer's special tokens).
    special = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiny_config(
        bos_token_id=special[BOS_TOKEN],
        eos_token_id=[special[t] for t in EOS_TOKENS],
        pad_token_id=special[BOS_TOKEN],
    )


def cache_root() -> Path:
    # The same cache root as the test fixtures (LING_CACHE, else $XDG_CACHE_HOME/ling).
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("LING_CACHE", xdg / "ling"))


def builtin_hash(config: dict[str, Any]) -> str:
    material = json.dumps(
        {"config": config, "seed": BUILTIN_SEED, "tokenizer": TOKENIZER_VERSION, "template": CHAT_TEMPLATE},
        sort_keys=True,
    )
    # The model code's weight initialisation is part of the checkpoint's identity.
    from ling_runtime import tiny

    material += hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def builtin_model_dir(root: Path | None = None) -> Path:
    """Return the cached built-in checkpoint directory, generating it on first use.

    Generation writes into a temporary sibling and renames it into place, so concurrent processes
    (several ranks on one machine) never see a half-written checkpoint.
    """
    from ling_runtime.tiny import write_checkpoint

    config = builtin_config()
    root = root or cache_root()
    target = root / f"builtin-{builtin_hash(config)}"
    if (target / "tokenizer.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".builtin-", dir=root))
    try:
        write_checkpoint(staging, config, seed=BUILTIN_SEED)
        for name, text in tokenizer_files(int(config["vocab_size"])).items():
            (staging / name).write_text(text)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "tokenizer.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
