"""Beam search (vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions), run over the engine as vLLM
runs it: each step asks the engine for one token of every live beam with its 2 x width most likely next tokens
(the prompt cache keeps each beam's earlier tokens, so a step computes little more than the new ones), then keeps
the `width` best continuations. A beam that picks end-of-sequence is complete.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from server.api.service import REFUSALS, GenerationRun, RequestInfo, ResolvedPrefix
from server.engine import Request, SamplingParams, TokenEvent, TokenLogprob
from server.engine.detokenizer import decode_output

if TYPE_CHECKING:
    from server.api.service import Service

MAX_BEAM_WIDTH = 16  # each step asks for twice this many alternatives of every beam


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
    length_penalty: float,
    ends: Callable[[int], bool],
    report: int | None,
) -> list[Beam]:
    """One step: every running beam extended by each of its `2 x width` most likely tokens (`steps[i]`: beam i's
    step, its `top` most likely first); the extensions that end (`ends(token)`) join `done`, the `width` best of
    the others are returned. `report`: how many alternatives each kept token's log-probability lists."""
    candidates = []
    for beam, step in zip(running, steps, strict=True):
        for tok, lp in step.top[: 2 * width]:
            rank = sum(v >= lp for _, v in step.top)
            entry = TokenLogprob(tok, lp, step.top[: report or 0], rank)
            ext = Beam([*beam.tokens, tok], beam.cum_logprob + lp, [*beam.logprobs, entry], ends(tok))
            (done if ext.complete else candidates).append(ext)
    candidates.sort(key=lambda b: b.score(length_penalty), reverse=True)
    return candidates[:width]


class BeamSearch:
    """The beam search of one prompt: `width` beams, each step one engine request per live beam."""

    def __init__(
        self,
        svc: Service,
        prefix: ResolvedPrefix,
        prompt: list[int],
        sampling: SamplingParams,
        params: BeamParams,
        priority: int,
    ) -> None:
        self.svc, self.prefix, self.prompt, self.sampling = svc, prefix, prompt, sampling
        self.params, self.priority = params, priority
        self.task: asyncio.Task[list[TokenEvent]] | None = None
        self.open = 0  # its choices not closed yet
        self.started = time.monotonic()
        self.first_scheduled: float | None = None
        self.cached_tokens = 0

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
        req = Request(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=self.prompt + tokens,
            sampling=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=k),
            prefix=self.prefix.key,
            cache_salt=self.prefix.tenant_id,
            priority=self.priority,
        )
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
        p, width = self.params, self.params.width
        eos = self.svc.llm.eos_ids
        ignore_eos = self.sampling.ignore_eos
        k = max(2 * width, self.sampling.logprobs or 0)
        running, done = [Beam()], []
        for _ in range(self.sampling.max_tokens):
            steps = await asyncio.gather(*(self._step(b.tokens, k) for b in running))
            running = best_beams(
                running,
                steps,
                done,
                width,
                p.length_penalty,
                lambda t: not ignore_eos and t in eos,
                self.sampling.logprobs,
            )
            done.sort(key=lambda b: b.score(p.length_penalty), reverse=True)
            del done[width:]
            if len(done) == width and running[0].score(p.length_penalty) <= done[-1].score(p.length_penalty):
                break
        final = sorted(done + running, key=lambda b: b.score(p.length_penalty), reverse=True)[:width]
        return [await self._event(b) for b in final]

    async def _event(self, beam: Beam) -> TokenEvent:
        sp = self.sampling
        text = await self.svc.tokenize(
            decode_output,
            self.svc.bundle.tokenizer,
            self.prompt,
            beam.tokens,
            sp.skip_special_tokens,
            sp.spaces_between_special_tokens,
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


async def _no_events() -> AsyncIterator[TokenEvent]:
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
        return replace(events[self.index], request_id=self.req.request_id)

    async def close(self) -> None:
        if not self._closed:
            self.search.closed()
        await super().close()
