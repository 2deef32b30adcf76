"""One generation request's run through the engine: `GenerationRun` (submit, first event, the events after it, the
metrics it observes, its tenant slot and the tokens it is billed and refunded on close), the retry of a request for a
prefix's latest version whose version left the store meanwhile (`churned`, `newer_latest`), the mapping of engine
errors and refusals to HTTP errors, and the race of a coroutine against the client's disconnect.

`Service` (server/api/service.py) makes the runs (`Service.generate_many`); the routes read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefix_store.format import label
from server.api.errors import APIError, field_name, unavailable
from server.engine import QueueFull, Request, RequestTooLarge, SamplingParams, TokenEvent, TokenLogprob

if TYPE_CHECKING:
    from server.api.prefix_meta import ResolvedPrefix
    from server.api.service import RequestInfo, Service

log = logging.getLogger("prefixserve.api")

# a request for the latest version tries at most this many versions when each is gone before its KV is fetched
MAX_LATEST_ATTEMPTS = 3


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's)


class ClientDisconnected(Exception):
    pass


def prompt_groups(prompts: list[list[int]]) -> list[int]:
    """For each engine request of an HTTP request, the index of the first of its prompt's: consecutive requests of
    one prompt (the same token list: `n` samples, `best_of`, a beam's choices) are one group."""
    out: list[int] = []
    for i, ids in enumerate(prompts):
        out.append(out[i - 1] if i and ids is prompts[i - 1] else i)
    return out


def share_prompts(runs: list[GenerationRun], prompts: list[list[int]]) -> None:
    """Group the runs of one prompt so that they bill it once (its tokens reserved by the first, the holder); a
    run alone bills its own."""
    groups: dict[int, list[GenerationRun]] = {}
    for r, first in zip(runs, prompt_groups(prompts), strict=True):
        groups.setdefault(first, []).append(r)
    for group in groups.values():
        if len(group) > 1:
            share = PromptShare(left=len(group), holder=group[0])
            for r in group:
                r.share = share


@dataclass
class PromptShare:
    """The runs of one prompt in one HTTP request (OpenAI `n`, TGI `best_of`, a beam search's choices): their
    prompt is billed once, as the response's usage counts it, by the last of them to close, with the fewest
    cached tokens of those billed (the sample that computed the shared prefill). Its tokens were charged to the
    rate limit once, in the holder's reservation (OpenAI's prompt + n x max_tokens), and go back to the tenant's
    budget if none of them is billed."""

    left: int  # runs not closed yet
    holder: GenerationRun  # the one whose reserved tokens include the prompt's
    billed: bool = False  # one of them was billed (it answered)
    cached: int | None = None


async def wait_disconnect(receive: Callable[[], Any]) -> None:
    while True:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            return


def outcome_read(fut: asyncio.Future[Any]) -> None:
    """A done callback that reads a task's outcome, so that asyncio does not log an exception nobody awaited."""
    if not fut.cancelled():
        fut.exception()


async def race_disconnect(receive: Callable[[], Any] | None, coro: Any) -> Any:
    """Await `coro`; if the client disconnects first, cancel it (which aborts its engine request)."""
    task = asyncio.ensure_future(coro)
    if receive is None:
        return await task
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        # nobody awaits it now: its outcome is read when it ends (a gather whose parts were cancelled ends with a
        # CancelledError *exception*, which asyncio logs as "never retrieved", one traceback per request)
        task.add_done_callback(outcome_read)
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected()


ENGINE_ERRORS: dict[str, tuple[int, str]] = {
    "PrefixNotFound": (404, "prefix_not_found"),
    "LookupError": (404, "prefix_not_found"),
    "KeyError": (404, "prefix_not_found"),
    "StoreUnavailable": (503, "store_unavailable"),
    "StoreRefused": (500, "store_error"),
    "FingerprintMismatch": (422, "prefix_incompatible"),
    "ChecksumMismatch": (422, "prefix_corrupt"),
    "InvalidPrefix": (422, "prefix_corrupt"),
    "OutOfBlocks": (503, "kv_cache_full"),
    "RequestTooLarge": (413, "request_too_large"),  # its prefix and the request can never fit the KV cache
    # the request's grammar went past the parser's limits while generating (or let no token through)
    "GrammarError": (422, "structured_output_failed"),
    # allowed_token_ids, bad_words and min_tokens together left no token to sample
    "NoTokenAllowed": (422, "no_token_allowed"),
    # still running when the shutdown grace period ran out (`LLMEngine.fail_all`)
    "ShuttingDown": (503, "shutting_down"),
    # preempted, and its prefix's tensors changed before it resumed (`Scheduler` refuses to mix them)
    "PrefixChanged": (503, "prefix_changing"),
    # the engine thread died while the request waited (`AsyncEngine` tells every waiting request)
    "EngineDead": (503, "engine_dead"),
    "QueueFull": (503, "queue_full"),
}


# what `AsyncEngine.generate` raises when it does not take a request (`GenerationRun._refusal`'s answers)
REFUSALS = (QueueFull, RequestTooLarge, ValueError, RuntimeError)


def churned(prefix: ResolvedPrefix, ev: TokenEvent) -> bool:
    """Whether `ev` (a failed first event) says the latest version a request ran on left the store (a 404 for an
    unpinned name): run again on the name's latest, as if it had come a moment later."""
    return (
        not prefix.pinned
        and prefix.name is not None
        and ENGINE_ERRORS.get(ev.error_type or "", (0,))[0] == 404
    )


async def newer_latest(
    svc: Service,
    info: RequestInfo,
    prefix: ResolvedPrefix,
    ev: TokenEvent,
    prompt_ids: list[int],
    sampling: SamplingParams,
    scoring: bool = False,
) -> ResolvedPrefix | None:
    """The prefix to run a failed request again on: the name's latest version if the failure was its version missing
    from the store (`churned`) and the latest is another version, with the same prompt format (the prompt was
    rendered for it) and within the size limits (413 if it is longer). None: the failure stands."""
    if not churned(prefix, ev):
        return None
    svc.meta_cache.invalidate((prefix.tenant_id, prefix.name or ""))
    try:
        newer = await svc.resolve(prefix.tenant_id, prefix.name)
    except APIError:
        return None  # gone altogether (404), or the store cannot say: the failure stands
    if newer.version == prefix.version or newer.prompt_format != prefix.prompt_format:
        return None
    svc._check(info, newer, prompt_ids, sampling, scoring=scoring)
    return newer


class GenerationRun:
    """One submitted engine request: its events, timing metrics, tenant slot; closed exactly once."""

    def __init__(
        self,
        svc: Service,
        req: Request,
        prefix: ResolvedPrefix,
        info: RequestInfo,
        release: Callable[[], None],
        reserved_tokens: int = 0,
    ) -> None:
        self.svc = svc
        self.req = req
        self.prefix = prefix
        self.info = info
        self._release = release
        self.reserved_tokens = reserved_tokens  # charged to the tenant's tokens-per-minute budget
        self.generated = 0  # tokens generated so far
        self.token_ids: list[int] = []  # ... and their ids
        self.cached_tokens = 0  # prompt tokens taken from the prompt cache (known from the first event on)
        self._agen: AsyncGenerator[TokenEvent, None] | None = None
        self._t0 = time.monotonic()
        # this run's time to first token and queue time (the request's `info`, shared by its runs, holds the last's)
        self._ttft: float | None = None
        self._queue: float | None = None
        self.final: TokenEvent | None = None
        self.first: TokenEvent | None = None
        self._starting: asyncio.Future[TokenEvent] | None = None  # `start` under way (`_start_runs`' task)
        self.refused = False  # the engine refused it (full queue, too large): it never ran, nor was aborted
        self.bill_output = True  # False: its generated tokens are not part of the answer (echo, max_tokens 0)
        self.share: PromptShare | None = None  # its prompt's other samples (None: billed its own prompt)
        # the client left before its first event (counted as an abort, of no tokens)
        self._aborted_queued = False
        self._closed = False

    async def start(self) -> TokenEvent:
        """Submit and wait for the first event; engine refusals and prefix load failures become APIError.

        A request for a prefix's latest version that finds it gone from the store when its KV is fetched (a new
        version replaced it meanwhile, and `keep_versions` or a delete removed it) runs on the version that is the
        latest now, as if it had arrived a moment later, instead of failing: it was accepted for "the latest".
        The response reports the version that served it (`self.prefix`)."""
        for attempt in range(1, MAX_LATEST_ATTEMPTS + 1):
            ev = await self._submit()
            if not (ev.finished and ev.finish_reason == "error") or attempt == MAX_LATEST_ATTEMPTS:
                break
            newer = await self._newer_latest(ev)
            if newer is None:
                break
            if self._agen is not None:
                await self._agen.aclose()  # its request has ended: nothing to abort
            log.info(
                "request %s: prefix %s/%s v%s is gone; running on v%s, now the latest",
                self.info.request_id,
                newer.tenant_id,
                newer.name,
                self.prefix.version,
                newer.version,
            )
            self.prefix = newer
            self.info.version = newer.version
            self.req = dataclasses.replace(self.req, request_id=uuid.uuid4().hex, prefix=newer.key)
        self._observe(ev)
        self.first = ev
        if ev.finished and ev.finish_reason == "error":
            if attempt == MAX_LATEST_ATTEMPTS and self._churned(ev):
                # every version it was given went away before it loaded: the name exists, it changes too fast
                self.info.error_code = "prefix_changing"
                raise unavailable(
                    f"prefix {self.prefix.name!r} changed {MAX_LATEST_ATTEMPTS} times while this request waited "
                    "for it; retry",
                    self.svc.settings.retry_after_s,
                    code="prefix_changing",
                )
            raise self._error(ev)
        return ev

    @property
    def ran(self) -> bool:
        """The engine ran it: its first event came (a prompt prefilled, a token or an error)."""
        return self.first is not None

    @property
    def submitted(self) -> bool:
        """Handed to the engine (its request may be queued, running or over)."""
        return self._agen is not None

    async def started(self) -> TokenEvent:
        """The first event: at once if `start` has it, else once its task (`Service._start_runs`) does; raises
        what `start` raised."""
        if self.first is not None:
            return self.first
        assert self._starting is not None
        return await self._starting

    def _churned(self, ev: TokenEvent) -> bool:
        """A request for the latest version whose last try also found its version gone (a 404)."""
        return churned(self.prefix, ev)

    async def _newer_latest(self, ev: TokenEvent) -> ResolvedPrefix | None:
        return await newer_latest(
            self.svc,
            self.info,
            self.prefix,
            ev,
            self.req.prompt_token_ids,
            self.req.sampling,
            not self.bill_output,
        )

    async def _submit(self) -> TokenEvent:
        """Hand the request to the engine and wait for its first event."""
        self._agen = self.svc.engine.generate(self.req)
        try:
            return await self._next()
        except REFUSALS as e:
            raise self._refusal(e) from None

    def _route_words(self, why: str) -> str:
        """An engine's size refusal in the route's own field names: the engine (`LLMEngine.validate`, the
        scheduler's admission) writes its sizes as `prompt (N ...)` and `max_tokens (N)`, the request's fields may
        be `inputs` and `max_new_tokens` (TGI) or `input` and `max_output_tokens` (Responses)."""
        prompt, out = field_name(self.info.prompt_param), field_name(self.info.max_tokens_param)
        return why.replace("prompt (", f"{prompt} (").replace("max_tokens (", f"{out} (")

    def _refusal(self, e: Exception) -> APIError:
        """The answer to the engine refusing the request (one of `REFUSALS`): it never ran."""
        self.refused = True
        retry = self.svc.settings.retry_after_s
        if isinstance(e, QueueFull):
            return unavailable(f"server busy: {e}", retry, code="queue_full")
        if isinstance(e, RequestTooLarge):
            why = self._route_words(str(e))
            return APIError(413, why, code="context_length_exceeded", param=self.info.max_tokens_param)
        if isinstance(e, ValueError):
            return APIError(422, str(e), code="invalid_value")
        return unavailable(f"engine unavailable: {e}", retry, code="engine_unavailable")

    async def _next(self) -> TokenEvent:
        """Next engine event (if the engine thread dies meanwhile, an EngineDead error event comes instead)."""
        assert self._agen is not None
        return await self._agen.__anext__()

    def _error(self, ev: TokenEvent) -> APIError:
        status, code = ENGINE_ERRORS.get(ev.error_type or "", (500, "generation_failed"))
        self.info.error_code = code
        if status == 404:
            self.svc.meta_cache.invalidate((self.prefix.tenant_id, self.prefix.name or ""))
            return APIError(404, f"prefix {self.prefix.name!r} not found", code=code, param="prefix")
        if code == "queue_full":
            return unavailable(f"server busy: {ev.error}", self.svc.settings.retry_after_s, code=code)
        if code in ("shutting_down", "engine_dead"):
            return unavailable(
                ev.error or "server is shutting down", self.svc.settings.retry_after_s, code=code
            )
        if status == 503:
            return unavailable(f"prefix unavailable: {ev.error}", self.svc.settings.retry_after_s, code=code)
        if code == "structured_output_failed":
            return APIError(
                422, ev.error or "structured output failed", code=code, param=self.info.structured_param
            )
        if code == "no_token_allowed":
            return APIError(422, ev.error or "no token can be sampled", code=code)
        if status == 422:
            shown = label(self.prefix.tenant_id, self.prefix.name or "", self.prefix.version)
            log.warning(
                "request %s: stored prefix %s cannot be served: %s", self.info.request_id, shown, ev.error
            )
            return APIError(422, f"prefix cannot be served: {ev.error}", code=code, param="prefix")
        if status == 413:
            # a context error as `Service._check`'s (the /v1 routes answer it as OpenAI does: a 400 clients know)
            why = self._route_words(ev.error or "request too large for the KV cache")
            return APIError(413, why, code="context_length_exceeded", param=self.info.max_tokens_param)
        # the id the client and the access log know (X-Request-ID), and the engine's
        log.error("request %s (engine request %s): generation failed: %s (%s)", self.info.request_id,
                  self.req.request_id, ev.error, ev.error_type)  # fmt: skip
        return APIError(500, "generation failed", code=code)

    def _observe(self, ev: TokenEvent) -> None:
        m = self.svc.metrics
        now = time.monotonic()
        self.generated += len(ev.token_ids)
        self.token_ids.extend(ev.token_ids)
        self.cached_tokens = ev.cached_tokens
        # (echo with max_tokens 0: the one token generated is not part of the answer, nor of its latencies)
        if ev.token_ids and self.bill_output:
            if self._ttft is None:  # (a run's first event is never held back by the stream interval)
                self.info.ttft_s = self._ttft = now - self._t0
                m.ttft.observe(self._ttft)
            # the engine's gaps between its steps, not between events: an event joins several steps' tokens under
            # --stream-interval (one long gap per event would skew the histogram), and vLLM's ITL is per step
            for gap in ev.itl:
                m.itl.observe(gap)
        if ev.finished:
            self.final = ev
            self.info.prompt_tokens = ev.prompt_tokens
            self.info.completion_tokens = ev.completion_tokens
            self.info.finish_reason = ev.finish_reason
            if ev.first_scheduled_time is not None and ev.arrival_time:
                self.info.queue_s = self._queue = max(0.0, ev.first_scheduled_time - ev.arrival_time)
                m.queue.observe(self._queue)
            # whatever the outcome, the tokens it processed (none for a request refused before it was scheduled: a
            # prefix that could not load, ...) and how long it took
            m.e2e.observe(now - self._t0)
            if ev.first_scheduled_time is not None:
                m.prompt_tokens.inc(ev.prompt_tokens)
            m.generation_tokens.inc(ev.completion_tokens if self.bill_output else 0)
            m.request_success.labels(ev.finish_reason or "error").inc()
            if ev.finish_reason != "error":
                self._observe_finished(ev, now)

    def _observe_finished(self, ev: TokenEvent, now: float) -> None:
        """vLLM's per-request histograms of a request that ran to its end: its sizes, and its time split into
        prefill (first scheduled to first token) and decode (first token to the end)."""
        m = self.svc.metrics
        generated = ev.completion_tokens if self.bill_output else 0
        m.request_prompt_tokens.observe(ev.prompt_tokens)
        m.request_generation_tokens.observe(generated)
        # (what the client asked for: echo with max_tokens 0 runs with 1, its token not part of the answer)
        m.request_max_tokens.observe(self.req.sampling.max_tokens if self.bill_output else 0)
        queue, ttft = self._queue, self._ttft
        if queue is None or ttft is None:  # (no token of the answer: echo with max_tokens 0)
            return
        m.prefill_time.observe(max(0.0, ttft - queue))
        m.decode_time.observe(max(0.0, now - self._t0 - ttft))
        m.inference_time.observe(max(0.0, now - self._t0 - queue))

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Events after the first (already returned by `start`)."""
        assert self._agen is not None
        if self.first is not None and self.first.finished:
            return
        while True:
            try:
                ev = await self._next()
            except StopAsyncIteration:
                return
            self._observe(ev)
            if ev.finished and ev.finish_reason == "error":
                raise self._error(ev)
            yield ev

    async def collect(self) -> GenerationResult:
        first = self.first
        assert first is not None
        parts = [first.text]
        lps = list(first.logprobs or [])
        async for ev in self.events():
            parts.append(ev.text)
            lps.extend(ev.logprobs or [])
        fin = self.final
        assert fin is not None
        return GenerationResult(
            "".join(parts),
            fin.finish_reason or "stop",
            fin.prompt_tokens,
            fin.completion_tokens,
            fin.cached_tokens,
            lps if self.req.sampling.logprobs is not None else None,
            first.prompt_logprobs,
            fin.stop_reason,
        )

    async def close(self) -> None:
        """Abort if unfinished (client gone), free the tenant slot, account usage and refund unused tokens.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            starting = self._starting
            if starting is not None and not starting.done():
                # a stream that ended before this choice's first event: its task aborts the engine request as it
                # unwinds. Not awaited: close runs in the cancelled scope of a client gone, where any await that
                # suspends raises at once
                starting.cancel()
            elif self._agen is not None:
                with contextlib.suppress(Exception):
                    await self._agen.aclose()  # its finally aborts an unfinished request
            if self._agen is not None and self.final is None and not self.refused:
                self._aborted_queued = not self.ran
                self.info.finish_reason = self.info.finish_reason or "abort"
                m = self.svc.metrics
                m.request_success.labels("abort").inc()
                m.e2e.observe(time.monotonic() - self._t0)
                # it was prefilled (its first token came) before the client left
                if self.ran:
                    m.prompt_tokens.inc(len(self.req.prompt_token_ids))
                    m.generation_tokens.inc(self.generated if self.bill_output else 0)
                    # ... and its log line says what it cost (with several choices: what they wrote together)
                    self.info.prompt_tokens = self.info.prompt_tokens or len(self.req.prompt_token_ids)
                    self.info.completion_tokens = (self.info.completion_tokens or 0) + (
                        self.generated if self.bill_output else 0
                    )
        finally:
            self._release()
            await self._account()

    async def _account(self) -> None:
        """Usage of an engine request that ran (the engine sent an event): its prompt and generated tokens unless
        it failed (the caller got an error, not an answer) or was aborted before its first token (then a
        completion, aborted, of no tokens: it was admitted and queued); the rest of its reservation goes back to
        the tenant's token budget. The samples of one prompt bill it once (`PromptShare`)."""
        consumed = 0
        usage, tenant, name = self.svc.usage, self.prefix.tenant_id, self.prefix.name
        share = self.share
        if self.ran:
            fin = self.final
            outcome = fin.finish_reason or "stop" if fin is not None else "abort"
            billed = outcome != "error" and bool(self.generated or outcome in ("stop", "length"))
            prompt = len(self.req.prompt_token_ids) if billed else 0
            generated = self.generated if billed and self.bill_output else 0
            cached = self.cached_tokens if billed else 0
            if share is not None:
                if billed:
                    share.billed = True
                    share.cached = cached if share.cached is None else min(share.cached, cached)
                prompt = cached = 0
            consumed = prompt + generated
            usage.completion(tenant, name, outcome, prompt, cached, generated)
        elif self._aborted_queued:
            usage.completion(tenant, name, "abort", 0, 0, 0)
        refund = self.reserved_tokens - consumed
        if share is not None:
            prompt = len(self.req.prompt_token_ids)
            if share.holder is self:
                refund -= prompt  # (the group's: kept until its last run closes)
            share.left -= 1
            if share.left == 0:
                if share.billed:
                    usage.prompt(tenant, name, prompt, share.cached or 0)
                else:
                    refund += prompt  # none of them answered: the prompt costs nothing
        await self.svc.limiter.refund(tenant, refund)
