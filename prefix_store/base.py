"""The abstract :class:`PrefixStore`: public API, validation and change notification shared by every backend.

Backends implement a handful of primitives (``_put``, ``_load``, ``_names``, ``_metas``, ``_versions``, ``_delete``,
``_exists``, ``ping``); names are validated and tensors encoded/verified here, so every backend refuses the same
inputs with the same errors.

Versions of a (tenant, name) start at 1, grow strictly and are never reused, not even after ``delete``: a
``(tenant_id, name, version)`` triple therefore always denotes the same tensors, which makes it a safe cache key.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import itertools
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping

import torch

from prefix_store.errors import InvalidName, InvalidPrefix, PrefixNotFound, StoreError, VersionTaken
from prefix_store.format import (
    IDEMPOTENCY,
    ChangeEvent,
    EncodedPrefix,
    PrefixMeta,
    PrefixRecord,
    check_fingerprint,
    decode_record,
    encode_prefix,
    label,
)
from prefix_store.names import RESERVED_PREFIX_NAME, validate_name

log = logging.getLogger("prefix_store")

Subscriber = Callable[[ChangeEvent], None]
MAX_VERSION = 10**18 - 1  # the highest version any backend stores (a file store's names hold 18 digits)


def check_version(version: object) -> int | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version must be an int or None, got {type(version).__name__}")
    return version


def version_to_take(tenant_id: str, name: str, next_version: int, asked: int | None) -> int:
    """The version a put stores: the next one, or the one asked for (``put(version=...)``) if it is above every
    version the name has had (VersionTaken otherwise)."""
    if asked is None:
        return next_version
    if asked < next_version:
        raise VersionTaken(
            f"prefix {label(tenant_id, name)} has had version {next_version - 1}: cannot store version {asked}"
        )
    return asked


class PrefixStore(abc.ABC):
    """Versioned store of trained prefixes (see docs/ARCHITECTURE.md, section prefix_store)."""

    url: str
    backend: str  # "disk" or "redis"

    def __init__(self) -> None:
        self._subscribers: dict[int, Subscriber] = {}
        self._sub_ids = itertools.count()
        self._sub_lock = threading.Lock()
        self._closed = False
        self.keep_versions: int | None = None  # newest versions kept per name after a put (None: all)
        self._origin_id = uuid.uuid4().hex

    # ------------------------------------------------------------------------------------------ public API
    def put(
        self,
        tenant_id: str,
        name: str,
        kind: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        base_model_fingerprint: str,
        prefix_length: int,
        training: dict | None = None,
        extra: dict | None = None,
        version: int | None = None,
        created: float | None = None,
    ) -> PrefixMeta:
        """Store a new version (atomically: readers see all of it or nothing) and return its metadata.

        ``version`` / ``created`` (copying another store's versions as they are: ``prefixserve prefixes copy``):
        store it as that version, which must be above every version the name has had (VersionTaken otherwise),
        with that creation time."""
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION
        ):
            raise ValueError(f"version must be an int in [1, {MAX_VERSION}], got {version!r}")
        if created is not None and (
            isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created)
        ):
            raise ValueError(f"created must be a finite number of unix seconds, got {created!r}")
        enc = self._encode(
            tenant_id, name, kind, tensors, base_model_fingerprint, prefix_length, training, extra
        )
        meta, _ = self._put(tenant_id, name, enc, version=version, created=created)
        self._after_put(meta)
        return meta

    def put_once(
        self,
        tenant_id: str,
        name: str,
        kind: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        idempotency_key: str,
        digest: str,
        base_model_fingerprint: str,
        prefix_length: int,
        training: dict | None = None,
        extra: dict | None = None,
    ) -> tuple[PrefixMeta, bool]:
        """``put`` at most once per ``idempotency_key`` of the name: (the new version, True), or, when a stored
        version of it was put with that key, (that version, False) and nothing is written (checked atomically
        with the write). The key and ``digest`` (what the caller compares a repeat by) are kept in the version's
        ``extra["idempotency"]``, so the key is remembered as long as that version is stored (``keep_versions``
        or a delete ends it)."""
        extra = {**(extra or {}), IDEMPOTENCY: {"key": idempotency_key, "digest": digest}}
        enc = self._encode(
            tenant_id, name, kind, tensors, base_model_fingerprint, prefix_length, training, extra
        )
        meta, created = self._put(tenant_id, name, enc, idempotency_key)
        # also on a repeat: the first attempt may have stored it and failed after (its events lost with it);
        # dropping caches and pruning again are harmless
        self._after_put(meta)
        return meta, created

    @staticmethod
    def _encode(
        tenant_id: str,
        name: str,
        kind: str,
        tensors: Mapping[str, torch.Tensor],
        base_model_fingerprint: str,
        prefix_length: int,
        training: dict | None,
        extra: dict | None,
    ) -> EncodedPrefix:
        validate_name(tenant_id, "tenant_id")
        validate_name(name, "name")
        if name == RESERVED_PREFIX_NAME:
            raise InvalidName(f"name {name!r} is reserved: it means the base model without a prefix")
        return encode_prefix(
            kind,
            tensors,
            base_model_fingerprint=base_model_fingerprint,
            prefix_length=prefix_length,
            training=training,
            extra=extra,
        )

    def _after_put(self, meta: PrefixMeta) -> None:
        self._notify(ChangeEvent("put", meta.tenant_id, meta.name, meta.version))
        if self.keep_versions is not None:
            self._prune(meta.tenant_id, meta.name, meta.version)

    def _prune(self, tenant_id: str, name: str, written: int) -> None:
        """Delete the versions older than the `keep_versions` newest up to the one just written. Only older ones:
        a put that finished at the same time as a newer one must not delete that one (with both pruning, each
        counting from its own version, nothing kept would be deleted). A failure here is logged, not raised: the
        put itself succeeded."""
        assert self.keep_versions is not None
        try:
            older = [v for v in self.versions(tenant_id, name) if v < written]  # ascending
            for v in older[: max(0, len(older) - (self.keep_versions - 1))]:
                with contextlib.suppress(PrefixNotFound):  # another writer pruned it first
                    self.delete(tenant_id, name, v)
        except StoreError as e:
            log.warning("could not prune old versions of %s: %s", label(tenant_id, name), e)

    def get(
        self,
        tenant_id: str,
        name: str,
        version: int | None = None,
        *,
        expected_fingerprint: str | None = None,
    ) -> PrefixRecord:
        """Load and verify a version (latest if ``version`` is None).

        Raises PrefixNotFound, FingerprintMismatch (``expected_fingerprint`` given and different),
        ChecksumMismatch (corrupted bytes) or InvalidPrefix (unparsable bytes, tensors disagreeing with metadata).
        """
        version = self._check_key(tenant_id, name, version)
        meta, blob = self._load(tenant_id, name, version, with_blob=True)
        self._check_meta(meta, tenant_id, name, version)
        check_fingerprint(meta, expected_fingerprint)
        assert blob is not None
        return decode_record(meta, blob)

    def get_meta(self, tenant_id: str, name: str, version: int | None = None) -> PrefixMeta:
        version = self._check_key(tenant_id, name, version)
        meta, _ = self._load(tenant_id, name, version, with_blob=False)
        self._check_meta(meta, tenant_id, name, version)
        return meta

    def list(self, tenant_id: str | None = None) -> builtins.list[PrefixMeta]:
        """Metadata of the latest version of every prefix (of one tenant, or of all), sorted by tenant, name.

        A prefix whose latest metadata is unreadable is skipped (with a warning) rather than failing the listing.
        """
        return self.list_page(tenant_id)[0]

    def list_page(
        self, tenant_id: str | None = None, *, after: tuple[str, str] | None = None, limit: int | None = None
    ) -> tuple[builtins.list[PrefixMeta], bool]:
        """One page of :meth:`list`: the prefixes sorted after the (tenant_id, name) ``after`` (a cursor: the last one
        of the page before), at most ``limit`` of them (None: all), and whether more follow.

        Only the page's metadata is read; the names are listed (and sorted) for every page, which is cheap beside
        reading metadata but grows with the store (10,000 names on Redis: ~60 ms a page, measured).
        """
        if tenant_id is not None:
            validate_name(tenant_id, "tenant_id")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        keys = sorted(k for k in self._names(tenant_id) if after is None or k > after)
        want = len(keys) if limit is None else limit + 1  # one more than the page: tells whether more follow
        out: builtins.list[PrefixMeta] = []
        i = 0
        while i < len(keys) and len(out) < want:
            batch = keys[i : i + want - len(out)]
            i += len(batch)
            for meta in self._metas(batch):
                try:
                    self._check_meta(meta, meta.tenant_id, meta.name, meta.version)
                except InvalidPrefix as e:
                    log.warning("skipping prefix in listing: %s", e)
                    continue
                out.append(meta)
        out.sort(key=lambda m: (m.tenant_id, m.name))
        if limit is not None and len(out) > limit:
            return out[:limit], True
        return out, False

    def servable_meta(self, tenant_id: str, name: str, version: int | None, fingerprint: str) -> PrefixMeta:
        """The metadata of ``version``, or (None) of the name's latest version made for the base model with this
        ``fingerprint``; the latest version if there is none (its fingerprint says so). Servers of two base models
        may share a store (a blue/green model upgrade): a version trained on one model does not hide the other's
        versions of the name, each fleet serves its own latest. The older versions are read newest first, in
        batches (one round trip each on Redis)."""
        meta = self.get_meta(tenant_id, name, version)
        if version is not None or meta.base_model_fingerprint == fingerprint:
            return meta
        older = [v for v in reversed(self.versions(tenant_id, name)) if v < meta.version]
        for v, raw in zip(older, self._raw_metas(tenant_id, name, older), strict=True):
            if raw is None:  # deleted meanwhile
                continue
            with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
                # a cheap look at its fingerprint first: only a match is parsed and checked in full
                if json.loads(raw).get("base_model_fingerprint") != fingerprint:
                    continue
            found = PrefixMeta.from_json(raw)
            self._check_meta(found, tenant_id, name, v)
            if found.base_model_fingerprint == fingerprint:
                return found
        return meta

    @abc.abstractmethod
    def _raw_metas(self, tenant_id: str, name: str, versions: builtins.list[int]) -> Iterator[bytes | None]:
        """The stored metadata bytes of each of ``versions`` in turn (None: not stored), read as they are asked
        for (a backend with round trips reads them in batches)."""

    def names(self, tenant_id: str | None = None) -> builtins.list[tuple[str, str]]:
        """(tenant_id, name) of every name that may hold a version (of one tenant or all), sorted; no metadata read,
        so a name whose latest metadata is unreadable is here too (``list`` skips it)."""
        if tenant_id is not None:
            validate_name(tenant_id, "tenant_id")
        return sorted(self._names(tenant_id))

    def versions(self, tenant_id: str, name: str) -> builtins.list[int]:
        """All stored versions, ascending ([] if none)."""
        self._check_key(tenant_id, name, None)
        return sorted(self._versions(tenant_id, name))

    def version_counter(self, tenant_id: str, name: str) -> int:
        """The highest version number the name has had, deleted versions included (0: none)."""
        self._check_key(tenant_id, name, None)
        return self._version_counter(tenant_id, name)

    def counted_names(self, tenant_id: str | None = None) -> builtins.list[tuple[str, str]]:
        """(tenant_id, name) of every name with a version counter, sorted: those that hold a version and those whose
        versions were all deleted (their numbers are still never given out again)."""
        if tenant_id is not None:
            validate_name(tenant_id, "tenant_id")
        return sorted(self._counted_names(tenant_id))

    def reserve_versions(self, tenant_id: str, name: str, upto: int) -> None:
        """Numbers up to ``upto`` are never given to a later put of the name (never lowers the counter): what a
        copy of a store carries over, so that a number deleted at the source is not reused at the target."""
        self._check_key(tenant_id, name, None)
        if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
            raise ValueError(f"upto must be a non-negative int, got {upto!r}")
        self._reserve_versions(tenant_id, name, upto)

    def delete(self, tenant_id: str, name: str, version: int | None = None) -> None:
        """Delete every version, or only ``version``; PrefixNotFound if there is none (or not that one). Deleting
        the latest version makes the one before it the latest; deleting the only one deletes the name. Later puts
        continue the version sequence (a version number is never reused)."""
        version = self._check_key(tenant_id, name, version)
        if version is None:
            last = self._delete(tenant_id, name)
        else:
            last = self._delete_version(tenant_id, name, version)
        self._notify(ChangeEvent("delete", tenant_id, name, last))

    def exists(self, tenant_id: str, name: str, version: int | None = None) -> bool:
        try:
            v = self._check_key(tenant_id, name, version)
        except PrefixNotFound:  # a version no store can hold
            return False
        return self._exists(tenant_id, name, v)

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable if the backend cannot be used (a read-only one can: `read_only`)."""

    @property
    def read_only(self) -> bool:
        """Whether the store only serves reads (every change raises StoreReadOnly)."""
        return False

    def durability_warnings(self) -> builtins.list[str]:
        """What in the backend's own configuration could lose stored prefixes (a server's start-up warnings);
        [] where nothing is known to."""
        return []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(ChangeEvent)`` after every put/delete (and with op "resync" when events of other
        processes may have been missed: drop everything cached); returns an idempotent unsubscribe function.

        Events of this store object are delivered synchronously, before put/delete returns. Backends shared by
        several processes (Redis) also deliver other processes' events, on a background thread. Exceptions raised
        by a callback are logged and swallowed.
        """
        if not callable(callback):
            raise TypeError("callback must be callable")
        with self._sub_lock:
            sid = next(self._sub_ids)
            self._subscribers[sid] = callback

        def unsubscribe() -> None:
            with self._sub_lock:
                self._subscribers.pop(sid, None)

        return unsubscribe

    def close(self) -> None:
        self._closed = True
        with self._sub_lock:
            self._subscribers.clear()

    def __enter__(self) -> PrefixStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _locations(self) -> builtins.list[str]:
        """Where the store is, as error messages name it (a path, a Redis host)."""
        return [self.url]

    def redact(self, message: str) -> str:
        """`message` (a store error's) without the store's location, for a tenant to read (a training job's error):
        the server's paths and hosts are the operator's."""
        for where in sorted(self._locations(), key=len, reverse=True):
            if where:
                message = message.replace(where, "(the server's store)")
        return message

    # -------------------------------------------------------------------------------------------- helpers
    def _check_key(self, tenant_id: str, name: str, version: object) -> int | None:
        validate_name(tenant_id, "tenant_id")
        validate_name(name, "name")
        v = check_version(version)
        if v is not None and v < 1:
            raise PrefixNotFound(f"prefix {label(tenant_id, name, v)} not found (versions start at 1)")
        if v is not None and v > MAX_VERSION:
            raise PrefixNotFound(
                f"prefix {tenant_id}/{name} has no version that high (at most {MAX_VERSION})"
            )
        return v

    @staticmethod
    def _check_meta(meta: PrefixMeta, tenant_id: str, name: str, version: int | None) -> None:
        if (
            meta.tenant_id != tenant_id
            or meta.name != name
            or (version is not None and meta.version != version)
        ):
            raise InvalidPrefix(
                f"metadata stored under {label(tenant_id, name, version)} describes {meta.label}; refusing it"
            )

    @property
    def _origin(self) -> str:
        """Marks the changes this object publishes to other processes: its own per process, so that a child
        forked with it open and its parent hear each other's (each took the other's for its own)."""
        return f"{self._origin_id}.{os.getpid()}"

    def _change_message(self, event: ChangeEvent) -> str:
        """A change as other processes read it (Redis pub/sub, the file store's journal): JSON with our origin."""
        return json.dumps({**event.to_dict(), "origin": self._origin}, separators=(",", ":"))

    def _notify_foreign(self, message: bytes | str) -> bool:
        """Deliver a change message another store object published (our own were delivered as they were made); a
        malformed one is logged and dropped (False)."""
        try:
            d = json.loads(message)
            if d.get("origin") == self._origin:
                return True
            event = ChangeEvent.from_dict(d)
        except (ValueError, AttributeError) as e:
            log.warning("prefix store %r: ignoring a malformed change message: %s", self, e)
            return False
        self._notify(event)
        return True

    def _notify_resync(self) -> None:
        """Change events may have been missed (a subscription was lost and is back): subscribers drop what they
        cached."""
        self._notify(ChangeEvent(op="resync", tenant_id="", name="", version=0))

    def _notify(self, event: ChangeEvent) -> None:
        with self._sub_lock:
            callbacks = builtins.list(self._subscribers.values())
        for cb in callbacks:
            try:
                cb(event)
            except Exception:
                log.exception("prefix store subscriber %r failed on %s", cb, event)

    # ---------------------------------------------------------------------------------- backend primitives
    @abc.abstractmethod
    def _put(
        self,
        tenant_id: str,
        name: str,
        enc: EncodedPrefix,
        idempotency_key: str | None = None,
        *,
        version: int | None = None,
        created: float | None = None,
    ) -> tuple[PrefixMeta, bool]:
        """Allocate the next version (or take ``version``: VersionTaken unless it is above every version the name
        has had), store ``enc`` under it atomically (created now, or at ``created``), return (its metadata, True).
        With an ``idempotency_key`` that a stored version of the name was put with (``put_once``): (that version's
        metadata, False), nothing written; checked atomically with the write."""

    @abc.abstractmethod
    def _load(
        self, tenant_id: str, name: str, version: int | None, *, with_blob: bool
    ) -> tuple[PrefixMeta, bytes | None]:
        """Metadata (and blob if ``with_blob``) of a version (latest if None); PrefixNotFound if absent."""

    @abc.abstractmethod
    def _names(self, tenant_id: str | None) -> builtins.list[tuple[str, str]]:
        """(tenant_id, name) of every name that may hold a version (of one tenant or all), in any order: cheap, no
        metadata read."""

    @abc.abstractmethod
    def _metas(self, keys: builtins.list[tuple[str, str]]) -> builtins.list[PrefixMeta]:
        """Latest metadata of each (tenant_id, name), in any order; a name without a version, or whose metadata is
        unreadable, is left out (the latter with a warning)."""

    @abc.abstractmethod
    def _versions(self, tenant_id: str, name: str) -> builtins.list[int]: ...

    @abc.abstractmethod
    def _version_counter(self, tenant_id: str, name: str) -> int: ...

    @abc.abstractmethod
    def _counted_names(self, tenant_id: str | None) -> builtins.list[tuple[str, str]]: ...

    @abc.abstractmethod
    def _reserve_versions(self, tenant_id: str, name: str, upto: int) -> None: ...

    @abc.abstractmethod
    def _delete(self, tenant_id: str, name: str) -> int:
        """Remove all versions; return the highest one removed; PrefixNotFound if none."""

    @abc.abstractmethod
    def _delete_version(self, tenant_id: str, name: str, version: int) -> int:
        """Remove one version atomically (readers see it whole or not at all; the latest pointer moves back to the
        highest remaining); return it; PrefixNotFound if absent."""

    @abc.abstractmethod
    def _exists(self, tenant_id: str, name: str, version: int | None) -> bool: ...
