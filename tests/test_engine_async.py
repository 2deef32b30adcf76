"""Async decode (vLLM v1's async scheduling): a greedy step's tokens stay on the device while the engine launches the
next step from them, then delivers them. Forced on here (`async_decode="on"`; "auto" turns it on with CUDA only):
outputs, finish reasons, events and KV accounting equal the synchronous engine's, with requests joining mid-flight,
ending on end-of-sequence, stop strings, length and aborts, rows that cannot be deferred (sampling, logprobs) in the
same batch, a KV pool too small for every follow-up, and the prompt cache registering output blocks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.engine import PrefixKey, Request, SamplingParams
from server.engine.types import TokenEvent
from tests.engine_utils import hf_greedy, make_engine, mixed_workload, pool_bytes, random_kv, random_prompt


@pytest.fixture(scope="module")
def bundle():
    from server.model import bundle_from_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    return bundle_from_model(make_tiny_llama(tok, seed=0), tok, name="tiny-llama")


def _both(bundle, keys, reqs, **cfg):
    on = make_engine(bundle, keys, async_decode="on", **cfg)
    off = make_engine(bundle, keys, async_decode="off", **cfg)
    got, want = on.generate(reqs), off.generate(reqs)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    for a, b in zip(got, want, strict=True):  # logprobs: the same tokens, values to float32 rounding
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=1e-5)
    # every request's blocks are back (shared prefix blocks stay cached alike)
    assert on.pool.num_used == off.pool.num_used and not on.has_unfinished()
    return on, got


@pytest.mark.parametrize("max_num_seqs", [16, 3])
def test_async_equals_sync_and_transformers(bundle, max_num_seqs):
    """Mixed tenants, varied max_tokens, a third of the requests free to end on end-of-sequence; with 3 slots the
    others join mid-flight as rows leave."""
    keys, reqs = mixed_workload(bundle.spec, (8, 20, 64), 10, 12, no_prefix=9)
    reqs = [
        replace(r, sampling=replace(r.sampling, max_tokens=3 + 2 * i, ignore_eos=i % 3 != 0))
        for i, r in enumerate(reqs)
    ]
    on, got = _both(bundle, keys, reqs, max_num_seqs=max_num_seqs)
    assert on.num_async_steps >= 10  # most decode steps were launched from device tokens
    for r, o in zip(reqs, got, strict=True):
        if r.sampling.ignore_eos:
            kv = keys[r.prefix] if r.prefix is not None else None
            assert o.token_ids == hf_greedy(bundle.hf_model, kv, r.prompt_token_ids, r.sampling.max_tokens)


def test_rows_that_cannot_be_deferred_share_the_batch(bundle):
    """A repetition penalty beside greedy, sampled and logprobs rows: those steps sample on the host as before;
    once it ends, the other rows chain again (logprobs read back with the tokens). Outputs and logprobs equal the
    synchronous engine's."""
    keys, reqs = mixed_workload(bundle.spec, (8, 20), 6, 10)
    special = [
        SamplingParams(max_tokens=4, temperature=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=9, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=3, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=8, logprobs=0, ignore_eos=True),
    ]
    reqs = [replace(r, sampling=special[i]) if i < 4 else r for i, r in enumerate(reqs)]
    on, got = _both(bundle, keys, reqs, max_num_seqs=8)
    assert on.num_async_steps > 0
    assert got[1].logprobs is not None and len(got[1].logprobs) == 9 and len(got[1].logprobs[0].top) == 2
    assert got[3].logprobs is not None and len(got[3].logprobs) == 8 and got[3].logprobs[0].top == ()


def test_seeded_sampling_is_deferred_and_reproducible(bundle):
    """Temperature, top-k, top-p and min-p rows with seeds sample on the device with their own generators: the
    same tokens as the synchronous engine's host-driven sampling, and the steps chain."""
    keys, reqs = mixed_workload(bundle.spec, (8, 20, 64), 6, 14)
    kinds = [
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=20),
        dict(temperature=1.2, top_p=0.9),
        dict(temperature=1.0, min_p=0.05),
        dict(temperature=0.7, top_k=50, top_p=0.95),
        dict(),  # greedy
    ]
    reqs = [
        replace(r, sampling=replace(r.sampling, seed=100 + i, **kinds[i % len(kinds)]))
        for i, r in enumerate(reqs)
    ]
    on, got = _both(bundle, keys, reqs, max_num_seqs=8)
    assert on.num_async_steps >= 10
    assert len({tuple(o.token_ids) for o in got}) == len(got)


def test_sample_on_device_flags_rows_it_cannot_sample(bundle):
    """A row with non-finite logits, or whose temperature overflows its distribution, gets flags (no exception, no
    device-side error); the other rows' tokens are what `sample` draws with the same seeds."""
    import torch

    from server.engine.sampler import make_generator, sample, sample_on_device

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 5
    logits[2, 7] = float("nan")
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, top_p=0.8, seed=3),
        SamplingParams(temperature=1.0, seed=4),
        SamplingParams(temperature=1e-45, seed=5),
    ]
    dev = logits.device
    got = sample_on_device(
        logits, params, [None if p.greedy else make_generator(p.seed, dev) for p in params]
    )
    tokens, finite, valid = got.tolist()
    assert finite == [1, 1, 0, 1] and valid[:2] == [1, 1] and valid[3] == 0
    want = sample(logits[:2], params[:2], [None, make_generator(3, dev)])
    assert tokens[:2] == want.tokens


def test_stop_strings_and_abort_from_a_callback(bundle):
    """A row ended by a stop string or aborted by its own event callback gets no event after its last one, even
    though a follow-up step computed one more token for it."""
    tok = bundle.tokenizer
    vocab = bundle.spec.vocab_size
    base = make_engine(bundle, {}, async_decode="off")
    probe = base.generate(
        [Request("p", random_prompt(vocab, 9, 3), SamplingParams(max_tokens=12, ignore_eos=True))]
    )
    text = tok.decode(probe[0].token_ids[4:6])
    stop = text.strip() or text
    assert stop

    def run(mode: str) -> tuple[list[TokenEvent], list]:
        eng = make_engine(bundle, {}, async_decode=mode)
        events: list[TokenEvent] = []

        def cb(ev: TokenEvent) -> None:
            events.append(ev)
            if ev.request_id == "abort" and not ev.finished and ev.completion_tokens == 3:
                eng.abort("abort")

        reqs = [
            Request(
                "stop",
                random_prompt(vocab, 9, 3),
                SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)),
            ),
            Request("abort", random_prompt(vocab, 7, 4), SamplingParams(max_tokens=12, ignore_eos=True)),
            Request("plain", random_prompt(vocab, 5, 5), SamplingParams(max_tokens=12, ignore_eos=True)),
        ]
        for r in reqs:
            eng.add_request(r, cb)
        while eng.has_unfinished():
            eng.step()
        return events, [eng.pool.num_used, eng.num_async_steps]

    on, (used_on, steps_on) = run("on")
    off, (used_off, _) = run("off")
    key = [(e.request_id, tuple(e.token_ids), e.text, e.finished, e.finish_reason) for e in on]
    assert key == [(e.request_id, tuple(e.token_ids), e.text, e.finished, e.finish_reason) for e in off]
    last = {e.request_id: e for e in on}
    assert last["stop"].finish_reason == "stop" and last["abort"].finish_reason == "abort"
    assert last["plain"].completion_tokens == 12 and used_on == used_off == 0 and steps_on > 0
    for rid in ("stop", "abort"):  # nothing after the finishing event
        idx = [i for i, e in enumerate(on) if e.request_id == rid]
        assert on[idx[-1]].finished and all(not on[i].finished for i in idx[:-1])


def test_tight_pool_falls_back_to_the_scheduler(bundle):
    """A pool too small for every row's next block: the follow-up is not launched, the scheduler preempts and
    recomputes as in synchronous mode; outputs are equal."""
    keys = {PrefixKey("t", "d", 1): random_kv(bundle.spec, 16, seed=1)}
    k = next(iter(keys))
    reqs = [
        Request(
            f"r{i}",
            random_prompt(bundle.spec.vocab_size, 10 + i, i),
            SamplingParams(max_tokens=40, ignore_eos=True),
            k,
        )
        for i in range(6)
    ]
    on, _ = _both(bundle, keys, reqs, kv_cache_bytes=pool_bytes(bundle, 16), max_num_seqs=6)
    assert on.scheduler.num_preemptions > 0 and on.num_async_steps > 0


def test_output_blocks_enter_the_prompt_cache(bundle):
    """Blocks completed by tokens that async steps fed are registered: a follow-up turn whose prompt is the first
    request's prompt and output hits the cache as far as in synchronous mode."""
    vocab = bundle.spec.vocab_size
    first = Request("a", random_prompt(vocab, 20, 1), SamplingParams(max_tokens=40, ignore_eos=True))
    hits = []
    for mode in ("on", "off"):
        eng = make_engine(bundle, {}, async_decode=mode)
        out = eng.generate([first])[0]
        turn = Request("b", first.prompt_token_ids + out.token_ids + [5, 6], SamplingParams(max_tokens=2))
        eng.generate([turn])
        hits.append(eng.scheduler.cache_hit_tokens)
    assert hits[0] == hits[1] >= 48  # 60 tokens fed before the last one: three full blocks


def test_async_decode_setting(bundle):
    assert make_engine(bundle, {}).async_decode is False  # auto: CUDA only
    assert make_engine(bundle, {}, async_decode="on").async_decode is True
    with pytest.raises(ValueError, match="speculative"):
        make_engine(bundle, {}, async_decode="on", speculative_tokens=2)
    with pytest.raises(ValueError, match="async_decode must be"):
        make_engine(bundle, {}, async_decode="yes")


def test_stop_tokens_end_rows_mid_chain(bundle):
    """Rows ended by a stop token id (as by end-of-sequence) while their follow-up is in flight: per-request events
    equal the synchronous engine's, newcomers join as they leave, nothing leaks."""
    vocab = bundle.spec.vocab_size
    prompts = [random_prompt(vocab, 3 + i, 200 + i) for i in range(6)]
    base = make_engine(bundle, {}, async_decode="off")
    first = base.generate(
        [Request(f"p{i}", p, SamplingParams(max_tokens=12, ignore_eos=True)) for i, p in enumerate(prompts)]
    )
    reqs = [
        Request(
            f"r{i}",
            p,
            SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(o.token_ids[2 + i % 5],)),
        )
        for i, (p, o) in enumerate(zip(prompts, first, strict=True))
    ]
    per: dict[str, dict] = {}
    for mode in ("on", "off"):
        eng = make_engine(bundle, {}, async_decode=mode, max_num_seqs=4)
        evs: list[TokenEvent] = []
        for r in reqs:
            eng.add_request(r, evs.append)
        while eng.has_unfinished():
            eng.step()
        got: dict[str, list] = {}
        for e in evs:
            got.setdefault(e.request_id, []).append((tuple(e.token_ids), e.finished, e.finish_reason))
        per[mode] = got
        assert eng.pool.num_used == 0
        if mode == "on":
            assert eng.num_async_steps > 0
    assert per["on"] == per["off"]
    assert sum(v[-1][2] == "stop" for v in per["on"].values()) >= 4


def _token_steps(bundle, mode: str, schedule) -> dict[str, list[int]]:
    """Run `schedule(eng, cb)` steps; the engine step at which each request received each of its tokens."""
    eng = make_engine(bundle, {}, async_decode=mode, max_num_batched_tokens=8, max_num_seqs=8)
    steps: dict[str, list[int]] = {}
    n = [0]

    def cb(ev: TokenEvent) -> None:
        if ev.token_ids:
            steps.setdefault(ev.request_id, []).append(n[0])

    def step() -> None:
        eng.step()
        n[0] += 1

    schedule(eng, cb, step)
    while eng.has_unfinished():
        step()
    return steps


def test_a_row_left_out_of_a_step_is_not_starved(bundle):
    """A running row that the token budget left out of a step (a higher-priority prompt's last chunk took it) must
    not wait for the chain of the rows that were scheduled: it gets its tokens within a step or two of when the
    synchronous engine gives them."""
    vocab = bundle.spec.vocab_size

    def schedule(eng, cb, step):
        sp = SamplingParams
        eng.add_request(Request("A", random_prompt(vocab, 1, 1), sp(max_tokens=30, ignore_eos=True)), cb)
        eng.add_request(Request("X", random_prompt(vocab, 10, 2), sp(max_tokens=5, ignore_eos=True)), cb)
        step()
        eng.add_request(
            Request("H", random_prompt(vocab, 11, 3), sp(max_tokens=30, ignore_eos=True), priority=-1), cb
        )

    sync, on = _token_steps(bundle, "off", schedule), _token_steps(bundle, "on", schedule)
    assert len(on["X"]) == len(sync["X"]) == 5
    assert all(a <= b + 2 for a, b in zip(on["X"], sync["X"], strict=True)), (on["X"], sync["X"])


def test_a_newcomer_is_admitted_without_waiting_for_the_chain(bundle):
    """A request arriving while a chain runs (free slots, nothing to fetch) starts as soon as in synchronous mode,
    give or take the step in flight."""
    vocab = bundle.spec.vocab_size

    def schedule(eng, cb, step):
        for i in range(3):
            eng.add_request(
                Request(f"r{i}", random_prompt(vocab, 5, i), SamplingParams(max_tokens=30, ignore_eos=True)),
                cb,
            )
        for _ in range(6):
            step()
        eng.add_request(
            Request("late", random_prompt(vocab, 4, 9), SamplingParams(max_tokens=5, ignore_eos=True)), cb
        )

    sync, on = _token_steps(bundle, "off", schedule), _token_steps(bundle, "on", schedule)
    assert on["late"][0] <= sync["late"][0] + 2, (on["late"], sync["late"])


def test_a_prefix_being_fetched_does_not_stop_the_chain(bundle):
    """While a waiting request's prefix is still being fetched, the running rows keep chaining (the scheduler could
    not admit it anyway); once the fetch lands, the request is admitted and served exactly."""
    import threading

    from server.engine import DictPrefixProvider, EngineConfig, LLMEngine

    key = PrefixKey("slow", "p", 1)
    kv = random_kv(bundle.spec, 12, seed=5)
    gate = threading.Event()

    class Gated(DictPrefixProvider):
        def fetch(self, k):
            gate.wait(30)
            return super().fetch(k)

    eng = LLMEngine(bundle, Gated({key: kv}), EngineConfig(kv_cache_bytes=8 * 2**20, async_decode="on"))
    vocab = bundle.spec.vocab_size
    for i in range(2):
        eng.add_request(
            Request(f"r{i}", random_prompt(vocab, 5, i), SamplingParams(max_tokens=40, ignore_eos=True))
        )
    late = Request("late", random_prompt(vocab, 6, 7), SamplingParams(max_tokens=6, ignore_eos=True), key)
    for _ in range(3):
        eng.step()
    eng.add_request(late)
    eng.step()  # the scheduler's turn: it starts the fetch
    before = eng.num_async_steps
    for _ in range(10):
        eng.step()
    assert eng.num_async_steps - before >= 9  # the fetch in flight did not break the chain
    gate.set()
    events: list[TokenEvent] = []
    while eng.has_unfinished():
        events.extend(e for e in eng.step() if e.request_id == "late")
    toks = [t for e in events for t in e.token_ids]
    assert toks == hf_greedy(bundle.hf_model, kv, late.prompt_token_ids, 6)


def _stepped(eng) -> list[int]:
    """Count the engine's steps (a one-element list, updated as `eng.step` runs)."""
    n = [0]
    step = eng.step

    def counted():
        n[0] += 1
        return step()

    eng.step = counted
    return n


def test_newcomers_and_prompt_chunks_join_the_chain(bundle):
    """Requests admitted while a chain runs (three slots for ten requests), long prompts cut into chunks of an
    8-token budget, and rows the budget left out all run in chained steps beside the rows fed device tokens: the
    same tokens as the synchronous engine and transformers, and almost every step chained (but for the steps that
    preempt a row for a tenant below its share)."""
    keys, reqs = mixed_workload(bundle.spec, (8, 20), 8, 6)
    vocab = bundle.spec.vocab_size
    reqs += [
        Request("long0", random_prompt(vocab, 30, 50), SamplingParams(max_tokens=5, ignore_eos=True), None),
        Request("long1", random_prompt(vocab, 19, 51), SamplingParams(max_tokens=7, ignore_eos=True), None),
    ]
    for cfg in (dict(max_num_seqs=3), dict(max_num_seqs=4, max_num_batched_tokens=8)):
        on = make_engine(bundle, keys, async_decode="on", **cfg)
        steps = _stepped(on)
        off = make_engine(bundle, keys, async_decode="off", **cfg)
        got, want = on.generate(reqs), off.generate(reqs)
        assert [o.token_ids for o in got] == [o.token_ids for o in want], cfg
        # a fair preemption (a tenant below its share of full rows) is the scheduler's own step: the chain breaks
        fair = on.scheduler.num_fair_preemptions
        assert on.num_async_steps >= steps[0] - 2 - 2 * fair, (on.num_async_steps, steps[0], fair, cfg)
        assert on.pool.num_used == off.pool.num_used and not on.has_unfinished()
        for r, o in zip(reqs, got, strict=True):
            kv = keys[r.prefix] if r.prefix is not None else None
            assert o.token_ids == hf_greedy(bundle.hf_model, kv, r.prompt_token_ids, r.sampling.max_tokens)


def test_newcomers_that_need_the_host_break_the_chain(bundle):
    """Requests arriving mid-chain whose tokens the host must decide (a repetition penalty, logit bias) or that
    want prompt log-probabilities are admitted by the scheduler's own (synchronous) step, promptly; outputs and
    logprobs equal the synchronous engine's."""
    keys, reqs = mixed_workload(bundle.spec, (8, 20), 6, 8)
    special = [
        SamplingParams(max_tokens=4, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=5, prompt_logprobs=1, ignore_eos=True),
        SamplingParams(max_tokens=6, logit_bias=((5, 3.0),), ignore_eos=True),
    ]
    reqs = [replace(r, sampling=special[i - 3]) if i >= 3 else r for i, r in enumerate(reqs)]
    on, got = _both(bundle, keys, reqs, max_num_seqs=2)
    assert on.num_async_steps > 0
    plp = got[4].prompt_logprobs
    assert plp is not None and len(plp) == len(reqs[4].prompt_token_ids)


def test_a_newcomer_that_needs_the_host_starts_at_once_beside_a_chain(bundle):
    """With rows to spare, a request whose tokens the host decides (a repetition penalty) that arrives while two
    rows decode in a chain gets its first token within two steps: the chain stops for it (it cannot join a chained
    step), rather than carrying on for as long as the chained rows run."""
    keys, reqs = mixed_workload(bundle.spec, (8,), 2, 40)
    eng = make_engine(bundle, keys, async_decode="on", max_num_seqs=4)
    for r in reqs:
        eng.add_request(r)
    for _ in range(4):
        eng.step()
    assert eng.num_async_steps > 0
    late = Request("late", random_prompt(bundle.spec.vocab_size, 4, 7),
                   SamplingParams(max_tokens=3, repetition_penalty=1.3, ignore_eos=True), next(iter(keys)))  # fmt: skip
    eng.add_request(late)
    first = None
    for step in range(1, 20):
        if any(ev.request_id == "late" and ev.token_ids for ev in eng.step()):
            first = step
            break
    assert first is not None and first <= 2, first


def test_a_follow_up_that_fails_part_way_through_its_admissions_takes_every_newcomer_back(bundle):
    """A chained step that fails to launch after it admitted a newcomer (here: an error injected once, right after
    an admission): every request it admitted goes back to the queue, once, and is admitted afresh; the outputs are
    the synchronous engine's and every block comes back."""
    _, reqs = mixed_workload(bundle.spec, (8, 20), 8, 6)
    # no prefix fetches (which step admits a newcomer is fixed), rows ending at different steps (a row's slot is
    # free to a chained step once its end was delivered)
    reqs = [
        replace(r, prefix=None, sampling=replace(r.sampling, max_tokens=3 + 2 * i))
        for i, r in enumerate(reqs)
    ]
    off = make_engine(bundle, {}, async_decode="off", max_num_seqs=3)
    want = off.generate(reqs)
    on = make_engine(bundle, {}, async_decode="on", max_num_seqs=3)
    sched = on.scheduler
    admit, register = sched._admit, sched._register
    state = {"armed": False, "fired": 0}

    def admit_once_failing(budget, only=None, admitted=None):
        state["armed"] = only is not None and not state["fired"]  # (only the chain's admissions pass `only`)
        try:
            return admit(budget, only) if admitted is None else admit(budget, only, admitted)
        finally:
            state["armed"] = False

    def register_or_fail(seq, n):
        if state["armed"]:
            state["armed"], state["fired"] = False, 1
            raise RuntimeError("injected after an admission")
        return register(seq, n)

    sched._admit = admit_once_failing
    sched._register = register_or_fail
    got = on.generate(reqs)
    assert state["fired"] == 1 and on.num_async_steps > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert not on.has_unfinished() and not sched.running and not sched.waiting
    assert on.pool.num_used == off.pool.num_used


def test_a_newcomer_whose_prefix_fails_to_load_mid_chain_ends_alone(bundle):
    """A request admitted while a chain runs whose prefix cannot be loaded (not in the store) ends with its error;
    the chained rows carry on exactly."""
    keys, reqs = mixed_workload(bundle.spec, (8,), 3, 10)
    missing = PrefixKey("ghost", "p", 1)
    vocab = bundle.spec.vocab_size
    eng = make_engine(bundle, keys, async_decode="on")
    events: list[TokenEvent] = []
    for r in reqs:
        eng.add_request(r, events.append)
    for _ in range(4):
        eng.step()
    eng.add_request(
        Request("ghost", random_prompt(vocab, 4, 3), SamplingParams(max_tokens=3), missing), events.append
    )
    while eng.has_unfinished():
        eng.step()
    ends = {e.request_id: e for e in events if e.finished}
    assert ends["ghost"].finish_reason == "error" and "ghost" in (ends["ghost"].error or "")
    want = make_engine(bundle, keys, async_decode="off").generate(reqs)
    for r, w in zip(reqs, want, strict=True):
        assert [t for e in events if e.request_id == r.request_id for t in e.token_ids] == w.token_ids
    assert eng.num_async_steps >= 6


def test_aborting_a_newcomer_whose_prompt_chunk_is_in_flight(bundle):
    """A request admitted mid-chain is aborted while its first prompt chunk (which samples nothing) is in flight:
    it gets nothing more, its blocks come back, and the other rows are unaffected."""
    vocab = bundle.spec.vocab_size
    base = [
        Request(f"r{i}", random_prompt(vocab, 5, i), SamplingParams(max_tokens=14, ignore_eos=True))
        for i in range(2)
    ]
    want = make_engine(bundle, {}, async_decode="off").generate(base)
    eng = make_engine(bundle, {}, async_decode="on", max_num_batched_tokens=8)
    events: list[TokenEvent] = []
    for r in base:
        eng.add_request(r, events.append)
    for _ in range(3):
        eng.step()
    eng.add_request(
        Request("big", random_prompt(vocab, 40, 9), SamplingParams(max_tokens=4, ignore_eos=True)),
        events.append,
    )
    eng.step()  # its first chunk joins the chain
    big = eng._seqs["big"]
    assert big.num_cached > 0 and big.num_cached < 40 and eng._inflight is not None
    assert big in eng._inflight.computed
    assert eng.abort("big")
    while eng.has_unfinished():
        eng.step()
    assert [e.finish_reason for e in events if e.request_id == "big"] == ["abort"]
    for r, w in zip(base, want, strict=True):
        assert [t for e in events if e.request_id == r.request_id for t in e.token_ids] == w.token_ids
    assert eng.pool.num_used == 0


def test_a_high_priority_prompt_keeps_its_share_of_a_chained_step(bundle):
    """Chained steps are scheduled in the scheduler's order: a priority -1 prompt arriving beside seven generating
    rows gets the token budget before them, as in synchronous mode (not one token a step after them)."""
    vocab = bundle.spec.vocab_size
    took = {}
    for mode in ("off", "on"):
        eng = make_engine(bundle, {}, async_decode=mode, max_num_batched_tokens=8, max_num_seqs=8)
        first: dict[str, int] = {}
        n = [0]

        def cb(ev: TokenEvent, first=first, n=n) -> None:
            if ev.token_ids:
                first.setdefault(ev.request_id, n[0])

        for i in range(7):
            low = Request(
                f"low{i}", random_prompt(vocab, 1, i), SamplingParams(max_tokens=80, ignore_eos=True)
            )
            eng.add_request(low, cb)
        for _ in range(4):
            eng.step()
            n[0] += 1
        hi = Request(
            "H", random_prompt(vocab, 40, 99), SamplingParams(max_tokens=2, ignore_eos=True), priority=-1
        )
        eng.add_request(hi, cb)
        start = n[0]
        while "H" not in first:
            eng.step()
            n[0] += 1
        took[mode] = first["H"] - start
    assert took["on"] <= took["off"] + 2, took


def test_a_failed_step_forgets_what_its_follow_up_registered(bundle):
    """The device fails the step in flight after the follow-up admitted a prompt: both end with an error, and the
    prompt blocks the follow-up registered (whose KV was never validly written) are not served to a later prompt."""
    vocab = bundle.spec.vocab_size
    eng = make_engine(bundle, {}, async_decode="on")
    eng.add_request(Request("a", random_prompt(vocab, 5, 1), SamplingParams(max_tokens=20, ignore_eos=True)))
    for _ in range(3):
        eng.step()
    big = random_prompt(vocab, 40, 2)
    eng.add_request(Request("b", big, SamplingParams(max_tokens=3, ignore_eos=True)))

    def boom(fl):
        raise RuntimeError("device failed")

    real, eng._read = eng._read, boom
    events = eng.step()  # "b" joins this step's follow-up; then reading the step in flight fails
    eng._read = real
    assert sorted((e.request_id, e.finish_reason) for e in events) == [("a", "error"), ("b", "error")]
    eng.generate([Request("c", big, SamplingParams(max_tokens=1, ignore_eos=True))])
    assert eng.scheduler.cache_hit_tokens == 0


def test_a_follow_up_that_fails_to_launch_leaves_the_prompt_cache_usable(bundle):
    """A follow-up step that raises before it runs (a bug, not the device) is rolled back and its rows carry on
    through the scheduler's next step: the prompt blocks it registered for a newcomer are forgotten, and the
    newcomer registers them again when they are computed, so a later identical prompt hits the cache as if nothing
    had failed (it used to keep dead cache nodes and lose prompt caching for the rest of its run)."""
    vocab = bundle.spec.vocab_size
    big = random_prompt(vocab, 40, 2)
    hits = []
    for fail in (False, True):
        eng = make_engine(bundle, {}, async_decode="on")
        eng.add_request(
            Request("a", random_prompt(vocab, 5, 1), SamplingParams(max_tokens=20, ignore_eos=True))
        )
        for _ in range(3):
            eng.step()
        assert eng._inflight is not None
        eng.add_request(Request("b", big, SamplingParams(max_tokens=3, ignore_eos=True)))
        real = eng.runner.forward

        def boom(inp, real=real, runner=eng.runner):
            runner.forward = real
            raise RuntimeError("launch bug")

        if fail:
            eng.runner.forward = boom  # the follow-up that admits "b" fails to launch
        done = {}
        while eng.has_unfinished():
            for ev in eng.step():
                if ev.finished:
                    done[ev.request_id] = ev
        assert eng.runner.forward == real
        assert {k: e.finish_reason for k, e in done.items()} == {"a": "length", "b": "length"}
        eng.generate([Request("c", big, SamplingParams(max_tokens=1, ignore_eos=True))])
        hits.append(eng.scheduler.cache_hit_tokens)
    assert hits == [32, 32]  # two full blocks of 16 before the prompt's last token


def test_newcomers_of_a_follow_up_that_failed_to_launch_start_again_afresh(bundle):
    """Two identical prompts arrive together (OpenAI n=2) and the follow-up that admits both fails to launch: the
    second took the prompt-cache blocks the first registered in that step, whose KV was never written. Both go
    back to the queue as they were, so the second cannot decode from those blocks even when the first is aborted
    before it computes them (it did: garbage tokens)."""
    vocab = bundle.spec.vocab_size
    big = random_prompt(vocab, 40, 2)  # two full blocks and 8 tokens
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    alone = make_engine(bundle, {}, prompt_cache=False).generate([Request("x", big, sp)])[0].token_ids
    eng = make_engine(bundle, {}, async_decode="on", max_num_batched_tokens=50)
    eng.add_request(Request("a", random_prompt(vocab, 5, 1), SamplingParams(max_tokens=30, ignore_eos=True)))
    for _ in range(3):
        eng.step()
    assert eng._inflight is not None
    eng.add_request(Request("b", big, sp))
    eng.add_request(Request("c", big, sp))
    real = eng.runner.forward

    def boom(inp, real=real, runner=eng.runner):
        runner.forward = real
        raise RuntimeError("launch failure")

    eng.runner.forward = boom
    eng.step()
    counted = (eng.scheduler.cache_query_tokens, eng.scheduler.cache_hit_tokens)
    assert eng.runner.forward == real
    waiting = {s.request_id: s for s in eng.scheduler.waiting}
    assert set(waiting) == {"b", "c"}  # both back in the queue, nothing counted as computed
    assert all(s.num_cached == 0 and not s.own_blocks and s.first_scheduled is None for s in waiting.values())
    eng.abort("b")
    got: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    while eng.has_unfinished():
        for ev in eng.step():
            got.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finished:
                cached[ev.request_id] = ev.cached_tokens
    assert got["c"] == alone and cached["c"] == 0
    # the prompt-cache counters (Prometheus counters) never go down: the undone admissions of b and c stay counted
    # (a: 5 tokens, b and c: 40; c's 32 tokens found in blocks b registered in that step, forgotten since), and
    # c's admission once the step is retried is not counted a second time
    assert counted == (85, 32)
    assert (eng.scheduler.cache_query_tokens, eng.scheduler.cache_hit_tokens) == (85, 32)
