"""prefix_store behaviour, identical for every backend (file in tmp_path, real Redis)."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prefix_store import ChangeEvent, PrefixStore, errors, open_store

FP = "sha256:" + "0123456789abcdef" * 4
OTHER_FP = "sha256:" + "fedcba9876543210" * 4
BAD_NAMES = ["../x", "", "x" * 129, "a/b", "a b", "..", ".", "a:b", "a\nb"]


def make_kv(P=4, L=2, K=1, D=8, fill: float | None = None, seed=0):
    if fill is not None:
        return torch.full((L, 2, K, P, D), float(fill))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, K, P, D, generator=g)


def put(store, t="acme", n="bot", kv=None, kind="prefix_tuning", fp=FP, P=4, **kw):
    kv = make_kv(P=P) if kv is None else kv
    return store.put(t, n, kind, {"kv": kv}, base_model_fingerprint=fp, prefix_length=kv.shape[3], **kw)


@pytest.fixture(params=["file", "redis"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def store_url(backend, tmp_path, request) -> str:
    if backend == "file":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("redis_store_url")


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


# ------------------------------------------------------------------------------- raw access to stored bytes
def _disk_path(store, t, n, v, ext):
    return Path(store.root) / t / n / f"v{v}.{ext}"


def read_blob(store, t, n, v) -> bytes:
    if hasattr(store, "root"):
        return _disk_path(store, t, n, v, "safetensors").read_bytes()
    return store._r.get(store._blob_key(t, n, v))


def write_blob(store, t, n, v, data: bytes) -> None:
    if hasattr(store, "root"):
        _disk_path(store, t, n, v, "safetensors").write_bytes(data)
    else:
        store._r.set(store._blob_key(t, n, v), data)


def read_meta_raw(store, t, n, v) -> bytes:
    if hasattr(store, "root"):
        return _disk_path(store, t, n, v, "json").read_bytes()
    return store._r.get(store._meta_key(t, n, v))


def write_meta_raw(store, t, n, v, data: bytes) -> None:
    if hasattr(store, "root"):
        _disk_path(store, t, n, v, "json").write_bytes(data)
    else:
        store._r.set(store._meta_key(t, n, v), data)


def stored_nothing(store) -> bool:
    """True if the backend holds no data at all (besides nothing-visible bookkeeping)."""
    if hasattr(store, "root"):
        bookkeeping = ("@lock", "@changes")  # lock files, the change journal
        return not any(p.is_file() and not p.name.endswith(bookkeeping) for p in Path(store.root).rglob("*"))
    return not list(store._r.scan_iter(match=f"{store.namespace}:*"))


# --------------------------------------------------------------------------------------------------- tests
def test_open_store_gives_a_prefix_store(store, backend):
    assert isinstance(store, PrefixStore)
    store.ping()
    assert type(store).__name__ == {"file": "DiskStore", "redis": "RedisStore"}[backend]
    assert store.backend == {"file": "disk", "redis": "redis"}[backend]  # what GET /info reports


def test_put_get_roundtrip(store):
    kv = make_kv(P=6, L=3, K=2, D=4, seed=1)
    emb = torch.randn(6, 32)
    t0 = time.time()
    meta = store.put(
        "acme",
        "support.bot-1",
        "prefix_tuning",
        {"kv": kv, "embedding": emb},
        base_model_fingerprint=FP,
        prefix_length=6,
        training={"steps": 30, "final_loss": 0.01},
        extra={"prompt_format": "chat"},
    )
    assert (meta.tenant_id, meta.name, meta.kind, meta.version) == (
        "acme",
        "support.bot-1",
        "prefix_tuning",
        1,
    )
    assert meta.prefix_length == 6 and meta.base_model_fingerprint == FP and meta.dtype == "float32"
    assert meta.shapes == {"kv": [3, 2, 2, 6, 4], "embedding": [6, 32]}
    assert meta.training == {"steps": 30, "final_loss": 0.01} and meta.extra == {"prompt_format": "chat"}
    assert t0 - 1 <= meta.created <= time.time() + 1
    rec = store.get("acme", "support.bot-1", expected_fingerprint=FP)
    assert rec.meta == meta
    assert set(rec.tensors) == {"kv", "embedding"}
    assert (
        rec.kv.dtype == torch.float32
        and torch.equal(rec.kv, kv)
        and torch.equal(rec.tensors["embedding"], emb)
    )
    assert meta.sha256 == hashlib.sha256(read_blob(store, "acme", "support.bot-1", 1)).hexdigest()
    assert store.get_meta("acme", "support.bot-1") == meta


def test_roundtrip_keeps_half_precision_bits(store):
    kv = make_kv(seed=3).to(torch.bfloat16)
    meta = put(store, kv=kv)
    rec = store.get("acme", "bot")
    assert meta.dtype == "bfloat16" and rec.kv.dtype == torch.bfloat16
    assert torch.equal(rec.kv.view(torch.int16), kv.view(torch.int16))


def test_versions_increase_and_specific_versions(store):
    for i in range(3):
        assert put(store, kv=make_kv(fill=i)).version == i + 1
    assert store.versions("acme", "bot") == [1, 2, 3]
    assert store.get("acme", "bot").meta.version == 3
    assert torch.equal(store.get("acme", "bot").kv, make_kv(fill=2))
    assert torch.equal(store.get("acme", "bot", 1).kv, make_kv(fill=0))
    assert store.get_meta("acme", "bot", version=2).version == 2
    assert torch.equal(store.get("acme", "bot", version=2).kv, make_kv(fill=1))


def test_servable_meta_is_the_latest_version_for_a_base_model(store):
    """A name's versions trained on two base models (one store shared by two fleets): each fingerprint's latest."""
    put(store, fp="model-a")  # v1
    put(store, fp="model-b")  # v2
    put(store, fp="model-a")  # v3
    put(store, fp="model-b")  # v4
    assert store.servable_meta("acme", "bot", None, "model-a").version == 3
    assert store.servable_meta("acme", "bot", None, "model-b").version == 4
    assert store.servable_meta("acme", "bot", 2, "model-a").version == 2  # pinned: as it is
    store.delete("acme", "bot", 3)
    assert store.servable_meta("acme", "bot", None, "model-a").version == 1
    other = store.servable_meta("acme", "bot", None, "model-c")  # none: the latest, its fingerprint says so
    assert (other.version, other.base_model_fingerprint) == (4, "model-b")


def test_servable_meta_reads_older_versions_in_batches_and_checks_the_one_it_takes(
    store, backend, monkeypatch
):
    """Past batch boundaries (Redis reads older metadata a batch per round trip), skipping a version deleted or
    made for another model (even one incomplete); the match itself is checked in full (metadata describing another
    name is refused, never served), as is a version that cannot be read at all (it might have been the match)."""
    if backend == "redis":
        monkeypatch.setattr("prefix_store.redis_store.META_BATCH", 2)
    put(store, fp="model-a")  # v1
    put(store, fp="model-a")  # v2
    for _ in range(5):
        put(store, fp="model-b")  # v3..v7
    store.delete("acme", "bot", 2)
    write_meta_raw(store, "acme", "bot", 4, b'{"base_model_fingerprint": "model-b"}')
    assert store.servable_meta("acme", "bot", None, "model-a").version == 1
    assert store.servable_meta("acme", "bot", None, "model-c").version == 7  # none: the latest
    write_meta_raw(store, "acme", "bot", 4, b"{not json")
    with pytest.raises(errors.InvalidPrefix, match="not valid JSON"):
        store.servable_meta("acme", "bot", None, "model-a")
    assert store.servable_meta("acme", "bot", None, "model-b").version == 7
    store.delete("acme", "bot", 4)
    write_meta_raw(
        store, "acme", "bot", 1, read_meta_raw(store, "acme", "bot", 5).replace(b"model-b", b"model-a")
    )
    with pytest.raises(errors.InvalidPrefix, match="stored under 'acme/bot' v1 describes 'acme/bot' v5"):
        store.servable_meta("acme", "bot", None, "model-a")


def test_the_version_counter_counts_deleted_versions_and_reserving_raises_it(store):
    for i in range(3):
        put(store, kv=make_kv(fill=i))
    store.delete("acme", "bot", 3)
    assert store.versions("acme", "bot") == [1, 2] and store.version_counter("acme", "bot") == 3
    store.reserve_versions("acme", "bot", 2)  # never lowers it
    assert put(store).version == 4
    store.reserve_versions("acme", "bot", 10)
    assert store.version_counter("acme", "bot") == 10 and put(store).version == 11
    # a name with no version yet: numbered from there, and not listed meanwhile
    assert store.version_counter("acme", "fresh") == 0
    store.reserve_versions("acme", "fresh", 5)
    assert ("acme", "fresh") not in store.names() and store.version_counter("acme", "fresh") == 5
    assert put(store, n="fresh").version == 6
    with pytest.raises(ValueError):
        store.reserve_versions("acme", "bot", -1)
    # a name deleted whole keeps its counter, and is counted (not listed)
    put(store, t="globex", n="gone")
    store.delete("globex", "gone")
    assert ("globex", "gone") not in store.names() and store.version_counter("globex", "gone") == 1
    assert store.counted_names() == [("acme", "bot"), ("acme", "fresh"), ("globex", "gone")]
    assert store.counted_names("globex") == [("globex", "gone")]


def test_a_put_may_keep_a_version_number_above_every_earlier_one(store):
    """What copying a store's versions needs: a version stored under its number and creation time, the numbering
    going on from there; a number the name has had (or below) is refused, nothing written."""
    assert put(store, version=5, created=1234.5).version == 5
    assert store.get_meta("acme", "bot", 5).created == 1234.5
    assert put(store).version == 6
    store.delete("acme", "bot", 6)
    for taken in (6, 3):
        with pytest.raises(errors.VersionTaken):
            put(store, version=taken)
    assert store.versions("acme", "bot") == [5]
    for bad in ({"version": 0}, {"version": 10**18}, {"created": float("nan")}, {"created": "yesterday"}):
        with pytest.raises(ValueError):
            put(store, **bad)
    assert store.versions("acme", "bot") == [5]


def test_not_found(store):
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "nope")
    with pytest.raises(errors.PrefixNotFound):
        store.get_meta("acme", "nope")
    put(store)
    for v in (0, 2, 99):
        with pytest.raises(errors.PrefixNotFound) as ei:
            store.get("acme", "bot", v)
        assert "acme/bot" in str(ei.value)
    assert store.versions("acme", "nope") == []
    assert store.versions("other", "bot") == []
    with pytest.raises(TypeError):
        store.get("acme", "bot", "1")


def test_list_latest_per_tenant(store):
    put(store, "A", "n1")
    put(store, "A", "n1", kv=make_kv(P=5))
    put(store, "A", "n2")
    put(store, "B", "n1")
    a = store.list("A")
    assert [(m.tenant_id, m.name, m.version) for m in a] == [("A", "n1", 2), ("A", "n2", 1)]
    assert a[0].prefix_length == 5
    every = store.list()
    assert [(m.tenant_id, m.name, m.version) for m in every] == [
        ("A", "n1", 2),
        ("A", "n2", 1),
        ("B", "n1", 1),
    ]
    assert store.list("C") == []
    with pytest.raises(errors.InvalidName):
        store.list("../A")


def test_list_pages_by_cursor(store):
    for t, n in [("A", "n1"), ("A", "n2"), ("A", "n3"), ("B", "n1"), ("B", "n2")]:
        put(store, t, n)
    store.delete("A", "n2")  # a gap: a page still holds `limit` prefixes
    keys = [(m.tenant_id, m.name) for m in store.list()]
    assert keys == [("A", "n1"), ("A", "n3"), ("B", "n1"), ("B", "n2")]
    pages, after = [], None
    while True:
        page, more = store.list_page(after=after, limit=3 if not pages else 1)
        pages.append([(m.tenant_id, m.name) for m in page])
        if not more:
            break
        after = (page[-1].tenant_id, page[-1].name)
    assert pages == [keys[:3], [keys[3]]]  # the last page is exact: no empty page with has_more
    assert store.list_page(after=("A", "n1"), limit=2) == (store.list()[1:3], True)
    assert store.list_page(after=("A", "zz"), limit=10)[0] == store.list()[2:]  # a cursor needs not exist
    assert store.list_page("B", after=("A", "n3")) == (store.list("B"), False)
    assert store.list_page(after=("B", "n2"), limit=1) == ([], False)
    with pytest.raises(ValueError):
        store.list_page(limit=0)


def test_delete(store):
    put(store, "acme", "bot")
    put(store, "acme", "bot")
    put(store, "acme", "keep")
    store.delete("acme", "bot")
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "bot")
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "bot", 1)
    assert not store.exists("acme", "bot") and not store.exists("acme", "bot", 2)
    assert store.versions("acme", "bot") == []
    assert [m.name for m in store.list("acme")] == ["keep"]
    assert store.get("acme", "keep").meta.version == 1
    with pytest.raises(errors.PrefixNotFound):
        store.delete("acme", "bot")
    with pytest.raises(errors.PrefixNotFound):
        store.delete("ghost", "bot")
    # versions are never reused: (tenant, name, version) always names the same tensors
    assert put(store, "acme", "bot").version == 3
    assert store.versions("acme", "bot") == [3]


def test_delete_one_version(store):
    """Deleting a version leaves the others; deleting the latest makes the one before it the latest (what a
    rollback needs); deleting the only one deletes the name; numbers are never reused."""
    for i in range(3):
        put(store, "acme", "bot", kv=make_kv(fill=i))
    put(store, "acme", "keep")
    events: list[ChangeEvent] = []
    store.subscribe(events.append)
    store.delete("acme", "bot", 2)
    assert store.versions("acme", "bot") == [1, 3] and not store.exists("acme", "bot", 2)
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "bot", 2)
    with pytest.raises(errors.PrefixNotFound):
        store.delete("acme", "bot", 2)
    store.delete("acme", "bot", 3)  # the latest: back to version 1
    latest = store.get("acme", "bot")
    assert latest.meta.version == 1 and torch.equal(latest.kv, make_kv(fill=0))
    assert store.get_meta("acme", "bot").version == 1
    assert {m.name: m.version for m in store.list("acme")} == {"bot": 1, "keep": 1}
    assert put(store, "acme", "bot").version == 4
    store.delete("acme", "bot", 4)
    store.delete("acme", "bot", 1)  # the last one: the name is gone
    assert [m.name for m in store.list("acme")] == ["keep"] and not store.exists("acme", "bot")
    store.delete("acme", "keep", 1)
    assert store.list() == []
    with pytest.raises(errors.PrefixNotFound):
        store.delete("acme", "bot", 1)
    with pytest.raises(errors.PrefixNotFound):
        store.delete("acme", "bot", 0)
    assert events == [
        ChangeEvent("delete", "acme", "bot", 2),
        ChangeEvent("delete", "acme", "bot", 3),
        ChangeEvent("put", "acme", "bot", 4),
        ChangeEvent("delete", "acme", "bot", 4),
        ChangeEvent("delete", "acme", "bot", 1),
        ChangeEvent("delete", "acme", "keep", 1),
    ]
    assert put(store, "acme", "bot").version == 5


def read_latest_during(store, writes: Callable[[], None], missing_ok: bool) -> dict[str, int]:
    """Two threads read the latest ("acme", "bot") while `writes()` runs; every record read must be whole (its
    tensors match the fill its metadata records). Returns the counts of records read and of not-found answers
    (which fail the test unless `missing_ok`)."""
    stop = threading.Event()
    seen = {"ok": 0, "missing": 0}
    problems: list[BaseException] = []

    def reader():
        while not stop.is_set():
            try:
                rec = store.get("acme", "bot")
            except errors.PrefixNotFound as e:
                seen["missing"] += 1
                if not missing_ok:
                    problems.append(e)
                continue
            except BaseException as e:  # pragma: no cover
                problems.append(e)
                return
            if not torch.equal(rec.kv, make_kv(fill=rec.meta.training["fill"])):
                problems.append(AssertionError("torn"))
            seen["ok"] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        writes()
    finally:
        stop.set()
        for th in threads:
            th.join(10)
    assert not problems, problems[:3]
    return seen


def test_latest_readers_during_version_deletes_see_a_whole_record(store):
    """While the latest version is deleted over and over (and new ones put), readers of "the latest" get a whole
    record every time: never a torn one, never not-found (an older version always remains)."""
    put(store, kv=make_kv(fill=-1), training={"fill": -1})

    def writes() -> None:
        for i in range(20):
            v = put(store, kv=make_kv(fill=i), training={"fill": i}).version
            store.delete("acme", "bot", v)

    seen = read_latest_during(store, writes, missing_ok=False)
    assert seen["ok"] > 0 and store.versions("acme", "bot") == [1]


def test_put_once_writes_one_version_per_idempotency_key(store, monkeypatch):
    """A repeated put_once (a retried upload) answers with the version its key made, also when the repeats race
    (past Redis' quick look before the transaction): one version per key; another key or name is another
    version."""
    if hasattr(store, "_r"):
        real = store._put_with
        monkeypatch.setattr(store, "_put_with", lambda r, *a: None if r is store._r else real(r, *a))
    events: list = []
    store.subscribe(events.append)

    def once(key, n="bot", seed=0):
        kv = make_kv(seed=seed)
        return store.put_once(
            "acme", n, "prefix_tuning", {"kv": kv}, idempotency_key=key, digest=f"d-{seed}",
            base_model_fingerprint=FP, prefix_length=4,
        )  # fmt: skip

    first, created = once("k-1")
    assert created and first.version == 1 and first.extra["idempotency"] == {"key": "k-1", "digest": "d-0"}
    again, created = once("k-1", seed=9)  # the caller compares the digest: the store answers by key
    assert not created and again.version == 1 and again.extra["idempotency"]["digest"] == "d-0"
    results: list = []
    barrier = threading.Barrier(6)

    def racer():
        barrier.wait()
        results.append(once("k-2", seed=2))

    threads = [threading.Thread(target=racer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(created for _, created in results) == [False] * 5 + [True]
    (v2,) = {m.version for m, _ in results}
    assert v2 == 2  # the repeats that lost the race drew no version number (Redis used to skip up to 5)
    assert once("k-1", n="other")[1] and store.versions("acme", "bot") == [1, v2]
    deadline = time.monotonic() + 5
    while len(events) < 9 and time.monotonic() < deadline:
        time.sleep(0.02)
    # one version per key; a repeat notifies again (its first attempt may have stored and failed before that)
    assert {(e.name, e.version) for e in events if e.op == "put"} == {("bot", 1), ("bot", v2), ("other", 1)}
    assert sum(1 for e in events if (e.name, e.version) == ("bot", v2)) == 6
    assert once("k-3")[0].version == 3


def test_keep_versions_in_the_url_prunes_old_versions(store_url):
    """`?keep_versions=N` on the store URL: each put keeps the newest N versions of its name (other names and
    tenants untouched), numbers keep counting; a bad value is refused when the store is opened."""
    sep = "&" if "?" in store_url else "?"
    s = open_store(f"{store_url}{sep}keep_versions=2")
    try:
        assert s.keep_versions == 2
        for i in range(4):
            put(s, "acme", "bot", kv=make_kv(fill=i))
        put(s, "acme", "other")
        assert s.versions("acme", "bot") == [3, 4] and s.versions("acme", "other") == [1]
        assert torch.equal(s.get("acme", "bot", 3).kv, make_kv(fill=2))
        plain = open_store(store_url)  # the same data without the policy: no pruning through it
        put(plain, "acme", "bot")
        assert plain.versions("acme", "bot") == [3, 4, 5]
        plain.close()
        put(s, "acme", "bot")
        assert s.versions("acme", "bot") == [5, 6]
    finally:
        s.close()
    for bad in ("0", "x", "-1"):
        with pytest.raises(ValueError, match="keep_versions"):
            open_store(f"{store_url}{sep}keep_versions={bad}")


def test_keep_versions_never_prunes_a_newer_version(store_url):
    """Two writers finishing at once (a training job and an upload): the first one's prune runs after the second
    one's put. Counting from its own version, it deletes only older ones, so the newest survives."""
    sep = "&" if "?" in store_url else "?"
    s = open_store(f"{store_url}{sep}keep_versions=1")
    plain = open_store(store_url)
    try:
        put(plain, "acme", "bot")  # v1: writer A's put ...
        put(plain, "acme", "bot")  # v2: ... and writer B's, before either pruned
        s._prune("acme", "bot", written=1)  # A prunes late
        assert s.versions("acme", "bot") == [1, 2]
        s._prune("acme", "bot", written=2)  # B prunes
        assert s.versions("acme", "bot") == [2]
    finally:
        s.close()
        plain.close()


def test_delete_last_name_removes_tenant_from_listing(store):
    put(store, "solo", "only")
    store.delete("solo", "only")
    assert store.list() == []
    assert store.list("solo") == []


def test_exists(store):
    assert not store.exists("acme", "bot")
    put(store)
    assert store.exists("acme", "bot")
    assert store.exists("acme", "bot", 1)
    assert not store.exists("acme", "bot", 2)
    assert not store.exists("acme", "bot", 0)
    assert not store.exists("acme", "other")


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_names_write_nothing(store, bad):
    for t, n in ((bad, "bot"), ("acme", bad)):
        with pytest.raises(errors.InvalidName):
            put(store, t, n)
        with pytest.raises(errors.InvalidName):
            store.get(t, n)
        with pytest.raises(errors.InvalidName):
            store.exists(t, n)
        with pytest.raises(errors.InvalidName):
            store.delete(t, n)
        with pytest.raises(errors.InvalidName):
            store.versions(t, n)
    assert store.list() == []
    assert stored_nothing(store)
    if hasattr(store, "root"):
        assert not (Path(store.root).parent / "x").exists()


def test_the_reserved_prefix_name_base_is_refused_and_writes_nothing(store):
    """`tenant/base` means the base model to the server: a prefix stored as `base` could be listed, never served."""
    with pytest.raises(errors.InvalidName, match="reserved"):
        put(store, "acme", "base")
    assert store.list() == [] and stored_nothing(store)
    put(store, "base", "Base")  # a tenant named base, and names that only look like it, are names like others
    assert [(m.tenant_id, m.name) for m in store.list()] == [("base", "Base")]


def test_name_of_128_chars_is_fine(store):
    n = "n" * 128
    put(store, "t" * 128, n)
    assert store.get("t" * 128, n).meta.name == n


def test_fingerprint_mismatch_refused(store):
    put(store, fp=FP)
    with pytest.raises(errors.FingerprintMismatch) as ei:
        store.get("acme", "bot", expected_fingerprint=OTHER_FP)
    msg = str(ei.value)
    assert FP[:12] in msg and OTHER_FP[:12] in msg and "acme/bot" in msg
    assert FP not in msg  # shortened
    assert torch.equal(store.get("acme", "bot", expected_fingerprint=FP).kv, make_kv())
    assert store.get("acme", "bot").meta.base_model_fingerprint == FP  # no expectation: no check


def test_corrupted_bytes_checksum_mismatch(store):
    put(store)
    blob = bytearray(read_blob(store, "acme", "bot", 1))
    blob[-7] ^= 0x01  # inside the tensor data
    write_blob(store, "acme", "bot", 1, bytes(blob))
    with pytest.raises(errors.ChecksumMismatch) as ei:
        store.get("acme", "bot")
    assert "acme/bot" in str(ei.value) and len(str(ei.value)) < 300
    assert store.get_meta("acme", "bot").version == 1  # metadata alone is still readable


def test_truncated_blob_refused(store):
    meta = put(store)
    blob = read_blob(store, "acme", "bot", 1)
    write_blob(store, "acme", "bot", 1, blob[: len(blob) // 2])
    with pytest.raises((errors.ChecksumMismatch, errors.InvalidPrefix)):
        store.get("acme", "bot")
    # even with a checksum that matches the truncated bytes, the record is refused
    truncated = blob[: len(blob) - 3]
    write_blob(store, "acme", "bot", 1, truncated)
    d = meta.to_dict() | {"sha256": hashlib.sha256(truncated).hexdigest()}
    write_meta_raw(store, "acme", "bot", 1, type(meta).from_dict(d).to_json())
    with pytest.raises(errors.InvalidPrefix):
        store.get("acme", "bot")


def test_garbage_metadata(store):
    put(store, "acme", "bad")
    put(store, "acme", "good")
    write_meta_raw(store, "acme", "bad", 1, b"{not json")
    with pytest.raises(errors.InvalidPrefix):
        store.get("acme", "bad")
    assert [m.name for m in store.list("acme")] == ["good"]  # listing skips it instead of failing


def test_metadata_under_wrong_key_refused(store):
    put(store, "acme", "a")
    other = put(store, "acme", "b")
    write_meta_raw(store, "acme", "a", 1, other.to_json())
    with pytest.raises(errors.InvalidPrefix, match="describes"):
        store.get("acme", "a")


BAD_PUTS = {
    "unknown kind": dict(kind="lora"),
    "kv rank 4": dict(kv=torch.randn(2, 2, 4, 8)),
    "kv dim1 3": dict(kv=torch.randn(2, 3, 1, 4, 8)),
    "kv nan": dict(kv=torch.full((2, 2, 1, 4, 8), float("nan"))),
    "kv int": dict(kv=torch.ones(2, 2, 1, 4, 8, dtype=torch.int64)),
    "kv float8": dict(kv=torch.ones(2, 2, 1, 4, 8).to(torch.float8_e5m2)),
    "kv over 1e4": dict(kv=torch.full((2, 2, 1, 4, 8), -2e4)),
}


@pytest.mark.parametrize("case", sorted(BAD_PUTS))
def test_bad_prefix_put_writes_nothing(store, case):
    kw = BAD_PUTS[case]
    with pytest.raises(errors.InvalidPrefix):
        if "kv" in kw and kw["kv"].dim() == 4:
            store.put(
                "acme", "bot", "prefix_tuning", {"kv": kw["kv"]}, base_model_fingerprint=FP, prefix_length=4
            )
        else:
            put(store, **kw)
    with pytest.raises(errors.InvalidPrefix):  # P disagreeing with kv
        store.put(
            "acme", "bot", "prefix_tuning", {"kv": make_kv(P=4)}, base_model_fingerprint=FP, prefix_length=3
        )
    with pytest.raises(errors.InvalidPrefix):  # no kv at all
        store.put(
            "acme",
            "bot",
            "prompt_tuning",
            {"soft_prompt": torch.randn(4, 8)},
            base_model_fingerprint=FP,
            prefix_length=4,
        )
    assert not store.exists("acme", "bot")
    assert store.versions("acme", "bot") == [] and store.list() == []
    assert stored_nothing(store)


def test_concurrent_writers_threads(store):
    writers, per_writer = 6, 5
    errors_seen: list[BaseException] = []
    stop = threading.Event()
    reads = [0]

    def writer(w):
        try:
            for i in range(per_writer):
                put(store, kv=make_kv(fill=w * 100 + i), training={"writer": w, "i": i})
        except BaseException as e:  # pragma: no cover - reported below
            errors_seen.append(e)

    def reader():
        while not stop.is_set():
            try:
                rec = store.get("acme", "bot")
            except errors.PrefixNotFound:
                continue
            except BaseException as e:  # pragma: no cover
                errors_seen.append(e)
                return
            tr = rec.meta.training
            if not torch.equal(rec.kv, make_kv(fill=tr["writer"] * 100 + tr["i"])):
                errors_seen.append(AssertionError(f"torn record {rec.meta.label}"))
            reads[0] += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for th in readers + threads:
        th.start()
    for th in threads:
        th.join(60)
    stop.set()
    for th in readers:
        th.join(10)
    assert not errors_seen, errors_seen[:3]
    n = writers * per_writer
    assert store.versions("acme", "bot") == list(range(1, n + 1))
    assert store.get_meta("acme", "bot").version == n  # the latest pointer never moved backwards
    payloads = set()
    for v in range(1, n + 1):
        rec = store.get("acme", "bot", v)
        assert rec.meta.version == v
        tr = rec.meta.training
        assert torch.equal(rec.kv, make_kv(fill=tr["writer"] * 100 + tr["i"]))
        payloads.add((tr["writer"], tr["i"]))
    assert payloads == {(w, i) for w in range(writers) for i in range(per_writer)}
    assert reads[0] > 0


def test_readers_never_see_torn_records_during_delete(store):
    def writes() -> None:
        for i in range(15):
            put(store, kv=make_kv(fill=i), training={"fill": i})
            put(store, kv=make_kv(fill=i + 0.5), training={"fill": i + 0.5})
            store.delete("acme", "bot")

    assert read_latest_during(store, writes, missing_ok=True)["missing"] > 0  # the deletes were observed


def test_change_events_to_subscribers(store):
    events: list[ChangeEvent] = []
    unsubscribe = store.subscribe(events.append)
    put(store)
    put(store)
    store.delete("acme", "bot")
    assert events == [
        ChangeEvent("put", "acme", "bot", 1),
        ChangeEvent("put", "acme", "bot", 2),
        ChangeEvent("delete", "acme", "bot", 2),
    ]
    with pytest.raises(errors.InvalidName):
        put(store, "acme", "../bot")
    assert len(events) == 3  # failed puts publish nothing
    unsubscribe()
    unsubscribe()  # idempotent
    put(store)
    time.sleep(0.2)
    assert len(events) == 3


def test_change_events_reach_other_store_objects(store_url):
    """Another replica or process (here: another store object on the same URL) learns of every change: Redis
    through pub/sub, the file store through its change journal."""
    replica, writer = open_store(store_url), open_store(store_url)
    try:
        got: queue.Queue = queue.Queue()
        replica.subscribe(got.put)
        put(writer, "acme", "bot")
        assert got.get(timeout=5) == ChangeEvent("put", "acme", "bot", 1)
        put(writer, "acme", "bot")
        assert got.get(timeout=5) == ChangeEvent("put", "acme", "bot", 2)
        writer.delete("acme", "bot", 1)
        assert got.get(timeout=5) == ChangeEvent("delete", "acme", "bot", 1)
        writer.delete("acme", "bot")
        assert got.get(timeout=5) == ChangeEvent("delete", "acme", "bot", 2)
        # the replica's own writes: delivered once (synchronously), not again from the other channel
        put(replica, "acme", "own")
        assert got.get_nowait() == ChangeEvent("put", "acme", "own", 1)
        time.sleep(1.2)
        assert got.empty()
    finally:
        replica.close()
        writer.close()


def test_failing_subscriber_does_not_break_put(store):
    got = []

    def bad(_ev):
        raise RuntimeError("subscriber bug")

    store.subscribe(bad)
    store.subscribe(got.append)
    assert put(store).version == 1
    assert got == [ChangeEvent("put", "acme", "bot", 1)]


def test_records_survive_reopening(store, store_url):
    kv = make_kv(seed=9)
    meta = put(store, kv=kv)
    put(store, "acme", "second")
    store.close()
    again = open_store(store_url)
    try:
        rec = again.get("acme", "bot")
        assert rec.meta == meta and torch.equal(rec.kv, kv)
        assert [m.name for m in again.list("acme")] == ["bot", "second"]
        assert put(again, kv=kv).version == 2
    finally:
        again.close()


def test_two_store_objects_share_data(store_url):
    a, b = open_store(store_url), open_store(store_url)
    try:
        put(a)
        assert b.get("acme", "bot").meta.version == 1
        assert put(b).version == 2
        assert a.versions("acme", "bot") == [1, 2]
    finally:
        a.close()
        b.close()
