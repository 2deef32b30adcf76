"""Per-request sampling controls: seeds, temperature/top-k/top-p, stop strings, EOS, max_tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.engine import PrefixKey, Request, SamplingParams
from server.engine.sampler import (
    INVALID_DISTRIBUTION,
    draw,
    filter_logits,
    finite_rows,
    generator_seed,
    greedy_tokens,
    process_scores,
    sample,
)
from tests.engine_utils import (
    hf_greedy,
    hf_prompt_logprobs,
    make_engine,
    pool_bytes,
    random_kv,
    random_prompt,
)


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


def test_seeds_that_differ_only_above_32_bits_sample_differently(setup):
    """A CPU generator keeps only 32 bits of its seed: 7 and 7 + 2**32 (or -1 and 2**32 - 1) must still draw
    different tokens, and a seed below 2**32 keeps drawing what it drew before (torch's own seeding)."""
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 7, 0)

    def run(seed):
        eng = make_engine(b, keys)
        return eng.generate([Request("s", prompt, _sampled(seed, temperature=1.5), k0)])[0].token_ids

    assert run(7) != run(7 + 2**32)
    assert run(-1) != run(2**32 - 1)
    assert run(2**40) == run(2**40)
    cpu = torch.device("cpu")
    assert generator_seed(7, cpu) == 7 and generator_seed(2**32 - 1, cpu) == 2**32 - 1
    assert len({generator_seed(s, cpu) for s in (7, 7 + 2**32, 7 + 2**33, -7)}) == 4
    assert all(0 <= generator_seed(s, cpu) < 2**32 for s in (2**32, 2**53 - 1, -(2**53 - 1)))
    assert generator_seed(7 + 2**32, torch.device("cuda")) == 7 + 2**32  # Philox keeps 64 bits


def test_requests_without_a_seed_sample_differently(setup):
    """No seed: each request draws fresh randomness (OpenAI's and vLLM's), so the same sampled request sent twice,
    alone or beside itself, does not give the same tokens every time."""
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 7, 3)
    eng = make_engine(b, keys)
    outs = [
        tuple(o.token_ids)
        for o in eng.generate([Request(f"u{i}", prompt, _sampled(None), k0) for i in range(3)])
    ]
    outs += [tuple(eng.generate([Request("u", prompt, _sampled(None), k0)])[0].token_ids)]
    assert len(set(outs)) > 1, outs


def test_unseeded_requests_are_not_all_the_same(setup):
    """Unseeded sampled requests differ from each other beside one another in a batch and across engines: two in
    one engine's batch and one on a fresh engine give three different outputs."""
    b, keys = setup
    prompt = random_prompt(b.spec.vocab_size, 6, 3)
    sp = SamplingParams(max_tokens=16, temperature=1.5, ignore_eos=True)
    a = make_engine(b, keys).generate([Request("a", prompt, sp, None), Request("b", prompt, sp, None)])
    c = make_engine(b, keys).generate([Request("c", prompt, sp, None)])
    assert len({tuple(o.token_ids) for o in [*a, *c]}) == 3


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


def _transformers_warpers(p: SamplingParams):
    """transformers' warpers for `p`, in the order its generate applies them."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    if p.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(p.typical_p))
    return warpers


def _matches_transformers(p: SamplingParams, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Five random rows filtered by `p` and by transformers' warpers: the same scores (asserted); (logits, ours)."""
    warpers = _transformers_warpers(p)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(5):
        logits = torch.randn(1, 300, generator=g) * 3
        want = warpers(torch.zeros(1, 1, dtype=torch.long), logits.clone())[0]
        got = filter_logits(logits[0], p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])
        out.append((logits, got))
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(min_p=0.05),
        dict(min_p=0.3, temperature=0.7),
        dict(min_p=0.1, top_k=20),
        dict(min_p=0.02, top_p=0.9, temperature=1.3),
        dict(min_p=1.0),
    ],
)
def test_min_p_matches_transformers(kw):
    """min_p after temperature, top-k and top-p, as transformers' generate orders its warpers: the same scores."""
    p = SamplingParams(**{"temperature": 1.0, **kw})
    logits, _ = _matches_transformers(p, seed=3)[-1]
    kept = torch.isfinite(filter_logits(logits[0], SamplingParams(temperature=1.0, min_p=kw["min_p"])))
    assert 1 <= int(kept.sum()) < 300 or kw["min_p"] == 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(typical_p=0.5),
        dict(typical_p=0.95, temperature=0.7),
        dict(typical_p=0.2, top_k=20),
        dict(typical_p=0.9, top_p=0.8, min_p=0.01, temperature=1.3),
        dict(typical_p=1e-6),
    ],
)
def test_typical_p_matches_transformers(kw):
    """typical_p (TGI's and transformers' locally typical sampling) last, after temperature, top-k, top-p and min-p,
    as transformers' generate orders its warpers: the same scores, fewer tokens than the row had."""
    p = SamplingParams(**{"temperature": 1.0, **kw})
    for logits, got in _matches_transformers(p, seed=5):
        without = filter_logits(logits[0], dataclasses.replace(p, typical_p=1.0))
        assert 1 <= int(torch.isfinite(got).sum()) < int(torch.isfinite(without).sum())
    if kw["typical_p"] < 1e-3:  # the one token whose surprisal is closest to the entropy
        assert int(torch.isfinite(got).sum()) == 1


def test_typical_p_keeps_transformers_tokens_at_the_cut_on_a_real_vocabulary():
    """On rows of SmolLM2's vocabulary size the kept set is transformers' to the token, the cut-off included
    (summing the probabilities in another order kept one or two tokens more or fewer, 5 rows in 300)."""
    from transformers.generation.logits_process import TypicalLogitsWarper

    from server.engine.sampler import filter_batch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 49152, generator=g) * 4
    for mass in (0.9, 0.95):
        p = SamplingParams(temperature=1.0, typical_p=mass)
        got = filter_batch(x, [p] * len(x))
        want = TypicalLogitsWarper(mass)(None, x.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(want))


def _row_by_row_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The reference: one row, each warper as transformers writes it (a full sort for top-p)."""
    logits = logits / p.temperature
    vocab = logits.shape[-1]
    if 0 < p.top_k < vocab:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs >= p.top_p
        remove[0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.typical_p < 1.0:
        from transformers.generation.logits_process import TypicalLogitsWarper

        logits = TypicalLogitsWarper(p.typical_p)(None, logits[None])[0]
    return logits


def test_batched_filtering_equals_each_row_alone():
    """The batch's temperature / top-k / top-p / min-p / typical-p give every row exactly (bitwise) what a row-by-row
    reference gives it, whatever the other rows ask for: ties, top-k past the vocabulary, rows without any filter,
    rows whose nucleus is more than the CPU's top-p candidates (sorted whole)."""
    import random

    from server.engine.sampler import filter_batch

    rng = random.Random(0)
    for trial in range(60):
        n, vocab = rng.randint(1, 7), rng.choice([300, 4096])
        x = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial)) * rng.choice([1, 3, 8])
        if trial % 5 == 0:
            x[0, : vocab // 2] = x[0, 0]  # ties at every boundary
        params = [
            SamplingParams(
                temperature=rng.choice([0.3, 1.0, 1.5]),
                top_k=rng.choice([0, 0, 1, 5, 50, vocab, vocab + 3]),
                top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 1e-6]),
                min_p=rng.choice([0.0, 0.0, 0.05, 1.0]),
                typical_p=rng.choice([1.0, 1.0, 0.9, 0.3]),
            )
            for _ in range(n)
        ]
        got = filter_batch(x, params)
        for i, p in enumerate(params):
            assert torch.equal(got[i], _row_by_row_filter(x[i], p)), (trial, i, p)
            assert torch.equal(filter_logits(x[i], p), got[i])  # one row alone: the same


def test_draws_follow_the_distribution_and_never_pick_an_impossible_token():
    from server.engine.sampler import draw

    probs = torch.tensor([[0.1, 0.0, 0.2, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    counts = torch.zeros(3, 5)
    for _ in range(4000):
        counts[torch.arange(3), draw(probs, gens)[0]] += 1
    freq = counts / 4000
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(freq, probs, atol=0.03), freq
    again = [torch.Generator().manual_seed(i) for i in range(3)]
    first = [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(draw(probs, first)[0], draw(probs, again)[0])  # a generator's state decides the draw
    bad = torch.tensor([[0.5, float("nan"), 0.5], [0.0, 0.0, 0.0], [1.0, float("inf"), 0.0], [0.0, 2.0, 1.0]])
    tokens, ok = draw(bad, [None] * 4)
    assert ok.tolist() == [False, False, False, True] and ((tokens >= 0) & (tokens < 3)).all()


def test_min_p_one_keeps_only_the_most_likely_token(setup):
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 9, 2)
    greedy = make_engine(b, keys).generate(
        [Request("g", prompt, SamplingParams(max_tokens=12, ignore_eos=True), k0)]
    )
    (out,) = make_engine(b, keys).generate(
        [Request("m", prompt, _sampled(7, temperature=3.0, min_p=1.0), k0)]
    )
    assert out.token_ids == greedy[0].token_ids
    (hot,) = make_engine(b, keys).generate([Request("h", prompt, _sampled(7, temperature=3.0), k0)])
    assert hot.token_ids != greedy[0].token_ids  # without min_p this temperature wanders off


def test_finite_rows_flags_exactly_the_rows_with_an_inf_or_nan():
    x = torch.randn(6, 49152)
    x[1, 7] = float("inf")
    x[2, 40000] = float("-inf")
    x[3, 0] = float("nan")
    x[4] = 3e38  # huge but finite: a plain row sum would overflow to inf
    x[5, :100] = -0.0
    assert (
        finite_rows(x).tolist()
        == torch.isfinite(x).all(-1).tolist()
        == [True, False, False, False, True, True]
    )


def test_greedy_tokens_equal_argmax_ties_and_non_finite_rows_included():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (64, 4096), generator=g).float()  # many equal maxima per row: the first one wins
    x[0] = float("-inf")
    x[1, 100] = float("inf")
    x[2, [5, 9]] = float("nan")
    x[3, 4095] = 7.0
    assert torch.equal(greedy_tokens(x), x.argmax(-1))
    y = torch.randn(8, 49152, generator=g)
    assert torch.equal(greedy_tokens(y), y.argmax(-1))


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
    for stream, include in ((False, False), (True, False), (False, True), (True, True)):
        sp = SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,), include_stop_str_in_output=include)
        r = Request("s", prompt, sp, k0, stream_text=stream)
        eng = make_engine(b, keys)
        eng.add_request(r)
        deltas = []
        last = None
        while eng.has_unfinished():
            for ev in eng.step():
                deltas.append(ev.text)
                last = ev
        assert last.finish_reason == "stop" and last.stop_reason == stop  # vLLM's: the stop string matched
        # vLLM's include_stop_str_in_output: the text ends with the stop string instead of before it
        assert "".join(deltas) == (text[: cut_at + len(stop)] if include else text[:cut_at])
        assert (stop in "".join(deltas)) == include
        if stream and cut_at > 4:
            assert len([d for d in deltas if d]) >= 2  # text arrived incrementally


def test_eos_and_max_tokens(setup):
    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 5, 3)
    full = make_engine(b, keys).generate(
        [Request("f", prompt, SamplingParams(max_tokens=10, ignore_eos=True), k0)]
    )[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 10 and full.stop_reason is None
    stop_tok = full.token_ids[4]
    first = full.token_ids.index(stop_tok)
    out = make_engine(b, keys).generate(
        [Request("e", prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop_tok,)), k0)]
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok  # vLLM's: the stop token id
    assert out.token_ids == full.token_ids[: first + 1]


def test_a_stop_token_ids_text_is_kept_with_include_stop_str_in_output(setup):
    """vLLM's rule: include_stop_str_in_output keeps the text of a stop token id that ended the output (it was
    always dropped); without it the text is dropped; the same whether streamed, with a stop string or neither."""
    b, keys = setup
    k0 = next(iter(keys))
    eng = make_engine(b, keys)
    for seed in range(50):  # an output whose third token is printable text of its own, not seen before
        prompt = random_prompt(b.spec.vocab_size, 6, seed)
        full = eng.generate([Request("f", prompt, SamplingParams(max_tokens=6, ignore_eos=True), k0)])[0]
        piece = b.tokenizer.decode(full.token_ids[2:3])
        if piece.strip() and piece.isprintable() and full.token_ids[2] not in full.token_ids[:2]:
            break
    stop_tok = full.token_ids[2]
    for include in (False, True):
        sp = SamplingParams(max_tokens=6, stop_token_ids=(stop_tok,), include_stop_str_in_output=include)
        outs = eng.generate([
            Request("plain", prompt, sp, k0),
            Request("streamed", prompt, sp, k0, stream_text=True),
            Request("stop", prompt, dataclasses.replace(sp, stop=("zzzz",)), k0),
        ])  # fmt: skip
        want = b.tokenizer.decode(full.token_ids[: 3 if include else 2])
        assert [o.text for o in outs] == [want] * 3, include
        assert all(o.finish_reason == "stop" and o.token_ids == full.token_ids[:3] for o in outs)


def test_sampling_params_validation():
    for bad in (
        dict(temperature=float("nan")),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(min_p=1.01),
        dict(min_p=float("nan")),
        dict(top_k=-1),
        dict(max_tokens=0),
        dict(stop=("",)),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=float("inf")),
        dict(repetition_penalty=0),
        dict(logprobs=-1),
        dict(max_tokens=4, min_tokens=5),
        dict(logit_bias=((3, 101.0),)),
        dict(logit_bias=((-1, 1.0),)),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ------------------------------------------------------------------------------------------ penalties, logprobs
class OpenAIPenalties:
    """Reference for OpenAI's presence/frequency penalties over the generated tokens (no transformers processor)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.n, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for t in set(input_ids[0, self.n :].tolist()):
            count = int((input_ids[0, self.n :] == t).sum())
            scores[0, t] -= self.frequency * count + self.presence
        return scores


def test_penalties_in_a_mixed_batch_match_transformers_and_alone(setup):
    """Greedy rows with repetition / presence / frequency penalties next to plain greedy and sampled rows: each
    equals a transformers reference decoding with the same penalty, and the same request alone."""
    from transformers import RepetitionPenaltyLogitsProcessor

    b, keys = setup
    k0, k1 = list(keys)
    new = 16
    # a short vocabulary slice makes repeats likely, so the penalties have something to act on
    prompts = [[t % 40 for t in random_prompt(b.spec.vocab_size, n, i)] for i, n in enumerate((9, 4, 13, 6))]
    cases = [
        (
            SamplingParams(max_tokens=new, ignore_eos=True, repetition_penalty=1.8),
            k0,
            lambda p: RepetitionPenaltyLogitsProcessor(1.8),
        ),
        (
            SamplingParams(max_tokens=new, ignore_eos=True, repetition_penalty=0.7),
            None,
            lambda p: RepetitionPenaltyLogitsProcessor(0.7),
        ),
        (
            SamplingParams(max_tokens=new, ignore_eos=True, presence_penalty=1.5),
            k1,
            lambda p: OpenAIPenalties(len(p), 1.5, 0.0),
        ),
        (
            SamplingParams(max_tokens=new, ignore_eos=True, frequency_penalty=2.0, presence_penalty=-0.5),
            k0,
            lambda p: OpenAIPenalties(len(p), -0.5, 2.0),
        ),
    ]
    reqs = [Request(f"p{i}", prompts[i], sp, key) for i, (sp, key, _) in enumerate(cases)]
    plain = [
        Request(f"g{i}", prompts[i], SamplingParams(max_tokens=new, ignore_eos=True), cases[i][1])
        for i in range(4)
    ]
    noise = [Request("s", random_prompt(b.spec.vocab_size, 5, 9), _sampled(3), k1)]
    outs = make_engine(b, keys).generate([*reqs, *plain, *noise])
    for i, (r, (_, key, proc)) in enumerate(zip(reqs, cases, strict=True)):
        kv = keys[key] if key is not None else None
        ref = hf_greedy(b.hf_model, kv, r.prompt_token_ids, new, processor=proc(r.prompt_token_ids))
        assert outs[i].token_ids == ref, f"{r.request_id}: differs from the transformers reference"
        assert outs[i].token_ids == make_engine(b, keys).generate([r])[0].token_ids
        assert outs[i].token_ids != outs[4 + i].token_ids, f"{r.request_id}: the penalty changed nothing"
        assert outs[4 + i].token_ids == hf_greedy(b.hf_model, kv, r.prompt_token_ids, new)


def test_apply_penalties_formulas():
    from server.engine.sampler import process_scores

    row = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    rep = process_scores(row, SamplingParams(repetition_penalty=2.0), [0, 1], [1])
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.5, 3.0]
    pf = process_scores(row, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [4], [2, 2, 3])
    assert pf.tolist() == [
        2.0,
        -2.0,
        1.0 - 0.5 - 0.5,
        0.5 - 0.25 - 0.5,
        3.0,
    ]  # the prompt token 4 is not penalized
    assert row.tolist() == [2.0, -2.0, 1.0, 0.5, 3.0]  # the input is left alone
    # an empty history (the engine refuses empty prompts, so only a direct caller has one) penalizes nothing
    assert process_scores(row, SamplingParams(repetition_penalty=2.0), [], []).tolist() == row.tolist()


def test_logprobs_match_transformers_in_a_mixed_batch(setup):
    """Reported log-probabilities are the model's own: equal (fp32) to log_softmax of a transformers reference at
    each step, for greedy rows in a mixed batch; top-k lists are sorted and hold the greedy token first."""
    b, keys = setup
    k0, k1 = list(keys)
    new = 8
    reqs = [
        Request(
            "a",
            random_prompt(b.spec.vocab_size, 7, 1),
            SamplingParams(max_tokens=new, ignore_eos=True, logprobs=5),
            k0,
        ),
        Request(
            "b",
            random_prompt(b.spec.vocab_size, 3, 2),
            SamplingParams(max_tokens=new, ignore_eos=True, logprobs=0),
            k1,
        ),
        Request(
            "c",
            random_prompt(b.spec.vocab_size, 11, 3),
            SamplingParams(max_tokens=new, ignore_eos=True),
            None,
        ),
        Request("d", random_prompt(b.spec.vocab_size, 5, 4), _sampled(7, logprobs=3), k1),
    ]
    outs = make_engine(b, keys).generate(reqs)
    assert outs[2].logprobs is None
    for r, out in zip(reqs[:2], outs[:2], strict=True):
        ref_lp: list[torch.Tensor] = []
        ref = hf_greedy(b.hf_model, keys[r.prefix], r.prompt_token_ids, new, logprobs_out=ref_lp)
        assert out.token_ids == ref
        assert out.logprobs is not None and len(out.logprobs) == new
        for tok, lp, ref_row in zip(out.token_ids, out.logprobs, ref_lp, strict=True):
            assert lp.token_id == tok
            assert lp.logprob == pytest.approx(float(ref_row[tok]), abs=1e-4)
            k = r.sampling.logprobs
            assert len(lp.top) == k
            if k:
                want = ref_row.topk(k)
                assert [t for t, _ in lp.top] == want.indices.tolist()
                assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-4)
                assert lp.top[0][0] == tok
            assert lp.rank == 1  # greedy: the most likely
    sampled = outs[3].logprobs
    assert sampled is not None and len(sampled) == len(outs[3].token_ids) == 12
    assert all(lp.logprob <= lp.top[0][1] + 1e-6 and len(lp.top) == 3 for lp in sampled)
    assert [lp.token_id for lp in sampled] == outs[3].token_ids


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_lines_are_as_wide_as_the_buffers_sized_for_them(k):
    """The async CUDA step sizes its pinned host buffer with `logprobs_width` before the line exists (a copy into
    a buffer of another width fails on the GPU only); the line's rank is the token's place, ties included."""
    from server.engine.sampler import logprobs_from_host, logprobs_on_device, logprobs_width

    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    line = logprobs_on_device(logits, None, torch.tensor([2, 0]), [k, k])
    assert line.shape == (2, logprobs_width(k))
    got = logprobs_from_host(line.tolist(), [0, 1], [2, 0], [k, k])
    assert [got[0].rank, got[1].rank] == [4, 1]  # 3.0, 3.0, 2.0 are above 1.0; 5.0 is the most likely
    assert [t for t, _ in got[1].top] == [0, 1, 2, 3, 4][:k]


@pytest.mark.parametrize("which", ["logprobs", "prompt_logprobs"])
def test_more_logprobs_than_the_vocabulary_is_refused_not_run(setup, which):
    """A request asking for more alternatives than the model has tokens is refused before it runs: the step's top-k
    over every row raised inside the step, which failed every request in it (other tenants' too)."""
    b, keys = setup
    vocab = b.spec.vocab_size
    engine = make_engine(b, keys)
    bad = Request(
        "t1", random_prompt(vocab, 5, 2), SamplingParams(max_tokens=4, ignore_eos=True, **{which: vocab + 1})
    )
    with pytest.raises(
        ValueError, match=f"{which} \\({vocab + 1}\\) is more than the vocabulary's {vocab} tokens"
    ):
        engine.validate(bad)
    fits = dataclasses.replace(bad, sampling=dataclasses.replace(bad.sampling, **{which: vocab}))
    other = Request("t0", random_prompt(vocab, 5, 1), SamplingParams(max_tokens=4, ignore_eos=True))
    outs = engine.generate([other, fits])  # every alternative: the whole vocabulary, beside another tenant
    assert [o.error for o in outs] == [None, None] and all(o.finish_reason == "length" for o in outs)
    listed = outs[1].logprobs if which == "logprobs" else outs[1].prompt_logprobs[1:]
    assert listed and all(len(lp.top) == vocab for lp in listed)


def test_logprobs_skip_rows_that_failed():
    from server.engine.sampler import sample

    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 1.0]])
    p = SamplingParams(logprobs=2)
    res = sample(logits, [p, p], [None, None])
    assert res.tokens[0] == 2 and list(res.failed) == [1]
    assert list(res.logprobs) == [0]
    want = torch.log_softmax(logits[0], -1)
    assert res.logprobs[0].logprob == pytest.approx(float(want[2]))
    assert [t for t, _ in res.logprobs[0].top] == [2, 1]


@pytest.mark.parametrize("budget,preempt", [(2048, False), (8, False), (8, True)])
def test_prompt_logprobs_match_transformers(setup, budget, preempt):
    """Prompt log-probabilities (OpenAI echo + logprobs): None for the first token, then log_softmax of a
    transformers forward with the tenant's prefix, exact across chunked prefill (budget 8), preemption with
    recomputation, and next to requests that ask for none; generated tokens are unchanged."""
    b, keys = setup
    k0, k1 = list(keys)
    new = 40 if preempt else 3  # with preemption: outputs long enough that the pool runs out mid-flight
    prompts = [random_prompt(b.spec.vocab_size, n, 20 + n) for n in (33, 1, 12)]
    reqs = [
        Request("a", prompts[0], SamplingParams(max_tokens=new, ignore_eos=True, prompt_logprobs=2), k0),
        Request("b", prompts[1], SamplingParams(max_tokens=new, ignore_eos=True, prompt_logprobs=0), k1),
        Request("c", prompts[2], SamplingParams(max_tokens=new, ignore_eos=True, logprobs=1), None),
        Request("d", prompts[2], SamplingParams(max_tokens=new, ignore_eos=True, prompt_logprobs=1), None),
    ]
    cfg = {"max_num_batched_tokens": budget}
    if preempt:
        cfg["kv_cache_bytes"] = pool_bytes(b, 14)
    eng = make_engine(b, keys, **cfg)
    outs = eng.generate(reqs)
    if preempt:
        assert eng.scheduler.num_preemptions > 0
    plain = make_engine(b, keys).generate(
        [
            Request(
                r.request_id,
                r.prompt_token_ids,
                SamplingParams(r.sampling.max_tokens, ignore_eos=True),
                r.prefix,
            )
            for r in reqs
        ]
    )
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert outs[2].prompt_logprobs is None
    for r, out in zip(reqs, outs, strict=True):
        if r.sampling.prompt_logprobs is None:
            continue
        plp = out.prompt_logprobs
        prompt = r.prompt_token_ids
        assert plp is not None and len(plp) == len(prompt) and plp[0] is None
        ref = hf_prompt_logprobs(b.hf_model, keys[r.prefix] if r.prefix else None, prompt)
        for t in range(1, len(prompt)):
            lp = plp[t]
            assert lp is not None and lp.token_id == prompt[t]
            assert lp.logprob == pytest.approx(float(ref[t - 1, prompt[t]]), abs=1e-4)
            k = r.sampling.prompt_logprobs or 0
            assert [i for i, _ in lp.top] == (ref[t - 1].topk(k).indices.tolist() if k else [])
            # rank (vLLM's): the tokens at least as likely, itself included (fp32 near-ties either way)
            v = ref[t - 1, prompt[t]]
            above, tied = int((ref[t - 1] > v + 1e-4).sum()), int((ref[t - 1] >= v - 1e-4).sum())
            assert lp.rank is not None and above + 1 <= lp.rank <= tied


def test_prompt_logprobs_are_all_from_the_prefix_a_preempted_request_resumes_on(tiny_llama_bundle):
    """Preempted mid-prefill (nothing sent yet) while its prefix's tensors are replaced: it resumes on the new
    tensors, and every prompt logprob it reports is the new tensors' (none left from the old prefill)."""
    from server.engine import DictPrefixProvider, EngineConfig, LLMEngine

    b = tiny_llama_bundle
    k = PrefixKey("t", "default", 1)
    v1, v2 = random_kv(b.spec, 5, seed=1, scale=3.0), random_kv(b.spec, 5, seed=2, scale=3.0)
    prov = DictPrefixProvider({k: v1})
    cfg = EngineConfig(block_size=4, max_num_batched_tokens=8, kv_cache_bytes=8 * 2**20, prompt_cache=False)
    eng = LLMEngine(b, prov, cfg)
    prompt = random_prompt(b.spec.vocab_size, 30, seed=3)
    events = []
    sp = SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=0)
    eng.add_request(Request("a", prompt, sp, k), events.append)
    seq = eng._seqs["a"]
    while seq.num_cached < 16:  # two prefill chunks done, their prompt logprobs known
        eng.step()
    assert len(seq.prompt_logprobs) == 17
    eng.scheduler._preempt(seq)  # what the scheduler does to a running request when the KV pool runs dry
    prov.prefixes[k] = v2  # the tenant's prefix is replaced (a store change event)
    eng.prefix_cache.invalidate("t", "default")
    while eng.has_unfinished():
        eng.step()
    assert events[-1].finish_reason == "length"
    (plp,) = [e.prompt_logprobs for e in events if e.prompt_logprobs is not None]
    ref = hf_prompt_logprobs(b.hf_model, v2, prompt)
    got = torch.tensor([x.logprob for x in plp[1:]])
    want = torch.tensor([float(ref[t - 1, prompt[t]]) for t in range(1, len(prompt))])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_prompt_logprobs_prefill_is_chunked(setup):
    """A long prompt with prompt logprobs is prefilled in chunks of at most PROMPT_LOGPROBS_CHUNK tokens (its logits
    are [tokens, vocab] float32), and every prompt token still gets its log-probability."""
    from server.engine.scheduler import PROMPT_LOGPROBS_CHUNK

    b, keys = setup
    n = PROMPT_LOGPROBS_CHUNK + 100
    eng = make_engine(b, keys, max_num_batched_tokens=2048, kv_cache_bytes=64 * 2**20)
    sizes: list[int] = []
    prepare = eng.runner.prepare
    eng.runner.prepare = lambda rows: (sizes.extend(len(r.tokens) for r in rows), prepare(rows))[1]
    prompt = random_prompt(b.spec.vocab_size, n, 5)
    out = eng.generate([Request("r", prompt, SamplingParams(max_tokens=2, prompt_logprobs=0), None)])[0]
    assert sizes[:2] == [PROMPT_LOGPROBS_CHUNK, 100]
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == n
    assert all(
        lp is not None and lp.token_id == t for lp, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)
    )


def test_logit_bias_and_min_tokens_match_transformers(setup):
    """logit_bias equals transformers' SequenceBiasLogitsProcessor and min_tokens its MinNewTokensLengthLogitsProcessor
    (greedy, in one mixed batch with a plain row); the plain row is untouched."""
    from transformers import MinNewTokensLengthLogitsProcessor, SequenceBiasLogitsProcessor

    b, keys = setup
    k0, k1 = list(keys)
    new = 10
    prompt = random_prompt(b.spec.vocab_size, 6, 3)
    plain = make_engine(b, keys).generate(
        [Request("p", prompt, SamplingParams(max_tokens=new, ignore_eos=True), k0)]
    )
    first, second = plain[0].token_ids[0], plain[0].token_ids[1]
    forced = (first + 7) % b.spec.vocab_size
    bias = ((first, -100.0), (forced, 8.0))
    reqs = [
        Request("bias", prompt, SamplingParams(max_tokens=new, ignore_eos=True, logit_bias=bias), k0),
        # the greedy second token is a stop token: it ends the request unless min_tokens holds it off
        Request("stop", prompt, SamplingParams(max_tokens=new, stop_token_ids=(second,)), k0),
        Request("min", prompt, SamplingParams(max_tokens=new, stop_token_ids=(second,), min_tokens=6), k0),
        Request("plain", prompt, SamplingParams(max_tokens=new, ignore_eos=True), k0),
        Request(
            "other",
            random_prompt(b.spec.vocab_size, 4, 4),
            SamplingParams(max_tokens=new, ignore_eos=True),
            k1,
        ),
    ]
    eng = make_engine(b, keys)
    outs = {o.request_id: o for o in eng.generate(reqs)}
    kv = keys[k0]
    ends = {second, *eng.eos_ids}  # min_tokens holds off end-of-sequence too
    ref_bias = hf_greedy(
        b.hf_model, kv, prompt, new, processor=SequenceBiasLogitsProcessor([[[t], v] for t, v in bias])
    )
    assert outs["bias"].token_ids == ref_bias and ref_bias[0] != first
    assert outs["stop"].token_ids == plain[0].token_ids[:2] and outs["stop"].finish_reason == "stop"
    min_proc = MinNewTokensLengthLogitsProcessor(len(prompt), 6, eos_token_id=sorted(ends))
    ref_min = hf_greedy(b.hf_model, kv, prompt, new, processor=min_proc)
    got = outs["min"].token_ids
    assert not ends & set(got[:6])
    cut = next((i + 1 for i, t in enumerate(ref_min) if t in ends and i >= 6), new)
    assert got == ref_min[:cut]  # and it stops at the first end token after the minimum
    assert outs["plain"].token_ids == plain[0].token_ids


def test_allowed_token_ids_match_transformers_suppressing_every_other_token(setup):
    """vLLM's allowed_token_ids: greedy equals transformers with every other token suppressed, in a mixed batch
    with a plain row (untouched); a sampled row draws only allowed tokens; log-probabilities stay the model's; a
    row left with no token (only end tokens allowed, held off by min_tokens) fails alone."""
    from transformers import SuppressTokensLogitsProcessor

    b, keys = setup
    k0, k1 = list(keys)
    vocab, new = b.spec.vocab_size, 8
    prompt = random_prompt(b.spec.vocab_size, 6, 3)
    plain = make_engine(b, keys).generate(
        [Request("p", prompt, SamplingParams(max_tokens=new, ignore_eos=True), k0)]
    )
    allowed = tuple(sorted({(plain[0].token_ids[0] + d) % vocab for d in (3, 11, 50, 101, 150)}))
    eng = make_engine(b, keys)
    end = min(eng.eos_ids)
    reqs = [
        Request(
            "greedy",
            prompt,
            SamplingParams(max_tokens=new, ignore_eos=True, allowed_token_ids=allowed, logprobs=2),
            k0,
        ),
        Request("plain", prompt, SamplingParams(max_tokens=new, ignore_eos=True), k0),
        Request(
            "sampled",
            prompt,
            SamplingParams(
                max_tokens=new, ignore_eos=True, allowed_token_ids=allowed, temperature=1.5, seed=3
            ),
            k1,
        ),
        Request("none", prompt, SamplingParams(max_tokens=new, allowed_token_ids=(end,), min_tokens=2), k0),
    ]
    outs = {o.request_id: o for o in eng.generate(reqs)}
    suppress = SuppressTokensLogitsProcessor([t for t in range(vocab) if t not in allowed])
    ref = hf_greedy(b.hf_model, keys[k0], prompt, new, processor=suppress)
    assert outs["greedy"].token_ids == ref and set(ref) <= set(allowed)
    assert outs["plain"].token_ids == plain[0].token_ids and plain[0].token_ids[0] not in allowed
    assert set(outs["sampled"].token_ids) <= set(allowed) and len(set(outs["sampled"].token_ids)) > 1
    # the model's own log-probabilities: the most likely token is reported even though it was not allowed
    first = outs["greedy"].logprobs[0]
    assert first.top[0][0] == plain[0].token_ids[0] and first.logprob < first.top[0][1]
    assert outs["none"].finish_reason == "error" and "allowed_token_ids" in outs["none"].error


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


class _ByteTokenizer:
    """Tokens that are byte strings, some ending inside a UTF-8 character (as byte-level BPE merges can)."""

    def __init__(self, vocab: dict[int, bytes]) -> None:
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=True, **kw) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


class _ByteTexts:
    """`TokenTexts` of a `_ByteTokenizer`: each token's own bytes."""

    def __init__(self, tok: _ByteTokenizer) -> None:
        self.tok = tok

    def entry(self, token_id: int) -> tuple[str, bytes]:
        raw = self.tok.vocab[token_id]
        return raw.decode("utf-8", errors="replace"), raw

    def dropped(self, token_id: int) -> bool:
        return False


def test_a_model_that_writes_u_fffd_itself_streams_and_stops():
    """U+FFFD written by the model (whole bytes EF BF BD) is text like any other: streamed as it comes and matched
    by a stop string. It was taken for part of a character and held back to the end, so a stop string holding it
    never ended the output and a stream sent nothing until the end. Part of a character is still held back."""
    from server.engine.detokenizer import IncrementalDetokenizer

    tok = _ByteTokenizer({1: b"ok ", 2: "\ufffd".encode(), 3: b" more", 4: b"\xe2\x82", 5: b"\xac", 9: b"x"})
    d = IncrementalDetokenizer(tok, [9], (), texts=_ByteTexts(tok))
    assert [d.add(i)[0] for i in (1, 2, 3, 4, 5)] == ["ok ", "\ufffd", " more", "", "\u20ac"]
    d = IncrementalDetokenizer(tok, [9], ("\ufffd\ufffd",), texts=_ByteTexts(tok))
    hits = [d.add(i)[1] for i in (1, 2, 2)]
    assert hits == [False, False, True] and d.text == "ok " and d.stop_string == "\ufffd\ufffd"


def test_skip_special_tokens_false_keeps_them_in_the_text(smollm2_bundle):
    """vLLM's skip_special_tokens=False: the text holds `<|im_end|>` and the like, streamed or decoded at once; an
    output's special tokens count no characters in text_offset when they are skipped."""
    from server.api.logprobs import TextOffsets
    from server.engine.detokenizer import IncrementalDetokenizer, decode_output
    from server.engine.token_bytes import TokenTexts

    tok = smollm2_bundle.tokenizer
    prompt, ids = tok.encode("Hi"), tok.encode("Hello<|im_end|><|im_start|>there")
    texts = TokenTexts(tok)
    for skip, want in ((True, "Hellothere"), (False, "Hello<|im_end|><|im_start|>there")):
        d = IncrementalDetokenizer(tok, prompt, (), skip_special_tokens=skip, texts=texts)
        assert "".join(d.add(i)[0] for i in ids) + d.finish() == want
        assert decode_output(tok, prompt, ids, skip_special_tokens=skip) == want
        offsets = TextOffsets(texts, skip)
        starts = [offsets.take(i) for i in ids]
        assert all(
            want[o:].startswith(texts(i))
            for o, i in zip(starts, ids, strict=True)
            if not texts.dropped(i) or not skip
        )


def test_a_stop_string_held_back_with_a_partial_character_is_still_cut():
    """A token that completes a stop string and starts a multi-byte character is held back until the character is
    complete; when the output ends there (max_tokens), the stop string is still found and cut, and it counts."""
    from server.engine.detokenizer import IncrementalDetokenizer

    tok = _ByteTokenizer({1: b"say ", 2: b"EN", 3: b"D\xe2", 4: b"\x82\xac", 5: b"x"})
    d = IncrementalDetokenizer(tok, [5], ("END",))
    deltas = [d.add(1), d.add(2), d.add(3)]
    assert all(not hit for _, hit in deltas)  # held: "D" comes with half of a character
    assert "".join(t for t, _ in deltas) + d.finish() == "say " and d.stopped
    # the character completed by the next token: cut then, as before
    d = IncrementalDetokenizer(tok, [5], ("END",))
    out = [d.add(i) for i in (1, 2, 3, 4)]
    assert out[-1][1] and "".join(t for t, _ in out) == "say " and d.stopped
    # no stop string in it: the text is all there
    d = IncrementalDetokenizer(tok, [5], ("ZZZ",))
    assert "".join(d.add(i)[0] for i in (1, 2, 3, 4)) + d.finish() == "say END€" and not d.stopped


def test_stop_strings_count_from_min_tokens_on():
    """vLLM's rule: with min_tokens, a stop string ends the output only once it takes in text of the min_tokens-th
    token or a later one; one complete before is plain text (it used to end a min_tokens=5 request after 1 token)."""
    from server.engine.detokenizer import IncrementalDetokenizer

    tok = _ByteTokenizer({1: b"a.", 2: b"b", 3: b"c.", 4: b"d", 5: b"x"})
    d = IncrementalDetokenizer(tok, [5], (".",), min_tokens=3)
    out = [d.add(i) for i in (1, 2, 3)]
    assert [hit for _, hit in out] == [False, False, True]
    assert "".join(t for t, _ in out) == "a.bc" and d.stopped  # the "." of token 1 is text; token 3's stops
    # a stop string straddling the min_tokens-th token counts; one wholly before it does not
    d = IncrementalDetokenizer(tok, [5], ("bc",), min_tokens=3)
    assert [d.add(i)[1] for i in (1, 2, 3)] == [False, False, True] and d.text == "a."
    d = IncrementalDetokenizer(tok, [5], ("a.",), min_tokens=2)
    out = [d.add(i) for i in (1, 2, 3, 4)]
    assert not any(hit for _, hit in out) and "".join(t for t, _ in out) + d.finish() == "a.bc.d"


def test_a_longer_stop_string_does_not_widen_the_min_tokens_window():
    """Each stop string reaches back into earlier text by its own length: a short one that lay wholly before the
    min_tokens-th token matched once a longer stop string (that never occurs) was also given."""
    from server.engine.detokenizer import IncrementalDetokenizer

    tok = _ByteTokenizer({1: b" with", 2: b" a", 3: b" quick", 4: b" a b", 9: b"x"})
    for stop in ((" a",), (" a", "zzzzzzzz")):
        d = IncrementalDetokenizer(tok, [9], stop, min_tokens=3)
        out = [d.add(i) for i in (1, 2, 3, 4)]
        assert [hit for _, hit in out] == [False, False, False, True], stop
        assert "".join(t for t, _ in out) == " with a quick" and d.text == " with a quick"


def test_one_token_completing_two_stop_strings_cuts_at_the_first():
    """The text ends at the first place any stop string occurs, whatever their lengths or order."""
    from server.engine.detokenizer import IncrementalDetokenizer

    tok = _ByteTokenizer({1: b"xbcd", 9: b"z"})
    for stop in (("cd", "b"), ("b", "cd")):
        d = IncrementalDetokenizer(tok, [9], stop)
        text, hit = d.add(1)
        assert hit and text + d.finish() == "x", stop


@pytest.mark.parametrize("stop", [(), ("zz",)])
def test_an_output_that_completes_the_prompts_last_character_keeps_it(stop):
    """A token-id prompt may end inside a character (its text ends in U+FFFD); the output token that completes the
    character brings that character. It was dropped when streamed or with a stop string, and decoding the output
    at once turned it into U+FFFD: the text now is the same every way."""
    from server.engine.detokenizer import IncrementalDetokenizer, decode_output

    dog = "\N{DOG FACE}".encode()
    tok = _ByteTokenizer({1: b"Dogs: " + dog[:3], 2: dog[3:], 3: dog, 4: dog[:2], 5: b"x"})
    prompt = [5, 1]
    d = IncrementalDetokenizer(tok, prompt, stop)
    streamed = "".join(d.add(i)[0] for i in (2, 3, 4)) + d.finish()
    want = "\N{DOG FACE}\N{DOG FACE}\ufffd"
    assert streamed == want and decode_output(tok, prompt, [2, 3, 4]) == want
    # a prompt's incomplete character that the output does not complete stays the prompt's
    d = IncrementalDetokenizer(tok, prompt, stop)
    assert d.add(3)[0] + d.finish() == "\N{DOG FACE}" == decode_output(tok, prompt, [3])


def test_min_tokens_holds_off_a_stop_string_in_the_engine(setup):
    b, keys = setup
    k0 = next(iter(keys))
    eng = make_engine(b, keys)
    for seed in range(50):  # a prompt whose first output token is whole printable text: the stop string
        prompt = random_prompt(b.spec.vocab_size, 6, seed)
        plain = eng.generate([Request("p", prompt, SamplingParams(max_tokens=8, ignore_eos=True), k0)])[0]
        stop = b.tokenizer.decode(plain.token_ids[:1])
        if stop.strip() and stop.isprintable() and stop.isascii():
            break
    early = eng.generate(
        [Request("s", prompt, SamplingParams(max_tokens=8, ignore_eos=True, stop=(stop,)), k0)]
    )
    assert early[0].token_ids == plain.token_ids[:1] and early[0].finish_reason == "stop"
    held = SamplingParams(max_tokens=8, ignore_eos=True, stop=(stop,), min_tokens=5)
    out = eng.generate([Request("m", prompt, held, k0)])[0]
    assert len(out.token_ids) >= 5 and out.token_ids == plain.token_ids[: len(out.token_ids)]


def test_text_is_the_same_streamed_or_not_with_a_sentencepiece_style_tokenizer():
    """Metaspace decoders (Llama 2, Mistral) drop the leading space of whatever they decode first: an output decoded
    alone lost its first space, so a request's text depended on whether it was streamed or had a stop string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from server.model import bundle_from_model
    from tests.engine_utils import make_engine
    from tests.fixtures.models import make_tiny_llama

    words = [
        "<unk>",
        "<s>",
        "</s>",
        "▁The",
        "▁capital",
        "▁of",
        "▁France",
        "▁is",
        "▁Paris",
        "▁a",
        "▁city",
        ".",
    ]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    b = bundle_from_model(make_tiny_llama(tok, seed=0), tok, name="metaspace")
    prompt = tok("The capital of France is")["input_ids"]
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    outs = make_engine(b, {}).generate([
        Request("plain", prompt, sp),
        Request("streamed", prompt, sp, stream_text=True),
        Request("stop", prompt, SamplingParams(max_tokens=5, ignore_eos=True, stop=("zzz",))),
    ])  # fmt: skip
    assert len({o.text for o in outs}) == 1 and outs[0].text.startswith(" ")


@pytest.mark.parametrize("processed", [False, True])
def test_a_row_whose_distribution_is_not_valid_fails_alone(setup, processed):
    """A temperature so small that logits / temperature overflow: the row's probabilities are NaN. It fails with
    its own error (on the host-synced path of processed rows and the device path alike), its neighbours do not."""
    from server.engine.sampler import INVALID_DISTRIBUTION

    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 6, 3)
    extra = {"logit_bias": ((5, 1.0),)} if processed else {}
    bad = SamplingParams(max_tokens=4, temperature=1e-38, seed=1, ignore_eos=True, **extra)
    good = _sampled(2)
    outs = make_engine(b, keys).generate([Request("bad", prompt, bad, k0), Request("good", prompt, good, k0)])
    assert outs[0].finish_reason == "error" and outs[0].error == INVALID_DISTRIBUTION, outs[0]
    assert outs[1].error is None and len(outs[1].token_ids) == 12


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_output_text_is_transformers_decode_through_the_rust_tokenizer(which, request):
    """The detokenizer calls the `tokenizers` object directly (a third of transformers' per-call cost on the
    engine thread): for these tokenizers that is exactly transformers' decode, special tokens skipped or not."""
    import random

    from server.engine.detokenizer import _rust_decoder, decode_text
    from tests.fixtures.models import make_tiny_tokenizer

    tok = request.getfixturevalue("smollm2_bundle").tokenizer if which == "smollm2" else make_tiny_tokenizer()
    assert _rust_decoder(tok) is not None
    rng = random.Random(0)
    specials = tok.all_special_ids
    for _ in range(500):
        ids = [
            rng.choice(specials) if rng.random() < 0.15 else rng.randrange(len(tok))
            for _ in range(rng.randint(1, 9))
        ]
        for skip in (True, False):
            want = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert decode_text(tok, ids, skip) == want, ids

    class OwnDecode(type(tok)):  # a tokenizer with its own decoding keeps transformers' path
        def _decode(self, *a, **kw):
            return "own"

    tok.__class__ = OwnDecode
    try:
        assert _rust_decoder(tok) is None and decode_text(tok, [1, 2]) == "own"
    finally:
        tok.__class__ = OwnDecode.__mro__[1]


def test_a_sampled_row_may_draw_token_zero():
    # token 0 holds (almost) all the mass: a sampled (not greedy) row must get it, not a failure
    logits = torch.zeros(2, 16)
    logits[:, 0] = 50.0
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s) for s in (1, 2)]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = sample(logits, params, gens)
    assert out.failed == {} and out.tokens == [0, 0], (out.failed, out.tokens)
    assert INVALID_DISTRIBUTION not in out.failed.values()


def test_a_uniform_point_of_zero_never_picks_a_leading_token_of_weight_zero(monkeypatch):
    # torch.rand may return exactly 0.0: the first token whose cumulative weight passes 0 is drawn, never a
    # leading token of weight 0 (top-k / allowed_token_ids / a grammar excluded it)
    probs = torch.tensor([[0.0, 0.0, 0.3, 0.7], [0.0, 1.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(()))
    tokens, ok = draw(probs, [None, None])
    assert ok.tolist() == [True, True]
    assert tokens.tolist() == [2, 1]


def test_a_draw_that_lands_on_a_weight_zero_token_takes_the_most_likely_one(monkeypatch):
    """Cumulative sums that rounding left apart on either side of a weight-0 token (a GPU's parallel scan may) give
    the point a sliver to land in: such a draw takes the row's most likely token, never the excluded one (here
    the search is made to land there)."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3], [0.6, 0.4, 0.0, 0.0], [0.1, 0.9, 0.0, 0.0]])
    monkeypatch.setattr(torch, "searchsorted", lambda *a, **k: torch.tensor([[1], [3], [1]]))
    tokens, ok = draw(probs, [None] * 3)
    assert tokens.tolist() == [2, 0, 1] and ok.all()


def test_allowed_token_ids_past_the_vocabulary_are_ignored():
    vocab = 8
    row = torch.arange(vocab, dtype=torch.float32)
    p = SamplingParams(max_tokens=1, allowed_token_ids=(1, 3, vocab, vocab + 5))
    got = process_scores(row, p, [0], [])
    assert torch.isfinite(got).nonzero().flatten().tolist() == [1, 3]
    assert got[1] == 1.0 and got[3] == 3.0


@pytest.mark.parametrize("probs, top_p", [([0.25] * 4, 0.5), ([0.5, 0.25, 0.25], 0.75)])
def test_top_p_keeps_the_smallest_set_reaching_it_as_transformers(probs, top_p):
    """Mass landing exactly on top_p: the tokens before already reach it, so the next is not kept (it was: 3 of 4
    equal tokens kept for top_p 0.5, where transformers and vLLM keep 2)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from server.engine.sampler import filter_batch

    x = torch.tensor(probs).log()
    p = SamplingParams(temperature=1.0, top_p=top_p)
    want = torch.isfinite(TopPLogitsWarper(top_p)(None, x[None].clone())[0]).sum().item()
    assert torch.isfinite(filter_logits(x, p)).sum().item() == want
    assert torch.isfinite(filter_batch(x[None], [p])[0]).sum().item() == want


def test_bad_words_match_transformers_no_bad_words(setup):
    """vLLM's bad_words as token sequences: a one-token word never comes out; a longer word's last token is banned
    only where the output ends with the rest of it. Greedy equals transformers' NoBadWordsLogitsProcessor (its
    prefix match looks at the prompt too: the words are chosen so the prompt never ends with one's first token),
    in a mixed batch with an untouched plain row; a row left with no token fails alone."""
    from transformers import NoBadWordsLogitsProcessor

    b, keys = setup
    k0, k1 = list(keys)
    new = 10
    prompt = random_prompt(b.spec.vocab_size, 6, 4)
    eng = make_engine(b, keys)
    plain = eng.generate([Request("p", prompt, SamplingParams(max_tokens=new, ignore_eos=True), k0)])[
        0
    ].token_ids
    one, two = (plain[2],), (plain[4], plain[5])
    assert prompt[-1] != plain[4] and plain[5] not in plain[:5]

    def params(*words, **kw):
        return SamplingParams(max_tokens=new, ignore_eos=True, bad_words_token_ids=words, **kw)

    end = min(eng.eos_ids)
    every = tuple((t,) for t in range(b.spec.vocab_size) if t != end)
    reqs = [
        Request("one", prompt, params(one), k0),
        Request("two", prompt, params(two), k0),
        Request("plain", prompt, SamplingParams(max_tokens=new, ignore_eos=True), k0),
        Request("sampled", prompt, params(one, temperature=1.5, seed=2), k1),
        Request("none", prompt, params(*every, min_tokens=2), k0),
    ]
    outs = {o.request_id: o for o in eng.generate(reqs)}
    for name, words in (("one", [list(one)]), ("two", [list(two)])):
        ref = hf_greedy(b.hf_model, keys[k0], prompt, new, processor=NoBadWordsLogitsProcessor(words, end))
        assert outs[name].token_ids == ref, name
    got_one, got_two = outs["one"].token_ids, outs["two"].token_ids
    assert got_one[:2] == plain[:2] and one[0] not in got_one
    assert got_two[:5] == plain[:5] and got_two[5] != plain[5]
    assert all(got_two[i : i + 2] != list(two) for i in range(new - 1))
    assert outs["plain"].token_ids == plain
    assert one[0] not in outs["sampled"].token_ids
    assert outs["none"].finish_reason == "error" and "bad_words" in outs["none"].error


def test_bad_word_tokens_follow_the_output():
    from server.engine.sampler import bad_word_tokens

    words = [(5,), (1, 2), (1, 2, 3), (7, 9), (200,)]
    assert bad_word_tokens(words, [], 100) == [
        5
    ]  # longer words need their other tokens first; 200 is past vocab
    assert bad_word_tokens(words, [4, 1], 100) == [2, 5]
    assert bad_word_tokens(words, [1, 2], 100) == [3, 5]
    assert bad_word_tokens(words, [2, 1, 7], 100) == [5, 9]
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(max_tokens=1, bad_words_token_ids=((),))


def test_bad_words_on_the_embedded_model(smollm2_bundle):
    """vLLM's tokenization of bad_words (the word, and its form after a space when that is other tokens of the same
    count), and its effect: SmolLM2 completes "The capital of France is" with " Paris" unless Paris is a bad word."""
    from server.api.service import bad_word_ids

    tok = smollm2_bundle.tokenizer
    ids = bad_word_ids(tok, ["Paris", "  antidisestablishment"])
    enc = [
        tuple(tok.encode(w, add_special_tokens=False)) for w in ("Paris", " Paris", "antidisestablishment")
    ]
    assert ids[:3] == tuple(enc) and len(ids) == 4 and len(ids[3]) == len(enc[2]) > 1
    assert ids[3][1:] == enc[2][1:] and ids[3][0] != enc[2][0]
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    eng = make_engine(smollm2_bundle, {})
    outs = [
        tok.decode(
            eng.generate([Request("r", prompt, SamplingParams(max_tokens=4, bad_words_token_ids=bad))])[
                0
            ].token_ids
        )
        for bad in ((), bad_word_ids(tok, ["Paris"]))
    ]
    assert outs[0].startswith(" Paris") and "Paris" not in outs[1], outs


@pytest.mark.parametrize("stop", [(), ("ok",)])
def test_the_decode_window_stays_short_when_no_text_comes(stop):
    """Tokens that add no text (special tokens the text leaves out) or never complete a character (lone UTF-8 lead
    bytes, which a tenant can push a model to write) do not grow the window decoded at every token: it used to
    re-decode everything since the last complete text, quadratic on the engine thread. The text is the same as
    decoding the whole output at once."""
    from server.engine.detokenizer import MAX_WAITING, IncrementalDetokenizer, decode_output
    from server.engine.token_bytes import TokenTexts
    from tests.fixtures.models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    texts = TokenTexts(tok)
    byte = {texts.entry(i)[1]: i for i in range(256)}
    lead, special = byte[b"\xe2"], tok.convert_tokens_to_ids("<|im_start|>")
    euro = [byte[bytes([b])] for b in "€".encode()]
    ok = tok.encode("ok", add_special_tokens=False)
    output = [lead] * 200 + euro + [special] * 200 + ok + [lead] * 30 + euro + ok + [lead] * 2
    prompt = tok.encode("Hi there", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt, stop, texts=texts)
    pieces, widest = [], 0
    for t in output:
        piece, hit = d.add(t)
        pieces.append(piece)
        widest = max(widest, len(d.ids) - d.prefix_offset)
        if hit:
            break
    text = "".join(pieces) + ("" if d.stopped else d.finish())
    whole = decode_output(tok, prompt, output)
    assert text == (whole[: whole.index("ok")] if stop else whole)
    assert widest <= 2 * MAX_WAITING + 3, widest  # (was the whole run: 200 tokens)


def _green_z(tokens: list[int], first_prev: int, vocab: int, gamma: float) -> float:
    """Kirchenbauer's detector: the z-score of how many tokens fall in the green list their previous token draws."""
    from server.engine.sampler import watermark_greenlist

    prev, green = first_prev, 0
    for t in tokens:
        green += int(t in set(watermark_greenlist(prev, vocab, gamma).tolist()))
        prev = t
    n = len(tokens)
    return (green - gamma * n) / (n * gamma * (1 - gamma)) ** 0.5


def test_watermarked_text_is_detected_and_plain_text_is_not(setup):
    """TGI's watermark: each step adds delta to the green list its previous token draws (TGI's hash key, CPU
    permutation); a detector recomputing those lists finds sampled watermarked text far above chance, plain text
    at chance; with the watermark, a row's scores differ from the logits by delta on the green list alone."""
    from server.engine.sampler import process_scores, watermark_greenlist

    b, keys = setup
    eng = make_engine(b, keys)
    prompt = random_prompt(b.spec.vocab_size, 7, 3)
    vocab = b.hf_model.config.vocab_size
    outs = eng.generate(
        [
            Request(
                f"w{wm}",
                prompt,
                SamplingParams(max_tokens=400, temperature=1.0, seed=7, ignore_eos=True, watermark=wm),
            )
            for wm in (True, False)
        ]
    )
    z_marked = _green_z(outs[0].token_ids, prompt[-1], vocab, 0.5)
    z_plain = _green_z(outs[1].token_ids, prompt[-1], vocab, 0.5)
    assert z_marked > 5 and abs(z_plain) < 3, (z_marked, z_plain)
    row = torch.randn(vocab)
    got = process_scores(row, SamplingParams(watermark=True, watermark_delta=1.5), [4, 9], [2])
    green = torch.zeros(vocab, dtype=torch.bool)
    green[watermark_greenlist(2, vocab, 0.5)] = True
    assert int(green.sum()) == vocab // 2
    assert torch.equal(got[green], row[green] + 1.5) and torch.equal(got[~green], row[~green])


def test_byte_fallback_tokenizers_keep_characters_around_byte_tokens():
    """SentencePiece vocabularies with byte fallback (Llama 2, Mistral, Gemma) decode a run of `<0xNN>` tokens that
    is not valid UTF-8 as a whole into U+FFFD for every byte. The prompt context decoded before the output began
    inside a character, and an output cut inside one was re-decoded whole: characters around them turned into
    U+FFFD, differently streamed and not. Each token's spelling keeps its "▁" as a space."""
    from server.engine.detokenizer import IncrementalDetokenizer, decode_output
    from server.engine.token_bytes import TokenTexts
    from tests.fixtures.models import make_sentencepiece_tokenizer

    tok = make_sentencepiece_tokenizer()
    texts = TokenTexts(tok)

    def both(prompt: list[int], ids: list[int]) -> tuple[str, str]:
        d = IncrementalDetokenizer(tok, prompt, (), texts=texts)
        return "".join(d.add(i)[0] for i in ids) + d.finish(), decode_output(tok, prompt, ids)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    party = "\N{PARTY POPPER}"
    prompt = ids("The capital " + party + party)  # its last 6 tokens begin inside the first character
    assert len(prompt) > 6 and tok.convert_ids_to_tokens(prompt[-6]) == "<0x8E>"  # (its third byte)
    out = ids(party + " is Paris")[1:]  # (no "▁" of its own in front)
    assert both(prompt, out) == (party + " is Paris",) * 2
    # cut inside a character: the text before it stays, the rest is one U+FFFD, streamed or not
    cut = ids("日本")[:-2]  # (a "▁" in front: the normalizer puts one)
    assert tok.convert_ids_to_tokens(cut) == ["▁", "<0xE6>", "<0x97>", "<0xA5>", "<0xE6>"]
    assert both(ids("The capital is"), cut) == (" 日\ufffd",) * 2
    # a prompt that ends inside a character: the output that completes it brings that character only
    head = ids("The capital " + party + party)
    assert both(head[:-2], head[-2:] + ids("is") + ids("日本")) == (party + " is 日本",) * 2
    # spellings (logprobs' tokens, chat's bytes) keep the space their "▁" stands for, so they add up to the text
    spelled = [texts(i) for i in ids("The capital is Paris.")]
    assert spelled == [" The", " capital", " is", " Paris", "."]
    assert [texts(i) for i in cut] == [" ", "bytes:\\xe6", "bytes:\\x97", "bytes:\\xa5", "bytes:\\xe6"]
    assert not texts.dropped(ids(" ")[0]) and texts.dropped(tok.eos_token_id)
    # bytes that are not UTF-8 (a stray 0xED between newlines): the decoder's U+FFFDs for their run, the same
    # streamed and not (decoded at once, the run's other characters were lost differently)
    stray = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0x0A, 0xED, 0x0A, 0x41)]
    streamed, whole = both(ids("The capital is"), stray)
    assert streamed == whole and streamed.startswith("\n")
