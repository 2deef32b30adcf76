"""HTTP load generator against a running PrefixServe server (in the spirit of vLLM's benchmark_serving).

Closed loop by default: at each concurrency level C of the sweep, C workers keep one request in flight each until
`--requests` requests have completed; with `--request-rate R`, open loop: requests arrive as a Poisson process of
rate R (`--burstiness B`: gamma-distributed gaps, as vLLM), at most C in flight (vLLM's --request-rate with
--max-concurrency). As vLLM's get_request, the gaps are rescaled to sum to exactly N / R (the offered load is the
rate asked for), one schedule is drawn per run from `--seed` (every level of the sweep gets the same arrivals), and
each request is sent at its absolute target time. Requests cycle over tenants (mixed tenants in every batch).
Reports req/s, output tok/s (from the server's usage), TTFT p50/p99 (streaming: time to the first SSE chunk
carrying text), TPOT p50/p99 ((e2e - TTFT) / (tokens - 1)), ITL p50/p99 (between text chunks), e2e
p50/p99, errors by status and, with `--goodput ttft:MS,tpot:MS,e2e:MS`, the req/s of requests meeting every SLO. A
request counts as completed only whole: a 200 stream cut before `[DONE]`, a bad event, or fewer tokens than
max_tokens with ignore_eos is an error (status 200 or 0 in the table).

Prefixes: `--tenants N` uses tenants `bench-t0..N-1` with prefix `--prefix` (default `base`: the base model, no
prefix); `--model-list t0/p,t1/base,...` names them explicitly. `--seed-store file:///...` first writes a random
prefix `--prefix` for each of the N tenants into that store (needs torch and the server package; start the server
on the same store afterwards, or before: the server reads prefixes on demand).

Examples:
  prefixserve serve --port 8011 --store-url file:///tmp/ps-bench-store &
  python benchmarks/bench_http.py --base-url http://127.0.0.1:8011 --tenants 8 --concurrency 1,4,16 \
      --requests 32 --prompt-len 64 --max-tokens 32 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.common import fmt, loadavg, machine_info, markdown_table, ms, percentile  # noqa: E402

_WORDS_TEXT = (
    "the of and to in is was for on that with as by at from his her it an are were this be had not which "
    "have one you they their all but or more when there can has been if who no time will into only new "
    "some could these two may first then do any like my now over such our man me even most made after also "
    "did many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since against go "
    "came right used take three river city garden music paper window school table water market light story"
)
WORDS = _WORDS_TEXT.split()


@dataclass
class Result:
    ok: bool
    status: int
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def make_prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _payload(args, tenant: str, prefix: str, prompt: str) -> tuple[str, dict]:
    if args.endpoint == "completions":
        model = f"{tenant}/{prefix}"
        return "/v1/completions", {
            "model": model,
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "stream": args.stream,
            "ignore_eos": args.ignore_eos,
            **({"stream_options": {"include_usage": True}} if args.stream else {}),
        }
    return "/generate", {
        "tenant_id": tenant,
        "prefix": prefix,
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "stream": args.stream,
        "ignore_eos": args.ignore_eos,
    }


def _chunk_text(obj: dict) -> str:
    if "choices" in obj:  # OpenAI completion chunk
        return "".join((c.get("text") or "") for c in obj.get("choices") or [])
    return obj.get("text") or ""


def _check_counts(args, res: Result) -> Result:
    """A response that came back whole but with fewer tokens than it must have is a failure, not a success."""
    if res.completion_tokens <= 0:
        return Result(False, res.status, error="no usage / no completion tokens in the response")
    if args.ignore_eos and res.completion_tokens != args.max_tokens:
        return Result(
            False, res.status, error=f"{res.completion_tokens} tokens with ignore_eos, not {args.max_tokens}"
        )
    return res


async def one_request(client: httpx.AsyncClient, args, tenant: str, prefix: str, prompt: str) -> Result:
    """One request; anything but a whole response (an error status, a cut stream, a bad event, a short count) is a
    failed one (as vLLM's backend_request_func: success only with the stream's end)."""
    path, body = _payload(args, tenant, prefix, prompt)
    t0 = time.perf_counter()
    try:
        if not args.stream:
            r = await client.post(path, json=body)
            t1 = time.perf_counter()
            if r.status_code != 200:
                return Result(False, r.status_code, error=r.text[:200])
            usage = r.json().get("usage") or {}
            return _check_counts(
                args,
                Result(
                    True,
                    200,
                    e2e=t1 - t0,
                    prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0),
                ),
            )
        res = Result(True, 200)
        last = None
        done = False
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(False, r.status_code, error=r.text[:200])
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Result(False, 200, error=json.dumps(obj["error"])[:200])
                now = time.perf_counter()
                if _chunk_text(obj):
                    if res.ttft is None:
                        res.ttft = now - t0
                    elif last is not None:
                        res.itl.append(now - last)
                    last = now
                usage = obj.get("usage")
                if usage:
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
                    res.completion_tokens = usage.get("completion_tokens", 0)
        if not done:
            return Result(False, 200, error="the stream ended without [DONE]")
        res.e2e = time.perf_counter() - t0
        return _check_counts(args, res)
    except Exception as e:  # one broken request (bad JSON, a reset) is counted, not the end of the sweep
        return Result(False, 0, error=f"{type(e).__name__}: {e}"[:200])


def tpot(r: Result) -> float | None:
    """Time per output token after the first (vLLM's TPOT): (e2e - TTFT) / (tokens - 1)."""
    if r.ttft is None or r.e2e is None or r.completion_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (r.completion_tokens - 1)


def parse_goodput(spec: str) -> dict[str, float]:
    """`ttft:500,tpot:50,e2e:4000` (ms) -> {"ttft": 0.5, ...}: the SLOs a request must all meet to count as good.
    A bad spec raises argparse.ArgumentTypeError (parse_args turns it into a usage error before any request)."""
    slos: dict[str, float] = {}
    for item in (x for x in spec.split(",") if x.strip()):
        name, _, value = item.strip().partition(":")
        try:
            slo_ms = float(value)
        except ValueError:
            slo_ms = math.nan
        if name not in ("ttft", "tpot", "e2e") or not (0 <= slo_ms < math.inf):
            raise argparse.ArgumentTypeError(
                f"expected ttft:MS, tpot:MS and/or e2e:MS (a number of milliseconds >= 0, comma-separated), "
                f"got {item.strip()!r}"
            )
        slos[name] = slo_ms / 1000.0
    return slos


def _good(r: Result, slos: dict[str, float]) -> bool:
    # a request with at most one output token has no time per output token: vLLM's calculate_metrics "regard[s]
    # tpot as 0 for goodput" (else such requests could never be good under a tpot SLO)
    got = {"ttft": r.ttft, "tpot": 0.0 if r.completion_tokens <= 1 else tpot(r), "e2e": r.e2e}
    return all(got[k] is not None and got[k] <= v for k, v in slos.items())  # type: ignore[operator]


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the value of `--api-key` (or an abbreviation argparse accepts, or `--api-key=...`)
    replaced by `***`: reports are committed to benchmarks/results."""
    out: list[str] = []
    hide = False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
            continue
        name, eq, _ = a.partition("=")
        if len(name) >= 3 and "--api-key".startswith(name):
            out.append(f"{name}=***" if eq else a)
            hide = not eq
        else:
            out.append(a)
    return out


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """The send times (seconds from the start of a level) of `n` open-loop requests at `rate` req/s, as vLLM's
    get_request: gaps drawn from a gamma distribution of shape `burstiness` and scale 1 / (rate * burstiness)
    (burstiness 1: exponential gaps, a Poisson process; below 1 burstier, above 1 more regular; the mean gap is
    1 / rate either way), cumulated, then rescaled so that the last arrival is at exactly n / rate: the offered load
    is the rate asked for, not the draw's (a few % off at 32 requests). A function of the seed only: every level of
    a sweep gets the same schedule. An infinite rate sends all `n` at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    offsets: list[float] = []
    t = 0.0
    for _ in range(n):
        t += rng.gammavariate(burstiness, scale)  # shape 1: -log(1 - U) * scale, an exponential gap
        offsets.append(t)
    if t > 0:
        offsets = [x * (n / rate) / t for x in offsets]
    return offsets


async def run_level(args, targets: list[tuple[str, str]], concurrency: int, prompts: list[str]) -> dict:
    """`concurrency` requests in flight at most; closed loop (each finished request starts the next) or, with
    --request-rate R, open loop: request i is sent at `arrival_offsets(...)[i]` after the level's start (vLLM's
    --request-rate with --burstiness and --max-concurrency), whether or not the ones before it were answered."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # one client (one connection) per request in flight: a shared httpx pool of `concurrency` connections spent
    # seconds in its own connection scans at 64 (requests waited 0.7-4.4 s in the client before being sent),
    # which the latency percentiles then charged to the server
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    results: list[Result] = []
    rate = getattr(args, "request_rate", float("inf"))
    burstiness = getattr(args, "burstiness", 1.0)
    async with contextlib.AsyncExitStack() as stack:
        pool: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for _ in range(concurrency):
            pool.put_nowait(
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits, timeout=timeout)
                )
            )

        async def one(i: int) -> None:
            tenant, prefix = targets[i % len(targets)]
            client = await pool.get()  # (also the limit on requests in flight)
            try:
                results.append(await one_request(client, args, tenant, prefix, prompts[i % len(prompts)]))
            finally:
                pool.put_nowait(client)

        t0 = time.perf_counter()
        if math.isinf(rate):
            counter = iter(range(args.requests))

            async def worker() -> None:
                for i in counter:
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            # absolute target times, not a chain of sleeps (which adds each wake-up's lateness to every later
            # arrival), and nothing to wait for after the last one
            tasks = []
            for i, at in enumerate(arrival_offsets(args.requests, rate, burstiness, args.seed)):
                if (delay := t0 + at - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        dur = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    errors = Counter(r.status for r in results if not r.ok)
    first_err = next((r.error for r in results if not r.ok), "")
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    slos: dict[str, float] = getattr(args, "goodput", None) or {}
    return {
        "concurrency": concurrency,
        "request_rate": None if math.isinf(rate) else rate,
        "burstiness": None if math.isinf(rate) else burstiness,
        "requests": len(results),
        "completed": len(ok),
        "errors": dict(errors),
        "first_error": first_err,
        "duration_s": dur,
        "req_s": len(ok) / dur,
        "out_tok_s": out_tokens / dur,
        "goodput_req_s": (sum(_good(r, slos) for r in ok) / dur) if slos else None,
        "mean_prompt_tokens": (sum(r.prompt_tokens for r in ok) / len(ok)) if ok else None,
        "mean_completion_tokens": (out_tokens / len(ok)) if ok else None,
        "ttft_p50_ms": ms(percentile([r.ttft for r in ok if r.ttft is not None], 50)),
        "ttft_p99_ms": ms(percentile([r.ttft for r in ok if r.ttft is not None], 99)),
        "tpot_p50_ms": ms(percentile(tpots, 50)),
        "tpot_p99_ms": ms(percentile(tpots, 99)),
        "itl_p50_ms": ms(percentile([x for r in ok for x in r.itl], 50)),
        "itl_p99_ms": ms(percentile([x for r in ok for x in r.itl], 99)),
        "e2e_p50_ms": ms(percentile([r.e2e for r in ok], 50)),
        "e2e_p99_ms": ms(percentile([r.e2e for r in ok], 99)),
    }


def seed_store(args, tenants: list[str]) -> None:
    """Write a random prefix `args.prefix` for every tenant into `args.seed_store` (for the server's base model)."""
    import torch

    from prefix_store import open_store
    from server.model import load_model

    bundle = load_model(args.seed_model, device="cpu", dtype="float32")
    store = open_store(args.seed_store)
    spec = bundle.spec
    for i, t in enumerate(tenants):
        g = torch.Generator().manual_seed(i)
        kv = torch.randn(spec.kv_shape(args.seed_prefix_len), generator=g)
        store.put(
            t,
            args.prefix,
            "prefix_tuning",
            {"kv": kv},
            base_model_fingerprint=bundle.fingerprint,
            prefix_length=args.seed_prefix_len,
            extra={"prompt_format": "raw"},
        )
    store.close()
    print(
        f"seeded {len(tenants)} prefixes {args.prefix!r} (P={args.seed_prefix_len}) into {args.seed_store}",
        file=sys.stderr,
    )


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=os.environ.get("PREFIXSERVE_BASE_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--api-key", default=os.environ.get("PREFIXSERVE_API_KEY"))
    ap.add_argument(
        "--tenants", type=int, default=8, help="tenants bench-t0..N-1 (ignored with --model-list)"
    )
    ap.add_argument("--tenant-prefix", default="bench-t", help="tenant id stem for --tenants")
    ap.add_argument("--prefix", default="base", help="prefix name for --tenants ('base': the base model)")
    ap.add_argument(
        "--model-list", default="", help="comma list of tenant/prefix targets, cycled over requests"
    )
    ap.add_argument(
        "--concurrency", default="1,4,16", help="comma list: the sweep (requests in flight at most)"
    )
    ap.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests/s arriving as a Poisson process (open loop, capped by --concurrency); inf: closed loop",
    )
    ap.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="with --request-rate: gamma shape of the arrival gaps (1: Poisson; < 1 burstier, > 1 more regular)",
    )
    ap.add_argument(
        "--goodput",
        type=parse_goodput,
        default="",
        help="SLOs in ms, e.g. ttft:500,tpot:50,e2e:4000: also report the req/s of requests meeting all of them "
        "(ttft and tpot need --stream)",
    )
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt length in words (~tokens)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream", action="store_true", help="SSE streaming (needed for TTFT/ITL)")
    ap.add_argument("--endpoint", choices=["generate", "completions"], default="generate")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--warmup", type=int, default=2, help="requests before the sweep (not measured)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--seed-store", default="", help="first write random prefixes for the tenants into this store"
    )
    ap.add_argument("--seed-model", default="smollm2")
    ap.add_argument("--seed-prefix-len", type=int, default=32)
    ap.add_argument("--out", default="", help="also write the report (markdown + JSON) to this file")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the report's command line (redacted there)
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        ap.error(f"--concurrency: a comma list of integers >= 1, got {args.concurrency!r}")
    if not args.request_rate > 0:  # (also NaN)
        ap.error(f"--request-rate must be > 0 (inf, the default: closed loop), got {args.request_rate:g}")
    if not 0 < args.burstiness < math.inf:
        ap.error(f"--burstiness must be > 0 (1: Poisson arrivals), got {args.burstiness:g}")
    for opt, lo in (("requests", 1), ("tenants", 1), ("max_tokens", 1), ("warmup", 0)):
        if getattr(args, opt) < lo:
            ap.error(f"--{opt.replace('_', '-')} must be >= {lo}, got {getattr(args, opt)}")
    if args.model_list and not all(x.strip().partition("/")[0] for x in args.model_list.split(",")):
        ap.error(f"--model-list: a comma list of tenant/prefix targets, got {args.model_list!r}")
    if not args.stream and {"ttft", "tpot"} & set(args.goodput):
        ap.error(
            "--goodput with a ttft or tpot SLO needs --stream: TTFT and TPOT are only measured on streamed "
            "responses (without --stream every request would miss them: goodput 0)"
        )
    return args


def _arrivals(args) -> str:
    if math.isinf(args.request_rate):
        return "closed loop"
    kind = "Poisson" if args.burstiness == 1 else f"gamma (burstiness {args.burstiness:g})"
    return f"{kind} arrivals at {args.request_rate:g} req/s (rescaled to N / rate, seed {args.seed})"


async def amain(args) -> dict:
    if args.model_list:
        targets = []
        for item in args.model_list.split(","):
            t, _, p = item.strip().partition("/")
            targets.append((t, p or "default"))
    else:
        targets = [(f"{args.tenant_prefix}{i}", args.prefix) for i in range(args.tenants)]
    if args.seed_store:
        seed_store(args, sorted({t for t, _ in targets}))
    rng = random.Random(args.seed)
    n_prompts = max(args.requests, 1)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    load_before = loadavg()

    def fresh_prompts() -> list[str]:
        # new prompts for the warm-up and every level: none is served from the server's prompt cache
        return [make_prompt(rng, args.prompt_len) for _ in range(n_prompts)]

    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "requests": args.warmup})
        await run_level(warm, targets, min(args.warmup, len(targets)), fresh_prompts())
    rows = []
    for c in levels:
        r = await run_level(args, targets, c, fresh_prompts())
        rows.append(r)
        print(
            f"concurrency {c}: {r['req_s']:.2f} req/s, {r['out_tok_s']:.1f} tok/s, errors {r['errors']}",
            file=sys.stderr,
            flush=True,
        )
        if not r["completed"]:
            print(
                f"WARNING: concurrency {c}: all {r['requests']} requests failed; first error: {r['first_error']}",
                file=sys.stderr,
                flush=True,
            )
    load_after = loadavg()
    info = machine_info(libs=False)
    # reports are committed to benchmarks/results: the command line without the --api-key
    command = " ".join(redact_argv(getattr(args, "argv", sys.argv[1:])))
    lines = [
        f"HTTP benchmark against {args.base_url} ({args.endpoint}, {'streaming' if args.stream else 'non-streaming'}), "
        f"{len(targets)} targets ({', '.join(f'{t}/{p}' for t, p in targets[:4])}{', ...' if len(targets) > 4 else ''}), "
        f"{args.requests} requests per level, "
        f"{_arrivals(args)}, "
        f"prompt {args.prompt_len} words, max_tokens {args.max_tokens}"
        f"{' (ignore_eos)' if args.ignore_eos else ''}. Client on {info['cpu']} ({info['cores']} cores), "
        f"{info['date']}, load average before {load_before}, after {load_after}.",
        "",
        f"Command: `python benchmarks/bench_http.py {command}`",
        "",
        markdown_table(
            [
                "concurrency",
                "ok/total",
                "errors",
                "req/s",
                "out tok/s",
                "prompt tok",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "TPOT p50 ms",
                "TPOT p99 ms",
                "ITL p50 ms",
                "ITL p99 ms",
                "e2e p50 ms",
                "e2e p99 ms",
                "goodput req/s",
            ],
            [
                [
                    r["concurrency"],
                    f"{r['completed']}/{r['requests']}",
                    ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0",
                    fmt(r["req_s"], 2),
                    fmt(r["out_tok_s"]),
                    fmt(r["mean_prompt_tokens"], 0),
                    fmt(r["ttft_p50_ms"]),
                    fmt(r["ttft_p99_ms"]),
                    fmt(r["tpot_p50_ms"]),
                    fmt(r["tpot_p99_ms"]),
                    fmt(r["itl_p50_ms"]),
                    fmt(r["itl_p99_ms"]),
                    fmt(r["e2e_p50_ms"]),
                    fmt(r["e2e_p99_ms"]),
                    fmt(r["goodput_req_s"], 2),
                ]
                for r in rows
            ],
        ),
    ]
    errs = [f"- concurrency {r['concurrency']}: {r['first_error']}" for r in rows if r["first_error"]]
    if errs:
        lines += ["", "First error per level:", *errs]
    report = "\n".join(lines)
    print(report)
    out = {
        "levels": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "base_url": args.base_url,
        "stream": args.stream,
        "endpoint": args.endpoint,
        "machine": {**info, "loadavg_before": load_before, "loadavg_after": load_after},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n\n```json\n" + json.dumps(out) + "\n```\n")
    print(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> None:
    out = asyncio.run(amain(parse_args(argv)))
    if not any(level["completed"] for level in out["levels"]):
        # as vLLM's calculate_metrics: a run with no completed request measured nothing (a wrong URL, key, tenant or
        # max_tokens); its 0 req/s rows must not pass for a result
        first = next((level["first_error"] for level in out["levels"] if level["first_error"]), "")
        raise SystemExit(
            f"All requests failed: nothing was measured (check --base-url, --api-key, the targets and the server's "
            f"log). First error: {first}"
        )


if __name__ == "__main__":
    main()
