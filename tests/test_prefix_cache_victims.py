"""`PrefixCache._victims`, the eviction order, checked property by property on random cache states (a spec for
whoever makes it cheaper: at 10,000 resident prefixes it costs ~5 ms an install, its sort and key calls): every idle
entry and only those, the fresh ones (installed for a waiting request that has not taken them yet) last, then least
frequently used first (`policy="lru"`: recency alone), least recently used among equals."""

from __future__ import annotations

import random
import time

import pytest

from server.engine import PrefixKey
from server.engine.prefix_cache import PrefixEntry
from tests.engine_utils import make_engine


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_eviction_order_is_the_plain_order(tiny_llama_bundle, policy: str) -> None:
    cache = make_engine(tiny_llama_bundle, {}).prefix_cache
    cache.policy = policy
    rnd = random.Random(0)
    seen_fresh = 0
    for _trial in range(200):
        cache.entries.clear()
        cache._untaken.clear()
        cache._wanted.clear()
        cache._freq.clear()
        now = time.monotonic()
        for i in range(rnd.randint(0, 40)):
            key = PrefixKey(f"t{rnd.randrange(12)}", rnd.choice("ab"), i)  # (names share frequencies)
            e = PrefixEntry(key, 4, [], 0, active=rnd.choice((0, 0, 0, 1, 2)))
            e.used = rnd.random() < 0.6
            e.stale = rnd.random() < 0.1
            e.installed = now - rnd.choice((0.0, 1.0, cache.fresh_s + 1))
            cache.entries[key] = e
            # every entry installed and not taken since is there (till `_fresh` prunes those it finds taken or
            # past fresh_s): only those may be fresh
            if (not e.used and now - e.installed < cache.fresh_s) or rnd.random() < 0.5:
                cache._untaken[key] = e
            if rnd.random() < 0.5:
                cache._wanted[key] = rnd.randint(1, 2)
            cache._freq[(key.tenant_id, key.name)] = rnd.randint(0, 4)
        got = cache._victims()
        lru = list(cache.entries.values())  # (least recently used first)
        assert sorted(map(id, got)) == sorted(id(e) for e in lru if e.active == 0)  # every idle entry, once
        now = time.monotonic()
        rank = [
            (cache.is_fresh(e, now), cache.frequency(e.key) if policy == "lfu" else 0, lru.index(e))
            for e in got
        ]
        assert rank == sorted(
            rank
        )  # fresh last; then less frequent first (LFU); then less recently used first
        seen_fresh += any(r[0] for r in rank)
    assert seen_fresh > 50  # (fresh entries were there to rank last)
