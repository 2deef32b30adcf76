"""Candidate killing tests for surviving sampler mutants."""

import pytest

from server.engine import PrefixKey, Request, SamplingParams
from tests.engine_utils import make_engine, random_kv, random_prompt


@pytest.fixture
def setup(tiny_llama_bundle):
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 8, i) for i in range(2)}
    return b, keys


@pytest.mark.parametrize("how", ["eos", "stop_token_id"])
def test_min_tokens_boundary_exact(setup, how):
    """An end token forced by logit_bias is held off for exactly min_tokens tokens: it is the (min_tokens+1)-th."""
    b, keys = setup
    eng = make_engine(b, keys)
    prompt = random_prompt(b.spec.vocab_size, 6, 3)
    end = min(eng.eos_ids) if how == "eos" else 5
    extra = {} if how == "eos" else {"stop_token_ids": (end,)}
    sp = SamplingParams(max_tokens=12, min_tokens=3, logit_bias=((end, 100.0),), **extra)
    (out,) = eng.generate([Request("m", prompt, sp, None)])
    assert out.finish_reason == "stop"
    assert len(out.token_ids) == 4 and out.token_ids[3] == end and end not in out.token_ids[:3]


def test_unseeded_requests_are_not_all_the_same(setup):
    b, keys = setup
    prompt = random_prompt(b.spec.vocab_size, 6, 3)
    sp = SamplingParams(max_tokens=16, temperature=1.5, ignore_eos=True)
    a = make_engine(b, keys).generate([Request("a", prompt, sp, None), Request("b", prompt, sp, None)])
    c = make_engine(b, keys).generate([Request("c", prompt, sp, None)])
    assert len({tuple(o.token_ids) for o in [*a, *c]}) == 3


def test_logprobs_are_the_models_own_whatever_logit_bias(setup):
    """vLLM's default (raw_logprobs): a logit_bias changes what is sampled, not the reported log-probabilities."""
    b, keys = setup
    prompt = random_prompt(b.spec.vocab_size, 6, 3)
    plain, biased = make_engine(b, keys).generate(
        [
            Request("p", prompt, SamplingParams(max_tokens=1, logprobs=5, ignore_eos=True), None),
            Request(
                "b",
                prompt,
                SamplingParams(max_tokens=1, logprobs=5, ignore_eos=True, logit_bias=((11, 50.0),)),
                None,
            ),
        ]
    )
    assert biased.token_ids == [11]
    assert [t for t, _ in biased.logprobs[0].top] == [t for t, _ in plain.logprobs[0].top]
    assert [v for _, v in biased.logprobs[0].top] == pytest.approx(
        [v for _, v in plain.logprobs[0].top], abs=1e-5
    )
    assert biased.logprobs[0].logprob < plain.logprobs[0].logprob  # token 11 is not the model's favourite
