import threading

from server.engine import EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams
from server.engine.kv_cache import KVPool
from server.engine.prefix_cache import DictPrefixProvider
from tests.engine_utils import make_engine, pool_bytes, random_kv, random_prompt


def _two(b, n, provider_cls=DictPrefixProvider, policy="lfu"):
    sp = b.spec
    keys = {PrefixKey(f"t{i}", "p", 1): random_kv(sp, 16, i) for i in range(n)}
    budget = 2 * KVPool.bytes_per_block(sp.num_layers, sp.num_kv_heads, sp.head_dim, 16, b.dtype)
    eng = LLMEngine(b, provider_cls(keys), EngineConfig(kv_cache_bytes=8 * 2**20, prefix_cache_bytes=budget))
    eng.prefix_cache.policy = policy
    return eng, list(keys)


def _go(eng, key, rid, n=2):
    return eng.generate([Request(rid, [1, 2, 3], SamplingParams(max_tokens=n, ignore_eos=True), key)])[0]


def test_lru_policy_evicts_the_least_recently_used_not_the_oldest_installed(tiny_llama_bundle):
    eng, kl = _two(tiny_llama_bundle, 3, policy="lru")
    for i, k in enumerate([0, 1, 0, 2]):
        _go(eng, kl[k], f"q{i}")
    assert set(eng.prefix_cache.entries) == {kl[0], kl[2]}


def test_installing_a_prefix_trims_idle_ones_at_once(tiny_llama_bundle):
    eng, kl = _two(tiny_llama_bundle, 3)
    pc = eng.prefix_cache
    _go(eng, kl[0], "a")
    _go(eng, kl[1], "b")
    eng.add_request(Request("c", [1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True), kl[2]))
    while not eng.scheduler.running:
        eng.step()
    assert pc.resident_bytes <= pc.budget_bytes and len(pc.entries) == 2
    while eng.has_unfinished():
        eng.step()


def test_an_idle_prefix_invalidated_and_loaded_again_leaks_no_blocks(tiny_llama_bundle):
    b = tiny_llama_bundle
    k0 = PrefixKey("t0", "p", 1)
    eng = make_engine(b, {k0: random_kv(b.spec, 8, 0)})
    _go(eng, k0, "old")
    new_kv = random_kv(b.spec, 8, seed=99, scale=8.0)
    want = (
        make_engine(b, {k0: new_kv})
        .generate([Request("f", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), k0)])[0]
        .token_ids
    )
    eng.prefix_cache.provider.prefixes[k0] = new_kv
    eng.prefix_cache.invalidate(k0.tenant_id, k0.name)
    assert _go(eng, k0, "new").token_ids == want
    (entry,) = eng.prefix_cache.entries.values()
    assert eng.pool.num_used == len(entry.blocks)


class GatedProvider(DictPrefixProvider):
    gate = None

    def fetch(self, key):
        kv = super().fetch(key)  # what the store held when the fetch started
        if self.gate is not None:
            self.gate.wait(10)
        return kv


def test_a_fetch_under_way_when_its_prefix_is_invalidated_is_not_installed(tiny_llama_bundle):
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
    b = tiny_llama_bundle
    k0 = PrefixKey("t0", "p", 1)
    eng = make_engine(b, {})
    assert _go(eng, k0, "before").finish_reason == "error"
    eng.prefix_cache.provider.prefixes[k0] = random_kv(b.spec, 8, 0)
    eng.prefix_cache.invalidate(k0.tenant_id, k0.name)  # the store's change event
    assert _go(eng, k0, "after").finish_reason == "length"


def test_prompt_cache_is_not_shared_across_salts_without_a_prefix(tiny_llama_bundle):
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


def _full_pool(b, n_prefixes):
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
