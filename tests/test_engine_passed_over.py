"""Requests waiting for a prefix fetch are passed over without asking the prefix cache again
(`Scheduler._passed_over`, `PrefixCache.unchanged_miss`): a shortcut, so it must change nothing. Differential: the
same workload, with fetches completing at the same steps (each key's fetch waits for the test to open its gate), runs
step for step identically with the shortcut and without it: which requests run, which prefixes are being fetched,
the cache's counters, every token."""

from __future__ import annotations

import random
import threading

import pytest

from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams
from tests.engine_utils import pool_bytes, random_kv, random_prompt


class KeyGated(DictPrefixProvider):
    """A store whose reads of a key return only once the test has opened that key's gate (for good)."""

    def __init__(self, prefixes) -> None:
        super().__init__(prefixes)
        self.gates = {k: threading.Event() for k in prefixes}

    def fetch(self, key):
        kv = super().fetch(key)
        gate = self.gates.get(key)
        if gate is not None:
            assert gate.wait(30), f"{key}'s gate never opened"
        return kv


def _trajectory(bundle, seed: int, fair: bool, shortcut: bool) -> tuple[list[tuple], dict[str, int]]:
    rnd = random.Random(seed)
    keys = [PrefixKey(f"t{i}", "p", 1) for i in range(32)]
    stored = {k: random_kv(bundle.spec, 3 + i % 6, seed=i) for i, k in enumerate(keys[:-2])}  # 2 are missing
    prov = KeyGated(stored)
    cfg = EngineConfig(
        max_num_seqs=4,  # (and so 4 fetch slots)
        loader_threads=len(keys),  # every fetch starts at once: only the gates decide when one ends
        kv_cache_bytes=pool_bytes(bundle, 12),
        prefix_cache_bytes=pool_bytes(bundle, 3),  # room for 3 prefixes: evictions, fetches again
        fair_scheduling=fair,
    )
    eng = LLMEngine(bundle, prov, cfg)
    sched, cache = eng.scheduler, eng.prefix_cache
    # nothing by the clock: a load error remembered, a prefix held for its request, until the workload ends
    cache.error_ttl_s = cache.fresh_s = 1e9
    passed = {"fetching": 0, "no slot": 0}
    real = sched._passed_over

    def counted(seq) -> bool:
        got = real(seq)
        if got:
            passed["fetching" if seq.req.prefix in cache._loading else "no slot"] += 1
        return got

    sched._passed_over = counted if shortcut else (lambda seq: False)  # type: ignore[method-assign]
    n = 0
    steps: list[tuple] = []
    for step in range(600):
        for _ in range(rnd.choice((0, 1, 2, 3, 4)) if step < 110 else 0):
            key = rnd.choice([*keys, None])
            eng.add_request(
                Request(
                    f"r{n}",
                    random_prompt(bundle.spec.vocab_size, rnd.randint(1, 40), seed=n),
                    SamplingParams(max_tokens=rnd.randint(1, 6), ignore_eos=True),
                    key,
                    priority=rnd.choice((0, 0, 1)),
                )
            )
            n += 1
        for key in sorted(cache._loading, key=str):
            if rnd.random() < 0.2 and key in prov.gates:
                prov.gates[key].set()
        for key, fut in list(
            cache._loading.items()
        ):  # every fetch whose gate is open has ended before the step
            if key not in prov.gates or prov.gates[key].is_set():
                fut.exception(timeout=30)
        events = [(ev.request_id, tuple(ev.token_ids), ev.finished, ev.error) for ev in eng.step()]
        s = cache.stats
        steps.append(
            (
                step,
                tuple(q.request_id for q in sched.running),
                tuple(q.request_id for q in sched.waiting),
                tuple(sorted(map(str, cache._loading))),
                (s.hits, s.misses, s.fetches, s.evictions, s.load_errors),
                tuple(events),
            )
        )
        if step >= 110 and not eng.has_unfinished():
            break
    for gate in prov.gates.values():
        gate.set()
    cache.shutdown()
    return steps, passed


@pytest.mark.parametrize("fair", [True, False], ids=["fair", "fcfs"])
@pytest.mark.parametrize("seed", range(4))
def test_passing_over_requests_that_wait_for_a_fetch_changes_nothing(
    tiny_llama_bundle, seed: int, fair: bool
):
    with_it, passed = _trajectory(tiny_llama_bundle, seed, fair, shortcut=True)
    without, _ = _trajectory(tiny_llama_bundle, seed, fair, shortcut=False)
    for a, b in zip(with_it, without, strict=True):
        assert a == b
    # (the shortcut was taken: requests waited for fetches under way, and for a fetch slot)
    assert passed["fetching"] > 20 and passed["no slot"] > 20, passed
    assert any(len(s[3]) == 4 for s in with_it)  # every fetch slot taken at some step
    assert not with_it[-1][1] and not with_it[-1][2]  # all ended
    ended = {e[0] for s in with_it for e in s[5] if e[2]}
    assert len(ended) == sum(1 for s in with_it for e in s[5] if e[2])  # each once
    assert any(e[3] for s in with_it for e in s[5])  # the missing prefixes' requests failed


def test_a_request_that_gave_its_claim_back_claims_again_while_its_fetch_is_under_way(tiny_llama_bundle):
    """A waiting request that gave its claim on its prefix back (`Scheduler.free`: short of blocks, preempted) is
    asked again, not passed over, though its prefix is still being fetched: its claim is what keeps the prefix from
    being evicted before it takes it (`PrefixCache.is_fresh`)."""
    b = tiny_llama_bundle
    key = PrefixKey("t", "p", 1)
    prov = KeyGated({key: random_kv(b.spec, 5, seed=0)})
    eng = LLMEngine(b, prov, EngineConfig(max_num_seqs=4, kv_cache_bytes=pool_bytes(b, 16)))
    sched, cache = eng.scheduler, eng.prefix_cache
    for i in range(2):
        eng.add_request(Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), key))
    eng.step()
    assert key in cache._loading and cache._wanted[key] == 2
    r1 = next(s for s in sched.waiting if s.request_id == "r1")
    assert sched._passed_over(r1)
    sched.free(r1)  # (what an admission short of blocks, or a preemption, does to it)
    assert cache._wanted[key] == 1 and not sched._passed_over(r1)
    eng.step()
    assert cache._wanted[key] == 2 and sched._passed_over(r1)
    prov.gates[key].set()
    cache._loading[key].exception(timeout=30)
    for _ in range(200):
        eng.step()
        if not eng.has_unfinished():
            break
    assert not eng.has_unfinished() and key not in cache._wanted
    cache.shutdown()


def test_an_admission_that_stops_asks_the_walk_for_nothing_more(tiny_llama_bundle):
    """`_admit` stops (the rows are full) before it asks the admission order for another request: the walk, which
    passes over requests waiting for a fetch on its own, does not run on past them into the next priority level's
    preempted requests (whose check computes the step's block shares, `_over_share`, kept for the step)."""
    b = tiny_llama_bundle
    key = PrefixKey("A", "p", 1)
    prov = KeyGated({key: random_kv(b.spec, 5, seed=0)})  # (its fetch never ends here)
    eng = LLMEngine(b, prov, EngineConfig(max_num_seqs=2, kv_cache_bytes=pool_bytes(b, 32)))
    sched = eng.scheduler
    sp = SamplingParams(max_tokens=50, ignore_eos=True)
    eng.add_request(Request("R", [1, 2, 3], sp, None, cache_salt="A"))
    eng.add_request(Request("a1", [1, 2, 3], sp, key, cache_salt="A"))
    sched.begin_step()
    sched.schedule()  # R runs; a1 asked for its prefix (fetch under way)
    assert sched._passed_over(next(s for s in sched.waiting if s.request_id == "a1"))
    eng.add_request(Request("X", [4, 5, 6], sp, None, cache_salt="B"))
    eng.add_request(Request("P", [7, 8, 9], sp, None, cache_salt="D", priority=1))
    p = next(s for s in sched.waiting if s.request_id == "P")
    sched.waiting.remove(p)
    p.preempted = True
    sched.waiting.appendleft(p)  # (a preempted row of priority 1)
    sched.begin_step()
    sched.schedule()
    assert [s.request_id for s in sched.running] == ["R", "X"]
    assert sched._over_share is None  # (never looked at: the rows were full)
    prov.gates[key].set()
    eng.prefix_cache.shutdown()
