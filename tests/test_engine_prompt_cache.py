"""Prompt cache (automatic prefix caching): full blocks of identical leading tokens are reused, never across cache
salts (tenants) or prefixes, and outputs stay token-identical to the uncached engine and to transformers."""

from __future__ import annotations

import time

import pytest

from server.engine import PrefixKey, Request, SamplingParams
from tests.engine_utils import computed_tokens, hf_greedy, make_engine, pool_bytes, random_kv, random_prompt

NEW = 6
BS = 16


@pytest.fixture
def tenants(tiny_llama_bundle):
    b = tiny_llama_bundle
    return b, {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 8 + 5 * i, seed=i) for i in range(2)}


def _req(rid, prompt, key, salt=None, **kw):
    kw.setdefault("max_tokens", NEW)
    return Request(rid, prompt, SamplingParams(ignore_eos=True, **kw), key, cache_salt=salt)


def test_shared_system_prompt_is_computed_once_and_stays_exact(tenants):
    b, keys = tenants
    k0, k1 = list(keys)
    system = random_prompt(b.spec.vocab_size, 2 * BS + 5, 1)  # two full blocks and a bit
    asks = [random_prompt(b.spec.vocab_size, 3 + i, 10 + i) for i in range(4)]
    first = _req("warm", system + asks[0], k0, "acme")
    later = [
        _req("same-tenant-1", system + asks[1], k0, "acme"),
        _req("same-tenant-2", system + asks[2], k0, "acme"),
        _req("other-prefix", system + asks[1], k1, "acme"),  # same tokens, another prefix: other KV
        _req("other-salt", system + asks[2], k0, "globex"),  # same tokens and prefix, another tenant
        _req("no-prefix", system + asks[3], None, "acme"),
        _req("no-prefix-other-salt", system + asks[3], None, "globex"),  # the base model: tenants apart too
    ]
    eng = make_engine(b, keys)
    computed = computed_tokens(eng)
    outs = {o.request_id: o.token_ids for o in eng.generate([first])}
    assert (
        eng.scheduler.cache_hit_tokens == 0 and eng.pool.num_cached == 2
    )  # its two full prompt blocks... and more
    outs.update({o.request_id: o.token_ids for o in eng.generate(later)})
    # only the two same-tenant, same-prefix requests hit: 2 blocks each
    assert eng.scheduler.cache_hit_tokens == 2 * 2 * BS
    assert sum(computed) == sum(len(r.prompt_token_ids) + NEW - 1 for r in [first, *later]) - 2 * 2 * BS
    plain = make_engine(b, keys, prompt_cache=False)
    for r in [first, *later]:
        ref = hf_greedy(b.hf_model, keys[r.prefix] if r.prefix else None, r.prompt_token_ids, NEW)
        assert outs[r.request_id] == ref, r.request_id
        assert outs[r.request_id] == plain.generate([r])[0].token_ids
    assert plain.scheduler.cache_hit_tokens == 0 and plain.pool.num_cached == 0


def test_prompt_cache_is_not_shared_across_salts_without_a_prefix(tiny_llama_bundle):
    """Base-model requests (no prefix) take cached blocks only under their own cache salt: another salt's request
    of the same prompt hits nothing, the first salt's second request hits its two full blocks."""
    b = tiny_llama_bundle
    eng = make_engine(b, {})
    prompt = random_prompt(b.spec.vocab_size, 40, 1)
    sp = SamplingParams(max_tokens=2, ignore_eos=True)
    eng.generate([Request("a", prompt, sp, cache_salt="A")])
    h = eng.scheduler.cache_hit_tokens
    eng.generate([Request("b", prompt, sp, cache_salt="B")])
    assert eng.scheduler.cache_hit_tokens == h
    eng.generate([Request("a2", prompt, sp, cache_salt="A")])
    assert eng.scheduler.cache_hit_tokens == h + 32


def test_whole_prompt_cached_still_computes_its_last_token(tenants):
    """A repeated prompt of exactly two blocks: the first block is reused, the last token is recomputed (its logits
    are needed), and the answer is the same."""
    b, keys = tenants
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 2 * BS, 3)
    eng = make_engine(b, keys)
    a = eng.generate([_req("a", prompt, k0)])[0].token_ids
    computed = computed_tokens(eng)
    again = eng.generate([_req("b", prompt, k0)])[0].token_ids
    assert again == a == hf_greedy(b.hf_model, keys[k0], prompt, NEW)
    assert eng.scheduler.cache_hit_tokens == BS and computed[0] == BS


def test_generated_tokens_are_cached_for_the_next_turn(tenants):
    """A multi-turn conversation: the next turn's prompt starts with the previous prompt and answer; their full
    blocks (output included) come from the cache."""
    b, keys = tenants
    k0 = next(iter(keys))
    turn1 = random_prompt(b.spec.vocab_size, 20, 4)
    eng = make_engine(b, keys)
    ans = eng.generate([_req("t1", turn1, k0, max_tokens=30)])[0].token_ids
    turn2 = turn1 + ans + random_prompt(b.spec.vocab_size, 5, 5)
    out = eng.generate([_req("t2", turn2, k0)])[0].token_ids
    assert (
        eng.scheduler.cache_hit_tokens == ((20 + 30 - 1) // BS) * BS
    )  # every full block of turn 1 and its answer
    assert out == hf_greedy(b.hf_model, keys[k0], turn2, NEW)


def test_cached_blocks_are_evicted_under_pressure_and_nothing_leaks(tenants):
    """A pool too small to keep every prompt: cached blocks are reused for new data (evictions), outputs stay exact
    and, once idle, the only blocks in use are the resident prefixes'."""
    b, keys = tenants
    sp = b.spec
    eng = make_engine(b, keys, kv_cache_bytes=pool_bytes(b, 16))
    ks = list(keys)
    reqs = [_req(f"r{i}", random_prompt(sp.vocab_size, 40, 100 + i), ks[i % 2]) for i in range(8)]
    outs = [eng.generate([r])[0].token_ids for r in reqs]  # one after another: each leaves its blocks cached
    assert eng.pool.cache_evictions > 0
    again = eng.generate(reqs[-1:])[0].token_ids  # the newest is still cached
    assert eng.scheduler.cache_hit_tokens >= 2 * BS and again == outs[-1]
    for r, o in zip(reqs, outs, strict=True):
        assert o == hf_greedy(b.hf_model, keys[r.prefix], r.prompt_token_ids, NEW)
    assert eng.pool.num_used == sum(len(e.blocks) for e in eng.prefix_cache.entries.values())


def test_a_finished_requests_leading_blocks_outlive_its_tail(tiny_llama_bundle):
    """Freed tail first: an allocation that takes one of its blocks takes the last, and the same prompt later still
    finds its first three blocks (48 tokens) in the cache."""
    b = tiny_llama_bundle
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 32))
    V = b.spec.vocab_size
    x = random_prompt(V, 64, 1)
    eng.generate(
        [Request("x", x, SamplingParams(max_tokens=1))]
    )  # blocks 0-3; 28 never-used blocks before them
    # 15 + 14 blocks at once: every never-used block and one of x's
    eng.generate(
        [
            Request("y1", random_prompt(V, 239, 2), SamplingParams(max_tokens=1)),
            Request("y2", random_prompt(V, 223, 3), SamplingParams(max_tokens=1)),
        ]
    )
    before = eng.scheduler.cache_hit_tokens
    eng.generate([Request("x2", x, SamplingParams(max_tokens=1))])
    assert eng.scheduler.cache_hit_tokens - before == 48


def test_abort_and_preemption_release_cached_blocks(tenants):
    b, keys = tenants
    k0 = next(iter(keys))
    sp = b.spec
    prompt = random_prompt(sp.vocab_size, 3 * BS + 1, 7)
    eng = make_engine(b, keys)
    ref = eng.generate([_req("warm", prompt, k0)])[0].token_ids
    # admitted onto cached blocks, then aborted before it finishes
    eng.add_request(_req("x", prompt, k0, max_tokens=20))
    eng.step()
    assert eng.scheduler.cache_hit_tokens == 3 * BS
    eng.abort("x")
    assert eng.pool.num_used == sum(len(e.blocks) for e in eng.prefix_cache.entries.values())
    # preemption with cached blocks in the block table: a tiny pool and chunked prefill
    small = make_engine(b, keys, kv_cache_bytes=pool_bytes(b, 12), max_num_batched_tokens=8)
    head = prompt[: 2 * BS + 1]
    small.generate([_req("warm", head, k0)])  # caches head's first two blocks
    reqs = [
        _req(f"p{i}", head + random_prompt(sp.vocab_size, 4, 20 + i), k0, max_tokens=30) for i in range(5)
    ]
    q0, h0 = small.scheduler.cache_query_tokens, small.scheduler.cache_hit_tokens
    outs = small.generate(reqs)  # 2 shared + 5 x 3 own blocks + the prefix's > 12: someone is preempted
    sched = small.scheduler
    assert sched.num_preemptions > 0 and sched.cache_hit_tokens > h0
    # counted once per admission (a preempted request's second admission counts again), not on every step a
    # request waits for blocks: before, these grew by the waiting requests' tokens each step (about 10x this)
    admissions = len(reqs) + sched.num_preemptions
    assert sched.cache_query_tokens - q0 <= admissions * (len(reqs[0].prompt_token_ids) + 30)
    assert sched.cache_hit_tokens - h0 <= admissions * 2 * BS
    for r, o in zip(reqs, outs, strict=True):
        assert o.token_ids == hf_greedy(b.hf_model, keys[k0], r.prompt_token_ids, 30)
    assert ref == hf_greedy(b.hf_model, keys[k0], prompt, NEW)
    assert small.pool.num_used == sum(len(e.blocks) for e in small.prefix_cache.entries.values())


def test_prompt_logprobs_requests_do_not_read_the_cache(tenants):
    b, keys = tenants
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 2 * BS + 3, 8)
    eng = make_engine(b, keys)
    eng.generate([_req("warm", prompt, k0)])
    out = eng.generate([_req("lp", prompt, k0, prompt_logprobs=0)])[0]
    assert eng.scheduler.cache_hit_tokens == 0
    assert out.prompt_logprobs is not None and all(lp is not None for lp in out.prompt_logprobs[1:])


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_prompt_cache_on_other_forwards(family, tiny_gpt2_bundle):
    """The native GPT-2 forward and the generic transformers path (Phi-3) read cached blocks exactly too."""
    if family == "gpt2":
        b = tiny_gpt2_bundle
    else:
        from server.model.loader import bundle_from_model
        from tests.fixtures.models import make_tiny_causal_lm, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        b = bundle_from_model(make_tiny_causal_lm("phi3", tok, 0, num_key_value_heads=2), tok, name="phi3")
    keys = {PrefixKey("t", "p", 1): random_kv(b.spec, 11, seed=5)}
    k = next(iter(keys))
    system = random_prompt(b.spec.vocab_size, 2 * BS + 2, 6)
    eng = make_engine(b, keys)
    reqs = [_req(f"r{i}", system + random_prompt(b.spec.vocab_size, 4, 30 + i), k) for i in range(3)]
    outs = [eng.generate([r])[0].token_ids for r in reqs]
    assert eng.scheduler.cache_hit_tokens == 2 * 2 * BS
    for r, o in zip(reqs, outs, strict=True):
        assert o == hf_greedy(b.hf_model, keys[k], r.prompt_token_ids, NEW)


def test_identical_prompts_arriving_together_share_one_prefill(tenants):
    """OpenAI `n` or a burst with one system prompt: requests admitted in the same step take the full blocks the
    first one computes in that very step (each layer writes the batch's KV before any row attends). Greedy rows
    equal transformers; sampled rows equal the uncached engine."""
    b, keys = tenants
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 3 * BS + 7, 8)
    reqs = [_req("greedy-0", prompt, k0), _req("greedy-1", prompt, k0)] + [
        _req(f"seed-{i}", prompt, k0, temperature=1.0, seed=i) for i in range(2)
    ]
    eng = make_engine(b, keys)
    computed = computed_tokens(eng)
    outs = {o.request_id: o.token_ids for o in eng.generate(reqs)}
    assert computed[0] == len(prompt) + 3 * (len(prompt) - 3 * BS)  # one prefill, three tails
    assert eng.scheduler.cache_hit_tokens == 3 * 3 * BS
    ref = hf_greedy(b.hf_model, keys[k0], prompt, NEW)
    assert outs["greedy-0"] == outs["greedy-1"] == ref
    plain = make_engine(b, keys, prompt_cache=False)
    for r in reqs:
        assert outs[r.request_id] == plain.generate([r])[0].token_ids, r.request_id


def test_the_same_block_computed_by_two_requests_keeps_one_entry(tiny_llama_bundle):
    """Two identical greedy requests compute their identical output blocks each: the first registered entry is
    kept, the cache's maps stay inverse of each other, and evicting everything later raises nothing."""
    b = tiny_llama_bundle
    V = b.spec.vocab_size
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 32))
    prompt = random_prompt(V, 20, 1)
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    a, a2 = eng.generate([Request("a", prompt, sp), Request("a2", prompt, sp)])
    assert a.token_ids == a2.token_ids
    pool = eng.pool
    assert {blk: key for key, (blk, _) in pool._cached.items()} == pool._key_of
    # pressure: every block allocated again
    for i in range(3):
        outs = eng.generate(
            [
                Request(
                    f"p{i}{j}",
                    random_prompt(V, 200, 10 * i + j),
                    SamplingParams(max_tokens=3, ignore_eos=True),
                )
                for j in range(2)
            ]
        )
        assert all(o.finish_reason == "length" for o in outs), outs
    assert {blk: key for key, (blk, _) in pool._cached.items()} == pool._key_of


def test_a_newcomer_joins_a_chunked_prefill_on_the_blocks_done_so_far(tenants):
    """The first request's prefill spans steps (token budget 40): the second, admitted in its last chunk's step,
    takes the blocks of the earlier chunk and the block completed in that same step."""
    b, keys = tenants
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 3 * BS + 12, 9)
    eng = make_engine(b, keys, max_num_batched_tokens=40)
    computed = computed_tokens(eng)
    outs = eng.generate([_req("a", prompt, k0), _req("b", prompt, k0)])
    assert computed[:2] == [40, (len(prompt) - 40) + 12]
    assert eng.scheduler.cache_hit_tokens == 3 * BS
    ref = hf_greedy(b.hf_model, keys[k0], prompt, NEW)
    assert [o.token_ids for o in outs] == [ref, ref]


def test_a_failed_step_leaves_no_cache_entries_behind(tenants):
    """Blocks are registered when scheduled; if the step's forward fails, those entries are dropped (their KV was
    never written), so the next request with that prompt computes it instead of reading garbage."""
    b, keys = tenants
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 3 * BS + 2, 10)
    eng = make_engine(b, keys)
    forward = eng.runner.forward

    def broken(inp):
        raise RuntimeError("device lost")

    eng.runner.forward = broken
    eng.add_request(_req("lost", prompt, k0))
    events = []
    for _ in range(500):  # the first steps may only wait for the prefix's fetch
        if events := eng.step():
            break
        time.sleep(0.01)
    assert [e.finish_reason for e in events] == ["error"] and eng.pool.num_cached == 0
    eng.runner.forward = forward
    out = eng.generate([_req("again", prompt, k0)])[0].token_ids
    assert eng.scheduler.cache_hit_tokens == 0
    assert out == hf_greedy(b.hf_model, keys[k0], prompt, NEW)


@pytest.mark.parametrize("how", ["its name", "every name"])
def test_an_invalidated_prefix_takes_nothing_computed_against_its_old_tensors(tenants, how):
    """The same version number names other tensors (a store emptied and written again; the engine hears of it as
    an invalidation): new requests run on the new tensors, prompt blocks included (cached prompt blocks attended
    to the old ones)."""
    b, keys = tenants
    k0 = next(iter(keys))
    new_kv = random_kv(b.spec, keys[k0].shape[3], seed=99, scale=8.0)
    prompt = random_prompt(b.spec.vocab_size, 3 * BS + 2, 5)
    fresh = make_engine(b, {k0: new_kv}, prompt_cache=True)
    want = fresh.generate([_req("fresh", prompt, k0)])[0].token_ids
    eng = make_engine(b, keys, prompt_cache=True)
    old = eng.generate([_req("old", prompt, k0)])[0].token_ids
    assert old != want  # (the test means something)
    provider, pc = eng.prefix_cache.provider, eng.prefix_cache
    provider.prefixes[k0] = new_kv
    if how == "its name":
        pc.invalidate(k0.tenant_id, k0.name)
    else:
        pc.invalidate_all()
    seen = computed_tokens(eng)
    assert eng.generate([_req("new", prompt, k0)])[0].token_ids == want
    assert seen[0] == len(prompt)  # no prompt block taken from the cache


def test_blocks_a_running_request_fills_after_an_invalidation_are_not_taken_by_newcomers(tenants):
    """A request still running on the old tensors when its prefix is invalidated goes on filling blocks (its short
    prompt's first block fills with generated tokens); a next-turn request on the new tensors (the same version
    number) must not take them."""
    b, keys = tenants
    k0 = next(iter(keys))
    new_kv = random_kv(b.spec, keys[k0].shape[3], seed=99, scale=8.0)
    first = random_prompt(b.spec.vocab_size, 5, 7)
    eng = make_engine(b, keys, prompt_cache=True)
    eng.add_request(_req("turn1", first, k0, max_tokens=3 * BS))
    out: list[int] = []
    for _ in range(3):
        for ev in eng.step():
            out.extend(ev.token_ids)
    eng.prefix_cache.provider.prefixes[k0] = new_kv
    eng.prefix_cache.invalidate_all()
    while eng.has_unfinished():
        for ev in eng.step():
            out.extend(ev.token_ids)
    turn2 = first + out + random_prompt(b.spec.vocab_size, 4, 8)
    want = make_engine(b, {k0: new_kv}, prompt_cache=True).generate([_req("fresh", turn2, k0)])[0].token_ids
    assert eng.generate([_req("turn2", turn2, k0)])[0].token_ids == want


@pytest.mark.parametrize("tensors", ["replaced", "the same", "deleted"])
def test_a_preempted_request_never_resumes_on_other_tensors(tenants, tensors):
    """Preempted after producing tokens, its prefix invalidated meanwhile (a routine change event; other tensors under
    the same key: a store emptied and written again; its version deleted): it keeps the prefix it ran on while it
    waits and finishes exactly as alone (it used to finish with tokens of both tensors, then with an error, or a 404
    where the version was gone); the stale prefix goes once it ends."""
    b, keys = tenants
    k0 = next(iter(keys))
    prompt = random_prompt(b.spec.vocab_size, 2 * BS + 3, 11)
    want = make_engine(b, keys).generate([_req("alone", prompt, k0, max_tokens=12)])[0].token_ids
    eng = make_engine(b, keys, prompt_cache=True)
    eng.add_request(_req("r", prompt, k0, max_tokens=12))
    got: list[int] = []
    while len(got) < 3:
        for ev in eng.step():
            got.extend(ev.token_ids)
    (seq,) = eng.scheduler.running
    eng.scheduler._preempt(seq)  # as when the pool runs dry
    assert seq.prefix is not None and seq.prefix.active == 1  # held while it waits
    if tensors == "replaced":
        eng.prefix_cache.provider.prefixes[k0] = random_kv(b.spec, keys[k0].shape[3], seed=99, scale=8.0)
    elif tensors == "deleted":
        del eng.prefix_cache.provider.prefixes[k0]
    eng.prefix_cache.invalidate(k0.tenant_id, k0.name)
    last = None
    while eng.has_unfinished():
        for ev in eng.step():
            got.extend(ev.token_ids)
            last = ev
    assert last is not None and last.finished
    assert last.finish_reason == "length" and got == want
    assert not [e for e in eng.prefix_cache.entries.values() if e.stale or e.active]


def _two_rows_holding_prefixes(b):
    """An engine whose two rows, each with a prefix of 4 blocks, have produced tokens and were preempted (keeping
    their prefixes), with 3 blocks free: either needs 5 of its own, which the other's prefix keeps from it. Returns
    the engine, the prefixes, the tokens each gives alone, and the tokens got so far."""
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 4 * BS, seed=i) for i in range(2)}
    reqs = [
        _req(f"r{i}", random_prompt(b.spec.vocab_size, 4 * BS + 2, 20 + i), k, max_tokens=8)
        for i, k in enumerate(keys)
    ]
    want = {o.request_id: o.token_ids for o in make_engine(b, keys).generate(reqs)}
    eng = make_engine(b, keys, kv_cache_bytes=pool_bytes(b, 40), prompt_cache=False)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    while not all(got.values()):
        for ev in eng.step():
            got[ev.request_id].extend(ev.token_ids)
    for seq in list(eng.scheduler.running):
        eng.scheduler._preempt(seq)
    assert all(s.prefix is not None for s in eng.scheduler.waiting)
    eng.pool.allocate(eng.pool.num_free - 3)
    return eng, keys, want, got


def test_rows_waiting_on_prefixes_they_hold_let_go_when_nothing_else_can_run(tiny_llama_bundle):
    """Preempted rows keep their prefixes while they wait. Where those hold the blocks that the first of them needs
    and nothing runs that would free any, the others let go of theirs (and look them up again when their turn
    comes): the engine goes on, and every row finishes as alone."""
    eng, _, want, got = _two_rows_holding_prefixes(tiny_llama_bundle)
    _run_to_the_end(eng, got, 100)
    assert got == want


def _run_to_the_end(eng, got: dict[str, list[int]], steps: int) -> None:
    """Step `eng` until nothing is left, collecting tokens into `got`; fails if that takes over `steps` steps (a
    livelock: steps that never finish anything). Steps taken while a prefix is being fetched (on loader threads,
    slow on a loaded machine) do not count."""
    deadline, budget = time.monotonic() + 60, steps
    while steps > 0 and eng.has_unfinished() and time.monotonic() < deadline:
        if eng.prefix_cache.loading():
            time.sleep(0.001)
        else:
            steps -= 1
        for ev in eng.step():
            assert ev.finish_reason != "error", ev.error
            got[ev.request_id].extend(ev.token_ids)
    assert not eng.has_unfinished(), f"unfinished after {budget} steps"


def test_the_only_running_row_short_of_blocks_takes_them_from_prefixes_that_waiting_rows_hold(
    tiny_llama_bundle,
):
    """The one running row, short of blocks that a waiting row's held prefix takes, preempted itself (losing its
    KV) and was admitted again by small chunks, forever: the held prefixes give way instead (found by a fuzzer)."""
    b = tiny_llama_bundle
    kb = PrefixKey("tb", "p", 1)
    keys = {kb: random_kv(b.spec, 44, seed=1)}  # 11 blocks of 4
    a = _req("A", random_prompt(b.spec.vocab_size, 20, 1), None, max_tokens=12)  # 8 blocks in all
    late = _req("B", random_prompt(b.spec.vocab_size, 4, 2), kb, max_tokens=4)
    want = {o.request_id: o.token_ids for o in make_engine(b, keys).generate([a, late])}
    eng = make_engine(
        b, keys, block_size=4, kv_cache_bytes=pool_bytes(b, 18, 4), prefix_cache_bytes=pool_bytes(b, 18, 4),
        max_num_batched_tokens=8, prompt_cache=False, long_prefill_tokens=0,
    )  # fmt: skip
    got: dict[str, list[int]] = {"A": [], "B": []}
    eng.add_request(a)
    while not got["A"]:
        for ev in eng.step():
            got[ev.request_id].extend(ev.token_ids)
    eng.add_request(late)
    _run_to_the_end(eng, got, 300)
    assert got == want


def test_a_row_that_let_go_of_its_prefix_never_resumes_on_other_tensors(tiny_llama_bundle):
    """A waiting row that let go of its prefix (`_release_waiting_prefixes`) looks it up again: if the tensors
    under its key changed meanwhile (a store emptied and written again), it ends with a retryable PrefixChanged
    error instead of going on with tokens of both; the row that kept its prefix finishes exactly as alone."""
    b = tiny_llama_bundle
    eng, keys, want, got = _two_rows_holding_prefixes(b)  # one of them must let go
    ends: dict[str, object] = {}
    for k in keys:  # other tensors under the same keys
        eng.prefix_cache.provider.prefixes[k] = random_kv(b.spec, 4 * BS, seed=50, scale=8.0)
        eng.prefix_cache.invalidate(k.tenant_id, k.name)
    deadline = time.monotonic() + 60
    while eng.has_unfinished() and time.monotonic() < deadline:
        for ev in eng.step():
            got[ev.request_id].extend(ev.token_ids)
            if ev.finished:
                ends[ev.request_id] = (ev.finish_reason, ev.error_type)
    assert sorted(ends.values()) == [("error", "PrefixChanged"), ("length", None)], ends
    for rid, end in ends.items():
        assert got[rid] == want[rid] if end == ("length", None) else got[rid] == want[rid][: len(got[rid])]
