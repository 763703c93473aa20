"""Sampling: greedy, temperature, top-k, top-p, seeds, logprobs, and parameter validation."""

from __future__ import annotations

import pytest
import torch
from ling_runtime.engine.errors import InvalidRequest
from ling_runtime.engine.sampling import SamplingParams, make_generator, sample_row

LOGITS = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])


def draws(params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    gen = make_generator(params, seed)
    return [sample_row(LOGITS, params, gen).token_id for _ in range(n)]


def test_greedy_and_top_k_1_take_the_argmax() -> None:
    assert set(draws(SamplingParams(max_new_tokens=1, temperature=0.0), 20)) == {1}
    assert set(draws(SamplingParams(max_new_tokens=1, temperature=5.0, top_k=1), 20)) == {1}


def test_top_k_and_top_p_restrict_the_support() -> None:
    assert set(draws(SamplingParams(max_new_tokens=1, temperature=10.0, top_k=2), 200)) == {1, 2}
    # p(1)+p(2) at temperature 1 is ~0.87: top_p 0.8 keeps exactly those two.
    assert set(draws(SamplingParams(max_new_tokens=1, top_p=0.8), 200)) == {1, 2}
    assert len(set(draws(SamplingParams(max_new_tokens=1, temperature=10.0), 300))) == 5


def test_seed_makes_sampling_reproducible() -> None:
    params = SamplingParams(max_new_tokens=1, temperature=2.0, seed=1234)
    assert draws(params, 50, seed=1) == draws(params, 50, seed=2)  # the request seed wins
    other = SamplingParams(max_new_tokens=1, temperature=2.0, seed=99)
    assert draws(params, 50) != draws(other, 50)


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    params = SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=True, top_logprobs=2)
    token = sample_row(LOGITS, params, make_generator(params, 0))
    expected = torch.log_softmax(LOGITS, -1)
    assert token.token_id == 1 and token.logprob == pytest.approx(float(expected[1]))
    assert [i for i, _ in token.top_logprobs] == [1, 2]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(max_new_tokens=0), "max_tokens"),
        (SamplingParams(max_new_tokens=1, temperature=-1), "temperature"),
        (SamplingParams(max_new_tokens=1, top_p=0.0), "top_p"),
        (SamplingParams(max_new_tokens=1, top_k=0), "top_k"),
        (SamplingParams(max_new_tokens=1, top_logprobs=50), "top_logprobs"),
        (SamplingParams(max_new_tokens=1, stop=[""]), "stop"),
        (SamplingParams(max_new_tokens=1, stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_invalid_parameters_name_the_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        params.validate(vocab_size=512)
    assert err.value.param == field and str(err.value).startswith(field + ":")
