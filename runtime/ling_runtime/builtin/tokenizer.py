"""The built-in model's tokenizer: byte-level BPE whose merges make every word of the task one token.

Byte-level like Ling's own tokenizer (any text encodes, multi-byte characters span several byte
tokens, the server's incremental detokenizer is exercised as with a real checkpoint), with the
GPT-2 pre-tokenizer regex so words carry their leading space (``ĠParis``). The merges are learned
here by plain BPE over the task's training text with a fixed tie-break (most frequent pair, then the
smallest pair), run until every word of it is a single token: "France", " capital", " 12" are each
one readable token. Special tokens keep the Ling chat format and the ``<tool_call>`` markers the
qwen25 tool parser looks for. The vocabulary is padded with reserved tokens to a multiple of 64.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable

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
VOCAB_MULTIPLE = 64

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


def chat_prompt(question: str) -> str:
    """What ``CHAT_TEMPLATE`` renders for one user turn with the generation prompt (a test checks)."""
    return f"<role>HUMAN</role>{question}<|role_end|><role>ASSISTANT</role>"


def _byte_level():  # the tokenizers pieces, imported late (the cli imports this package)
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def pretokenize(texts: Iterable[str]) -> Counter[str]:
    """Byte-level words (``ĠParis``) of ``texts`` with their counts; special tokens are not words."""
    pre = _byte_level()
    words: Counter[str] = Counter()
    for text in texts:
        for part in _SPECIAL_SPLIT.split(text):
            if part and part not in SPECIAL_TOKENS:
                words.update(w for w, _ in pre.pre_tokenize_str(part))
    return words


def learn_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Plain BPE until every word is one symbol; ties go to the lexicographically smallest pair."""
    # Words as symbol tuples, each with its count; only distinct words matter.
    seqs: dict[tuple[str, ...], int] = {}
    for w, n in sorted(words.items()):
        seqs[tuple(w)] = seqs.get(tuple(w), 0) + n
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for s, n in seqs.items():
            for a, b in itertools.pairwise(s):
                pairs[(a, b)] += n
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new: dict[tuple[str, ...], int] = {}
        for s, n in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + n
        seqs = new


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


def build_tokenizer_json(texts: Iterable[str]) -> str:
    """tokenizer.json text: 256 byte tokens, the special tokens (ids 256..), the learned merges,
    reserved fillers up to a multiple of ``VOCAB_MULTIPLE``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for i, t in enumerate(SPECIAL_TOKENS):
        vocab[t] = 256 + i
    merges = learn_merges(pretokenize(texts))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    size = -(-(len(vocab)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    reserved = [f"<|reserved_{i}|>" for i in range(size - len(vocab))]
    for t in reserved:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _byte_level()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in reserved])
    if tok.get_vocab_size() != size:
        raise AssertionError(f"built-in tokenizer has {tok.get_vocab_size()} tokens, expected {size}")
    return tok.to_str()


def special_ids() -> dict[str, int]:
    return {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}


def tokenizer_side_files(tokenizer_json: str) -> dict[str, str]:
    """File name -> contents of the tokenizer side of the checkpoint."""
    ids = special_ids()
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
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": [ids[t] for t in EOS_TOKENS],
        "pad_token_id": ids[BOS_TOKEN],
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "generation_config.json": json.dumps(generation_config, indent=2),
    }
