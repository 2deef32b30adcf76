"""Device-resident prefix cache by bytes in front of the prefix store.

Resident prefixes live in blocks of the engine's KV pool, shared read-only by every running request of that
tenant. A miss starts a fetch on a loader thread; the engine keeps decoding other rows meanwhile and copies the
prefix into the pool once it has arrived. When the byte budget or the pool needs room, idle prefixes (no running
request) are evicted least-frequently-used first, least-recently-used among equals. Frequencies count requests per
prefix name (a new version inherits its name's popularity) and are halved every `aging_accesses` requests, so a
tenant that was popular long ago does not stay resident forever. Under the Zipf-like traffic of many tenants this
keeps the popular ones resident where plain LRU lets a stream of one-off tenants push them out
(`benchmarks/bench_engine.py --cache-test`, 1,000 tenants drawn Zipf(1.0), room for 100, 1,024 requests: 58.4%
hits against LRU's 52.8%, Belady's offline optimum 70.8%).
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.engine.daemon_pool import DaemonThreadPool
from server.engine.kv_cache import KVPool, OutOfBlocks
from server.engine.types import PrefixKey


class PrefixProvider(Protocol):
    """Fetches the serving form `kv [L, 2, K, P, D]` of a prefix (called on a loader thread). A provider may also
    have `fetch_digested(key) -> (kv, digest)`, naming what `kv` holds cheaply (a store: its record's sha256);
    without it the tensor's bytes are hashed (`kv_digest`)."""

    def fetch(self, key: PrefixKey) -> torch.Tensor: ...


class DictPrefixProvider:
    """In-memory provider (tests, benchmarks)."""

    def __init__(self, prefixes: dict[PrefixKey, torch.Tensor] | None = None) -> None:
        self.prefixes = dict(prefixes or {})
        # a serial number per tensor object fetched (an `id` alone is reused as soon as a replaced tensor is freed)
        self._serials: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._next_serial = itertools.count()

    def fetch(self, key: PrefixKey) -> torch.Tensor:
        try:
            return self.prefixes[key]
        except KeyError:
            raise LookupError(f"unknown prefix {key}") from None

    def fetch_digested(self, key: PrefixKey) -> tuple[torch.Tensor, str]:
        kv = self.fetch(key)
        known = self._serials.get(id(kv))
        if known is None or known[0]() is not kv:
            known = (weakref.ref(kv), next(self._next_serial))
            self._serials[id(kv)] = known
        return kv, f"tensor {known[1]}"  # another tensor under the key is another object, another serial


@dataclass
class PrefixEntry:
    key: PrefixKey
    length: int
    blocks: list[int]
    nbytes: int
    active: int = 0  # running requests holding it
    last_used: float = field(default_factory=time.monotonic)
    stale: bool = False  # replaced/deleted in the store: drop once idle
    used: bool = False  # taken by a request since it was installed
    installed: float = field(default_factory=time.monotonic)
    # what its tensors hold (a hash of their bytes): the same key loaded again after an invalidation (a store
    # emptied and written again reuses version numbers) may hold other tensors, and prompt blocks computed with one
    # must not be taken by requests on the other, nor a preempted request resume on them (a reload of the same
    # tensors, after an eviction or a routine invalidation, keeps the digest: its blocks)
    digest: str = ""


def prompt_cache_root(cache_salt: str | None, prefix: PrefixEntry | None) -> tuple[object, ...]:
    """The root of a request's prompt-cache key chain: cached prompt blocks are shared only under the same salt and
    the same prefix tensors (their KV is what they attended to)."""
    if prefix is None:
        return ("root", cache_salt, None, "")
    return ("root", cache_salt, prefix.key, prefix.digest)


def kv_digest(kv: torch.Tensor) -> str:
    """A hash of a prefix's tensor bytes (shape and dtype included), on a loader thread: a few ms for a few MB."""
    t = kv.detach().contiguous()
    h = hashlib.blake2b(f"{tuple(t.shape)} {t.dtype}".encode(), digest_size=16)
    h.update(t.view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class PrefixLoadError:
    key: PrefixKey
    message: str
    error_type: str  # class name of the original exception


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    fetches: int = 0  # store reads started (a miss joins one under way; an evicted prefix is read again)
    evictions: int = 0
    load_errors: int = 0


class PrefixCache:
    def __init__(
        self,
        pool: KVPool,
        provider: PrefixProvider,
        budget_bytes: int,
        loader_threads: int = 2,
        on_loaded: Callable[[], None] | None = None,
        error_ttl_s: float = 2.0,
        aging_accesses: int | None = None,
        policy: str = "lfu",
        max_pending: int | None = None,
        fresh_s: float = 10.0,
    ) -> None:
        self.pool = pool
        self.provider = provider
        self.budget_bytes = budget_bytes
        self.on_loaded = on_loaded
        self.error_ttl_s = error_ttl_s
        self.entries: OrderedDict[PrefixKey, PrefixEntry] = OrderedDict()  # LRU order: oldest first
        # (entries, bytes) resident, replaced whole on the engine thread at every change: other threads (the
        # /metrics scrape) read it without iterating `entries`, which the engine reorders at every lookup
        self.resident: tuple[int, int] = (0, 0)
        # blocks of resident entries no running request holds (evicted on demand: free for the usage gauge, as
        # vLLM counts its cached blocks); an int the engine thread updates, other threads read
        self.idle_blocks = 0
        self.stats = PrefixCacheStats()
        # requests per (tenant, name), halved every `aging_accesses` requests (default: 10 per resident entry)
        self.aging_accesses = aging_accesses
        if policy not in ("lfu", "lru"):
            raise ValueError(f"prefix cache policy must be lfu or lru, not {policy!r}")
        self.policy = policy  # "lru": recency alone (for comparison)
        # prefixes fetched ahead of use (loading, or resident and not yet taken) at most; more wait their turn
        self.max_pending = max_pending
        # an entry installed for a waiting request is protected from eviction until taken (or that request ends:
        # `unclaim`), for this long at most
        self.fresh_s = fresh_s
        self._freq: dict[tuple[str, str], int] = {}
        self._since_aging = 0
        self._loading: dict[PrefixKey, Future] = {}
        # fetched prefixes whose install found the pool short: the blocks each needs (`blocks_wanted`)
        self._short: dict[PrefixKey, int] = {}
        # waiting requests that asked for each prefix and have not taken it yet (`claim`/`unclaim`): an entry
        # none of them still wants is not held for them (an aborted request's prefix must not block others)
        self._wanted: dict[PrefixKey, int] = {}
        # entries installed less than fresh_s ago and not yet taken: the only ones that can be fresh (`_fresh`
        # looks at these, not at every resident entry: it runs for each waiting request an admission walks past)
        self._untaken: dict[PrefixKey, PrefixEntry] = {}
        self._errors: dict[PrefixKey, tuple[PrefixLoadError, float]] = {}
        self._errors_swept = time.monotonic()
        # daemon threads: a fetch hung on a dead store never holds the process's exit
        self._executor = DaemonThreadPool(loader_threads, "prefix-loader")
        # names changed in the store since the last `process` (one entry a name however often it changed), or all
        self._invalidated: set[tuple[str, str]] = set()
        self._invalidated_all = False
        self._lock = threading.Lock()  # guards both (written from store subscriber threads)

    # ---------------------------------------------------------------- engine thread API
    @property
    def resident_bytes(self) -> int:
        return self.resident[1]

    def lookup(self, key: PrefixKey, count: bool = True) -> PrefixEntry | PrefixLoadError | None:
        """Resident entry, a load error, or None while it is being fetched (a fetch is started if needed)."""
        if count:
            self._count(key)
        e = self.entries.get(key)
        if e is not None and not e.stale:
            if count:
                self.stats.hits += 1
            return e
        if count:
            self.stats.misses += 1  # (a remembered load error too: the prefix is not resident)
        err = self._errors.get(key)
        if err is not None:
            if time.monotonic() - err[1] < self.error_ttl_s:
                return err[0]
            del self._errors[key]
        if key not in self._loading:
            if self._capped():
                return None  # fetched once those ahead of it are in use
            fut = self._executor.submit(self._fetch, key)
            self._short.pop(key, None)  # (an earlier fetch's, dropped)
            self.stats.fetches += 1
            self._loading[key] = fut
            fut.add_done_callback(lambda _f: self._notify_loaded())
        return None

    def unchanged_miss(self, key: PrefixKey) -> bool:
        """Whether asking for `key` now would change nothing and give nothing: `lookup(key, count=False)` would
        return None without starting a fetch (one is under way, or `max_pending` are), and no fetched prefix of
        `key` waits for blocks (`blocks_wanted`, which `install_fetched` would act on). False where unsure. The
        scheduler passes over the requests that already asked for `key` on this alone: with many tenants missing
        the cache they are most of the waiting queue, every step."""
        e = self.entries.get(key)
        if (e is not None and not e.stale) or (self._errors and key in self._errors):
            return False
        if key in self._loading:
            return not (self._short and key in self._short)  # (each `in` hashes the key: skipped when empty)
        return self._capped()

    def _capped(self) -> bool:
        """No fetch may start now: `max_pending` prefixes are fetched ahead of use (loading, or resident and not
        taken yet by the request they were fetched for)."""
        if self.max_pending is None:
            return False
        loading = len(self._loading)
        return loading >= self.max_pending or loading + self._fresh() >= self.max_pending

    def claim(self, key: PrefixKey) -> None:
        """A waiting request wants `key` (fetched for it, held for it until it takes it or goes away)."""
        self._wanted[key] = self._wanted.get(key, 0) + 1

    def unclaim(self, key: PrefixKey) -> None:
        """That request took the prefix, or ended before it could (aborted, failed)."""
        n = self._wanted.get(key, 0) - 1
        if n > 0:
            self._wanted[key] = n
        else:
            self._wanted.pop(key, None)

    def settled(self, key: PrefixKey) -> bool:
        """Whether the scheduler could act on a request for `key` now: resident, or a fetch that finished (to
        install) or was never started (to start). False only while its fetch is in flight."""
        if key in self.entries:
            return True
        fut = self._loading.get(key)
        return fut is None or fut.done()

    def acquire(self, entry: PrefixEntry) -> None:
        if entry.active == 0:
            self.idle_blocks -= len(entry.blocks)
        entry.active += 1
        entry.used = True
        entry.last_used = time.monotonic()
        self.entries.move_to_end(entry.key)

    def release(self, entry: PrefixEntry) -> None:
        entry.active -= 1
        entry.last_used = time.monotonic()
        if entry.active == 0:
            self.idle_blocks += len(entry.blocks)
            if entry.stale:
                self._drop(entry)
            elif self.resident_bytes > self.budget_bytes:
                # the budget stretched for prefixes in use: back within it once they are idle, not only at the
                # next install (idle prefixes held the pool's blocks and the metrics over the budget meanwhile)
                self._trim(0)

    def loading(self) -> bool:
        return bool(self._loading)

    def _sweep_errors(self) -> None:
        """Forget load errors past their TTL (at most once a TTL): an error is otherwise dropped only when its key is
        asked for again, and a deleted version's never is (version numbers are not reused), so they piled up."""
        now = time.monotonic()
        if not self._errors or now - self._errors_swept < self.error_ttl_s:
            return
        self._errors_swept = now
        for key in [k for k, (_, t) in self._errors.items() if now - t >= self.error_ttl_s]:
            del self._errors[key]

    def process(self) -> None:
        """Apply invalidations and move finished fetches into the pool (engine thread: once per step, and when an
        idle engine is woken)."""
        self._sweep_errors()
        with self._lock:
            names, every = self._invalidated, self._invalidated_all
            self._invalidated, self._invalidated_all = set(), False
        if names or every:  # one pass over each table, however many names changed

            def matches(k: PrefixKey | None) -> bool:
                return k is not None and (every or (k.tenant_id, k.name) in names)

            for e in [e for k, e in self.entries.items() if matches(k)]:
                e.stale = True
                if e.active == 0:
                    self._drop(e)
            # a fetch under way (or finished, not yet installed) may hold the old tensors: fetched again on demand
            for k in [k for k in self._loading if matches(k)]:
                del self._loading[k]
                self._short.pop(k, None)
            for k in [k for k in self._errors if matches(k)]:
                del self._errors[k]
            # (prompt blocks computed with other tensors hang off their digest: unreachable from new ones)
        for key, fut in list(self._loading.items()):
            if not fut.done():
                continue
            exc = fut.exception()
            if exc is not None:
                del self._loading[key]
                self.stats.load_errors += 1
                self._errors[key] = (PrefixLoadError(key, str(exc), type(exc).__name__), time.monotonic())
                continue
            kv, digest = fut.result()
            n_blocks = self.pool.blocks_for(kv.shape[3])
            if n_blocks >= self.pool.num_blocks:  # would never fit, with room for a request beside it
                del self._loading[key]
                why = f"prefix of {kv.shape[3]} tokens needs {n_blocks} KV cache blocks; the cache holds "
                why += str(self.pool.num_blocks)
                self._errors[key] = (PrefixLoadError(key, why, "RequestTooLarge"), time.monotonic())
                continue
            if not self._install_loaded(key, kv, digest):
                self._short[key] = n_blocks  # retried next step, once running requests free blocks

    def _install_loaded(self, key: PrefixKey, kv: torch.Tensor, digest: str) -> bool:
        """Install a finished fetch of `key`; whether the pool had room (else it stays loaded, to retry)."""
        try:
            self._install(key, kv, digest)
        except OutOfBlocks:
            return False
        del self._loading[key]
        self._short.pop(key, None)
        return True

    def blocks_wanted(self, key: PrefixKey) -> int:
        """The KV blocks a fetched prefix waits for (its install found the pool short), else 0."""
        fut = self._loading.get(key)
        if fut is None or not fut.done() or key in self.entries:
            return 0
        return self._short.get(key, 0)

    def install_fetched(self, key: PrefixKey) -> bool:
        """Install a fetched prefix that waits for blocks (`blocks_wanted`) now, not at the next step's `process`
        (a fair preemption has just freed blocks for the request that wants it); whether it is resident."""
        if not self.blocks_wanted(key):
            return False
        return self._install_loaded(key, *self._loading[key].result())

    def evict(self, blocks_needed: int, spare_fresh: bool = False) -> bool:
        """Evict idle prefixes (least frequently used first) until `blocks_needed` blocks are free; True on
        success. `spare_fresh`: not one fetched for a request that has not taken it yet (a prefix installed for
        another waiting request: evicting it for this one only fetched it again, and then this one for it)."""
        now = time.monotonic()
        victims = self._victims()
        if spare_fresh:
            victims = [e for e in victims if not self.is_fresh(e, now)]
            if self.pool.num_free + sum(len(e.blocks) for e in victims) < blocks_needed:
                return False  # (evicting them would not make room: they stay)
        for e in victims:
            if self.pool.num_free >= blocks_needed:
                break
            self._drop(e)
            self.stats.evictions += 1
        return self.pool.num_free >= blocks_needed

    def invalidate(self, tenant_id: str, name: str) -> None:
        """Thread-safe: mark a prefix name stale (store change event); applied at the next step, or by an idle
        engine when woken."""
        with self._lock:
            if not self._invalidated_all:
                self._invalidated.add((tenant_id, name))
        if self.on_loaded is not None:
            self.on_loaded()

    def invalidate_all(self) -> None:
        """Thread-safe: mark every prefix stale (change events may have been missed); applied at the next step, or
        by an idle engine when woken."""
        with self._lock:
            self._invalidated_all = True
            self._invalidated.clear()
        if self.on_loaded is not None:
            self.on_loaded()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- internals
    def _notify_loaded(self) -> None:
        # (read when called: the engine's async front end sets it, maybe after a fetch started)
        if self.on_loaded is not None:
            self.on_loaded()

    def _fetch(self, key: PrefixKey) -> tuple[torch.Tensor, str]:
        """Loader thread: the provider's `kv[L, 2, K, P, D]`, staged for the pool's copy (`KVPool.stage`), and its
        digest."""
        fetch_digested = getattr(self.provider, "fetch_digested", None)
        if fetch_digested is not None:
            kv, digest = fetch_digested(key)
        else:
            kv = self.provider.fetch(key)
            digest = kv_digest(kv)
        return self.pool.stage(kv), digest

    def _install(self, key: PrefixKey, kv: torch.Tensor, digest: str = "") -> None:
        p = kv.shape[3]
        n_blocks = self.pool.blocks_for(p)
        nbytes = n_blocks * self.pool.block_bytes
        self._trim(nbytes)
        if self.pool.num_free < n_blocks and not self.evict(n_blocks, spare_fresh=True):
            raise OutOfBlocks("no room for prefix")
        blocks = self.pool.allocate(n_blocks)
        self.pool.write_prefix(blocks, kv)
        old = self.entries.get(key)
        if old is not None and old.active == 0:  # (an idle entry replaced: its blocks go back)
            self._drop(old)
            old = None
        self.entries[key] = self._untaken[key] = PrefixEntry(
            key=key, length=p, blocks=blocks, nbytes=nbytes, digest=digest
        )
        self.idle_blocks += n_blocks
        n, b = self.resident
        self.resident = (n + 1, b + nbytes) if old is None else (n, b + nbytes - old.nbytes)

    def _trim(self, incoming: int) -> None:
        """Evict idle entries, least frequently used first, until `incoming` more bytes fit the budget; never one
        fetched for a request that has not taken it yet (the budget stretches for those: at most `max_pending` of
        them), nor one in use."""
        if self.resident_bytes + incoming <= self.budget_bytes:
            return  # (without ranking every entry)
        now = time.monotonic()
        for e in self._victims():
            if self.resident_bytes + incoming <= self.budget_bytes or self.is_fresh(e, now):
                break
            self._drop(e)
            self.stats.evictions += 1

    def _count(self, key: PrefixKey) -> None:
        name = (key.tenant_id, key.name)
        self._freq[name] = self._freq.get(name, 0) + 1
        self._since_aging += 1
        if self._since_aging >= (self.aging_accesses or 10 * max(16, len(self.entries))):
            self._since_aging = 0
            self._freq = {k: n // 2 for k, n in self._freq.items() if n > 1}

    def is_fresh(self, e: PrefixEntry, now: float) -> bool:
        """Installed for a waiting request that has not taken it yet (and not long ago)."""
        return (
            not e.used and not e.stale and self._wanted.get(e.key, 0) > 0 and now - e.installed < self.fresh_s
        )

    def _fresh(self) -> int:
        """Resident entries that are fresh (`is_fresh`); those that never can be again leave `_untaken`."""
        now = time.monotonic()
        n = 0
        for key, e in list(self._untaken.items()):
            if e.used or self.entries.get(key) is not e or now - e.installed >= self.fresh_s:
                del self._untaken[key]
            else:
                n += self.is_fresh(e, now)
        return n

    def frequency(self, key: PrefixKey) -> int:
        return self._freq.get((key.tenant_id, key.name), 0)

    def _victims(self) -> list[PrefixEntry]:
        """Idle entries in eviction order: least frequently used first, least recently used among equals; entries
        just installed for a request that has not taken them yet go last (evicting them would only fetch them
        again: with frequencies, a newcomer is otherwise the first victim of the next install)."""
        idle = [e for e in self.entries.values() if e.active == 0]  # LRU order
        now = time.monotonic()
        if self.policy == "lru":
            return sorted(idle, key=lambda e: self.is_fresh(e, now))
        # stable: LRU order among equals
        return sorted(idle, key=lambda e: (self.is_fresh(e, now), self.frequency(e.key)))

    def _drop(self, e: PrefixEntry) -> None:
        if e.active == 0:
            self.idle_blocks -= len(e.blocks)
        if self.entries.get(e.key) is e:
            del self.entries[e.key]
            n, b = self.resident
            self.resident = (n - 1, b - e.nbytes)
        self.pool.free(e.blocks)
