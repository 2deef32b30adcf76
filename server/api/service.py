"""Runtime state of one server: model bundle, store, engine, job manager, prefix metadata cache, tenant slots.

`Service.generate_many(...)` is the one path every generation route takes: resolve the prefix, render and tokenize the
prompt (off the event loop), check limits, take a tenant slot, submit to the AsyncEngine and turn its token events
into a `GenerationRun` (server/api/run.py) that the route reads to completion or streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from prefix_store import PrefixMeta, PrefixStore, errors
from prefix_store.format import label
from server import model as _model
from server.api.errors import APIError, field_name, unavailable
from server.api.limits import RateLimiter, RedisRateLimiter, TenantLimit, load_limits_file
from server.api.logprobs import TokenTexts
from server.api.metrics import Metrics, count_jobs
from server.api.prefix_meta import PrefixMetaCache, Refusal, ResolvedPrefix
from server.api.reasoning import ReasoningParser, get_reasoning_parser
from server.api.run import GenerationRun, outcome_read, prompt_groups, race_disconnect, share_prompts
from server.api.schemas import BASE_PREFIX, ResponseFormat, StructuredOutputsParam, check_text
from server.api.structured import engine_spec
from server.api.tool_parsers import ToolParser, detect, get_parser
from server.api.usage import RedisUsageMeter, UsageMeter
from server.engine import (
    AsyncEngine,
    EngineConfig,
    GrammarError,
    LLMEngine,
    PrefixKey,
    Request,
    SamplingParams,
    StructuredOutputs,
)
from server.engine.daemon_pool import DaemonThreadPool
from server.engine.thinking import closing_tag_rest, tokens_after_tag
from server.engine.types import ThinkingBudget, ThinkMode
from server.model import ModelBundle
from server.model.chat_content import NotTextPart, TextParts, message_text
from server.prefixes import validate_kv
from server.settings import Settings

if TYPE_CHECKING:
    from server.api.beam import BeamParams

log = logging.getLogger("prefixserve.api")
T = TypeVar("T")
TOKENIZE_PER_TENANT = (
    2  # a tenant's prompts tokenizing at once (more wait their turn, not on the pool's queue)
)
COMPILE_PER_TENANT = 1  # a tenant's grammars compiling at once
STORE_THREADS = 8  # store and job-backend calls under way at once (`Service.in_store_pool`)


class TenantGate:
    """At most `per_tenant` holders per tenant at a time (asyncio; entries exist only while held or waited for)."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        sem, users = self._slots.get(tenant) or (asyncio.Semaphore(self.per_tenant), 0)
        self._slots[tenant] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            users = self._slots[tenant][1] - 1
            if users:
                self._slots[tenant] = (sem, users)
            else:
                del self._slots[tenant]


# after the prefix store failed a lookup, lookups of uncached names fail fast (503) for this long instead of each
# waiting out the store's timeout
STORE_BACKOFF_S = 1.0
# background refreshes of cached prefix metadata at once (each may wait out the store's timeout in a worker thread)
MAX_REFRESHES = 2
SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as in vLLM); avoids overflow in logits / T


# ----------------------------------------------------------------------------------------------- helpers
def base_prompt_format(bundle: ModelBundle, setting: str = "auto") -> str:
    """Format for requests without a prefix: the `base_prompt_format` setting, by default ("auto") the model's
    default ("chat" when it has a chat template). ValueError for "chat" on a model without a template."""
    if setting == "chat" and not getattr(bundle.tokenizer, "chat_template", None):
        raise ValueError("base_prompt_format 'chat' needs a model with a chat template; this one has none")
    if setting in ("chat", "raw"):
        return setting
    fmt = _model.default_prompt_format(bundle)
    return fmt if fmt in ("chat", "raw") else "raw"


def bad_word_ids(tokenizer: Any, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of bad_words: each word as written (leading whitespace dropped) and, when that is other
    tokens of the same count, after a space (the word in the middle of a text)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        out.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return tuple(out)


def truncate_prompt(ids: list[int], keep: int | None, fit: int = 1) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last `keep` tokens (all when None); -1: the last `fit` (as many as fit,
    see `Service.prompt_fit`)."""
    if keep == -1:
        keep = max(fit, 1)
    return ids[-keep:] if keep is not None and len(ids) > keep else ids


def prompt_format(requested: str | None, prefix: ResolvedPrefix, tokenizer: Any) -> str:
    """The format a request's text prompt is rendered in: the one it asks for (`prompt_format`), else its
    prefix's (for the base model: the model's default)."""
    if requested is None:
        return prefix.prompt_format
    if requested == "chat" and not getattr(tokenizer, "chat_template", None):
        raise APIError(
            422,
            "prompt_format 'chat' needs a model with a chat template; this one has none",
            code="invalid_value",
            param="prompt_format",
        )
    return requested


def render_prompt(tokenizer: Any, prompt: str, fmt: str, add_special_tokens: bool | None = None) -> list[int]:
    return list(_model.render_prompt(tokenizer, prompt, fmt, add_special_tokens))


def render_messages(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **options: Any
) -> list[int]:
    return list(_model.render_messages(tokenizer, messages, tools, **options))


def _message_text(content: Any, param: str) -> str:
    """The text of an OpenAI chat message's content (`chat_content.message_text`: a string, or text parts kept as
    `TextParts`; other parts are refused). `param`: the content's place in the body (`messages[i].content`)."""
    try:
        text = message_text(content)
    except NotTextPart as e:
        raise APIError(400, str(e), code="unsupported_content", param=f"{param}[{e.index}]") from None
    if isinstance(text, TextParts):  # (a string was checked as the request was read)
        try:
            check_text(text)
        except ValueError as e:
            raise APIError(422, str(e), param=param) from None
    return text


def chat_messages(messages: Iterable[Any]) -> list[dict[str, str]]:
    """OpenAI chat messages (role + content) as the chat template takes them."""
    return [
        {"role": m.role, "content": _message_text(m.content, f"messages[{i}].content")}
        for i, m in enumerate(messages)
    ]


class StorePrefixProvider:
    """The engine's PrefixProvider: store record → verified `kv` (runs on the prefix cache's loader threads)."""

    def __init__(self, store: PrefixStore, bundle: ModelBundle) -> None:
        self.store = store
        self.bundle = bundle

    def fetch(self, key: PrefixKey) -> Any:
        return self.fetch_digested(key)[0]

    def fetch_digested(self, key: PrefixKey) -> tuple[Any, str]:
        """`kv` and the store's digest of the record's tensor bytes (checked as it was read)."""
        rec = self.store.get(
            key.tenant_id, key.name, key.version, expected_fingerprint=self.bundle.fingerprint
        )
        kv = rec.tensors.get("kv")
        if kv is None:
            raise errors.InvalidPrefix(f"prefix {key} has no 'kv' tensor")
        validate_kv(kv, self.bundle.spec, rec.meta.prefix_length)
        return kv, rec.meta.sha256


@dataclass
class RequestInfo:
    """What the request log line and access metrics need; filled in by the handlers."""

    request_id: str
    given_request_id: str | None = None  # the client's X-Request-ID where it could not be used as the id
    principal: str | None = None
    tenant: str | None = None
    prefix: str | None = None
    version: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    prompt: str | None = None  # only with settings.log_prompts
    # the body's fields that errors about the prompt's and the output's sizes name, each route's own (set by its
    # handler before the checks: chat and Messages `messages`, Responses `input` and `max_output_tokens`, TGI
    # `inputs` and `parameters.max_new_tokens`); messages name a dotted one by its last part
    prompt_param: str = "prompt"
    max_tokens_param: str = "max_tokens"
    # the body's field that a structured output failing during generation names (set where its spec is compiled)
    structured_param: str = "structured_outputs"
    # False: the output's length was not asked for (chat without max_tokens fills the room left): a prompt too
    # long for the context is the prompt's fault alone, and its error says so
    max_tokens_given: bool = True
    headers: dict[str, str] = field(default_factory=dict)  # added to the response (x-ratelimit-*)
    admitted: bool = (
        False  # let in before a drain began: in flight, served to the end (the drain waits for it)
    )


# the request being handled (set by the middleware): whose work the shared pools do
CURRENT_REQUEST: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "prefixserve_request", default=None
)


def requester() -> str:
    """The tenant (or, before a tenant is known, the key) of the request being handled; "" outside one."""
    info = CURRENT_REQUEST.get()
    if info is None:
        return ""
    return info.tenant or info.principal or ""


def requester_id() -> str:
    """The X-Request-ID of the request being handled (what its client and its access-log line know); "-" outside
    one."""
    info = CURRENT_REQUEST.get()
    return "-" if info is None else info.request_id


def store_refused(e: errors.StoreRefused, doing: str) -> APIError:
    """A 500 for a store that refused an operation (a Redis error reply: the deployment's fault, neither the
    request's nor the record's), logged with its cause; the client's message names neither hosts nor keys."""
    log.error("request %s: the prefix store refused %s: %s", requester_id(), doing, e)
    return APIError(
        500,
        f"the prefix store failed (request {requester_id()}: the server's log has the cause)",
        code="store_error",
    )


# ----------------------------------------------------------------------------------------------- generation
# ----------------------------------------------------------------------------------------------- service
def default_limit(settings: Settings) -> TenantLimit:
    """Every tenant's limits from the settings (before the limits file's overrides)."""
    return TenantLimit(
        requests_per_minute=settings.tenant_requests_per_minute,
        tokens_per_minute=settings.tenant_tokens_per_minute,
        max_concurrent=settings.max_concurrent_per_tenant,
    )


def rate_limiter(settings: Settings) -> RateLimiter:
    """Every tenant's limits from the settings, overridden per tenant by `tenant_limits_file` (ValueError if bad)."""
    overrides = load_limits_file(settings.tenant_limits_file)
    if settings.limits_url:
        return RedisRateLimiter(settings.limits_url, default_limit(settings), overrides)
    return RateLimiter(default_limit(settings), overrides)


@dataclass
class Service:
    settings: Settings
    bundle: ModelBundle
    store: PrefixStore
    engine: AsyncEngine
    llm: LLMEngine
    metrics: Metrics
    job_manager: Any = None
    meta_cache: PrefixMetaCache = field(default_factory=lambda: PrefixMetaCache(10.0))
    draining: bool = False
    started_at: float = field(default_factory=time.time)
    _tenant_active: dict[str, int] = field(default_factory=dict)
    _inflight_meta: dict[tuple[str, str, int | None], tuple[asyncio.Future[PrefixMeta], tuple[int, int]]] = (
        field(default_factory=dict)
    )
    _revalidating: set[tuple[str, str, int | None]] = field(default_factory=set)
    _background: set[asyncio.Future] = field(default_factory=set)  # (kept referenced until done)
    _store_down_until: float = 0.0  # monotonic: lookups fail fast until then (the store just failed)
    _unsubscribe: Callable[[], None] | None = None
    _tokenizer_pool: DaemonThreadPool = field(default_factory=lambda: DaemonThreadPool(1, "tokenizer"))
    default_format: str = "raw"
    reasoning: ReasoningParser | None = None  # settings.reasoning_parser
    # the closing tag's token ids from each of its bytes on (`thinking_budget`)
    _think_rest: tuple[tuple[int, ...], ...] | None = None
    served_names: tuple[str, ...] = ()  # settings.served_model_name: `model` values naming the base model
    # sampling defaults of the /v1 routes from the model's generation config (settings.generation_config "auto")
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)
    store_ok: bool = True
    # prefix uploads being parsed and stored (at most settings.max_concurrent_uploads)
    uploading_tenants: set[str] = field(default_factory=set)  # one upload each at a time (`_admit_upload`)
    # prefix downloads being read and encoded (at most settings.max_concurrent_downloads)
    downloads_active: int = 0
    # grammars compile on their own threads (half the cores, as vLLM's), never on the default pool that readiness
    # and store lookups use, one at a time per tenant; prompts tokenize at most TOKENIZE_PER_TENANT at a time per
    # tenant, so one tenant's many long prompts cannot queue everyone's behind them
    _compile_pool: DaemonThreadPool = field(
        default_factory=lambda: DaemonThreadPool(max(1, ((os.cpu_count() or 1) + 1) // 2), "grammar")
    )
    _probe_pool: DaemonThreadPool = field(default_factory=lambda: DaemonThreadPool(1, "store-ping"))
    # store and job-backend calls on threads of their own: a stalled Redis holds each call for its socket timeout
    # (5 s), and six such lookups filled the default pool (six threads on 2 cores) that renders every response, so
    # requests for cached prefixes waited seconds behind them
    _store_pool: DaemonThreadPool = field(default_factory=lambda: DaemonThreadPool(STORE_THREADS, "store"))
    _tokenize_gate: TenantGate = field(default_factory=lambda: TenantGate(TOKENIZE_PER_TENANT))
    _compile_gate: TenantGate = field(default_factory=lambda: TenantGate(COMPILE_PER_TENANT))
    tool_parser: ToolParser = field(default_factory=lambda: get_parser("hermes"))
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(TenantLimit()))
    usage: UsageMeter = field(default_factory=UsageMeter)
    token_text: TokenTexts = field(init=False)  # id -> text for reported log-probabilities
    max_token_chars: int = field(init=False, default=65)  # the most characters one token's text can have

    @property
    def uploads_active(self) -> int:
        """Prefix uploads being received or parsed (at most `max_concurrent_uploads`)."""
        return len(self.uploading_tenants)

    def __post_init__(self) -> None:
        self.token_text = TokenTexts(self.bundle.tokenizer)
        # the most characters one token's text can have (+1: a decoder may put a space between tokens)
        vocab = self.bundle.tokenizer.get_vocab() if hasattr(self.bundle.tokenizer, "get_vocab") else {}
        self.max_token_chars = max((len(piece) for piece in vocab), default=64) + 1

    def check_logprob_entries(self, entries: int, param: str) -> None:
        """A request asking for more log-probability entries than `max_logprob_entries` in all is a 422 before it
        runs (each n x max_tokens x top_logprobs entry within the per-field limits could still add up to a response
        of 100 MB)."""
        most = self.settings.max_logprob_entries
        if entries > most:
            raise APIError(
                422,
                f"the request asks for {entries} log-probabilities in all (choices x tokens x (alternatives + 1)); "
                f"at most {most} (max_logprob_entries): ask for fewer choices, tokens or alternatives",
                code="logprobs_too_large",
                param=param,
            )

    def prompt_fit(self, prefix_len: int, max_tokens: int) -> int:
        """Most prompt tokens a request of this prefix may keep beside `max_tokens` of output (what
        `truncate_prompt_tokens: -1` keeps): within the context, the KV cache's per-request share and
        `max_prompt_tokens`."""
        fit = self.llm.room(prefix_len, 0, scoring=max_tokens == 0) - max(max_tokens, 1)
        return min(fit, self.settings.max_prompt_tokens)

    def check_prompt_chars(self, chars: int, param: str = "prompt", truncating: bool = False) -> None:
        """A prompt of more characters than `max_prompt_tokens` tokens can hold (twice over: normalizers may join
        characters) is a 413 before it is tokenized: long text takes the shared tokenizer thread a while, only to
        be refused. With truncation asked for, only the body size limit bounds it. `param`: the body's field
        (the message names it too)."""
        most = 2 * self.settings.max_prompt_tokens * self.max_token_chars
        if chars > most and not truncating:
            self.metrics.rejected.labels("too_long").inc()
            raise APIError(
                413,
                f"{chars} characters in the {field_name(param)}: more than {self.settings.max_prompt_tokens} "
                "tokens (the limit) could hold",
                code="prompt_too_long",
                param=param,
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        settings: Settings,
        bundle: ModelBundle,
        store: PrefixStore,
        metrics: Metrics,
        job_manager: Any = None,
        limiter: RateLimiter | None = None,
    ) -> Service:
        mib = 2**20
        cfg = EngineConfig(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_batched_tokens,
            long_prefill_tokens=settings.long_prefill_token_threshold,
            max_waiting=settings.max_queued,
            kv_cache_bytes=settings.kv_cache_mb * mib if settings.kv_cache_mb else None,
            prefix_cache_bytes=settings.prefix_cache_mb * mib if settings.prefix_cache_mb else None,
            max_model_len=settings.max_model_len,
            packed_weights=settings.cpu_packed_weights,
            prompt_cache=settings.prompt_cache,
            fair_scheduling=settings.scheduling_policy == "fair",
            speculative_tokens=settings.speculative_tokens,
            kernels=settings.kernels,
            async_decode=settings.async_decode,
        )
        llm = LLMEngine(bundle, StorePrefixProvider(store, bundle), cfg, on_step=metrics.on_step)
        engine = AsyncEngine(
            llm, torch_threads=settings.torch_threads, stream_interval=settings.stream_interval
        )
        svc = cls(
            settings=settings,
            bundle=bundle,
            store=store,
            engine=engine,
            llm=llm,
            metrics=metrics,
            job_manager=job_manager,
            meta_cache=PrefixMetaCache(settings.prefix_meta_ttl_s),
            limiter=limiter or rate_limiter(settings),
            usage=RedisUsageMeter(settings.limits_url) if settings.limits_url else UsageMeter(),
        )
        svc.default_format = base_prompt_format(bundle, settings.base_prompt_format)
        if settings.generation_config == "auto":
            svc.sampling_defaults = dict(bundle.extra.get("generation_defaults") or {})
            if svc.sampling_defaults:
                log.info(
                    "the /v1 routes' sampling defaults come from the model's generation config: %s (set "
                    "generation_config=ignore for OpenAI's)",
                    svc.sampling_defaults,
                )
        svc.reasoning = get_reasoning_parser(settings.reasoning_parser)
        if svc.reasoning is not None and (hidden := svc.reasoning.hidden_tags(bundle.tokenizer)):
            log.warning(
                "reasoning parser %s: %s are special tokens of this tokenizer, which outputs leave out unless a "
                "request sends skip_special_tokens: false; without them the thinking is not told from the answer",
                settings.reasoning_parser,
                " and ".join(hidden),
            )
        svc.served_names = settings.served_model_names() or (bundle.name,)
        parser: str = settings.tool_call_parser
        if parser == "auto":
            parser = detect(getattr(bundle.tokenizer, "chat_template", None))
        svc.tool_parser = get_parser(parser)
        return svc

    def start(self) -> None:
        """Start the engine thread and subscribe to store changes (may block a few seconds if Redis is down:
        call it off the event loop)."""
        self.engine.start()
        try:
            self._unsubscribe = self.store.subscribe(self._on_store_event)
        except Exception as e:  # store down at start-up: serve what we can, /ready says not ready
            log.warning("could not subscribe to prefix store changes: %s", e)

    def _on_store_event(self, event: Any) -> None:
        """Store change (this process or another replica): drop cached metadata and device KV of that name; after
        a lost change subscription ("resync": changes may have been missed, and an emptied Redis numbers versions
        from 1 again, so a cached version number may now name other tensors), refresh all metadata and reload all
        KV from the store."""
        if event.op == "resync":
            log.warning("prefix store change events may have been missed: dropping every cached prefix")
            self.meta_cache.clear()
            self.llm.prefix_cache.invalidate_all()
            self._store_down_until = 0.0  # it answers again (the subscription is back): ask it at once
            return
        self.meta_cache.invalidate((event.tenant_id, event.name))
        self.llm.prefix_cache.invalidate(event.tenant_id, event.name)

    async def stop(self, grace_s: float) -> None:
        self.draining = True
        drained = await self.engine.drain(grace_s) if self.engine_alive() else False
        if not drained:
            log.warning("shutdown: requests still running after %.1fs grace; aborting them", grace_s)
        if self._unsubscribe is not None:
            with contextlib.suppress(Exception):
                self._unsubscribe()
        for task in list(self._background):  # metadata refreshes: not after the store is closed
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self.engine.shutdown)
        for pool in (self._tokenizer_pool, self._compile_pool, self._probe_pool, self._store_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    async def in_store_pool(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """`fn(*args, **kw)` (a prefix store or job backend call) on the store's threads, in this context's copy (as
        `asyncio.to_thread`: the request's log fields)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kw)
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, call)

    # ------------------------------------------------------------------ state for /ready and /metrics
    def engine_alive(self) -> bool:
        return self.engine.alive

    def snapshot(self, jobs: bool = True) -> dict[str, Any]:
        """Engine, cache and (with `jobs`: a job backend read) training-job figures for /metrics."""
        pc = self.llm.prefix_cache
        pool = self.llm.pool
        job_counts: dict[str, int] = {}
        if jobs and self.job_manager is not None:
            with contextlib.suppress(Exception):
                counts = getattr(self.job_manager, "counts", None)
                job_counts = dict(counts()) if callable(counts) else count_jobs(self.job_manager.list())
        resident_prefixes, resident_bytes = pc.resident  # (the engine thread replaces it whole)
        # a dead engine's requests were all failed to their clients: none is running or waiting any more
        alive = self.engine_alive()
        return {
            "running": self.engine.num_running if alive else 0,
            "waiting": self.engine.num_waiting if alive else 0,
            "prefix_cache_hits": pc.stats.hits,
            "prefix_cache_misses": pc.stats.misses,
            "prefix_cache_fetches": pc.stats.fetches,
            "prefix_cache_evictions": pc.stats.evictions,
            "prefix_cache_load_errors": pc.stats.load_errors,
            "prefix_cache_resident_bytes": resident_bytes,
            "prefix_cache_resident_prefixes": resident_prefixes,
            # (idle resident prefixes are evicted on demand: free, as vLLM's cached blocks; 0 when idle)
            "kv_cache_usage": max(0, pool.num_used - pc.idle_blocks) / max(pool.num_blocks, 1),
            "prompt_cache_query_tokens": self.llm.scheduler.cache_query_tokens,
            "prompt_cache_hit_tokens": self.llm.scheduler.cache_hit_tokens,
            "prompt_cache_evictions": pool.cache_evictions,
            "prompt_cache_blocks": pool.num_cached,
            "num_preemptions": self.llm.scheduler.num_preemptions,
            "num_fair_preemptions": self.llm.scheduler.num_fair_preemptions,
            "spec_decode_num_draft_tokens": self.llm.scheduler.spec_draft_tokens,
            "spec_decode_num_accepted_tokens": self.llm.scheduler.spec_accepted_tokens,
            # tokens the engine's steps processed, counted as they run (the stats line's throughputs)
            "prompt_tokens_computed": self.llm.num_prompt_tokens_computed,
            "generation_tokens_computed": self.llm.num_generated_tokens,
            "jobs": job_counts,
            "ready": (not self.draining) and self.engine_alive() and self.store_ok,
        }

    # ------------------------------------------------------------------ tenant slots
    def in_flight(self, tenant: str) -> int:
        return self._tenant_active.get(tenant, 0)

    def max_concurrent(self, tenant: str) -> int:
        """Generation requests the tenant may have in flight (its own limit, else the server's)."""
        return self.limiter.limit(tenant).max_concurrent or self.settings.max_concurrent_per_tenant

    def acquire_slot(self, tenant: str) -> Callable[[], None]:
        n = self._tenant_active.get(tenant, 0)
        limit = self.max_concurrent(tenant)
        if n >= limit:
            self.metrics.rejected.labels("tenant_limit").inc()
            self.usage.rejected(tenant)
            raise APIError(
                429,
                f"tenant has {n} requests in flight (limit {limit})",
                code="tenant_concurrency_limit",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self._tenant_active[tenant] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._tenant_active.get(tenant, 1) - 1
            if left <= 0:
                self._tenant_active.pop(tenant, None)
            else:
                self._tenant_active[tenant] = left

        return release

    # ------------------------------------------------------------------ prefix resolution
    async def resolve(
        self, tenant: str, name: str | None, version: int | None = None, param: str = "prefix"
    ) -> ResolvedPrefix:
        """name → its latest version (or the pinned `version`), prefix length and prompt format (cached; stale
        entries served if the store is down). `param` names the request field in errors."""
        if name is None or name == BASE_PREFIX:
            if version is not None:
                raise APIError(
                    422, "the base model has no versions", code="invalid_value", param="prefix_version"
                )
            return ResolvedPrefix(tenant, None, None, 0, self.default_format)
        key = (tenant, name)
        ent, fresh, gen = self.meta_cache.get(key, version)
        if ent is not None:
            # stale: served as it is while one lookup refreshes it in the background (changes arrive as store
            # events, which drop entries; the TTL is the backstop), so a hung store costs no request its timeout
            if not fresh:
                self._revalidate(key, version, gen)
            if isinstance(ent, Refusal):
                raise ent.error(param)
            return ent
        if time.monotonic() < self._store_down_until:  # it just failed: do not queue every request behind it
            raise unavailable(
                "prefix store unavailable", self.settings.retry_after_s, code="store_unavailable"
            )
        return await self._lookup(key, version, gen, param)

    def _revalidate(self, key: tuple[str, str], version: int | None, gen: tuple[int, int]) -> None:
        k = (*key, version)
        if (
            k in self._revalidating
            or len(self._revalidating) >= MAX_REFRESHES  # a hung store must not take every worker thread
            or time.monotonic() < self._store_down_until
        ):
            return
        self._revalidating.add(k)

        async def refresh() -> None:
            try:
                await self._lookup(key, version, gen, "prefix")
            except APIError as e:
                log.debug("refreshing %s/%s@%s: %s", key[0], key[1], version, e.message)
                # it cannot be served as it is now (gone, corrupt): the next request hears why; the store down:
                # keep serving it; another base model: the lookup cached that
                if e.status != 503 and e.code != "prefix_incompatible":
                    self.meta_cache.invalidate(key)
            except Exception:
                log.exception("refreshing %s/%s@%s failed", key[0], key[1], version)
            finally:
                self._revalidating.discard(k)

        task = asyncio.ensure_future(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lookup(
        self, key: tuple[str, str], version: int | None, gen: tuple[int, int], param: str
    ) -> ResolvedPrefix:
        """The store's metadata for the name (and version), checked and cached; APIError if it cannot be served."""
        tenant, name = key
        try:
            meta, began = await self._get_meta(key, version)
            # a lookup that joined a fetch begun before an invalidation (a new version stored meanwhile) must not
            # cache what that fetch read as current: the older of the two generations decides
            gen = min(gen, began)
        except errors.PrefixNotFound:
            # the name (or a version this server had cached) is gone: a change it did not hear of, so what it holds
            # of the name may be stale too; a version it never held tells nothing (asking for version 99 again and
            # again dropped the name's latest, and kept fetches under way from caching it)
            if version is None or self.meta_cache.get(key, version)[0] is not None:
                self.meta_cache.invalidate(key)
            what = f"prefix {name!r}" if version is None else f"prefix {name!r} version {version}"
            raise APIError(404, f"{what} not found", code="prefix_not_found", param=param) from None
        except errors.InvalidName as e:
            raise APIError(422, str(e), code="invalid_name", param=param) from None
        except errors.StoreUnavailable:
            self.store_ok = False
            self._store_down_until = time.monotonic() + STORE_BACKOFF_S
            raise unavailable(
                "prefix store unavailable", self.settings.retry_after_s, code="store_unavailable"
            ) from None
        except errors.StoreRefused as e:
            raise store_refused(e, f"reading prefix {label(tenant, name, version)}") from None
        except errors.StoreError as e:
            log.warning("request %s: stored prefix %s cannot be served: %s", requester_id(),
                        label(tenant, name, version), e)  # fmt: skip
            raise APIError(422, f"prefix cannot be served: {e}", code="prefix_corrupt", param=param) from None
        self.store_ok = True
        self._store_down_until = 0.0
        if meta.base_model_fingerprint != self.bundle.fingerprint:
            which = (
                f"prefix {name!r} version {version} was not"
                if version is not None
                else f"no version of prefix {name!r} was"
            )
            refusal = Refusal(
                422,
                f"{which} trained for this server's base model (fingerprint {self.bundle.fingerprint[:12]}); "
                f"{'it' if version is not None else 'the latest'} was trained for one with fingerprint "
                f"{meta.base_model_fingerprint[:12]}",
                "prefix_incompatible",
            )
            self.meta_cache.put(key, refusal, gen, version)
            raise refusal.error(param)
        fmt = (meta.extra or {}).get("prompt_format") or self.default_format
        if fmt not in ("chat", "raw"):
            fmt = self.default_format
        res = ResolvedPrefix(tenant, name, meta.version, meta.prefix_length, fmt, pinned=version is not None)
        self.meta_cache.put(key, res, gen, version)
        return res

    def openai_default(self, key: str, given: Any, fallback: float) -> Any:
        """A /v1 sampling field: as given, else the model's generation-config default, else OpenAI's `fallback`."""
        if given is not None:
            return given
        return self.sampling_defaults.get(key, fallback)

    def servable_meta(self, tenant: str, name: str, version: int | None = None) -> PrefixMeta:
        """`PrefixStore.servable_meta` for this server's base model (blocking)."""
        return self.store.servable_meta(tenant, name, version, self.bundle.fingerprint)

    def servable_list(self, tenant_id: str | None) -> list[PrefixMeta]:
        """Each name's latest version this server can serve (`servable_meta`), names with none left out
        (blocking)."""
        out = []
        for meta in self.store.list(tenant_id):
            if meta.base_model_fingerprint != self.bundle.fingerprint:
                try:
                    meta = self.servable_meta(meta.tenant_id, meta.name)
                except errors.PrefixNotFound:
                    continue
            if meta.base_model_fingerprint == self.bundle.fingerprint:
                out.append(meta)
        return out

    async def _get_meta(
        self, key: tuple[str, str], version: int | None
    ) -> tuple[PrefixMeta, tuple[int, int]]:
        """Single flight: concurrent misses for one name (and version) share one store round trip. Returns the
        metadata and the cache generation at which its read began."""
        k = (*key, version)
        flight = self._inflight_meta.get(k)
        if flight is None:
            fut = asyncio.ensure_future(self.in_store_pool(self.servable_meta, *key, version))
            flight = self._inflight_meta[k] = (fut, self.meta_cache.generation())
            fut.add_done_callback(lambda _f: self._inflight_meta.pop(k, None))
        shared, began = flight
        return await asyncio.shield(shared), began

    # ------------------------------------------------------------------ generation
    async def tokenize(self, fn: Callable[..., T], *args: Any, param: str = "prompt") -> T:
        """`fn(*args)` on the tokenizer's own thread (tokenizing, rendering a chat template, decoding), at most
        TOKENIZE_PER_TENANT of the requesting tenant's at a time. `param`: the request field an error names."""
        from jinja2 import TemplateError  # transformers' chat templates are jinja2

        loop = asyncio.get_running_loop()
        try:
            async with self._tokenize_gate.hold(requester()):
                return await loop.run_in_executor(self._tokenizer_pool, fn, *args)
        except (ValueError, TypeError, UnicodeError, TemplateError) as e:
            raise APIError(
                422, f"cannot render the {field_name(param)}: {e}", code="invalid_prompt", param=param
            ) from None
        except RecursionError:  # (a tool's parameters nested hundreds deep, through the template's tojson)
            raise APIError(
                422,
                f"cannot render the {field_name(param)}: it is nested too deeply",
                code="invalid_prompt",
                param=param,
            ) from None

    async def thinking_budget(
        self, tokens: int, opened: bool | None, prompt: list[int] | None = None
    ) -> ThinkingBudget:
        """vLLM's thinking_token_budget for an output whose prompt says `opened` of its start (the reasoning parser's
        `prompt_opened`; None: the parser's convention), with the parser's tags as the tokenizer encodes them;
        `prompt`: count the thinking it wrote after its last opening tag."""
        parser = self.reasoning
        assert parser is not None
        if self._think_rest is None:
            self._think_rest = await self.tokenize(closing_tag_rest, self.bundle.tokenizer, parser.end)
        spent = 0
        if prompt is not None:
            spent = await self.tokenize(tokens_after_tag, self.token_text, prompt, parser.start.encode())
        inside = opened is True or (opened is None and parser.convention.opened)
        return ThinkingBudget(tokens, parser.start, parser.end, self._think_rest, inside, spent)

    async def bad_words(self, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        """vLLM's bad_words as the token sequences the sampler bans (`bad_word_ids`), tokenized on the tokenizer's
        thread; as many and as long as stop strings may be (422 naming `bad_words` otherwise)."""
        if not words:
            return ()
        s = self.settings
        if len(words) > s.max_stop_strings:
            raise APIError(422, f"at most {s.max_stop_strings} bad words are allowed", param="bad_words")
        for j, w in enumerate(words):
            if len(w) > s.max_stop_chars or not w.strip():
                raise APIError(
                    422,
                    f"a bad word is 1 to {s.max_stop_chars} characters, not only whitespace",
                    param=f"bad_words[{j}]",
                )
        return await self.tokenize(bad_word_ids, self.bundle.tokenizer, words)

    def sampling(
        self,
        *,
        max_tokens: int,
        max_tokens_param: str = "max_tokens",
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop: list[str] | str | None,
        min_p: float = 0.0,
        typical_p: float = 1.0,
        watermark: bool = False,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        ignore_eos: bool = False,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logprobs: int | None = None,
        logprobs_param: str = "logprobs",
        prompt_logprobs: int | None = None,
        logit_bias: dict[str, float] | None = None,
        allowed_token_ids: list[int] | None = None,
        min_tokens: int = 0,
        stop_token_ids: list[int] | None = None,
        structured: StructuredOutputs | None = None,
        bad_words_token_ids: tuple[tuple[int, ...], ...] = (),
    ) -> SamplingParams:
        s = self.settings
        if max_tokens > s.max_new_tokens:
            raise APIError(
                422,
                f"{field_name(max_tokens_param)} must be at most {s.max_new_tokens}",
                code="max_tokens_too_large",
                param=max_tokens_param,
            )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > s.max_stop_strings:
            raise APIError(422, f"at most {s.max_stop_strings} stop strings are allowed", param="stop")
        if any(len(x) > s.max_stop_chars for x in stops):
            raise APIError(422, f"stop strings may be at most {s.max_stop_chars} characters", param="stop")
        vocab = self.bundle.spec.vocab_size
        # (a model of fewer tokens than max_logprobs: the engine cannot list more alternatives than it has)
        most_logprobs = min(s.max_logprobs, vocab)
        if logprobs is not None and logprobs > most_logprobs:
            raise APIError(
                422,
                f"{logprobs_param} must be at most {most_logprobs}",
                code="logprobs_too_large",
                param=logprobs_param,
            )
        if prompt_logprobs is not None and prompt_logprobs > most_logprobs:
            raise APIError(
                422,
                f"prompt_logprobs must be at most {most_logprobs}",
                code="logprobs_too_large",
                param="prompt_logprobs",
            )
        bias = tuple((int(t), float(v)) for t, v in (logit_bias or {}).items())
        if any(t >= vocab for t, _ in bias):
            raise APIError(422, f"logit_bias token ids must be below {vocab}", param="logit_bias")
        if any(t >= vocab for t in stop_token_ids or ()):
            raise APIError(422, f"stop_token_ids must be below {vocab}", param="stop_token_ids")
        if any(t >= vocab for t in allowed_token_ids or ()):
            raise APIError(422, f"allowed_token_ids must be below {vocab}", param="allowed_token_ids")
        if min_tokens > max_tokens:
            raise APIError(422, "min_tokens must be at most max_tokens", param="min_tokens")
        if 0 < temperature < SAMPLING_EPS:
            temperature = 0.0
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                min_p=float(min_p),
                typical_p=float(typical_p),
                watermark=watermark,
                watermark_gamma=s.watermark_gamma,
                watermark_delta=s.watermark_delta,
                seed=seed,
                stop=tuple(stops),
                include_stop_str_in_output=include_stop_str_in_output,
                skip_special_tokens=skip_special_tokens,
                spaces_between_special_tokens=spaces_between_special_tokens,
                ignore_eos=ignore_eos,
                presence_penalty=float(presence_penalty),
                frequency_penalty=float(frequency_penalty),
                repetition_penalty=float(repetition_penalty),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                logit_bias=bias,
                allowed_token_ids=tuple(allowed_token_ids or ()),
                min_tokens=min_tokens,
                stop_token_ids=tuple(stop_token_ids or ()),
                structured=structured,
                bad_words_token_ids=bad_words_token_ids,
            )
        except ValueError as e:
            raise APIError(422, str(e), code="invalid_value") from None

    async def structured(
        self,
        so: StructuredOutputsParam | None,
        response_format: ResponseFormat | None = None,
        compact: bool = False,
        think: ThinkMode | None = None,
        guided: bool = False,
    ) -> StructuredOutputs | None:
        """The engine spec of a body's structured_outputs / response_format with its grammar compiled and attached
        (off the event loop unless the compiler's cache has it), so an invalid schema, regex or grammar is a 422
        naming it and the engine never compiles on its thread. `think`: a reasoning model's thinking comes first.
        `guided`: `so` came from the body's guided_* fields (errors name those)."""
        spec, param = engine_spec(so, response_format, compact, guided)
        if spec is None:
            return None
        return await self.compile_spec(dataclasses.replace(spec, think=think), param)

    async def compile_spec(self, spec: StructuredOutputs, param: str) -> StructuredOutputs:
        """`spec` with its grammar compiled and attached; 422 naming `param` if it is invalid (and a failure
        while following it names `param` too)."""
        info = CURRENT_REQUEST.get()
        if info is not None:
            info.structured_param = param
        # a tenant's grammars are its own cache entries (no tenant can time which specs another sent)
        spec = dataclasses.replace(spec, cache_salt=requester())
        if spec.think is not None and self.reasoning is not None:  # (the thinking's tags are the parser's)
            spec = dataclasses.replace(spec, think_tags=(self.reasoning.start, self.reasoning.end))
        grammars = self.llm.grammars
        hit = grammars.cached(spec)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        try:
            async with self._compile_gate.hold(requester()):
                return await loop.run_in_executor(self._compile_pool, grammars.compile, spec)
        except GrammarError as e:
            raise APIError(
                422, f"invalid {param}: {e}", code="invalid_structured_output", param=param
            ) from None

    @staticmethod
    def check_priority(principal: Any, priority: int) -> int:
        """A request's own priority: tenants may lower theirs (> 0), only the operator may raise one (< 0)."""
        if priority < 0 and not principal.admin:
            raise APIError(
                403, "a priority below 0 needs the admin key", code="priority_not_allowed", param="priority"
            )
        return priority

    async def generate_many(
        self,
        info: RequestInfo,
        prefix: ResolvedPrefix,
        jobs: list[tuple[list[int], SamplingParams]],
        *,
        stream: bool,
        receive: Callable[[], Any] | None,
        priority: int = 0,
        bill_output: bool = True,
        beam: BeamParams | None = None,
    ) -> list[GenerationRun]:
        """Start the engine requests of one HTTP generation request (one, or several for OpenAI `n` and prompt
        lists; with `beam`, each run of `beam.width` jobs of one prompt is one beam search and its choices). Every limit is checked before anything runs; the tenant's rate limits are charged once, for all of
        them (a refused request costs nothing), then each takes a tenant slot. All start together: with the prompt
        cache on, samples of one prompt share its prefill in the engine (the first admitted computes its full
        blocks, the others take them in the same step). If any cannot start, the others are closed and its error
        raised. Callers must `close()` every run (which refunds the tokens it did not use)."""
        for ids, sampling in jobs:
            self._check(info, prefix, ids, sampling, scoring=not bill_output)
        tenant = prefix.tenant_id
        # the samples of one prompt charge it once (OpenAI's prompt + n x max_tokens), in the first one's reservation
        firsts = prompt_groups([ids for ids, _ in jobs])
        costs = [sp.max_tokens + (len(ids) if firsts[i] == i else 0) for i, (ids, sp) in enumerate(jobs)]
        try:
            info.headers.update(
                await self.limiter.charge(
                    tenant,
                    sum(costs),
                    prompt_param=info.prompt_param,
                    max_tokens_param=info.max_tokens_param,
                )
            )
        except APIError as e:
            if e.status == 429:
                self.metrics.rejected.labels("rate_limit").inc()
                self.usage.rejected(tenant)
            raise
        priority += self.limiter.limit(tenant).priority  # the tenant's tier
        try:
            runs = await self._start_runs(
                info,
                prefix,
                jobs,
                costs,
                priority,
                stream=stream,
                receive=receive,
                bill_output=bill_output,
                beam=beam,
            )
        except APIError as e:
            # the engine took it, then it failed (its prefix could not be loaded, say): a request, as its failed
            # completion is; else refused, counted once per HTTP request as the other reasons are
            if getattr(e, "ran", False):
                self.usage.request(tenant, prefix.name)
            elif e.code == "queue_full":
                self.metrics.rejected.labels("queue_full").inc()
            # refused or failed: the request costs nothing, and its headers say so (its runs refunded their tokens)
            info.headers.update(await self.limiter.refund(tenant, 0, requests=1))
            raise
        self.usage.request(tenant, prefix.name)
        return runs

    def _check(
        self,
        info: RequestInfo,
        prefix: ResolvedPrefix,
        prompt_ids: list[int],
        sampling: SamplingParams,
        *,
        scoring: bool = False,
    ) -> None:
        """The request-size limits (413/422) and draining (503), before anything is charged or started. `scoring`:
        its one output token is not part of the answer (echo with max_tokens 0, `LLMEngine.room`)."""
        s, llm = self.settings, self.llm
        n, p = len(prompt_ids), prefix.prefix_length
        info.prompt_tokens = n
        asked = field_name(info.prompt_param)
        if n == 0:
            raise APIError(
                422, f"the {asked} rendered to zero tokens", code="empty_prompt", param=info.prompt_param
            )
        room = llm.room(p, n, scoring=scoring)
        # over max_prompt_tokens where that is the lower limit; else the context (or the KV cache) is, and the
        # context error below names it (a 4097-token prompt on a 64-token context was told of a limit of 4096)
        if n > s.max_prompt_tokens and s.max_prompt_tokens <= n - 1 + room:
            self.metrics.rejected.labels("too_long").inc()
            raise APIError(
                413,
                f"{n} tokens in the {asked}; the limit is {s.max_prompt_tokens}",
                code="prompt_too_long",
                param=info.prompt_param,
            )
        if sampling.max_tokens > room:
            self.metrics.rejected.labels("too_long").inc()
            raise APIError(
                413,
                self._too_long_text(info, p, n, sampling.max_tokens, scoring),
                code="context_length_exceeded",
                # the prompt's fault when it leaves no room for even one token, else the output's length
                param=info.max_tokens_param if room > 0 else info.prompt_param,
            )
        if self.draining and not info.admitted:
            raise unavailable("server is shutting down", s.retry_after_s, code="shutting_down")

    def _too_long_text(
        self, info: RequestInfo, prefix_len: int, n: int, max_tokens: int, scoring: bool
    ) -> str:
        """A context error's message (`_check`), in vLLM's words first (clients such as LiteLLM recognise a
        context-window error by them): the limit the request is past, and what it asked for, in the route's own
        field names (`RequestInfo.prompt_param`, `max_tokens_param`) wherever they occur."""
        llm, asked = self.llm, field_name(info.prompt_param)
        limit = llm.max_model_len
        # no output length asked for (a default filling the room, or echo's hidden token): the prompt is to blame
        hidden = scoring or not info.max_tokens_given
        please = f"Please reduce the length of the {asked}."
        requested = f"{n} tokens in the {asked}"  # (vLLM's words for a prompt that fills the context alone)
        # (a prompt that fills its room exactly leaves no position for the first output token)
        more = " and the next token needs one more"
        if prefix_len + n + (0 if scoring else max_tokens) > limit:
            head = f"This model's maximum context length is {limit} tokens"
            if prefix_len:
                requested = f"{prefix_len + n} tokens (the prefix's {prefix_len} and {n} in the {asked})"
            if prefix_len + n > limit:
                more = ""
            total = prefix_len + n + max_tokens
        else:  # within the context, more than the KV cache holds for one request (beside this prefix's blocks)
            held, pool = llm.request_tokens(prefix_len), llm.pool
            head = (
                f"This model's maximum context length is {limit} tokens, of which the prompt and output of one "
                "request"
            )
            if held < llm.max_request_tokens:  # the prefix's own blocks leave less than a request's share
                head += (
                    f" beside this prefix may hold {held} (its {prefix_len} tokens take "
                    f"{pool.blocks_for(prefix_len)} of the KV cache's {pool.num_blocks} blocks of "
                    f"{pool.block_size}; kv_cache_mb raises it)"
                )
            else:
                head += f" may hold {held} (the KV cache budget, kv_cache_mb)"
            total = n + max_tokens
        if hidden:
            return f"{head}. However, you requested {requested}{more}, {please}"
        out = field_name(info.max_tokens_param)
        return f"{head}; this request needs {total}: prefix ({prefix_len}) + {asked} ({n}) + {out} ({max_tokens})"

    async def _start_runs(
        self,
        info: RequestInfo,
        prefix: ResolvedPrefix,
        jobs: list[tuple[list[int], SamplingParams]],
        costs: list[int],
        priority: int,
        *,
        stream: bool,
        receive: Callable[[], Any] | None,
        bill_output: bool = True,
        beam: BeamParams | None = None,
    ) -> list[GenerationRun]:
        """Every run is made (slot taken, its tokens handed over) before anything is awaited, so each reservation
        has an owner whatever fails next; then all start together, racing the client's disconnect. Returns once
        every run has its first event, or for a stream of several once the first has (the others' `started()`
        waits for theirs; one that fails then fails the stream, as a later error would)."""
        runs: list[GenerationRun] = []
        try:
            for (ids, sampling), cost in zip(jobs, costs, strict=True):
                if beam is None:
                    run = self._make_run(info, prefix, ids, sampling, cost, priority, stream)
                else:
                    run = self._make_beam_run(info, prefix, ids, sampling, cost, priority, beam, runs)
                # (before it starts: its first event may be its last, observed as it arrives)
                run.bill_output = bill_output
                runs.append(run)
        except BaseException:  # the tokens of the runs not made go back here, those of the made ones on close
            await self.limiter.refund(prefix.tenant_id, sum(costs[len(runs) :]))
            for r in runs:
                await r.close()
            raise
        share_prompts(runs, [ids for ids, _ in jobs])
        tasks = [asyncio.ensure_future(r.start()) for r in runs]
        for r, t in zip(runs, tasks, strict=True):
            r._starting = t
            t.add_done_callback(outcome_read)  # a sibling that fails after its stream ended: nobody awaits it
        try:
            if stream and len(tasks) > 1:
                # a stream opens with the first choice's first event, and each choice streams from its own (as
                # vLLM's), not once the slowest sibling has one (queued behind a full batch, say). A refusal is
                # known by then: each run is submitted in its task's first step, before any engine event can come
                await race_disconnect(receive, asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED))
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            else:
                await race_disconnect(receive, asyncio.gather(*tasks))
        except BaseException as e:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(e, APIError):
                # a sibling was refused (queue full, too large): the others had not answered yet, so for the
                # caller none ran (one 503, not one rejection and n-1 aborts)
                for r in runs:
                    if r.first is None:
                        r.refused = True
            for r in runs:
                await r.close()
            if isinstance(e, APIError) and any(r.first is not None for r in runs):
                e.ran = True  # type: ignore[attr-defined]  # not refused: the engine ran it
            elif not isinstance(e, APIError) and any(r.submitted and not r.refused for r in runs):
                # the client left (or the server cut it) while it waited for its first token: it was admitted
                # and queued, and its runs count as aborted completions
                self.usage.request(prefix.tenant_id, prefix.name)
            raise
        return runs

    def _make_beam_run(
        self,
        info: RequestInfo,
        prefix: ResolvedPrefix,
        prompt_ids: list[int],
        sampling: SamplingParams,
        reserved: int,
        priority: int,
        beam: BeamParams,
        made: list[GenerationRun],
    ) -> GenerationRun:
        """Choice `len(made) % width` of a prompt's beam search: the first choice of a prompt makes the search, the
        next `width - 1` share it."""
        from server.api.beam import BeamRun, BeamSearch

        index = len(made) % beam.width
        if index == 0:
            search = BeamSearch(self, info, prefix, prompt_ids, sampling, beam, priority)
        else:
            search = made[-1].search  # type: ignore[attr-defined]
        release, req = self._slot_and_request(prefix, prompt_ids, sampling, priority, stream=False)
        return BeamRun(self, req, prefix, info, release, reserved, search, index)

    def _make_run(
        self,
        info: RequestInfo,
        prefix: ResolvedPrefix,
        prompt_ids: list[int],
        sampling: SamplingParams,
        reserved: int,
        priority: int,
        stream: bool,
    ) -> GenerationRun:
        """A run holding a tenant slot and `reserved` charged tokens (refunded by its `close()`). Not yet
        submitted."""
        release, req = self._slot_and_request(prefix, prompt_ids, sampling, priority, stream)
        return GenerationRun(self, req, prefix, info, release, reserved)

    def _slot_and_request(
        self,
        prefix: ResolvedPrefix,
        prompt_ids: list[int],
        sampling: SamplingParams,
        priority: int,
        stream: bool,
    ) -> tuple[Callable[[], None], Request]:
        """A tenant slot (its release) and the engine request of one run."""
        release = self.acquire_slot(prefix.tenant_id)
        req = Request(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            prefix=prefix.key,
            stream_text=stream,
            cache_salt=prefix.tenant_id,  # cached prompt blocks are never shared across tenants
            priority=priority,
        )
        return release, req
