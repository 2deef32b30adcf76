"""Server-Sent Events: `data: {json}\\n\\n` frames ending with `data: [DONE]\\n\\n`.

`EngineEventStream` is a StreamingResponse that always closes its GenerationRuns: on normal end, on error and when
the client disconnects (Starlette cancels the streaming task; a run's close aborts its engine request, which frees
its KV within one engine step), even when the body iterator was never started. `merge` interleaves the frames of
several runs (OpenAI `n` and prompt lists) in the order they are produced. `json_off_loop`: a whole (unstreamed)
answer, which can hold thousands of log-probabilities, checked and encoded on a worker thread. `all_events` is a
run's engine events from its first; `chunked_events` those worth a frame, with the tokens since the last one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import APIError
from server.api.run import GenerationRun
from server.engine import TokenEvent, TokenLogprob

log = logging.getLogger("prefixserve.api")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One Server-Sent Event; `data` is a JSON chunk, the last event's `data` is `[DONE]`",
    "required": ["data"],
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}
SSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with `stream: true` Server-Sent Events (`data: {chunk}` ... `data: [DONE]`)",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    }
}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


DISCONNECTED = 499  # nginx's "client closed request": logged, never seen by a client


def decode_ids(tokenizer: Any, ids: list[int]) -> str:
    """Token ids' text as the tokenizer spells it, special tokens and spaces as they are (a prompt as the model reads
    it)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n\n"


async def merge(streams: list[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """Frames of several streams as each is produced; the first error of any stream is raised (the rest stop)."""
    if len(streams) == 1:
        async for frame in streams[0]:
            yield frame
        return
    q: asyncio.Queue[bytes | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[bytes]) -> None:
        try:
            async for frame in stream:
                await q.put(frame)
            await q.put(None)
        except Exception as e:
            await q.put(e)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def all_events(run: GenerationRun) -> AsyncIterator[TokenEvent]:
    """The run's first event (returned by its start) and the rest."""
    yield await run.started()
    async for ev in run.events():
        yield ev


async def chunked_events(
    run: GenerationRun,
) -> AsyncIterator[tuple[TokenEvent, list[int], list[TokenLogprob] | None]]:
    """The events worth a stream chunk (new text, or the end) with the ids and logprobs of every token since the
    previous chunk: a token whose text is held back (part of a character, a possible stop string) is still reported."""
    ids: list[int] = []
    pending: list[TokenLogprob] = []
    want = run.req.sampling.logprobs is not None
    async for ev in all_events(run):
        ids.extend(ev.token_ids)
        pending.extend(ev.logprobs or [])
        if ev.text or ev.finished:
            yield ev, ids, (pending if want else None)
            ids, pending = [], []


def stream_error(e: APIError) -> dict[str, Any]:
    """The error frame of a stream that has begun (HTTP 200 sent): the error body with the status the error would
    have had (prefixserve_client raises the same class as for the unstreamed request; the openai package raises
    its base `APIError` for any error frame)."""
    body = e.body()
    body["error"]["status"] = e.status
    return body


def error_frame(e: APIError) -> bytes:
    return sse(stream_error(e))


class EngineEventStream(StreamingResponse):
    """`end`: the last frame (None: none, as TGI's protocol has); `error_frame`: the frame of an error after the
    stream began."""

    def __init__(
        self,
        runs: GenerationRun | list[GenerationRun],
        frames: Callable[[], AsyncIterator[bytes]],
        *,
        end: bytes | None = DONE,
        error_frame: Callable[[APIError], bytes] = error_frame,
    ) -> None:
        self.runs = runs if isinstance(runs, list) else [runs]
        self._closing: asyncio.Future[None] | None = None
        self._end = end
        self._error_frame = error_frame
        super().__init__(self._body(frames), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _close(self) -> None:
        """Close every run, once, to the end. Shielded: the body is closed in the cancelled scope of a client that
        left, where any await that suspends (the Redis limiter's refund) raises at once; the closing goes on in its
        own task, which the response's last `_close` waits for."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close_runs())
        await asyncio.shield(self._closing)

    async def _close_runs(self) -> None:
        for run in self.runs:
            try:
                await run.close()
            except Exception:  # a bug: the other runs are still closed
                log.exception("request %s: closing a run failed", run.info.request_id)

    async def _body(self, frames: Callable[[], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
        try:
            async for frame in frames():
                yield frame
        except APIError as e:  # failure after the stream began: an error frame, then [DONE]
            yield self._error_frame(e)
        except Exception:  # a bug: the client still gets an error frame and the end of the stream
            log.exception("request %s: stream failed", self.runs[0].info.request_id if self.runs else "-")
            yield self._error_frame(APIError(500, "internal server error", code="internal_error"))
        finally:
            await self._close()
        if self._end is not None:
            yield self._end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


async def json_off_loop(model: type[BaseModel], build: Callable[[], dict[str, Any]]) -> Response:
    """`build()`'s body checked as `model` and encoded as FastAPI would, on a worker thread: an answer with
    thousands of log-probabilities takes seconds to build, which on the event loop held every other request."""

    def render() -> bytes:
        data = model.model_validate(build()).model_dump(mode="json", by_alias=True)
        return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

    return Response(await asyncio.to_thread(render), media_type="application/json")
