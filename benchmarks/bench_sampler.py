"""Time of the sampler's step for sampled rows (temperature / top-p / top-k), the work a decode step adds to the
model's forward when requests sample (OpenAI's routes do by default).

    python benchmarks/bench_sampler.py [--vocab 49152] [--threads 1] [--device cpu]

Logits are random and peaked (N(0, 1) x 6), as a language model's are; every row has its own seeded generator, as
the engine's requests do. Prints one line per (batch, sampling) with the best of --repeats calls.
"""

from __future__ import annotations

import argparse
import time

import torch

from server.engine.sampler import make_generator, sample_on_device
from server.engine.types import SamplingParams

CASES = {
    "temperature 1": {"temperature": 1.0},
    "temperature 0.8, top_p 0.9": {"temperature": 0.8, "top_p": 0.9},
    "temperature 0.7, top_k 50": {"temperature": 0.7, "top_k": 50},
    "greedy": {"temperature": 0.0},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"| batch | sampling | ms per step |  (vocab {args.vocab}, {args.threads} thread(s), {dev})")
    print("|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        logits = torch.randn(batch, args.vocab, generator=torch.Generator().manual_seed(0)).to(dev) * 6
        for name, kw in CASES.items():
            params = [SamplingParams(max_tokens=4, **kw)] * batch
            gens = [make_generator(i, dev) for i in range(batch)]
            sample_on_device(logits, params, gens)
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                sample_on_device(logits, params, gens).tolist()  # (the host read a step makes)
                best = min(best, time.perf_counter() - t0)
            print(f"| {batch} | {name} | {best * 1e3:.2f} |")


if __name__ == "__main__":
    main()
