"""Fair shares between tenants, counted in engine steps (machine-independent): `fair` against `fcfs`, side by side.

Two workloads on a tiny random Llama (the scheduler's decisions do not depend on the weights):
- steady: a flooding tenant keeps `--flood` requests of 128 tokens running or queued (a closed loop, as a client at
  its concurrency limit) in a batch of `--max-num-seqs` rows; a quiet tenant adds one 16-token request every
  `--quiet-every` steps. Reported: the quiet requests' steps to their first token.
- kv: 16 long requests (480 tokens) of one tenant in a pool of `--blocks` KV blocks; a short request (8 tokens) of
  another tenant every 10 steps. Reported: the short requests' steps to their first token, how many of their rows
  were preempted, the longest gap (steps) inside a short stream.

    python benchmarks/bench_fair_steps.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import markdown_table  # noqa: E402
from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, Request, SamplingParams  # noqa: E402
from tests.engine_utils import pool_bytes  # noqa: E402
from tests.fixtures.models import tiny_llama  # noqa: E402


def _request(rid: str, tenant: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(
        rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None, cache_salt=tenant
    )


def steady(bundle, fair: bool, flood: int, max_num_seqs: int, quiet_every: int, steps: int) -> dict:
    eng = LLMEngine(bundle, DictPrefixProvider({}),
                    EngineConfig(max_num_seqs=max_num_seqs, kv_cache_bytes=64 * 2**20, fair_scheduling=fair))  # fmt: skip
    added: dict[str, int] = {}
    first: dict[str, int] = {}
    live: set[str] = set()
    count = 0

    def add(tenant: str, max_tokens: int) -> str:
        nonlocal count
        count += 1
        rid = f"{tenant}-{count}"
        eng.add_request(_request(rid, tenant, [5, 6, 7, 8 + count % 50] * 8, max_tokens))
        return rid

    for _ in range(flood):
        live.add(add("flood", 128))
    for step in range(steps):
        if step % quiet_every == 0 and step > 20:
            added[add("quiet", 16)] = step
        for ev in eng.step():
            if ev.request_id in added and ev.request_id not in first and ev.token_ids:
                first[ev.request_id] = step
            if ev.finished and ev.request_id in live:
                live.discard(ev.request_id)
                live.add(add("flood", 128))
    waits = [first[r] - added[r] for r in added if r in first]
    s = eng.scheduler
    return {
        "quiet requests": len(added),
        "no token yet": len(added) - len(waits),
        "first token p50 (steps)": statistics.median(waits),
        "first token max (steps)": max(waits),
        "fair preemptions": s.num_fair_preemptions,
    }


def kv_limited(bundle, fair: bool, blocks: int) -> dict:
    eng = LLMEngine(bundle, DictPrefixProvider({}),
                    EngineConfig(max_num_seqs=32, kv_cache_bytes=pool_bytes(bundle, blocks), fair_scheduling=fair))  # fmt: skip
    victims = {"long": 0, "short": 0}
    preempt = eng.scheduler._preempt

    def counted(seq, preempt=preempt):
        victims["long" if seq.request_id.startswith("long") else "short"] += 1
        preempt(seq)

    eng.scheduler._preempt = counted  # type: ignore[method-assign]
    for i in range(16):
        eng.add_request(_request(f"long{i}", "hog", [7 + i % 50] * 40, 480))
    added: dict[str, int] = {}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    gap = step = 0
    while eng.has_unfinished() and step < 20_000:
        if step % 10 == 0 and step <= 400:
            rid = f"short{step}"
            eng.add_request(_request(rid, "quiet", [3, 4, 5, 6 + step % 40] * 5, 8))
            added[rid] = step
        for ev in eng.step():
            if ev.request_id in added and ev.token_ids:
                if ev.request_id in last:
                    gap = max(gap, step - last[ev.request_id])
                else:
                    first[ev.request_id] = step
                last[ev.request_id] = step
        step += 1
    waits = [first[r] - added[r] for r in added]
    return {
        "pool blocks": blocks,
        "short first token p50 (steps)": statistics.median(waits),
        "short first token max (steps)": max(waits),
        "short rows preempted": victims["short"],
        "long rows preempted": victims["long"],
        "longest gap in a short stream (steps)": gap,
        "steps": step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flood", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--quiet-every", type=int, default=4)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--blocks", type=int, nargs="+", default=[80, 160])
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundle = tiny_llama()
    rows = []
    for policy, fair in (("fcfs", False), ("fair", True)):
        rows.append({"policy": policy, **steady(bundle, fair, args.flood, args.max_num_seqs, args.quiet_every,
                                                args.steps)})  # fmt: skip
    print("## steady quiet tenant beside a flood\n")
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    rows = [
        {"policy": p, **kv_limited(bundle, f, b)}
        for b in args.blocks
        for p, f in (("fcfs", False), ("fair", True))
    ]
    print("\n## short requests beside long ones in a small KV pool\n")
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))


if __name__ == "__main__":
    main()
