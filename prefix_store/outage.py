"""Logging a failure that repeats every second or so (a Redis that went away): the first one, then a reminder at
most every `every_s` seconds with how many there were, not one warning line per retry."""

from __future__ import annotations

import logging
import time


class RepeatedFailure:
    """Call `failed(e)` at each failed attempt and `recovered()` at each success."""

    def __init__(self, log: logging.Logger, what: str, every_s: float = 60.0) -> None:
        self.log = log
        self.what = what
        self.every_s = every_s
        self.count = 0
        self._since = 0.0
        self._last = 0.0

    def failed(self, e: BaseException) -> None:
        now = time.monotonic()
        self.count += 1
        if self.count == 1:
            self._since = self._last = now
            self.log.warning("%s: %s", self.what, e)
        elif now - self._last >= self.every_s:
            self._last = now
            self.log.warning(
                "%s: still failing (%d attempts in %.0fs): %s", self.what, self.count, now - self._since, e
            )
        else:
            self.log.debug("%s: %s", self.what, e)

    def recovered(self) -> int:
        """Reset; returns how many attempts had failed in a row (0: it was not failing)."""
        n, self.count = self.count, 0
        return n
