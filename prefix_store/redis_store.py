"""Redis backend (``redis://host:port/db``, ``rediss://...``, ``unix:///path.sock?db=N``).

Optional query parameter ``prefix=<ns>`` namespaces every key and the channel (default ``prefixserve``); other
query parameters go to redis-py (``socket_timeout=...``, ``password=...``). Keys (``t`` tenant, ``n`` name,
``v`` version; ``:`` cannot occur in names)::

    <ns>:counter:<t>:<n>      the last version allocated; kept on delete, so versions are never reused
    <ns>:blob:<t>:<n>:<v>     safetensors bytes of version v
    <ns>:meta:<t>:<n>:<v>     metadata JSON of version v
    <ns>:versions:<t>:<n>     sorted set of stored versions (score = version)
    <ns>:latest:<t>:<n>       highest stored version
    <ns>:names:<t>            set: names of tenant t with at least one version
    <ns>:tenants              set: tenants with at least one name
    <ns>:once:<token>         the result of one put() or delete() call's transaction, while the call runs: see below
    channel <ns>:changes      JSON ChangeEvent (+ "origin") published after every put/delete

A put reads the counter under WATCH and commits the next version number with blob, metadata, indexes, the
``latest`` pointer (only moved forward) and the PUBLISH in one MULTI/EXEC (retried if another writer got in first):
other clients see the whole version or nothing, the change message goes out exactly when the change is visible,
and numbers are dense (a failed put or an idempotent repeat takes none). redis-py answers a connection lost
during EXEC with a WatchError (its reply may be lost after the write), and the transaction runs again: each put
writes a token naming its version in the same EXEC, and a retry that finds it answers that version instead of
writing a second one (deletes too: a re-run answers what the first deleted). A delete removes every version in one
WATCHed
MULTI/EXEC; deleting one version removes its keys and moves ``latest`` back to the highest remaining one in another
(the name goes with its last version). Reads of a version fetch metadata, the blob's size and its first
BLOB_CHUNK bytes in one MULTI/EXEC (a consistent snapshot), then the rest of a larger blob in BLOB_CHUNK pieces: a
version's keys are never rewritten (numbers are never reused), so the pieces are its bytes unless it was deleted
meanwhile, which a short read tells. In pieces because redis-py parses a reply holding the GIL: one GET of a 180 MiB
blob kept every other thread (the engine's decoding) waiting up to 0.2-1 s; 8 MiB pieces, about 13 ms. A read of
the latest version that lost it to a delete a few times in a row (writers under ``keep_versions=1`` replacing it
faster than its pieces come) reads the next one it resolves whole in its MULTI/EXEC, holding the GIL that once
(a copy to read in pieces doubled the blob's memory in Redis: past maxmemory every MULTI was refused). That reply
sits whole in Redis' output buffer for the client: a ``client-output-buffer-limit normal`` below a blob's size
makes Redis drop the connection, and that read fails (StoreUnavailable) until the writers slow down.

Connection problems raise StoreUnavailable after at most one quick reconnect attempt; sockets time out after a
few seconds, so a dead or hung Redis never blocks a caller indefinitely.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ResponseError, WatchError
from redis.retry import Retry

from prefix_store.base import PrefixStore, Subscriber, version_to_take
from prefix_store.errors import InvalidPrefix, PrefixNotFound, StoreRefused, StoreUnavailable
from prefix_store.format import ChangeEvent, EncodedPrefix, PrefixMeta, idempotency_key_of, label
from prefix_store.names import is_valid_name
from prefix_store.outage import RepeatedFailure
from prefix_store.urls import pop_query_param

log = logging.getLogger("prefix_store")

BLOB_CHUNK = 8 << 20  # bytes of a blob read at a time (see the module docstring)
UNPINNED_TRIES = 3  # reads of the latest version lost to a delete before a reader reads one whole at once

_T = TypeVar("_T")


def _as_bytes(replies: list[bytes | str | None]) -> list[bytes | None]:
    """An MGET's values: bytes, the client being made without decode_responses (redis-py's types cannot tell)."""
    return cast(list[bytes | None], replies)


def _text(reply: bytes | str) -> str:
    return reply.decode() if isinstance(reply, bytes) else reply


def _ints(members: Iterable[Any]) -> builtins.list[int]:
    """A ZRANGE's members (without scores) as ints (redis-py's type also covers WITHSCORES replies)."""
    return [int(x) for x in members]


def reconnect_once(for_asyncio: bool = False) -> Any:
    """A client's retry policy: one quick reconnect on a connection error (a pooled connection may predate a Redis
    restart), never a retry of a timeout (the command may have run)."""
    if for_asyncio:
        from redis.asyncio.retry import Retry as AsyncRetry

        return AsyncRetry(
            ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(redis.ConnectionError,)
        )
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(redis.ConnectionError,))


DEFAULT_NAMESPACE = "prefixserve"
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 2.0
META_BATCH = 128  # metadata records read in one round trip when looking through older versions
# how long a put's token says which version it wrote: as long as the put may retry its transaction
ONCE_TOKEN_TTL_S = 3600
# the change subscription pings Redis this often when it heard nothing, and takes it for lost without a pong
# this long after (redis-py's health check pings but never checks the answer: a subscription whose connection
# went silent, a black-holed path, stayed "subscribed", missing every change, until TCP gave up, ~15 minutes)
SUBSCRIPTION_PING_S = 10.0
SUBSCRIPTION_PONG_WAIT_S = 10.0
_UNAVAILABLE_REPLIES = (
    "LOADING",
    "READONLY",
    "MISCONF",
    "MASTERDOWN",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "OOM",
)
# ... as redis-py raises them: it strips the code from these replies' messages (and inside MULTI/EXEC prefixes every
# error with "Command # n (...) of pipeline caused error: "), so the code alone missed them: a read-only replica, a
# master link down or a full Redis (maxmemory) answered 500 instead of 503 + Retry-After
_UNAVAILABLE_ERRORS = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.OutOfMemoryError,
)
_PIPELINE_ERROR = "of pipeline caused error: "


def split_url(url: str) -> tuple[str, str]:
    """``(url for redis-py, namespace)``: removes the ``prefix`` query parameter."""
    client_url, ns = pop_query_param(url, "prefix")
    ns = DEFAULT_NAMESPACE if ns is None else ns
    if not is_valid_name(ns):
        raise ValueError(f"invalid redis key namespace {ns!r}: use letters, digits, '.', '_' and '-'")
    return client_url, ns


class RedisStore(PrefixStore):
    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        super().__init__()
        client_url, self.namespace = split_url(url)
        self.url = url
        self._r = redis.Redis.from_url(
            client_url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            health_check_interval=10,
            retry=reconnect_once(),
        )
        kw = self._r.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self._where = f"{where}/{kw.get('db', 0)}"
        self._wait_s = socket_timeout + socket_connect_timeout
        self._channel = f"{self.namespace}:changes"
        self._resync_when_subscribed = False  # set when a subscriber started caching before the subscription
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribed = threading.Event()  # the listener's subscription is active
        self._settled = threading.Event()  # the listener has subscribed or failed at least once
        self._ping_s, self._pong_wait_s = SUBSCRIPTION_PING_S, SUBSCRIPTION_PONG_WAIT_S

    def __repr__(self) -> str:
        return f"RedisStore('redis {self._where}', namespace={self.namespace!r})"

    def _locations(self) -> builtins.list[str]:
        # "host:port/db" as ours name it, and "host:port" (or the socket's path) as redis-py's errors quote it
        return [self._where, self._where.rpartition("/")[0]]

    # ------------------------------------------------------------------------------------------- keys
    def _key(self, *parts: object) -> str:
        return ":".join((self.namespace, *map(str, parts)))

    def _counter_key(self, t: str, n: str) -> str:
        return self._key("counter", t, n)

    def _blob_key(self, t: str, n: str, v: int) -> str:
        return self._key("blob", t, n, v)

    def _meta_key(self, t: str, n: str, v: int) -> str:
        return self._key("meta", t, n, v)

    def _versions_key(self, t: str, n: str) -> str:
        return self._key("versions", t, n)

    def _latest_key(self, t: str, n: str) -> str:
        return self._key("latest", t, n)

    def _names_key(self, t: str) -> str:
        return self._key("names", t)

    def _tenants_key(self) -> str:
        return self._key("tenants")

    # ------------------------------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"redis at {self._where} is unavailable ({what}): {e}") from e
        except (
            redis.exceptions.InvalidResponse
        ) as e:  # not a Redis server at that address (an HTTP port, say)
            raise StoreUnavailable(f"redis at {self._where} does not answer as Redis ({what}): {e}") from e
        except ResponseError as e:
            reply = str(e).rpartition(_PIPELINE_ERROR)[2]
            if isinstance(e, _UNAVAILABLE_ERRORS) or reply.startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"redis at {self._where} cannot serve ({what}): {e}") from e
            raise StoreRefused(f"redis at {self._where} refused ({what}): {e}") from e

    def _transaction(self, fn: Callable[[redis.client.Pipeline], _T], watch: tuple[str, ...]) -> _T:
        """Run ``fn(pipe)`` under WATCH until EXEC succeeds; ``fn`` reads, calls ``pipe.multi()``, queues."""
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*watch)
                    result = fn(pipe)
                    pipe.execute()
                    return result
                except WatchError:
                    continue

    def _transaction_once(self, body: Callable[[redis.client.Pipeline], int], watch: tuple[str, ...]) -> int:
        """A change that takes effect once however often its transaction is run: redis-py answers a connection
        lost during EXEC (sent, its reply lost) with a WatchError, so `_transaction` runs it again, and a stalled
        Redis may run an EXEC whose reply timed out. ``body`` reads, calls ``pipe.multi()``, queues the change and
        returns its result; a token written with it makes a run that finds it answer that result instead of
        changing the store again (a put re-run wrote a second version; a delete answered "not found" for what it
        had deleted, or deleted a version put since). One more run after a timeout or a lost connection: Redis may
        have run the EXEC (stalled), and a caller told 503 would do it again."""
        token_key = self._key("once", uuid.uuid4().hex)

        def commit(pipe: redis.client.Pipeline) -> int:
            mine = pipe.get(token_key)
            if mine is not None:  # an earlier run took effect
                pipe.multi()
                return int(mine)
            result = body(pipe)
            pipe.set(token_key, result, ex=ONCE_TOKEN_TTL_S)
            return result

        try:
            result = self._transaction(commit, watch=watch)
        except (redis.ConnectionError, redis.TimeoutError):
            result = self._transaction(commit, watch=watch)  # (as a put's: it may have run)
        with contextlib.suppress(redis.RedisError):  # done with: else it expires
            self._r.delete(token_key)
        return result

    # -------------------------------------------------------------------------------------- primitives
    def _put_with(self, reader: Any, t: str, n: str, idempotency_key: str) -> PrefixMeta | None:
        """The stored version of the name put with this Idempotency-Key (newest first)."""
        versions = [int(x) for x in reader.zrange(self._versions_key(t, n), 0, -1)]
        if not versions:
            return None
        for raw in reversed(reader.mget([self._meta_key(t, n, v) for v in versions])):
            if raw is None:
                continue
            try:
                meta = PrefixMeta.from_json(raw)
            except InvalidPrefix:
                continue
            if idempotency_key_of(meta) == idempotency_key:
                return meta
        return None

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
        asked = version
        t, n = tenant_id, name
        with self._errors(f"put {label(t, n)}"):
            if idempotency_key is not None:  # the usual repeat: after the first one finished
                earlier = self._put_with(self._r, t, n, idempotency_key)
                if earlier is not None:
                    return earlier, False
            counter_key, latest_key = self._counter_key(t, n), self._latest_key(t, n)
            # what the run of the transaction that took effect found or wrote (a run that finds an earlier run's
            # token, its EXEC's reply lost, is not this body: these stay that run's, even if the version it wrote
            # was deleted since: writing it again would undo the delete)
            found: list[PrefixMeta] = []
            written: list[PrefixMeta] = []

            def commit(pipe: redis.client.Pipeline) -> int:
                found.clear()
                written.clear()
                if idempotency_key is not None:  # a concurrent one: WATCHed, so checked atomically
                    earlier = self._put_with(pipe, t, n, idempotency_key)
                    if earlier is not None:
                        found.append(earlier)
                        pipe.multi()
                        return earlier.version
                # the version number is taken in the transaction: a repeat that finds its first attempt, or a put
                # that fails, leaves no gap in the numbering
                version = version_to_take(t, n, int(pipe.get(counter_key) or 0) + 1, asked)
                meta = enc.meta(t, n, version, time.time() if created is None else created)
                written.append(meta)
                meta_json = meta.to_json()
                message = self._change_message(ChangeEvent("put", t, n, version))
                latest = pipe.get(latest_key)
                pipe.multi()
                pipe.set(counter_key, version)
                pipe.set(self._blob_key(t, n, version), enc.blob)
                pipe.set(self._meta_key(t, n, version), meta_json)
                pipe.zadd(self._versions_key(t, n), {str(version): version})
                pipe.sadd(self._names_key(t), n)
                pipe.sadd(self._tenants_key(), t)
                if latest is None or int(latest) < version:  # a slower writer never moves it backwards
                    pipe.set(latest_key, version)
                pipe.publish(self._channel, message)
                return version

            self._transaction_once(commit, watch=(counter_key, latest_key, self._versions_key(t, n)))
        if found:
            return found[0], False
        return written[0], True

    def _resolve(self, t: str, n: str, version: int | None) -> int:
        if version is not None:
            return version
        latest = self._r.get(self._latest_key(t, n))
        if latest is None:
            raise PrefixNotFound(f"prefix {label(t, n)} not found")
        return int(latest)

    def _load(
        self, tenant_id: str, name: str, version: int | None, *, with_blob: bool
    ) -> tuple[PrefixMeta, bytes | None]:
        t, n = tenant_id, name
        meta_b: bytes | str | None
        blob: bytes | None
        with self._errors(f"get {label(t, n, version)}"):
            # latest may be deleted and re-put between the two round trips (a writer deleting latest versions in a
            # loop beat 3 tries once, on a loaded machine: the test of it failed); each try is two round trips
            for attempt in range(10):
                v = self._resolve(t, n, version)
                if with_blob:
                    meta_b, blob = self._read_version(t, n, v, pin=attempt >= UNPINNED_TRIES)
                else:
                    meta_b, blob = self._r.get(self._meta_key(t, n, v)), None
                if meta_b is not None or version is not None:
                    break
        if meta_b is None:
            raise PrefixNotFound(f"prefix {label(t, n, v)} not found")
        if with_blob and blob is None:
            raise InvalidPrefix(f"prefix {label(t, n, v)}: its tensor blob is missing")
        return PrefixMeta.from_json(meta_b), blob

    def _read_version(
        self, t: str, n: str, v: int, *, pin: bool = False
    ) -> tuple[bytes | None, bytes | None]:
        """(metadata, blob) of version `v`, either None where missing; both None if it was deleted while its
        blob was read. `pin`: the whole blob in the one transaction (no piece can find it deleted)."""
        key = self._blob_key(t, n, v)
        pipe = self._r.pipeline(transaction=True)
        pipe.get(self._meta_key(t, n, v))
        if pin:
            pipe.get(key)
            meta_b, blob = pipe.execute()
            return meta_b, blob or None
        pipe.strlen(key)
        pipe.getrange(key, 0, BLOB_CHUNK - 1)
        meta_b, size, first = pipe.execute()
        if not size:
            return meta_b, None
        parts, got = [first], len(first)
        while got < size:
            piece = self._r.getrange(key, got, min(got + BLOB_CHUNK, size) - 1)
            if not piece:
                return None, None  # deleted meanwhile
            parts.append(piece)
            got += len(piece)
        return meta_b, first if len(parts) == 1 else b"".join(parts)

    def _names(self, tenant_id: str | None) -> builtins.list[tuple[str, str]]:
        with self._errors("list prefixes"):
            if tenant_id is None:
                tenants = [_text(x) for x in self._r.smembers(self._tenants_key())]
            else:
                tenants = [tenant_id]
            pipe = self._r.pipeline(transaction=False)
            for t in tenants:
                pipe.smembers(self._names_key(t))
            return [(t, n.decode()) for t, names in zip(tenants, pipe.execute(), strict=True) for n in names]

    def _metas(self, keys: builtins.list[tuple[str, str]]) -> builtins.list[PrefixMeta]:
        if not keys:
            return []
        got: dict[tuple[str, str], PrefixMeta] = {}
        pending = keys
        # a latest version deleted between the two round trips (pruned by a new put, a rollback) leaves the name
        # with another latest: read again, as `_load` does (it was left out of the listing)
        for _attempt in range(10):
            with self._errors("list prefixes"):
                latest = self._r.mget([self._latest_key(t, n) for t, n in pending])
                found = [(t, n, int(v)) for (t, n), v in zip(pending, latest, strict=True) if v is not None]
                metas = self._r.mget([self._meta_key(t, n, v) for t, n, v in found]) if found else []
            pending = []
            for (t, n, v), raw in zip(found, metas, strict=True):
                if raw is None:
                    pending.append((t, n))  # its latest version went meanwhile
                    continue
                try:
                    got[(t, n)] = PrefixMeta.from_json(raw)
                except InvalidPrefix as e:
                    log.warning("skipping prefix %s in listing: %s", label(t, n, v), e)
            if not pending:
                break
        return [got[k] for k in keys if k in got]

    def _raw_metas(self, tenant_id: str, name: str, versions: builtins.list[int]) -> Iterator[bytes | None]:
        t, n = tenant_id, name
        for i in range(0, len(versions), META_BATCH):
            chunk = versions[i : i + META_BATCH]
            with self._errors(f"get versions of {label(t, n)}"):
                raws = _as_bytes(self._r.mget([self._meta_key(t, n, v) for v in chunk]))
            yield from raws

    def _version_counter(self, tenant_id: str, name: str) -> int:
        with self._errors(f"read the version counter of {label(tenant_id, name)}"):
            return int(self._r.get(self._counter_key(tenant_id, name)) or 0)

    def _counted_names(self, tenant_id: str | None) -> builtins.list[tuple[str, str]]:
        head = self._key("counter", "")  # "<ns>:counter:"; tenant ids and names hold no ':'
        pattern = head + (f"{tenant_id}:*" if tenant_id is not None else "*")
        out = []
        with self._errors("list prefixes"):
            for key in self._r.scan_iter(match=pattern, count=1000):
                t, sep, n = _text(key)[len(head) :].partition(":")
                if sep and is_valid_name(t) and is_valid_name(n):
                    out.append((t, n))
        return out

    def _reserve_versions(self, tenant_id: str, name: str, upto: int) -> None:
        counter_key = self._counter_key(tenant_id, name)

        def commit(pipe: redis.client.Pipeline) -> None:
            have = int(pipe.get(counter_key) or 0)
            pipe.multi()
            if upto > have:
                pipe.set(counter_key, upto)

        with self._errors(f"reserve versions of {label(tenant_id, name)}"):
            self._transaction(commit, watch=(counter_key,))

    def _versions(self, tenant_id: str, name: str) -> builtins.list[int]:
        with self._errors(f"versions of {label(tenant_id, name)}"):
            return _ints(self._r.zrange(self._versions_key(tenant_id, name), 0, -1))

    def _delete(self, tenant_id: str, name: str) -> int:
        t, n = tenant_id, name
        versions_key, names_key, latest_key = (
            self._versions_key(t, n),
            self._names_key(t),
            self._latest_key(t, n),
        )

        def commit(pipe: redis.client.Pipeline) -> int:
            found = _ints(pipe.zrange(versions_key, 0, -1))
            if not found:
                pipe.unwatch()
                raise PrefixNotFound(f"prefix {label(t, n)} not found")
            self._queue_delete_name(pipe, t, n, found)
            return max(found)

        with self._errors(f"delete {label(t, n)}"):
            return self._transaction_once(commit, watch=(versions_key, names_key, latest_key))

    def _queue_delete_name(
        self, pipe: redis.client.Pipeline, t: str, n: str, found: builtins.list[int]
    ) -> None:
        """Inside a transaction watching the name's versions, names and latest keys: read what is needed, then
        queue the removal of every version and of the name from the indexes, and its change message."""
        names_key = self._names_key(t)
        last_name = pipe.scard(names_key) <= 1 and pipe.sismember(names_key, n)
        pipe.multi()
        pipe.delete(*(self._blob_key(t, n, v) for v in found), *(self._meta_key(t, n, v) for v in found))
        pipe.delete(self._versions_key(t, n), self._latest_key(t, n))
        pipe.srem(names_key, n)
        if last_name:
            pipe.srem(self._tenants_key(), t)
        pipe.publish(self._channel, self._change_message(ChangeEvent("delete", t, n, max(found))))

    def _delete_version(self, tenant_id: str, name: str, version: int) -> int:
        t, n = tenant_id, name
        versions_key, latest_key = self._versions_key(t, n), self._latest_key(t, n)

        def commit(pipe: redis.client.Pipeline) -> int:
            found = _ints(pipe.zrange(versions_key, 0, -1))
            if version not in found:
                pipe.unwatch()
                raise PrefixNotFound(f"prefix {label(t, n, version)} not found")
            if found == [version]:  # the last one: the name goes
                self._queue_delete_name(pipe, t, n, found)
                return version
            pipe.multi()
            pipe.delete(self._blob_key(t, n, version), self._meta_key(t, n, version))
            pipe.zrem(versions_key, str(version))
            pipe.set(latest_key, max(v for v in found if v != version))
            pipe.publish(self._channel, self._change_message(ChangeEvent("delete", t, n, version)))
            return version

        with self._errors(f"delete {label(t, n, version)}"):
            return self._transaction_once(commit, watch=(versions_key, self._names_key(t), latest_key))

    def _exists(self, tenant_id: str, name: str, version: int | None) -> bool:
        with self._errors(f"exists {label(tenant_id, name, version)}"):
            if version is None:
                return bool(self._r.exists(self._latest_key(tenant_id, name)))
            return bool(self._r.exists(self._meta_key(tenant_id, name, version)))

    def ping(self) -> None:
        with self._errors("ping"):
            self._r.ping()

    def durability_warnings(self) -> builtins.list[str]:
        """A Redis that may evict keys when full (`allkeys-*`: prefixes are not a cache) or keeps nothing on disk
        (a restart empties it), as BullMQ and Sidekiq warn of theirs; none where CONFIG is not allowed (a managed
        Redis, an ACL)."""
        try:
            cfg: dict[str, str] = {}
            for name in ("maxmemory", "maxmemory-policy", "appendonly", "save"):
                # (bytes from this client: redis-py's type says str | None)
                reply = cast(dict[bytes | str, bytes | str], self._r.config_get(name))
                for k, v in reply.items():
                    cfg[_text(k)] = _text(v)
        except redis.RedisError:
            return []
        out = []
        policy = cfg.get("maxmemory-policy", "noeviction")
        if (
            policy.startswith("allkeys-") and cfg.get("maxmemory", "0") != "0"
        ):  # (no limit: nothing is evicted)
            out.append(
                f"redis {self._where}: maxmemory-policy is {policy}, so a full Redis evicts stored prefixes; set "
                "noeviction (a full Redis then refuses new prefixes instead of losing old ones)"
            )
        # (only where the server says both: a Redis-compatible server that has neither may persist otherwise)
        if cfg.get("appendonly") == "no" and "save" in cfg and not cfg["save"].strip():
            out.append(
                f"redis {self._where} keeps nothing on disk (appendonly no, no save points): a Redis restart loses "
                "every stored prefix; set appendonly yes (docker-compose.yml does)"
            )
        return out

    # ------------------------------------------------------------------------------------ pub/sub
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Also delivers events published by other processes (other replicas), on a background thread.

        Waits (a few seconds at most) until the channel subscription is active, so events published after this
        returns are not missed. If Redis is down the listener keeps reconnecting in the background; events
        published while it is disconnected are lost, so once it is subscribed again subscribers get a "resync"
        event (drop everything cached).
        """
        with self._listener_lock:
            if self._closed:
                raise StoreRefused("store is closed")
            unsubscribe = super().subscribe(callback)
            if self._listener is None or not self._listener.is_alive():
                self._stop.clear()
                self._subscribed.clear()
                self._settled.clear()
                self._listener = threading.Thread(
                    target=self._listen, name=f"prefix-store-pubsub-{self.namespace}", daemon=True
                )
                self._listener.start()
        self._settled.wait(self._wait_s)
        if not self._subscribed.is_set():
            # what the subscriber caches meanwhile may miss changes: its first subscription is a resync too
            self._resync_when_subscribed = True
            log.warning("prefix store: change subscription on redis %s not active yet; retrying", self._where)
        return unsubscribe

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """True once the change subscription is active (again, after a reconnect); False on timeout."""
        return self._subscribed.wait(timeout)

    def _listen(self) -> None:
        delay = 0.05
        # one channel: every subscribe confirmation after the first is a re-subscription, after our reconnect or
        # redis-py's own (which re-subscribes without raising)
        subscribed_before = False
        lost = RepeatedFailure(log, f"prefix store: change subscription on redis {self._where} lost")
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._r.pubsub()
                pubsub.subscribe(self._channel)
                heard, probe, probed_at = time.monotonic(), None, 0.0
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.2)
                    now = time.monotonic()
                    if msg is None:
                        if probe is not None and now - probed_at > self._pong_wait_s:
                            raise redis.ConnectionError(
                                f"no answer to a ping in {self._pong_wait_s:g}s (the connection went silent)"
                            )
                        if probe is None and now - heard >= self._ping_s:
                            probe, probed_at = uuid.uuid4().hex, now
                            pubsub.ping(probe)
                        continue
                    heard = now
                    if msg["type"] == "pong":
                        if probe is not None and _text(msg["data"]) == probe:
                            probe = None
                    elif msg["type"] == "subscribe":
                        self._subscribed.set()
                        self._settled.set()
                        delay = 0.05
                        lost.recovered()
                        if subscribed_before or self._resync_when_subscribed:
                            # what was published meanwhile never reached us
                            self._resync_when_subscribed = False
                            log.warning("prefix store: change subscription on redis %s is back", self._where)
                            self._notify_resync()
                        subscribed_before = True
                    elif msg["type"] == "message":
                        self._notify_foreign(msg["data"])
            except Exception as e:
                if not self._stop.is_set():
                    lost.failed(e)
            finally:
                self._subscribed.clear()
                self._settled.set()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
            self._stop.wait(delay)
            delay = min(delay * 2, 1.0)

    def close(self) -> None:
        with self._listener_lock:
            super().close()
            self._stop.set()
            listener, self._listener = self._listener, None
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout=self._wait_s)
        with contextlib.suppress(Exception):
            self._r.close()
