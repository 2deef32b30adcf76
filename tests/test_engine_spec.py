"""Speculative decoding by prompt lookup: drafts from a row's own n-grams, verified in one step. Greedy outputs are
token-identical to plain decoding and to transformers; rows that cannot speculate are untouched."""

from __future__ import annotations

import pytest
import torch

from server.engine import PrefixKey, Request, SamplingParams, StructuredOutputs
from server.engine.model_runner import cpu_packing_available
from server.engine.spec import NgramIndex, accept, speculable
from server.engine.types import ThinkingBudget
from tests.engine_utils import computed_tokens, hf_greedy, make_engine, pool_bytes, random_kv, random_prompt


def test_ngram_index_proposes_what_followed_the_longest_latest_match():
    idx = NgramIndex(2, 3)
    assert idx.propose([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]
    # the 3-gram [7, 1, 2] wins over the later 2-gram [1, 2]
    assert NgramIndex(2, 3).propose([7, 1, 2, 8, 5, 1, 2, 9, 7, 1, 2], 3) == [8, 5, 1]
    assert NgramIndex(2, 3).propose([1, 2, 3, 4, 5], 3) == []  # no earlier occurrence
    assert NgramIndex(1, 1).propose([4, 4, 4], 5) == [4]  # the draft stops at the sequence's end
    # incremental: the index grows with the sequence
    grow = NgramIndex(2, 2)
    toks = [1, 2, 3]
    assert grow.propose(toks, 2) == []
    toks += [1, 2]
    assert grow.propose(toks, 2) == [3, 1]
    assert grow.propose(toks, 0) == []


def test_accept_takes_the_agreeing_drafts_and_the_models_next_token():
    assert accept([3, 4, 5], [3, 4, 9, 0]) == [3, 4, 9]
    assert accept([3, 4, 5], [0, 4, 5, 6]) == [0]
    assert accept([3, 4, 5], [3, 4, 5, 6]) == [3, 4, 5, 6]


def test_which_rows_speculate():
    """Greedy and sampled rows; not those whose scores are processed, reported or constrained per position."""
    assert speculable(SamplingParams())
    assert speculable(SamplingParams(temperature=0.7, top_k=5, top_p=0.9))
    # a seeded sampled row would draw differently on the steps it drafts, which depend on the rest of the batch
    assert not speculable(SamplingParams(temperature=0.7, seed=1))
    assert speculable(SamplingParams(seed=1))  # greedy: the seed plays no part
    assert not speculable(SamplingParams(structured=StructuredOutputs("regex", "a+")))
    assert speculable(SamplingParams(logprobs=3))  # read from the verified positions
    assert not speculable(SamplingParams(repetition_penalty=1.2))
    assert not speculable(SamplingParams(logit_bias=((3, 1.0),)))
    assert not speculable(SamplingParams(min_tokens=2))
    # a thinking budget forces tokens that a verified draft would skip
    assert not speculable(SamplingParams(thinking_budget=ThinkingBudget(4, "<t>", "</t>", ((1,),))))


def _repetitive(vocab: int, seed: int, unit: int = 7, times: int = 3) -> list[int]:
    return random_prompt(vocab, unit, seed) * times


@pytest.fixture
def setup(tiny_llama_bundle):
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 6 + 3 * i, seed=i) for i in range(3)}
    return b, keys


class _Oracle:
    """A proposer that knows the plain engine's greedy outputs: it drafts the true next tokens, with the last one
    wrong every third step (partial acceptance) and all of them wrong every fifth (nothing accepted)."""

    def __init__(self, refs: dict[tuple[int, ...], list[int]]) -> None:
        self.refs = refs
        self.calls = 0

    def __call__(self, min_n: int, max_n: int) -> _Oracle:
        return self  # stands in for NgramIndex(min_n, max_n)

    def propose(self, tokens: list[int], k: int) -> list[int]:
        self.calls += 1
        for prompt, out in self.refs.items():
            if (
                tuple(tokens[: len(prompt)]) == prompt
                and tokens[len(prompt) :] == out[: len(tokens) - len(prompt)]
            ):
                draft = out[len(tokens) - len(prompt) :][:k]
                if draft and self.calls % 5 == 0:
                    return [(t + 1) % 250 for t in draft]
                if len(draft) > 1 and self.calls % 3 == 0:
                    draft[-1] = (draft[-1] + 1) % 250
                return draft
        return []


def test_verified_drafts_keep_outputs_exact_in_a_mixed_batch(setup, monkeypatch):
    """Drafts (right, partly right, wrong) for three tenants' greedy rows and a row asking for logprobs, next to a
    sampled row (no drafts offered) and a penalised row (which never speculates): every output equals the plain
    engine's, the greedy ones transformers' too, the logprobs are the plain engine's, and the accepted drafts make
    rows emit several tokens a step."""
    from server.engine import scheduler

    b, keys = setup
    ks = list(keys)
    vocab = b.spec.vocab_size
    new = 24
    greedy = [
        Request(
            f"g{i}",
            random_prompt(vocab, 9 + i, 10 + i),
            SamplingParams(max_tokens=new, ignore_eos=True),
            ks[i],
        )
        for i in range(3)
    ]
    others = [
        Request(
            "seeded",
            random_prompt(vocab, 8, 20),
            SamplingParams(max_tokens=new, temperature=0.9, seed=3),
            ks[0],
        ),
        Request(
            "lp",
            random_prompt(vocab, 8, 21),
            SamplingParams(max_tokens=new, ignore_eos=True, logprobs=2),
            ks[1],
        ),
        Request(
            "pen", random_prompt(vocab, 8, 22), SamplingParams(max_tokens=new, repetition_penalty=1.3), None
        ),
    ]
    reqs = greedy + others
    plain_eng = make_engine(b, keys)
    plain = {o.request_id: o for o in plain_eng.generate(reqs)}
    drafted = [*greedy, others[1]]  # the logprobs row drafts too
    oracle = _Oracle({tuple(r.prompt_token_ids): plain[r.request_id].token_ids for r in drafted})
    monkeypatch.setattr(scheduler, "NgramIndex", oracle)
    spec = make_engine(b, keys, speculative_tokens=4)
    computed = computed_tokens(spec)
    outs = {o.request_id: o for o in spec.generate(reqs)}
    for r in reqs:
        assert outs[r.request_id].token_ids == plain[r.request_id].token_ids, r.request_id
    for r in greedy:
        assert outs[r.request_id].token_ids == hf_greedy(b.hf_model, keys[r.prefix], r.prompt_token_ids, new)
    lp, want = outs["lp"].logprobs, plain["lp"].logprobs
    assert lp is not None and want is not None and len(lp) == len(want) == new
    assert [x.logprob for x in lp] == pytest.approx([x.logprob for x in want], abs=1e-4)
    assert [[t for t, _ in x.top] for x in lp] == [[t for t, _ in x.top] for x in want]
    if cpu_packing_available(torch.device("cpu"), torch.float32):
        # the same bits: each verified position attends as a plain decode row (a multi-token call's logits moved
        # by ~1e-5, and a near-tie with them; whether a row drafts depends on the rest of the batch)
        assert [(x.logprob, x.top) for x in lp] == [(x.logprob, x.top) for x in want]
    assert len(outs["lp"].itl) < new - 1  # its drafts were accepted: several tokens in one step
    sched = spec.scheduler
    assert 0 < sched.spec_accepted_tokens < sched.spec_draft_tokens  # some drafts right, some wrong
    # every token's KV is computed once (accepted drafts are not recomputed); only rejected drafts are extra
    useful = sum(len(r.prompt_token_ids) + len(outs[r.request_id].token_ids) - 1 for r in reqs)
    assert sum(computed) == useful + sched.spec_draft_tokens - sched.spec_accepted_tokens
    # tokens of one step arrive together: one arrival (one inter-token gap) per step, as vLLM's per-chunk ITL, not
    # a ~0 gap per accepted draft; plain decoding has one per token
    assert all(len(outs[r.request_id].itl) < new - 1 for r in greedy)
    assert all(len(o.itl) == new - 1 for o in plain.values())
    assert min(x for o in outs.values() for x in o.itl) > 1e-4


def test_prompt_lookup_on_the_tiny_model_changes_nothing(setup):
    """Real n-gram drafts from repetitive prompts (the random model rarely agrees with them): outputs unchanged."""
    b, keys = setup
    ks = list(keys)
    vocab = b.spec.vocab_size
    reqs = [
        Request(f"r{i}", _repetitive(vocab, 30 + i), SamplingParams(max_tokens=16, ignore_eos=True), ks[i])
        for i in range(3)
    ]
    spec = make_engine(b, keys, speculative_tokens=4, spec_ngram=(1, 3))
    outs = spec.generate(reqs)
    assert spec.scheduler.spec_draft_tokens > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in make_engine(b, keys).generate(reqs)]


def test_limits_hold_within_an_accepted_draft(setup):
    """max_tokens, a stop token met inside an accepted draft, and the context limit all end the row exactly where
    plain decoding would."""
    b, keys = setup
    k0 = next(iter(keys))
    vocab = b.spec.vocab_size
    prompt = _repetitive(vocab, 30)
    base = make_engine(b, keys).generate(
        [Request("x", prompt, SamplingParams(max_tokens=20, ignore_eos=True), k0)]
    )
    full = base[0].token_ids
    stop_at = full[9]
    reqs = [
        Request("len", prompt, SamplingParams(max_tokens=5, ignore_eos=True), k0),
        Request(
            "stop", prompt, SamplingParams(max_tokens=20, ignore_eos=True, stop_token_ids=(stop_at,)), k0
        ),
    ]
    outs = {
        o.request_id: o for o in make_engine(b, keys, speculative_tokens=6, spec_ngram=(1, 3)).generate(reqs)
    }
    assert outs["len"].token_ids == full[:5] and outs["len"].finish_reason == "length"
    assert outs["stop"].token_ids == full[: full.index(stop_at) + 1] and outs["stop"].finish_reason == "stop"
    # context limit: the prefix (6) + prompt (21) + 9 tokens = 36 positions (max_tokens within it alone)
    short = make_engine(b, keys, speculative_tokens=6, spec_ngram=(1, 3), max_model_len=36)
    out = short.generate([Request("ctx", prompt, SamplingParams(max_tokens=15, ignore_eos=True), k0)])[0]
    assert out.token_ids == full[:9] and out.finish_reason == "length"


def test_accepted_tokens_fill_the_prompt_cache_and_survive_preemption(setup):
    """Blocks completed by accepted drafts are registered (the next turn reuses them), and a pool small enough to
    preempt mid-flight still gives the plain engine's outputs."""
    b, keys = setup
    k0 = next(iter(keys))
    vocab = b.spec.vocab_size
    prompt = _repetitive(vocab, 40, unit=6, times=4)
    eng = make_engine(b, keys, speculative_tokens=4, spec_ngram=(1, 3))
    ans = eng.generate([Request("t1", prompt, SamplingParams(max_tokens=40, ignore_eos=True), k0)])[
        0
    ].token_ids
    turn2 = prompt + ans + random_prompt(vocab, 3, 41)
    h0 = eng.scheduler.cache_hit_tokens
    out = eng.generate([Request("t2", turn2, SamplingParams(max_tokens=4, ignore_eos=True), k0)])[0].token_ids
    assert eng.scheduler.cache_hit_tokens - h0 == ((len(prompt) + 40 - 1) // 16) * 16
    assert out == hf_greedy(b.hf_model, keys[k0], turn2, 4)
    reqs = [
        Request(f"p{i}", _repetitive(vocab, 50 + i), SamplingParams(max_tokens=40, ignore_eos=True), k)
        for i, k in enumerate(list(keys) * 2)
    ]
    small = make_engine(b, keys, speculative_tokens=4, spec_ngram=(1, 3), kv_cache_bytes=pool_bytes(b, 20))
    got = small.generate(reqs)
    assert small.scheduler.num_preemptions > 0 and small.scheduler.spec_accepted_tokens > 0
    plain = make_engine(b, keys).generate(reqs)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]


@pytest.mark.slow
def test_smollm2_copying_text_accepts_drafts_and_stays_exact(smollm2_bundle):
    """The real model asked to repeat a passage copies it: prompt lookup drafts the passage, most drafts are
    accepted, and the greedy output is the plain engine's token for token."""
    from server.model import render_prompt

    b = smollm2_bundle
    passage = (
        "The prefix store keeps every trained prefix on disk or in Redis. Each record holds the tensors, the base "
        "model fingerprint, the checksum of the bytes and a summary of the training run."
    )
    prompt = render_prompt(b.tokenizer, f"Repeat this text exactly, word for word:\n\n{passage}", "chat")
    req = Request("copy", prompt, SamplingParams(max_tokens=48))
    spec = make_engine(b, {}, speculative_tokens=4, kv_cache_bytes=64 * 2**20)
    out = spec.generate([req])[0]
    plain = make_engine(b, {}, kv_cache_bytes=64 * 2**20).generate([req])[0]
    assert out.token_ids == plain.token_ids
    assert "prefix store keeps every trained prefix" in b.tokenizer.decode(out.token_ids)
    sched = spec.scheduler
    assert sched.spec_accepted_tokens >= len(out.token_ids) // 2, (
        sched.spec_accepted_tokens,
        sched.spec_draft_tokens,
    )


def test_a_step_with_a_long_prefill_chunk_runs_no_drafts(setup, monkeypatch):
    """Drafting rows share the prefill group's padding to its longest chunk: beside a newcomer's long prompt they
    decode plainly that step, and outputs stay the plain engine's."""
    from server.engine import scheduler

    b, keys = setup
    k0 = next(iter(keys))
    vocab = b.spec.vocab_size
    first = Request("first", random_prompt(vocab, 8, 60), SamplingParams(max_tokens=12, ignore_eos=True), k0)
    plain = make_engine(b, keys).generate([first])[0].token_ids
    monkeypatch.setattr(scheduler, "NgramIndex", _Oracle({tuple(first.prompt_token_ids): plain}))
    eng = make_engine(b, keys, speculative_tokens=4)
    seen: list[list[int]] = []  # each step's rows' token counts
    prepare = eng.runner.prepare

    def spy(rows):
        seen.append(sorted(len(r.tokens) for r in rows))
        return prepare(rows)

    eng.runner.prepare = spy  # type: ignore[method-assign]
    eng.add_request(first)
    while not eng.scheduler.running or eng.scheduler.running[0].num_cached < 10:
        eng.step()  # "first" is decoding with drafts by now
    late = Request("late", random_prompt(vocab, 40, 61), SamplingParams(max_tokens=4, ignore_eos=True), k0)
    eng.add_request(late)
    outs: dict[str, list[int]] = {}
    steps_before = len(seen)
    while eng.has_unfinished():
        for ev in eng.step():
            outs.setdefault(ev.request_id, []).extend(ev.token_ids)
    assert any(n > 1 for step in seen[:steps_before] for n in step)  # "first" was drafting before
    assert seen[steps_before] == [
        1,
        40,
    ]  # the newcomer's 40-token prompt and "first" with one token, no draft
    assert eng.scheduler.spec_accepted_tokens > 0
    assert outs["late"] == make_engine(b, keys).generate([late])[0].token_ids


def test_stop_strings_inside_accepted_drafts_end_where_plain_decoding_does(tiny_llama_bundle, monkeypatch):
    """A stop string completed by the second of four accepted tokens: the text ends before it, the tokens after it
    are never emitted, exactly as without drafts (streamed text included)."""
    from server.engine import scheduler

    b = tiny_llama_bundle
    prompt = random_prompt(b.spec.vocab_size, 10, 70)
    full = make_engine(b, {}).generate(
        [Request("x", prompt, SamplingParams(max_tokens=20, ignore_eos=True))]
    )[0]
    text = b.tokenizer.decode(full.token_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]  # two characters from the middle of the output
    assert stop and stop in text
    monkeypatch.setattr(scheduler, "NgramIndex", _Oracle({tuple(prompt): full.token_ids}))
    req = Request("s", prompt, SamplingParams(max_tokens=20, ignore_eos=True, stop=(stop,)), stream_text=True)
    spec = make_engine(b, {}, speculative_tokens=4)
    events = []
    spec.add_request(req, events.append)
    while spec.has_unfinished():
        spec.step()
    plain_events = []
    plain = make_engine(b, {})
    plain.add_request(req, plain_events.append)
    while plain.has_unfinished():
        plain.step()
    assert spec.scheduler.spec_accepted_tokens > 0
    assert (
        "".join(e.text for e in events) == "".join(e.text for e in plain_events) == text[: text.index(stop)]
    )
    assert [t for e in events for t in e.token_ids] == [t for e in plain_events for t in e.token_ids]
    assert events[-1].finish_reason == plain_events[-1].finish_reason == "stop"


class _FixedDraft:
    """A proposer that always drafts the same tokens (right or wrong: the sampler must stay exact either way)."""

    def __init__(self, draft: list[int]) -> None:
        self.draft = draft

    def __call__(self, min_n: int, max_n: int) -> _FixedDraft:
        return self

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return self.draft[:k]


def test_speculative_sampling_keeps_the_sampling_distribution(tiny_llama_bundle, monkeypatch):
    """1,500 seeded samples of one prompt (temperature 0.7, top-k 3), all in one batch, every decoding row drafting
    the greedy continuation: the tokens after the first have the same distribution with and without drafts (total
    variation 0.02-0.05 here, against 0.14 when the replacement is drawn from p without removing the rejected draft
    and 0.66 when drafts are kept without the p(d) test). The first token comes from the prefill in both, the same
    per seed; with drafts on every step, a seed reproduces its output too."""
    from collections import Counter

    from server.engine import scheduler

    b = tiny_llama_bundle
    prompt = random_prompt(b.spec.vocab_size, 12, 80)
    greedy = make_engine(b, {}).generate(
        [Request("g", prompt, SamplingParams(max_tokens=3, ignore_eos=True))]
    )[0]
    n = 1500
    one_batch = dict(
        max_num_seqs=n, max_waiting=n, max_num_batched_tokens=13 * n, kv_cache_bytes=pool_bytes(b, 3 * n)
    )

    def reqs(count: int = n) -> list[Request]:
        sp = dict(max_tokens=4, ignore_eos=True, temperature=0.7, top_k=3)
        return [Request(f"s{i}", prompt, SamplingParams(seed=i, **sp)) for i in range(count)]

    plain = [o.token_ids for o in make_engine(b, {}, **one_batch).generate(reqs())]
    monkeypatch.setattr(scheduler, "NgramIndex", _FixedDraft(greedy.token_ids[1:3]))
    # seeds pair each drafting row with its plain twin here; served seeded rows do not draft (see
    # test_which_rows_speculate), so let them for the test of the verifier itself
    monkeypatch.setattr(scheduler, "speculable", lambda p: not p.processed and p.structured is None)
    spec_eng = make_engine(b, {}, speculative_tokens=2, **one_batch)
    spec = [o.token_ids for o in spec_eng.generate(reqs())]
    sched = spec_eng.scheduler
    assert sched.spec_draft_tokens >= 2 * n and sched.spec_accepted_tokens > n // 2
    assert [t[0] for t in spec] == [t[0] for t in plain]  # prefill: no drafts
    assert spec != plain  # other random streams ...

    def tv(a: list, c: list) -> float:
        ca, cc = Counter(a), Counter(c)
        return sum(abs(ca[k] - cc[k]) for k in ca.keys() | cc.keys()) / (2 * len(a))

    assert tv([t[1] for t in spec], [t[1] for t in plain]) < 0.07  # ... the same distribution
    assert tv([t[2] for t in spec], [t[2] for t in plain]) < 0.1
    assert tv([tuple(t[:3]) for t in spec], [tuple(t[:3]) for t in plain]) < 0.15
    # the greedy token is common enough for the test to see a biased verifier
    share = sum(t[1] == greedy.token_ids[1] for t in plain) / n
    assert 0.3 < share < 0.9, share
    again = make_engine(b, {}, speculative_tokens=2, **one_batch).generate(reqs(5))
    assert [o.token_ids for o in again] == spec[:5]


def test_a_seeded_sampled_row_gives_the_same_output_whatever_shares_its_batch(tiny_llama_bundle):
    """With drafting on, a seeded sampled request alone and beside long prompts arriving now and then (steps next
    to a long prefill drop their drafts) gives the same tokens, and those of the engine without drafts: seeded
    sampled rows do not draft. A model rigged to repeat its last token, so prompt lookup would draft all along."""
    import torch

    from server.model import bundle_from_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    m = make_tiny_llama(tok, seed=0)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.lm_head.weight.copy_(m.model.embed_tokens.weight * 0.25)
    b = bundle_from_model(m, tok, name="repeater")
    prompt = random_prompt(b.spec.vocab_size, 8, 0)

    def run(sp: SamplingParams, neighbours: bool) -> tuple[list[int], int]:
        eng = make_engine(b, {}, speculative_tokens=4)
        eng.add_request(Request("x", prompt, sp))
        got: list[int] = []
        for i in range(400):
            if neighbours and i % 3 == 1:
                eng.add_request(
                    Request(f"n{i}", random_prompt(b.spec.vocab_size, 60, i), SamplingParams(max_tokens=1))
                )
            got += [t for ev in eng.step() if ev.request_id == "x" for t in ev.token_ids]
            if not eng.has_unfinished():
                break
        return got, eng.scheduler.spec_draft_tokens

    seeded = SamplingParams(max_tokens=40, temperature=1.0, seed=1234, ignore_eos=True)
    alone, drafted = run(seeded, False)
    beside, _ = run(seeded, True)
    plain = make_engine(b, {}).generate([Request("x", prompt, seeded)])[0].token_ids
    assert alone == beside == plain and len(alone) == 40 and drafted == 0
    unseeded = SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True)
    assert run(unseeded, False)[1] > 0  # the same row without a seed drafts: the model does invite it


class _AlwaysWrongDraft:
    """Stands in for NgramIndex: always drafts as many tokens as it may (`k`), all of them token 1 (wrong)."""

    def __init__(self, *a) -> None:
        pass

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return [1] * k


def test_a_draft_never_preempts_a_running_request(tiny_llama_bundle, monkeypatch):
    """Three rows on a 16-block pool that fit without preemption when decoding plainly: drafting must not take the
    blocks the other rows' plain decode steps need (the docstring of Scheduler._draft)."""
    from server.engine import scheduler

    b = tiny_llama_bundle
    V = b.spec.vocab_size
    monkeypatch.setattr(scheduler, "NgramIndex", _AlwaysWrongDraft)

    def preemptions(spec):
        eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 16), speculative_tokens=spec)
        reqs = [
            Request(f"r{i}", random_prompt(V, n, i), SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (n, m) in enumerate([(60, 20), (64, 20), (99, 4)])
        ]
        outs = eng.generate(reqs)
        return eng.scheduler.num_preemptions, [o.token_ids for o in outs]

    plain, plain_out = preemptions(0)
    spec, spec_out = preemptions(4)
    assert plain == 0 and spec == 0
    assert spec_out == plain_out


def test_events_carry_one_inter_token_gap_per_step_and_the_engine_counts_its_tokens(setup, monkeypatch):
    """A step's accepted drafts share its gap (vLLM's per-step ITL, as `generate`'s Output.itl); the stats line's
    counters: the prompt tokens computed (not those from the prompt cache) and every token generated."""
    from server.engine import scheduler

    b, keys = setup
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 24, 60)
    req = Request("r", prompt, SamplingParams(max_tokens=30, ignore_eos=True), k0)
    monkeypatch.setattr(
        scheduler, "NgramIndex", _Oracle({tuple(prompt): make_engine(b, keys).generate([req])[0].token_ids})
    )
    eng = make_engine(b, keys, speculative_tokens=4)
    events: list = []
    eng.add_request(req, events.append)
    steps_with_tokens = 0
    while eng.has_unfinished():
        steps_with_tokens += any(ev.token_ids for ev in eng.step())
    gaps = [g for ev in events for g in ev.itl]
    tokens = sum(len(ev.token_ids) for ev in events)
    assert eng.scheduler.spec_accepted_tokens > 0 and tokens == 30
    assert len(gaps) == steps_with_tokens - 1 < tokens - 1 and min(gaps) > 0
    assert (eng.num_prompt_tokens_computed, eng.num_generated_tokens) == (len(prompt), 30)
    eng.generate([Request("again", prompt, SamplingParams(max_tokens=2, ignore_eos=True), k0)])
    hit = eng.scheduler.cache_hit_tokens
    assert hit > 0 and eng.num_prompt_tokens_computed == 2 * len(prompt) - hit
    assert eng.num_generated_tokens == 32


class _DraftAtLength:
    """Stands in for NgramIndex: drafts `k` wrong tokens (token 1) only when the row holds `length` tokens."""

    length = 0

    def __init__(self, *a) -> None:
        pass

    def propose(self, tokens: list[int], k: int) -> list[int]:
        return [1] * k if len(tokens) == self.length else []


@pytest.mark.parametrize("k", [16, 4])
def test_a_draft_keeps_back_the_blocks_of_rows_planned_after_it(tiny_llama_bundle, monkeypatch, k):
    """A decoding row ranked first drafts on a step where two rows admitted after it are mid-prefill, each chunk
    (17 tokens) taking 2 new blocks: 4 free blocks for 3 running rows fit the plain step exactly. The draft must keep
    back the blocks of the rows planned after it, not only one per running row (it took the 4th block and the last
    row was preempted). k=16: the draft may run beside those chunks; k=4: it would be dropped beside them
    (`_drop_drafts_beside_long_prefills`), so it must not take blocks either (it kept them)."""
    from server.engine import scheduler

    b = tiny_llama_bundle
    V = b.spec.vocab_size
    monkeypatch.setattr(_DraftAtLength, "length", 48)  # row a's 46-token prompt and 2 outputs: its third step
    monkeypatch.setattr(scheduler, "NgramIndex", _DraftAtLength)

    def run(spec, blocks=11):
        eng = make_engine(
            b, {}, kv_cache_bytes=pool_bytes(b, blocks), speculative_tokens=spec, long_prefill_tokens=32
        )
        s = eng.scheduler
        a = Request("a", random_prompt(V, 46, 1), SamplingParams(max_tokens=6, ignore_eos=True))
        eng.add_request(a)
        outs: dict[str, list[int]] = {}
        free = []
        for i in range(20):
            if (
                i == 1
            ):  # b and c are admitted beside a's first decode step with 32-token chunks (2 blocks each)
                for r in ("b", "c"):
                    sp = SamplingParams(max_tokens=1, ignore_eos=True)
                    eng.add_request(Request(r, random_prompt(V, 49, ord(r)), sp))
            if i == 2:
                free.append((s.pool.num_free, len(s.running)))
            for ev in eng.step():
                outs.setdefault(ev.request_id, []).extend(ev.token_ids)
            if not eng.has_unfinished():
                break
        assert free == [(blocks - 7, 3)]  # the draft's step: 11 blocks leave one more than the running rows
        return s.num_preemptions, s.spec_draft_tokens, outs

    plain, _, plain_out = run(0)
    spec, _, spec_out = run(k)
    assert plain == 0 and spec == 0
    assert spec_out == plain_out
    # with a block to spare beyond every planned row's and one per running row, that step does draft
    roomy, drafted, roomy_out = run(k, blocks=16)
    assert roomy == 0 and drafted == (3 if k == 16 else 0) and roomy_out == plain_out  # 3: max_tokens left
