"""The engine: scheduler → batch → model runner → sampler → token events.

`LLMEngine` is the synchronous core (one thread drives it: `add_request`, `abort`, `step`); `generate` runs a list
of requests to completion (tests, benchmarks). `AsyncEngine` drives an `LLMEngine` on its own thread and bridges
token events to asyncio consumers; HTTP handlers never run torch work on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import torch

from server.engine.detokenizer import decode_output
from server.engine.kv_cache import KVPool
from server.engine.model_runner import ModelRunner, RowInput
from server.engine.prefix_cache import PrefixCache, PrefixProvider
from server.engine.sampler import (
    INVALID_DISTRIBUTION,
    NO_TOKEN_ALLOWED,
    NO_TOKEN_IN_GRAMMAR,
    NO_TOKEN_IN_GRAMMAR_MASKED,
    NON_FINITE,
    finite_rows,
    greedy_tokens,
    logprobs_from_host,
    logprobs_on_device,
    logprobs_width,
    make_generator,
    sample,
    sample_on_device,
    token_logprobs,
)
from server.engine.scheduler import ScheduledItem, Scheduler, SchedulerConfig
from server.engine.sequence import SeqStatus, Sequence
from server.engine.spec import accept, accept_sampled
from server.engine.structured import MASK_BUDGET_MS, Constraint, GrammarCompiler, MaskBudget
from server.engine.token_bytes import TokenTexts
from server.engine.types import Output, QueueFull, Request, RequestTooLarge, TokenEvent, TokenLogprob
from server.model.spec import ModelBundle

log = logging.getLogger("prefixserve.engine")
# a sampling failure the request caused (every token excluded), by its reason: the API answers them as 422s
_SAMPLING_ERRORS = {
    NO_TOKEN_IN_GRAMMAR: "GrammarError",
    NO_TOKEN_IN_GRAMMAR_MASKED: "GrammarError",
    NO_TOKEN_ALLOWED: "NoTokenAllowed",
}

EventCallback = Callable[[TokenEvent], None]


CPU_LONG_PREFILL_TOKENS = 256  # EngineConfig.long_prefill_tokens's default on a CPU
DEFAULT_MAX_MODEL_LEN = 8192  # the context served when neither the settings nor a smaller model limit it
DEFAULT_KV_CACHE_BYTES = (
    512 * 2**20
)  # the pool when none is configured, unless one request at the context needs more


def serving_context(max_model_len: int | None, model_positions: int) -> int:
    """Positions one request may hold (prefix + prompt + output): `max_model_len` if set, else 8192, within the
    model's own limit."""
    return min(max_model_len or DEFAULT_MAX_MODEL_LEN, model_positions)


def default_kv_blocks(context: int, block_size: int, block_bytes: int) -> int:
    """The pool's blocks when no budget is configured: 512 MiB, or more where one request at the full `context`
    would not fit in half the pool less a block (the most one request may hold, `LLMEngine.validate`), so that the
    default serves the whole context without a warning (vLLM likewise sizes its cache to hold max_model_len)."""
    one_request = 2 * (
        -(-(context + 1) // block_size) + 1
    )  # (+ 1: a prompt filling the context may score a token)
    return max(DEFAULT_KV_CACHE_BYTES // block_bytes, one_request)


def check_pool_fits(pool_bytes: int, device: torch.device, default: bool) -> None:
    """On a GPU, a KV pool larger than the memory free there is a ValueError that says what to set, before torch's
    out-of-memory error at its allocation (the default pool grows with the context: a Llama-3-8B shape in bf16 needs
    8 GiB at 32k positions). Other devices are not checked."""
    if device.type != "cuda":
        return
    free, _total = torch.cuda.mem_get_info(device)
    if pool_bytes > free:
        how = "set max_model_len lower or kv_cache_mb" if default else "set kv_cache_mb lower"
        raise ValueError(
            f"the KV cache needs {pool_bytes / 2**20:,.0f} MiB{' (the default: one request at the context)' * default}"
            f" but only {free / 2**20:,.0f} MiB of GPU memory is free: {how}"
        )


@dataclass
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024
    block_size: int = 16
    kv_cache_bytes: int | None = None  # whole pool: prefixes + requests (default: `default_kv_blocks`)
    prefix_cache_bytes: int | None = None  # default: half of the pool
    max_model_len: int | None = None  # default: min(model max positions, 8192)
    loader_threads: int = 2
    packed_weights: bool | None = None  # CPU fp32/bf16 oneDNN-prepacked linears (None: where available)
    # decode steps as CUDA graphs: auto (on CUDA) | cuda | off | eager (the padded path without capture)
    graphs: str = "auto"
    # decode attention and fused elementwise ops as Triton kernels: auto (on CUDA with triton) | triton | torch
    kernels: str = "auto"
    # async decode (vLLM v1's async scheduling): steps whose rows sample from raw logits (greedy or temperature /
    # top-k / top-p / min-p) leave their tokens on the device while the next step is prepared and launched from them;
    # auto: on CUDA without speculative decoding | on | off
    async_decode: str = "auto"
    prompt_cache: bool = True  # reuse cached KV blocks of identical leading tokens (same salt and prefix)
    # tenants take turns at admission (Request.tenant); False: first come first served
    fair_scheduling: bool = True
    # speculative decoding by prompt lookup (server.engine.spec): up to this many drafted tokens a step per eligible
    # row (greedy or sampled, see spec.speculable), from its own earlier n-grams of spec_ngram (min, max) tokens; 0: off
    speculative_tokens: int = 0
    spec_ngram: tuple[int, int] = (2, 4)
    # while other rows decode, a prompt computes at most this many tokens a step (0: no cap; None: 256 on a CPU,
    # where a 2,048-token chunk of a long prompt held every stream's next token for seconds, none on CUDA)
    long_prefill_tokens: int | None = None
    # structured outputs: a request whose grammar masks take longer than this (3 times) ends with an error
    mask_budget_ms: float = MASK_BUDGET_MS


@dataclass
class StepStats:
    num_running: int
    num_waiting: int
    num_scheduled: int
    num_prefill_tokens: int
    num_decode_tokens: int
    distinct_prefixes: int
    duration_s: float


@dataclass
class _Inflight:
    """A launched step whose sampled tokens are still on their way from the device (async decode)."""

    seqs: list[Sequence]  # its sampling rows, in row order
    tokens: torch.Tensor  # [R] on the device: what a follow-up step feeds
    host: torch.Tensor  # [3, R] `sample_on_device`'s rows, copied to (pinned) host memory once `done` fires
    done: torch.cuda.Event | None
    fresh: list[int]  # prompt-cache blocks registered for it (forgotten if it fails)
    # rows that asked for logprobs, with how many alternatives each, and every row's `logprobs_on_device` line
    lp_rows: list[int] = field(default_factory=list)
    lp_tops: list[int] = field(default_factory=list)
    lp_host: torch.Tensor | None = None
    # rows the step computed without sampling (prompt chunks before the last), and its StepStats counts
    computed: list[Sequence] = field(default_factory=list)
    counts: tuple[int, int, int, int] = (0, 0, 0, 0)


class LLMEngine:
    def __init__(
        self,
        bundle: ModelBundle,
        provider: PrefixProvider,
        config: EngineConfig | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        on_prefix_loaded: Callable[[], None] | None = None,
    ) -> None:
        self.bundle = bundle
        self.token_texts = TokenTexts(
            bundle.tokenizer
        )  # each token's bytes (the detokenizers' own, this thread's)
        self.cfg = cfg = config or EngineConfig()
        sp = bundle.spec
        self.max_model_len = serving_context(cfg.max_model_len, sp.max_positions)
        if cfg.max_model_len is not None and cfg.max_model_len > self.max_model_len:
            log.warning(
                "max_model_len %d is more than the model's %d positions: serving %d",
                cfg.max_model_len,
                sp.max_positions,
                self.max_model_len,
            )
        block_bytes = KVPool.bytes_per_block(
            sp.num_layers, sp.num_kv_heads, sp.head_dim, cfg.block_size, bundle.dtype
        )
        if cfg.kv_cache_bytes is None:
            num_blocks = default_kv_blocks(self.max_model_len, cfg.block_size, block_bytes)
        else:
            num_blocks = max(cfg.kv_cache_bytes // block_bytes, 2)
        if cfg.prefix_cache_bytes is not None and cfg.prefix_cache_bytes > num_blocks * block_bytes:
            log.warning(
                "prefix cache budget (%d bytes) is more than the whole KV pool (%d bytes): prefixes can hold "
                "every block, leaving none to the requests",
                cfg.prefix_cache_bytes,
                num_blocks * block_bytes,
            )
        # a request's own tokens (prompt + output) may hold at most half the pool less a block (`validate`)
        self.max_request_tokens = max((num_blocks // 2 - 1) * cfg.block_size, 0)
        # (a server that says it is ready and refuses every request: vLLM's too)
        if self.max_request_tokens == 0:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {cfg.block_size} tokens, "
                f"{num_blocks * block_bytes / 2**20:.2f} MiB) holds no request: at least 4 blocks "
                f"({4 * block_bytes / 2**20:.2f} MiB) are needed; raise kv_cache_mb"
            )
        log.info(
            "KV cache: %d blocks of %d tokens, %.0f MiB (%s); one request holds up to %d tokens, the context is %d",
            num_blocks,
            cfg.block_size,
            num_blocks * block_bytes / 2**20,
            "kv_cache_mb"
            if cfg.kv_cache_bytes is not None
            else "default: 512 MiB or one request at the context",
            self.max_request_tokens,
            self.max_model_len,
        )
        check_pool_fits(num_blocks * block_bytes, bundle.device, cfg.kv_cache_bytes is None)
        if self.max_request_tokens < self.max_model_len:
            log.warning(
                "the KV cache (%d blocks of %d tokens) holds at most %d tokens of one request's prompt and output, "
                "less than the context of %d: longer requests are refused (kv_cache_mb raises it)",
                num_blocks,
                cfg.block_size,
                self.max_request_tokens,
                self.max_model_len,
            )
        self.pool = KVPool(
            sp.num_layers,
            sp.num_kv_heads,
            sp.head_dim,
            num_blocks,
            cfg.block_size,
            bundle.dtype,
            bundle.device,
        )
        self.prefix_cache = PrefixCache(
            self.pool,
            provider,
            cfg.prefix_cache_bytes if cfg.prefix_cache_bytes is not None else num_blocks * block_bytes // 2,
            loader_threads=cfg.loader_threads,
            on_loaded=on_prefix_loaded,
            max_pending=cfg.max_num_seqs,  # no more prefixes ahead of use than requests can start
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                cfg.max_num_seqs,
                cfg.max_num_batched_tokens,
                cfg.max_waiting,
                cfg.prompt_cache,
                self.max_model_len,
                cfg.fair_scheduling,
                cfg.speculative_tokens,
                *cfg.spec_ngram,
                CPU_LONG_PREFILL_TOKENS
                if cfg.long_prefill_tokens is None and bundle.device.type == "cpu"
                else cfg.long_prefill_tokens or 0,
            ),
            self.pool,
            self.prefix_cache,
            # (what `_chain_ok` looks for among the waiting; not a bound method: no cycle through the engine)
            marked=lambda seq: not LLMEngine._joinable(seq),
        )
        if bundle.device.type == "cuda":
            # the runner's start-up kernels launch on this thread's current device (an index: set_device refuses
            # a bare torch.device("cuda"))
            d = bundle.device
            torch.cuda.set_device(d.index if d.index is not None else torch.cuda.current_device())
        self.runner = ModelRunner(
            bundle,
            self.pool,
            self.max_model_len,
            packed_weights=cfg.packed_weights,
            graphs=cfg.graphs,
            max_graph_batch=cfg.max_num_seqs,
            kernels=cfg.kernels,
        )
        graphs = self.runner.graphs
        if graphs is not None:
            secs = graphs.capture_all()
            log.info(
                "decode graphs (%s) for batch sizes %s ready in %.1fs",
                self.runner.graph_mode,
                ",".join(map(str, graphs.batches)),
                secs,
            )
        self.eos_ids = set(sp.eos_token_ids)
        tok_eos = getattr(bundle.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            self.eos_ids.add(int(tok_eos))
        # structured outputs: end-of-sequence inside a grammar is the tokenizer's (the chat turn's end)
        eos = int(tok_eos) if tok_eos is not None else (sp.eos_token_ids[0] if sp.eos_token_ids else None)
        self.grammars = GrammarCompiler(
            bundle.tokenizer, sp.vocab_size, eos, mask_budget_ms=cfg.mask_budget_ms
        )
        self.mask_budget = MaskBudget(self.grammars.mask_budget_s)
        self.on_step = on_step
        self._seqs: dict[str, Sequence] = {}
        self._callbacks: dict[str, EventCallback] = {}
        if cfg.async_decode not in ("auto", "on", "off"):
            raise ValueError(f"async_decode must be auto, on or off, not {cfg.async_decode!r}")
        if cfg.async_decode == "on" and cfg.speculative_tokens > 0:
            raise ValueError("async_decode cannot run with speculative decoding")
        self.async_decode = cfg.async_decode == "on" or (
            cfg.async_decode == "auto" and bundle.device.type == "cuda" and cfg.speculative_tokens <= 0
        )
        self._inflight: _Inflight | None = None
        self._follow_admitted: list[Sequence] = []  # the requests the last follow-up step admitted
        self._cuda_device = self.runner.cuda_index
        self.num_async_steps = 0  # steps launched from the previous step's tokens on the device
        # tokens the steps have processed so far, as they run (the periodic stats line's throughputs): prompt tokens
        # computed (not those whose KV came from the prompt cache) and tokens generated (every accepted draft too)
        self.num_prompt_tokens_computed = 0
        self.num_generated_tokens = 0

    # ------------------------------------------------------------------ requests
    def validate(self, req: Request, *, check_queue: bool = True) -> None:
        """Raise before accepting what can never run (same checks the HTTP layer maps to 4xx/503); `check_queue`
        False: the caller admitted it against the queue already (`AsyncEngine.submit`)."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        vocab = self.bundle.spec.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_token_ids):
            raise ValueError("prompt token id out of the vocabulary")
        # (more alternatives than the vocabulary: the step's top-k over every row raised, failing its other rows)
        for what, k in (
            ("logprobs", req.sampling.logprobs),
            ("prompt_logprobs", req.sampling.prompt_logprobs),
        ):
            if k is not None and k > vocab:
                raise ValueError(f"{what} ({k}) is more than the vocabulary's {vocab} tokens")
        total = n + req.sampling.max_tokens
        # the last output token takes no position (it is never fed back): a prompt filling the context may still
        # ask for the one token after it (echo with max_tokens 0 scores a prompt so); else vLLM's prompt + output
        if total > self.max_model_len and not (n == self.max_model_len and req.sampling.max_tokens == 1):
            raise RequestTooLarge(
                f"prompt ({n} tokens) + max_tokens ({req.sampling.max_tokens}) exceeds the context limit "
                f"of {self.max_model_len} tokens"
            )
        if total > self.max_request_tokens:
            raise RequestTooLarge(
                f"prompt ({n} tokens) + max_tokens ({req.sampling.max_tokens}) is more than the "
                f"{self.max_request_tokens} tokens of one request the KV cache budget holds"
            )
        if check_queue and (queued := self.queued(0)) >= self.cfg.max_waiting:
            raise QueueFull(f"{queued} requests already waiting for a place in the batch")

    def request_tokens(self, prefix_len: int) -> int:
        """Prompt + output tokens one request beside a prefix of `prefix_len` may hold in the KV cache: its share
        (`max_request_tokens`) and what the prefix's own blocks leave of the pool. The prompt starts a block of its
        own, as the scheduler's admission counts it (`Scheduler._admit`)."""
        left = (self.pool.num_blocks - self.pool.blocks_for(prefix_len)) * self.pool.block_size
        return min(self.max_request_tokens, left)

    def room(self, prefix_len: int, prompt_len: int, *, scoring: bool = False) -> int:
        """Most output tokens a request of this prefix and prompt length may ask for (<= 0: none fit): within the
        context (`max_model_len`, prefix included) and the KV cache's share for it (`request_tokens`): exactly what
        `validate` and the scheduler's admission accept. `scoring`: a request whose one output token is not part
        of the answer (echo with max_tokens 0): that token takes no position, so the prompt may fill the context
        (vLLM counts prompt + 0); the KV cache still counts it."""
        return (
            min(self.max_model_len - prefix_len + int(scoring), self.request_tokens(prefix_len)) - prompt_len
        )

    @property
    def max_prefix_len(self) -> int:
        """The longest prefix a request can be served with (a prompt token and an output token beside it): within
        the context, and leaving a block of the KV pool (`PrefixCache` refuses to install a longer one)."""
        return min(self.max_model_len - 2, (self.pool.num_blocks - 1) * self.pool.block_size)

    @property
    def capacity(self) -> int:
        """Requests the engine takes at once: a batch's rows and a full queue behind them."""
        return self.cfg.max_num_seqs + self.cfg.max_waiting

    def queued(self, pending: int) -> int:
        """Requests waiting beyond the batch's free rows (`pending`: submitted, not added yet): what the queue limit
        counts. Requests that a free row takes at the next step are not queued: a burst on an idle engine fills
        the batch before the queue."""
        free = max(0, self.cfg.max_num_seqs - len(self.scheduler.running))
        return max(0, len(self.scheduler.waiting) + pending - free)

    def add_request(
        self, req: Request, on_event: EventCallback | None = None, *, admitted: bool = False
    ) -> None:
        """Queue `req`. `admitted`: already counted against the queue limit when it was accepted (a preemption
        since may have lengthened the queue: an accepted request is not refused for that)."""
        if req.request_id in self._seqs:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.validate(req, check_queue=not admitted)
        gen = None if req.sampling.greedy else make_generator(req.sampling.seed, self.bundle.device)
        so = req.sampling.structured
        seq = Sequence(
            req, self.bundle.tokenizer, gen, self.grammars.constraint(so) if so else None, self.token_texts
        )
        self._seqs[req.request_id] = seq
        if on_event is not None:
            self._callbacks[req.request_id] = on_event
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        seq.aborted = True
        self._finish(seq, "abort")
        return True

    def fail_all(self, error: str, error_type: str) -> None:
        """End every unfinished request with an error event (`error_type` names it to the API): the server is
        going away and its clients should hear why."""
        for seq in list(self._seqs.values()):
            seq.error, seq.error_type = error, error_type
            self._finish(seq, "error")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def tend_prefixes(self) -> None:
        """What an engine with nothing to run does when woken: apply the store's changes and take in finished
        prefix fetches (a step does that; an idle replica's changes piled up, then all waited on its next request)."""
        # (an install copies into the pool: on this thread's current device, as a step's kernels)
        if self._cuda_device is not None:
            torch.cuda.set_device(self._cuda_device)
        self.prefix_cache.process()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ step
    def step(self) -> list[TokenEvent]:
        if self._cuda_device is not None:
            # kernels (Triton's, CUDA graphs' capture stream) launch on the calling thread's current device
            torch.cuda.set_device(self._cuda_device)
        if self._inflight is not None:
            return self._advance()
        t0 = time.perf_counter()
        items = self.scheduler.schedule()
        events: list[TokenEvent] = []
        for seq in self.scheduler.failed:
            events.append(self._finish(seq, "error"))
        self.scheduler.failed.clear()
        if not items:
            return events
        now = time.monotonic()
        rows = []
        for it in items:
            s = it.seq
            if s.first_scheduled is None:
                s.first_scheduled = now
                s.cached_prompt_tokens = s.num_cached
            end = s.num_cached + it.num_tokens - len(it.draft)
            plp = s.prompt_logprobs
            row = self._row(
                s,
                s.tokens[s.num_cached : end] + it.draft,
                sample=end == s.num_tokens,
                all_logits=bool(it.draft)  # a verified draft needs the logits of every position
                or (plp is not None and len(plp) < len(s.prompt) and s.num_cached < len(s.prompt)),
            )
            # a greedy decoding row's token and its drafts: its tokens must be plain decoding's to the bit (a
            # sampled row's drafts keep only its distribution, and a seeded row does not draft)
            row.verify = bool(it.draft) and end - s.num_cached == 1 and s.req.sampling.greedy
            rows.append(row)
        try:
            inp = self.runner.prepare(rows)
            logits = self.runner.forward(inp)
            samplers = [it.seq for it, r in zip(items, rows, strict=True) if r.sample and not it.draft]
            verified: list[tuple[ScheduledItem, list[int] | None, list[TokenLogprob] | None]] = []
            if any(r.all_logits for r in rows):
                logits, spec_logits = self._split_logits(items, rows, logits)
                if spec_logits is not None:
                    verified = self._verify(items, spec_logits)
            if logits.shape[0] != len(samplers):
                raise RuntimeError(f"{logits.shape[0]} logit rows for {len(samplers)} sampling rows")
            computed = [it.seq for it, r in zip(items, rows, strict=True) if not r.sample]
            # (rows only computed here continue in the chain's next step: only if they can join it)
            if (
                self.async_decode
                and self._deferrable(items, rows, samplers)
                and all(self._joinable(q) for q in computed)
            ):
                self._inflight = self._launch_sampling(samplers, logits, self.scheduler._fresh)
                self._inflight.computed = computed
            # structured outputs: grammar masks on the CPU while a GPU forward may still be running
            constrained = [i for i, s in enumerate(samplers) if s.constraint is not None]
            masks = None
            grammar_failed: dict[int, str] = {}  # rows whose grammar cannot go on (limits, time budget)
            if constrained:
                cons: list[Constraint] = [samplers[i].constraint for i in constrained]  # type: ignore[misc]
                owners = [samplers[i].req.tenant for i in constrained]
                bitmask, bad = self.mask_budget.fill(cons, logits.shape[-1], owners)
                masks = (constrained, bitmask)
                grammar_failed = {constrained[j]: why for j, why in bad.items()}
            # thinking budgets spent: the closing tag's tokens
            forced = {
                i: tok
                for i, s in enumerate(samplers)
                if s.thinking is not None and (tok := s.thinking.forced()) is not None
            }
            res = (
                None
                if self._inflight is not None
                else sample(
                    logits,
                    [s.req.sampling for s in samplers],
                    [s.generator for s in samplers],
                    [(s.prompt, s.output) for s in samplers],
                    self.eos_ids,
                    masks,
                    forced,
                )
            )
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("engine step failed")
            self.scheduler.rollback()
            for it in items:
                it.seq.error, it.seq.error_type = f"engine step failed: {e}", type(e).__name__
                events.append(self._finish(it.seq, "error"))
            return events
        for it in items:
            self.num_prompt_tokens_computed += _prompt_part(it.seq, it.num_tokens - len(it.draft))
            it.seq.num_cached += it.num_tokens - len(it.draft)
        now = time.monotonic()
        if res is not None:
            failed = {i: (why, _SAMPLING_ERRORS.get(why, "SamplingError")) for i, why in res.failed.items()}
            failed.update(
                {i: (f"structured output: {why}", "GrammarError") for i, why in grammar_failed.items()}
            )
            events.extend(self._deliver(samplers, res.tokens, failed, res.logprobs, now))
        for it, emitted, emitted_lps in verified:
            seq = it.seq
            if seq.status is not SeqStatus.RUNNING:  # ended by an earlier row's event callback (abort)
                continue
            if emitted is None:
                seq.error = NON_FINITE
                seq.error_type = "SamplingError"
                events.append(self._finish(seq, "error"))
                continue
            self.scheduler.draft_verified(seq, len(emitted) - 1)
            seq.num_cached += len(emitted) - 1  # the accepted drafts' KV was written by this step
            for j, tok in enumerate(emitted):
                ev = self._append(seq, tok, now, emitted_lps[j] if emitted_lps else None)
                if ev is not None:
                    events.append(ev)
                    if ev.finished or seq.status is not SeqStatus.RUNNING:  # its own callback may abort it
                        break
            self.scheduler.register_accepted(seq)
        if self.on_step is not None:
            n_prefill = sum(it.num_tokens for it in items if it.num_tokens > 1 and not it.draft)
            self._report(
                len(items),
                n_prefill,
                sum(1 for it in items if it.num_tokens == 1 or it.draft),
                len({it.seq.req.prefix for it in items}),
                t0,
            )
        return events

    @staticmethod
    def _row(seq: Sequence, tokens: list[int], sample: bool, all_logits: bool = False) -> RowInput:
        """`seq`'s row of a step: `tokens` fed from its first own token without KV (`num_cached`) on."""
        return RowInput(
            tokens=tokens,
            start_pos=seq.prefix_len + seq.num_cached,
            prefix_len=seq.prefix_len,
            prefix_blocks=seq.prefix.blocks if seq.prefix is not None else [],
            own_blocks=seq.own_blocks,
            own_cached=seq.num_cached,
            sample=sample,
            all_logits=all_logits,
        )

    def _report(self, scheduled: int, prefill: int, decode: int, prefixes: int, t0: float) -> None:
        if self.on_step is not None:
            self.on_step(
                StepStats(
                    num_running=len(self.scheduler.running),
                    num_waiting=len(self.scheduler.waiting),
                    num_scheduled=scheduled,
                    num_prefill_tokens=prefill,
                    num_decode_tokens=decode,
                    distinct_prefixes=prefixes,
                    duration_s=time.perf_counter() - t0,
                )
            )

    def _deliver(
        self,
        samplers: list[Sequence],
        tokens: list[int],
        failed: dict[int, tuple[str, str]],
        logprobs: dict[int, TokenLogprob],
        now: float,
    ) -> list[TokenEvent]:
        """Append each row's sampled token (or end the row with its error); the events, in row order."""
        events: list[TokenEvent] = []
        for i, (seq, tok) in enumerate(zip(samplers, tokens, strict=True)):
            if seq.status is not SeqStatus.RUNNING:  # ended by an earlier row's event callback (abort)
                continue
            if i in failed:  # this request alone ends with an error; the rest of the batch carries on
                seq.error, seq.error_type = failed[i]
                if seq.error_type == "SamplingError":
                    log.warning("request %s: %s", seq.request_id, seq.error)
                events.append(self._finish(seq, "error"))
                continue
            ev = self._append(seq, tok, now, logprobs.get(i))
            if ev is not None:
                events.append(ev)
        return events

    # ------------------------------------------------------------------ async decode
    @staticmethod
    def _deferrable(items: list[ScheduledItem], rows: list[RowInput], samplers: list[Sequence]) -> bool:
        """Whether a step's tokens may stay on the device: every sampling row samples one token from its raw logits
        (greedy, or temperature / top-k / top-p / min-p with its generator, logprobs or not; no penalties, bias,
        grammar or drafts), which the device decides alone, and no row needs the logits of every position. Rows
        that sample nothing (a prompt chunk before the last) may be in it: the chain's next step takes them on."""
        if any(r.all_logits or it.draft for it, r in zip(items, rows, strict=True)):
            return False
        return all(LLMEngine._device_sampled(seq) for seq in samplers)

    @staticmethod
    def _device_sampled(seq: Sequence) -> bool:
        """Whether the device alone decides the request's tokens (no penalties, bias, min_tokens, grammar or thinking
        budget)."""
        return not seq.req.sampling.processed and seq.constraint is None and seq.thinking is None

    @staticmethod
    def _joinable(seq: Sequence) -> bool:
        """Whether a request can run in a chained step (`_follow_up`) beside rows fed device tokens: its tokens are
        sampled on the device and it needs no logits of every position (prompt logprobs)."""
        return LLMEngine._device_sampled(seq) and seq.prompt_logprobs is None

    def _launch_sampling(self, seqs: list[Sequence], logits: torch.Tensor, fresh: list[int]) -> _Inflight:
        """Tokens sampled on the device, copied to pinned host memory behind the step's kernels; the host waits
        for them only when it needs them (`_complete`), with the next step already queued."""
        if not seqs:  # the step only computed prompt chunks: nothing to wait for
            none = torch.empty(0, dtype=torch.long, device=logits.device)
            return _Inflight([], none, torch.empty((3, 0), dtype=torch.long), None, list(fresh))
        cuda = logits.device.type == "cuda"
        lp_rows = [i for i, s in enumerate(seqs) if s.req.sampling.logprobs is not None]
        lp_tops = [seqs[i].req.sampling.logprobs or 0 for i in lp_rows]
        width = logprobs_width(max(lp_tops)) if lp_rows else 0
        # allocated first: nothing after the generators draw can fail and leave them advanced
        pinned = torch.empty((3, len(seqs)), dtype=torch.long, pin_memory=True) if cuda else None
        lp_pinned = torch.empty((len(seqs), width), pin_memory=True) if cuda and lp_rows else None
        packed = sample_on_device(logits, [s.req.sampling for s in seqs], [s.generator for s in seqs])
        tokens = packed[0]
        # the model's log-probabilities of every row's token (all rows: no host-side row index), read for lp_rows
        lp = logprobs_on_device(logits, None, tokens, lp_tops) if lp_rows else None
        done = None
        host, lp_host = packed, lp
        if pinned is not None:
            host = pinned
            host.copy_(packed, non_blocking=True)
            if lp is not None and lp_pinned is not None:
                lp_host = lp_pinned
                lp_host.copy_(lp, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(packed.device))
        return _Inflight(seqs, tokens, host, done, list(fresh), lp_rows, lp_tops, lp_host)

    def _chain_ok(self, fl: _Inflight) -> bool:
        """A follow-up step may be launched unless the scheduler has work the chain cannot take: a running row
        without a token in flight, or a waiting request it could admit now (a free slot, and a prefix that is
        resident, fetched or not yet asked for), that needs its tokens on the host (penalties, a grammar, prompt
        logprobs: `_joinable`), or a full batch that owes a waiting tenant below its share a row (the scheduler's step
        preempts for it: `Scheduler._starved_victim`), or rows to spare and a request that the last admission stopped
        at for want of blocks its tenant's share has room for (`Scheduler._block_starved_victim`). The others join
        the follow-up; a waiting request whose prefix is still being fetched does not stop the chain."""
        s = self.scheduler
        carried = {id(q) for q in fl.seqs}
        if any(id(q) not in carried and not self._joinable(q) for q in s.running):
            return False
        if s.cfg.fair and s.waiting:
            full = len(s.running) >= self.cfg.max_num_seqs
            if (s._starved_victim() if full else s._block_starved_victim()) is not None:
                return False
        if s.waiting and len(s.running) < self.cfg.max_num_seqs:
            pc = self.prefix_cache
            return not any(q.req.prefix is None or pc.settled(q.req.prefix) for q in s.waiting.marked())
        return True

    def _follow_up(self, fl: _Inflight) -> _Inflight | None:
        """Launch the next step of the chain (vLLM v1's async scheduling), scheduled as the scheduler's own step
        would be: running rows in their order (priority, then age) within the token budget, then the waiting
        requests it admits. A row with a token in flight (`fl`'s) decodes fed that token straight from the device;
        it is left out when its next token ends it by length, and a row ended by its token (end of sequence, a stop
        string, an abort) is computed once more and its result dropped. A running row without one runs its next
        prompt chunk, or the token a step left it, from the host. None when a row cannot get a KV block without
        preempting, or nothing would run (the scheduler's next step decides)."""
        sched = self.scheduler
        sched._fresh = []
        self._follow_admitted = []
        in_flight = {id(q): i for i, q in enumerate(fl.seqs)}
        keep: list[int] = []  # the carried rows, as indices into fl.seqs (and fl.tokens)
        extra: list[tuple[Sequence, int]] = []
        budget = self.cfg.max_num_batched_tokens
        sched.begin_step()
        # a row ended by the token being delivered may still take a block here (even evicting an idle prefix or a
        # cached prompt block) that the synchronous engine would not have needed; it is freed with the row
        for seq in sched._ranked():
            if budget <= 0:
                break
            i = in_flight.get(id(seq))
            if i is not None:
                if len(seq.output) + 2 > seq.req.sampling.max_tokens:
                    continue
                if seq.prefix_len + seq.num_tokens + 2 > self.max_model_len:
                    continue
                n = 1
            else:
                n = sched._chunk(seq, budget)
                if n <= 0:
                    continue
            if not sched._ensure_blocks(seq, n):
                return None
            if i is not None:
                keep.append(i)
            else:
                extra.append((seq, n))
            budget -= n
        carried = [fl.seqs[i] for i in keep]
        # registered once every row has its blocks (nothing to undo), before admission (a newcomer may take them)
        for seq, n in extra:
            sched._register(seq, seq.num_cached + n)
        rows = [self._row(seq, [0], sample=True) for seq in carried]  # token 0: replaced on the device
        if sched.waiting and budget > 0 and len(sched.running) < self.cfg.max_num_seqs:
            admitted = sched._admit(budget, only=self._joinable, admitted=self._follow_admitted)
            extra += [(it.seq, it.num_tokens) for it in admitted]
        if not rows and not extra:
            return None
        now = time.monotonic()
        samplers = list(carried)
        for seq, n in extra:
            sample = seq.num_cached + n == seq.num_tokens
            rows.append(self._row(seq, seq.tokens[seq.num_cached : seq.num_cached + n], sample=sample))
            if sample:
                samplers.append(seq)
        inp = self.runner.prepare(rows)
        if carried:
            # the carried rows come first in `rows` and, one token each, first in the step's flat tokens
            src = fl.tokens
            if keep != list(range(len(fl.seqs))):
                src = src.index_select(0, self.runner.upload(keep))
            inp.input_ids[: len(carried)].copy_(src)
        logits = self.runner.forward(inp)
        nxt = self._launch_sampling(samplers, logits, sched._fresh)
        sched._fresh = []
        sampled = {id(q) for q in samplers}
        for seq in carried:
            seq.num_cached += 1
        for seq, n in extra:
            if seq.first_scheduled is None:  # once launched (a follow-up that fails to launch starts nothing)
                seq.first_scheduled = now
                seq.cached_prompt_tokens = seq.num_cached
            self.num_prompt_tokens_computed += _prompt_part(seq, n)
            seq.num_cached += n
        nxt.computed = [seq for seq, _ in extra if id(seq) not in sampled]
        seqs = carried + [seq for seq, _ in extra]
        nxt.counts = (
            len(seqs),
            sum(n for _, n in extra if n > 1),
            len(carried) + sum(1 for _, n in extra if n == 1),
            len({q.req.prefix for q in seqs}),
        )
        self.num_async_steps += 1
        return nxt

    @staticmethod
    def _read(fl: _Inflight) -> tuple[list[list[int]], list[list[float]] | None]:
        """Wait for a launched step's tokens and logprobs (only the device's failures can raise here)."""
        if fl.done is not None:
            fl.done.synchronize()
        return fl.host.tolist(), (fl.lp_host.tolist() if fl.lp_host is not None else None)

    def _complete(
        self, fl: _Inflight, host: tuple[list[list[int]], list[list[float]] | None]
    ) -> list[TokenEvent]:
        (tokens, finite, valid), lp = host
        logprobs = {}
        if lp is not None:
            rows = fl.lp_rows
            logprobs = logprobs_from_host([lp[i] for i in rows], rows, [tokens[i] for i in rows], fl.lp_tops)
        failed = {i: (INVALID_DISTRIBUTION, "SamplingError") for i, ok in enumerate(valid) if not ok}
        failed.update({i: (NON_FINITE, "SamplingError") for i, ok in enumerate(finite) if not ok})
        return self._deliver(fl.seqs, tokens, failed, logprobs, time.monotonic())

    def _advance(self) -> list[TokenEvent]:
        """Async decode: launch the follow-up of the step in flight (when the chain may go on), then deliver the
        step in flight's tokens while the follow-up runs."""
        t0 = time.perf_counter()
        fl, self._inflight = self._inflight, None
        assert fl is not None
        nxt = None
        if self._chain_ok(fl):
            try:
                nxt = self._follow_up(fl)
            except Exception:  # the rows carry on through the scheduler's next (synchronous) step
                log.exception("async follow-up step failed to launch")
                self.scheduler.rollback()
                self.scheduler.unadmit(self._follow_admitted)  # its newcomers: admitted again, afresh
                nxt = None
        # requests the follow-up's admission failed (a prefix that cannot load, too large for the context)
        events: list[TokenEvent] = [self._finish(seq, "error") for seq in self.scheduler.failed]
        self.scheduler.failed.clear()
        try:
            host = self._read(fl)
        except Exception as e:
            # the device failed the step: its requests (and a follow-up's) end with an error
            log.exception("engine step failed")
            # the follow-up's registered blocks too: it ran after the failure (its newcomers' KV is not valid)
            self.pool.forget(fl.fresh + (nxt.fresh if nxt is not None else []))
            later = nxt.seqs + nxt.computed if nxt is not None else []
            for seq in fl.seqs + fl.computed + later:
                if seq.status is SeqStatus.RUNNING:
                    seq.error, seq.error_type = f"engine step failed: {e}", type(e).__name__
                    events.append(self._finish(seq, "error"))
            return events
        # tracked before delivery: an event callback that raises still leaves the follow-up accounted for
        self._inflight = nxt
        events += self._complete(fl, host)
        if nxt is not None:
            # prompt cache: the blocks that the follow-up's tokens (now known) complete
            sched = self.scheduler
            sched._fresh = []
            for seq in nxt.seqs:
                if seq.status is SeqStatus.RUNNING:
                    sched._register(seq, seq.num_cached)
            nxt.fresh += sched._fresh
            sched._fresh = []
            self._report(*nxt.counts, t0)
        return events

    def _split_logits(
        self, items: list[ScheduledItem], rows: list[RowInput], logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a step's logits with `all_logits` rows: record the prompt log-probabilities of prompt chunks
        (logit j of a chunk starting at own token a predicts prompt token a + j + 1) and return the logit rows of the
        sampling rows (their last position) and, if any, every position of the rows verifying a draft, in order."""
        keep: list[int] = []
        spec: list[int] = []
        i = 0
        for it, r in zip(items, rows, strict=True):
            if not r.all_logits:
                if r.sample:
                    keep.append(i)
                    i += 1
                continue
            seq, n = it.seq, len(r.tokens)
            if it.draft:
                spec.extend(range(i, i + n))
                i += n
                continue
            plp = seq.prompt_logprobs
            assert plp is not None  # (all logits and no draft: its prompt log-probabilities were asked for)
            first = len(plp)  # the next prompt token without a log-probability
            targets = range(max(first, r.own_cached + 1), min(r.own_cached + n + 1, len(seq.prompt)))
            if targets and targets[0] == first:  # in order; a recomputation after preemption adds nothing
                lrows = [i + t - 1 - r.own_cached for t in targets]
                top = seq.req.sampling.prompt_logprobs or 0
                got = token_logprobs(logits, lrows, [seq.prompt[t] for t in targets], [top] * len(lrows))
                plp.extend(got[j] for j in lrows)
            if r.sample:
                keep.append(i + n - 1)
            i += n
        dev = logits.device
        sampled = logits.index_select(0, torch.tensor(keep, dtype=torch.long, device=dev))
        if not spec:
            return sampled, None
        return sampled, logits.index_select(0, torch.tensor(spec, dtype=torch.long, device=dev))

    def _verify(
        self, items: list[ScheduledItem], spec_logits: torch.Tensor
    ) -> list[tuple[ScheduledItem, list[int] | None, list[TokenLogprob] | None]]:
        """The tokens each draft-verifying row emits, and their log-probabilities if it asked: greedy rows by
        `spec.accept` from one argmax over all their positions (one device sync), sampled rows by speculative
        sampling (`spec.accept_sampled`, with the row's generator); position j's logits are what the j-th emitted
        token was chosen from, so its log-probability comes from there. None for a row whose logits are not finite
        (it fails alone, as in `sample`)."""
        host = torch.stack([greedy_tokens(spec_logits), finite_rows(spec_logits).long()]).tolist()
        greedy, finite = host[0], host[1]
        out: list[tuple[ScheduledItem, list[int] | None, list[TokenLogprob] | None]] = []
        i = 0
        for it in items:
            if it.draft:
                n = len(it.draft) + 1
                p = it.seq.req.sampling
                emitted: list[int] | None = None
                lps: list[TokenLogprob] | None = None
                if all(finite[i : i + n]):
                    if p.greedy:
                        emitted = accept(it.draft, greedy[i : i + n])
                    else:
                        emitted = accept_sampled(it.draft, spec_logits[i : i + n], p, it.seq.generator)
                    if p.logprobs is not None:
                        rows = list(range(i, i + len(emitted)))
                        got = token_logprobs(spec_logits, rows, emitted, [p.logprobs] * len(rows))
                        lps = [got[r] for r in rows]
                out.append((it, emitted, lps))
                i += n
        return out

    def _append(
        self, seq: Sequence, tok: int, now: float, lp: TokenLogprob | None = None
    ) -> TokenEvent | None:
        # the mask allowed the token, so a refusal is a parser/lexer limit the grammar ran into (or a forced token
        # the grammar does not take); the refused token is not the output's (nor counted in its usage or timings)
        if seq.constraint is not None and not seq.constraint.accept(tok):
            seq.error, seq.error_type = f"structured output: {seq.constraint.error}", "GrammarError"
            return self._finish(seq, "error")
        gap: tuple[float, ...] = ()
        if seq.first_token is None:
            seq.first_token = now
        elif seq.last_token is not None and now != seq.last_token:
            # (a step's accepted drafts share its time: one gap per step, as vLLM's ITL)
            gap = (now - seq.last_token,)
            seq.itl.append(gap[0])
        seq.last_token = now
        seq.output.append(tok)
        self.num_generated_tokens += 1
        if seq.thinking is not None:
            seq.thinking.feed(tok)
        p = seq.req.sampling
        reason = None
        delta = ""
        if (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids:
            reason = "stop"
            if tok in p.stop_token_ids:
                seq.stop_reason = tok
            if seq.detok is not None and p.include_stop_str_in_output:
                # its text ends the output (vLLM's; with skip_special_tokens a special token has none)
                delta = seq.detok.add(tok)[0]
        elif seq.detok is not None:
            delta, hit = seq.detok.add(tok)
            if hit:
                reason = "stop"
                seq.stop_reason = seq.detok.stop_string
        if reason is None and seq.constraint is not None and seq.constraint.done:
            reason = "stop"  # the grammar is complete: nothing but end-of-sequence could follow
        if reason is None and (
            len(seq.output) >= p.max_tokens or seq.prefix_len + seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        lps = [lp] if lp is not None else None
        plps = seq.prompt_logprobs if len(seq.output) == 1 else None
        if reason is not None:
            return self._finish(seq, reason, delta, [tok], lps, plps, gap)
        ev = TokenEvent(
            seq.request_id,
            [tok],
            delta,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
            cached_tokens=seq.cached_prompt_tokens,
            logprobs=lps,
            prompt_logprobs=plps,
            arrival_time=seq.arrival,
            first_scheduled_time=seq.first_scheduled,
            itl=gap,
        )
        self._emit(ev)
        return ev

    def _final_text(self, seq: Sequence, delta: str) -> str:
        if seq.detok is not None:
            return delta + seq.detok.finish()
        out = seq.output
        p = seq.req.sampling
        if (
            seq.finish_reason == "stop"
            and out
            and (out[-1] in p.stop_token_ids or (not p.ignore_eos and out[-1] in self.eos_ids))
            and not p.include_stop_str_in_output
        ):
            # the token that stopped it is not text (as when streamed: it never reaches the detokenizer)
            out = out[:-1]
        return decode_output(
            self.bundle.tokenizer,
            seq.prompt,
            out,
            p.skip_special_tokens,
            p.spaces_between_special_tokens,
            self.token_texts,
        )

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        delta: str = "",
        new: list[int] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
        itl: tuple[float, ...] = (),
    ) -> TokenEvent:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self._seqs.pop(seq.request_id, None)
        text = "" if reason in ("abort", "error") else self._final_text(seq, delta)
        if reason in ("length", "stop") and seq.detok is not None and seq.detok.stopped:
            # (the last token completed a stop string that was held back with a partial character: it ended the
            # text, whatever else also ended the request)
            reason = seq.finish_reason = "stop"
            seq.stop_reason = seq.detok.stop_string
        ev = TokenEvent(
            seq.request_id,
            new or [],
            text,
            finished=True,
            finish_reason=reason,  # type: ignore[arg-type]
            stop_reason=seq.stop_reason if reason == "stop" else None,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
            cached_tokens=seq.cached_prompt_tokens,
            error=seq.error,
            error_type=seq.error_type,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            arrival_time=seq.arrival,
            first_scheduled_time=seq.first_scheduled,
            itl=itl,
        )
        self._emit(ev)
        self._callbacks.pop(seq.request_id, None)
        return ev

    def _emit(self, ev: TokenEvent) -> None:
        """Hand an event to its request's callback. A callback that raises (a consumer that went away: its event
        loop closed, a bug) loses its request, aborted here, and nothing else: the step's other rows still get
        their tokens and the engine thread lives on."""
        cb = self._callbacks.get(ev.request_id)
        if cb is None:
            return
        try:
            cb(ev)
        except Exception:
            log.exception("request %s: its event callback failed; the request is aborted", ev.request_id)
            self._callbacks.pop(ev.request_id, None)
            seq = self._seqs.get(ev.request_id)
            if seq is not None and not ev.finished:
                seq.aborted = True
                self._finish(seq, "abort")

    # ------------------------------------------------------------------ offline
    def generate(self, requests: list[Request]) -> list[Output]:
        """Run `requests` to completion (continuous batching) and return their outputs in order."""
        state: dict[str, dict] = {}
        for r in requests:
            state[r.request_id] = {
                "ids": [],
                "text": [],
                "t0": time.monotonic(),
                "times": [],
                "lps": [],
                "plps": None,
            }
            self.add_request(r)
        done: dict[str, TokenEvent] = {}
        while self.has_unfinished():
            stamped: set[str] = set()  # a request's tokens of one step (accepted drafts) arrive at one time
            for ev in self.step():
                st = state[ev.request_id]
                st["ids"].extend(ev.token_ids)
                st["text"].append(ev.text)
                st["lps"].extend(ev.logprobs or [])
                st["plps"] = ev.prompt_logprobs or st["plps"]
                if ev.token_ids and ev.request_id not in stamped:
                    stamped.add(ev.request_id)
                    st["times"].append(time.monotonic())
                if ev.finished:
                    done[ev.request_id] = ev
        outs = []
        for r in requests:
            st, ev = state[r.request_id], done[r.request_id]
            times = st["times"]
            outs.append(
                Output(
                    request_id=r.request_id,
                    token_ids=st["ids"],
                    text="".join(st["text"]),
                    finish_reason=ev.finish_reason or "error",
                    prompt_tokens=ev.prompt_tokens,
                    error=ev.error,
                    error_type=ev.error_type,
                    ttft=(times[0] - st["t0"]) if times else None,
                    itl=[b - a for a, b in itertools.pairwise(times)],
                    e2e=(times[-1] - st["t0"]) if times else None,
                    logprobs=st["lps"] if r.sampling.logprobs is not None else None,
                    prompt_logprobs=st["plps"],
                    stop_reason=ev.stop_reason,
                )
            )
        return outs

    def shutdown(self) -> None:
        fl, self._inflight = self._inflight, None
        if fl is not None and fl.done is not None:
            fl.done.synchronize()
        self.prefix_cache.shutdown()


def _prompt_part(seq: Sequence, n: int) -> int:
    """Of the `n` tokens a step feeds `seq` from its first without KV on, how many are its prompt's."""
    return max(0, min(seq.num_cached + n, len(seq.prompt)) - seq.num_cached)


def merge_events(a: TokenEvent, b: TokenEvent) -> TokenEvent:
    """One event saying what `a` then `b` (the next of the same request) say: their tokens, text and logprobs
    joined (and their inter-token latencies), the counts and the end as `b` has them, the arrival and
    first-scheduled times and the prompt's logprobs as the first that has them."""
    logprobs = (
        None if a.logprobs is None and b.logprobs is None else [*(a.logprobs or []), *(b.logprobs or [])]
    )
    return dataclasses.replace(
        b,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        logprobs=logprobs,
        itl=a.itl + b.itl,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
        arrival_time=a.arrival_time or b.arrival_time,
        first_scheduled_time=a.first_scheduled_time
        if a.first_scheduled_time is not None
        else b.first_scheduled_time,
    )


def _put_all(batch: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
    for q, ev in batch:
        q.put_nowait(ev)


class AsyncEngine:
    """Runs an LLMEngine on a dedicated thread; asyncio callers submit requests and read token events."""

    def __init__(self, engine: LLMEngine, torch_threads: int | None = None, stream_interval: int = 1) -> None:
        self.engine = engine
        # the engine thread's intra-op threads, pinned (default: what the process has now, before any training):
        # torch.set_num_threads in a training thread changes the count a thread takes at its first torch op, and
        # the engine's first request may come while a job trains (it ran on the trainer's 1 thread for good)
        self.torch_threads = torch_threads or torch.get_num_threads()
        # vLLM's --stream-interval: a request's tokens go to its consumer at least this many at a time (its first
        # event and its end at once): fewer events, SSE frames and route passes per token on a busy server, at the
        # cost of a coarser stream. The events held back, by consumer queue (`_interval`)
        self.stream_interval = max(1, stream_interval)
        self._held: dict[int, TokenEvent | None] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet seen by the engine thread
        # (error, error type) of the last `fail_all`: continuations submitted after it fail the same way
        self._failed: tuple[str, str] | None = None
        engine.prefix_cache.on_loaded = self._wake.set
        self.dead: BaseException | None = None
        # events the engine thread produced, handed to their event loops once per step (`_flush`): one wake-up of
        # a loop per step instead of one per token (each a lock and a self-pipe write, ~5% of a busy engine thread)
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenEvent], TokenEvent]] = []
        # the `generate` calls waiting for events: told when the engine thread dies (their requests never finish)
        # (keyed by their queue: a duplicate request id, refused by the engine, must not unregister the first one)
        self._consumers: dict[int, tuple[str, asyncio.AbstractEventLoop, asyncio.Queue[TokenEvent]]] = {}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        """Started, its thread running, and not died of an error (a dead engine's requests were all failed)."""
        t = self._thread
        return self.dead is None and t is not None and t.is_alive()

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + self._pending

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def submit(self, req: Request, on_event: EventCallback) -> None:
        """Validate and enqueue (thread-safe); raises QueueFull/RequestTooLarge/ValueError synchronously."""
        if self.dead is not None:
            raise RuntimeError("engine thread died") from self.dead
        with self._lock:
            queued = self.engine.queued(self._pending)
            if queued >= self.engine.cfg.max_waiting and not req.continuation:
                raise QueueFull(f"{queued} requests already waiting for a place in the batch")
            self._pending += 1
        try:
            self.engine.validate(req, check_queue=not req.continuation)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        self._inbox.put(("add", req, on_event))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def fail_all(self, error: str, error_type: str) -> None:
        """`LLMEngine.fail_all` on the engine thread, after the requests submitted before this call were added."""
        self._inbox.put(("fail_all", error, error_type))
        self._wake.set()

    async def generate(self, req: Request) -> AsyncGenerator[TokenEvent, None]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        # registered before `submit` looks at `dead`: a death after that look still reaches this consumer
        self._consumers[id(q)] = (req.request_id, loop, q)
        try:
            self.submit(req, lambda ev: self._post(loop, q, ev))
        except BaseException:
            self._consumers.pop(id(q), None)
            raise
        finished = False
        try:
            while True:
                ev = await q.get()
                if ev.finished:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            self._consumers.pop(id(q), None)
            if not finished:
                self.abort(req.request_id)

    def _post(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[TokenEvent], ev: TokenEvent) -> None:
        if threading.current_thread() is self._thread:
            if self.stream_interval > 1 and (ev := self._interval(q, ev)) is None:  # type: ignore[assignment]
                return
            self._outbox.append((loop, q, ev))
        else:  # not from the engine thread (nothing does that today): at once
            loop.call_soon_threadsafe(q.put_nowait, ev)

    def _interval(self, q: asyncio.Queue[TokenEvent], ev: TokenEvent) -> TokenEvent | None:
        """`ev` joined to what this consumer's earlier events held back, to send now (the request's first event,
        its last, or `stream_interval` tokens), or None: held back."""
        key = id(q)
        started = key in self._held
        held = self._held.pop(key, None)
        if held is not None:
            ev = merge_events(held, ev)
        if ev.finished:
            return ev
        if not started or len(ev.token_ids) >= self.stream_interval:
            self._held[key] = None
            return ev
        self._held[key] = ev
        return None

    def _flush(self) -> None:
        """Hand the step's events to their loops, one callback per loop. A loop that is closed (its consumers are
        gone) gets nothing, and its requests are aborted, as a failing event callback's would be."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]] = {}
        for loop, q, ev in items:
            by_loop.setdefault(loop, []).append((q, ev))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                for q, ev in batch:
                    self._consumers.pop(id(q), None)  # its generator will never run its clean-up
                    if not ev.finished:
                        self.engine.abort(ev.request_id)

    @staticmethod
    def _answer_error(req: Request, cb: EventCallback, error: str, error_type: str) -> None:
        ev = TokenEvent(req.request_id, [], "", True, "error", error=error, error_type=error_type)
        try:
            cb(ev)
        except Exception:
            log.exception("request %s: its event callback failed", req.request_id)

    def _drain(self) -> None:
        while True:
            try:
                op, arg, cb = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                with self._lock:
                    self._pending -= 1
                if arg.continuation and self._failed is not None:
                    self._answer_error(arg, cb, *self._failed)
                    continue
                try:
                    self.engine.add_request(arg, cb, admitted=True)
                except Exception as e:
                    # validated already; a race (e.g. a duplicate id) still answers the caller
                    self._answer_error(arg, cb, str(e), type(e).__name__)
            elif op == "fail_all":
                self._failed = (arg, cb)
                self.engine.fail_all(arg, cb)
            else:
                self.engine.abort(arg)

    def _loop(self) -> None:
        # (get_num_threads runs torch's per-thread set-up first: set after it, the count holds at the first op)
        torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            while not self._stop.is_set():
                self._drain()
                if self.engine.has_unfinished():
                    events = self.engine.step()
                    self._flush()
                    if not events and not self.engine.num_running:
                        # only requests waiting for a prefix fetch: sleep until one arrives
                        self._wake.wait(0.05)
                        self._wake.clear()
                else:
                    self.engine.tend_prefixes()
                    self._flush()  # events of requests that ended while being added or by fail_all
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException as e:  # reported through /ready and submit, and to every waiting request
            self.dead = e
            log.exception("engine thread died")
        finally:
            try:
                self._flush()
            except (
                Exception
            ):  # an engine that just died may fail an abort: its consumers are still told below
                log.exception("could not deliver the last events")
        if self.dead is not None:  # what it was is in the log above, not for clients
            self._fail_consumers("the inference engine stopped")

    def _fail_consumers(self, error: str) -> None:
        """End every waiting `generate` with an EngineDead error event (`dead` is set first: a request submitted
        from now on is refused instead)."""
        for rid, loop, q in list(self._consumers.values()):
            ev = TokenEvent(rid, [], "", True, "error", error=error, error_type="EngineDead")
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody is waiting
                loop.call_soon_threadsafe(q.put_nowait, ev)

    def idle(self) -> bool:
        """Every accepted request has finished (a dead engine's were all told so: nothing is left to wait for)."""
        return self.dead is not None or (not self.engine.has_unfinished() and self._pending == 0)

    async def drain(self, timeout: float) -> bool:
        """Wait until every accepted request has finished (graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle():
                return True
            await asyncio.sleep(0.02)
        return self.idle()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.shutdown()
