"""Server-Sent Events: `data: {json}\\n\\n` frames ending with `data: [DONE]\\n\\n`.

`EngineEventStream` is a StreamingResponse that always closes its GenerationRun: on normal end, on error and when
the client disconnects (Starlette cancels the streaming task; the run's close aborts the engine request, which frees
its KV within one engine step), even when the body iterator was never started.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.errors import APIError
from server.api.service import GenerationRun

log = logging.getLogger("prefixserve.api")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n\n"


class EngineEventStream(StreamingResponse):
    def __init__(self, run: GenerationRun, frames: Callable[[GenerationRun], AsyncIterator[bytes]]) -> None:
        self.run = run
        super().__init__(self._body(frames), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _body(self, frames: Callable[[GenerationRun], AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
        try:
            async for frame in frames(self.run):
                yield frame
        except APIError as e:  # failure after the stream began: an error frame, then [DONE]
            yield sse(e.body())
        finally:
            await self.run.close()
        yield DONE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.run.close()
