"""The scheduler's host time per engine step against the depth of the waiting queue (machine-dependent, but the
model's time is left out): what a saturated server pays on the host each step before the device can run it.

A tiny random Llama (the scheduler's work does not depend on the weights) runs `--max-num-seqs` rows; `--waiting`
more requests wait behind them, kept at that depth (a closed loop: every request that ends is replaced), spread over
`--tenants` tenants (each its own prefix, or none with `--tenants 0`). Rows end at staggered steps (max_tokens
uniform in 16..48), so most steps admit a request or two, as a busy server's do. Reported per setting: the median
and p99 host time of `Scheduler.schedule` per step, and the whole step's median for scale.

By default every prefix stays resident. `--cache-prefixes N --fetch-ms T` gives the device prefix cache room for N
prefixes and the store a fetch latency of T ms: with many tenants most waiting requests then wait for a fetch (in
flight, or for one of the `max_num_seqs` fetch slots), the case of a cache smaller than the tenants active.

    python benchmarks/bench_sched_overhead.py                       # waiting 0 / 256 / 1024 / 4096, fair and fcfs
    python benchmarks/bench_sched_overhead.py --waiting 1024 --tenants 1000
    python benchmarks/bench_sched_overhead.py --waiting 1024 --tenants 1000 --cache-prefixes 100 --fetch-ms 20
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import markdown_table  # noqa: E402
from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams  # noqa: E402
from tests.engine_utils import random_kv  # noqa: E402
from tests.fixtures.models import tiny_llama  # noqa: E402


class SlowProvider(DictPrefixProvider):
    """A store whose every read takes `delay_s` (on the cache's loader threads, as a store's does)."""

    def __init__(self, prefixes: dict, delay_s: float) -> None:
        super().__init__(prefixes)
        self.delay_s = delay_s

    def fetch_digested(self, key: PrefixKey) -> tuple[torch.Tensor, str]:
        time.sleep(self.delay_s)
        return super().fetch_digested(key)


def run(
    bundle,
    waiting: int,
    tenants: int,
    fair: bool,
    max_num_seqs: int,
    steps: int,
    seed: int = 0,
    cache_prefixes: int | None = None,
    fetch_ms: float = 0.0,
) -> dict:
    keys = [PrefixKey(f"t{i}", "p", 1) for i in range(tenants)]
    kv = random_kv(bundle.spec, 4, seed=1)
    eng = LLMEngine(
        bundle,
        SlowProvider(dict.fromkeys(keys, kv), fetch_ms / 1e3),
        EngineConfig(
            max_num_seqs=max_num_seqs,
            max_waiting=waiting + max_num_seqs + 16,
            kv_cache_bytes=256 * 2**20,
            fair_scheduling=fair,
        ),
    )
    if cache_prefixes is not None:  # (a prefix of 4 tokens takes one block)
        eng.prefix_cache.budget_bytes = cache_prefixes * eng.pool.block_bytes
    rnd = random.Random(seed)
    count = 0

    def add() -> None:
        nonlocal count
        prefix = keys[count % tenants] if tenants else None
        prompt = [rnd.randrange(3, 200) for _ in range(8)]
        sampling = SamplingParams(max_tokens=rnd.randint(16, 48), ignore_eos=True)
        eng.add_request(
            Request(f"r{count}", prompt, sampling, prefix, cache_salt=f"c{count % max(1, tenants)}")
        )
        count += 1

    for _ in range(max_num_seqs + waiting):
        add()
    sched = eng.scheduler
    schedule = sched.schedule
    # what the server does once started (`freeze_gc`): the model's and the app's objects are never scanned again,
    # so a collection costs what the requests hold, not torch's hundreds of thousands of objects
    gc.collect()
    gc.freeze()
    spent: list[float] = []

    def timed() -> object:
        t0 = time.perf_counter()
        try:
            return schedule()
        finally:
            spent.append(time.perf_counter() - t0)

    sched.schedule = timed  # type: ignore[method-assign]
    step_s: list[float] = []
    running: list[int] = []
    for i in range(steps + 40):
        loads = eng.prefix_cache._loading.values()
        while not sched.running and loads and not any(f.done() for f in loads):
            time.sleep(0.0005)  # nothing to run until a fetch lands (a server's engine waits for it too)
        if i == 40:  # warm-up (first prefills, prefix loads) not counted
            spent.clear()
            step_s.clear()
            running.clear()
        t0 = time.perf_counter()
        ended = sum(1 for ev in eng.step() if ev.finished)
        step_s.append(time.perf_counter() - t0)
        running.append(len(sched.running))
        for _ in range(ended):
            add()
    gc.unfreeze()
    spent.sort()
    return {
        "waiting": waiting,
        "tenants": tenants,
        "scheduling": "fair" if fair else "fcfs",
        "schedule ms p50": round(statistics.median(spent) * 1e3, 3),
        "schedule ms p99": round(spent[int(0.99 * (len(spent) - 1))] * 1e3, 3),
        "step ms p50": round(statistics.median(step_s) * 1e3, 2),
        "running p50": statistics.median(running),
        "queued at end": len(sched.waiting),
        "fetches": eng.prefix_cache.stats.fetches,
        "evictions": eng.prefix_cache.stats.evictions,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waiting", type=int, nargs="+", default=[0, 256, 1024, 4096])
    ap.add_argument("--tenants", type=int, nargs="+", default=[16, 1000])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--fcfs", action="store_true", help="also first-come-first-served scheduling")
    ap.add_argument("--cache-prefixes", type=int, help="device prefix cache room, in prefixes (default: all)")
    ap.add_argument("--fetch-ms", type=float, default=0.0, help="latency of each store read")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bundle = tiny_llama(0)
    rows = []
    with torch.inference_mode():
        for tenants in args.tenants:
            for waiting in args.waiting:
                for fair in (True, False) if args.fcfs else (True,):
                    rows.append(
                        run(
                            bundle,
                            waiting,
                            tenants,
                            fair,
                            args.max_num_seqs,
                            args.steps,
                            cache_prefixes=args.cache_prefixes,
                            fetch_ms=args.fetch_ms,
                        )
                    )
                    print(json.dumps(rows[-1]), file=sys.stderr)
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
