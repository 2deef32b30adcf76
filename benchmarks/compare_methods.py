"""Prefix-tuning vs prefix-propagation vs prompt tuning: same data, same budget, on the real base model.

Task (generated, hidden rule): a short sentence mentions one object; the answer is one of four arbitrary label words
by the object's category (animal -> north, food -> south, vehicle -> east, tool -> west). The held-out sentences use
objects never seen in training, so the prefix has to carry the rule, not memorize objects. Every method trains with
its own default learning rate (server/training/config.py) for the same epochs, batch size, prefix length and seed.

Reported per method: trainable parameters (prefix-tuning counts its MLP; only the KV is served), served KV floats,
final training loss (mean of the last epoch), held-out loss, held-out accuracy (argmax over the four label tokens at
the answer's first position), expected calibration error (10 equal-width bins over the top label probability,
renormalized over the four labels), the probability mass the model puts on the labels at all, and wall time.

    .venv/bin/python benchmarks/compare_methods.py                  # SmolLM2-135M-Instruct on CPU
    .venv/bin/python benchmarks/compare_methods.py --epochs 10 --train 64 --test 64 --prefix-length 16

Prints a markdown table and one JSON line (``{"benchmark": "compare_methods", ...}``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, markdown_table

LABELS = {"animal": "north", "food": "south", "vehicle": "east", "tool": "west"}
OBJECTS = {
    "animal": ["dog", "cat", "horse", "rabbit", "tiger", "eagle", "whale", "frog", "sheep", "monkey", "lion", "duck"],
    "food": ["bread", "apple", "cheese", "pasta", "soup", "banana", "rice", "cookie", "carrot", "pizza", "salad",
             "cake"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "motorcycle", "airplane", "tractor", "scooter",
                "van", "taxi"],
    "tool": ["hammer", "wrench", "screwdriver", "saw", "drill", "shovel", "pliers", "chisel", "ladder", "axe",
             "rake", "crowbar"],
}  # fmt: skip
TEMPLATES = [
    "I saw the {x} yesterday.",
    "There is the {x} in the picture.",
    "My neighbor talked about the {x}.",
    "The {x} was next to the door.",
    "We found the {x} behind the house.",
    "Everyone was looking at the {x}.",
    "The {x} appeared in my dream last night.",
    "Tell me something about the {x}.",
]
INSTRUCTION = "Classify: "


def make_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Balanced examples; training and held-out objects are disjoint (8 / 4 objects per category)."""
    rng = random.Random(seed)
    train_pool, test_pool = [], []
    for cat, objs in OBJECTS.items():
        objs = objs[:]
        rng.shuffle(objs)
        for pool, chosen in ((train_pool, objs[:8]), (test_pool, objs[8:])):
            for x in chosen:
                for t in TEMPLATES:
                    pool.append(
                        {"prompt": INSTRUCTION + t.format(x=x), "completion": LABELS[cat], "cat": cat}
                    )

    def pick(pool: list[dict], n: int) -> list[dict]:
        by_cat: dict[str, list[dict]] = {c: [e for e in pool if e["cat"] == c] for c in LABELS}
        for v in by_cat.values():
            rng.shuffle(v)
        out = [by_cat[c][i] for i in range(n // len(LABELS) + 1) for c in LABELS][:n]
        rng.shuffle(out)
        return out

    return pick(train_pool, n_train), pick(test_pool, n_test)


def label_ids(tokenizer) -> list[int]:
    ids = []
    for w in LABELS.values():
        t = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(t) != 1:
            raise SystemExit(f"label {w!r} is not one token for this tokenizer: {t}")
        ids.append(t[0])
    return ids


def expected_calibration_error(conf: list[float], correct: list[bool], bins: int = 10) -> float:
    n = len(conf)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if not idx:
            continue
        acc = sum(correct[i] for i in idx) / len(idx)
        avg = sum(conf[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(acc - avg)
    return ece


def evaluate(bundle, kv, examples: list[dict], fmt: str, batch: int = 16) -> dict[str, float]:
    """Label probabilities at the answer's first position with the prefix kv as past_key_values."""
    import torch

    from server.model import render_prompt
    from server.prefixes import kv_to_past_key_values

    tok = bundle.tokenizer
    lids = label_ids(tok)
    gold = [lids[list(LABELS).index(e["cat"])] for e in examples]
    conf, correct, mass, nll = [], [], [], []
    m = bundle.hf_model
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        seqs = [render_prompt(tok, e["prompt"], fmt) for e in chunk]
        t = max(len(s) for s in seqs)
        b = len(seqs)
        ids = torch.zeros(b, t, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding so every row's last token is at the end
            ids[r, t - len(s) :] = torch.tensor(s)
            mask[r, t - len(s) :] = 1
        p = 0 if kv is None else kv.shape[3]
        pos = (mask.cumsum(-1) - 1).clamp_min(0) + p
        with torch.no_grad():
            out = m(
                input_ids=ids,
                attention_mask=torch.cat([torch.ones(b, p, dtype=torch.long), mask], dim=1),
                position_ids=pos,
                past_key_values=None if kv is None else kv_to_past_key_values(kv, batch=b),
            )
        probs = out.logits[:, -1].float().softmax(-1)
        for r in range(b):
            lp = probs[r, lids]
            mass.append(float(lp.sum()))
            q = lp / lp.sum()
            k = int(q.argmax())
            conf.append(float(q[k]))
            correct.append(lids[k] == gold[i + r])
            nll.append(-float(torch.log(probs[r, gold[i + r]].clamp_min(1e-30))))
    return {
        "accuracy": sum(correct) / len(correct),
        "ece": expected_calibration_error(conf, correct),
        "label_mass": sum(mass) / len(mass),
        "heldout_nll_first_token": sum(nll) / len(nll),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default="prefix_tuning,prefix_propagation,prompt_tuning")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--prefix-length", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for training and evaluation"
    )
    ap.add_argument(
        "--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's default lr"
    )
    args = ap.parse_args(argv)

    import torch

    from server.model import load_model
    from server.training import default_hyperparameters, train_prefix

    torch.set_num_threads(args.threads)
    bundle = load_model(args.model, device="cpu", dtype="float32")
    train, test = make_task(args.train, args.test, args.seed)
    fmt = "chat" if getattr(bundle.tokenizer, "chat_template", None) else "raw"
    label_ids(bundle.tokenizer)
    lrs = dict(x.split("=", 1) for x in args.lr)
    sp = bundle.spec
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    base = evaluate(bundle, None, test, fmt)
    results.append({"method": "base model (no prefix)", "trainable_parameters": 0, "served_kv_floats": 0,
                    "final_loss": None, "heldout_loss": None, "train_s": 0.0, **base})  # fmt: skip
    print(f"base model: {base} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    for method in args.methods.split(","):
        lr = float(lrs.get(method, default_hyperparameters(method).learning_rate))
        hp = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "learning_rate": lr,
              "eval_fraction": 0.0, "prompt_format": fmt}  # fmt: skip
        t = time.perf_counter()
        res = train_prefix(
            bundle, method, [{"prompt": e["prompt"], "completion": e["completion"]} for e in train],
            args.prefix_length, hp, num_threads=args.threads,
            progress_cb=lambda s, n, loss, ep, m=method: print(f"  {m} step {s}/{n} loss {loss:.4f}",
                                                               file=sys.stderr, flush=True) if s % 8 == 0 else None,
        )  # fmt: skip
        train_s = time.perf_counter() - t
        ev = evaluate(bundle, res.tensors["kv"], test, fmt)
        s = res.summary
        row = {
            "method": method,
            "learning_rate": lr,
            "trainable_parameters": s["trainable_parameters"],
            "served_kv_floats": sp.num_layers * 2 * sp.num_kv_heads * args.prefix_length * sp.head_dim,
            "final_loss": s["final_loss"],
            "steps": s["steps"],
            "train_s": round(train_s, 1),
            **ev,
        }
        results.append(row)
        print(f"{method}: {row}", file=sys.stderr, flush=True)

    headers = ["method", "trainable params", "served KV floats", "final train loss", "held-out acc",
               "held-out ECE", "label mass", "held-out NLL", "train time (s)"]  # fmt: skip
    rows = []
    for r in results:
        rows.append([
            r["method"], f"{r['trainable_parameters']:,}", f"{r['served_kv_floats']:,}",
            "–" if r["final_loss"] is None else f"{r['final_loss']:.3f}", f"{r['accuracy']:.3f}", f"{r['ece']:.3f}",
            f"{r['label_mass']:.3f}", f"{r['heldout_nll_first_token']:.3f}", f"{r['train_s']:.1f}",
        ])  # fmt: skip
    print(
        f"\n{args.train} training / {args.test} held-out examples (held-out objects unseen in training), "
        f"P={args.prefix_length}, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}, "
        f"{args.threads} torch thread(s), model {bundle.name}\n"
    )
    print(markdown_table(headers, rows))
    out = {
        "benchmark": "compare_methods",
        "model": bundle.name,
        "config": vars(args),
        "machine": machine_info(),
        "results": results,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
