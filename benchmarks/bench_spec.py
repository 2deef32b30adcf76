"""Speculative decoding by prompt lookup: the engine with and without n-gram drafts, side by side in one process.

Two chat workloads on the same model, greedy: "copy" asks to repeat a passage word for word (the output is in the
prompt, what prompt lookup is for: edits, extraction, quoting, RAG answers) and "free" asks open questions (little of
the answer is in the prompt: the cost of drafts that fail). Each at batch 1 and at `--batch` requests of different
tenants. Reports output tok/s, inter-token latency, draft acceptance, and checks that the greedy tokens are identical
with and without drafts.

    python benchmarks/bench_spec.py --model smollm2 --threads 2
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
from server.model import render_prompt  # noqa: E402

SENTENCES = [
    "The prefix store keeps every trained prefix on disk or in Redis.",
    "Each record holds the tensors, the base model fingerprint and a checksum of the bytes.",
    "A request names its tenant and prefix, and the batcher runs many tenants in one forward pass.",
    "Blocks of the key and value cache are shared by every request of the same tenant.",
    "When the pool runs dry, idle prefixes are evicted first and the newest request is preempted.",
    "Training jobs fit new prefixes against the frozen model in the background.",
    "The scheduler admits waiting requests while the token budget and free blocks allow.",
    "Streaming responses end with a done event, and errors carry a type, a code and the parameter.",
]
QUESTIONS = [
    "Why is the sky blue?",
    "Give three tips for learning a new language.",
    "What makes a good cup of coffee?",
    "Explain what a hash table is.",
    "Describe a walk in a forest in autumn.",
    "What are the benefits of regular exercise?",
    "How do airplanes stay in the air?",
    "Write a short note thanking a colleague.",
]


def prompts(tok, kind: str, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        if kind == "copy":
            passage = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(4))
            text = f"Repeat this text exactly, word for word:\n\n{passage}"
        else:
            text = QUESTIONS[i % len(QUESTIONS)]
        out.append(render_prompt(tok, text, "chat"))
    return out


def run(bundle, args, k: int, reqs: list[Request], kvs) -> tuple[dict, list[list[int]]]:
    cfg = EngineConfig(
        max_num_seqs=max(len(reqs), 1),
        kv_cache_bytes=256 * 2**20,
        packed_weights=PACKED[args.packed_weights],
        speculative_tokens=k,
        spec_ngram=(args.ngram_min, args.ngram_max),
    )
    eng = LLMEngine(bundle, DictPrefixProvider(kvs), cfg)
    eng.generate([Request(f"warm-{key}", [1, 2], SamplingParams(max_tokens=2), key) for key in [*kvs, None]])
    gc.collect()
    t0 = time.perf_counter()
    outs = eng.generate(reqs)
    sync(bundle.device)
    wall = time.perf_counter() - t0
    sched = eng.scheduler
    eng.shutdown()
    if any(o.error for o in outs):
        raise RuntimeError(f"engine errors: {[o.error for o in outs if o.error][:3]}")
    ntok = sum(len(o.token_ids) for o in outs)
    itl = [x for o in outs for x in o.itl]
    return {
        "tok_s": ntok / wall,
        "tokens": ntok,
        "itl_p50": ms(percentile(itl, 50)),
        "tpot": 1000
        * wall
        / max(ntok / len(outs), 1),  # ms per output token of one request (batch in parallel)
        "drafted": sched.spec_draft_tokens,
        "accepted": sched.spec_accepted_tokens,
    }, [o.token_ids for o in outs]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        help="each request its own tenant's random prefix of this length; 0 (default): the base model, since a random "
        "prefix makes the model's output noise that repeats nothing (a trained prefix would not)",
    )
    ap.add_argument("--k", default="4", help="draft lengths to compare with 0 (off), comma separated")
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--ngram-max", type=int, default=4)
    args = ap.parse_args(argv)
    bundle, weights_kind, load_before = setup_run(args)
    ks = [0] + [int(x) for x in args.k.split(",") if int(x) > 0]
    keys: list[PrefixKey | None] = [None] * args.batch
    kvs: dict[PrefixKey, torch.Tensor] = {}
    if args.prefix_len:
        keys = [PrefixKey(f"t{i}", "bench", 1) for i in range(args.batch)]
        kvs = {key: random_kv(bundle.spec, args.prefix_len, seed=i) for i, key in enumerate(keys)}
    rows = []
    out: dict = {"model": bundle.name}
    all_same = True
    for kind in ("copy", "free"):
        for batch in sorted({1, args.batch}):
            ps = prompts(bundle.tokenizer, kind, batch)
            reqs = [
                Request(
                    f"{kind}-{i}", p, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), keys[i]
                )
                for i, p in enumerate(ps)
            ]
            best: dict[int, dict] = {}
            toks: dict[int, list[list[int]]] = {}
            for _ in range(args.repeats):
                for k in ks:
                    r, t = run(bundle, args, k, reqs, kvs)
                    if k not in best or r["tok_s"] > best[k]["tok_s"]:
                        best[k] = r
                    toks[k] = t
            same = all(toks[k] == toks[0] for k in ks)
            all_same &= same
            for k in ks:
                r = best[k]
                acc = f"{r['accepted']} / {r['drafted']}" if k else "-"
                speed = r["tok_s"] / best[0]["tok_s"]
                rows.append([kind, batch, k or "off", fmt(r["tok_s"]), fmt(r["itl_p50"]), fmt(r["tpot"]), acc,
                             f"{speed:.2f}", same])  # fmt: skip
                out[f"{kind}_b{batch}_k{k}_tok_s"] = round(r["tok_s"], 2)
    info = machine_info(str(bundle.device))
    lines = [
        f"**Speculative decoding (prompt lookup)**: {bundle.name} ({weights_kind}) on {info.get('gpu') or info['cpu']} "
        f"({info['cores']} cores), {str(bundle.dtype).removeprefix('torch.')}, torch {info['torch']}, {info['date']}",
        "",
        f"Chat prompts, greedy, {args.new_tokens} new tokens, "
        + (
            f"each request its own tenant's random prefix (P={args.prefix_len}); "
            if args.prefix_len
            else "base model; "
        )
        + f"n-grams {args.ngram_min}..{args.ngram_max}; best of {args.repeats}. Load average before {load_before}, "
        f"after {loadavg()}.",
        "",
        f"Command: `python benchmarks/bench_spec.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        markdown_table(
            [
                "workload",
                "batch",
                "draft k",
                "out tok/s",
                "ITL p50 ms",
                "ms / token / request",
                "accepted / drafted",
                "vs off",
                "tokens identical",
            ],
            rows,
        ),
    ]
    report = "\n".join(lines)
    print(report)
    out.update({"outputs_identical": all_same, "machine": info})
    emit(args, report, out)
    if not all_same:
        raise SystemExit("speculative decoding changed the greedy outputs")
    return out


if __name__ == "__main__":
    main()
