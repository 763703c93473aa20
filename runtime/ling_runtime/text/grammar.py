"""Grammar-constrained decoding: JSON (any object, or a JSON Schema), regular expressions and EBNF,
through xgrammar.

Why xgrammar (over outlines-core): it compiles context-free grammars, so `json_object` is real JSON
(nested to any depth) rather than a depth-bounded regular approximation; compiling a schema takes
milliseconds against a full vocabulary where a regex index over 157K tokens can take seconds; it is
the default grammar backend of SGLang and vLLM, maintained with them; and it ships CPU wheels for
Python 3.11 and 3.12 (outlines-core does too, with no dependencies, but only regular languages).

xgrammar is imported on first use only: a server without it (the GPU machine cannot download
packages) serves everything else and answers a constrained request with `GrammarUnavailable`
(a 400 naming the field). Compiling happens off the event loop (the route's worker thread); the
engine thread only fills masks and advances matchers, one token at a time.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ling_runtime.text.tokenizer import TokenizerBundle

GrammarKind = Literal["json_object", "json_schema", "regex", "ebnf"]


class GrammarUnavailable(RuntimeError):
    """xgrammar is not installed here; constrained decoding is off."""


class GrammarError(ValueError):
    """The schema, regex or grammar does not compile; the message says why."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to: `source` is the JSON Schema (as JSON text), the
    regex or the EBNF; empty for `json_object` (any JSON object)."""

    kind: GrammarKind
    source: str = ""


def _xgrammar() -> Any:
    # Imported here: optional, and slow to import (it pulls in its own torch extensions).
    try:
        import xgrammar
    except ImportError as exc:
        raise GrammarUnavailable(
            "constrained decoding needs the xgrammar package, which is not installed on this server"
        ) from exc
    return xgrammar


class Grammars:
    """Compiles grammars for one tokenizer; the compiler is built on first use and caches results."""

    def __init__(self, tokenizer: TokenizerBundle) -> None:
        self.tokenizer = tokenizer
        self._compiler: Any = None
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        xgr = _xgrammar()
        compiler = self._get_compiler(xgr)
        try:
            if spec.kind == "json_object":
                # Any object with any properties (strict_mode off: JSON Schema's own semantics).
                compiled = compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            elif spec.kind == "json_schema":
                schema = json.loads(spec.source)
                if not isinstance(schema, dict):
                    raise GrammarError("a JSON Schema must be an object")
                compiled = compiler.compile_json_schema(spec.source, any_whitespace=False)
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.source)
            else:
                compiled = compiler.compile_grammar(spec.source)
        except GrammarError:
            raise
        except (ValueError, RuntimeError, TypeError) as exc:  # xgrammar's parse errors
            raise GrammarError(_first_line(exc)) from exc
        return CompiledGrammar(compiled, self.tokenizer.vocab_size)

    def _get_compiler(self, xgr: Any) -> Any:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo(
                    grammar_vocab(self.tokenizer),
                    _vocab_type(xgr, self.tokenizer),
                    vocab_size=self.tokenizer.vocab_size,
                    stop_token_ids=list(self.tokenizer.eos_token_ids),
                    add_prefix_space=False,
                )
                # Two threads: compiling is rare and must not take the machine from the engine.
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler


def grammar_vocab(tokenizer: TokenizerBundle) -> list[str]:
    """Each id's token as the vocabulary spells it; special tokens as "" so a grammar never allows
    them as text (the EOS ids stay allowed where the grammar may end: xgrammar's stop tokens)."""
    tok = tokenizer.tokenizer
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return ["" if i in special else (tok.id_to_token(i) or "") for i in range(tokenizer.vocab_size)]


def _vocab_type(xgr: Any, tokenizer: TokenizerBundle) -> Any:
    """How token strings map to bytes: GPT-2 byte-level, SentencePiece byte fallback, or as-is."""
    decoder = json.loads(tokenizer.tokenizer.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


# xgrammar prefixes its messages with a time and its own source location: not for clients.
_LOCATION = re.compile(r"^\[[\d:.]+\]\s*\S+:\d+:\s*")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return _LOCATION.sub("", text[0])[:300] if text else type(exc).__name__


class CompiledGrammar:
    def __init__(self, compiled: Any, vocab_size: int) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self)


class GrammarMatcher:
    """One request's position in its grammar: which tokens may come next, advanced token by token."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self.vocab_size = grammar.vocab_size
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place ([vocab],
        float32, CPU). Columns beyond the tokenizer's vocabulary (model padding) are never allowed."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        n = min(self.vocab_size, logits.shape[-1])
        head = logits[:n].unsqueeze(0)
        self._xgr.apply_token_bitmask_inplace(head, self.bitmask, vocab_size=n)
        if logits.shape[-1] > n:
            logits[n:] = float("-inf")

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())
