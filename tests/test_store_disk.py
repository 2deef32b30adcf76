"""prefix_store disk backend: layout, crash leftovers, multi-process writers, URLs."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prefix_store import default_store_url, errors, open_store
from prefix_store.disk import DiskStore

FP = "fp-disk-test"


def make_kv(fill: float, P=4):
    return torch.full((2, 2, 1, P, 8), float(fill))


def put(store, t="acme", n="bot", fill=1.0, **kw):
    return store.put(
        t, n, "prefix_tuning", {"kv": make_kv(fill)}, base_model_fingerprint=FP, prefix_length=4, **kw
    )


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path}/root")
    yield s
    s.close()


def test_layout(store, tmp_path):
    meta = put(store, fill=3.0)
    ndir = tmp_path / "root" / "acme" / "bot"
    assert sorted(os.listdir(ndir)) == ["v1.json", "v1.safetensors"]
    assert (tmp_path / "root" / "acme" / "bot@lock").is_file()
    on_disk = json.loads((ndir / "v1.json").read_text())
    assert on_disk["format"] == 1 and on_disk["sha256"] == meta.sha256 and on_disk["version"] == 1
    assert torch.equal(safetensors.torch.load_file(ndir / "v1.safetensors")["kv"], make_kv(3.0))
    # readable by the server's user only (prefixes are tenants' data), the lock and the journal too
    for f in (ndir / "v1.safetensors", ndir / "v1.json", tmp_path / "root" / "acme" / "bot@lock"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    journal = [p for p in (tmp_path / "root").rglob("*") if p.is_file() and "acme" not in p.parts]
    assert journal and all(p.stat().st_mode & 0o777 == 0o600 for p in journal), journal
    assert store.url == f"file://{tmp_path}/root"


def test_half_written_records_are_invisible(store, tmp_path):
    put(store, fill=1.0)
    ndir = tmp_path / "root" / "acme" / "bot"
    good = (ndir / "v1.safetensors").read_bytes()
    # crash while writing v2's blob (temp file), and a crash after the blob rename but before the marker
    (ndir / ".tmp-deadbeef-v2.safetensors").write_bytes(good[:40])
    (ndir / "v2.safetensors").write_bytes(good)
    (ndir / ".tmp-cafe-v2.json").write_text("{")
    # a name whose very first write crashed
    half = tmp_path / "root" / "acme" / "half"
    half.mkdir()
    (half / "v1.safetensors").write_bytes(good[:100])
    (half / ".tmp-x-v1.safetensors").write_bytes(good)
    # a tenant with only a crashed write
    (tmp_path / "root" / "ghost" / "n").mkdir(parents=True)
    (tmp_path / "root" / "ghost" / "n" / ".tmp-1-v1.json").write_text("{}")

    assert store.get("acme", "bot").meta.version == 1
    assert store.versions("acme", "bot") == [1]
    assert not store.exists("acme", "bot", 2)
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "bot", 2)
    assert not store.exists("acme", "half")
    with pytest.raises(errors.PrefixNotFound):
        store.get("acme", "half")
    assert store.versions("acme", "half") == []
    assert [(m.tenant_id, m.name, m.version) for m in store.list()] == [("acme", "bot", 1)]
    assert store.list("ghost") == []

    # the next writer (holding the lock) allocates v2 and removes the leftovers
    meta = put(store, fill=2.0)
    assert meta.version == 2
    assert sorted(os.listdir(ndir)) == ["v1.json", "v1.safetensors", "v2.json", "v2.safetensors"]
    assert torch.equal(store.get("acme", "bot").kv, make_kv(2.0))
    assert put(store, "acme", "half").version == 1
    assert sorted(os.listdir(half)) == ["v1.json", "v1.safetensors"]


def test_missing_blob_with_marker_is_refused(store, tmp_path):
    put(store)
    (tmp_path / "root" / "acme" / "bot" / "v1.safetensors").unlink()
    with pytest.raises(errors.InvalidPrefix, match="missing"):
        store.get("acme", "bot")


def test_version_counter_survives_delete_and_reopen(store, tmp_path):
    for _ in range(3):
        put(store)
    store.delete("acme", "bot")
    assert not (tmp_path / "root" / "acme" / "bot").exists()
    assert not any((tmp_path / "root" / "@trash").iterdir())
    again = open_store(f"file://{tmp_path}/root")
    assert put(again).version == 4


def test_deleting_a_name_that_never_existed_leaves_nothing_behind(store, tmp_path):
    """A DELETE of a made-up name answers not-found without creating its lock file (any tenant could otherwise
    add empty files to the store without limit)."""
    put(store)
    before = sorted(os.listdir(tmp_path / "root" / "acme"))
    for i in range(20):
        with pytest.raises(errors.PrefixNotFound):
            store.delete("acme", f"junk{i}")
        with pytest.raises(errors.PrefixNotFound):
            store.delete("acme", f"junk{i}", version=1)
    with pytest.raises(errors.PrefixNotFound):
        store.delete("nobody", "junk")
    assert sorted(os.listdir(tmp_path / "root" / "acme")) == before
    assert not (tmp_path / "root" / "nobody").exists()


def test_a_name_as_long_as_names_may_be_is_deleted(store, tmp_path):
    """Tenant and name of 128 characters each: the trash entry of their delete was named after both (over the
    255-byte file name limit), so the delete failed as a store outage and the prefix stayed."""
    t, n = "t" * 128, "n" * 128
    put(store, t, n)
    put(store, t, n)
    store.delete(t, n, version=1)
    assert store.versions(t, n) == [2]
    store.delete(t, n)
    assert not store.exists(t, n) and not (tmp_path / "root" / t / n).exists()


def test_leftovers_of_crashed_writes_are_swept_when_old(tmp_path):
    """A name whose only write crashed, or that no put comes back to, keeps its temp files until a store opens and
    sweeps those old enough to be a crash's (a write in progress is left alone). Old means not changed in any
    way for that long: a tensor file restored from a backup (`cp -a` keeps its old mtime) before its commit
    marker is copied is young by its ctime, and stays (the sweep deleted it: the version was then unreadable)."""
    s = open_store(f"file://{tmp_path}/root")
    put(s)
    ndir = tmp_path / "root" / "acme" / "bot"
    orphan = tmp_path / "root" / "acme" / "orphan"
    orphan.mkdir()
    old = [orphan / ".tmp-dead-v1.safetensors", ndir / ".tmp-dead-v2.json", ndir / "v2.safetensors"]
    for f in old:
        f.write_bytes(b"x" * 10)
    time.sleep(0.1)  # (file times are those of a coarser clock than time.time())
    cutoff = time.time()
    time.sleep(0.1)
    fresh = ndir / ".tmp-live-v3.safetensors"
    restored = ndir / "v4.safetensors"  # a backup's, its marker not copied yet
    for f in (fresh, restored):
        f.write_bytes(b"x" * 10)
    hours_ago = time.time() - 2 * 3600
    os.utime(restored, (hours_ago, hours_ago))
    assert isinstance(s, DiskStore) and s._sweep_leftovers(min_age_s=time.time() - cutoff) == 3
    assert not any(f.exists() for f in old) and fresh.exists() and restored.exists()
    assert s.get("acme", "bot").meta.version == 1


def test_a_serving_store_sweeps_leftovers_again_while_it_runs(tmp_path, monkeypatch):
    """The sweep ran once, as the store opened: the leftovers of a crash just before (a supervisor restarting the
    server at once) were too young then, and a name no put came back to kept them (a 2 MB tensor file) until a
    restart an hour later. A subscribed store (a server's) sweeps again every `sweep_every_s`."""
    s = open_store(f"file://{tmp_path}/root")
    assert isinstance(s, DiskStore)
    sweep = s._sweep_leftovers
    monkeypatch.setattr(s, "_sweep_leftovers", lambda: sweep(min_age_s=0.05))  # (an hour old, in the product)
    s.poll_s, s.sweep_every_s = 0.02, 0.2
    orphan = tmp_path / "root" / "acme" / "orphan"
    orphan.mkdir(parents=True)
    left = orphan / "v1.safetensors"  # a put killed before its commit marker
    left.write_bytes(b"x" * 10)
    s.subscribe(lambda event: None)
    deadline = time.monotonic() + 10
    while left.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left.exists()
    s.close()


def test_the_sweep_leaves_the_files_of_a_put_under_way_whatever_their_age(tmp_path, monkeypatch):
    """The background sweep judged leftovers by age alone: with the clock stepped forward an hour (NTP, a VM
    resumed), or a put stalled that long, it deleted the tensor file of a put between its tensor file and its
    commit marker, and the committed version was unreadable. It skips the names whose lock a put holds."""
    s = open_store(f"file://{tmp_path}/root")
    assert isinstance(s, DiskStore)
    put(s)
    ndir = tmp_path / "root" / "acme" / "bot"
    with s._locked("acme", "bot"):  # a put under way: its tensor file written, its marker not yet
        blob = ndir / "v2.safetensors"
        blob.write_bytes((ndir / "v1.safetensors").read_bytes())
        time.sleep(0.1)
        assert s._sweep_leftovers(min_age_s=0.05) == 0 and blob.exists()
        (ndir / "v2.json").write_bytes(
            (ndir / "v1.json").read_bytes().replace(b'"version": 1', b'"version": 2')
        )
    assert s._sweep_leftovers(min_age_s=0.05) == 0 and s.get("acme", "bot").meta.version == 2
    blob.with_suffix(".json").unlink()  # a crashed put's, with nobody holding the lock: swept
    other = tmp_path / "root" / "acme" / "other"
    other.mkdir()
    (other / "v1.safetensors").write_bytes(b"x")
    time.sleep(0.1)
    real = fcntl.flock

    def no_locks(fd, op):  # a filesystem without locks (ENOLCK), as some NFS set-ups: that name is left alone
        if op & fcntl.LOCK_NB:
            raise OSError(errno.ENOLCK, "No locks available")
        return real(fd, op)

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_locks)
        assert (
            s._sweep_leftovers(min_age_s=0.05) == 1
            and blob.exists()
            and not (other / "v1.safetensors").exists()
        )
    assert s._sweep_leftovers(min_age_s=0.05) == 1 and not blob.exists()


def test_the_sweep_leaves_a_name_alone_whose_lock_file_cannot_be_opened(tmp_path, monkeypatch):
    """A name whose lock file cannot be opened (no permission: another user's store) may have a put under way
    that the sweep cannot see: its files are left alone, whatever their age; they are swept once the lock can
    be tried again."""
    from prefix_store.disk import LOCK_SUFFIX

    s = open_store(f"file://{tmp_path}/root")
    assert isinstance(s, DiskStore)
    put(s)
    blob = tmp_path / "root" / "acme" / "bot" / "v2.safetensors"  # a put's tensor file, its marker not yet
    blob.write_bytes(b"x")
    time.sleep(0.1)
    real = os.open

    def denied(path, flags, *a, **kw):
        if str(path).endswith(LOCK_SUFFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(os, "open", denied)
        assert s._sweep_leftovers(min_age_s=0.05) == 0 and blob.exists()
    assert s._sweep_leftovers(min_age_s=0.05) == 1 and not blob.exists()
    assert s.get("acme", "bot").meta.version == 1
    s.close()


def test_a_version_number_is_not_handed_out_again_after_a_copy_died_before_its_counter(tmp_path, monkeypatch):
    """put(version=N) (a copy) writes the name's counter after the commit marker: one killed in between left the
    counter below N, made up for only by the scan of N's marker. Deleting N (or the whole name) then let later
    puts be given N again, for other tensors (a cache keyed on tenant, name, version served the old ones)."""
    for whole_name in (False, True):
        s = open_store(f"file://{tmp_path}/root{int(whole_name)}")
        assert isinstance(s, DiskStore)
        put(s, fill=1.0)
        put(s, fill=2.0)

        def killed(fd: int, version: int) -> None:
            raise SystemExit("killed")

        with monkeypatch.context() as m:
            m.setattr(DiskStore, "_write_counter", staticmethod(killed))
            with pytest.raises(SystemExit):
                put(s, fill=5.0, version=5)
        assert s.get("acme", "bot").meta.version == 5  # committed, and served
        if whole_name:
            s.delete("acme", "bot")
        else:
            s.delete("acme", "bot", version=5)
        assert [put(s, fill=9.0 + i).version for i in range(2)] == [6, 7]
        with pytest.raises(errors.PrefixNotFound):
            s.get("acme", "bot", 5)
        s.close()


def test_trash_left_by_a_crashed_delete_is_cleaned(tmp_path):
    trash = tmp_path / "root" / "@trash" / "acme@bot@123"
    trash.mkdir(parents=True)
    (trash / "v1.json").write_text("{}")
    s = open_store(f"file://{tmp_path}/root")
    assert not trash.exists()
    assert s.list() == []


def _mp_writer(root: str, writer: int, count: int, queue, barrier) -> None:
    try:
        store = open_store(f"file://{root}")
        versions = []
        barrier.wait(60)  # start writing together
        for i in range(count):
            meta = store.put(
                "acme",
                "shared",
                "prefix_tuning",
                {"kv": make_kv(writer * 1000 + i)},
                base_model_fingerprint=FP,
                prefix_length=4,
                training={"writer": writer, "i": i},
            )
            versions.append(meta.version)
        queue.put(("ok", writer, versions))
    except BaseException as e:  # report to the parent
        queue.put(("error", writer, repr(e)))


def test_concurrent_writers_processes(tmp_path):
    root = str(tmp_path / "root")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs, count = 3, 20
    barrier = ctx.Barrier(procs)
    ps = [ctx.Process(target=_mp_writer, args=(root, w, count, queue, barrier)) for w in range(procs)]
    for p in ps:
        p.start()
    results = [queue.get(timeout=90) for _ in ps]
    for p in ps:
        p.join(30)
    assert all(r[0] == "ok" for r in results), results
    allocated = sorted(v for r in results for v in r[2])
    assert allocated == list(range(1, procs * count + 1))
    for r in results:
        assert r[2] == sorted(r[2])  # each writer saw its own versions increase
    # the writers really overlapped: some writer's versions are not one contiguous block
    assert any(r[2][-1] - r[2][0] + 1 > count for r in results), results
    store = open_store(f"file://{root}")
    assert store.versions("acme", "shared") == list(range(1, procs * count + 1))
    seen = set()
    for v in range(1, procs * count + 1):
        rec = store.get("acme", "shared", v)
        tr = rec.meta.training
        assert torch.equal(rec.kv, make_kv(tr["writer"] * 1000 + tr["i"]))
        seen.add((tr["writer"], tr["i"]))
    assert len(seen) == procs * count
    assert not [p for p in (Path(root) / "acme" / "shared").iterdir() if p.name.startswith(".tmp-")]


def test_unusable_root_is_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = DiskStore(blocker / "root")
    with pytest.raises(errors.StoreUnavailable):
        s.ping()
    with pytest.raises(errors.StoreUnavailable):
        put(s)


def test_open_store_default_uses_prefixserve_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_HOME", str(tmp_path / "home"))
    s = open_store()
    assert isinstance(s, DiskStore) and s.root == tmp_path / "home"
    put(s)
    assert (tmp_path / "home" / "acme" / "bot" / "v1.json").is_file()
    monkeypatch.delenv("PREFIXSERVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_store_url() == f"file://{tmp_path}/user/.local/share/prefixserve"
    assert open_store().root == tmp_path / "user" / ".local" / "share" / "prefixserve"


def test_store_urls(tmp_path):
    assert open_store(f"file://localhost{tmp_path}/a").root == tmp_path / "a"
    assert open_store(tmp_path / "b").root == tmp_path / "b"
    assert open_store(f"file://{tmp_path}/with%20space").root == tmp_path / "with space"
    # a plain relative path would be a folder under the working directory, where a mistyped URL ends up too
    for bad in ("file://relative/path", "ftp://x/y", "s3://bucket/x", "rel", "rediss//h:6379/0", "h:6379/0"):
        with pytest.raises(ValueError):
            open_store(bad)


def test_an_option_a_store_url_does_not_take_is_refused_before_anything_opens():
    """redis-py makes any query option a keyword argument of each connection: a mistyped one (`keep_version=2`,
    `prefx=`) was a TypeError at the first command, after the model had loaded (a server never ready, a CLI
    traceback); on a file URL it was ignored (every version kept). Both are a ValueError naming the option, from
    the check settings run at start-up; the options of ours and of redis-py's still pass."""
    from prefix_store import check_store_url

    for url, option in (
        ("redis://127.0.0.1:6379/0?keep_version=2", "'keep_version'"),
        ("redis://127.0.0.1:6379/0?prefix=ns&prefx=ns", "'prefx'"),
        ("unix:///tmp/redis.sock?nope=1", "'nope'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("file:///tmp/store?keep_version=2", "keep_version=2"),
    ):
        with pytest.raises(ValueError, match=option):
            check_store_url(url)
    for url in (
        "redis://127.0.0.1:6379/0?prefix=ns&keep_versions=2&socket_timeout=2&health_check_interval=10",
        "rediss://:secret@127.0.0.1:6380/1?ssl_cert_reqs=none",
        "unix:///tmp/redis.sock?db=1",
        "file:///tmp/store?keep_versions=3",
    ):
        check_store_url(url)


@pytest.mark.parametrize("name", ["home#1", "h?x", "p%41", "with space", "ünï"])
def test_a_folder_name_that_urls_encode_is_the_store_it_names(tmp_path, monkeypatch, name):
    """The store URLs the server builds from a folder (PREFIXSERVE_HOME, a store's own `url`, the training jobs
    beside it) are percent-encoded: `home#1` and `home#2` both opened `home` (the fragment cut off), `h?x` opened
    `h`, `p%41` opened `pA` — and the jobs of two such stores were one queue, trained against the other store."""
    from server.training.jobs import jobs_location, open_backend

    monkeypatch.setenv("PREFIXSERVE_HOME", str(tmp_path / name))
    s = open_store()
    assert s.root == tmp_path / name and open_store(s.url).root == s.root
    jobs = open_backend(jobs_location(s), max_attempts=1, stale_after_s=60, retention_s=60)
    assert jobs.root == tmp_path / f"{name}.jobs"
    assert open_backend(jobs.url, max_attempts=1, stale_after_s=60, retention_s=60).root == jobs.root
    put(s)
    assert (tmp_path / name / "acme" / "bot" / "v1.json").is_file()


# ------------------------------------------------------------------------------------------ change journal
def _drain(q, n, timeout=10.0):
    return [q.get(timeout=timeout) for _ in range(n)]


def test_changes_made_by_another_process_reach_subscribers(tmp_path):
    """What a server learns when the CLI (`prefixserve prefixes delete`) or a training worker changes a file store."""
    import queue
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "root"
    replica = DiskStore(root)
    got: queue.Queue = queue.Queue()
    replica.subscribe(got.put)
    script = textwrap.dedent(f"""
        import torch
        from prefix_store import open_store
        s = open_store("file://{root}")
        for fill in (1.0, 2.0):
            s.put("acme", "bot", "prefix_tuning", {{"kv": torch.full((2, 2, 1, 4, 8), fill)}},
                  base_model_fingerprint="{FP}", prefix_length=4)
        s.delete("acme", "bot", 1)
        s.delete("acme", "bot")
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    events = _drain(got, 4)
    assert [(e.op, e.version) for e in events] == [("put", 1), ("put", 2), ("delete", 1), ("delete", 2)]
    assert {(e.tenant_id, e.name) for e in events} == {("acme", "bot")}
    replica.close()


def test_journal_rotation_loses_no_change(tmp_path):
    import queue

    root = tmp_path / "root"
    follower = DiskStore(root, poll_s=0.05)
    writer = DiskStore(root, changes_max_bytes=400)  # a new segment every few lines
    got: queue.Queue = queue.Queue()
    follower.subscribe(got.put)
    segments = set()
    for i in range(40):
        put(writer, n=f"p{i}")
        segments.update(os.listdir(root / "@changes"))
        if i % 7 == 0:
            time.sleep(0.12)  # the follower reads some segments as they grow, others only once they are final
    events = _drain(got, 40)
    assert [e.name for e in events] == [f"p{i}" for i in range(40)]
    assert len(segments - {"lock"}) > 5  # the journal really did rotate
    assert len(os.listdir(root / "@changes")) <= 3  # old segments are removed (two left, and the lock)
    follower.close()
    writer.close()


def test_a_follower_far_behind_goes_on_from_the_oldest_segment(tmp_path, caplog):
    from prefix_store import journal

    jdir = tmp_path / "j"
    follower = journal.Follower(jdir)
    for i in range(30):  # many rotations before the first poll: segments 1..N-2 are gone
        journal.append(jdir, b"%d\n" % i, max_bytes=8)
    lines = follower.poll()
    assert lines and lines[-1] == b"29" and len(lines) < 30
    assert "rotated past this reader" in caplog.text
    journal.append(jdir, b"30\n", max_bytes=8)
    assert follower.poll() == [b"30"]
    follower.close()


def test_malformed_journal_lines_are_taken_for_missed_changes(tmp_path):
    """A line that does not parse is skipped, the lines around it delivered, and subscribers get one "resync": it
    may be a change cut short (a full disk), so what they cached may be stale."""
    import queue

    root = tmp_path / "root"
    store = DiskStore(root, poll_s=0.05)
    got: queue.Queue = queue.Queue()
    store.subscribe(got.put)
    segment = max(int(e) for e in os.listdir(root / "@changes") if e.isdigit())
    with open(root / "@changes" / str(segment), "ab") as f:
        f.write(b"not json\n")
        f.write(b'{"op": "explode", "tenant_id": "a", "name": "b", "version": 1}\n')
        f.write(b'{"op": "put", "tenant_id": "a", "name": "b", "version": 3}\n')
    assert got.get(timeout=5).version == 3
    assert got.get(timeout=5).op == "resync"
    time.sleep(0.2)
    assert got.empty()
    store.close()


def test_close_stops_the_journal_follower(tmp_path):
    store = DiskStore(tmp_path / "root", poll_s=0.05)
    store.subscribe(lambda ev: None)
    thread = store._follower_thread
    assert thread is not None and thread.is_alive()
    store.close()
    assert not thread.is_alive()
    with pytest.raises(errors.StoreError):
        store.subscribe(lambda ev: None)


def test_a_journal_line_cut_short_by_a_full_disk_resyncs_followers(tmp_path, monkeypatch):
    """A put that committed while the disk had room for 1 byte of its journal line: the next line was appended to
    that fragment, and followers dropped both as one malformed line (a put, then a delete, missed without a
    word: other replicas served the deleted prefix). The fragment is ended before the next line, the writer puts
    a "resync" before it, a follower takes a malformed line for missed changes, and the next change arrives."""
    import queue

    from prefix_store import journal

    writer = DiskStore(tmp_path / "root")
    follower = DiskStore(tmp_path / "root", poll_s=0.05)
    got: queue.Queue = queue.Queue()
    follower.subscribe(got.put)
    put(writer, n="a")
    assert [(e.op, e.name) for e in _drain(got, 1)] == [("put", "a")]
    real = os.write
    with monkeypatch.context() as m:
        m.setattr(journal.os, "write", lambda fd, data: real(fd, data[:1]))  # the disk is full after 1 byte
        put(writer, n="b")  # committed; its line cut short
    assert writer.exists("acme", "b")
    time.sleep(0.2)
    writer.delete("acme", "b")  # room again
    events = [(e.op, e.name) for e in _drain(got, 3)]
    assert sorted(events) == [("delete", "b"), ("resync", ""), ("resync", "")]
    put(writer, n="c")
    assert [(e.op, e.name) for e in _drain(got, 1)] == [("put", "c")]
    writer.close()
    follower.close()


def test_a_store_restored_under_a_follower_resyncs_it(tmp_path, caplog):
    """A store directory restored from a backup (or recreated) while a server follows its journal: the follower
    notices that the journal it read is gone, says so, and its subscribers get a "resync" (a restored store numbers
    versions again from its backup's: a cached version may now name other tensors); then it follows the new
    journal."""
    import queue
    import shutil

    root, backup = tmp_path / "root", tmp_path / "backup"
    writer = DiskStore(root)
    put(writer, n="a")
    writer.close()
    shutil.copytree(root, backup)
    follower = DiskStore(root, poll_s=0.05)
    got: queue.Queue = queue.Queue()
    follower.subscribe(got.put)
    writer = DiskStore(root)
    put(writer, n="b")
    assert [e.name for e in _drain(got, 1)] == ["b"]
    writer.close()
    follower.ping()
    shutil.rmtree(root)
    time.sleep(0.3)  # polls while the directory is gone create nothing (a restore copies to where it was)
    assert not root.exists()
    with pytest.raises(errors.StoreUnavailable, match="it is gone"):
        follower.ping()  # (/ready says so, and makes no empty store either)
    with pytest.raises(errors.StoreUnavailable, match="it is gone"):
        put(follower, n="during-the-restore")  # nor does a put (an import, a training job finishing): a 503
    assert not root.exists()
    shutil.copytree(backup, root)  # the restore: the journal's segment is another file now
    # one when it went, one when the restored journal is followed (what was cached in between may be stale too)
    assert [e.op for e in _drain(got, 2)] == ["resync", "resync"] and "was replaced" in caplog.text
    follower.ping()
    writer = DiskStore(root)
    put(writer, n="c")  # changes after the restore are followed again
    assert [(e.op, e.name) for e in _drain(got, 1)] == [("put", "c")]
    writer.close()
    follower.close()


def test_a_journal_written_over_in_place_resyncs_its_follower(tmp_path):
    """A restore that writes over the journal's file in place (`cp` over it, `rsync --inplace`): same inode, but
    shorter than what was read."""
    from prefix_store import journal

    jdir = tmp_path / "j"
    follower = journal.Follower(jdir)
    for i in range(5):
        journal.append(jdir, b"%d\n" % i, max_bytes=1 << 20)
    assert len(follower.poll()) == 5
    segment = jdir / str(max(int(e) for e in os.listdir(jdir) if e.isdigit()))
    with open(segment, "r+b") as f:  # the backup's shorter journal, written over the same file
        f.write(b"0\n")
        f.truncate()
    assert follower.poll() == [] and follower.lost
    follower.lost = False
    journal.append(jdir, b"later\n", max_bytes=1 << 20)
    assert follower.poll() == [b"later"]
    # a longer journal written over it: the first bytes differ (its lines name other changes)
    with open(segment, "r+b") as f:
        f.write(b"".join(b'{"op":"put","n":%d}\n' % i for i in range(50)))
    assert follower.poll() == [] and follower.lost
    follower.close()


def test_a_follower_that_missed_segments_resyncs(tmp_path):
    from prefix_store import journal

    jdir = tmp_path / "j"
    follower = journal.Follower(jdir)
    journal.append(jdir, b"0\n", max_bytes=8)
    assert follower.poll() == [b"0"] and not follower.lost
    for i in range(30):
        journal.append(jdir, b"%d\n" % i, max_bytes=8)
    follower.poll()
    assert follower.lost
