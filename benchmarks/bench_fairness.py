"""One tenant's burst against everyone else's latency: fair admission vs first-come-first-served, side by side.

A heavy tenant queues `--heavy-requests` at once; right behind them `--light-tenants` other tenants send
`--light-requests` each. The running batch holds `--max-num-seqs` requests, fewer than the burst, so admission order
decides who waits. The same workload runs on an engine with `fair_scheduling` on and off (in one process, alternating,
best of `--repeats` by light-tenant TTFT p50); greedy outputs are compared (admission order must not change them).

    python benchmarks/bench_fairness.py --model smollm2 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_engine import PACKED, add_common_args, emit, random_kv, setup_run, sync  # noqa: E402
from benchmarks.common import fmt, loadavg, machine_info, markdown_table, ms, percentile  # noqa: E402
from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams  # noqa: E402

POLICIES = (("fcfs", False), ("fair", True))


def workload(args, vocab: int) -> tuple[list[Request], dict[PrefixKey, torch.Tensor], set[str]]:
    g = torch.Generator().manual_seed(11)
    tenants = ["heavy"] + [f"light{i}" for i in range(args.light_tenants)]
    keys = {t: PrefixKey(t, "bench", 1) for t in tenants}
    reqs = []
    plan = [("heavy", args.heavy_requests)] + [(t, args.light_requests) for t in tenants[1:]]
    for t, n in plan:
        for i in range(n):
            prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
            sp = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
            reqs.append(Request(f"{t}-{i}", prompt, sp, keys[t], cache_salt=t))
    return reqs, keys, set(tenants[1:])


def run(bundle, args, fair: bool, reqs, kvs) -> tuple[dict, dict[str, list[int]]]:
    cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        packed_weights=PACKED[args.packed_weights],
        fair_scheduling=fair,
    )
    eng = LLMEngine(bundle, DictPrefixProvider(kvs), cfg)
    # prefixes resident, engine warm: the measured run is admission order alone
    eng.generate([Request(f"warm-{k.tenant_id}", [1], SamplingParams(max_tokens=2), k) for k in kvs])
    gc.collect()
    t0 = time.perf_counter()
    outs = eng.generate(
        [
            Request(r.request_id, r.prompt_token_ids, r.sampling, r.prefix, cache_salt=r.cache_salt)
            for r in reqs
        ]
    )
    sync(bundle.device)
    wall = time.perf_counter() - t0
    eng.shutdown()
    if any(o.error for o in outs):
        raise RuntimeError(f"engine errors: {[o.error for o in outs if o.error][:3]}")

    def lat(which: str) -> dict:
        sel = [o for o in outs if o.request_id.startswith(which)]
        return {
            "ttft_p50": ms(percentile([o.ttft for o in sel], 50)),
            "ttft_p99": ms(percentile([o.ttft for o in sel], 99)),
            "e2e_p50": ms(percentile([o.e2e for o in sel], 50)),
        }

    res = {
        "tok_s": sum(len(o.token_ids) for o in outs) / wall,
        "wall_s": wall,
        "light": lat("light"),
        "heavy": lat("heavy"),
    }
    return res, {o.request_id: o.token_ids for o in outs}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--heavy-requests", type=int, default=32)
    ap.add_argument("--light-tenants", type=int, default=4)
    ap.add_argument("--light-requests", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--prefix-len", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    bundle, weights_kind, load_before = setup_run(args)
    vocab = min(bundle.spec.vocab_size, len(bundle.tokenizer))
    reqs, keys, _ = workload(args, vocab)
    kvs = {k: random_kv(bundle.spec, args.prefix_len, seed=i) for i, k in enumerate(keys.values())}
    best: dict[str, dict] = {}
    tokens: dict[str, dict[str, list[int]]] = {}
    for _ in range(args.repeats):
        for name, fair in POLICIES:
            r, toks = run(bundle, args, fair, reqs, kvs)
            if name not in best or r["light"]["ttft_p50"] < best[name]["light"]["ttft_p50"]:
                best[name] = r
            tokens[name] = toks
    same = tokens["fcfs"] == tokens["fair"]
    info = machine_info(str(bundle.device))
    fcfs, fair = best["fcfs"], best["fair"]
    speedup = fcfs["light"]["ttft_p50"] / fair["light"]["ttft_p50"]
    lines = [
        f"**Fairness test**: {bundle.name} ({weights_kind}) on {info.get('gpu') or info['cpu']} ({info['cores']} cores), "
        f"{str(bundle.dtype).removeprefix('torch.')}, torch {info['torch']}, {info['date']}",
        "",
        f"One tenant queues {args.heavy_requests} requests at once, then {args.light_tenants} other tenants "
        f"{args.light_requests} each; {args.max_num_seqs} running at most; prefix {args.prefix_len}, prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens, greedy; best of {args.repeats}. Load average before "
        f"{load_before}, after {loadavg()}.",
        "",
        f"Command: `python benchmarks/bench_fairness.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        markdown_table(
            [
                "admission",
                "out tok/s",
                "light TTFT p50 ms",
                "light TTFT p99 ms",
                "light e2e p50 ms",
                "heavy TTFT p50 ms",
                "heavy e2e p50 ms",
            ],
            [
                [
                    name,
                    fmt(r["tok_s"]),
                    fmt(r["light"]["ttft_p50"]),
                    fmt(r["light"]["ttft_p99"]),
                    fmt(r["light"]["e2e_p50"]),
                    fmt(r["heavy"]["ttft_p50"]),
                    fmt(r["heavy"]["e2e_p50"]),
                ]
                for name, r in best.items()
            ],
        ),
        "",
        f"Light tenants' TTFT p50: fcfs / fair = **{speedup:.2f}**; throughput fair / fcfs = "
        f"{fair['tok_s'] / fcfs['tok_s']:.2f}; greedy outputs identical: {same}.",
    ]
    report = "\n".join(lines)
    print(report)
    out = {
        "fcfs_light_ttft_p50_ms": round(fcfs["light"]["ttft_p50"], 1),
        "fair_light_ttft_p50_ms": round(fair["light"]["ttft_p50"], 1),
        "light_ttft_fcfs_over_fair": round(speedup, 3),
        "fcfs_tok_s": round(fcfs["tok_s"], 2),
        "fair_tok_s": round(fair["tok_s"], 2),
        "outputs_identical": same,
        "model": bundle.name,
        "machine": info,
    }
    emit(args, report, out)
    if not same:
        raise SystemExit("admission order changed the greedy outputs")
    return out


if __name__ == "__main__":
    main()
