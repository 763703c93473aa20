"""Tokenizer, chat template and stop ids of a Hugging Face checkpoint directory.

tokenizer.json goes through `tokenizers`, the chat template from tokenizer_config.json through a
sandboxed jinja2 environment (templates come with checkpoints, so they are not trusted code), and
BOS/EOS from generation_config.json (falling back to tokenizer_config.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (bad role, template error)."""


@dataclass(frozen=True)
class TokenizerBundle:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

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
        return cls(tokenizer, template, bos, eos_ids)

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
        if not self.chat_template:
            raise ChatTemplateError("messages: this model has no chat template; use /v1/completions")
        try:
            return _compile(self.chat_template).render(
                messages=normalize_messages(messages),
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # template errors come from the checkpoint, name them for the client
            raise ChatTemplateError(f"messages: cannot render the chat template ({exc})") from exc


_TEMPLATES: dict[str, Any] = {}


def _compile(source: str) -> Any:
    if source not in _TEMPLATES:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.policies["json.dumps_kwargs"] = {"ensure_ascii": False}
        env.globals["raise_exception"] = _raise
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI content parts ([{"type": "text", "text": ...}]) -> plain strings, as templates expect."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}]: expected an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content):
                raise ChatTemplateError(f"messages[{i}].content: only text parts are supported")
            message = {**message, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content: expected a string or a list of text parts")
        out.append(message)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever emitting half a character.

    Byte-level tokens can split a UTF-8 character; decoding a window of recent tokens and holding back
    text that ends in U+FFFD keeps streamed text identical to decoding everything at the end.
    """

    def __init__(self, bundle: TokenizerBundle, skip_special_tokens: bool = True) -> None:
        self.bundle = bundle
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        decode = self.bundle.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (e.g. an incomplete UTF-8 sequence)."""
        decode = self.bundle.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full_text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]
