"""The HTTP protocol the server runs: uvicorn's httptools protocol with a deadline for a request's headers.

uvicorn times out an idle keep-alive connection but never one whose request headers are still arriving: a client
that sent `GET / HTTP/1.1\\r\\nHost: x\\r\\n` and nothing more kept its connection (and a file descriptor) for good,
and enough of them (no key needed) exhaust the process's descriptors. Here a request's headers must be complete
within HEADER_TIMEOUT_S of its first byte (of the connection, for its first request); past it the connection is
closed, as nginx's `client_header_timeout` does. Bodies have their own deadline (`server.api.app.BODY_S`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 30.0


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_s = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(
        self,
    ) -> None:  # a request's first byte (a later request on a kept-alive connection too)
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
