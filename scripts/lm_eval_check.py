"""Check that lm-evaluation-harness's `local-completions` model works against a running PrefixServe.

Runs lm-eval's own client (loglikelihood through echo + logprobs + max_tokens 0 on token-id prompts, and
generate_until) against `--base-url`, and compares every loglikelihood with a plain transformers forward of the
same model (the base model: use `--model TENANT/base`). Needs lm-eval and transformers in the running Python:

    python -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 && \\
        /tmp/lmeval/bin/pip install -c constraints.txt "lm-eval[api]" transformers
    make serve &   # or prefixserve serve
    /tmp/lmeval/bin/python scripts/lm_eval_check.py --tokenizer ~/.cache/prefixserve/models/smollm2-135m-instruct

With `--prefix TENANT/NAME` it also scores held-out prompts' `--target` continuation against `--alternative` under
that prefix and under the tenant's base model (e.g. a prefix trained to answer " ZEBRA").
"""

from __future__ import annotations

import argparse
import json
import sys

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin"),
    ("Two plus two equals", " four"),
    ("Water freezes at zero degrees", " Celsius"),
]


def reference(model_dir: str) -> list[tuple[float, bool]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ctx, cont in PAIRS:  # lm-eval's split: tokens of ctx + cont after those of ctx
        whole, head = tok(ctx + cont)["input_ids"], tok(ctx)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        rows = [(len(head) - 1 + j, t) for j, t in enumerate(whole[len(head) :])]
        out.append((sum(float(lp[r, t]) for r, t in rows), all(int(lp[r].argmax()) == t for r, t in rows)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1/completions")
    ap.add_argument("--model", default="acme/base", help="tenant/prefix (base: comparable with transformers)")
    ap.add_argument("--tokenizer", required=True, help="the served model's HF folder (tokenizer and weights)")
    ap.add_argument("--prefix", help="TENANT/NAME of a trained prefix to compare with TENANT/base")
    ap.add_argument("--target", default=" ZEBRA")
    ap.add_argument("--alternative", default=" LION")
    args = ap.parse_args()

    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    def client(model: str) -> LocalCompletionsAPI:
        return LocalCompletionsAPI(
            base_url=args.base_url,
            model=model,
            tokenizer_backend="huggingface",
            tokenizer=args.tokenizer,
            num_concurrent=4,
            max_retries=1,
        )

    lm = client(args.model)
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)])
    gen = lm.generate_until(
        [
            Instance(
                "generate_until", {}, ("The capital of France is", {"until": ["."], "max_gen_toks": 16}), 0
            )
        ]
    )
    ok = True
    if args.model.endswith("/base"):
        for (ctx, cont), (lp, greedy), (ref_lp, ref_greedy) in zip(
            PAIRS, got, reference(args.tokenizer), strict=True
        ):
            same = abs(lp - ref_lp) < 1e-3 and greedy == ref_greedy
            ok &= same
            print(f"{ctx!r} + {cont!r}: server {lp:.5f} ({greedy}), transformers {ref_lp:.5f} ({ref_greedy})")
    print(json.dumps({"loglikelihood": got, "generate_until": gen, "agrees_with_transformers": ok}))
    if args.prefix:
        tenant = args.prefix.split("/")[0]
        prompts = [f"Question {i}: name something." for i in range(100, 110)]
        prompts += ["Tell me a word.", "What animal is striped?"]
        report = {}
        for model in (f"{tenant}/base", args.prefix):
            pairs = [(p, c) for p in prompts for c in (args.target, args.alternative)]
            res = client(model).loglikelihood(
                [Instance("loglikelihood", {}, pc, i) for i, pc in enumerate(pairs)]
            )
            target = [res[2 * i] for i in range(len(prompts))]
            report[model] = {
                "prompts": len(prompts),
                "target_preferred": sum(t[0] > res[2 * i + 1][0] for i, t in enumerate(target)),
                "target_greedy": sum(bool(t[1]) for t in target),
                "mean_loglikelihood_target": round(sum(t[0] for t in target) / len(target), 3),
            }
        print(json.dumps({"prefix_check": report}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
