"""Per-request logit adjustments (`RequestSampler`): logit bias, frequency / presence / repetition
penalties, min-p, min_new_tokens, and a grammar, each against numbers worked out by hand."""

from __future__ import annotations

import json

import pytest
import torch
from ling_runtime.engine.errors import InvalidRequest
from ling_runtime.engine.sampling import RequestSampler, SamplingParams, make_generator
from ling_runtime.text.grammar import Grammars, GrammarSpec

LOGITS = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])


def sampler(prompt: tuple[int, ...] = (), eos: tuple[int, ...] = (), **fields) -> RequestSampler:
    params = SamplingParams(max_new_tokens=50, temperature=0.0, **fields)
    params.validate(len(LOGITS))
    return RequestSampler(params, make_generator(params, 0), prompt, eos)


def test_logit_bias_adds_to_the_logits() -> None:
    s = sampler(logit_bias={3: 10.0, 1: -100.0})
    assert torch.allclose(s.adjust(LOGITS), torch.tensor([0.0, -97.0, 2.9, 9.0, 1.0]))
    assert s.sample(LOGITS).token_id == 3


def test_frequency_and_presence_penalties_count_output_tokens_only() -> None:
    s = sampler(prompt=(2, 2, 2), frequency_penalty=0.5, presence_penalty=0.25)
    assert torch.equal(s.adjust(LOGITS), LOGITS)  # no output yet: the prompt does not count
    assert s.sample(LOGITS).token_id == 1
    # Token 1 once: 3.0 - 0.5 * 1 - 0.25 = 2.25 < 2.9, so token 2 wins now.
    assert s.adjust(LOGITS)[1].item() == pytest.approx(2.25)
    assert s.sample(LOGITS).token_id == 2
    s.record(1)
    # Token 1 twice: 3.0 - 1.0 - 0.25; token 2 once: 2.9 - 0.75.
    assert s.adjust(LOGITS)[:3].tolist() == pytest.approx([0.0, 1.75, 2.15])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    s = sampler(prompt=(1, 3), repetition_penalty=2.0)
    assert s.adjust(LOGITS).tolist() == pytest.approx([0.0, 1.5, 2.9, -2.0, 1.0])
    assert s.sample(LOGITS).token_id == 2  # 1's 3.0 halved
    assert s.adjust(LOGITS)[2].item() == pytest.approx(1.45)  # now seen in the output


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    s = sampler(eos=(1,), stop_token_ids=[2], min_new_tokens=2)
    assert s.sample(LOGITS).token_id == 4
    assert s.sample(LOGITS).token_id == 4
    assert s.sample(LOGITS).token_id == 1  # two out: EOS allowed again


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    params = SamplingParams(max_new_tokens=1, temperature=1.0, min_p=0.9)
    s = RequestSampler(params, make_generator(params, 0))
    # p(2) / p(1) = e^-0.1 = 0.905 >= 0.9; every other token is far below.
    assert {s.sample(LOGITS).token_id for _ in range(200)} == {1, 2}
    params = SamplingParams(max_new_tokens=1, temperature=1.0, min_p=1.0)
    s = RequestSampler(params, make_generator(params, 0))
    assert {s.sample(LOGITS).token_id for _ in range(50)} == {1}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {99: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: 101.0}}, "logit_bias"),
        ({"min_new_tokens": 51}, "min_tokens"),
    ],
)
def test_out_of_range_adjustments_name_the_field(fields, param) -> None:
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(max_new_tokens=50, **fields).validate(len(LOGITS))
    assert err.value.param == param


def test_adjusted_requests_are_sampled_on_the_host() -> None:
    assert not SamplingParams(max_new_tokens=1).needs_host_sampling
    for fields in (
        {"min_p": 0.1},
        {"logit_bias": {1: 1.0}},
        {"repetition_penalty": 1.1},
        {"min_new_tokens": 1},
    ):
        assert SamplingParams(max_new_tokens=2, **fields).needs_host_sampling, fields


def test_a_grammar_allows_only_its_language(tokenizer) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = Grammars(tokenizer).compile(GrammarSpec("json_schema", json.dumps(schema)))
    params = SamplingParams(max_new_tokens=40, temperature=1.0, grammar=grammar)
    eos = tokenizer.eos_token_ids
    s = RequestSampler(params, make_generator(params, 7), (), eos)
    out: list[int] = []
    gen = torch.Generator().manual_seed(0)
    while len(out) < 40:
        token = s.sample(torch.randn(tokenizer.vocab_size + 6, generator=gen)).token_id  # padded vocab
        if token in eos:
            break
        out.append(token)
    assert json.loads(tokenizer.decode(out))["ok"] in (True, False)
    assert s.matcher is not None and s.matcher.terminated
