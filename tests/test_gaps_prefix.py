import pytest

from server.engine import PrefixKey, Request, SamplingParams
from tests.engine_utils import make_engine, random_kv, random_prompt


def _req(rid, prompt, key, **kw):
    kw.setdefault("max_tokens", 6)
    return Request(rid, prompt, SamplingParams(ignore_eos=True, **kw), key)


@pytest.mark.parametrize("how", ["name", "all"])
def test_a_newcomer_after_an_invalidation_runs_on_the_new_tensors_while_the_old_are_in_use(
    tiny_llama_bundle, how
):
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
