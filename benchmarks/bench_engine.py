"""Engine benchmark: our continuous-batching engine against transformers, in one process and one run.

Systems (shared/README.md §5, issue 6), all on identical random prompts, greedy, exactly `--new-tokens` each:
  a  naive: per request, sequentially, transformers `generate` with that tenant's prefix as `past_key_values`
  b  transformers batched `generate`, prefixes left-padded to the longest P (attention-mask zeros)
  c  our engine, every request the same tenant
  d  our engine, every request a different tenant (tenant = request index mod --tenants)
  e  CUDA only: transformers `generate(cache_implementation="static")` (auto-compiled), one tenant, no prefix

All requests arrive at the start of a system's run: TTFT and e2e are measured from that moment (queueing
included, so sequential systems show their queueing), ITL between consecutive tokens of one request.

`--cache-test`: 1,000 tenants, a prefix cache that holds ~100 prefixes, Zipf-like tenant draws; reports hit rate,
evictions and throughput against the same stream with every prefix resident.

Examples:
  .venv/bin/python benchmarks/bench_engine.py --model smollm2 --tenants 8 --requests 8 --prompt-len 64 \
      --new-tokens 32 --prefix-len 32 --dtype float32
  .venv/bin/python benchmarks/bench_engine.py --model smollm2-135m-config --tenants 16 --requests 16
  .venv/bin/python benchmarks/bench_engine.py --model smollm2 --cache-test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList  # noqa: E402

from benchmarks.common import (  # noqa: E402
    PeakMemory,
    fmt,
    loadavg,
    machine_info,
    markdown_table,
    mib,
    ms,
    percentile,
    rss_bytes,
)
from server.engine import (  # noqa: E402
    DictPrefixProvider,
    EngineConfig,
    LLMEngine,
    PrefixKey,
    Request,
    SamplingParams,
    StepStats,
    StructuredOutputs,
)

SYSTEM_NAMES = {
    "a": "a naive HF generate + prefix (sequential)",
    "b": "b HF batched generate, padded prefixes",
    "c": "c engine, one tenant",
    "d": "d engine, every request its own tenant",
    "e": "e HF static cache, compiled (no prefix)",
}
JSON_KEYS = {
    "a": "naive_tok_s",
    "b": "hf_batched_tok_s",
    "c": "engine_single_tok_s",
    "d": "engine_mixed_tok_s",
    "e": "hf_static_tok_s",
}


# ---------------------------------------------------------------------------- model
PACKED = {"auto": None, "on": True, "off": False}


def random_config(name: str, vocab: int):
    """Configs for random-weight runs. `vocab`: the (SmolLM2) tokenizer's size, used where the shape allows."""
    from transformers import GPT2Config, LlamaConfig

    if name == "gpt2":
        # GPT-2 124M shape; vocabulary resized to the SmolLM2 tokenizer we reuse (49,152 vs 50,257).
        return GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    if name == "smollm2-135m-config":
        return LlamaConfig(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            bos_token_id=1,
            eos_token_id=2,
        )
    if name == "llama-1b-config":  # Llama-3.2-1B shape
        return LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            bos_token_id=128000,
            eos_token_id=128001,
        )
    raise ValueError(f"unknown model config {name!r}")


def build_bundle(model: str, device: str, dtype: str, tokenizer: str = ""):
    """`tokenizer`: a folder with SmolLM2's tokenizer files for random-weight configs (default: the converted
    embedded model; on a machine without it, e.g. the GPU image, carry those few files instead)."""
    from server.model import bundle_from_model, ensure_embedded_converted, load_model, resolve_dtype

    if model == "smollm2" or Path(model).expanduser().is_dir():
        return load_model(model, device=device, dtype=dtype), "real weights"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer or ensure_embedded_converted())
    cfg = random_config(model, len(tok))
    torch.manual_seed(0)
    dev = torch.device(device)
    dt = resolve_dtype(dtype, dev)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    hf = hf.to(device=dev, dtype=dt)
    return bundle_from_model(hf, tok, name=model, fingerprint=f"random-{model}"), "random weights"


def weight_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        key = p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, reps: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted), best of `reps`."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def held_bytes(device: torch.device) -> int:
    """Memory the process holds now: CUDA allocated bytes, or CPU resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return rss_bytes() or 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- workload
def random_kv(spec, prefix_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.kv_shape(prefix_len), generator=g)


@dataclass
class Work:
    prompts: list[list[int]]
    tenant_of: list[int]  # request -> tenant (system d, a, b)
    kvs: list[torch.Tensor]  # tenant -> kv [L,2,K,P,D] float32 (CPU)


def make_work(spec, vocab: int, tenants: int, requests: int, prefix_lens: list[int], prompt_len: int) -> Work:
    g = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(requests)]
    kvs = [random_kv(spec, prefix_lens[t % len(prefix_lens)], seed=t) for t in range(tenants)]
    return Work(prompts, [i % tenants for i in range(requests)], kvs)


# ---------------------------------------------------------------------------- results
@dataclass
class SysResult:
    key: str
    tokens: list[list[int]]
    ttft: list[float]
    itl: list[float]
    e2e: list[float]
    wall: float
    mem: PeakMemory
    batch: int = 1
    step_ms: float | None = None  # median pure-decode step at full batch (engine)
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tok_s(self) -> float:
        return self.n_tokens / self.wall


class _Stamp(LogitsProcessor):
    """Records the time at which each generation step's logits are ready (one token per row follows)."""

    def __init__(self, device: torch.device) -> None:
        self.times: list[float] = []
        self.device = device

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def _hf_gen_kwargs(model, new_tokens: int) -> dict:
    # eos_token_id=None: generate exactly new_tokens and never mask EOS, matching the engine's ignore_eos greedy
    # tokens (min_new_tokens alone would set the EOS logit to -inf and change the argmax where EOS wins).
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = 0
    return dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def _cache_from(kv_rows: list[torch.Tensor], pmax: int, device, dtype) -> tuple[DynamicCache, list[int]]:
    """DynamicCache holding each row's prefix right-aligned in `pmax` slots (left padding); returns P per row."""
    n_layers, _, k, _, d = kv_rows[0].shape
    cache = DynamicCache()
    for layer in range(n_layers):
        keys = torch.zeros(len(kv_rows), k, pmax, d, dtype=dtype, device=device)
        vals = torch.zeros_like(keys)
        for i, kv in enumerate(kv_rows):
            p = kv.shape[3]
            keys[i, :, pmax - p :] = kv[layer, 0].to(device=device, dtype=dtype)
            vals[i, :, pmax - p :] = kv[layer, 1].to(device=device, dtype=dtype)
        cache.update(keys, vals, layer)
    return cache, [kv.shape[3] for kv in kv_rows]


@torch.inference_mode()
def run_naive(bundle, work: Work, new_tokens: int) -> SysResult:
    model, dev, dt = bundle.hf_model, bundle.device, bundle.dtype
    kw = _hf_gen_kwargs(model, new_tokens)
    toks, ttft, itl, e2e = [], [], [], []
    with PeakMemory(str(dev)) as mem:
        t0 = time.perf_counter()
        for prompt, tenant in zip(work.prompts, work.tenant_of, strict=True):
            kv = work.kvs[tenant]
            cache, _ = _cache_from([kv], kv.shape[3], dev, dt)
            stamp = _Stamp(dev)
            ids = torch.tensor([prompt], device=dev)
            mask = torch.ones(1, kv.shape[3] + len(prompt), dtype=torch.long, device=dev)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                logits_processor=LogitsProcessorList([stamp]),
                **kw,
            )
            toks.append(out[0, len(prompt) :].tolist())
            ttft.append(stamp.times[0] - t0)
            e2e.append(stamp.times[-1] - t0)
            itl.extend(b - a for a, b in zip(stamp.times, stamp.times[1:], strict=False))
        wall = time.perf_counter() - t0
    return SysResult("a", toks, ttft, itl, e2e, wall, mem, batch=1)


@torch.inference_mode()
def run_hf_batched(bundle, work: Work, new_tokens: int) -> SysResult:
    model, dev, dt = bundle.hf_model, bundle.device, bundle.dtype
    kw = _hf_gen_kwargs(model, new_tokens)
    with PeakMemory(str(dev)) as mem:
        t0 = time.perf_counter()
        rows = [work.kvs[t] for t in work.tenant_of]
        pmax = max(kv.shape[3] for kv in rows)
        cache, plens = _cache_from(rows, pmax, dev, dt)
        tlen = len(work.prompts[0])
        assert all(len(p) == tlen for p in work.prompts), "batched HF path assumes equal prompt lengths"
        ids = torch.tensor(work.prompts, device=dev)
        mask = torch.ones(len(rows), pmax + tlen, dtype=torch.long, device=dev)
        for i, p in enumerate(plens):
            mask[i, : pmax - p] = 0
        stamp = _Stamp(dev)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            logits_processor=LogitsProcessorList([stamp]),
            **kw,
        )
        wall = time.perf_counter() - t0
    toks = [out[i, tlen:].tolist() for i in range(len(rows))]
    n = len(rows)
    steps = [b - a for a, b in zip(stamp.times, stamp.times[1:], strict=False)]
    return SysResult(
        "b",
        toks,
        [stamp.times[0] - t0] * n,
        steps * n,
        [stamp.times[-1] - t0] * n,
        wall,
        mem,
        batch=n,
        step_ms=ms(percentile(steps, 50)),
    )


@torch.inference_mode()
def run_hf_static(bundle, work: Work, new_tokens: int, warmups: int = 2) -> SysResult:
    """CUDA: transformers' strongest path, static cache (generate auto-compiles the forward), no prefix."""
    model, dev = bundle.hf_model, bundle.device
    kw = _hf_gen_kwargs(model, new_tokens)
    ids = torch.tensor(work.prompts, device=dev)
    mask = torch.ones_like(ids)
    t_compile = time.perf_counter()
    for _ in range(warmups):  # first calls compile (and capture CUDA graphs)
        model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kw)
    t_compile = time.perf_counter() - t_compile
    with PeakMemory(str(dev)) as mem:
        stamp = _Stamp(dev)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            cache_implementation="static",
            logits_processor=LogitsProcessorList([stamp]),
            **kw,
        )
        sync(dev)
        wall = time.perf_counter() - t0
    tlen = ids.shape[1]
    n = ids.shape[0]
    toks = [out[i, tlen:].tolist() for i in range(n)]
    steps = [b - a for a, b in zip(stamp.times, stamp.times[1:], strict=False)]
    return SysResult(
        "e",
        toks,
        [stamp.times[0] - t0] * n,
        steps * n,
        [stamp.times[-1] - t0] * n,
        wall,
        mem,
        batch=n,
        step_ms=ms(percentile(steps, 50)),
        note=f"warm-up/compile {t_compile:.1f}s",
    )


class EngineHarness:
    """One LLMEngine over every tenant's prefix (all resident after warm-up), step durations recorded."""

    def __init__(self, bundle, work: Work, args) -> None:
        self.keys = [PrefixKey(f"t{t}", "bench", 1) for t in range(len(work.kvs))]
        provider = DictPrefixProvider(dict(zip(self.keys, work.kvs, strict=True)))
        sp = bundle.spec
        from server.engine.kv_cache import KVPool

        bs = args.block_size
        bb = KVPool.bytes_per_block(sp.num_layers, sp.num_kv_heads, sp.head_dim, bs, bundle.dtype)
        per_req = -(-(len(work.prompts[0]) + args.new_tokens) // bs) + 1
        prefix_blocks = sum(-(-kv.shape[3] // bs) for kv in work.kvs)
        n_req = min(args.max_num_seqs, len(work.prompts))
        blocks = int((n_req * per_req + prefix_blocks) * 1.25) + 16
        blocks = max(blocks, 4 * per_req)
        self.cfg = EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=bs,
            kv_cache_bytes=blocks * bb,
            prefix_cache_bytes=(prefix_blocks + 1) * bb,
            packed_weights=PACKED[args.packed_weights],
            prompt_cache=args.prompt_cache,
            kernels=args.kernels,
            async_decode=args.async_decode,
        )
        self.steps: list[StepStats] = []
        self.total_steps = 0  # over every run (`steps` holds the current run's)
        self.device = bundle.device
        before = held_bytes(self.device)
        self.engine = LLMEngine(bundle, provider, self.cfg, on_step=self._on_step)
        self.n = 0
        self.warmup(sorted(set(work.tenant_of) | {0}), len(work.prompts[0]))
        # what the engine holds between its runs (KV pool, packed weights, graphs), allocated before any timed run:
        # every system's process peak includes it, the engine's own peak delta does not
        self.held = max(held_bytes(self.device) - before, 0)

    def _on_step(self, st: StepStats) -> None:
        self.steps.append(st)
        self.total_steps += 1

    def warmup(self, tenants: list[int], prompt_len: int, max_tokens: int = 8) -> None:
        """One request per entry of `tenants` (the tenant of each): makes the prefixes resident (device cache hits
        afterwards) and warms the kernels at the timed batch's shape, enough tokens that the whole batch decodes
        together (and, on CUDA, async follow-up steps run and the decode graphs are captured), not only prompt
        steps; `max_tokens` as the timed run's, so that every context-length bucket it reaches (the torch
        kernels' graphs are captured per key-slot bucket) is captured before it."""
        reqs = [
            Request(
                f"warm{self.n}-{i}",
                [1] * prompt_len,
                SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                self.keys[t],
            )
            for i, t in enumerate(tenants)
        ]
        self.n += 1
        self.engine.generate(reqs)

    def _clear(self) -> None:
        """Abort whatever a failed run left in the engine (requests, a step in flight)."""
        eng = self.engine
        for rid in list(eng._seqs):
            eng.abort(rid)
        for _ in range(4):
            if not eng.has_unfinished():
                return
            try:
                eng.step()
            except Exception:
                traceback.print_exc()

    def run(
        self,
        key: str,
        work: Work,
        tenant_of: list[int],
        new_tokens: int,
        structured: StructuredOutputs | None = None,
    ) -> SysResult:
        reqs = [
            Request(
                f"{key}{self.n}-{i}",
                list(p),
                SamplingParams(max_tokens=new_tokens, ignore_eos=True, structured=structured),
                self.keys[tenant_of[i]],
            )
            for i, p in enumerate(work.prompts)
        ]
        self.n += 1
        self.steps.clear()
        gc.collect()
        with PeakMemory(str(self.device)) as mem:
            t0 = time.perf_counter()
            try:
                outs = self.engine.generate(reqs)
            except Exception:
                self._clear()  # the other engine system (c or d) shares this engine
                raise
            sync(self.device)
            wall = time.perf_counter() - t0
        errs = [o.error for o in outs if o.error]
        if errs:
            raise RuntimeError(f"engine errors: {errs[:3]}")
        full = max((s.num_decode_tokens for s in self.steps if s.num_prefill_tokens == 0), default=0)
        dec = [s.duration_s for s in self.steps if s.num_prefill_tokens == 0 and s.num_decode_tokens == full]
        pre = [s.duration_s for s in self.steps if s.num_prefill_tokens > 0]
        itl = [x for o in outs for x in o.itl]
        return SysResult(
            key,
            [o.token_ids for o in outs],
            [o.ttft for o in outs],
            itl,
            [o.e2e for o in outs],
            wall,
            mem,
            batch=full,
            step_ms=ms(percentile(dec, 50)),
            extra={
                "steps": len(self.steps),
                "prefill_steps": len(pre),
                # steps that ran prompt tokens (with or without decode rows): a synchronous step's whole time, or
                # for one chained by async decode the host's period between steps
                "prefill_step_ms": ms(percentile(pre, 50)),
                "distinct_prefixes_max": max((s.distinct_prefixes for s in self.steps), default=0),
            },
        )


# ---------------------------------------------------------------------------- report
def result_rows(results: dict[str, SysResult]) -> list[list]:
    rows = []
    for k, r in results.items():
        rows.append(
            [
                SYSTEM_NAMES[k],
                r.batch,
                fmt(r.tok_s),
                fmt(ms(percentile(r.ttft, 50))),
                fmt(ms(percentile(r.ttft, 99))),
                fmt(ms(percentile(r.itl, 50))),
                fmt(ms(percentile(r.itl, 99))),
                fmt(ms(percentile(r.e2e, 50))),
                fmt(r.wall, 2),
                fmt(r.step_ms),
                mib(r.mem.peak),
                mib(r.mem.delta),
            ]
        )
    return rows


HEADERS = [
    "system",
    "batch",
    "out tok/s",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "ITL p50 ms",
    "ITL p99 ms",
    "e2e p50 ms",
    "wall s",
    "decode step ms",
    "peak MiB",
    "peak Δ MiB",
]


def compare_tokens(ref: SysResult, other: SysResult, rows: int | list[int]) -> list[str]:
    """The rows (the first `rows`, or those listed) whose greedy tokens differ between the two systems."""
    bad = []
    for i in range(rows) if isinstance(rows, int) else rows:
        a, b = ref.tokens[i], other.tokens[i]
        if a != b:
            j = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            bad.append(
                f"request {i}: first difference at token {j}: {ref.key}={a[j : j + 4]} {other.key}={b[j : j + 4]}"
            )
    return bad


def parse_prefix_lens(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x]


def main_bench(args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    load_before = loadavg()
    bundle, weights_kind = build_bundle(args.model, args.device, args.dtype, args.tokenizer)
    dev = bundle.device
    spec = bundle.spec
    vocab = min(spec.vocab_size, len(bundle.tokenizer))
    prefix_lens = parse_prefix_lens(args.prefix_len)
    work = make_work(spec, vocab, args.tenants, args.requests, prefix_lens, args.prompt_len)
    wbytes = weight_bytes(bundle.hf_model)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if "e" in systems and dev.type != "cuda":
        print("note: system e (static-cache compiled generate) runs on CUDA only; skipped", file=sys.stderr)
        systems.remove("e")
    bw = copy_bandwidth(dev)
    print(
        f"# {bundle.name} ({weights_kind}) on {dev} {str(bundle.dtype).removeprefix('torch.')}: "
        f"{args.tenants} tenants, {args.requests} requests, prefix {args.prefix_len}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens; load avg before {load_before}",
        file=sys.stderr,
    )
    # Warm-up every system once, so no system pays first-call costs inside its timing.
    small = Work(work.prompts[:2], work.tenant_of[:2], work.kvs)
    harness = None
    # a system that fails is reported as failed and the others still run (a device run is too short to repeat)
    failed: dict[str, str] = {}
    if "c" in systems or "d" in systems:
        try:
            harness = EngineHarness(bundle, work, args)
            # then each engine system's own batch once, untimed (its shapes, graphs and prefix mix)
            for s, tenants in (("c", [0] * len(work.prompts)), ("d", work.tenant_of)):
                if s in systems:
                    harness.warmup(tenants, args.prompt_len, args.new_tokens)
        except Exception as e:
            traceback.print_exc()
            failed.update(
                {k: f"engine start-up: {type(e).__name__}: {e}"[:500] for k in "cd" if k in systems}
            )
    for s, warm in (
        ("a", lambda: run_naive(bundle, Work(small.prompts[:1], small.tenant_of[:1], work.kvs), 2)),
        ("b", lambda: run_hf_batched(bundle, work, 2)),  # the timed batch's shape, 2 tokens
    ):
        if s in systems:
            try:
                warm()
            except Exception as e:
                traceback.print_exc()
                failed[s] = f"warm-up: {type(e).__name__}: {e}"[:500]

    # Systems interleaved (a b c d, b c d a, ...) --repeats times; each system's best run is reported, so a burst
    # of load from other processes on a shared machine hits one repeat, not one system.
    runs: dict[str, list[SysResult]] = {s: [] for s in systems}
    n_naive = min(args.naive_requests or len(work.prompts), len(work.prompts))
    naive_work = Work(work.prompts[:n_naive], work.tenant_of[:n_naive], work.kvs)
    for rep in range(args.repeats):
        # each repeat starts with another system: none always runs first (or always right after another)
        for s in systems[rep % len(systems) :] + systems[: rep % len(systems)]:
            if s in failed:
                continue
            print(f"[{rep + 1}/{args.repeats}] running {SYSTEM_NAMES[s]} ...", file=sys.stderr, flush=True)
            gc.collect()
            try:
                if s == "a":
                    r = run_naive(bundle, naive_work, args.new_tokens)
                elif s == "b":
                    r = run_hf_batched(bundle, work, args.new_tokens)
                elif s == "c":
                    r = harness.run("c", work, [0] * len(work.prompts), args.new_tokens)
                elif s == "d":
                    r = harness.run("d", work, work.tenant_of, args.new_tokens)
                else:
                    r = run_hf_static(bundle, work, args.new_tokens)
            except Exception as e:
                traceback.print_exc()
                failed[s] = f"{type(e).__name__}: {e}"[:500]
                continue
            runs[s].append(r)
            print(
                f"  {r.tok_s:,.1f} tok/s, wall {r.wall:.2f}s, load {loadavg()}", file=sys.stderr, flush=True
            )
    # a system that failed in any repeat is reported as failed only (no tok/s, no ratio)
    runs = {s: rs for s, rs in runs.items() if s not in failed}
    results: dict[str, SysResult] = {s: max(rs, key=lambda r: r.tok_s) for s, rs in runs.items()}
    load_after = loadavg()
    engine_packed = harness is not None and harness.engine.runner.packed
    engine_kernels = harness.engine.runner.kernels if harness is not None else None
    engine_async = harness.engine.async_decode if harness is not None else None
    # what the engine's fast path really did (a fallback shows here, not only in the numbers)
    graphs = harness.engine.runner.graphs if harness is not None else None
    engine_paths = (
        None
        if harness is None
        else {
            "graph_mode": harness.engine.runner.graph_mode,
            "graphs_captured": graphs.num_captured if graphs is not None else 0,
            "graph_steps": graphs.num_replays if graphs is not None else 0,
            "async_steps": harness.engine.num_async_steps,
            "steps": harness.total_steps,
        }
    )

    # ---------------------------------------------------------------- report
    n = len(work.prompts)
    for r in results.values():
        bad_len = [i for i, t in enumerate(r.tokens) if len(t) != args.new_tokens]
        if bad_len:
            print(
                f"WARNING: system {r.key} produced wrong token counts for requests {bad_len[:8]}",
                file=sys.stderr,
            )
    mismatches: dict[str, list[str]] = {}
    compared: dict[str, int] = {}
    if "a" in results and "d" in results:
        compared["a_vs_d"] = len(results["a"].tokens)
        mismatches["a_vs_d"] = compare_tokens(results["a"], results["d"], compared["a_vs_d"])
    if "a" in results and "b" in results:
        compared["a_vs_b"] = len(results["a"].tokens)
        mismatches["a_vs_b"] = compare_tokens(results["a"], results["b"], compared["a_vs_b"])
    if (
        "c" in results and "d" in results
    ):  # c serves every request with tenant 0's prefix: d's rows of tenant 0
        rows0 = [i for i, t in enumerate(work.tenant_of) if t == 0]
        compared["d_vs_c"] = len(rows0)
        mismatches["d_vs_c"] = compare_tokens(results["d"], results["c"], rows0)
    ratios = {}
    tps = {k: r.tok_s for k, r in results.items()}
    for other in ("c", "a", "b", "e"):
        if "d" in tps and other in tps:
            ratios[f"d/{other}"] = round(tps["d"] / tps[other], 3)
    floor_ms = wbytes / bw * 1000

    info = machine_info(str(dev))
    cmd = "python benchmarks/bench_engine.py " + " ".join(sys.argv[1:])
    lines = []
    lines.append(
        f"**{bundle.name}** ({weights_kind}, {spec.num_layers} layers, {wbytes / 1e6:,.0f} MB of weights) on "
        f"{info.get('gpu') or info['cpu']} ({info['cores']} cores), {str(bundle.dtype).removeprefix('torch.')}, "
        f"torch {info['torch']}, transformers {info.get('transformers')}, {info['date']}"
    )
    lines.append("")
    lines.append(
        f"Workload: {args.tenants} tenants, {args.requests} requests, prefix {args.prefix_len}, prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens (greedy, ignore EOS), max_num_seqs {args.max_num_seqs}, "
        f"engine linears {'oneDNN prepacked' if engine_packed else 'F.linear'}, kernels {engine_kernels}, async decode {engine_async}. Load average before {load_before}, after {load_after}."
    )
    if engine_paths is not None:
        lines.append("")
        lines.append(
            "Engine steps (all of its runs, warm-ups included): "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in engine_paths.items())
            + "."
        )
    lines.append("")
    lines.append(
        f"Command: `{cmd}` (code {info.get('commit') or 'unknown: not a git checkout'}"
        + (f", {info['memory_gib']} GiB)" if info.get("memory_gib") else ")")
    )
    lines.append("")
    lines.append(markdown_table(HEADERS, result_rows(results)))
    lines.append("")
    if harness is not None:
        lines.append(
            f"Memory: `peak MiB` is the process's peak during a system's run (model weights included, and for every "
            f"system the {harness.held / 2**20:,.0f} MiB the engine holds from its start: its KV pool ("
            f"{harness.cfg.kv_cache_bytes / 2**20:,.0f} MiB configured), packed weights, graphs); `peak Δ` "
            "is what the run itself added. The engine's own footprint is its peak Δ plus what it holds."
            + (
                ""
                if str(dev).startswith("cuda")
                else " On a CPU the systems share one process whose allocator keeps what earlier runs freed, so a "
                "run's Δ is only what it added beyond that (it depends on the order): these columns do not rank the "
                "systems' memory; a GPU's allocator peaks do."
            )
        )
        lines.append("")
    for k, r in results.items():
        if r.note:
            lines.append(f"System {k}: {r.note} (not timed).")
            lines.append("")
    for k, why in failed.items():
        lines.append(f"**System {k} failed**: {why}")
        lines.append("")
    if "a" in results and n_naive < n:
        lines.append(
            f"System a ran the first {n_naive} of the {n} requests (sequential, so its tok/s and ITL do not depend "
            "on how many; its TTFT/e2e cover only those)."
        )
        lines.append("")
    if args.repeats > 1:
        lines.append(
            f"Best of {args.repeats} interleaved repeats per system; every repeat's tok/s: "
            + "; ".join(f"{k}: " + ", ".join(f"{r.tok_s:,.1f}" for r in rs) for k, rs in runs.items())
        )
        lines.append("")
    lines.append("Ratios (output tok/s): " + ", ".join(f"{k} = **{v:.2f}**" for k, v in ratios.items()))
    lines.append("")
    dstep = results["d"].step_ms if "d" in results else None
    lines.append(
        f"Decode step vs memory-bandwidth floor: weights {wbytes / 1e6:,.1f} MB / measured copy bandwidth "
        f"{bw / 1e9:,.1f} GB/s = floor **{floor_ms:.3f} ms**/step; engine (d) decode step at batch "
        f"{results['d'].batch if 'd' in results else '-'}: **{fmt(dstep, 2)} ms** "
        f"({(dstep / floor_ms) if dstep else float('nan'):.1f}x the floor)"
        + (f"; engine (c): {fmt(results['c'].step_ms, 2)} ms" if "c" in results else "")
    )
    lines.append("")
    for k in ("c", "d"):
        if k in results and "prefill_steps" in results[k].extra:
            x = results[k].extra
            lines.append(
                f"Engine ({k}) steps: {x['steps']}, of which {x['prefill_steps']} ran prompt tokens "
                f"(median {fmt(x['prefill_step_ms'], 2)} ms each)."
            )
    lines.append("")
    for name, bad in mismatches.items():
        of = f" (of {n})" if compared[name] < n else ""
        if bad:
            lines.append(
                f"Correctness {name}: **{len(bad)}/{compared[name]} requests compared differ**{of} (greedy tokens)"
            )
            lines.extend(f"- {b}" for b in bad[:16])
        else:
            lines.append(
                f"Correctness {name}: all {compared[name]} requests compared{of} produce identical greedy tokens."
            )
    if any(mismatches.values()) and bundle.dtype == torch.float32:
        lines.append("")
        lines.append(
            "**In float32 the systems give the same greedy tokens (near-ties aside): they do not here, so these "
            "ratios may compare different work; find out why before trusting them.**"
        )
    report = "\n".join(lines)
    print(report)
    out = {JSON_KEYS[k]: round(r.tok_s, 2) for k, r in results.items()}
    out.update(
        {
            "repeats_tok_s": {k: [round(r.tok_s, 2) for r in rs] for k, rs in runs.items()},
            "failed": failed,
            "ratios": ratios,
            "step_ms": {k: (round(r.step_ms, 3) if r.step_ms else None) for k, r in results.items()},
            "prefill_step_ms": {
                k: round(r.extra["prefill_step_ms"], 3)
                for k, r in results.items()
                if r.extra.get("prefill_step_ms") is not None
            },
            "floor_ms": round(floor_ms, 4),
            "copy_bw_gbs": round(bw / 1e9, 2),
            "weight_bytes": wbytes,
            "peak_mib": {k: round(r.mem.peak / 2**20, 1) if r.mem.peak else None for k, r in results.items()},
            "mismatches": {k: len(v) for k, v in mismatches.items()},
            "compared": compared,
            "engine_held_mib": round(harness.held / 2**20, 1) if harness is not None else None,
            "notes": {k: r.note for k, r in results.items() if r.note},
            "model": bundle.name,
            "weights": weights_kind,
            "device": str(dev),
            "dtype": str(bundle.dtype).removeprefix("torch."),
            "tenants": args.tenants,
            "requests": args.requests,
            "prefix_len": args.prefix_len,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "engine_packed_weights": engine_packed,
            "engine_kernels": engine_kernels,
            "engine_async_decode": engine_async,
            "engine_paths": engine_paths,
            "engine_prompt_cache": args.prompt_cache,
            "machine": {**info, "loadavg_before": load_before, "loadavg_after": load_after},
        }
    )
    if args.profile and harness is not None and "d" in results:
        try:
            profile_engine(harness, work, args)
        except Exception:
            traceback.print_exc()
    emit(args, report, out)
    return out


# ---------------------------------------------------------------------------- profiling
def profile_engine(harness: EngineHarness, work: Work, args) -> None:
    """Where a mixed-tenant decode step spends its time: torch.profiler op table and a Python-side split."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    eng = harness.engine
    reqs = [
        Request(
            f"prof{harness.n}-{i}",
            list(p),
            SamplingParams(max_tokens=args.new_tokens, ignore_eos=True),
            harness.keys[work.tenant_of[i]],
        )
        for i, p in enumerate(work.prompts)
    ]
    harness.n += 1
    for r in reqs:
        eng.add_request(r)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if harness.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if harness.device.type == "cuda" else "self_cpu_time_total"
    # the steps that run the prompts (chunks of max_num_batched_tokens, decode rows joining from the second)
    with profile(activities=acts) as prof:
        n_pre = 0
        while n_pre < 64 and (
            eng.scheduler.waiting or any(s.num_cached < len(s.prompt) for s in eng.scheduler.running)
        ):
            eng.step()
            n_pre += 1
    print(f"\n### torch.profiler: the {n_pre} steps that run the {len(reqs)} prompts\n")
    print("```")
    print(prof.key_averages().table(sort_by=sort, row_limit=18))
    print("```")
    eng.step()
    n_steps = min(10, args.new_tokens - 3)
    with profile(activities=acts) as prof:
        for _ in range(n_steps):
            eng.step()
    print(f"\n### torch.profiler: {n_steps} decode steps, batch {len(reqs)}, every row its own tenant\n")
    print("```")
    print(prof.key_averages().table(sort_by=sort, row_limit=18))
    print("```")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(min(8, max(args.new_tokens - 3 - n_steps, 1))):
        if not eng.has_unfinished():
            break
        eng.step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(22)
    print("\n### cProfile (cumulative), same engine, following decode steps\n\n```")
    print(s.getvalue())
    print("```")
    while eng.has_unfinished():
        eng.step()


# ---------------------------------------------------------------------------- cache test
class SlowProvider:
    """A store stand-in: builds the tenant's kv on demand (deterministic), optionally sleeping to mimic I/O."""

    def __init__(self, spec, prefix_len: int, latency_s: float) -> None:
        self.spec = spec
        self.prefix_len = prefix_len
        self.latency_s = latency_s
        self.fetches = 0

    def fetch(self, key: PrefixKey) -> torch.Tensor:
        self.fetches += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        return random_kv(self.spec, self.prefix_len, seed=int(key.tenant_id[1:]))


def zipf_draws(n_tenants: int, n: int, s: float, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    w = 1.0 / torch.arange(1, n_tenants + 1, dtype=torch.float64) ** s
    return torch.multinomial(w / w.sum(), n, replacement=True, generator=g).tolist()


def lru_state(draws: list[int], cap: int) -> list[int]:
    """The keys an LRU cache of `cap` entries holds after `draws` (oldest first)."""
    held: dict[int, None] = {}
    for k in draws:
        held.pop(k, None)
        held[k] = None
        if len(held) > cap:
            del held[next(iter(held))]
    return list(held)


def belady_hits(draws: list[int], cap: int, initial: list[int]) -> int:
    """Hits of Belady's offline optimum (evict the entry used furthest in the future) from `initial`."""
    nxt: list[int] = [0] * len(draws)
    last: dict[int, int] = {}
    for i in range(len(draws) - 1, -1, -1):
        nxt[i] = last.get(draws[i], len(draws))
        last[draws[i]] = i
    upcoming = {k: last.get(k, len(draws)) for k in initial}  # next use of each held key
    hits = 0
    for i, k in enumerate(draws):
        if k in upcoming:
            hits += 1
        elif len(upcoming) >= cap:
            del upcoming[max(upcoming, key=upcoming.__getitem__)]
        upcoming[k] = nxt[i]
    return hits


def main_cache_test(args) -> dict:
    from server.engine.kv_cache import KVPool

    torch.set_num_threads(args.threads or torch.get_num_threads())
    load_before = loadavg()
    bundle, weights_kind = build_bundle(args.model, args.device, args.dtype, args.tokenizer)
    sp = bundle.spec
    p = parse_prefix_lens(args.prefix_len)[0]
    bs = args.block_size
    bb = KVPool.bytes_per_block(sp.num_layers, sp.num_kv_heads, sp.head_dim, bs, bundle.dtype)
    pre_blocks = -(-p // bs)
    per_req = -(-(args.prompt_len + args.new_tokens) // bs) + 1
    n_ten, cap, n_req = args.cache_tenants, args.cache_capacity, args.cache_requests
    vocab = min(sp.vocab_size, len(bundle.tokenizer))
    stream = zipf_draws(n_ten, n_req, args.zipf_s, seed=7)
    warm_stream = zipf_draws(n_ten, n_req, args.zipf_s, seed=8)
    g = torch.Generator().manual_seed(99)
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(n_req)]
    distinct = sorted(set(stream))

    def make(budget_prefixes: int) -> tuple[LLMEngine, SlowProvider]:
        prov = SlowProvider(sp, p, args.fetch_latency_ms / 1000)
        budget = budget_prefixes * pre_blocks * bb
        # pool: the prefix budget + running requests' own blocks + the prefixes they pin, with headroom
        blocks = budget_prefixes * pre_blocks + args.max_num_seqs * (per_req + pre_blocks) + 64
        cfg = EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            block_size=bs,
            kv_cache_bytes=blocks * bb,
            prefix_cache_bytes=budget,
            packed_weights=PACKED[args.packed_weights],
            prompt_cache=args.prompt_cache,
            kernels=args.kernels,
            async_decode=args.async_decode,
        )
        return LLMEngine(bundle, prov, cfg), prov

    def reqs(tag: str, tenants: list[int], prompt_len: int | None, max_tokens: int) -> list[Request]:
        return [
            Request(
                f"{tag}-{i}",
                prompts[i][:prompt_len] if prompt_len else list(prompts[i]),
                SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                PrefixKey(f"t{t}", "bench", 1),
            )
            for i, t in enumerate(tenants)
        ]

    results = {}
    for label, budget, warm in (
        ("bounded cache (LFU, aged)", cap, warm_stream),
        ("bounded cache, LRU", cap, warm_stream),
        ("all resident", len(distinct) + 1, distinct),
    ):
        eng, prov = make(budget)
        eng.prefix_cache.policy = "lru" if "LRU" in label else "lfu"
        # fill the cache: the bounded cache with a different Zipf stream (steady state), the resident one with
        # every tenant the measured stream will use
        eng.generate(reqs(f"warm-{label}", warm, 1, 1))
        st0 = (eng.prefix_cache.stats.hits, eng.prefix_cache.stats.misses, eng.prefix_cache.stats.evictions)
        f0 = prov.fetches
        gc.collect()
        t0 = time.perf_counter()
        outs = eng.generate(reqs(f"run-{label}", stream, None, args.new_tokens))
        wall = time.perf_counter() - t0
        st = eng.prefix_cache.stats
        hits, misses, ev = st.hits - st0[0], st.misses - st0[1], st.evictions - st0[2]
        errs = [o.error for o in outs if o.error]
        if errs:
            raise RuntimeError(f"engine errors: {errs[:3]}")
        ntok = sum(len(o.token_ids) for o in outs)
        results[label] = dict(
            tok_s=ntok / wall,
            wall=wall,
            hits=hits,
            misses=misses,
            hit_rate=hits / max(hits + misses, 1),
            evictions=ev,
            fetches=prov.fetches - f0,
            resident=len(eng.prefix_cache.entries),
            budget_mib=budget * pre_blocks * bb / 2**20,
            ttft_p50=ms(percentile([o.ttft for o in outs], 50)),
            ttft_p99=ms(percentile([o.ttft for o in outs], 99)),
            itl_p50=ms(percentile([x for o in outs for x in o.itl], 50)),
            itl_p99=ms(percentile([x for o in outs for x in o.itl], 99)),
        )
        eng.shutdown()
        del eng
        gc.collect()
    load_after = loadavg()
    info = machine_info(str(bundle.device))
    bounded = results["bounded cache (LFU, aged)"]
    ratio = bounded["tok_s"] / results["all resident"]["tok_s"]
    # the best any policy could do on these draws from the same warm state: Belady's offline optimum
    best = belady_hits(stream, cap, lru_state(warm_stream, cap)) / n_req
    lines = [
        f"**Prefix cache test**: {bundle.name} ({weights_kind}) on {info.get('gpu') or info['cpu']} "
        f"({info['cores']} cores), {str(bundle.dtype).removeprefix('torch.')}, torch {info['torch']}, {info['date']}",
        "",
        f"{n_ten} tenants (prefix {p}, {pre_blocks * bb / 2**20:.2f} MiB each in the pool), cache budget {cap} "
        f"prefixes, {n_req} requests with Zipf(s={args.zipf_s}) tenant draws ({len(distinct)} distinct tenants), "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, max_num_seqs {args.max_num_seqs}, store fetch "
        f"latency {args.fetch_latency_ms} ms + kv build. Load average before {load_before}, after {load_after}.",
        "",
        f"Command: `python benchmarks/bench_engine.py {' '.join(sys.argv[1:])}`",
        "",
        markdown_table(
            [
                "cache",
                "budget MiB",
                "hit rate",
                "hits",
                "misses",
                "evictions",
                "store fetches",
                "out tok/s",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "ITL p50 ms",
                "ITL p99 ms",
            ],
            [
                [
                    k,
                    fmt(r["budget_mib"]),
                    f"{r['hit_rate']:.1%}",
                    r["hits"],
                    r["misses"],
                    r["evictions"],
                    r["fetches"],
                    fmt(r["tok_s"]),
                    fmt(r["ttft_p50"]),
                    fmt(r["ttft_p99"]),
                    fmt(r["itl_p50"]),
                    fmt(r["itl_p99"]),
                ]
                for k, r in results.items()
            ],
        ),
        "",
        f"Throughput bounded (LFU) cache / all resident = **{ratio:.2f}**; hit rate LFU "
        f"{bounded['hit_rate']:.1%} vs LRU {results['bounded cache, LRU']['hit_rate']:.1%}; Belady's offline "
        f"optimum for this request order {best:.1%} (no policy can do better).",
    ]
    report = "\n".join(lines)
    print(report)
    out = {
        "cache_hit_rate": round(bounded["hit_rate"], 4),
        "lru_hit_rate": round(results["bounded cache, LRU"]["hit_rate"], 4),
        "optimal_hit_rate": round(best, 4),
        "cache_evictions": bounded["evictions"],
        "cache_tok_s": round(bounded["tok_s"], 2),
        "lru_tok_s": round(results["bounded cache, LRU"]["tok_s"], 2),
        "resident_tok_s": round(results["all resident"]["tok_s"], 2),
        "cache_vs_resident": round(ratio, 3),
        "model": bundle.name,
        "machine": {**info, "loadavg_before": load_before, "loadavg_after": load_after},
    }
    emit(args, report, out)
    return out


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The model, device and run flags every engine benchmark script takes (bench_fairness.py, bench_spec.py)."""
    ap.add_argument(
        "--model", default="smollm2", help="smollm2 | a local HF folder | a config name (random weights)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--packed-weights", choices=list(PACKED), default="auto")
    ap.add_argument("--out", default="", help="also write the report (markdown + JSON) to this file")


def setup_run(args) -> tuple[object, str, list[float]]:
    """Resolve `--dtype auto`, stay offline, set the threads, note the load and build the model: (bundle, weights
    kind, load average before)."""
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = loadavg()
    bundle, weights_kind = build_bundle(args.model, args.device, args.dtype, args.tokenizer)
    return bundle, weights_kind, load_before


def emit(args, report: str, out: dict) -> None:
    """The JSON line on stdout (last), and with --out the markdown report and the JSON in one file."""
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n\n```json\n" + json.dumps(out) + "\n```\n")
    print(json.dumps(out))


def main_prompt_cache_test(args) -> dict:
    """Tenants with their own prefix and their own system prompt; every request = its tenant's system prompt + a
    unique question. The same workload on an engine without and with the prompt cache (system prompts cached by one
    earlier request per tenant, the steady state of a server), greedy outputs compared."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    load_before = loadavg()
    bundle, weights_kind = build_bundle(args.model, args.device, args.dtype, args.tokenizer)
    sp = bundle.spec
    p = parse_prefix_lens(args.prefix_len)[0]
    vocab = min(sp.vocab_size, len(bundle.tokenizer))
    g = torch.Generator().manual_seed(5)
    systems = [
        torch.randint(0, vocab, (args.system_prompt_len,), generator=g).tolist() for _ in range(args.tenants)
    ]
    questions = [
        torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)
    ]
    keys = [PrefixKey(f"t{t}", "bench", 1) for t in range(args.tenants)]
    kvs = {k: random_kv(sp, p, seed=t) for t, k in enumerate(keys)}

    def reqs(tag: str, sys_only: bool = False) -> list[Request]:
        if sys_only:  # one earlier request per tenant with its system prompt (caches it)
            return [
                Request(
                    f"{tag}-{t}", systems[t] + [1], SamplingParams(max_tokens=1, ignore_eos=True), keys[t]
                )
                for t in range(args.tenants)
            ]
        return [
            Request(
                f"{tag}-{i}",
                systems[i % args.tenants] + questions[i],
                SamplingParams(max_tokens=args.new_tokens, ignore_eos=True),
                keys[i % args.tenants],
            )
            for i in range(args.requests)
        ]

    results: dict[str, dict] = {}
    tokens: dict[str, list[list[int]]] = {}
    for rep in range(args.repeats):
        for label, on in (("prompt cache off", False), ("prompt cache on", True)):
            cfg = EngineConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size,
                kv_cache_bytes=args.kv_cache_mb * 2**20,
                packed_weights=PACKED[args.packed_weights],
                prompt_cache=on,
            )
            eng = LLMEngine(bundle, DictPrefixProvider(kvs), cfg)
            if args.cold:  # prefixes resident, system prompts not: the burst itself computes them
                eng.generate(
                    [
                        Request(f"prefix{rep}-{t}", [1], SamplingParams(max_tokens=1), k)
                        for t, k in enumerate(keys)
                    ]
                )
            else:
                eng.generate(reqs(f"warm{rep}", sys_only=True))
            h0, q0 = eng.scheduler.cache_hit_tokens, eng.scheduler.cache_query_tokens
            gc.collect()
            t0 = time.perf_counter()
            outs = eng.generate(reqs(f"run{rep}"))
            sync(bundle.device)
            wall = time.perf_counter() - t0
            if any(o.error for o in outs):
                raise RuntimeError(f"engine errors: {[o.error for o in outs if o.error][:3]}")
            ntok = sum(len(o.token_ids) for o in outs)
            r = dict(
                tok_s=ntok / wall,
                wall=wall,
                hit_tokens=eng.scheduler.cache_hit_tokens - h0,
                query_tokens=eng.scheduler.cache_query_tokens - q0,
                ttft_p50=ms(percentile([o.ttft for o in outs], 50)),
                ttft_p99=ms(percentile([o.ttft for o in outs], 99)),
                itl_p50=ms(percentile([x for o in outs for x in o.itl], 50)),
            )
            if label not in results or r["tok_s"] > results[label]["tok_s"]:
                results[label] = r
            tokens[label] = [o.token_ids for o in outs]
            eng.shutdown()
            del eng
            gc.collect()
    same = tokens["prompt cache off"] == tokens["prompt cache on"]
    ratio = results["prompt cache on"]["tok_s"] / results["prompt cache off"]["tok_s"]
    on = results["prompt cache on"]
    info = machine_info(str(bundle.device))
    load_after = loadavg()
    lines = [
        f"**Prompt cache test**: {bundle.name} ({weights_kind}) on {info.get('gpu') or info['cpu']} "
        f"({info['cores']} cores), {str(bundle.dtype).removeprefix('torch.')}, torch {info['torch']}, {info['date']}",
        "",
        f"{args.tenants} tenants, each with its own prefix (P={p}) and system prompt ({args.system_prompt_len} "
        f"tokens); {args.requests} requests = system prompt + a unique {args.prompt_len}-token question, "
        f"{args.new_tokens} new tokens; best of {args.repeats}. "
        + (
            "Cold: the requests arrive together, no system prompt cached before. "
            if args.cold
            else "Warm: one earlier request per tenant cached its system prompt. "
        )
        + f"Load average before {load_before}, after {load_after}.",
        "",
        f"Command: `python benchmarks/bench_engine.py {' '.join(sys.argv[1:])}`",
        "",
        markdown_table(
            ["engine", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "prompt tokens from cache"],
            [
                [
                    k,
                    fmt(r["tok_s"]),
                    fmt(r["ttft_p50"]),
                    fmt(r["ttft_p99"]),
                    fmt(r["itl_p50"]),
                    f"{r['hit_tokens']} / {r['query_tokens']}" if k.endswith("on") else "-",
                ]
                for k, r in results.items()
            ],
        ),
        "",
        f"Throughput on / off = **{ratio:.2f}**, TTFT p50 {fmt(results['prompt cache off']['ttft_p50'])} -> "
        f"{fmt(on['ttft_p50'])} ms; greedy outputs identical: {same}.",
    ]
    report = "\n".join(lines)
    print(report)
    out = {
        "prompt_cache_on_tok_s": round(on["tok_s"], 2),
        "prompt_cache_off_tok_s": round(results["prompt cache off"]["tok_s"], 2),
        "on_vs_off": round(ratio, 3),
        "hit_tokens": on["hit_tokens"],
        "query_tokens": on["query_tokens"],
        "outputs_identical": same,
        "cold": args.cold,
        "model": bundle.name,
        "machine": {**info, "loadavg_before": load_before, "loadavg_after": load_after},
    }
    emit(args, report, out)
    if not same:
        raise SystemExit("prompt cache changed the greedy outputs")
    return out


# --structured-test: a regex that admits any text (a mask every step, the model's greedy choice kept wherever it is
# text) and a JSON array of objects that stays open for as long as the model keeps adding items.
STRUCTURED_SPECS = {
    "regex (.|\\n)*": StructuredOutputs("regex", "(.|\n)*"),
    "JSON schema: array of objects": StructuredOutputs(
        "json",
        json.dumps(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                },
            }
        ),
    ),
}


def _time_masks(engine: LLMEngine) -> list[float]:
    """Record the host time of each step's grammar masks (computed and checked, then applied to the logits)."""
    import server.engine.sampler as sampler_mod

    times: list[float] = []
    fill, apply = engine.mask_budget.fill, sampler_mod.apply_masks

    def timed_fill(*a, **k):
        t0 = time.perf_counter()
        try:
            return fill(*a, **k)
        finally:
            times.append(time.perf_counter() - t0)

    def timed_apply(*a, **k):
        t0 = time.perf_counter()
        try:
            return apply(*a, **k)
        finally:
            times[-1] += time.perf_counter() - t0

    engine.mask_budget.fill, sampler_mod.apply_masks = timed_fill, timed_apply  # type: ignore[method-assign]
    return times


def main_structured_test(args) -> dict:
    """Engine d (every request its own tenant) without and with structured outputs on every row, interleaved
    repeats, best of each: tok/s and the full-batch decode step, whose difference is the cost of the grammar
    masks (computed on the CPU once per row per step, applied to the logits)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    load_before = loadavg()
    bundle, weights_kind = build_bundle(args.model, args.device, args.dtype, args.tokenizer)
    spec = bundle.spec
    vocab = min(spec.vocab_size, len(bundle.tokenizer))
    work = make_work(
        spec, vocab, args.tenants, args.requests, parse_prefix_lens(args.prefix_len), args.prompt_len
    )
    harness = EngineHarness(bundle, work, args)
    harness.warmup(sorted(set(work.tenant_of)), args.prompt_len)
    configs: dict[str, StructuredOutputs | None] = {"unconstrained": None, **STRUCTURED_SPECS}
    for so in STRUCTURED_SPECS.values():
        harness.engine.grammars.compile(so)  # as the HTTP layer does before queueing
    mask_s = _time_masks(harness.engine)
    best: dict[str, SysResult] = {}
    for _ in range(args.repeats):
        for label, so in configs.items():
            mask_s.clear()
            r = harness.run("s", work, work.tenant_of, args.new_tokens, so)
            r.extra["mask_ms"] = 1000 * sum(mask_s) / len(mask_s) if mask_s else None
            if label not in best or r.tok_s > best[label].tok_s:
                best[label] = r
    info = machine_info(str(bundle.device))
    load_after = loadavg()
    base = best["unconstrained"]
    rows = [
        [
            label,
            fmt(r.tok_s),
            r.n_tokens,
            r.batch,
            fmt(r.step_ms),
            "-" if r.extra["mask_ms"] is None else fmt(r.extra["mask_ms"]),
            fmt(ms(percentile(r.itl, 50))),
        ]
        for label, r in best.items()
    ]
    lines = [
        f"**Structured outputs test**: {bundle.name} ({weights_kind}) on {info.get('gpu') or info['cpu']} "
        f"({info['cores']} cores), {str(bundle.dtype).removeprefix('torch.')}, torch {info['torch']}, {info['date']}",
        "",
        f"Engine d: {args.requests} requests, each its own tenant's prefix (P={args.prefix_len}), prompt "
        f"{args.prompt_len}, up to {args.new_tokens} new tokens, greedy, every row constrained (or none); best of "
        f"{args.repeats} interleaved. Load average before {load_before}, after {load_after}. `masks ms/step`: host "
        "time of the grammar masks (fill + apply) per step with constrained rows. A constrained row ends when its "
        "grammar is complete (or, where it accepts, at end-of-sequence), so its tokens and throughput differ.",
        "",
        f"Command: `python benchmarks/bench_engine.py {' '.join(sys.argv[1:])}`",
        "",
        markdown_table(
            [
                "constraint",
                "out tok/s",
                "tokens",
                "full batch",
                "decode step ms",
                "masks ms/step",
                "ITL p50 ms",
            ],
            rows,
        ),
    ]
    report = "\n".join(lines)
    print(report)
    out = {
        "unconstrained_tok_s": round(base.tok_s, 2),
        **{f"{k.split()[0].lower()}_tok_s": round(best[k].tok_s, 2) for k in STRUCTURED_SPECS},
        "step_ms": {k: r.step_ms for k, r in best.items()},
        "mask_ms_per_step": {k: r.extra["mask_ms"] for k, r in best.items()},
        "model": bundle.name,
        "machine": {**info, "loadavg_before": load_before, "loadavg_after": load_after},
    }
    emit(args, report, out)
    return out


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16"
    )
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (real weights), a local HF folder, or gpt2 | smollm2-135m-config | llama-1b-config (random)",
    )
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument(
        "--prefix-len", default="32", help="P, or a comma list cycled over tenants (e.g. 16,32,64)"
    )
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--systems", default="a,b,c,d,e", help="subset of a,b,c,d,e (e: CUDA only)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument(
        "--repeats", type=int, default=1, help="interleaved repeats; the best run per system is reported"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--tokenizer", default="", help="tokenizer folder for random-weight configs (see build_bundle)"
    )
    ap.add_argument(
        "--naive-requests",
        type=int,
        default=0,
        help="run system a (sequential) on the first N requests only (0: all); its tok/s does not depend on N",
    )
    ap.add_argument(
        "--packed-weights",
        choices=("auto", "on", "off"),
        default="auto",
        help="engine: CPU fp32 oneDNN-prepacked linears (auto: where available, the server's default)",
    )
    ap.add_argument(
        "--kernels",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="engine: Triton paged decode attention and fused kernels, or torch ops (auto: Triton on CUDA)",
    )
    ap.add_argument(
        "--async-decode",
        choices=("auto", "on", "off"),
        default="auto",
        help="engine: launch greedy decode steps from the previous step's device tokens (auto: on CUDA)",
    )
    ap.add_argument(
        "--prompt-cache",
        action="store_true",
        help="engine: keep the prompt cache on (off by default here: repeats run the same prompts, which would "
        "then be served from the cache instead of measuring prefill)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="also profile engine decode steps (torch.profiler, cProfile)"
    )
    ap.add_argument("--out", default="", help="also write the report (markdown + JSON) to this file")
    g = ap.add_argument_group("--cache-test")
    g.add_argument("--cache-test", action="store_true")
    g.add_argument("--cache-tenants", type=int, default=1000)
    g.add_argument("--cache-capacity", type=int, default=100, help="prefix cache budget, in prefixes")
    g.add_argument("--cache-requests", type=int, default=256)
    g.add_argument("--zipf-s", type=float, default=1.0)
    g.add_argument("--fetch-latency-ms", type=float, default=2.0)
    g = ap.add_argument_group("--prompt-cache-test")
    g.add_argument("--prompt-cache-test", action="store_true")
    g.add_argument("--system-prompt-len", type=int, default=256)
    g.add_argument("--kv-cache-mb", type=int, default=512)
    g.add_argument(
        "--cold",
        action="store_true",
        help="no earlier request per tenant: the requests arrive together and their system prompts are not cached",
    )
    ap.add_argument(
        "--structured-test", action="store_true", help="engine d without / with structured outputs"
    )
    args = ap.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cache_test:
        main_cache_test(args)
    elif args.prompt_cache_test:
        main_prompt_cache_test(args)
    elif args.structured_test:
        main_structured_test(args)
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
