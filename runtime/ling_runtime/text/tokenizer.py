"""Tokenizer, chat template and stop ids of a Hugging Face checkpoint directory.

tokenizer.json goes through `tokenizers`, the chat template from tokenizer_config.json through
`chat_template.render_chat`, and BOS/EOS from generation_config.json (falling back to
tokenizer_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ling_runtime.text.chat_template import render_chat


@dataclass(frozen=True)
class TokenizerBundle:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # The most UTF-8 bytes of text one token can stand for (an upper bound): a text of n bytes has at
    # least n / max_token_bytes tokens, which bounds a prompt's length before tokenizing it.
    max_token_bytes: int = 64

    @classmethod
    def from_dir(cls, path: str | Path) -> TokenizerBundle:
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path}/tokenizer.json: missing (needed to serve text prompts)")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok_config = _read_json(path / "tokenizer_config.json")
        gen_config = _read_json(path / "generation_config.json")
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # the named-template form: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        bos = gen_config.get("bos_token_id")
        if bos is None and isinstance(tok_config.get("bos_token"), str):
            bos = tokenizer.token_to_id(tok_config["bos_token"])
        eos = gen_config.get("eos_token_id")
        if eos is None and isinstance(tok_config.get("eos_token"), str):
            eos = tokenizer.token_to_id(tok_config["eos_token"])
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(tokenizer, template, bos, eos_ids, longest_token_bytes(tokenizer))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        return render_chat(self.chat_template, messages, tools, add_generation_prompt)


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound of the bytes of text one token stands for: the longest token string in UTF-8.

    Exact for byte-level BPE up to a factor of 2 (its byte alphabet maps some bytes to 2-byte
    characters), an over-estimate for SentencePiece's "▁" and "<0x41>" byte tokens: never too small,
    which is what a lower bound of the token count needs."""
    return max((len(t.encode("utf-8")) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
