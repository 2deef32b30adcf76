"""Candidate killing tests for surviving scheduler / kv_cache mutants."""

from server.engine import PrefixKey, Request, SamplingParams
from tests.engine_utils import make_engine, pool_bytes, random_kv, random_prompt


def _spy_started(eng):
    started = []
    prepare = eng.runner.prepare

    def spy(rows):
        started.extend(s.request_id for s in eng.scheduler.running if s.request_id not in started)
        return prepare(rows)

    eng.runner.prepare = spy
    return started


def _run(eng, steps=400):
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
    assert _run(eng)
    assert started[:3] == ["A1", "B1", "A2"], started


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
    assert _run(eng, 100), "the request never ran"
    assert eng.prefix_cache.stats.evictions >= 1


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


def test_never_fit_at_one_block_past_the_pool(tiny_llama_bundle):
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
    assert _run(eng)
    assert started == ["R1", "R2", "BIG", "SMALL"], started
