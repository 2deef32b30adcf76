"""Load: 500 concurrent mixed-tenant requests (50 tenants) over loopback against the running server.

0 errors, 0 lost, every greedy output token-identical to the same request run alone; throughput and p99 reported.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams
from server.model import render_prompt
from tests.fixtures.server import put_random_prefix

TENANTS = 50
PER_TENANT = 10
MAX_TOKENS = 6


def test_500_concurrent_mixed_tenant_requests(server_factory, api_bundle):
    s = server_factory(max_num_seqs=64, max_concurrent_per_tenant=PER_TENANT, kv_cache_mb=32)
    kvs = {}
    for t in range(TENANTS):
        meta = put_random_prefix(s.store, api_bundle, f"t{t:02d}", prefix_length=4 + t % 13, seed=t)
        kvs[f"t{t:02d}"] = (meta, s.store.get(meta.tenant_id, meta.name).tensors["kv"])
    jobs = [
        (f"t{t:02d}", f"prompt {t} {i} {'x' * (i % 7)}") for t in range(TENANTS) for i in range(PER_TENANT)
    ]

    # expected: each request alone through a fresh engine (no other rows in its batch)
    prov = DictPrefixProvider({PrefixKey(t, m.name, m.version): kv for t, (m, kv) in kvs.items()})
    alone = LLMEngine(api_bundle, prov, EngineConfig(kv_cache_bytes=16 * 2**20))
    expected = {}
    for i, (t, prompt) in enumerate(jobs):
        m = kvs[t][0]
        ids = render_prompt(api_bundle.tokenizer, prompt, "raw")
        req = Request(
            f"a{i}",
            ids,
            SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
            PrefixKey(t, m.name, m.version),
        )
        expected[i] = alone.generate([req])[0].text
    alone.shutdown()

    async def run() -> tuple[list[httpx.Response | BaseException], list[float], float]:
        lat: list[float] = []
        async with httpx.AsyncClient(
            base_url=s.url, timeout=120, limits=httpx.Limits(max_connections=500)
        ) as c:

            async def one(t: str, prompt: str) -> httpx.Response:
                t0 = time.perf_counter()
                r = await c.post(
                    "/generate",
                    json={"tenant_id": t, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True},
                )
                lat.append(time.perf_counter() - t0)
                return r

            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(t, p) for t, p in jobs), return_exceptions=True)
            return res, lat, time.perf_counter() - t0

    results, latencies, wall = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException) or r.status_code != 200]
    assert not errors, f"{len(errors)} failed, first: {errors[0]!r}"
    assert len(results) == TENANTS * PER_TENANT  # nothing lost
    mismatched = [i for i, r in enumerate(results) if r.json()["text"] != expected[i]]
    assert not mismatched, f"{len(mismatched)} outputs differ from the request run alone"
    assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in results)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(
        f"\nload: {len(results)} requests, {len(results) / wall:.0f} req/s, "
        f"{len(results) * MAX_TOKENS / wall:.0f} tok/s, p50 {statistics.median(latencies) * 1e3:.0f} ms, "
        f"p99 {p99 * 1e3:.0f} ms"
    )
