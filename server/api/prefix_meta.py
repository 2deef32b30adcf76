"""What a prefix reference resolves to (`ResolvedPrefix`: tenant, name, version, length, prompt format) and the
cache of it (`PrefixMetaCache`), which also remembers names this server cannot serve (`Refusal`).

`Service.resolve` (server/api/service.py) fills and reads the cache; store change events invalidate it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from server.api.errors import APIError
from server.engine import PrefixKey


@dataclass(frozen=True)
class ResolvedPrefix:
    tenant_id: str
    name: str | None  # None: base model
    version: int | None
    prefix_length: int
    prompt_format: str
    pinned: bool = False  # the request named its version (else: the latest when it was resolved)

    @property
    def key(self) -> PrefixKey | None:
        if self.name is None or self.version is None:
            return None
        return PrefixKey(self.tenant_id, self.name, self.version)


@dataclass(frozen=True)
class Refusal:
    """A name (or version) no version of which this server can serve (each was trained for another base model),
    cached like a resolution: finding that out reads every version's metadata. Raised as the APIError it was."""

    status: int
    message: str
    code: str

    def error(self, param: str) -> APIError:
        return APIError(self.status, self.message, code=self.code, param=param)


class PrefixMetaCache:
    """(tenant, name, version or None for the latest) → resolved metadata, so cached prefixes keep working while
    the store is down, and → why it cannot be served (a `Refusal`). Invalidation is per name: a change to a name
    drops its latest and every pinned version."""

    MAX_GENERATIONS = 4096  # names remembered as changed; past it every fetch under way is refused once
    # entries kept in all, the least recently used names' going first (a large store's every name: read again)
    MAX_ENTRIES = 65536
    # entries kept per name (its latest and pinned versions), the least recently used going first
    MAX_VERSIONS = 32

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str], dict[int | None, tuple[ResolvedPrefix | Refusal, float]]] = {}
        self._count = 0  # entries in all (of every name)
        # name -> the change count at its last invalidation; a fetch that began before it does not put its result
        self._changed_at: dict[tuple[str, str], int] = {}
        self._changes = 0
        self._floor = 0  # fetches that began before it are refused (`_changed_at` was forgotten then)
        self._epoch = 0  # bumped by `clear`
        self._lock = threading.Lock()

    def get(
        self, key: tuple[str, str], version: int | None = None
    ) -> tuple[ResolvedPrefix | Refusal | None, bool, tuple[int, int]]:
        """(entry, fresh, generation: give it back to `put`)."""
        with self._lock:
            versions = self._entries.pop(key, None)
            ent = None
            if versions is not None:
                self._entries[key] = versions  # (the most recently used last)
                ent = versions.pop(version, None)
                if ent is not None:
                    versions[version] = ent
            gen = (self._epoch, self._changes)
        if ent is None:
            return None, False, gen
        return ent[0], time.monotonic() - ent[1] < self.ttl_s, gen

    def generation(self) -> tuple[int, int]:
        """Now, as `get` gives it: a fetch that begins now puts its result with this."""
        with self._lock:
            return (self._epoch, self._changes)

    def put(
        self,
        key: tuple[str, str],
        value: ResolvedPrefix | Refusal,
        gen: tuple[int, int],
        version: int | None = None,
    ) -> None:
        epoch, began = gen
        with self._lock:
            # no invalidation raced with the fetch
            if epoch == self._epoch and began >= self._floor and self._changed_at.get(key, 0) <= began:
                versions = self._entries.pop(key, None) or {}
                self._entries[key] = versions
                self._count += 1 - (versions.pop(version, None) is not None)
                versions[version] = (value, time.monotonic())
                if len(versions) > self.MAX_VERSIONS:
                    del versions[next(iter(versions))]
                    self._count -= 1
                while self._count > self.MAX_ENTRIES and len(self._entries) > 1:
                    self._count -= len(self._entries.pop(next(iter(self._entries))))

    def invalidate(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._count -= len(self._entries.pop(key, {}))
            self._changes += 1
            if len(self._changed_at) >= self.MAX_GENERATIONS:  # bounded however many names ever change
                self._changed_at.clear()
                self._floor = self._changes
            self._changed_at[key] = self._changes

    def clear(self) -> None:
        """Drop every entry (change events may have been missed: a version number may now name another record,
        with another length or prompt format); fetches under way do not put theirs back."""
        with self._lock:
            self._entries.clear()
            self._count = 0
            self._epoch += 1
