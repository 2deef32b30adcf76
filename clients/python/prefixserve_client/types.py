"""Typed responses (pydantic v2). Every model keeps fields the server adds later (``extra="allow"``)."""

import asyncio
import inspect
import time
from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr

from ._exceptions import (
    FINAL_CODES,
    APIConnectionError,
    APIStatusError,
    TrainingCancelled,
    TrainingFailed,
    WaitTimeout,
)

__all__ = [
    "AsyncJob",
    "DeletedPrefix",
    "Generation",
    "Health",
    "Job",
    "JobInfo",
    "JobProgress",
    "ModelCard",
    "ModelList",
    "PrefixInfo",
    "PrefixPage",
    "PromptTokensDetails",
    "RateLimitState",
    "Readiness",
    "ServerInfo",
    "StreamDelta",
    "TenantUsage",
    "TokenLogprob",
    "Tokenized",
    "TopLogprob",
    "Usage",
    "UsageCounts",
    "UsageReport",
]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class PromptTokensDetails(_Model):
    cached_tokens: int = 0  # prompt tokens taken from the server's prompt cache


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens_details.cached_tokens if self.prompt_tokens_details else 0


class TopLogprob(_Model):
    id: int
    text: str
    logprob: float


class TokenLogprob(_Model):
    """A generated token with its log-probability (the model's, before penalties and temperature) and the most
    likely tokens at that step. ``text`` is ``"bytes:\\xNN..."`` for a token holding part of a character."""

    id: int
    text: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Generation(_Model):
    """Answer of ``POST /generate``."""

    id: str
    tenant_id: str
    prefix: Optional[str] = None  # "base": the base model alone (None from servers before 2026-12-04)
    prefix_version: Optional[int] = None
    text: str
    finish_reason: Optional[str] = None  # "stop" or "length"
    stop_reason: Optional[Union[str, int]] = (
        None  # the stop string or stop token id that ended it (None: EOS, length)
    )
    usage: Usage = Field(default_factory=Usage)
    logprobs: Optional[list[TokenLogprob]] = None  # with ``logprobs=N``: one per generated token
    # with ``prompt_logprobs=N``: one per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    request_id: Optional[str] = Field(None, description="X-Request-ID of the response (not in the body)")


class StreamDelta(_Model):
    """One event of a streamed ``POST /generate``: new ``text``; the last one has ``finish_reason`` and ``usage``."""

    id: str = ""
    tenant_id: str = ""
    prefix: Optional[str] = None
    prefix_version: Optional[int] = None
    text: str = ""
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[str, int]] = None  # on the last event: the stop string or stop token id
    usage: Optional[Usage] = None
    logprobs: Optional[list[TokenLogprob]] = None  # with ``logprobs=N``: the tokens since the previous delta
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = (
        None  # with ``prompt_logprobs=N``: first delta only
    )


class Health(_Model):
    status: str = "ok"


class Readiness(_Model):
    """``GET /ready``; also returned (with ``status="not_ready"``) when the server answers 503."""

    status: str
    model: Optional[str] = None
    checks: dict[str, str] = Field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.status == "ready"


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: Optional[int] = None
    owned_by: Optional[str] = None
    root: Optional[str] = None
    prefix_version: Optional[int] = None
    max_model_len: Optional[int] = None  # context limit: prefix + prompt + output


class ServerInfo(_Model):
    """``GET /info``: the model, its limits and how the server runs it (every field the server sends is kept)."""

    version: Optional[str] = None
    # required: every server's /info sends it (a reply without it is not this server's /info)
    model: str
    model_fingerprint: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    architecture: Optional[str] = None  # the model's transformers class
    model_path: Optional[str] = None  # "llama"/"gpt2": the native fast path; "hf": transformers' own modeling
    num_layers: Optional[int] = None
    vocab_size: Optional[int] = None
    max_model_len: Optional[int] = None  # context limit: prefix + prompt + output
    # prompt + output one request may hold in the KV cache (a request needs both limits)
    max_request_tokens: Optional[int] = None
    max_prompt_tokens: Optional[int] = None  # longest prompt after rendering (413 past it)
    max_new_tokens: Optional[int] = None  # largest max_tokens a request may ask for (422 past it)
    max_num_seqs: Optional[int] = None  # requests decoded in one batch at most
    max_batched_tokens: Optional[int] = None  # tokens in one engine step at most (prefill chunks + decodes)
    max_queued: Optional[int] = None  # requests waiting at most; past it 503 with Retry-After
    kv_cache: Optional[dict[str, int]] = None  # "blocks", "block_size" (tokens) and "bytes" of the KV pool
    prefix_cache_bytes: Optional[int] = None
    prompt_cache: Optional[bool] = None
    speculative_tokens: Optional[int] = None
    cuda_graphs: Optional[str] = None
    kernels: Optional[str] = None
    async_decode: Optional[bool] = None
    store: Optional[str] = None  # prefix store backend: "disk" or "redis"
    training: Optional[bool] = None  # training jobs are accepted
    training_workers: Optional[int] = None
    default_prompt_format: Optional[str] = None
    served_model_names: Optional[list[str]] = None  # `model` values naming a tenant key's base model
    reasoning_parser: Optional[str] = None  # how a reasoning model's thinking is split off ("none")
    # the /v1 routes' defaults for sampling fields a request leaves out, from the model's generation_config.json
    sampling_defaults: Optional[dict[str, Union[float, int]]] = None
    tool_call_parser: Optional[str] = None


class ModelList(_Model):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class Tokenized(_Model):
    """Answer of ``POST /tokenize``: the ids a generation with that prefix would feed."""

    tokens: list[int] = Field(default_factory=list)
    count: int = 0
    prefix_length: int = 0
    max_model_len: Optional[int] = None
    max_request_tokens: Optional[int] = None  # prompt + output one request may hold in the KV cache
    max_new_tokens: Optional[int] = None  # the largest max_tokens the server takes
    prompt_format: Optional[str] = None
    token_strs: Optional[list[str]] = None  # each token's string, when asked (return_token_strs)

    @property
    def room(self) -> Optional[int]:
        """Output tokens that still fit after the prefix and this prompt, and that a request may ask for: in the
        context, in the KV cache's share of one request and under the server's max_tokens limit (None if
        unknown)."""
        if self.max_model_len is None:
            return None
        room = self.max_model_len - self.prefix_length - self.count
        if self.max_request_tokens is not None:
            room = min(room, self.max_request_tokens - self.count)
        if self.max_new_tokens is not None:
            room = min(room, self.max_new_tokens)
        return room


class PrefixInfo(_Model):
    """A stored prefix (latest version); ``versions`` lists all versions (``prefixes.get`` only)."""

    tenant_id: str
    name: str
    kind: Optional[str] = None
    prefix_length: Optional[int] = None
    version: Optional[int] = None
    versions: Optional[list[int]] = None
    created: Optional[float] = None
    base_model_fingerprint: Optional[str] = None
    dtype: Optional[str] = None
    shapes: dict[str, list[int]] = Field(default_factory=dict)
    sha256: Optional[str] = None
    training: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = Field(default_factory=dict)


class PrefixPage(list[PrefixInfo]):
    """A page of ``prefixes.list``: a list of :class:`PrefixInfo`, plus ``has_more`` (more follow: ask again with
    ``after=page.last_id``), ``first_id`` and ``last_id`` (``"tenant_id/name"`` of the first and the last item;
    None when empty)."""

    def __init__(
        self,
        items: Iterable[PrefixInfo] = (),
        has_more: bool = False,
        last_id: Optional[str] = None,
        first_id: Optional[str] = None,
    ) -> None:
        super().__init__(items)
        self.has_more = has_more
        self.first_id = first_id
        self.last_id = last_id

    def __repr__(self) -> str:
        return (
            f"PrefixPage({list.__repr__(self)}, has_more={self.has_more!r}, first_id={self.first_id!r}, "
            f"last_id={self.last_id!r})"
        )


class DeletedPrefix(_Model):
    tenant_id: str
    name: str
    object: str = "prefix"
    deleted: bool = True
    version: Optional[int] = None  # the one version deleted; None: every version


class JobProgress(_Model):
    """Training progress: optimizer ``step`` of ``total_steps``, last ``loss``, current ``epoch``."""

    step: Optional[int] = None
    total_steps: Optional[int] = Field(None, validation_alias=AliasChoices("total_steps", "total"))
    loss: Optional[float] = None
    epoch: Optional[Union[int, float]] = None

    @property
    def total(self) -> Optional[int]:
        """Alias of ``total_steps``."""
        return self.total_steps

    @property
    def fraction(self) -> Optional[float]:
        """``step / total_steps`` in [0, 1], or None while unknown."""
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, max(0.0, self.step / self.total_steps))


class JobInfo(_Model):
    """State of a training job (``GET /prefixes/jobs/{job_id}``). ``created``/``started``/``finished`` are timestamps as
    the server sends them (unix seconds); ``prefix_version`` is the stored version once it succeeded; ``summary`` the
    trainer's report. Fields a server of an older version does not send are None."""

    job_id: str
    status: str  # queued | running | succeeded | failed | cancelled
    object: str = "training_job"
    tenant_id: Optional[str] = None
    name: Optional[str] = None
    method: Optional[str] = None
    prefix_length: Optional[int] = None
    # as resolved: those submitted, then the method's defaults (min_steps may run more epochs than epochs says)
    hyperparameters: Optional[dict[str, Any]] = None
    num_examples: Optional[int] = None
    # the server's training limits when the job was accepted (max_seconds, max_steps, ...): it runs under them
    limits: Optional[dict[str, Any]] = None
    # the base model of the server that accepted it (a worker with another model fails the job)
    base_model_fingerprint: Optional[str] = None
    cancel_requested: Optional[bool] = None  # a cancel was asked for (a running job stops at its next step)
    attempts: Optional[int] = None  # how many times a worker started it
    worker: Optional[str] = None  # the worker running it (or that last ran it); None to a tenant key
    heartbeat: Optional[float] = None  # that worker's last sign of life (unix seconds)
    progress: Optional[JobProgress] = None
    created: Optional[Union[float, str]] = None
    started: Optional[Union[float, str]] = None
    finished: Optional[Union[float, str]] = None
    error: Optional[Any] = None
    prefix_version: Optional[int] = None
    summary: Optional[dict[str, Any]] = None
    init_from: Optional[dict[str, Any]] = None  # {"name", "version"} the job continues from
    idempotency_key: Optional[str] = None  # the Idempotency-Key it was submitted with

    @property
    def done(self) -> bool:
        """The job reached a terminal status (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def stopped(self) -> Optional[str]:
        """Why training ended before its planned steps (``"time_limit"``: the job succeeded with the prefix trained
        so far), from ``summary``; None when it ran them all, has not ended, or the server does not say."""
        value = (self.summary or {}).get("stopped")
        return value if isinstance(value, str) else None

    def __getstate__(self) -> dict[Any, Any]:
        # a pickled Job leaves its client behind (an HTTP connection pool cannot be pickled)
        state = super().__getstate__()
        private = state.get("__pydantic_private__")
        if private and private.get("_client") is not None:
            state["__pydantic_private__"] = {**private, "_client": None}
        return state

    def __deepcopy__(self, memo: Optional[dict[int, Any]] = None) -> Any:
        # a deep copy shares the job's client (its connection pool is not data, and cannot be copied)
        memo = {} if memo is None else memo
        client = getattr(self, "_client", None)
        if client is not None:
            memo[id(client)] = client
        return super().__deepcopy__(memo)

    def _api(self, deadline: Optional[float] = None, now: float = 0.0) -> Any:
        """The ``prefixes`` API of the job's client; with a `deadline`, through a client whose requests time out
        by then (a poll of ``wait(timeout=...)``)."""
        client = getattr(self, "_client", None)
        if client is None:
            raise RuntimeError(
                f"job {self.job_id} has no client (unpickled, or built by hand): use client.prefixes.get_job()"
            )
        if deadline is not None:
            # one attempt, bounded by the time left: the wait's own loop polls again (a client's retries would
            # each take that time again, and their backoff on top)
            left = max(0.05, deadline - now)
            read = client.timeout.read
            client = client.with_options(timeout=left if read is None else min(left, read), max_retries=0)
        return client.prefixes

    def _update(self, other: "JobInfo") -> None:
        for k in type(self).model_fields:
            setattr(self, k, getattr(other, k))
        if other.model_extra is not None and self.model_extra is not None:
            self.model_extra.clear()
            self.model_extra.update(other.model_extra)

    def _check_final(self) -> None:
        if self.status == "failed":
            raise TrainingFailed(
                f"training job {self.job_id} failed: {self.error or 'no reason given'}", self
            )
        if self.status == "cancelled":
            raise TrainingCancelled(f"training job {self.job_id} was cancelled", self)


# A poll that fails because the server is away (restarting, behind a proxy that answers 502/503/504) is not the
# end of a wait: the job lives in the server's queue and goes on. Polling goes on until the server has been away
# this long in a row (or the wait's timeout comes first); then the last error is raised.
WAIT_OUTAGE_S = 120.0
_AWAY_STATUSES = frozenset({502, 503, 504})


def _server_away(e: Exception) -> bool:
    """The error of a poll that a later poll may not see (not a 503 whose code says only a restart changes it)."""
    return isinstance(e, APIConnectionError) or (
        isinstance(e, APIStatusError) and e.status_code in _AWAY_STATUSES and e.code not in FINAL_CODES
    )


class _Outage:
    """How long the server has been away during a wait."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.since: Optional[float] = None

    def check(
        self, e: Exception, now: float, deadline: Optional[float], job: "JobInfo", timeout: Any
    ) -> None:
        """Raise `e` unless the server is just away, and not for too long; WaitTimeout if the wait's time is up
        meanwhile (the job goes on: the server was away, not the job gone)."""
        if not _server_away(e):
            raise e
        if self.since is None:
            self.since = now
        if deadline is not None and now >= deadline:
            raise _wait_timeout(job, timeout) from e
        if now - self.since >= self.limit:
            raise e


def _wait_timeout(job: "JobInfo", timeout: Any) -> WaitTimeout[Any]:
    return WaitTimeout(f"training job {job.job_id} still {job.status} after {timeout}s", job)


class Job(JobInfo):
    """A training job of a :class:`~prefixserve_client.Client`; ``refresh``, ``wait`` and ``cancel`` talk to it."""

    _client: Any = PrivateAttr(default=None)

    def refresh(self) -> "Job":
        """Fetch the job's current state into this object; returns self."""
        self._update(self._api().get_job(self.job_id))
        return self

    def cancel(self) -> "Job":
        """Ask the server to cancel the job (no-op once it ended); returns self, updated."""
        self._update(self._api().cancel_job(self.job_id))
        return self

    def wait(
        self,
        progress: Optional[Callable[["Job"], Any]] = None,
        *,
        poll_interval: float = 1.0,
        timeout: Optional[float] = None,
        max_outage: float = WAIT_OUTAGE_S,
    ) -> "Job":
        """Poll until the job ends; ``progress(job)`` is called after every poll.

        Returns the job once it succeeded; raises :class:`TrainingFailed` or :class:`TrainingCancelled`
        otherwise, and :class:`WaitTimeout` when ``timeout`` seconds passed first (the job goes on). A server
        that is away for a while (restarting: the job is requeued and goes on) is polled again until it has been
        away ``max_outage`` seconds in a row; then the connection (or 502/503/504) error is raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outage = _Outage(max_outage)
        while True:
            try:
                self._update(self._api(deadline, time.monotonic()).get_job(self.job_id))
            except (APIConnectionError, APIStatusError) as e:
                now = time.monotonic()
                outage.check(e, now, deadline, self, timeout)
                time.sleep(
                    poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - now))
                )
                continue
            outage.since = None
            if progress is not None:
                progress(self)
            if self.done:
                self._check_final()
                return self
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise _wait_timeout(self, timeout)
            delay = poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - now))
            time.sleep(delay)


class AsyncJob(JobInfo):
    """A training job of an :class:`~prefixserve_client.AsyncClient`; its methods are coroutines."""

    _client: Any = PrivateAttr(default=None)

    async def refresh(self) -> "AsyncJob":
        """Fetch the job's current state into this object; returns self."""
        self._update(await self._api().get_job(self.job_id))
        return self

    async def cancel(self) -> "AsyncJob":
        """Ask the server to cancel the job (no-op once it ended); returns self, updated."""
        self._update(await self._api().cancel_job(self.job_id))
        return self

    async def wait(
        self,
        progress: Optional[Callable[["AsyncJob"], Any]] = None,
        *,
        poll_interval: float = 1.0,
        timeout: Optional[float] = None,
        max_outage: float = WAIT_OUTAGE_S,
    ) -> "AsyncJob":
        """Like :meth:`Job.wait`; ``progress`` may be a plain function or a coroutine function."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        outage = _Outage(max_outage)
        while True:
            try:
                self._update(await self._api(deadline, loop.time()).get_job(self.job_id))
            except (APIConnectionError, APIStatusError) as e:
                now = loop.time()
                outage.check(e, now, deadline, self, timeout)
                await asyncio.sleep(
                    poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - now))
                )
                continue
            outage.since = None
            if progress is not None:
                r = progress(self)
                if inspect.isawaitable(r):
                    await r
            if self.done:
                self._check_final()
                return self
            now = loop.time()
            if deadline is not None and now >= deadline:
                raise _wait_timeout(self, timeout)
            delay = poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - now))
            await asyncio.sleep(delay)


class UsageCounts(_Model):
    """Counts of a tenant (or one of its prefixes) since the server started."""

    requests: int = 0  # generation requests admitted (one per HTTP request, whatever its n)
    completions: int = 0  # engine requests that ended: finished, aborted or failed
    aborted: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, taken from the prompt cache
    completion_tokens: int = 0
    total_tokens: int = 0


class RateLimitState(_Model):
    """The tenant's limits (None: unlimited) and what is left of them now."""

    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    max_concurrent: Optional[int] = None
    remaining_requests: Optional[int] = None
    remaining_tokens: Optional[int] = None
    in_flight: int = 0


class TenantUsage(UsageCounts):
    tenant_id: str
    rejected: int = 0  # refused by a rate or concurrency limit (429)
    training_jobs: int = 0
    prefixes: dict[str, UsageCounts] = Field(default_factory=dict)  # per prefix name ("base": no prefix)
    limits: RateLimitState = Field(default_factory=RateLimitState)


class UsageReport(_Model):
    """``GET /usage``: per-tenant counts of one server process since ``since`` (unix time)."""

    object: str = "usage"
    since: float = 0.0
    data: list[TenantUsage] = Field(default_factory=list)
    has_more: bool = False  # (the admin's every-tenant listing comes in pages: ask again with after=last_id)
    last_id: Optional[str] = None
