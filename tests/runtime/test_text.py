"""Tokenizer files of the built-in model, chat template, incremental detokenization, stop strings."""

from __future__ import annotations

import json

import pytest
from ling_runtime.builtin import SPECIAL_TOKENS, builtin_config
from ling_runtime.text.chat_template import ChatTemplateError
from ling_runtime.text.detokenizer import IncrementalDetokenizer, TextOutput


def test_builtin_tokenizer_matches_the_model_vocab(builtin_dir, tokenizer) -> None:
    config = json.loads((builtin_dir / "config.json").read_text())
    assert tokenizer.vocab_size == config["vocab_size"] == builtin_config()["vocab_size"]
    assert tokenizer.eos_token_ids == tuple(config["eos_token_id"])
    for token in SPECIAL_TOKENS:
        assert tokenizer.tokenizer.token_to_id(token) is not None
    text = "héllo wörld ✓ <tool_call>"
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    assert len(tokenizer.encode("<tool_call>")) == 1


def test_chat_template_renders_roles_and_tools(tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tools)
    assert text.startswith("<role>SYSTEM</role>Be brief.")
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert "<role>HUMAN</role>Weather in Paris?<|role_end|>" in text
    assert text.endswith("<role>ASSISTANT</role>")
    assert "<tools>" not in tokenizer.apply_chat_template(messages[1:])


def test_chat_template_rejects_unknown_roles(tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unknown role wizard"):
        tokenizer.apply_chat_template([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]"):
        tokenizer.apply_chat_template([{"content": "no role"}])


def test_incremental_detokenizer_never_splits_a_character(tokenizer) -> None:
    text = "a✓b€ü🙂 end"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([i]) for i in ids]
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_strings_truncate_and_hold_back(tokenizer) -> None:
    out = TextOutput(tokenizer, stop=["STOP"])
    streamed = "".join(out.add([i]) for i in tokenizer.encode("abc ST"))
    assert streamed == "abc "  # "ST" may begin "STOP": held back
    streamed += out.add(tokenizer.encode("OP and more"))
    assert out.stopped and streamed == "abc "
    assert out.finish() == "" and out.final_text == "abc "
    released = TextOutput(tokenizer, stop=["STOP"])
    text = "".join(released.add([i]) for i in tokenizer.encode("a STAR")) + released.finish()
    assert text == "a STAR" and not released.stopped
