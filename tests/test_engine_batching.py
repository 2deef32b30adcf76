"""Continuous batching mechanics: shared prefix KV, prefix cache, aborts, admission, the async driver."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from server.engine import (
    AsyncEngine,
    DictPrefixProvider,
    EngineConfig,
    LLMEngine,
    PrefixKey,
    QueueFull,
    Request,
    RequestTooLarge,
    SamplingParams,
    TokenEvent,
)
from server.engine.kv_cache import KVPool
from tests.engine_utils import make_engine, pool_bytes, random_kv, random_prompt


def record_preemptions(engine: LLMEngine) -> list[str]:
    """The ids of the requests `engine` preempts from now on, in order."""
    victims: list[str] = []
    preempt = engine.scheduler._preempt

    def record(seq):
        victims.append(seq.request_id)
        preempt(seq)

    engine.scheduler._preempt = record
    return victims


def test_one_tenant_prefix_held_once_for_32_running_requests(tiny_llama_bundle):
    b = tiny_llama_bundle
    sp = b.spec
    key = PrefixKey("acme", "default", 1)
    p = 40
    engine = make_engine(b, {key: random_kv(sp, p, 0)}, max_num_seqs=64, kv_cache_bytes=32 * 2**20)
    reqs = [
        Request(
            f"r{i}", random_prompt(sp.vocab_size, 10, i), SamplingParams(max_tokens=20, ignore_eos=True), key
        )
        for i in range(32)
    ]
    for r in reqs:
        engine.add_request(r)
    while len(engine.scheduler.running) < 32 or any(
        s.num_cached < s.num_tokens - 1 for s in engine.scheduler.running
    ):
        engine.step()
    running = engine.scheduler.running
    assert len(running) == 32
    entry = engine.prefix_cache.entries[key]
    assert all(s.prefix is entry for s in running)
    assert entry.active == 32
    block_bytes = engine.pool.block_bytes
    prefix_blocks = engine.pool.blocks_for(p)
    own_blocks = sum(len(s.own_blocks) for s in running)
    used_bytes = engine.pool.num_used * block_bytes
    # allocated = one copy of the prefix + each request's own tokens; a per-request copy would add 31 more prefixes
    assert used_bytes == (prefix_blocks + own_blocks) * block_bytes
    assert used_bytes < (32 * prefix_blocks + own_blocks) * block_bytes / 3
    for blk in entry.blocks:
        assert engine.pool.refcount(blk) == 1  # held by the cache, referenced by 32 rows via the entry
    while engine.has_unfinished():
        engine.step()
    assert entry.active == 0
    assert engine.pool.num_used == prefix_blocks  # requests freed, the idle prefix stays cached


def _two_prefix_cache(
    b, n: int, aging_accesses: int | None = None, policy: str = "lfu"
) -> tuple[LLMEngine, list[PrefixKey]]:
    """An engine whose prefix cache has room for two 16-token prefixes (one block each), and `n` prefix keys."""
    sp = b.spec
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(sp, 16, i) for i in range(n)}
    budget = 2 * KVPool.bytes_per_block(sp.num_layers, sp.num_kv_heads, sp.head_dim, 16, b.dtype)
    eng = LLMEngine(
        b, DictPrefixProvider(keys), EngineConfig(kv_cache_bytes=8 * 2**20, prefix_cache_bytes=budget)
    )
    if aging_accesses is not None:
        eng.prefix_cache.aging_accesses = aging_accesses
    eng.prefix_cache.policy = policy
    return eng, list(keys)


def _run_in_order(eng: LLMEngine, keys: list[PrefixKey], order: list[int]) -> None:
    for n, i in enumerate(order):
        eng.generate([Request(f"q{n}", [1, 2, 3], SamplingParams(max_tokens=2), keys[i])])


def _req(rid, prompt, key, **kw):
    kw.setdefault("max_tokens", 6)
    return Request(rid, prompt, SamplingParams(ignore_eos=True, **kw), key)


def _generate_one(eng: LLMEngine, key: PrefixKey, rid: str, n: int = 2):
    """The output of one request of `n` tokens (ignore_eos) on prompt [1, 2, 3] with prefix `key`."""
    return eng.generate([_req(rid, [1, 2, 3], key, max_tokens=n)])[0]


def test_prefix_cache_by_bytes_evicts_least_frequently_used(tiny_llama_bundle):
    eng, kl = _two_prefix_cache(tiny_llama_bundle, 4)
    _run_in_order(eng, kl, [0, 1, 0, 2, 3, 0])
    st = eng.prefix_cache.stats
    # 0 miss, 1 miss, 0 hit, 2 miss (evicts 1: used once), 3 miss (evicts 2, not the more popular but older 0),
    # 0 hit (plain LRU would have evicted 0 for 3 and missed here)
    assert (st.hits, st.misses) == (2, 4)
    assert st.evictions == 2
    assert eng.prefix_cache.resident_bytes <= eng.prefix_cache.budget_bytes
    assert set(eng.prefix_cache.entries) == {kl[3], kl[0]}


def test_prefix_cache_is_back_within_its_budget_once_its_prefixes_are_idle(tiny_llama_bundle):
    """Four tenants at once with room for two: the budget stretches while their prefixes are in use, and comes
    back once they are idle (they stayed resident, over the budget, until the next install)."""
    eng, kl = _two_prefix_cache(tiny_llama_bundle, 4)
    pc = eng.prefix_cache
    outs = eng.generate(
        [Request(f"q{i}", [1, 2, 3], SamplingParams(max_tokens=3), k) for i, k in enumerate(kl)]
    )
    assert all(o.finish_reason in ("length", "stop") for o in outs)
    assert pc.resident_bytes <= pc.budget_bytes and len(pc.entries) == 2
    # the count /metrics reads (kept by the engine thread) is what is resident
    assert pc.resident == (len(pc.entries), sum(e.nbytes for e in pc.entries.values()))
    assert pc.stats.evictions == 2
    # what stays is served from the cache
    hits = pc.stats.hits
    kept = next(iter(pc.entries))
    eng.generate([Request("again", [1, 2, 3], SamplingParams(max_tokens=2), kept)])
    assert pc.stats.hits == hits + 1


def test_prefix_cache_frequencies_age(tiny_llama_bundle):
    """Counts are halved every `aging_accesses` requests: a tenant popular long ago loses to today's ones."""
    eng, kl = _two_prefix_cache(tiny_llama_bundle, 4, aging_accesses=4)
    pc = eng.prefix_cache
    _run_in_order(eng, kl, [0, 0, 0])  # 0: 3
    assert pc.frequency(kl[0]) == 3
    _run_in_order(eng, kl, [1])  # 4th request: halved, 0: 1, 1: 0 (dropped)
    assert (pc.frequency(kl[0]), pc.frequency(kl[1])) == (1, 0)
    _run_in_order(eng, kl, [2, 2, 1])  # 2 evicts 1 (count 0); then 1 evicts 0 (count 1 < 2's 2)
    assert (pc.frequency(kl[0]), pc.frequency(kl[1]), pc.frequency(kl[2])) == (1, 1, 2)
    assert set(pc.entries) == {kl[1], kl[2]}  # without aging 0 (3 requests) would have stayed and 2 gone


def test_lru_policy_evicts_the_least_recently_used_not_the_oldest_installed(tiny_llama_bundle):
    eng, kl = _two_prefix_cache(tiny_llama_bundle, 3, policy="lru")
    for i, k in enumerate([0, 1, 0, 2]):
        _generate_one(eng, kl[k], f"q{i}")
    assert set(eng.prefix_cache.entries) == {kl[0], kl[2]}


def test_installing_a_prefix_trims_idle_ones_at_once(tiny_llama_bundle):
    """Two idle prefixes fill the budget: installing a third for a new request evicts one of them right away, not
    at the next install."""
    eng, kl = _two_prefix_cache(tiny_llama_bundle, 3)
    pc = eng.prefix_cache
    _generate_one(eng, kl[0], "a")
    _generate_one(eng, kl[1], "b")
    eng.add_request(Request("c", [1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), kl[2]))
    while not eng.scheduler.running:
        eng.step()
    assert pc.resident_bytes <= pc.budget_bytes and len(pc.entries) == 2
    # the count /metrics reads (kept by the engine thread) is what is resident
    assert pc.resident == (len(pc.entries), sum(e.nbytes for e in pc.entries.values()))
    while eng.has_unfinished():
        eng.step()


class CountingProvider(DictPrefixProvider):
    def __init__(self, prefixes) -> None:
        super().__init__(prefixes)
        self.fetches = 0

    def fetch(self, key):
        self.fetches += 1
        return super().fetch(key)


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_prefixes_fetched_for_waiting_requests_are_not_evicted_before_use(tiny_llama_bundle, policy):
    """Many tenants waiting at once with room for two prefixes: every prefix is fetched once per time its
    requests need it, never evicted between its arrival and its request taking it (that would fetch it again and
    again: a newcomer has the lowest frequency)."""
    b = tiny_llama_bundle
    sp = b.spec
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(sp, 16, i) for i in range(8)}
    prov = CountingProvider(keys)
    budget = 2 * KVPool.bytes_per_block(sp.num_layers, sp.num_kv_heads, sp.head_dim, 16, b.dtype)
    cfg = EngineConfig(kv_cache_bytes=8 * 2**20, prefix_cache_bytes=budget, max_num_seqs=2)
    eng = LLMEngine(b, prov, cfg)
    eng.prefix_cache.policy = policy
    reqs = [
        Request(f"q{i}", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), k)
        for i, k in enumerate(keys)
    ]
    outs = eng.generate(reqs)
    assert all(o.error is None and len(o.token_ids) == 3 for o in outs)
    st = eng.prefix_cache.stats
    assert st.misses == 8 and prov.fetches == 8 == st.fetches, (st, prov.fetches)


def _full_pool(b, n_prefixes):
    """An engine with a 32-block pool (and as large a prefix budget) holding `n_prefixes` idle 2-block prefixes."""
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 20, i) for i in range(n_prefixes)}  # 2 blocks each
    eng = make_engine(b, keys, kv_cache_bytes=pool_bytes(b, 32), prefix_cache_bytes=pool_bytes(b, 32))
    for k in keys:
        eng.generate([Request(f"warm-{k.tenant_id}", [1], SamplingParams(max_tokens=1), k)])
    return eng, keys


def test_room_for_a_request_evicts_only_the_idle_prefixes_it_needs(tiny_llama_bundle):
    b = tiny_llama_bundle
    eng, _keys = _full_pool(b, 15)  # 30 of 32 blocks
    out = eng.generate(
        [Request("r", random_prompt(b.spec.vocab_size, 40, 1), SamplingParams(max_tokens=3, ignore_eos=True))]
    )[0]
    assert out.finish_reason == "length"
    assert eng.prefix_cache.stats.evictions == 1 and len(eng.prefix_cache.entries) == 14


def test_installing_a_prefix_evicts_idle_ones_when_running_requests_hold_the_rest(tiny_llama_bundle):
    """Idle prefixes and a long running request hold the pool: a new prefix is installed by evicting idle ones, so
    its short request finishes before the long one."""
    b = tiny_llama_bundle
    eng, _keys = _full_pool(b, 10)  # 20 of 32 blocks, idle
    V = b.spec.vocab_size
    eng.add_request(
        Request("long", random_prompt(V, 150, 1), SamplingParams(max_tokens=40, ignore_eos=True))
    )  # 10+ blocks
    eng.step()
    new = PrefixKey("new", "p", 1)
    eng.prefix_cache.provider.prefixes[new] = random_kv(b.spec, 40, 5)  # 3 blocks
    eng.add_request(Request("short", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), new))
    done = []
    while eng.has_unfinished():
        done += [ev.request_id for ev in eng.step() if ev.finished]
    assert done == ["short", "long"]


def test_idle_prefixes_are_evicted_to_admit_a_request(tiny_llama_bundle):
    """Idle prefixes hold 28 blocks of a 32-block pool; a request needing 10 blocks evicts them instead of waiting forever."""
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 20, i) for i in range(14)}  # 2 blocks each
    eng = make_engine(b, keys, kv_cache_bytes=pool_bytes(b, 32), prefix_cache_bytes=pool_bytes(b, 28))
    for k in keys:
        eng.generate([Request(f"warm-{k.tenant_id}", [1], SamplingParams(max_tokens=1), k)])
    assert len(eng.prefix_cache.entries) == 14 and eng.pool.num_free - eng.pool.num_cached <= 4
    eng.add_request(
        Request(
            "big", random_prompt(b.spec.vocab_size, 150, 1), SamplingParams(max_tokens=3, ignore_eos=True)
        )
    )
    assert _step_until_done(eng, 100), "the request never ran"
    assert eng.prefix_cache.stats.evictions >= 1


class SlowProvider(DictPrefixProvider):
    def __init__(self, prefixes, slow: PrefixKey, delay: float) -> None:
        super().__init__(prefixes)
        self.slow, self.delay = slow, delay

    def fetch(self, key):
        if key == self.slow:
            time.sleep(self.delay)
        return super().fetch(key)


def test_a_prefix_left_by_an_aborted_request_does_not_hold_fetches_back(tiny_llama_bundle):
    """A prefix fetched for a request aborted before it ran is not held for it: the abort drops its claim, so
    the prefix arrives unclaimed and other tenants' prefixes are fetched at once (it used to count against
    `max_pending` for `fresh_s`, 10 s: with max_num_seqs aborted loads, every tenant's next request stalled)."""
    b = tiny_llama_bundle
    sp = b.spec
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(sp, 16, i) for i in range(4)}
    kl = list(keys)
    budget = 2 * KVPool.bytes_per_block(sp.num_layers, sp.num_kv_heads, sp.head_dim, 16, b.dtype)
    prov = SlowProvider(keys, kl[1], delay=0.3)
    eng = LLMEngine(
        b, prov, EngineConfig(kv_cache_bytes=8 * 2**20, prefix_cache_bytes=budget, max_num_seqs=2)
    )
    pc = eng.prefix_cache
    pc.max_pending = 1
    assert pc.fresh_s >= 10
    eng.add_request(Request("busy", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True), kl[0]))
    eng.add_request(Request("gone", [1, 2, 3], SamplingParams(max_tokens=2), kl[1]))

    def step_until(cond) -> None:
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline
            eng.step()

    step_until(lambda: kl[1] in pc._loading)
    assert pc._wanted == {kl[1]: 1}
    assert eng.abort("gone")
    assert pc._wanted == {}
    step_until(lambda: kl[1] in pc.entries)  # arrived with nobody to take it: not held for anyone
    assert pc._fresh() == 0
    eng.add_request(Request("next", [1, 2, 3], SamplingParams(max_tokens=2), kl[2]))
    eng.step()
    assert kl[2] in pc._loading or kl[2] in pc.entries  # fetched at once
    t0 = time.monotonic()
    done: set[str] = set()
    while "next" not in done:
        assert time.monotonic() - t0 < 2, "a dead request's prefix holds fetching back"
        done |= {ev.request_id for ev in eng.step() if ev.finished}


def test_prefix_miss_does_not_stall_other_tenants(tiny_llama_bundle):
    b = tiny_llama_bundle
    sp = b.spec
    fast, slow = PrefixKey("fast", "p", 1), PrefixKey("slow", "p", 1)
    prov = SlowProvider({fast: random_kv(sp, 8, 0), slow: random_kv(sp, 8, 1)}, slow, delay=1.0)
    eng = LLMEngine(b, prov, EngineConfig(kv_cache_bytes=8 * 2**20))
    eng.add_request(Request("slow", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), slow))
    eng.add_request(Request("fast", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), fast))
    finished: dict[str, float] = {}
    t0 = time.monotonic()
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.finished:
                finished[ev.request_id] = time.monotonic() - t0
        time.sleep(0.001)
    assert finished["fast"] < 0.9 < finished["slow"]


def test_unknown_prefix_finishes_with_error_and_others_continue(tiny_llama_bundle):
    b = tiny_llama_bundle
    good = PrefixKey("a", "p", 1)
    eng = make_engine(b, {good: random_kv(b.spec, 8, 0)})
    outs = eng.generate(
        [
            Request("bad", [1, 2], SamplingParams(max_tokens=3), PrefixKey("a", "missing", 1)),
            Request("good", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True), good),
        ]
    )
    assert outs[0].finish_reason == "error" and "missing" in (outs[0].error or "")
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 3
    assert eng.pool.num_used == 1  # only the good prefix's block


class GatedProvider(DictPrefixProvider):
    """A provider whose fetch, once `gate` is set to an Event, returns what the store held when it started only
    after the event is set."""

    gate = None

    def fetch(self, key):
        kv = super().fetch(key)  # what the store held when the fetch started
        if self.gate is not None:
            self.gate.wait(10)
        return kv


def test_a_fetch_under_way_when_its_prefix_is_invalidated_is_not_installed(tiny_llama_bundle):
    """A prefix invalidated while its fetch is in flight: the stale tensors that fetch returns are not installed;
    the request runs on the new ones."""
    b = tiny_llama_bundle
    k0 = PrefixKey("t0", "p", 1)
    new_kv = random_kv(b.spec, 8, seed=99, scale=8.0)
    prompt = [1, 2, 3]
    want = (
        make_engine(b, {k0: new_kv})
        .generate([Request("f", prompt, SamplingParams(max_tokens=4, ignore_eos=True), k0)])[0]
        .token_ids
    )
    prov = GatedProvider({k0: random_kv(b.spec, 8, 0)})
    prov.gate = threading.Event()
    eng = LLMEngine(b, prov, EngineConfig(kv_cache_bytes=8 * 2**20))
    eng.add_request(Request("r", prompt, SamplingParams(max_tokens=4, ignore_eos=True), k0))
    eng.step()
    assert k0 in eng.prefix_cache._loading
    prov.prefixes[k0] = new_kv
    eng.prefix_cache.invalidate(k0.tenant_id, k0.name)
    prov.gate.set()
    got = []
    for _ in range(2000):
        for ev in eng.step():
            got += ev.token_ids
        if not eng.has_unfinished():
            break
    assert got == want


def test_a_prefix_created_after_a_failed_lookup_is_usable_at_once(tiny_llama_bundle):
    """A lookup of a prefix that does not exist yet is not remembered past the store's change event for it."""
    b = tiny_llama_bundle
    k0 = PrefixKey("t0", "p", 1)
    eng = make_engine(b, {})
    assert _generate_one(eng, k0, "before").finish_reason == "error"
    eng.prefix_cache.provider.prefixes[k0] = random_kv(b.spec, 8, 0)
    eng.prefix_cache.invalidate(k0.tenant_id, k0.name)  # the store's change event
    assert _generate_one(eng, k0, "after").finish_reason == "length"


@pytest.mark.parametrize("how", ["name", "all"])
def test_a_newcomer_after_an_invalidation_runs_on_the_new_tensors_while_the_old_are_in_use(
    tiny_llama_bundle, how
):
    """A request still running on a prefix's old tensors when it is invalidated (by name or all at once): a
    newcomer runs on the new tensors, and the old ones' blocks go back to the pool once their last user ends."""
    b = tiny_llama_bundle
    k0 = PrefixKey("t0", "p", 1)
    old_kv = random_kv(b.spec, 8, seed=0)
    new_kv = random_kv(b.spec, 8, seed=99, scale=8.0)
    prompt = random_prompt(b.spec.vocab_size, 7, 5)
    want = make_engine(b, {k0: new_kv}).generate([_req("fresh", prompt, k0)])[0].token_ids
    eng = make_engine(b, {k0: old_kv})
    eng.add_request(_req("long", random_prompt(b.spec.vocab_size, 5, 7), k0, max_tokens=60))
    for _ in range(3):
        eng.step()
    assert eng.scheduler.running  # holds the old tensors
    eng.prefix_cache.provider.prefixes[k0] = new_kv
    if how == "name":
        eng.prefix_cache.invalidate(k0.tenant_id, k0.name)
    else:
        eng.prefix_cache.invalidate_all()
    eng.add_request(_req("new", prompt, k0))
    got = []
    while eng.has_unfinished():
        for ev in eng.step():
            if ev.request_id == "new":
                got.extend(ev.token_ids)
    assert got == want
    # the old tensors' blocks went back to the pool once their last user finished: only the new prefix is held
    (entry,) = eng.prefix_cache.entries.values()
    assert eng.pool.num_used == len(entry.blocks)


def test_an_idle_prefix_invalidated_and_loaded_again_leaks_no_blocks(tiny_llama_bundle):
    """An idle cached prefix invalidated and replaced: the next request runs on the new tensors and only the new
    prefix's blocks stay in use."""
    b = tiny_llama_bundle
    k0 = PrefixKey("t0", "p", 1)
    eng = make_engine(b, {k0: random_kv(b.spec, 8, 0)})
    _generate_one(eng, k0, "old")
    new_kv = random_kv(b.spec, 8, seed=99, scale=8.0)
    want = (
        make_engine(b, {k0: new_kv})
        .generate([Request("f", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), k0)])[0]
        .token_ids
    )
    eng.prefix_cache.provider.prefixes[k0] = new_kv
    eng.prefix_cache.invalidate(k0.tenant_id, k0.name)
    assert _generate_one(eng, k0, "new").token_ids == want
    (entry,) = eng.prefix_cache.entries.values()
    assert eng.pool.num_used == len(entry.blocks)


def test_abort_frees_kv(tiny_llama_bundle):
    b = tiny_llama_bundle
    key = PrefixKey("a", "p", 1)
    eng = make_engine(b, {key: random_kv(b.spec, 8, 0)})
    eng.add_request(Request("x", random_prompt(b.spec.vocab_size, 30, 0), SamplingParams(max_tokens=50), key))
    eng.step()
    eng.step()
    assert eng.pool.num_used > 1
    assert eng.abort("x")
    assert not eng.has_unfinished()
    assert eng.pool.num_used == 1
    assert not eng.abort("x")


def test_a_request_aborted_by_another_rows_callback_gets_nothing_more(tiny_llama_bundle):
    """A callback that aborts another request in the middle of a step (a client reacting to one stream by
    cancelling another): that request's next row in the step is skipped; it ends once, as aborted."""
    b = tiny_llama_bundle
    eng = make_engine(b, {})
    seen: dict[str, list] = {"a": [], "b": []}

    def on_a(ev) -> None:
        seen["a"].append(ev)
        if len(seen["a"]) == 3:
            eng.abort("b")

    vocab = b.spec.vocab_size
    eng.add_request(
        Request("a", random_prompt(vocab, 5, 1), SamplingParams(max_tokens=8, ignore_eos=True)), on_a
    )
    eng.add_request(
        Request("b", random_prompt(vocab, 5, 2), SamplingParams(max_tokens=3, ignore_eos=True)),
        seen["b"].append,
    )
    returned = []
    while eng.has_unfinished():
        returned += [e for e in eng.step() if e.request_id == "b"]
    assert [e.finish_reason for e in seen["b"] if e.finished] == ["abort"]
    assert not any(e.finished for e in returned) and sum(len(e.token_ids) for e in returned) == 2
    assert eng.pool.num_used == 0


def test_admission_limits(tiny_llama_bundle):
    b = tiny_llama_bundle
    eng = LLMEngine(
        b,
        DictPrefixProvider(),
        EngineConfig(kv_cache_bytes=8 * 2**20, max_waiting=2, max_model_len=64, max_num_seqs=1),
    )
    with pytest.raises(RequestTooLarge):
        eng.add_request(Request("long", [1] * 60, SamplingParams(max_tokens=10)))
    with pytest.raises(ValueError):
        eng.add_request(Request("empty", [], SamplingParams()))
    with pytest.raises(ValueError):
        eng.add_request(Request("oov", [b.spec.vocab_size], SamplingParams()))
    # the queue limit counts what waits beyond the batch's free rows: one row, then two queued
    for name in "abc":
        eng.add_request(Request(name, [1], SamplingParams(max_tokens=4)))
    with pytest.raises(QueueFull):
        eng.add_request(Request("d", [1], SamplingParams(max_tokens=4)))
    assert eng.num_waiting == 3 and eng.capacity == 3


def test_the_default_pool_holds_one_request_at_the_full_context(tiny_llama_bundle, monkeypatch, caplog):
    """With no KV budget configured the pool is DEFAULT_KV_CACHE_BYTES, or more where one request at the served
    context would not fit in its share (half the pool less a block): the default serves the whole context without a
    warning (SmolLM2 in fp32 at 8,192 positions needs ~721 MiB, more than 512); a configured budget stays as given."""
    import server.engine.engine as engine_mod

    b = tiny_llama_bundle
    block_bytes = KVPool.bytes_per_block(b.spec.num_layers, b.spec.num_kv_heads, b.spec.head_dim, 16, b.dtype)
    monkeypatch.setattr(engine_mod, "DEFAULT_KV_CACHE_BYTES", 8 * block_bytes)  # 128 tokens: too few for 256
    with caplog.at_level("INFO", logger=engine_mod.log.name):
        eng = LLMEngine(b, DictPrefixProvider(), EngineConfig(max_model_len=256))
    assert eng.max_request_tokens >= eng.max_model_len == 256
    assert eng.pool.num_blocks == 2 * (
        -(-257 // 16) + 1
    )  # (a prompt filling the context may score one token)
    assert "holds at most" not in caplog.text and "KV cache: 36 blocks of 16 tokens" in caplog.text
    eng.add_request(
        Request("full", [1] * 200, SamplingParams(max_tokens=56))
    )  # the whole context is admitted
    eng.add_request(Request("scored", [1] * 256, SamplingParams(max_tokens=1)))  # echo's scoring token too
    # a short context keeps the default budget, and an explicit budget is taken as it is (with its warning)
    assert LLMEngine(b, DictPrefixProvider(), EngineConfig(max_model_len=32)).pool.num_blocks == 8
    with caplog.at_level("WARNING", logger=engine_mod.log.name):
        small = LLMEngine(
            b, DictPrefixProvider(), EngineConfig(kv_cache_bytes=8 * block_bytes, max_model_len=256)
        )
    assert small.pool.num_blocks == 8 and small.max_request_tokens < 256 and "holds at most" in caplog.text
    # a pool that holds no request at all is refused (a server said it was ready and refused every request)
    assert (
        LLMEngine(b, DictPrefixProvider(), EngineConfig(kv_cache_bytes=4 * block_bytes)).max_request_tokens
        == 16
    )
    for blocks in (1, 3):
        with pytest.raises(ValueError, match="holds no request: at least 4 blocks"):
            LLMEngine(b, DictPrefixProvider(), EngineConfig(kv_cache_bytes=blocks * block_bytes))


def test_a_pool_larger_than_the_gpus_free_memory_is_refused_saying_what_to_set(monkeypatch):
    """Before torch's out-of-memory error at the allocation: the default pool grows with the context, so a long
    context on a small GPU is told to lower max_model_len (or set kv_cache_mb); a configured one, kv_cache_mb."""
    from server.engine.engine import check_pool_fits

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * 2**20, 80 * 2**30))
    cuda = torch.device("cuda")
    check_pool_fits(999 * 2**20, cuda, default=True)  # fits
    with pytest.raises(ValueError, match=r"needs 8,192 MiB \(the default.*only 1,000 MiB .*max_model_len"):
        check_pool_fits(8 * 2**30, cuda, default=True)
    with pytest.raises(ValueError, match=r"needs 2,000 MiB but .* set kv_cache_mb lower"):
        check_pool_fits(2000 * 2**20, cuda, default=False)
    check_pool_fits(2**40, torch.device("cpu"), default=True)  # (not checked off the GPU)


def test_refused_requests_do_not_hold_queue_places(tiny_llama_bundle):
    """A request that fails validation (413/400) leaves no trace in the queue count: after max_waiting of them a
    valid request is still accepted (else every request gets 503 from then on)."""
    b = tiny_llama_bundle
    eng = AsyncEngine(make_engine(b, {}, max_waiting=2, max_num_seqs=1, max_model_len=64))
    for i in range(3):
        with pytest.raises((RequestTooLarge, ValueError)):
            eng.submit(Request(f"bad{i}", [1] * 70, SamplingParams(max_tokens=4)), lambda ev: None)
    assert eng.num_waiting == 0
    for i in range(3):  # one row + two queued
        eng.submit(Request(f"ok{i}", [1, 2], SamplingParams(max_tokens=2)), lambda ev: None)


def test_continuations_pass_a_full_queue_and_fail_after_fail_all(tiny_llama_bundle):
    """A continuation (a beam search's later step: work accepted already) is never refused for a full queue, and
    once the engine failed everything at shutdown, a continuation submitted after is failed the same way (it slipped
    between steps) while a new request is still taken (the API refuses those itself while draining)."""
    import asyncio

    b = tiny_llama_bundle
    eng = AsyncEngine(make_engine(b, {}, max_waiting=1, max_num_seqs=1, max_model_len=64))
    for i in range(2):
        eng.submit(Request(f"r{i}", [1, 2], SamplingParams(max_tokens=2)), lambda ev: None)
    with pytest.raises(QueueFull):
        eng.submit(Request("new", [1, 2], SamplingParams(max_tokens=2)), lambda ev: None)
    eng.submit(Request("more", [1, 2], SamplingParams(max_tokens=2), continuation=True), lambda ev: None)
    eng.start()
    try:

        async def run(req: Request) -> TokenEvent:
            async for ev in eng.generate(req):
                if ev.finished:
                    return ev
            raise AssertionError("no last event")

        async def scenario() -> tuple[TokenEvent, TokenEvent]:
            eng.fail_all("going away", "ShuttingDown")
            cont = await run(Request("c", [3, 4], SamplingParams(max_tokens=2), continuation=True))
            fresh = await run(Request("f", [3, 4], SamplingParams(max_tokens=2, ignore_eos=True)))
            return cont, fresh

        cont, fresh = asyncio.run(scenario())
    finally:
        eng.shutdown()
    assert cont.finish_reason == "error" and cont.error_type == "ShuttingDown" and cont.error == "going away"
    assert fresh.finish_reason == "length"


def test_a_request_that_fills_the_context_exactly_is_accepted(tiny_llama_bundle):
    """vLLM's rule: prompt + max_tokens <= max_model_len."""
    b = tiny_llama_bundle
    eng = make_engine(b, {}, max_model_len=64)
    out = eng.generate([Request("full", [1] * 60, SamplingParams(max_tokens=4, ignore_eos=True))])[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(RequestTooLarge):
        eng.add_request(Request("over", [1] * 60, SamplingParams(max_tokens=5)))


def test_kv_budget_admission_boundary(tiny_llama_bundle):
    """A request's own blocks + one may take half of the pool, not more (16 blocks: 7 own blocks fit, 8 do not)."""
    b = tiny_llama_bundle
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 16))
    eng.add_request(Request("fits", [1] * 100, SamplingParams(max_tokens=12)))  # 112 tokens: 7 blocks
    with pytest.raises(RequestTooLarge):
        eng.add_request(Request("over", [1] * 100, SamplingParams(max_tokens=13)))  # 113: 8 blocks


def test_prefix_plus_prompt_beyond_the_context_fails_that_request_alone(tiny_llama_bundle):
    """The prefix's length is known once it is fetched: a prompt that fits alone but not after its prefix ends with
    an error before it runs (its positions would be past the model's), and the batch around it is unaffected; a
    prompt that fills the context exactly gets one token and stops for length."""
    b = tiny_llama_bundle
    key = PrefixKey("t", "p", 1)
    kvs = {key: random_kv(b.spec, 20, 0)}
    eng = make_engine(b, kvs, max_model_len=64)
    ok = Request(
        "ok", random_prompt(b.spec.vocab_size, 10, 1), SamplingParams(max_tokens=4, ignore_eos=True), key
    )
    full = Request("full", random_prompt(b.spec.vocab_size, 44, 2), SamplingParams(max_tokens=1), key)
    over = Request("over", random_prompt(b.spec.vocab_size, 45, 3), SamplingParams(max_tokens=1), key)
    outs = {o.request_id: o for o in eng.generate([ok, over, full])}
    assert outs["over"].finish_reason == "error" and outs["over"].error_type == "RequestTooLarge"
    assert "prefix (20) + prompt (45) tokens exceed the context limit of 64" in (outs["over"].error or "")
    assert outs["full"].finish_reason == "length" and len(outs["full"].token_ids) == 1
    assert outs["ok"].token_ids == make_engine(b, kvs).generate([ok])[0].token_ids
    assert not eng.has_unfinished() and eng.pool.num_used == 2  # only the prefix's blocks


@pytest.mark.parametrize("fair", [True, False])
def test_tenants_take_turns_when_the_batch_is_full(tiny_llama_bundle, fair):
    """Room for two running requests; tenant A queues six, then B and C one each. Fair admission starts B's and
    C's in the first free slots (the tenant with the fewest running goes first, each tenant in arrival order);
    first-come-first-served holds them behind all of A's. Outputs are the same either way."""
    b = tiny_llama_bundle
    keys = {t: PrefixKey(t, "p", 1) for t in "ABC"}
    kvs = {k: random_kv(b.spec, 4 + i, i) for i, k in enumerate(keys.values())}
    reqs = [
        Request(
            rid,
            random_prompt(b.spec.vocab_size, 6, j),
            SamplingParams(max_tokens=3, ignore_eos=True),
            keys[rid[0]],
            cache_salt=rid[0],
        )
        for j, rid in enumerate(["A1", "A2", "A3", "A4", "A5", "A6", "B1", "C1"])
    ]
    eng = make_engine(b, kvs, max_num_seqs=2, fair_scheduling=fair)
    for k in kvs:  # prefixes resident: admission order is the scheduler's alone
        eng.generate([Request(f"warm-{k.tenant_id}", [1], SamplingParams(max_tokens=1), k)])
    started: list[str] = []
    prepare = eng.runner.prepare

    def spy(rows):
        for it in eng.scheduler.running:
            if it.request_id not in started:
                started.append(it.request_id)
        return prepare(rows)

    eng.runner.prepare = spy
    outs = {o.request_id: o.token_ids for o in eng.generate(reqs)}
    if fair:
        # A1, then B1 (B has none running, A one); once both finish, A2 (ties go to the oldest waiting), then C1
        # (none running) before A3
        assert started == ["A1", "B1", "A2", "C1", "A3", "A4", "A5", "A6"], started
    else:
        assert started == ["A1", "A2", "A3", "A4", "A5", "A6", "B1", "C1"], started
    alone = make_engine(b, kvs)
    for r in reqs:
        assert outs[r.request_id] == alone.generate([r])[0].token_ids, r.request_id


def test_a_tenant_that_filled_the_batch_gives_a_row_to_one_with_nothing_running(tiny_llama_bundle):
    """Tenant A's long requests fill every row; B's request arrives: it starts within a step or two (the newest of
    A's rows gives it its place and is recomputed later), not once A's requests end. Every output stays exact.
    A tenant at its share, or with one row, keeps it."""
    b = tiny_llama_bundle
    keys = {t: PrefixKey(t, "p", 1) for t in "AB"}
    kvs = {k: random_kv(b.spec, 4, i) for i, k in enumerate(keys.values())}

    def req(rid: str, new: int) -> Request:
        sp = SamplingParams(max_tokens=new, ignore_eos=True)
        return Request(
            rid, random_prompt(b.spec.vocab_size, 6, ord(rid[-1])), sp, keys[rid[0]], cache_salt=rid[0]
        )

    eng = make_engine(b, kvs, max_num_seqs=2)
    for k in kvs:  # prefixes resident
        eng.generate([Request(f"warm-{k.tenant_id}", [1], SamplingParams(max_tokens=1), k)])
    a1, a2, b1 = req("A1", 40), req("A2", 40), req("B1", 3)
    got: dict[str, list[int]] = {"A1": [], "A2": [], "B1": []}
    eng.add_request(a1)
    eng.add_request(a2)
    for _ in range(3):
        for ev in eng.step():
            got[ev.request_id].extend(ev.token_ids)
    eng.add_request(b1)
    steps = 0
    while not got["B1"] or len(got["B1"]) < 3:
        steps += 1
        for ev in eng.step():
            got[ev.request_id].extend(ev.token_ids)
    assert steps <= 4 and len(got["A1"]) < 20, (steps, len(got["A1"]))  # B did not wait for A's 40 tokens
    assert eng.scheduler.num_fair_preemptions == 1
    while eng.has_unfinished():
        for ev in eng.step():
            got[ev.request_id].extend(ev.token_ids)
    alone = make_engine(b, kvs)
    for r in (a1, a2, b1):
        assert got[r.request_id] == alone.generate([r])[0].token_ids, r.request_id
    # one row each: nobody gives theirs up for a third tenant
    eng2 = make_engine(b, {**kvs, PrefixKey("C", "p", 1): random_kv(b.spec, 4, 9)}, max_num_seqs=2)
    eng2.generate(
        [
            req("A3", 8),
            req("B2", 8),
            Request("C1", [1, 2], SamplingParams(max_tokens=2), PrefixKey("C", "p", 1)),
        ]
    )
    assert eng2.scheduler.num_fair_preemptions == 0


@pytest.mark.parametrize("fair", [True, False])
def test_lower_priority_starts_first_and_is_preempted_last(tiny_llama_bundle, fair):
    """Priorities order admission before tenants' turns or arrival (vLLM's priority policy); within one priority
    the policy of before. When the pool runs dry the highest value is preempted (the newest among equals), so a
    priority-0 request keeps its blocks while a priority-5 one is recomputed. Outputs stay exact."""
    b = tiny_llama_bundle
    keys = {t: PrefixKey(t, "p", 1) for t in "AB"}
    kvs = {k: random_kv(b.spec, 20, i) for i, k in enumerate(keys.values())}  # 2 blocks of 16 each

    def req(rid: str, prio: int, n: int = 6, new: int = 3) -> Request:
        return Request(
            rid,
            random_prompt(b.spec.vocab_size, n, len(rid) + ord(rid[-1])),
            SamplingParams(max_tokens=new, ignore_eos=True),
            keys[rid[0]],
            cache_salt=rid[0],
            priority=prio,
        )

    reqs = [req("A1", 0), req("A2", 5), req("A3", 0), req("B1", 5), req("B2", -1), req("A4", 1)]
    eng = make_engine(b, kvs, max_num_seqs=1, fair_scheduling=fair)
    for k in kvs:
        eng.generate([Request(f"warm-{k.tenant_id}", [1], SamplingParams(max_tokens=1), k)])
    started: list[str] = []
    prepare = eng.runner.prepare

    def spy(rows):
        started.extend(s.request_id for s in eng.scheduler.running if s.request_id not in started)
        return prepare(rows)

    eng.runner.prepare = spy
    outs = {o.request_id: o.token_ids for o in eng.generate(reqs)}
    assert (
        started == ["B2", "A1", "A3", "A4", "A2", "B1"] if not fair else ["B2", "A1", "A3", "A4", "B1", "A2"]
    )
    alone = make_engine(b, kvs)
    for r in reqs:
        assert outs[r.request_id] == alone.generate([r])[0].token_ids, r.request_id

    # preemption: two requests of 4 blocks each beside the two prefixes' 4 on a pool of 10. The low-priority one
    # started first and is older, yet it yields when the high-priority one joins (the newest would be taken before)
    small = make_engine(b, kvs, max_num_batched_tokens=8, kv_cache_bytes=pool_bytes(b, 10))
    low, high = req("A5", 5, n=20, new=30), req("B3", 0, n=20, new=30)
    victims = record_preemptions(small)
    got: dict[str, list[int]] = {"A5": [], "B3": []}
    small.add_request(low)
    for _ in range(6):
        for ev in small.step():
            got[ev.request_id].extend(ev.token_ids)
    assert got["A5"], "the low-priority request should be decoding before the other arrives"
    small.add_request(high)
    while small.has_unfinished():
        for ev in small.step():
            got[ev.request_id].extend(ev.token_ids)
    assert victims and set(victims) == {"A5"}, victims
    for r in (low, high):
        assert got[r.request_id] == alone.generate([r])[0].token_ids


def _spy_started(eng: LLMEngine) -> list[str]:
    """The ids of the requests `eng` runs from now on, in the order they first take a row."""
    started = []
    prepare = eng.runner.prepare

    def spy(rows):
        started.extend(s.request_id for s in eng.scheduler.running if s.request_id not in started)
        return prepare(rows)

    eng.runner.prepare = spy
    return started


def _step_until_done(eng: LLMEngine, steps: int = 400) -> bool:
    """Step `eng` until it has nothing unfinished (True) or `steps` steps have run (False)."""
    for _ in range(steps):
        eng.step()
        if not eng.has_unfinished():
            return True
    return False


def test_fair_admission_counts_requests_already_running(tiny_llama_bundle):
    """A has one request running when A2 then B1 arrive; one slot is free: B (none running) goes first."""
    b = tiny_llama_bundle
    eng = make_engine(b, {}, max_num_seqs=2)
    started = _spy_started(eng)
    V = b.spec.vocab_size
    eng.add_request(
        Request("A1", random_prompt(V, 6, 1), SamplingParams(max_tokens=40, ignore_eos=True), cache_salt="A")
    )
    for _ in range(3):
        eng.step()
    eng.add_request(
        Request("A2", random_prompt(V, 6, 2), SamplingParams(max_tokens=2, ignore_eos=True), cache_salt="A")
    )
    eng.add_request(
        Request("B1", random_prompt(V, 6, 3), SamplingParams(max_tokens=2, ignore_eos=True), cache_salt="B")
    )
    assert _step_until_done(eng)
    assert started[:3] == ["A1", "B1", "A2"], started


def test_a_request_that_does_not_fit_is_not_overtaken(tiny_llama_bundle):
    """First come first served within a tenant's turn: a waiting request short of blocks holds the ones behind it."""
    b = tiny_llama_bundle
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 32), fair_scheduling=False)
    started = _spy_started(eng)
    V = b.spec.vocab_size
    eng.add_request(
        Request("R1", random_prompt(V, 200, 1), SamplingParams(max_tokens=8, ignore_eos=True))
    )  # 13 blocks
    eng.add_request(
        Request("R2", random_prompt(V, 200, 4), SamplingParams(max_tokens=8, ignore_eos=True))
    )  # 13 blocks
    eng.step()
    eng.add_request(
        Request("BIG", random_prompt(V, 128, 2), SamplingParams(max_tokens=2, ignore_eos=True))
    )  # 8+ blocks
    eng.add_request(Request("SMALL", random_prompt(V, 5, 3), SamplingParams(max_tokens=2, ignore_eos=True)))
    assert _step_until_done(eng)
    assert started == ["R1", "R2", "BIG", "SMALL"], started


@pytest.mark.parametrize("fair", [True, False])
def test_a_preempted_request_resumes_before_newcomers(tiny_llama_bundle, fair):
    """A3 is preempted while A1 and A2 keep running; B1 (another tenant, none running) arrives meanwhile. FCFS: the
    blocks freed later go to A3 first (vLLM puts preempted requests back at the front of the queue). Fair: A holds
    every block, more than its share (half), so A3 waits A's turn and B1 starts first (it took A's newest row's
    blocks); A3 still resumes and ends."""
    b = tiny_llama_bundle
    V = b.spec.vocab_size
    eng = make_engine(b, {}, kv_cache_bytes=pool_bytes(b, 16), fair_scheduling=fair)
    admitted: list[str] = []
    admit = eng.scheduler._admit

    def spy(*a, **kw):
        items = admit(*a, **kw)
        admitted.extend(it.seq.request_id for it in items)
        return items

    eng.scheduler._admit = spy
    victims = record_preemptions(eng)
    for i, name in enumerate(("A1", "A2", "A3")):
        eng.add_request(
            Request(
                name, random_prompt(V, 60, i), SamplingParams(max_tokens=44, ignore_eos=True), cache_salt="A"
            )
        )
    for _ in range(200):
        eng.step()
        if victims:
            break
    assert victims == ["A3"]
    mark = len(admitted)
    eng.add_request(
        Request("B1", random_prompt(V, 5, 9), SamplingParams(max_tokens=2, ignore_eos=True), cache_salt="B")
    )
    for _ in range(400):
        eng.step()
        if not eng.has_unfinished():
            break
    assert not eng.has_unfinished()
    after = [r for r in admitted[mark:] if r in ("A3", "B1")]
    assert after[:2] == (["B1", "A3"] if fair else ["A3", "B1"]), (admitted, victims)


def test_async_engine_concurrent_and_cancel(tiny_llama_bundle):
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 8 + i, i) for i in range(3)}
    reqs = [
        Request(
            f"r{i}",
            random_prompt(b.spec.vocab_size, 6 + i, i),
            SamplingParams(max_tokens=8, ignore_eos=True),
            k,
        )
        for i, k in enumerate(keys)
    ]
    alone = [make_engine(b, keys).generate([r])[0].token_ids for r in reqs]
    eng = AsyncEngine(make_engine(b, keys))
    eng.start()

    async def collect(r):
        toks = []
        async for ev in eng.generate(r):
            toks.extend(ev.token_ids)
        return toks

    async def cancel_one():
        r = Request("long", [1, 2, 3], SamplingParams(max_tokens=10_000 // 20, ignore_eos=True))
        agen = eng.generate(r)
        async for _ev in agen:
            break
        await agen.aclose()  # the client went away

    async def main():
        return await asyncio.gather(*(collect(r) for r in reqs), cancel_one())

    try:
        got = asyncio.run(main())
        assert got[:3] == alone
        deadline = time.monotonic() + 2
        while eng.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not eng.engine.has_unfinished()  # the cancelled request was aborted, not run to the end
        assert eng.engine.pool.num_used == sum(
            len(e.blocks) for e in eng.engine.prefix_cache.entries.values()
        )
    finally:
        eng.shutdown()
    assert not any(t.name == "engine" and t.is_alive() for t in threading.enumerate())


async def _gather(coros):
    return await asyncio.gather(*coros)


def test_store_changes_are_applied_while_the_engine_is_idle(tiny_llama_bundle):
    """Store change events were queued for the next engine step, and an idle engine takes none: on a replica with
    no generation traffic they piled up (200,000 changes: 34 MiB), and the first request after them waited for
    all of them to be checked against every resident prefix (28 s with 500 resident). Changes of one name are
    one entry, and an idle engine applies them when woken: a changed prefix's blocks are freed at once."""
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 4 + i, i) for i in range(3)}
    pc = make_engine(b, keys).prefix_cache
    for _ in range(1000):
        pc.invalidate("t0", "p")
    assert len(pc._invalidated) == 1
    pc.invalidate_all()
    pc.invalidate("t1", "p")
    assert not pc._invalidated and pc._invalidated_all  # (everything covers every name)
    eng = AsyncEngine(make_engine(b, keys))
    eng.start()
    try:

        async def run(r):
            return [t async for ev in eng.generate(r) for t in ev.token_ids]

        reqs = [
            Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), k)
            for i, k in enumerate(keys)
        ]
        asyncio.run(_gather(run(r) for r in reqs))
        cache = eng.engine.prefix_cache
        deadline = time.monotonic() + 2
        while eng.engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(cache.entries) == 3 and eng.engine.pool.num_used > 0
        for i in range(5000):
            cache.invalidate(f"other{i}", "p")
        cache.invalidate("t0", "p")

        def applied() -> bool:
            try:  # (the engine thread may change the table while it is read)
                return (
                    not cache._invalidated
                    and {k.tenant_id for k in list(cache.entries)} == {"t1", "t2"}
                    and eng.engine.pool.num_used == sum(len(e.blocks) for e in list(cache.entries.values()))
                )
            except RuntimeError:
                return False

        deadline = time.monotonic() + 5
        while not applied() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert applied(), (cache._invalidated, list(cache.entries), eng.engine.pool.num_used)
    finally:
        eng.shutdown()


def test_async_engine_wakes_the_event_loop_once_per_step_not_per_token(tiny_llama_bundle):
    """A step's token events reach the asyncio loop in one thread-safe callback (each costs a lock and a self-pipe
    write on the engine thread), in order, and every request still gets all of its tokens."""
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 4 + i, i) for i in range(4)}
    reqs = [
        Request(
            f"r{i}", random_prompt(b.spec.vocab_size, 5, i), SamplingParams(max_tokens=6, ignore_eos=True), k
        )
        for i, k in enumerate(keys)
    ]
    alone = [make_engine(b, keys).generate([r])[0].token_ids for r in reqs]
    eng = AsyncEngine(make_engine(b, keys))
    steps = 0
    step = eng.engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return step()

    eng.engine.step = counted_step  # type: ignore[method-assign]

    async def main():
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*a, **kw):
            nonlocal calls
            calls += 1
            return real(*a, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        eng.start()

        async def collect(r):
            return [t async for ev in eng.generate(r) for t in ev.token_ids]

        got = await asyncio.gather(*(collect(r) for r in reqs))
        return got, calls

    try:
        got, calls = asyncio.run(main())
    finally:
        eng.shutdown()
    assert got == alone
    assert calls <= steps < sum(len(t) for t in got)


def test_a_stream_interval_sends_tokens_in_groups_with_the_first_at_once(tiny_llama_bundle):
    """vLLM's --stream-interval N: a request's first event comes at once, then its tokens at least N at a time
    (logprobs and text with them), its end at once; what a consumer gets adds up to the same tokens, text and
    logprobs as one event per step; an aborted request leaves nothing held."""
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 4 + i, i) for i in range(3)}
    reqs = [
        Request(
            f"r{i}",
            random_prompt(b.spec.vocab_size, 5, i),
            SamplingParams(max_tokens=13 + i, ignore_eos=True, logprobs=1),
            k,
        )
        for i, k in enumerate(keys)
    ]

    def run(
        interval: int, abort_one: bool = False
    ) -> tuple[list[list[list[int]]], list[str], list[int], Any]:
        eng = AsyncEngine(make_engine(b, keys), stream_interval=interval)
        eng.start()

        async def collect(r):
            return [
                (ev.token_ids, ev.text, len(ev.logprobs or []), ev.finished) async for ev in eng.generate(r)
            ]

        async def cancel_one():
            agen = eng.generate(Request("gone", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True)))
            async for _ev in agen:
                break
            await agen.aclose()

        async def main():
            return await asyncio.gather(*(collect(r) for r in reqs), *([cancel_one()] if abort_one else []))

        try:
            got = asyncio.run(main())[: len(reqs)]
            deadline = time.monotonic() + 2
            while eng.engine.has_unfinished() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            eng.shutdown()
        tokens = [[ids for ids, _, _, _ in evs] for evs in got]
        texts = ["".join(t for _, t, _, _ in evs) for evs in got]
        assert all(sum(n for _, _, n, _ in evs) == sum(len(i) for i, _, _, _ in evs) for evs in got)
        assert all(evs[-1][3] and not any(f for *_, f in evs[:-1]) for evs in got)
        return tokens, texts, [len(evs) for evs in got], eng

    each, texts, _, _ = run(1)
    grouped, texts4, events, eng = run(4, abort_one=True)
    joined = [[t for ids in groups for t in ids] for groups in grouped]
    assert joined == [[t for ids in steps for t in ids] for steps in each] and texts4 == texts
    for groups in grouped:
        assert len(groups[0]) == 1  # the first token at once (time to first token)
        assert all(len(g) >= 4 for g in groups[1:-1]), groups  # then at least 4 at a time, the end whenever
    assert events < [len(t) for t in each]
    assert eng._held == {}


def test_dict_provider_digest_tells_a_replacement_tensor_from_a_freed_one_at_the_same_address(monkeypatch):
    """The in-memory provider's digest names the tensor object: a replacement that CPython puts where the freed
    old tensor was (the same `id`) still gets another digest (prompt-cache blocks are keyed by it). The address
    reuse is made certain here (every object "at one address"): waiting for CPython to reuse one failed on a fresh
    machine after 1,000 tries."""
    import server.engine.prefix_cache as prefix_cache_module

    monkeypatch.setattr(prefix_cache_module, "id", lambda obj: 4096, raising=False)
    k = PrefixKey("t", "p", 1)
    prov = DictPrefixProvider({k: torch.randn(3)})
    first = prov.fetch_digested(k)[1]
    assert prov.fetch_digested(k)[1] == first  # the same tensor: the same digest
    del prov.prefixes[k]  # freed; its replacement is at "the same address"
    prov.prefixes[k] = torch.randn(3)
    second = prov.fetch_digested(k)[1]
    assert second != first and prov.fetch_digested(k)[1] == second


def test_an_admitted_request_is_not_refused_for_a_queue_that_grew_since(tiny_llama_bundle):
    """`AsyncEngine.submit` admits against the queue limit; by the time the engine thread adds the request a
    preemption may have put running requests back in the queue: the admitted request is still taken (it was a 500)."""
    from server.engine.types import QueueFull

    b = tiny_llama_bundle
    eng = LLMEngine(
        b, DictPrefixProvider(), EngineConfig(kv_cache_bytes=8 * 2**20, max_waiting=2, max_num_seqs=1)
    )
    for i in range(3):
        eng.add_request(Request(f"w{i}", [1, 2, 3], SamplingParams(max_tokens=2)))
    with pytest.raises(QueueFull):
        eng.add_request(Request("new", [1, 2, 3], SamplingParams(max_tokens=2)))
    events = []
    eng.add_request(
        Request("admitted", [1, 2, 3], SamplingParams(max_tokens=2)), events.append, admitted=True
    )
    while eng.has_unfinished():
        eng.step()
    assert events[-1].finished and events[-1].finish_reason in ("length", "stop")


def test_kv_pool_prefix_roundtrip(tiny_llama_bundle):
    b = tiny_llama_bundle
    key = PrefixKey("a", "p", 1)
    kv = random_kv(b.spec, 21, 3)
    eng = make_engine(b, {key: kv}, block_size=8)
    eng.generate([Request("x", [1, 2], SamplingParams(max_tokens=1), key)])
    entry = eng.prefix_cache.entries[key]
    assert len(entry.blocks) == 3
    assert torch.equal(eng.pool.read(entry.blocks, 21), kv)


def test_the_pool_takes_the_memory_it_was_given(tiny_llama_bundle):
    """kv_cache_bytes bounds the pool's real tensor (plus its one scratch block): block_bytes is what a block holds."""
    b = tiny_llama_bundle
    budget = 4 * 2**20
    eng = make_engine(b, {}, kv_cache_bytes=budget)
    pool = eng.pool
    real = pool.data.numel() * pool.data.element_size()
    assert real == (pool.num_blocks + 1) * pool.block_bytes
    assert budget - pool.block_bytes < pool.num_blocks * pool.block_bytes <= budget


def test_one_overflowing_request_fails_alone(tiny_llama_bundle):
    """A prefix whose values overflow the attention (finite, so it passes validation) gives non-finite logits: that
    request alone ends with an error; greedy and sampled neighbours in the same batch finish as they do alone."""
    b = tiny_llama_bundle
    good, bad = PrefixKey("good", "p", 1), PrefixKey("evil", "p", 1)
    keys = {good: random_kv(b.spec, 6, 1), bad: random_kv(b.spec, 6, 2) * 1e37}
    assert torch.isfinite(keys[bad]).all()  # a store would accept it
    prompt = random_prompt(b.spec.vocab_size, 7, 3)
    reqs = [
        Request("g", prompt, SamplingParams(max_tokens=6, ignore_eos=True), good),
        Request("s", prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True), good),
        Request("bad", prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True), bad),
        Request("nop", prompt, SamplingParams(max_tokens=6, ignore_eos=True)),
    ]
    outs = {o.request_id: o for o in make_engine(b, keys).generate(reqs)}
    assert outs["bad"].finish_reason == "error" and "non-finite" in (outs["bad"].error or "")
    for r in reqs:
        if r.request_id != "bad":
            alone = make_engine(b, keys).generate([r])[0]
            assert outs[r.request_id].finish_reason == "length"
            assert outs[r.request_id].token_ids == alone.token_ids, r.request_id


def test_a_priority_victim_scheduled_earlier_in_the_step_does_not_break_the_batch(tiny_llama_bundle):
    """A low-priority row admitted first is scheduled ahead of the rows that run short of blocks later in the same
    step; preempting it must not leave its (now blockless) row in the batch — that failed the whole step, every
    request of it ending in an error. Rows are now scheduled in the order they keep their places, so a victim is
    never one already scheduled; outputs stay exact."""
    b = tiny_llama_bundle
    key = PrefixKey("t", "p", 1)
    kvs = {key: random_kv(b.spec, 32, 0)}  # 2 blocks
    eng = make_engine(b, kvs, kv_cache_bytes=pool_bytes(b, 8), max_num_batched_tokens=64)
    sp = SamplingParams(max_tokens=14, ignore_eos=True)
    a = Request("A", random_prompt(b.spec.vocab_size, 33, 1), sp, priority=5, cache_salt="a")
    rest = [
        Request(r, random_prompt(b.spec.vocab_size, 16, i), sp, key, cache_salt=r)
        for i, r in ((2, "B"), (3, "C"))
    ]
    victims = record_preemptions(eng)
    got: dict[str, list[int]] = {}
    done: dict[str, str | None] = {}
    eng.add_request(a)
    while "A" not in got:
        for ev in eng.step():
            got.setdefault(ev.request_id, []).extend(ev.token_ids)
    for r in rest:
        eng.add_request(r)
    while eng.has_unfinished():
        for ev in eng.step():
            got.setdefault(ev.request_id, []).extend(ev.token_ids)
            if ev.finished:
                done[ev.request_id] = ev.error
    assert "A" in victims  # the case at hand: the low-priority row yielded
    assert done == {"A": None, "B": None, "C": None}
    alone = make_engine(b, kvs)
    for r in (a, *rest):
        assert got[r.request_id] == alone.generate([r])[0].token_ids, r.request_id
    assert (
        eng.pool.num_free + sum(len(e.blocks) for e in eng.prefix_cache.entries.values())
        == eng.pool.num_blocks
    )


@pytest.mark.parametrize(("prefix_len", "prompt_len", "new"), [(180, 20, 80), (300, 5, 4)])
def test_a_prefix_and_request_that_can_never_fit_fail_instead_of_waiting_forever(
    tiny_llama_bundle, prefix_len, prompt_len, new
):
    """Prefix blocks + the request's own blocks beyond the whole KV pool (a small pool, a long prefix), or a prefix
    alone as large as the pool: the request fails with RequestTooLarge (HTTP 413) at once. It used to preempt
    itself forever, or wait forever for room to install the prefix, with no event at all."""
    b = tiny_llama_bundle
    key = PrefixKey("t", "p", 1)
    eng = make_engine(b, {key: random_kv(b.spec, prefix_len, 0)}, kv_cache_bytes=pool_bytes(b, 16))
    req = Request("r", random_prompt(b.spec.vocab_size, prompt_len, 1), SamplingParams(max_tokens=new, ignore_eos=True), key)  # fmt: skip
    eng.add_request(req)  # its own blocks alone fit: accepted
    events = []
    for _ in range(200):
        events += [ev for ev in eng.step() if ev.finished]
        if not eng.has_unfinished():
            break
    assert not eng.has_unfinished()
    (ev,) = events
    assert ev.finish_reason == "error" and ev.error_type == "RequestTooLarge"
    assert "KV cache blocks; the cache holds 16" in ev.error
    ok = Request("ok", random_prompt(b.spec.vocab_size, 5, 2), SamplingParams(max_tokens=3))
    assert eng.generate([ok])[0].finish_reason in ("length", "stop")  # and the engine carries on


def test_never_fit_at_one_block_past_the_pool(tiny_llama_bundle):
    """The boundary of the test above: prefix + own blocks one block more than the pool fails with RequestTooLarge."""
    b = tiny_llama_bundle
    key = PrefixKey("t", "p", 1)
    eng = make_engine(
        b, {key: random_kv(b.spec, 288, 0)}, kv_cache_bytes=pool_bytes(b, 32)
    )  # prefix: 18 blocks
    # own KV: 200 prompt + 40 outputs - 1 = 239 tokens = 15 blocks; + 18 = 33 > 32
    eng.add_request(
        Request(
            "r", random_prompt(b.spec.vocab_size, 200, 1), SamplingParams(max_tokens=40, ignore_eos=True), key
        )
    )
    events = []
    for _ in range(100):
        events += [ev for ev in eng.step() if ev.finished]
        if not eng.has_unfinished():
            break
    assert [(e.finish_reason, e.error_type) for e in events] == [("error", "RequestTooLarge")]


def test_a_stop_token_id_is_not_text_streamed_or_not(tiny_llama_bundle):
    b = tiny_llama_bundle
    eng = make_engine(b, {})
    prompt = random_prompt(b.spec.vocab_size, 10, 5)
    base = eng.generate([Request("x", prompt, SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    stop = base.token_ids[3]
    texts = set()
    for stream in (False, True):
        for strings in ((), ("\x00never",)):
            sp = SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=(stop,), stop=strings)
            out = eng.generate([Request(f"s{stream}{len(strings)}", prompt, sp, stream_text=stream)])[0]
            assert out.finish_reason == "stop" and out.token_ids == base.token_ids[:4]
            texts.add(out.text)
    assert texts == {b.tokenizer.decode(base.token_ids[:3])}


@pytest.mark.parametrize("async_decode", ["off", "on"])
def test_a_callback_that_raises_loses_its_request_only(tiny_llama_bundle, async_decode):
    """A consumer whose callback raises (its event loop closed under it, a bug) aborts its own request; every other
    row of the same steps still gets its tokens, exactly as without it, and the engine goes on."""
    b = tiny_llama_bundle
    vocab = b.spec.vocab_size
    reqs = [
        Request(f"r{i}", random_prompt(vocab, 4 + i, 30 + i), SamplingParams(max_tokens=6, ignore_eos=True))
        for i in range(3)
    ]
    want = {o.request_id: o.token_ids for o in make_engine(b, {}).generate(reqs)}
    eng = make_engine(b, {}, async_decode=async_decode)
    seen: dict[str, list] = {r.request_id: [] for r in reqs}

    def broken(ev) -> None:
        seen["r1"].append(ev)
        if len(seen["r1"]) == 2:
            raise RuntimeError("event loop is closed")

    for r in reqs:
        eng.add_request(r, broken if r.request_id == "r1" else seen[r.request_id].append)
    while eng.has_unfinished():
        eng.step()
    for rid in ("r0", "r2"):
        assert [t for ev in seen[rid] for t in ev.token_ids] == want[rid]
        assert [ev.finish_reason for ev in seen[rid] if ev.finished] == ["length"]
    assert len(seen["r1"]) == 2 and not any(ev.finished for ev in seen["r1"])  # nothing after the failure
    assert eng.pool.num_used == 0 and not eng._callbacks and not eng._seqs


def test_a_prefix_fetched_for_a_request_that_fails_admission_is_not_held_for_it(tiny_llama_bundle):
    """A request refused at admission after its prefix was installed (prefix + prompt beyond the context) does not
    leave that prefix counted as fetched ahead of use: other tenants' prefixes are fetched at once."""
    b = tiny_llama_bundle
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(b.spec, 8 + 40 * (i == 0), i) for i in range(2)}
    kl = list(keys)
    eng = make_engine(b, keys, max_model_len=64, max_num_seqs=1)
    pc = eng.prefix_cache
    assert pc.max_pending == 1
    too_long = Request("long", random_prompt(b.spec.vocab_size, 20, 0), SamplingParams(max_tokens=2), kl[0])
    outs = eng.generate([too_long])
    assert outs[0].error_type == "RequestTooLarge" and kl[0] in pc.entries
    assert pc._fresh() == 0
    t0 = time.monotonic()
    ok = Request("ok", random_prompt(b.spec.vocab_size, 5, 1), SamplingParams(max_tokens=2), kl[1])
    assert eng.generate([ok])[0].error is None
    assert time.monotonic() - t0 < 2  # not held back for fresh_s (10 s)


def test_a_negative_prompt_token_id_is_refused(tiny_llama_bundle):
    # a negative id would index the embedding from its end on a CPU, or raise a device-side assert on CUDA
    eng = LLMEngine(
        tiny_llama_bundle, DictPrefixProvider(), EngineConfig(kv_cache_bytes=8 * 2**20, max_model_len=64)
    )
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request(Request("neg", [5, -1], SamplingParams(max_tokens=2)))
    assert eng.num_waiting == 0


def test_load_errors_of_keys_never_asked_again_are_forgotten(tiny_llama_bundle):
    """A prefix version that cannot be loaded (deleted while requested) keeps its error for error_ttl_s; past it,
    the error is swept even though nothing asks for that version again (they piled up, one per deleted version)."""
    import time

    eng = make_engine(tiny_llama_bundle, {})
    pc = eng.prefix_cache
    pc.error_ttl_s = 60.0  # none swept while the fetches end (their errors are dated as each one's does)
    for v in range(5):
        key = PrefixKey("t", "gone", v + 1)
        assert pc.lookup(key) is None  # a fetch starts, and fails: no such prefix
    deadline = time.monotonic() + 5
    while pc.loading() and time.monotonic() < deadline:
        pc.process()
        time.sleep(0.005)
    assert len(pc._errors) == 5
    # a request answered from a remembered error is a miss (hits + misses = lookups; it counted as neither)
    misses, hits = pc.stats.misses, pc.stats.hits
    assert pc.lookup(PrefixKey("t", "gone", 1)) is pc._errors[PrefixKey("t", "gone", 1)][0]
    assert (pc.stats.misses, pc.stats.hits) == (misses + 1, hits)
    pc.error_ttl_s = 0.05
    time.sleep(0.06)
    pc.process()
    assert pc._errors == {}


def test_idle_prefix_blocks_are_counted_as_the_cache_changes(tiny_llama_bundle):
    """`idle_blocks` (the usage gauge's free share of resident prefixes) equals the blocks of the entries no request
    holds after every kind of change: installs, evictions over the budget, several tenants at once, invalidations;
    once idle, every used block is an idle prefix's (the gauge reads 0)."""
    eng, kl = _two_prefix_cache(tiny_llama_bundle, 5)
    pc = eng.prefix_cache

    def check() -> None:
        assert pc.idle_blocks == sum(len(e.blocks) for e in pc.entries.values() if e.active == 0)

    _run_in_order(eng, kl, [0, 1, 0, 2, 3, 0])
    check()
    eng.generate([_req(f"m{i}", [1, 2, 3], kl[i]) for i in range(5)])  # more at once than the budget holds
    check()
    pc.invalidate(kl[0].tenant_id, kl[0].name)
    eng.generate([_req("after", [4, 5], kl[1])])
    check()
    assert pc.entries and eng.pool.num_used - pc.idle_blocks == 0
    eng.add_request(_req("running", [1, 2, 3], kl[2], max_tokens=50))
    for _ in range(200):  # (until its prefix, evicted, is fetched again on the loader thread)
        eng.step()
        if eng.num_running:
            break
        time.sleep(0.01)
    assert eng.num_running == 1
    assert eng.pool.num_used - pc.idle_blocks > 0  # a running request holds its own blocks and its prefix


@pytest.mark.parametrize("async_decode", ["off", "on"])
def test_a_long_prompt_beside_decoding_rows_runs_in_capped_chunks(tiny_llama_bundle, async_decode):
    """While a row decodes, a long prompt computes at most `long_prefill_tokens` a step (one long chunk would hold
    the decoding row's next token for its whole step); with nothing decoding it takes the whole budget; the tokens
    are the same either way."""
    bundle = tiny_llama_bundle
    keys = {PrefixKey("t0", "default", 1): random_kv(bundle.spec, 8, seed=0)}
    k = next(iter(keys))
    streaming = Request(
        "s", random_prompt(bundle.spec.vocab_size, 5, 1), SamplingParams(60, ignore_eos=True), k
    )
    long = Request(
        "long", random_prompt(bundle.spec.vocab_size, 200, 2), SamplingParams(4, ignore_eos=True), k
    )
    ref = {o.request_id: o.token_ids for o in make_engine(bundle, keys).generate([streaming, long])}

    def chunks(eng: LLMEngine, first: Request | None) -> tuple[list[int], dict[str, list[int]]]:
        seen: list[int] = []
        prepare = eng.runner.prepare

        def spy(rows):
            seen.extend(len(r.tokens) for r in rows if len(r.tokens) > 1)
            return prepare(rows)

        eng.runner.prepare = spy
        got: dict[str, list[int]] = {}
        if first is not None:
            eng.add_request(first)
            while not seen:  # its prompt (once its prefix is in; async: its first token then still in flight)
                for ev in eng.step():
                    got.setdefault(ev.request_id, []).extend(ev.token_ids)
            seen.clear()
        eng.add_request(long)
        while eng.has_unfinished():
            for ev in eng.step():
                assert ev.finish_reason != "error", ev.error
                got.setdefault(ev.request_id, []).extend(ev.token_ids)
        return seen, got

    cfg = {"max_num_batched_tokens": 512, "long_prefill_tokens": 48, "async_decode": async_decode}
    seen, got = chunks(make_engine(bundle, keys, **cfg), streaming)
    assert seen == [48, 48, 48, 48, 8] and got == ref  # 200 tokens beside the decoding row
    seen, got = chunks(make_engine(bundle, keys, **cfg), None)
    assert seen == [200] and got == {"long": ref["long"]}  # alone: one chunk
    assert make_engine(bundle, keys).scheduler.cfg.long_prefill_tokens == 256  # a CPU's default


def test_a_prefix_fetched_for_a_waiting_request_is_not_evicted_to_install_another(tiny_llama_bundle):
    """Short of pool blocks, installing a fetched prefix evicted another that was fetched for a waiting request and
    not yet taken; that request then fetched it again, evicting the first: store reads in a loop. The install
    waits instead (retried every step) until the other is taken and idle, and evicts nothing meanwhile (the idle
    prefixes it could take would not make room)."""
    b = tiny_llama_bundle
    kz, kx, ky = (PrefixKey(t, "p", 1) for t in "zxy")
    keys = {
        kz: random_kv(b.spec, 16, seed=0),
        kx: random_kv(b.spec, 32, seed=1),
        ky: random_kv(b.spec, 48, seed=2),
    }
    eng = make_engine(b, keys, kv_cache_bytes=pool_bytes(b, 8), prefix_cache_bytes=pool_bytes(b, 8))
    pc = eng.prefix_cache

    def load(k: PrefixKey) -> bool:
        pc.claim(k)
        assert pc.lookup(k) is None  # a fetch starts
        for _ in range(5000):  # (up to 10 s: a fetch on a loader thread of a loaded machine)
            pc.process()
            if k in pc.entries:
                return True
            if pc._loading[k].done():  # fetched, and not installed: no room
                pc.process()
                return k in pc.entries
            time.sleep(0.002)
        raise AssertionError("fetch never finished")

    assert load(kz)
    z = pc.entries[kz]
    pc.acquire(z)  # taken by its request, which ended: an ordinary victim
    pc.unclaim(kz)
    pc.release(z)
    assert load(kx)  # for a request that has not taken it yet
    eng.pool.allocate(eng.pool.num_free - 1)  # ky (3 blocks) would need z's 1 and x's 2
    assert not load(ky) and kx in pc.entries and kz in pc.entries and pc.stats.evictions == 0
    x = pc.entries[kx]
    pc.acquire(x)  # its request takes it, then ends: idle, no longer held for anyone
    pc.unclaim(kx)
    pc.release(x)
    pc.process()
    assert ky in pc.entries and kx not in pc.entries and kz not in pc.entries and pc.stats.evictions == 2
    assert pc.stats.fetches == 3


def test_the_engine_threads_hold_when_its_first_request_comes_while_a_job_trains(tiny_llama_bundle):
    """torch.set_num_threads in a training thread (the trainer runs on fewer threads) sets the count any thread takes
    at its first torch op: an engine whose first request came while a job trained ran on the trainer's one thread
    for the life of the process (prefill ~1.75x slower on 2 cores). The engine pins its own count."""
    import torch

    from server.engine import AsyncEngine

    b = tiny_llama_bundle
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eng = AsyncEngine(make_engine(b, {}))  # (its count: the process's now, 2)
        seen: list[int] = []
        step = eng.engine.step
        eng.engine.step = lambda: seen.append(torch.get_num_threads()) or step()
        training, done = threading.Event(), threading.Event()

        def trainer():  # as server.training.trainer._threads(1) holds it during a job
            torch.set_num_threads(1)
            training.set()
            done.wait(10)

        t = threading.Thread(target=trainer)
        t.start()
        training.wait(10)
        eng.start()

        async def first():
            r = Request("r", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
            return [ev async for ev in eng.generate(r)]

        try:
            assert asyncio.run(first())
        finally:
            done.set()
            t.join(10)
            eng.shutdown()
        assert seen and set(seen) == {2}, seen
    finally:
        torch.set_num_threads(before)
