"""Randomized differential fuzzer for the engine.

One seed draws a model (tiny Llama, GPT-2 or Phi-3), a random `EngineConfig` (block size, pool and prefix-cache
size, batch limits, prompt cache, fair scheduling, speculative decoding, async decode, graphs, loader threads,
context limit) and a random workload (tenants with prefixes of assorted lengths, prompts sharing leading tokens or
repeating patterns, greedy / seeded / unseeded / penalized / structured requests, logprobs, stop strings and
tokens, priorities, duplicates), then drives the engine step by step while disturbing it: requests added mid-flight,
aborted on schedule or from inside event callbacks, callbacks that raise, a tenant's prefix replaced and
invalidated, slow prefix fetches, and injected failures of the model's forward, of the async step's read or of
on-device sampling.

Invariants checked:

* every request finishes exactly once; no event after its finish; every event `step()` returns went to the
  request's callback; `completion_tokens` counts the tokens sent; no more than `max_tokens`;
* greedy outputs equal a plain transformers reference (`hf_greedy`) fed the prefix as past_key_values, and every
  other deterministic request (seeded sampling, penalties, stops, structured outputs, logprobs, prompt logprobs,
  text) equals the same request run alone on a fresh engine; an aborted or failed request's tokens are a prefix
  of those;
* after the run: nothing unfinished, no KV block or prefix reference leaked, no refcount ever negative, no
  warning logged other than the expected ones (failing callbacks, injected faults).

`run_seed(seed)` runs one seed; `python -m tests.engine_fuzz START COUNT` runs many (for long local runs) and
exits 1 if any failed. tests/test_engine_fuzz.py runs a fixed set of seeds in the suite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any
from unittest import mock

import torch

import server.engine.engine as engine_module
from server.engine import (
    DictPrefixProvider,
    EngineConfig,
    LLMEngine,
    Output,
    PrefixKey,
    Request,
    RequestTooLarge,
    SamplingParams,
    StructuredOutputs,
    TokenEvent,
)
from server.engine.kv_cache import KVPool
from server.engine.sampler import NO_TOKEN_IN_GRAMMAR
from server.model import ModelBundle, bundle_from_model
from tests.engine_utils import hf_greedy, random_kv
from tests.fixtures.models import make_tiny_causal_lm, make_tiny_tokenizer, tiny_gpt2, tiny_llama

MODELS = ("llama", "gpt2", "phi3")
LOGGER = "prefixserve"
MAX_STEPS = 20_000
MAX_SECONDS = 120.0
LOGPROB_TOLERANCE = 2e-3
ABORT_CALLED = "abort-called"  # finish marker of a request whose callback raised (the engine drops it)


@cache
def bundle(name: str) -> ModelBundle:
    """The tiny random model `name` (one of MODELS), built once per process."""
    if name == "llama":
        return tiny_llama(0)
    if name == "gpt2":
        return tiny_gpt2(0)
    tok = make_tiny_tokenizer()
    return bundle_from_model(make_tiny_causal_lm(name, tok, 0, num_key_value_heads=2), tok, name=name)


class InjectedError(RuntimeError):
    """A failure the fuzzer injected; requests it fails must end with error_type "InjectedError"."""


class SlowProvider(DictPrefixProvider):
    """A dict provider whose fetches sleep a random time up to `delay` seconds (prefixes arrive late)."""

    def __init__(self, prefixes: dict[PrefixKey, torch.Tensor], delay: float, seed: int) -> None:
        super().__init__(prefixes)
        self.delay = delay
        self.rng = random.Random(seed + 5)

    def fetch_digested(self, key: PrefixKey) -> tuple[torch.Tensor, str]:
        if self.delay:
            time.sleep(self.rng.random() * self.delay)
        return super().fetch_digested(key)


@dataclass
class Workload:
    """The shape of one seed's traffic."""

    n_requests: int
    n_tenants: int
    max_prompt: int
    max_new: int
    replace_prefix: bool  # replace one tenant's prefix mid-run (and invalidate the cached copy)
    abort_p: float  # chance that a request is aborted a few steps after it is added
    midflight: bool  # add requests over the first steps rather than all at once
    pressure: bool  # a pool barely large enough and long requests: preemptions

    @property
    def context(self) -> int:
        return self.max_prompt + self.max_new


@dataclass
class Counters:
    """What a seed exercised (the test asserts its seeds keep exercising what they were chosen for)."""

    steps: int = 0
    requests: int = 0
    skipped: int = 0  # rejected by add_request (RequestTooLarge)
    checked: int = 0  # requests whose output was verified against a reference
    preemptions: int = 0
    prefix_evictions: int = 0
    async_steps: int = 0
    spec_accepted_tokens: int = 0
    cache_hit_tokens: int = 0
    prefix_replaced: bool = False
    faults_injected: int = 0
    fault_failed_requests: int = 0  # requests that finished with the injected error
    seconds: float = 0.0


@dataclass
class SeedResult:
    """One seed's model, configuration, counters, and failures (empty when every invariant held)."""

    seed: int
    model: str
    config: dict[str, Any]
    workload: Workload
    fault_site: str
    counters: Counters
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # observations that are not failures

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        c = self.counters
        head = f"seed {self.seed} {'ok' if self.ok else 'FAIL'} {self.model} {c.seconds:.1f}s"
        if self.ok:
            return head
        return f"{head} {len(self.failures)} failure(s): {self.failures[0][:300]}"


@dataclass
class Plan:
    """A request and what happens to it: the step it is added at and, maybe, the step it is aborted at."""

    req: Request
    add_step: int
    abort_step: int | None
    kind: str  # greedy | seeded | random | penalty | structured


# --------------------------------------------------------------------------------------------- random choices


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def random_config(rng: random.Random, b: ModelBundle, wl: Workload) -> dict[str, Any]:
    """EngineConfig keyword arguments; the pool always fits one whole request twice over (the engine's minimum)."""
    bs = rng.choice([1, 2, 4, 8, 16, 16, 32])
    spec = rng.choice([0, 0, 2, 4])
    async_decode = "off" if spec else rng.choice(["on", "off"])
    bpb = KVPool.bytes_per_block(b.spec.num_layers, b.spec.num_kv_heads, b.spec.head_dim, bs, b.dtype)
    minimal = 2 * (blocks_for(wl.context, bs) + 1) + 2
    nblocks = rng.choice([minimal, minimal + rng.randint(0, 8), minimal * 2, minimal * 4])
    pc_blocks = rng.choice([0, 1, 3, 6, 20, None])
    cfg: dict[str, Any] = {
        "max_num_seqs": rng.choice([1, 2, 3, 4, 8, 64]),
        "max_num_batched_tokens": rng.choice([1, 2, 3, 7, 16, 33, 64, 2048]),
        "block_size": bs,
        "kv_cache_bytes": nblocks * bpb,
        "prefix_cache_bytes": None if pc_blocks is None else pc_blocks * bpb,
        "prompt_cache": rng.random() < 0.7,
        "fair_scheduling": rng.random() < 0.5,
        "speculative_tokens": spec,
        "async_decode": async_decode,
        "graphs": rng.choice(["off", "off", "eager"]),
        "loader_threads": rng.choice([1, 2]),
        "max_model_len": rng.choice([None, None, wl.context + rng.randint(0, 45)]),
        "spec_ngram": rng.choice([(2, 4), (1, 3), (1, 1)]),
    }
    if wl.pressure:
        cfg["kv_cache_bytes"] = (2 * (blocks_for(wl.context, bs) + 1) + rng.randint(0, 3)) * bpb
        cfg["max_num_seqs"] = rng.choice([4, 8, 64])
    return cfg


def random_workload(rng: random.Random) -> Workload:
    return Workload(
        n_requests=rng.randint(1, 40),
        n_tenants=rng.randint(1, 12),
        max_prompt=rng.choice([8, 40, 200]),
        max_new=rng.choice([1, 5, 20, 60]),
        replace_prefix=rng.random() < 0.25,
        abort_p=rng.choice([0, 0.1, 0.3]),
        midflight=rng.random() < 0.7,
        pressure=rng.random() < 0.5,
    )


def random_prompt(rng: random.Random, wl: Workload, vocab: int, bases: list[list[int]]) -> list[int]:
    """A prompt sharing leading tokens with one of `bases` (prompt-cache hits), a repeated pattern (n-gram
    speculation accepts), or random tokens; the tokenizer's 3 special tokens are left out."""
    n = rng.randint(wl.max_prompt // 2 if wl.pressure else 1, wl.max_prompt)
    if rng.random() < 0.5:
        base = rng.choice(bases)
        k = rng.randint(0, n)
        return base[:k] + [rng.randrange(vocab - 3) for _ in range(n - k)]
    if rng.random() < 0.3:
        pattern = [rng.randrange(vocab - 3) for _ in range(rng.randint(1, 6))]
        return (pattern * (n // len(pattern) + 1))[:n]
    return [rng.randrange(vocab - 3) for _ in range(n)]


def random_sampling(rng: random.Random, wl: Workload, vocab: int) -> tuple[SamplingParams, str]:
    """Sampling parameters and the request's kind."""
    max_tokens = rng.randint(max(1, wl.max_new // 2) if wl.pressure else 1, wl.max_new)
    kind = rng.choices(["greedy", "seeded", "random", "penalty"], [0.7, 0.12, 0.06, 0.12])[0]
    kw: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": rng.random() < 0.8}
    if kind == "seeded":
        kw.update(
            temperature=rng.choice([0.5, 1.0]),
            seed=rng.randrange(1000),
            top_k=rng.choice([0, 5]),
            top_p=rng.choice([1.0, 0.9]),
            min_p=rng.choice([0.0, 0.05]),
        )
    elif kind == "random":
        kw.update(temperature=1.0)
    elif kind == "penalty":
        kw.update(
            rng.choice(
                [
                    {"repetition_penalty": 1.3},
                    {"presence_penalty": 0.5, "frequency_penalty": 0.3},
                    {"logit_bias": ((5, 5.0),)},
                    {"allowed_token_ids": tuple(range(40, 80))},
                    {"bad_words_token_ids": (*((t,) for t in range(40, 200)), (20, 21), (21, 20))},
                    {"min_tokens": min(max_tokens, 3), "ignore_eos": False},
                ]
            )
        )
    if rng.random() < 0.06:
        kw["structured"] = rng.choice(
            [
                StructuredOutputs("regex", r"[0-9]{3}-[a-z]{2,5}(\.[a-z]{2})?"),
                StructuredOutputs("choice", json.dumps(["yes", "no", "it depends"])),
                StructuredOutputs("regex", "[a-z]{1,40}"),
            ]
        )
        kind = "structured" if kind != "random" else kind
    if rng.random() < 0.2:
        kw["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.1:
        kw["prompt_logprobs"] = rng.choice([0, 1])
    if rng.random() < 0.15:
        kw["stop_token_ids"] = tuple(rng.randrange(vocab) for _ in range(3))
    if rng.random() < 0.1:
        kw["stop"] = (rng.choice(["a", "e", " ", "x", "ab"]),)
    return SamplingParams(**kw), kind


def random_plans(
    rng: random.Random, wl: Workload, vocab: int, tenants: list[PrefixKey | None], bases: list[list[int]]
) -> list[Plan]:
    """The workload's requests; some come in duplicates (same prompt and parameters)."""
    plans: list[Plan] = []
    while len(plans) < wl.n_requests:
        prefix = rng.choice(tenants)
        prompt = random_prompt(rng, wl, vocab, bases)
        sampling, kind = random_sampling(rng, wl, vocab)
        add_step = 0 if not wl.midflight else rng.choice([0, 0, rng.randint(0, 60)])
        copies = rng.choice([1, 1, 1, 2, 3])
        salt = rng.choice([None, None, "s1"])
        stream = rng.random() < 0.15
        priority = rng.choice([0, 0, 0, 1, -1])
        for _ in range(min(copies, wl.n_requests - len(plans))):
            req = Request(
                f"r{len(plans)}",
                list(prompt),
                sampling,
                prefix,
                cache_salt=salt,
                priority=priority,
                stream_text=stream,
            )
            abort_step = add_step + rng.randint(0, 20) if rng.random() < wl.abort_p else None
            plans.append(Plan(req, add_step, abort_step, kind))
    return plans


# ------------------------------------------------------------------------------------------------ disturbances


class FaultInjector:
    """Makes one site fail with probability `p`: the model's forward (before or after it runs), the async step's
    read of the device's tokens, or on-device sampling (the last two only exist with async decode)."""

    def __init__(self, eng: LLMEngine, seed: int, async_decode: bool) -> None:
        self.rng = random.Random(seed * 13 + 3)
        self.p = self.rng.choice([0.02, 0.05, 0.1])
        sites = ["forward_before", "forward_after"]
        self.site = self.rng.choice([*sites, "read", "sample_on_device"] if async_decode else sites)
        self.count = 0
        self.eng = eng

    def _maybe_fail(self, site: str) -> None:
        if self.site == site and self.rng.random() < self.p:
            self.count += 1
            raise InjectedError(f"injected at {site}")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        forward, read, sample = self.eng.runner.forward, self.eng._read, engine_module.sample_on_device

        def faulty_forward(*args: Any, **kwargs: Any) -> Any:
            self._maybe_fail("forward_before")
            out = forward(*args, **kwargs)
            self._maybe_fail("forward_after")
            return out

        def faulty_read(*args: Any, **kwargs: Any) -> Any:
            self._maybe_fail("read")
            return read(*args, **kwargs)

        def faulty_sample(*args: Any, **kwargs: Any) -> Any:
            self._maybe_fail("sample_on_device")
            return sample(*args, **kwargs)

        with (
            mock.patch.object(self.eng.runner, "forward", faulty_forward),
            mock.patch.object(self.eng, "_read", faulty_read),
            mock.patch.object(engine_module, "sample_on_device", faulty_sample),
        ):
            yield


class _LogCollector(logging.Handler):
    """Collects the engine's warnings and errors while installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        logger = logging.getLogger(LOGGER)
        level = logger.level
        logger.addHandler(self)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)

    def unexpected(self) -> list[str]:
        """Records other than a failing callback or an injected fault."""
        out = []
        for rec in self.records:
            injected = rec.exc_info is not None and isinstance(rec.exc_info[1], InjectedError)
            if (
                "its event callback failed" in rec.getMessage()
                or injected
                or "injected" in (rec.exc_text or "")
            ):
                continue
            out.append(f"LOG {rec.levelname}: {rec.getMessage()} {rec.exc_text or ''}"[:800])
        return out


# -------------------------------------------------------------------------------------------------- references


class References:
    """Expected outputs, cached per seed: transformers' greedy tokens, and a request run alone on a fresh engine.
    A prefix is named by a label ("t3#0": tenant 3's first version) so cache keys never depend on object ids."""

    def __init__(self, b: ModelBundle) -> None:
        self.bundle = b
        self._greedy: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}
        self._greedy_lps: dict[tuple[str | None, tuple[int, ...]], list[torch.Tensor]] = {}
        self._alone: dict[tuple[Any, ...], Output] = {}

    def greedy(self, label: str | None, kv: torch.Tensor | None, prompt: list[int], n: int) -> list[int]:
        key = (label, tuple(prompt))
        have = self._greedy.get(key)
        if have is None or len(have) < n:
            lps: list[torch.Tensor] = []
            have = self._greedy[key] = hf_greedy(self.bundle.hf_model, kv, prompt, n, logprobs_out=lps)
            self._greedy_lps[key] = lps
        return have[:n]

    def near_tie(self, label: str | None, prompt: list[int], got: list[int], want: list[int]) -> int | None:
        """The first token where `got` leaves the greedy reference `want` (of `greedy(label, ..., prompt)`), if
        the reference's own log-probabilities of the two tokens there are within LOGPROB_TOLERANCE: a near tie,
        which a batch's other summation order (chunked prefill, another batch shape) may break the other way in
        fp32 (seed 20187: 2.5e-5 apart). After it the two continuations are not comparable."""
        i = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        lps = self._greedy_lps.get((label, tuple(prompt)))
        if i is None or lps is None or i >= len(lps):
            return None
        return i if abs(float(lps[i][want[i]] - lps[i][got[i]])) <= LOGPROB_TOLERANCE else None

    def alone(
        self, label: str | None, kv: torch.Tensor | None, req: Request, max_model_len: int | None
    ) -> Output:
        key = (label, tuple(req.prompt_token_ids), repr(req.sampling), req.stream_text, max_model_len)
        if key not in self._alone:
            pk = PrefixKey("alone", "prefix", 1) if kv is not None else None
            eng = LLMEngine(
                self.bundle,
                DictPrefixProvider({pk: kv} if pk is not None and kv is not None else {}),
                EngineConfig(
                    kv_cache_bytes=16 * 2**20,
                    prompt_cache=False,
                    async_decode="off",
                    max_model_len=max_model_len,
                ),
            )
            try:
                req = Request(
                    "alone", list(req.prompt_token_ids), req.sampling, pk, stream_text=req.stream_text
                )
                self._alone[key] = eng.generate([req])[0]
            finally:
                eng.shutdown()
        return self._alone[key]


# ----------------------------------------------------------------------------------------------------- one seed


class _SeedRun:
    """One seed: builds the engine and workload, drives it, then checks the invariants."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.seed = seed
        self.model = rng.choices(MODELS, [0.45, 0.35, 0.2])[0]
        b = self.bundle = bundle(self.model)
        vocab = b.spec.vocab_size
        self.wl = random_workload(rng)
        self.cfg = random_config(rng, b, self.wl)
        # tenants: some without a prefix, or with an empty one
        tenants: list[PrefixKey | None] = []
        self.versions: dict[PrefixKey, list[tuple[str, torch.Tensor]]] = {}  # every version of each prefix
        for t in range(self.wl.n_tenants):
            plen = rng.choice([0, 0, 1, 3, 7, 16, 17, 31, 40])
            if plen == 0 and rng.random() < 0.5:
                tenants.append(None)
                continue
            key = PrefixKey(f"t{t}", "default", 1)
            self.versions[key] = [(f"t{t}#0", random_kv(b.spec, plen, seed=seed * 100 + t))]
            tenants.append(key)
        self.provider = SlowProvider(
            {k: v[0][1] for k, v in self.versions.items()}, rng.choice([0, 0, 0.002, 0.02]), seed
        )
        self.eng = LLMEngine(b, self.provider, EngineConfig(**self.cfg))
        self.faults = FaultInjector(self.eng, seed, self.cfg["async_decode"] == "on")
        bases = [[rng.randrange(vocab - 3) for _ in range(self.wl.max_prompt)] for _ in range(3)]
        # one prefix replaced at some step by a tensor of the same or another length
        self.replace_step: int | None = None
        self.replaced: PrefixKey | None = None
        self.new_version: tuple[str, torch.Tensor] | None = None
        if self.wl.replace_prefix and self.versions:
            self.replace_step = rng.randint(0, 30)
            self.replaced = rng.choice(list(self.versions))
            old = self.versions[self.replaced][0][1]
            new = random_kv(b.spec, rng.choice([old.shape[3], rng.randint(1, 40)]), seed=seed * 100 + 99)
            self.new_version = (f"{self.replaced.tenant_id}#1", new)
        self.plans = random_plans(rng, self.wl, vocab, tenants, bases)
        # event callbacks that abort other requests or raise
        self.cb_rng = random.Random(seed * 7 + 1)
        self.cb_abort_p = self.cb_rng.choice([0, 0, 0.02, 0.1])
        self.cb_raise_p = self.cb_rng.choice([0, 0, 0.01])

        self.events: dict[str, list[TokenEvent]] = {p.req.request_id: [] for p in self.plans}
        self.finished: dict[str, TokenEvent | str] = {}
        self.added_version: dict[str, int] = {}  # request -> index of its prefix's version live when added
        self.skipped: set[str] = set()
        self.live: list[str] = []
        self.delivered: set[int] = set()  # ids of the events given to callbacks
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.counters = Counters(requests=len(self.plans))
        self.refs = References(b)

    # driving

    def _callback(self, rid: str) -> Callable[[TokenEvent], None]:
        def cb(ev: TokenEvent) -> None:
            self.delivered.add(id(ev))
            if rid in self.finished:
                self.failures.append(f"event after finish for {rid}: {ev} (first {self.finished[rid]})")
            self.events[rid].append(ev)
            if ev.finished:
                self.finished[rid] = ev
                return
            if self.cb_rng.random() < self.cb_abort_p:
                candidates = [r for r in self.live if r not in self.finished]
                if candidates:
                    self.eng.abort(self.cb_rng.choice(candidates))
            if rid not in self.finished and self.cb_rng.random() < self.cb_raise_p:
                self.finished[rid] = ABORT_CALLED
                raise RuntimeError("consumer went away")

        return cb

    def _replace_prefix(self) -> None:
        assert self.replaced is not None and self.new_version is not None
        self.versions[self.replaced].append(self.new_version)
        self.provider.prefixes[self.replaced] = self.new_version[1]
        self.eng.prefix_cache.invalidate(self.replaced.tenant_id, self.replaced.name)
        self.counters.prefix_replaced = True

    def drive(self) -> None:
        pending = sorted(self.plans, key=lambda p: p.add_step)
        aborts: dict[int, list[str]] = {}
        step = 0
        negative_refs = False
        t0 = time.monotonic()
        while True:
            if (
                self.replace_step is not None
                and not self.counters.prefix_replaced
                and step >= self.replace_step
            ):
                self._replace_prefix()
            while pending and pending[0].add_step <= step:
                p = pending.pop(0)
                rid = p.req.request_id
                if p.req.prefix is not None:
                    self.added_version[rid] = len(self.versions[p.req.prefix]) - 1
                try:
                    self.eng.add_request(p.req, self._callback(rid))
                except RequestTooLarge:
                    self.skipped.add(rid)
                    continue
                self.live.append(rid)
                if p.abort_step is not None:
                    aborts.setdefault(p.abort_step, []).append(rid)
            for rid in aborts.pop(step, []):
                if rid not in self.finished:
                    self.eng.abort(rid)
            replacing = self.replace_step is not None and not self.counters.prefix_replaced
            if not (self.eng.has_unfinished() or pending or any(s > step for s in aborts) or replacing):
                break
            evs = self.eng.step()
            self.failures += [
                f"returned event not given to callback: {ev.request_id}"
                for ev in evs
                if id(ev) not in self.delivered
            ]
            if not evs and self.eng.num_running == 0 and self.eng.has_unfinished():
                time.sleep(0.001)  # waiting for a prefix fetch
            step += 1
            negative_refs = negative_refs or any(r < 0 for r in self.eng.pool._refs)
            if time.monotonic() - t0 > MAX_SECONDS or step > MAX_STEPS:
                self.failures.append(
                    f"HANG: step {step}, running {self.eng.num_running} waiting {self.eng.num_waiting}"
                )
                break
        self.counters.steps = step
        if negative_refs:
            self.failures.append("negative refcount")

    # checks

    def check_idle(self) -> None:
        """Once every request is done: nothing left in the engine; only the prefix cache holds blocks."""
        eng, pc = self.eng, self.eng.prefix_cache
        if eng.has_unfinished():
            self.failures.append("unfinished after the run")
        held = sum(len(e.blocks) for e in pc.entries.values())
        if eng.pool.num_used != held:
            self.failures.append(
                f"LEAK: pool used {eng.pool.num_used} != prefix blocks {held} ({len(pc.entries)} entries)"
            )
        prefix_blocks = {blk for e in pc.entries.values() for blk in e.blocks}
        for blk, r in enumerate(eng.pool._refs):
            if r != (blk in prefix_blocks):
                self.failures.append(f"refcount of block {blk} = {r}, want {int(blk in prefix_blocks)}")
                break
        self.failures += [
            f"prefix {e.key} active {e.active} when idle" for e in pc.entries.values() if e.active
        ]
        if pc._wanted:
            self.failures.append(f"prefix claims left: {pc._wanted}")
        if eng._seqs:
            self.failures.append(f"engine sequences left: {list(eng._seqs)}")
        if pc.resident_bytes > pc.budget_bytes:
            self.notes.append(
                f"prefix cache over budget by {pc.resident_bytes - pc.budget_bytes} bytes when idle"
            )

    def _prefix_candidates(self, p: Plan) -> list[tuple[str | None, torch.Tensor | None]]:
        """The prefix versions the request may have run with: the one live when it was added, and the replacement
        too when it was added before its prefix was replaced (it may have been fetched after)."""
        key = p.req.prefix
        if key is None:
            return [(None, None)]
        versions = self.versions[key]
        first = self.added_version[p.req.request_id]
        return list(versions[first:])

    def _error_expected(self, p: Plan, fin: TokenEvent) -> bool:
        """Whether an error is right: its prefix was replaced under it, or a "KV cache blocks" rejection when the
        prefix plus the whole request cannot fit the pool."""
        if fin.error_type == "PrefixChanged":
            return p.req.prefix is not None and p.req.prefix == self.replaced
        if fin.error_type != "RequestTooLarge" or "KV cache blocks; the cache holds" not in (fin.error or ""):
            return False
        pool = self.eng.pool
        plen = max(kv.shape[3] for _, kv in self.versions[p.req.prefix]) if p.req.prefix else 0
        pb = pool.blocks_for(plen)
        need = pb + pool.blocks_for(len(p.req.prompt_token_ids) + p.req.sampling.max_tokens)
        return pb >= pool.num_blocks or need > pool.num_blocks

    @staticmethod
    def _deterministic_error(p: Plan, fin: TokenEvent) -> bool:
        """Whether the error is the request's own, one it meets at the same token run anywhere: a grammar that its
        allowed_token_ids or bad_words leave no token to go on with (e.g. `[a-z]+` with the letters banned), at the
        first token or after some. Its tokens, text and error are then checked against the request run alone."""
        sp = p.req.sampling
        return (
            fin.error_type == "GrammarError"
            and NO_TOKEN_IN_GRAMMAR in (fin.error or "")
            and sp.structured is not None
            and bool(sp.allowed_token_ids or sp.bad_words_token_ids)
        )

    def _mismatches(
        self,
        p: Plan,
        label: str | None,
        kv: torch.Tensor | None,
        toks: list[int],
        fin: TokenEvent | str,
        partial: bool,
    ) -> list[str] | None:
        """What differs from the reference with prefix version `label` (None: it matches)."""
        sp, evs = p.req.sampling, self.events[p.req.request_id]
        mml = self.cfg["max_model_len"]
        plen = 0 if kv is None else kv.shape[3]
        n_prompt = len(p.req.prompt_token_ids)
        if mml is not None and plen + n_prompt > mml:
            context_error = isinstance(fin, TokenEvent) and fin.error_type == "RequestTooLarge"
            return None if context_error or (partial and not toks) else ["expected a context-limit error"]
        issues: list[str] = []
        n = sp.max_tokens if mml is None else max(1, min(sp.max_tokens, mml - plen - n_prompt))
        alone: Output | None = None
        if p.kind == "greedy" and sp.ignore_eos and not sp.stop and not sp.stop_token_ids:
            want = self.refs.greedy(label, kv, p.req.prompt_token_ids, n)
        else:
            alone = self.refs.alone(label, kv, p.req, mml)
            want = alone.token_ids
        if alone is None and toks[: len(want)] != want[: len(toks)]:
            tie = self.refs.near_tie(label, p.req.prompt_token_ids, toks, want)
            if tie is not None:
                self.notes.append(f"{p.req.request_id}: a near tie broken the other way at token {tie}")
                return None
        if partial:
            return None if toks == want[: len(toks)] else [f"got {toks} (partial) want a prefix of {want}"]
        assert isinstance(fin, TokenEvent)
        if toks != want:
            return [f"got {toks} ({fin.finish_reason}) want {want}"]
        if alone is not None and fin.finish_reason != alone.finish_reason:
            issues.append(f"finish {fin.finish_reason} vs alone {alone.finish_reason}")
        if alone is not None and fin.finish_reason == "error" and fin.error_type != alone.error_type:
            issues.append(f"error {fin.error_type}: {fin.error} vs alone {alone.error_type}: {alone.error}")
        if sp.logprobs is not None:
            alone = alone or self.refs.alone(label, kv, p.req, mml)
            got = [lp for ev in evs for lp in (ev.logprobs or [])]
            if len(got) != len(toks):
                issues.append(f"{len(got)} logprobs for {len(toks)} tokens")
            for j, (a, c) in enumerate(zip(got, alone.logprobs or [], strict=False)):
                tops_differ = [t for t, _ in a.top] != [t for t, _ in c.top]
                if a.token_id != c.token_id or abs(a.logprob - c.logprob) > LOGPROB_TOLERANCE or tops_differ:
                    issues.append(f"logprob mismatch at {j}: {a} vs {c}")
                    break
        if sp.prompt_logprobs is not None:
            alone = alone or self.refs.alone(label, kv, p.req, mml)
            got_p = next((ev.prompt_logprobs for ev in evs if ev.prompt_logprobs), None)
            want_p = alone.prompt_logprobs
            if got_p is None and want_p is None and fin.finish_reason == alone.finish_reason == "error":
                pass  # (it failed before its prompt logprobs alone too: seed 9018, a grammar left no token)
            elif got_p is None or want_p is None or len(got_p) != len(want_p):
                issues.append(f"prompt_logprobs {got_p and len(got_p)} vs {want_p and len(want_p)}")
            else:
                for j, (a, c) in enumerate(zip(got_p[1:], want_p[1:], strict=True), 1):
                    assert a is not None and c is not None
                    if a.token_id != c.token_id or abs(a.logprob - c.logprob) > LOGPROB_TOLERANCE:
                        issues.append(f"prompt logprob mismatch at {j}: {a} vs {c}")
                        break
        if sp.stop or p.req.stream_text or sp.structured:
            alone = alone or self.refs.alone(label, kv, p.req, mml)
            text = "".join(ev.text for ev in evs)
            if text != alone.text:
                issues.append(f"text {text!r} vs alone {alone.text!r}")
        return issues or None

    def check_outputs(self) -> None:
        """Each request finished once, with the reference's tokens (a prefix of them when aborted or failed)."""
        for p in self.plans:
            rid, sp = p.req.request_id, p.req.sampling
            if rid in self.skipped:
                continue
            evs, fin = self.events[rid], self.finished.get(rid)
            toks = [t for ev in evs for t in ev.token_ids]
            if fin is None:
                self.failures.append(f"{rid}: never finished")
                continue
            n_finished = sum(1 for ev in evs if ev.finished)
            if fin == ABORT_CALLED:
                partial = True
            else:
                assert isinstance(fin, TokenEvent)
                partial = fin.finish_reason == "abort"
                if n_finished != 1:
                    self.failures.append(f"{rid}: {n_finished} finished events")
                context_error = fin.error_type == "RequestTooLarge" and "context limit" in (fin.error or "")
                if fin.finish_reason == "error" and not context_error:
                    if fin.error_type == "InjectedError":  # its tokens so far must still be right
                        partial = True
                        self.counters.fault_failed_requests += 1
                    elif not self._deterministic_error(p, fin):
                        if not self._error_expected(p, fin):
                            self.failures.append(f"{rid}: error {fin.error_type}: {fin.error}")
                        continue
                if fin.finish_reason != "abort" and fin.completion_tokens != len(toks):
                    self.failures.append(f"{rid}: completion_tokens {fin.completion_tokens} != {len(toks)}")
                if (
                    fin.finish_reason == "length"
                    and len(toks) != sp.max_tokens
                    and self.cfg["max_model_len"] is None
                ):
                    self.failures.append(f"{rid}: finish length with {len(toks)} of {sp.max_tokens} tokens")
            if len(toks) > sp.max_tokens:
                self.failures.append(f"{rid}: {len(toks)} tokens > max_tokens {sp.max_tokens}")
            if p.kind == "random":
                continue
            why = []
            for label, kv in self._prefix_candidates(p):
                issues = self._mismatches(p, label, kv, toks, fin, partial)
                if issues is None:
                    self.counters.checked += 1
                    break
                why.append(f"[prefix {label}] " + "; ".join(issues))
            else:
                desc = f"{p.kind} prefix={p.req.prefix} len={len(p.req.prompt_token_ids)} sp={sp}"
                self.failures.append(f"{rid} [{desc}]: " + " | ".join(why))

    def run(self) -> SeedResult:
        t0 = time.monotonic()
        logs = _LogCollector()
        try:
            with logs.installed(), self.faults.installed():
                try:
                    self.drive()
                except Exception:
                    self.failures.append("exception in step: " + traceback.format_exc())
            self.failures += logs.unexpected()
            self.check_idle()
            self.check_outputs()
        finally:
            self.eng.shutdown()
        c = self.counters
        c.skipped = len(self.skipped)
        c.preemptions = self.eng.scheduler.num_preemptions
        c.prefix_evictions = self.eng.prefix_cache.stats.evictions
        c.async_steps = self.eng.num_async_steps
        c.spec_accepted_tokens = self.eng.scheduler.spec_accepted_tokens
        c.cache_hit_tokens = self.eng.scheduler.cache_hit_tokens
        c.faults_injected = self.faults.count
        c.seconds = time.monotonic() - t0
        return SeedResult(
            self.seed, self.model, self.cfg, self.wl, self.faults.site, c, self.failures, self.notes
        )


def run_seed(seed: int) -> SeedResult:
    """Run one seed of the fuzzer; its `failures` list every invariant that did not hold."""
    return _SeedRun(seed).run()


def main(argv: list[str]) -> int:
    """`python -m tests.engine_fuzz START COUNT [--json FILE]`: run seeds START..START+COUNT-1, print a line per
    failing seed and a final count; exit 1 if any failed. With --json, append every seed's result to FILE."""
    if len(argv) not in (2, 4) or (len(argv) == 4 and argv[2] != "--json"):
        print(__doc__.split("\n\n")[0], "\nusage: python -m tests.engine_fuzz START COUNT [--json FILE]")
        return 2
    start, count = int(argv[0]), int(argv[1])
    torch.set_num_threads(1)
    logging.getLogger(LOGGER).propagate = False  # the expected warnings would flood the terminal
    log = open(argv[3], "a") if len(argv) == 4 else None  # noqa: SIM115
    failed = 0
    t0 = time.monotonic()
    for seed in range(start, start + count):
        try:
            res = run_seed(seed)
        except Exception:
            failed += 1
            print(f"seed {seed} HARNESS ERROR: {traceback.format_exc()}", flush=True)
            continue
        if not res.ok:
            failed += 1
            print(res.summary(), flush=True)
        if log is not None:
            log.write(json.dumps(asdict(res), default=str) + "\n")
            log.flush()
    print(f"{failed} of {count} seeds failed ({time.monotonic() - t0:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
