from server.engine import Request, SamplingParams
from tests.engine_utils import make_engine, pool_bytes, random_prompt


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


def test_the_pool_takes_the_memory_it_was_given(tiny_llama_bundle):
    """kv_cache_bytes bounds the pool's real tensor (plus its one scratch block): block_bytes is what a block holds."""
    b = tiny_llama_bundle
    budget = 4 * 2**20
    eng = make_engine(b, {}, kv_cache_bytes=budget)
    pool = eng.pool
    real = pool.data.numel() * pool.data.element_size()
    assert real == (pool.num_blocks + 1) * pool.block_bytes
    assert budget - pool.block_bytes < pool.num_blocks * pool.block_bytes <= budget
