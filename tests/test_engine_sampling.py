"""Per-request sampling controls: seeds, temperature/top-k/top-p, stop strings, EOS, max_tokens."""

from __future__ import annotations

import pytest
import torch

from server.engine import PrefixKey, Request, SamplingParams
from server.engine.sampler import filter_logits
from tests.engine_utils import make_engine, random_kv, random_prompt


@pytest.fixture
def setup(tiny_llama_bundle):
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 8, i) for i in range(2)}
    return b, keys


def _sampled(seed, temperature=1.0, **kw):
    return SamplingParams(max_tokens=12, temperature=temperature, seed=seed, ignore_eos=True, **kw)


def test_same_seed_same_output_whatever_the_batch(setup):
    b, keys = setup
    k0, k1 = list(keys)
    target = Request("t", random_prompt(b.spec.vocab_size, 7, 0), _sampled(1234), k0)
    alone = make_engine(b, keys).generate([target])[0].token_ids
    others = [
        Request(f"o{i}", random_prompt(b.spec.vocab_size, 3 + i, i), _sampled(i), k1 if i % 2 else None)
        for i in range(5)
    ]
    mixed = make_engine(b, keys).generate([*others[:2], target, *others[2:]])[2].token_ids
    assert mixed == alone
    other_seed = make_engine(b, keys).generate([Request("t", target.prompt_token_ids, _sampled(99), k0)])[0]
    assert other_seed.token_ids != alone


def test_top_k_one_and_tiny_top_p_equal_greedy(setup):
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 9, 1)
    greedy = make_engine(b, keys).generate(
        [Request("g", prompt, SamplingParams(max_tokens=12, ignore_eos=True), k0)]
    )
    outs = make_engine(b, keys).generate(
        [
            Request("k1", prompt, _sampled(5, temperature=2.0, top_k=1), k0),
            Request("p0", prompt, _sampled(6, temperature=2.0, top_p=1e-6), k0),
        ]
    )
    assert outs[0].token_ids == greedy[0].token_ids
    assert outs[1].token_ids == greedy[0].token_ids


def test_filter_logits_top_k_top_p():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    k2 = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(k2).tolist() == [True, True, False, False, False]
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]).log()
    p = filter_logits(probs, SamplingParams(temperature=1.0, top_p=0.75))
    assert torch.isfinite(p).tolist() == [True, True, False, False, False]
    p = filter_logits(probs, SamplingParams(temperature=1.0, top_p=0.85))
    assert torch.isfinite(p).tolist() == [True, True, True, False, False]


def _stop_candidate(text: str) -> int | None:
    """Index of a two-character piece of `text` whose first occurrence is past its start."""
    return next((i for i in range(2, len(text) - 1) if text.find(text[i : i + 2]) == i), None)


def test_stop_string_truncates_and_streams_consistently(setup):
    b, keys = setup
    k0 = next(iter(keys))
    for seed in range(50):  # find a prompt whose greedy text has a usable stop string
        prompt = random_prompt(b.spec.vocab_size, 6, 100 + seed)
        r = Request("f", prompt, SamplingParams(max_tokens=24, ignore_eos=True), k0)
        text = make_engine(b, keys).generate([r])[0].text
        cut_at = _stop_candidate(text)
        if cut_at is not None:
            break
    assert cut_at is not None, "no greedy continuation with a usable stop string"
    stop = text[cut_at : cut_at + 2]
    for stream in (False, True):
        r = Request(
            "s", prompt, SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)), k0, stream_text=stream
        )
        eng = make_engine(b, keys)
        eng.add_request(r)
        deltas = []
        last = None
        while eng.has_unfinished():
            for ev in eng.step():
                deltas.append(ev.text)
                last = ev
        assert last.finish_reason == "stop"
        assert "".join(deltas) == text[:cut_at]
        assert stop not in "".join(deltas)
        if stream and cut_at > 4:
            assert len([d for d in deltas if d]) >= 2  # text arrived incrementally


def test_eos_and_max_tokens(setup):
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 5, 3)
    full = make_engine(b, keys).generate(
        [Request("f", prompt, SamplingParams(max_tokens=10, ignore_eos=True), k0)]
    )[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    stop_tok = full.token_ids[4]
    first = full.token_ids.index(stop_tok)
    out = make_engine(b, keys).generate(
        [Request("e", prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop_tok,)), k0)]
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: first + 1]


def test_sampling_params_validation():
    for bad in (
        dict(temperature=float("nan")),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(max_tokens=0),
        dict(stop=("",)),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
