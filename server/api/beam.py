"""Beam search (vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions), run over the engine as vLLM
runs it: each step asks the engine for one token of every live beam with its most likely next tokens (the prompt
cache keeps each beam's earlier tokens, so a step computes little more than the new ones). The rules are
transformers' (`best_beams`; token-identical to its `generate(num_beams=...)`): of the likeliest extensions, those
ranked in the first `width` that pick end-of-sequence are complete, the `width` likeliest others go on.

Scores are transformers': a beam's summed log-probability divided by its length (its generated tokens, the end of
sequence included) to the power `length_penalty` (above 0 favours longer outputs, below 0 shorter ones). The search
stops after `max_tokens` steps, or once `width` beams are complete and the best live beam scores no better than the
worst of them (transformers' `early_stopping=False` rule). The choices are the `width` best beams, best first.

Each choice is a `BeamRun`: a `GenerationRun` whose first and only event is its beam's whole output, so the routes
answer, stream, bill and meter it as they do a sampled choice. The choices of one prompt share one `BeamSearch`,
started by the first to start and cancelled once every one of them is closed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from server.api.errors import unavailable
from server.api.prefix_meta import ResolvedPrefix
from server.api.run import MAX_LATEST_ATTEMPTS, REFUSALS, GenerationRun, churned, newer_latest
from server.api.service import RequestInfo
from server.engine import Request, SamplingParams, TokenEvent, TokenLogprob
from server.engine.detokenizer import decode_output

if TYPE_CHECKING:
    from server.api.service import Service

MAX_BEAM_WIDTH = (
    16  # each step asks for (1 + end-of-sequence ids, at least 2) x this many tokens of every beam
)


@dataclass(frozen=True)
class BeamParams:
    width: int
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam width must be 1 to {MAX_BEAM_WIDTH}")


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)  # generated
    cum_logprob: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    complete: bool = False  # it ended with end-of-sequence

    def score(self, length_penalty: float) -> float:
        return self.cum_logprob / max(1, len(self.tokens)) ** length_penalty


class StepFailed(Exception):
    """A step's engine request ended with an error event (its prefix could not be loaded, say)."""

    def __init__(self, event: TokenEvent) -> None:
        super().__init__(event.error)
        self.event = event


def best_beams(
    running: list[Beam],
    steps: list[TokenLogprob],
    done: list[Beam],
    width: int,
    ends: Callable[[int], bool],
    report: int | None,
    k: int,
    last: bool = False,
) -> list[Beam]:
    """One step, as transformers' beam search takes it: every running beam extended by its most likely tokens
    (`steps[i]`: beam i's step, its `top` most likely first), the `k` likeliest extensions of all (by summed
    log-probability); of those ranked in the first `width`, the ones that end (`ends(token)`; on the `last` step,
    all of them) join `done`; the `width` likeliest that do not end go on (returned). Extensions that end below
    the first `width` are dropped. `report`: how many alternatives each kept token's log-probability lists."""
    candidates = []
    for beam, step in zip(running, steps, strict=True):
        for tok, lp in step.top[:k]:
            candidates.append((beam.cum_logprob + lp, beam, step, tok, lp))
    candidates.sort(key=lambda c: c[0], reverse=True)  # (stable: ties keep beam, then token order)
    going: list[Beam] = []
    for rank, (cum, beam, step, tok, lp) in enumerate(candidates[:k]):
        ended = ends(tok)
        if (ended or last) and rank >= width:
            continue
        if not ended and not last and len(going) == width:
            continue
        entry = TokenLogprob(tok, lp, step.top[: report or 0], sum(v >= lp for _, v in step.top))
        ext = Beam([*beam.tokens, tok], cum, [*beam.logprobs, entry], ended)
        (done if ended or last else going).append(ext)
    return going


class BeamSearch:
    """The beam search of one prompt: `width` beams, each step one engine request per live beam."""

    def __init__(
        self,
        svc: Service,
        info: RequestInfo,
        prefix: ResolvedPrefix,
        prompt: list[int],
        sampling: SamplingParams,
        params: BeamParams,
        priority: int,
    ) -> None:
        self.svc, self.info, self.prefix, self.prompt, self.sampling = svc, info, prefix, prompt, sampling
        self.params, self.priority = params, priority
        self.task: asyncio.Task[list[TokenEvent]] | None = None
        self.open = 0  # its choices not closed yet
        self.started = time.monotonic()
        self.first_scheduled: float | None = None
        self.cached_tokens = 0
        self.steps = 0  # engine requests made
        self.rounds = 0  # steps of every live beam done: each beam has this many tokens

    def result(self) -> asyncio.Task[list[TokenEvent]]:
        if self.task is None:
            self.task = asyncio.ensure_future(self._search())
            self.task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return self.task

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and self.task is not None and not self.task.done():
            self.task.cancel()  # every choice is gone (a client that left): its steps are aborted

    async def _step(self, tokens: list[int], k: int) -> TokenLogprob:
        # (after the first, a step is work the server accepted already: never refused for a full queue)
        req = Request(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=self.prompt + tokens,
            sampling=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=k),
            prefix=self.prefix.key,
            cache_salt=self.prefix.tenant_id,
            priority=self.priority,
            continuation=self.steps > 0,
        )
        self.steps += 1
        agen = self.svc.engine.generate(req)
        try:
            async for ev in agen:
                if ev.finished and ev.finish_reason == "error":
                    raise StepFailed(ev)
                if ev.logprobs:
                    if not tokens:
                        self.first_scheduled, self.cached_tokens = ev.first_scheduled_time, ev.cached_tokens
                    return ev.logprobs[0]
            raise RuntimeError("the engine ended a beam step without its token")
        finally:
            await agen.aclose()  # (an unfinished request is aborted)

    async def _search(self) -> list[TokenEvent]:
        """The search, run again on the name's latest version if the version it ran on left the store meanwhile
        (replaced, then deleted: a step loads it again, as a request's first step does), as if it had come then."""
        for attempt in range(1, MAX_LATEST_ATTEMPTS + 1):
            try:
                return await self._run()
            except StepFailed as e:
                if attempt == MAX_LATEST_ATTEMPTS and self._churned(e.event):
                    # every version it was given went away while it ran: the name exists, it changes too fast
                    raise unavailable(
                        f"prefix {self.prefix.name!r} changed {attempt} times during this beam search; retry",
                        self.svc.settings.retry_after_s,
                        code="prefix_changing",
                    ) from None
                newer = None if attempt == MAX_LATEST_ATTEMPTS else await self._newer_latest(e.event)
                if newer is None:
                    raise
                self.prefix = newer
        raise AssertionError("unreachable")

    def _churned(self, ev: TokenEvent) -> bool:
        return churned(self.prefix, ev)

    async def _newer_latest(self, ev: TokenEvent) -> ResolvedPrefix | None:
        return await newer_latest(self.svc, self.info, self.prefix, ev, self.prompt, self.sampling)

    async def _run(self) -> list[TokenEvent]:
        width, penalty = self.params.width, self.params.length_penalty
        eos = self.svc.llm.eos_ids
        ignore_eos = self.sampling.ignore_eos
        # transformers' candidates per step: enough that `width` do not end whichever end-of-sequence ids come
        k = max(2, 1 + (0 if ignore_eos else len(eos))) * width
        want = self.sampling.logprobs or 0
        running = [Beam()]
        done: list[Beam] = []
        self.rounds = 0  # (a run again on the name's latest version starts over)
        for step in range(self.sampling.max_tokens):
            steps = await asyncio.gather(*(self._step(b.tokens, max(k, want)) for b in running))
            self.rounds = step + 1
            last = step == self.sampling.max_tokens - 1
            running = best_beams(
                running, steps, done, width, lambda t: not ignore_eos and t in eos, want, k, last
            )
            done.sort(key=lambda b: b.score(penalty), reverse=True)
            del done[width:]
            if not running:
                break
            # transformers' early_stopping=False: done once no running beam scores better than the worst kept
            if len(done) == width and running[0].score(penalty) <= done[-1].score(penalty):
                break
        final = sorted(done + running, key=lambda b: b.score(penalty), reverse=True)[:width]
        return [await self._event(b) for b in final]

    async def _event(self, beam: Beam) -> TokenEvent:
        sp = self.sampling
        # (the end-of-sequence token is not part of the text, as in any output; its id stays in token_ids)
        shown = beam.tokens[:-1] if beam.complete else beam.tokens
        text = await self.svc.tokenize(
            decode_output,
            self.svc.bundle.tokenizer,
            self.prompt,
            shown,
            sp.skip_special_tokens,
            sp.spaces_between_special_tokens,
            self.svc.token_text,
        )
        return TokenEvent(
            request_id="",
            token_ids=list(beam.tokens),
            text=text,
            finished=True,
            finish_reason="stop" if beam.complete else "length",
            prompt_tokens=len(self.prompt),
            completion_tokens=len(beam.tokens),
            cached_tokens=self.cached_tokens,
            logprobs=list(beam.logprobs) if sp.logprobs is not None else None,
            arrival_time=self.started,
            first_scheduled_time=self.first_scheduled,
        )


async def _no_events() -> AsyncGenerator[TokenEvent, None]:
    return
    yield  # (an async generator)


class BeamRun(GenerationRun):
    """Choice `index` (0: the best) of a prompt's beam search: its one event is that beam's whole output."""

    def __init__(
        self,
        svc: Service,
        req: Request,
        prefix: ResolvedPrefix,
        info: RequestInfo,
        release: Callable[[], None],
        reserved_tokens: int,
        search: BeamSearch,
        index: int,
    ) -> None:
        super().__init__(svc, req, prefix, info, release, reserved_tokens)
        self.search, self.index = search, index
        search.open += 1

    async def _submit(self) -> TokenEvent:
        self._agen = _no_events()
        try:
            events = await asyncio.shield(self.search.result())
        except StepFailed as e:
            return e.event  # (`start` answers it as it answers a failed request)
        except REFUSALS as e:
            raise self._refusal(e) from None
        if self.index >= len(events):  # (fewer beams than choices: cannot happen with 2 x width per step)
            raise RuntimeError("beam search ended with fewer beams than choices")
        if self.search.prefix is not self.prefix:  # it ran again on the latest version
            self.prefix = self.search.prefix
            self.info.version = self.prefix.version
        return replace(events[self.index], request_id=self.req.request_id)

    @property
    def ran(self) -> bool:
        """Its one event comes when the search ends; a search the client left after its first step ran the prompt
        and that many tokens of each beam, billed as a sampled choice's tokens so far are (it was refunded
        whole: beam searches left before their end cost nothing). One that failed (a 503 to retry) is not: the
        caller got an error, and the request counts as refused."""
        return self.first is not None or (self.search.rounds > 0 and not self.refused)

    async def close(self) -> None:
        if not self._closed:
            self.search.closed()
            if self.first is None:
                self.generated = self.search.rounds
                self.cached_tokens = self.search.cached_tokens
        await super().close()
