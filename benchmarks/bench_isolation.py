"""Performance isolation of the eager (torch) attention path: short rows decoding beside one long row.

Decode attention on the torch path gathers every row's keys padded to the group's longest row. Length buckets
(`model_runner.length_buckets`) cut such a group into sub-groups; this measures the engine's pure decode steps with the
buckets on and off (`runner.max_parts = 1`), side by side in one process, the two variants alternating:

* `mixed`: three short rows (prefixes 0, 16 and 32 positions) beside one row whose tenant has a `--long` prefix
  (random KV), every prompt `--prompt-len` tokens;
* `chat`: the same short rows beside one row of a long own context (a `--chat`-token prompt, no prefix: a long
  conversation);
* `short`: the three short rows alone (what the long row costs them, with buckets, is `mixed - short`);
* `equal`: `make bench`'s shape, `--tenants` rows of equal length (prefix 32, prompt 64): buckets must not kick in.

Each variant's median decode step (ms) per repeat, then the median over repeats, the spread (min-max) and the most
decode groups a step had are printed, and every shape's greedy tokens are checked to be identical with the buckets
on and off. The last line is a JSON object of the same.

    .venv/bin/python benchmarks/bench_isolation.py --model smollm2 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_engine import random_kv  # noqa: E402
from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams  # noqa: E402
from server.engine.kv_cache import KVPool  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a model folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long", type=int, default=4096, help="the long tenant's prefix positions")
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument(
        "--chat", type=int, default=2048, help="the long own context's prompt tokens (0: no chat shape)"
    )
    ap.add_argument("--tenants", type=int, default=8, help="rows of the equal-length shape")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from server.model import load_model

    bundle = load_model(args.model, device="cpu", dtype="float32")
    sp = bundle.spec
    short = [0, 16, 32]
    prefixes = {PrefixKey("long", "bench", 1): random_kv(sp, args.long, 0)}
    prefixes |= {PrefixKey(f"s{p}", "bench", 1): random_kv(sp, p, 1 + p) for p in short if p}
    prefixes |= {PrefixKey(f"e{i}", "bench", 1): random_kv(sp, 32, 100 + i) for i in range(args.tenants)}
    steps: list = []
    bs = 16
    positions = (
        args.long + 32 * (len(prefixes) - 1) + args.chat + (args.tenants + 4) * (64 + args.new_tokens + bs)
    )
    block = KVPool.bytes_per_block(sp.num_layers, sp.num_kv_heads, sp.head_dim, bs, bundle.dtype)
    pool = 2 * (positions // bs + 2 * len(prefixes) + 16) * block
    cfg = EngineConfig(block_size=bs, kv_cache_bytes=pool, prefix_cache_bytes=pool // 2, prompt_cache=False)
    eng = LLMEngine(bundle, DictPrefixProvider(prefixes), cfg, on_step=steps.append)
    parts: list[int] = []  # decode groups' length buckets per step (1: one padded group)
    prepare = eng.runner.prepare

    def spy(rows):
        inp = prepare(rows)
        if inp.prefill is None and inp.decode is not None:
            parts.append(len(inp.decode.parts or [inp.decode]))
        return inp

    eng.runner.prepare = spy  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(7)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, sp.vocab_size, (n,), generator=g).tolist()

    short_rows = [(PrefixKey(f"s{p}", "bench", 1) if p else None, prompt(args.prompt_len)) for p in short]
    shapes = {
        "mixed": [(PrefixKey("long", "bench", 1), prompt(args.prompt_len)), *short_rows],
        "chat": [(None, prompt(args.chat)), *short_rows],
        "short": short_rows,
        "equal": [(PrefixKey(f"e{i}", "bench", 1), prompt(64)) for i in range(args.tenants)],
    }
    if not args.chat:
        del shapes["chat"]
    n = 0

    def run(rows) -> tuple[float, list[list[int]], int]:
        nonlocal n
        reqs = [
            Request(f"r{n}-{i}", list(p), SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), k)
            for i, (k, p) in enumerate(rows)
        ]
        n += 1
        steps.clear()
        parts.clear()
        outs = eng.generate(reqs)
        dec = [s.duration_s for s in steps if s.num_prefill_tokens == 0 and s.num_decode_tokens == len(rows)]
        return statistics.median(dec) * 1e3, [o.token_ids for o in outs], max(parts)

    for rows in shapes.values():  # warm-up: prefixes resident, kernels at these shapes
        run(rows)
    times: dict[tuple[str, str], list[float]] = {}
    tokens: dict[tuple[str, str], list[list[int]]] = {}
    buckets: dict[tuple[str, str], int] = {}
    load0 = os.getloadavg()[0]
    for rep in range(args.repeats):
        for name, rows in shapes.items():
            variants = ["on", "off"] if rep % 2 == 0 else ["off", "on"]
            for v in variants:
                eng.runner.max_parts = 3 if v == "on" else 1
                t0 = time.perf_counter()
                ms, toks, most = run(rows)
                times.setdefault((name, v), []).append(ms)
                tokens.setdefault((name, v), toks)
                buckets[(name, v)] = max(buckets.get((name, v), 0), most)
                assert tokens[(name, v)] == toks
                took = time.perf_counter() - t0
                print(f"repeat {rep} {name:5s} buckets {v:3s}: decode step {ms:7.1f} ms ({took:.1f}s)")
    print(f"\nload average {load0:.2f} -> {os.getloadavg()[0]:.2f}; torch threads {args.threads}")
    print("| shape | buckets | decode step ms, median | min - max | most decode groups a step |")
    print("|---|---|---|---|---|")
    out: dict = {}
    for (name, v), ts in times.items():
        b = buckets[(name, v)]
        print(f"| {name} | {v} | {statistics.median(ts):.1f} | {min(ts):.1f} - {max(ts):.1f} | {b} |")
        out[f"{name}_{v}_ms"] = round(statistics.median(ts), 2)
        out[f"{name}_{v}_groups"] = b
    for name in shapes:
        same = tokens[(name, "on")] == tokens[(name, "off")]
        print(f"{name}: greedy tokens identical with buckets on and off: {same}")
        out[f"{name}_identical"] = same
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
