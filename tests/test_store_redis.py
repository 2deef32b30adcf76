"""prefix_store Redis backend: keys, pub/sub between replicas, outages (real redis-server, never fakeredis)."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
import torch

from prefix_store import ChangeEvent, errors, open_store
from prefix_store.redis_store import RedisStore, split_url
from tests.fixtures.redis import free_port

pytestmark = pytest.mark.redis

FP = "fp-redis-test"


def make_kv(fill: float = 1.0):
    return torch.full((2, 2, 1, 4, 8), float(fill))


def put(store, t="acme", n="bot", fill=1.0):
    return store.put(t, n, "prefix_tuning", {"kv": make_kv(fill)}, base_model_fingerprint=FP, prefix_length=4)


def wait_for(q: queue.Queue, timeout: float = 5.0):
    return q.get(timeout=timeout)


@pytest.fixture
def store(redis_store_url):
    s = open_store(redis_store_url)
    yield s
    s.close()


def test_url_namespace_parsing():
    assert split_url("redis://h:1/2?prefix=ns&socket_timeout=3") == ("redis://h:1/2?socket_timeout=3", "ns")
    assert split_url("redis://h:1/2") == ("redis://h:1/2", "prefixserve")
    with pytest.raises(ValueError):
        split_url("redis://h:1/2?prefix=a b")
    with pytest.raises(ValueError):
        split_url("redis://h:1/2?prefix=")


def test_key_layout(store):
    ns = store.namespace
    put(store)
    put(store)
    keys = {k.decode() for k in store._r.scan_iter(match=f"{ns}:*")}
    assert keys == {
        f"{ns}:counter:acme:bot",
        f"{ns}:blob:acme:bot:1",
        f"{ns}:meta:acme:bot:1",
        f"{ns}:blob:acme:bot:2",
        f"{ns}:meta:acme:bot:2",
        f"{ns}:versions:acme:bot",
        f"{ns}:latest:acme:bot",
        f"{ns}:names:acme",
        f"{ns}:tenants",
    }
    assert int(store._r.get(f"{ns}:latest:acme:bot")) == 2
    assert json.loads(store._r.get(f"{ns}:meta:acme:bot:2"))["version"] == 2
    store.delete("acme", "bot")
    assert {k.decode() for k in store._r.scan_iter(match=f"{ns}:*")} == {f"{ns}:counter:acme:bot"}


def test_namespaces_are_isolated(redis_store_url):
    a = open_store(redis_store_url)
    b = open_store(redis_store_url.replace("prefix=", "prefix=other-"))
    try:
        put(a, fill=1.0)
        assert not b.exists("acme", "bot") and b.list() == []
        put(b, fill=2.0)
        assert torch.equal(a.get("acme", "bot").kv, make_kv(1.0))
        assert b.get("acme", "bot").meta.version == 1
    finally:
        b.delete("acme", "bot")
        b._r.delete(b._counter_key("acme", "bot"))
        a.close()
        b.close()


def test_stray_blob_without_metadata_is_invisible(store):
    put(store)
    store._r.set(store._blob_key("acme", "bot", 2), b"partial")
    assert store.versions("acme", "bot") == [1]
    assert not store.exists("acme", "bot", 2)
    assert store.get("acme", "bot").meta.version == 1
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "bot", 2)


def test_a_blob_is_read_in_pieces_and_a_version_deleted_meanwhile_is_not_found(store, monkeypatch):
    """A blob larger than BLOB_CHUNK comes in GETRANGE pieces (one GET of a large blob held the GIL for the whole
    reply: the engine's decoding stalled); the pieces make the stored bytes, and a version deleted between two
    pieces is not found, never a cut blob."""
    import prefix_store.redis_store as rs

    kv = torch.arange(2 * 2 * 1 * 4 * 8, dtype=torch.float32).reshape(2, 2, 1, 4, 8)
    store.put("acme", "bot", "prefix_tuning", {"kv": kv}, base_model_fingerprint=FP, prefix_length=4)
    size = store._r.strlen(store._blob_key("acme", "bot", 1))
    monkeypatch.setattr(rs, "BLOB_CHUNK", 100)
    ranges: list[tuple[int, int]] = []
    getrange = store._r.getrange

    def spy(key, start, end):
        ranges.append((start, end))
        return getrange(key, start, end)

    monkeypatch.setattr(store._r, "getrange", spy)
    assert torch.equal(store.get("acme", "bot").tensors["kv"], kv)
    assert ranges == [(o, min(o + 100, size) - 1) for o in range(100, size, 100)] and len(ranges) >= 3

    def deleting(key, start, end):
        store._r.delete(key)
        return getrange(key, start, end)

    monkeypatch.setattr(store._r, "getrange", deleting)
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "bot", 1)


def test_the_latest_large_blob_is_read_while_writers_replace_it_faster_than_its_pieces_come(
    store, monkeypatch
):
    """Under keep_versions=1 every put deletes the version before it: a writer faster than the pieces of a large
    latest blob deleted each version a reader had resolved before its last piece, and get() gave up with a
    PrefixNotFound though a version existed the whole time. After a few such tries the reader reads the version
    it resolves whole, in the transaction that reads its metadata."""
    import prefix_store.redis_store as rs

    store.keep_versions = 1
    put(store, fill=1.0)
    monkeypatch.setattr(rs, "BLOB_CHUNK", 100)
    getrange = store._r.getrange
    puts = [1.0]

    def racing(key, start, end):
        puts.append(puts[-1] + 1.0)
        put(store, fill=puts[-1])  # a newer version, and the one being read is gone
        return getrange(key, start, end)

    monkeypatch.setattr(store._r, "getrange", racing)
    got = store.get("acme", "bot")
    monkeypatch.setattr(store._r, "getrange", getrange)
    assert torch.equal(got.tensors["kv"], make_kv(float(got.meta.version)))  # the version read, whole
    assert got.meta.version == len(puts) > 1  # after tries that lost theirs to newer ones, the latest, whole


def test_events_from_another_namespace_are_not_delivered(redis_store_url):
    mine = open_store(redis_store_url)
    other = open_store(redis_store_url.replace("prefix=", "prefix=x-"))
    try:
        got: queue.Queue = queue.Queue()
        mine.subscribe(got.put)
        put(other)
        time.sleep(0.5)
        assert got.empty()
    finally:
        other.delete("acme", "bot")
        other._r.delete(other._counter_key("acme", "bot"))
        mine.close()
        other.close()


def test_malformed_messages_are_ignored(store):
    got: queue.Queue = queue.Queue()
    store.subscribe(got.put)
    channel = f"{store.namespace}:changes"
    store._r.publish(channel, b"not json")
    store._r.publish(channel, json.dumps({"op": "explode", "tenant_id": "a", "name": "b", "version": 1}))
    store._r.publish(channel, json.dumps({"op": "put", "tenant_id": "a", "name": "b", "version": 3}))
    assert wait_for(got) == ChangeEvent("put", "a", "b", 3)
    assert got.empty()


def test_unsubscribed_callback_gets_nothing_from_replicas(redis_store_url):
    replica, writer = open_store(redis_store_url), open_store(redis_store_url)
    try:
        got: queue.Queue = queue.Queue()
        kept: queue.Queue = queue.Queue()
        unsubscribe = replica.subscribe(got.put)
        replica.subscribe(kept.put)
        unsubscribe()
        put(writer)
        assert wait_for(kept).version == 1
        assert got.empty()
    finally:
        replica.close()
        writer.close()


def test_close_stops_the_listener(redis_store_url):
    s = open_store(redis_store_url)
    s.subscribe(lambda ev: None)
    listener = s._listener
    assert listener is not None and listener.is_alive()
    s.close()
    assert not listener.is_alive()


def test_redis_down_is_unavailable_fast():
    port = free_port()  # nothing listens there
    s = open_store(f"redis://127.0.0.1:{port}/0")
    calls = {
        "ping": lambda: s.ping(),
        "put": lambda: put(s),
        "get": lambda: s.get("acme", "bot"),
        "get_meta": lambda: s.get_meta("acme", "bot", 1),
        "list": lambda: s.list(),
        "versions": lambda: s.versions("acme", "bot"),
        "exists": lambda: s.exists("acme", "bot"),
        "delete": lambda: s.delete("acme", "bot"),
    }
    for name, call in calls.items():
        t0 = time.monotonic()
        with pytest.raises(errors.StoreUnavailable) as ei:
            call()
        assert time.monotonic() - t0 < 5, name
        assert f"127.0.0.1:{port}" in str(ei.value)
    t0 = time.monotonic()
    s.subscribe(lambda ev: None)  # does not raise; keeps retrying in the background
    assert time.monotonic() - t0 < 5
    assert not s.wait_subscribed(0.1)
    s.close()


def test_unresponsive_redis_times_out():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts connections, never answers
    port = listener.getsockname()[1]
    try:
        s = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5, socket_connect_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(errors.StoreUnavailable):
            s.ping()
        assert time.monotonic() - t0 < 3
        s.close()
    finally:
        listener.close()


def test_survives_redis_kill_and_restart(redis_server_factory):
    srv = redis_server_factory
    store = open_store(srv.url)
    replica = open_store(srv.url)
    try:
        got: queue.Queue = queue.Queue()
        replica.subscribe(got.put)
        assert replica.wait_subscribed(5)
        put(store, fill=1.0)
        put(store, fill=2.0)
        assert wait_for(got).version == 1 and wait_for(got).version == 2

        srv.kill()
        t0 = time.monotonic()
        with pytest.raises(errors.StoreUnavailable):
            store.get("acme", "bot")
        with pytest.raises(errors.StoreUnavailable):
            put(store, fill=3.0)
        assert time.monotonic() - t0 < 5

        srv.start()
        # same store objects reconnect; acknowledged writes survived (AOF, fsync always)
        rec = store.get("acme", "bot")
        assert rec.meta.version == 2 and torch.equal(rec.kv, make_kv(2.0))
        assert store.versions("acme", "bot") == [1, 2]
        assert replica.wait_subscribed(10)  # the listener resubscribed by itself
        # and says that events may have been missed meanwhile
        assert wait_for(got).op == "resync"
        assert put(store, fill=4.0).version >= 3
        assert wait_for(got).version >= 3
    finally:
        store.close()
        replica.close()


def test_concurrent_puts_from_many_clients(redis_store_url):
    stores = [open_store(redis_store_url) for _ in range(4)]
    problems: list[BaseException] = []

    def writer(s, w):
        try:
            for i in range(10):
                s.put(
                    "acme",
                    "hot",
                    "prompt_tuning",
                    {"kv": make_kv(w * 100 + i)},
                    base_model_fingerprint=FP,
                    prefix_length=4,
                    training={"w": w, "i": i},
                )
        except BaseException as e:  # pragma: no cover
            problems.append(e)

    threads = [threading.Thread(target=writer, args=(s, w)) for w, s in enumerate(stores)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    try:
        assert not problems, problems[:3]
        s = stores[0]
        assert s.versions("acme", "hot") == list(range(1, 41))
        assert s.get_meta("acme", "hot").version == 40
        for v in range(1, 41):
            rec = s.get("acme", "hot", v)
            assert torch.equal(rec.kv, make_kv(rec.meta.training["w"] * 100 + rec.meta.training["i"]))
    finally:
        for s in stores:
            s.close()


def test_a_writer_overtaken_inside_its_transaction_takes_the_next_version(redis_store_url):
    """Writer A reads the version counter in its transaction, writer B commits meanwhile: A's EXEC fails (the
    counter is WATCHed) and A retries with the next number, so versions are dense, each holds its writer's tensors
    and the latest is the last committed (no writer can commit an older number after a newer one)."""
    slow, fast = open_store(redis_store_url), open_store(redis_store_url)
    inside, b_done = threading.Event(), threading.Event()
    original = slow._transaction
    attempts = []

    def delayed_commit(fn, watch):
        def slow_fn(pipe):
            out = fn(pipe)  # the counter is read and the writes queued; EXEC comes after this returns
            attempts.append(1)
            if len(attempts) == 1:
                inside.set()
                assert b_done.wait(10)
            return out

        return original(slow_fn, watch)

    slow._transaction = delayed_commit
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("a", put(slow, fill=1.0)))
    try:
        th.start()
        assert inside.wait(10)
        b = put(fast, fill=2.0)
        b_done.set()
        th.join(10)
        assert (result["a"].version, b.version) == (2, 1) and len(attempts) == 2
        assert fast.get_meta("acme", "bot").version == 2
        assert torch.equal(fast.get("acme", "bot").kv, make_kv(1.0))
        assert torch.equal(fast.get("acme", "bot", 1).kv, make_kv(2.0))
        assert fast.versions("acme", "bot") == [1, 2]
    finally:
        b_done.set()
        slow.close()
        fast.close()


@pytest.mark.parametrize("error", ["TimeoutError", "ConnectionError"])
def test_a_put_whose_exec_reply_timed_out_is_stored_once_not_refused(store, monkeypatch, error):
    """No reply to EXEC within the socket timeout (Redis stalled, a proxy held it): the put ran. It used to answer
    503 store_unavailable for a stored version, and the client's retry (without a key) stored a second one; it now
    asks once more and finds its token."""
    import redis

    real = redis.client.Pipeline.execute
    lost: list[int] = []

    def execute(self, *a, **k):
        out = real(self, *a, **k)
        if self.watching is False and not lost and len(out) > 3:  # the put's EXEC: it wrote, no reply came
            lost.append(1)
            raise getattr(redis, error)("Timeout reading from socket")
        return out

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    meta = put(store, fill=3.0)
    assert lost == [1] and meta.version == 1 and store.versions("acme", "bot") == [1]
    assert torch.equal(store.get("acme", "bot").kv, make_kv(3.0))


def test_a_put_whose_exec_reply_was_lost_writes_one_version(store, monkeypatch):
    """redis-py answers a connection lost while watching keys (EXEC sent, its reply lost) with a WatchError, and the
    put runs its transaction again: the token written with the version makes the retry answer that version instead
    of writing a second one (it wrote versions 1 and 2 for one put)."""
    import redis
    from redis.exceptions import WatchError

    real = redis.client.Pipeline.execute
    lost: list[int] = []

    def execute(self, *a, **k):
        out = real(self, *a, **k)
        if (
            self.watching is False and not lost and len(out) > 3
        ):  # the put's EXEC: it wrote, then the reply is lost
            lost.append(1)
            raise WatchError("A ConnectionError occurred while watching one or more keys")
        return out

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    meta = put(store, fill=3.0)
    assert lost == [1]
    assert meta.version == 1 and store.versions("acme", "bot") == [1]
    assert torch.equal(store.get("acme", "bot").kv, make_kv(3.0))
    assert put(store, fill=4.0).version == 2  # the next put is a put of its own
    # the version is deleted before the retry (a delete, keep_versions): the put is still done, not written again
    lost.clear()
    deleting = []

    def execute_then_delete(self, *a, **k):
        out = real(self, *a, **k)
        if self.watching is False and not lost and len(out) > 3:
            lost.append(1)
            deleting.append(1)
            store.delete("acme", "bot", 3)
            raise WatchError("A ConnectionError occurred while watching one or more keys")
        return out

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute_then_delete)
    assert put(store, fill=5.0).version == 3 and deleting == [1]
    assert store.versions("acme", "bot") == [1, 2]  # not written a second time as version 4


def test_a_delete_whose_exec_reply_was_lost_takes_effect_once(store, monkeypatch):
    """A delete re-run after its EXEC's reply was lost (a WatchError from redis-py) found what it had deleted gone
    and answered 404 (its own replica's caches never heard of it); a whole-name delete re-run after another
    client's put deleted that version too. The token written with it makes the re-run answer the first run's
    result, and the delete is announced to its own process's subscribers."""
    import redis
    from redis.exceptions import WatchError

    real = redis.client.Pipeline.execute
    lost: list[int] = []
    between: list = []

    def losing(self, *a, **k):
        queued = [c[0][0] for c in self.command_stack]
        out = real(self, *a, **k)
        if not lost and "PUBLISH" in queued and "DEL" in queued:  # a delete's EXEC: it ran, its reply is lost
            lost.append(1)
            for act in between:
                act()
            raise WatchError("A ConnectionError occurred while watching one or more keys")
        return out

    events: list = []
    store.subscribe(events.append)
    for fill in (1.0, 2.0, 3.0):
        put(store, fill=fill)
    monkeypatch.setattr(redis.client.Pipeline, "execute", losing)
    store.delete("acme", "bot", 2)  # (it raised PrefixNotFound)
    assert lost == [1] and store.versions("acme", "bot") == [1, 3]
    assert [(e.op, e.version) for e in events if e.op == "delete"] == [("delete", 2)]
    # the whole name, with another client's put landing between the lost reply and the re-run
    lost.clear()
    between.append(lambda: put(store, fill=4.0))
    store.delete("acme", "bot")
    assert lost == [1] and store.versions("acme", "bot") == [4]  # the put after the delete stays
    assert torch.equal(store.get("acme", "bot").kv, make_kv(4.0))


def test_a_listing_keeps_a_name_whose_latest_version_goes_while_it_reads(store, redis_store_url):
    """list() reads the latest pointers, then their metadata: a latest version deleted in between (a rollback, a
    put's keep_versions pruning) left the name out of the listing though it held a version the whole time."""
    other = open_store(redis_store_url)
    put(store, n="q", fill=1.0)
    put(store, n="q", fill=2.0)
    put(store, n="r", fill=1.0)
    real = store._r.mget
    done: list[int] = []

    def mget(keys, *a):
        out = real(keys, *a)
        if not done:
            done.append(1)
            other.delete("acme", "q", 2)  # after the latest pointers were read
        return out

    store._r.mget = mget
    try:
        assert [(m.name, m.version) for m in store.list("acme")] == [("q", 1), ("r", 1)]
    finally:
        store._r.mget = real
        other.close()
    assert done == [1]


def test_a_change_subscription_that_goes_silent_is_renewed(store, monkeypatch):
    """redis-py's pub/sub health check pings but never checks the answer: a subscription whose connection went
    silent (a black-holed path) stayed "subscribed", missing every change, until TCP gave up (~15 minutes). The
    listener pings when it has heard nothing for a while and, with no pong, subscribes again on a new connection
    and tells its subscribers that changes may have been missed."""
    import redis

    silent: list[bool] = []
    real = redis.client.PubSub.get_message

    def get_message(self, *a, **k):
        if silent:  # nothing comes through: no message, no pong
            time.sleep(k.get("timeout") or 0.0)
            return None
        return real(self, *a, **k)

    monkeypatch.setattr(redis.client.PubSub, "get_message", get_message)
    store._ping_s, store._pong_wait_s = 0.2, 0.3
    got: queue.Queue = queue.Queue()
    store.subscribe(got.put)
    assert store.wait_subscribed(5)
    time.sleep(0.8)  # pings answered: still subscribed, nothing delivered
    assert store.wait_subscribed(0) and got.empty()
    silent.append(True)
    deadline = time.monotonic() + 10
    while store.wait_subscribed(0):  # given up on once its ping goes unanswered
        assert time.monotonic() < deadline
        time.sleep(0.05)
    silent.clear()
    assert wait_for(got).op == "resync" and store.wait_subscribed(5)


def test_a_store_error_redacted_for_a_tenant_names_no_host(store):
    """A training job's error shows the tenant a store error without the operator's host: ours name it
    `host:port/db`, redis-py's own (quoted inside ours) `host:port`, and both are taken out."""
    host_port = store._where.rpartition("/")[0]
    text = f"redis at {store._where} is unavailable (put): Error 111 connecting to {host_port}. Connection refused."
    redacted = store.redact(text)
    assert host_port not in redacted and "Connection refused" in redacted


def _forked_subscriber(store, q) -> None:
    got: list = []
    store.subscribe(lambda e: got.append((e.op, e.version)))
    assert store.wait_subscribed(5)
    q.put("ready")
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    q.put(got)


def test_a_store_shared_through_fork_hears_the_other_process(store):
    """A store object inherited through fork() kept its parent's origin mark, so each process took the other's
    change messages for its own and dropped them: the child's subscriber never heard of the parent's puts."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    child = ctx.Process(target=_forked_subscriber, args=(store, q))
    child.start()
    try:
        assert q.get(timeout=20) == "ready"
        put(store, fill=1.0)
        put(store, fill=2.0)
        assert q.get(timeout=20) == [("put", 1), ("put", 2)]
    finally:
        child.join(10)


def test_a_redis_configured_to_lose_prefixes_is_named(redis_server_factory):
    """A Redis that evicts any key when full (`allkeys-*`) or keeps nothing on disk loses stored prefixes: the
    store says so (the server logs it at start-up); none for a durable one, or where CONFIG is not allowed."""
    srv = redis_server_factory  # (appendonly yes, noeviction)
    store = RedisStore(srv.url)
    try:
        assert store.durability_warnings() == []
        r = srv.client()
        r.config_set("maxmemory-policy", "allkeys-lru")
        r.config_set("appendonly", "no")  # (and the private server has no save points)
        got = store.durability_warnings()
        assert len(got) == 1 and "keeps nothing on disk" in got[0], got  # (no maxmemory: nothing is evicted)
        r.config_set("maxmemory", "1gb")
        got = store.durability_warnings()
        assert len(got) == 2 and "allkeys-lru" in got[0] and "keeps nothing on disk" in got[1], got
        # a user that may not read the configuration: no warning (and no error), whatever the configuration
        r.execute_command("ACL", "SETUSER", "noconfig", "on", ">pw", "~*", "&*", "+@all", "-config")
        limited = RedisStore(f"redis://noconfig:pw@127.0.0.1:{srv.port}/0")
        try:
            limited.ping()
            assert limited.durability_warnings() == []
        finally:
            limited.close()
        r.config_set("maxmemory-policy", "volatile-lru")  # (evicts only keys with a TTL: no prefix has one)
        r.config_set("save", "3600 1")
        assert store.durability_warnings() == []
    finally:
        store.close()


def test_a_redis_that_cannot_serve_now_is_unavailable_not_a_refusal(redis_server_factory):
    """redis-py strips the code from READONLY, MASTERDOWN and OOM replies (and prefixes every error inside
    MULTI/EXEC with "Command # n ... of pipeline caused error: "), so the check by code missed them: a read-only
    replica (a master demoted in a failover), a replica whose master link is down, a full Redis (maxmemory) were
    StoreRefused, a 500 with no Retry-After. They are StoreUnavailable (503 + Retry-After), and pass."""
    srv = redis_server_factory
    store = RedisStore(srv.url)
    r = srv.client()
    try:
        put(store)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")  # full
        with pytest.raises(errors.StoreUnavailable, match="maxmemory"):
            put(store, fill=2.0)
        r.config_set("maxmemory", "0")
        r.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a master that never answers
        with pytest.raises(errors.StoreUnavailable, match="read only replica"):
            put(store, fill=3.0)
        r.config_set("replica-serve-stale-data", "no")
        with pytest.raises(errors.StoreUnavailable, match="MASTER"):
            store.get("acme", "bot")
        r.execute_command("REPLICAOF", "NO", "ONE")
        assert put(store, fill=4.0).version == 2 and store.get("acme", "bot").meta.version == 2
    finally:
        store.close()
