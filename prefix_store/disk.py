"""Filesystem backend (``file:///abs/path``).

Layout under the root directory::

    <root>/<tenant>/<name>/v<N>.safetensors   tensors of version N (safetensors bytes)
    <root>/<tenant>/<name>/v<N>.json          metadata of version N -- the commit marker, written LAST
    <root>/<tenant>/<name>/.tmp-*             in-flight (or crashed) writes; ignored by readers
    <root>/<tenant>/<name>@lock               flock(2) lock of (tenant, name); holds the highest version ever
                                              allocated, so versions are never reused, even after delete
    <root>/@trash/                            deleted prefixes on their way out
    <root>/@changes/                          change journal: one JSON line per put/delete, for other processes

``@`` cannot occur in tenant ids or names, so bookkeeping entries never collide with them.

A version exists iff its ``v<N>.json`` exists. ``put`` takes the exclusive lock, allocates N = 1 + max(counter,
versions on disk), persists the counter, writes the blob to a temp file in the same directory (write, fsync,
``os.replace``, fsync dir) and then the metadata the same way. A crash at any point leaves either no marker (the
version is invisible; the leftovers are removed by the next writer, which holds the lock) or a complete record.
``delete`` takes the lock and renames the whole ``<name>`` directory into ``@trash`` (one atomic rename) before
removing it, so readers see all versions or none. Two writers -- threads or processes -- serialize on the lock.
The lock needs a local filesystem with working ``flock`` (not every NFS setup has one).

Other processes sharing the directory (server replicas, a training worker, the ``prefixserve prefixes`` CLI) learn
of changes through the journal in ``@changes`` (``prefix_store/journal.py``): every committed put/delete appends one
line while it still holds the name's lock, and a subscribed store follows the journal on a background thread (every
``poll_s``, 0.5 s), delivering the changes other store objects made -- what pub/sub does for the Redis backend.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from prefix_store import journal
from prefix_store.base import PrefixStore, Subscriber, version_to_take
from prefix_store.errors import InvalidPrefix, PrefixNotFound, StoreReadOnly, StoreRefused, StoreUnavailable
from prefix_store.format import ChangeEvent, EncodedPrefix, PrefixMeta, idempotency_key_of, label
from prefix_store.names import is_valid_name
from prefix_store.urls import file_url

log = logging.getLogger("prefix_store")

_META_RE = re.compile(r"v([1-9][0-9]{0,17})\.json")
_BLOB_RE = re.compile(r"v([1-9][0-9]{0,17})\.safetensors")
TMP_PREFIX = ".tmp-"
TRASH = "@trash"
# a temp file (or a blob without its marker) this old is a crashed write's: no put takes that long
LEFTOVER_AGE_S = 3600.0
LOCK_SUFFIX = "@lock"
CHANGES = "@changes"
_COUNTER_WIDTH = 24  # the counter is rewritten in place with a fixed width (one sector, no truncation)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path``, fsync it and rename it over ``path``."""
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mkdir_durable(path: Path) -> None:
    """mkdir (parents too) and fsync the parent of every directory created."""
    if path.is_dir():
        return
    _mkdir_durable(path.parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    _fsync_dir(path.parent)


def _last_changed(path: Path) -> float:
    st = path.stat()
    return max(st.st_mtime, st.st_ctime)


class DiskStore(PrefixStore):
    backend = "disk"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        poll_s: float = 0.5,
        changes_max_bytes: int = 1 << 20,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser().absolute()
        self.url = file_url(self.root)
        self.poll_s = poll_s
        # how often a subscribed store (a server's) sweeps leftovers again: the sweep at opening skips those of a
        # crash just before it (a supervisor restarting the server at once), and a name no put comes back to kept
        # them until a restart an hour later
        self.sweep_every_s = LEFTOVER_AGE_S
        self.changes_max_bytes = changes_max_bytes
        self._follower_thread: threading.Thread | None = None
        self._journal_missed = False  # a change not (wholly) written to the journal: the next line says so
        # (puts of two names at once: the flag is read and set with the line)
        self._journal_lock = threading.Lock()
        self._follower_lock = threading.Lock()
        self._stop = threading.Event()
        # the root existed (or was made) once: if it goes (a restore under way, a volume unmounted), nothing here
        # makes it again, since an empty one would be served as the store and a restore would copy into it.
        # (A store object opened while it is gone cannot tell that from a fresh install: it makes it.)
        self._root_seen = False
        try:
            _mkdir_durable(self.root)
            self._root_seen = True
            self._empty_trash()
        except OSError as e:  # reported by ping()/put
            log.warning("prefix store root %s is not usable: %s", self.root, e)
        else:
            threading.Thread(target=self._sweep_leftovers, name="prefix-store-sweep", daemon=True).start()

    # ------------------------------------------------------------------------------------------ helpers
    def _locations(self) -> list[str]:
        return [str(self.root)]

    def _name_dir(self, tenant_id: str, name: str) -> Path:
        return self.root / tenant_id / name

    def _unavailable(self, what: str, e: OSError) -> StoreUnavailable:
        if e.errno == errno.EROFS:
            return StoreReadOnly(f"prefix store at {self.root}: cannot {what}: its filesystem is read-only")
        return StoreUnavailable(f"prefix store at {self.root}: cannot {what}: {e.strerror or e}")

    @property
    def read_only(self) -> bool:
        """Whether the store's filesystem is mounted read-only: it serves its prefixes and refuses every change
        (StoreReadOnly); its ping passes (prefixes baked into an image, a ReadOnlyMany volume)."""
        try:
            return bool(os.statvfs(self.root).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    @contextlib.contextmanager
    def _locked(self, tenant_id: str, name: str) -> Iterator[int]:
        """Exclusive flock on ``<root>/<tenant>/<name>@lock``; yields its fd (which holds the version counter)."""
        tenant_dir = self.root / tenant_id
        self._check_root()
        _mkdir_durable(tenant_dir)
        fd = os.open(tenant_dir / f"{name}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _unless_locked(self, tenant_id: str, name: str) -> Iterator[bool]:
        """The name's lock if nobody holds it (True, held for the block), else False at once. A name without a lock
        file (restored from a backup without it) has no put under way: True, nothing held. A lock that cannot be
        tried (no permission, no locks on this filesystem): False, the name is left alone."""
        try:
            # (read-write: NFS emulates flock with byte-range locks, and an exclusive one needs a writable file)
            fd = os.open(self.root / tenant_id / f"{name}{LOCK_SUFFIX}", os.O_RDWR)
        except FileNotFoundError:
            yield True
            return
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # (BlockingIOError: a put holds it)
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    @staticmethod
    def _read_counter(fd: int) -> int:
        raw = os.pread(fd, _COUNTER_WIDTH, 0)
        try:
            return int(raw.decode("ascii").strip() or 0)
        except (UnicodeDecodeError, ValueError):
            log.warning("ignoring unreadable version counter %r", raw[:32])
            return 0

    @staticmethod
    def _write_counter(fd: int, version: int) -> None:
        data = str(version).rjust(_COUNTER_WIDTH - 1).encode("ascii") + b"\n"
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    @staticmethod
    def _scan(ndir: Path) -> builtins.list[int]:
        """Committed versions in a name directory (ascending); [] if it does not exist."""
        try:
            entries = os.listdir(ndir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(m.group(1)) for e in entries if (m := _META_RE.fullmatch(e)))

    def _put_with(self, ndir: Path, idempotency_key: str) -> PrefixMeta | None:
        """The stored version of a name directory put with this Idempotency-Key (newest first)."""
        for v in reversed(self._scan(ndir)):
            try:
                meta = PrefixMeta.from_json((ndir / f"v{v}.json").read_bytes())
            except (FileNotFoundError, InvalidPrefix):
                continue
            if idempotency_key_of(meta) == idempotency_key:
                return meta
        return None

    @staticmethod
    def _remove_leftovers(ndir: Path, older_than: float | None = None) -> int:
        """Remove temp files and blobs without a marker (crashed writes), or only those last changed before the
        unix time `older_than`; returns how many. Without `older_than` only call while holding the lock.

        "Last changed" is the later of the modification and the inode change time: a restore (`cp -a`, `rsync -a`,
        `tar x`) keeps a backup's old mtime, and a version's tensor file restored before its commit marker must not
        look like an old crash's leftover to a store opening meanwhile (its ctime is the copy's)."""
        entries = os.listdir(ndir)
        committed = {m.group(1) for e in entries if (m := _META_RE.fullmatch(e))}
        removed = 0
        for e in entries:
            m = _BLOB_RE.fullmatch(e)
            if not (e.startswith(TMP_PREFIX) or (m and m.group(1) not in committed)):
                continue
            with contextlib.suppress(FileNotFoundError):
                if older_than is None or _last_changed(ndir / e) < older_than:
                    log.info("removing leftover of an interrupted write: %s", ndir / e)
                    os.unlink(ndir / e)
                    removed += 1
        return removed

    def _sweep_leftovers(self, min_age_s: float = LEFTOVER_AGE_S) -> int:
        """Remove what writes that crashed left behind (temp files, blobs without a marker) older than `min_age_s`,
        in every name directory; returns how many. Run in the background when the store opens: a put cleans its own
        name's leftovers, but a name no put comes back to (or one whose first put crashed) kept them for good.
        A name whose lock is held is skipped: a put is under way there (it cleans up itself), and the age of its
        files says nothing about that (a clock stepped forward, a put stalled for long)."""
        removed = 0
        cutoff = time.time() - min_age_s
        try:
            for t in self._subdirs(self.root):
                for n in self._subdirs(self.root / t):
                    with contextlib.suppress(FileNotFoundError), self._unless_locked(t, n) as free:
                        if free:  # (FileNotFoundError: a name deleted meanwhile)
                            removed += self._remove_leftovers(self.root / t / n, older_than=cutoff)
        except OSError as e:
            log.warning(
                "prefix store %s: sweeping the leftovers of interrupted writes failed: %s", self.root, e
            )
        if removed:
            log.info("prefix store %s: removed %d leftovers of interrupted writes", self.root, removed)
        return removed

    def _empty_trash(self) -> None:
        trash = self.root / TRASH
        if trash.is_dir():
            for entry in os.listdir(trash):
                shutil.rmtree(trash / entry, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- primitives
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
        try:
            with self._locked(tenant_id, name) as lock_fd:
                ndir = self._name_dir(tenant_id, name)
                _mkdir_durable(ndir)
                self._remove_leftovers(ndir)
                if idempotency_key is not None:
                    earlier = self._put_with(ndir, idempotency_key)
                    if earlier is not None:
                        return earlier, False
                nxt = max(self._read_counter(lock_fd), *self._scan(ndir), 0) + 1
                asked, version = version, version_to_take(tenant_id, name, nxt, version)
                if asked is None:  # before any file: a crash leaves a gap, never a reuse
                    self._write_counter(lock_fd, version)
                meta = enc.meta(tenant_id, name, version, time.time() if created is None else created)
                _write_file_atomic(ndir / f"v{version}.safetensors", enc.blob)
                _fsync_dir(ndir)
                _write_file_atomic(ndir / f"v{version}.json", meta.to_json())  # the commit marker
                if asked is not None:
                    # a number asked for (a copy) is taken once committed: a copy killed before that can store it
                    # when run again; nothing can reuse it meanwhile, the commit marker's scan counts it
                    self._write_counter(lock_fd, version)
                try:
                    _fsync_dir(ndir)
                finally:  # visible from the rename on: other processes hear of it even if the fsync failed
                    self._journal(ChangeEvent("put", tenant_id, name, version))
                return meta, True
        except OSError as e:
            raise self._unavailable(f"write prefix {label(tenant_id, name)}", e) from e

    def _load(
        self, tenant_id: str, name: str, version: int | None, *, with_blob: bool
    ) -> tuple[PrefixMeta, bytes | None]:
        if version is None:  # the latest, looked up again if it is deleted between the listing and the read
            for _attempt in range(3):
                with contextlib.suppress(PrefixNotFound):
                    return self._load(tenant_id, name, self._latest(tenant_id, name), with_blob=with_blob)
            return self._load(tenant_id, name, self._latest(tenant_id, name), with_blob=with_blob)
        ndir = self._name_dir(tenant_id, name)
        meta_path = ndir / f"v{version}.json"
        meta = PrefixMeta.from_json(self._meta_bytes(meta_path, tenant_id, name, version))
        if not with_blob:
            return meta, None
        try:
            blob = (ndir / f"v{version}.safetensors").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            if meta_path.exists():
                raise InvalidPrefix(
                    f"prefix {label(tenant_id, name, version)}: its tensor file is missing"
                ) from None
            raise PrefixNotFound(
                f"prefix {label(tenant_id, name, version)} not found"
            ) from None  # just deleted
        except OSError as e:
            raise self._unavailable(f"read prefix {label(tenant_id, name, version)}", e) from e
        return meta, blob

    def _meta_bytes(self, meta_path: Path, tenant_id: str, name: str, version: int) -> bytes:
        try:
            return meta_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise PrefixNotFound(f"prefix {label(tenant_id, name, version)} not found") from None
        except OSError as e:
            raise self._unavailable(f"read {meta_path}", e) from e

    def _raw_metas(self, tenant_id: str, name: str, versions: builtins.list[int]) -> Iterator[bytes | None]:
        ndir = self._name_dir(tenant_id, name)
        for v in versions:
            try:
                yield self._meta_bytes(ndir / f"v{v}.json", tenant_id, name, v)
            except PrefixNotFound:
                yield None

    def _latest(self, tenant_id: str, name: str) -> int:
        try:
            found = self._scan(self._name_dir(tenant_id, name))
        except OSError as e:
            raise self._unavailable(f"list versions of {label(tenant_id, name)}", e) from e
        if not found:
            raise PrefixNotFound(f"prefix {label(tenant_id, name)} not found")
        return found[-1]

    @staticmethod
    def _subdirs(path: Path) -> builtins.list[str]:
        try:
            entries = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e for e in entries if is_valid_name(e) and (path / e).is_dir())

    def _names(self, tenant_id: str | None) -> builtins.list[tuple[str, str]]:
        try:
            tenants = [tenant_id] if tenant_id is not None else self._subdirs(self.root)
            return [(t, n) for t in tenants for n in self._subdirs(self.root / t)]
        except OSError as e:
            raise self._unavailable("list prefixes", e) from e

    def _metas(self, keys: builtins.list[tuple[str, str]]) -> builtins.list[PrefixMeta]:
        out = []
        try:
            for t, n in keys:
                try:
                    meta, _ = self._load(t, n, None, with_blob=False)
                except PrefixNotFound:
                    continue
                except InvalidPrefix as e:
                    log.warning("skipping prefix %s in listing: %s", label(t, n), e)
                    continue
                out.append(meta)
        except OSError as e:
            raise self._unavailable("list prefixes", e) from e
        return out

    def _version_counter(self, tenant_id: str, name: str) -> int:
        lock = self.root / tenant_id / f"{name}{LOCK_SUFFIX}"
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            counter = 0
        except OSError as e:
            raise self._unavailable(f"read the version counter of {label(tenant_id, name)}", e) from e
        else:
            try:
                counter = self._read_counter(fd)
            finally:
                os.close(fd)
        return max(counter, *self._versions(tenant_id, name), 0)

    def _counted_names(self, tenant_id: str | None) -> builtins.list[tuple[str, str]]:
        try:
            tenants = [tenant_id] if tenant_id is not None else self._subdirs(self.root)
            out = []
            for t in tenants:
                try:
                    entries = os.listdir(self.root / t)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for e in entries:
                    n = e.removesuffix(LOCK_SUFFIX)
                    if n != e and is_valid_name(n):
                        out.append((t, n))
            return out
        except OSError as e:
            raise self._unavailable("list prefixes", e) from e

    def _reserve_versions(self, tenant_id: str, name: str, upto: int) -> None:
        try:
            with self._locked(tenant_id, name) as lock_fd:
                have = max(self._read_counter(lock_fd), *self._scan(self._name_dir(tenant_id, name)), 0)
                if upto > have:
                    self._write_counter(lock_fd, upto)
        except OSError as e:
            raise self._unavailable(f"reserve versions of {label(tenant_id, name)}", e) from e

    def _versions(self, tenant_id: str, name: str) -> builtins.list[int]:
        try:
            return self._scan(self._name_dir(tenant_id, name))
        except OSError as e:
            raise self._unavailable(f"list versions of {label(tenant_id, name)}", e) from e

    def _delete(self, tenant_id: str, name: str) -> int:
        # a name that has no directory has no version: answered without taking (and so creating) its lock file, or
        # every DELETE of a made-up name would leave one behind
        if not self._name_dir(tenant_id, name).is_dir():
            raise PrefixNotFound(f"prefix {label(tenant_id, name)} not found")
        try:
            with self._locked(tenant_id, name) as lock_fd:
                return self._delete_locked(tenant_id, name, lock_fd)
        except OSError as e:
            raise self._unavailable(f"delete prefix {label(tenant_id, name)}", e) from e

    def _count_to(self, lock_fd: int, highest: int) -> None:
        """Before a version leaves the disk, the counter covers it: a put(version=N) killed between its commit
        marker and its counter write left the counter below N, which only the marker's scan made up for; once N
        is deleted, N would be handed out again, to other tensors."""
        if self._read_counter(lock_fd) < highest:
            self._write_counter(lock_fd, highest)

    def _delete_locked(self, tenant_id: str, name: str, lock_fd: int) -> int:
        """Every version, in one rename into the trash, then the journal line (call holding the name's lock)."""
        ndir = self._name_dir(tenant_id, name)
        found = self._scan(ndir)
        if not found:
            raise PrefixNotFound(f"prefix {label(tenant_id, name)} not found")
        self._count_to(lock_fd, found[-1])
        trash = self.root / TRASH
        _mkdir_durable(trash)
        doomed = trash / uuid.uuid4().hex  # (tenant and name can be as long as a file name may be, not both)
        os.rename(ndir, doomed)  # one atomic step: readers see every version or none
        _fsync_dir(ndir.parent)
        _fsync_dir(trash)
        self._journal(ChangeEvent("delete", tenant_id, name, found[-1]))
        shutil.rmtree(doomed, ignore_errors=True)
        return found[-1]

    def _delete_version(self, tenant_id: str, name: str, version: int) -> int:
        ndir = self._name_dir(tenant_id, name)
        if not ndir.is_dir():
            raise PrefixNotFound(f"prefix {label(tenant_id, name, version)} not found")
        try:
            with self._locked(tenant_id, name) as lock_fd:
                found = self._scan(ndir)
                if version not in found:
                    raise PrefixNotFound(f"prefix {label(tenant_id, name, version)} not found")
                if found == [version]:  # the last one: the name goes, in the one-step way
                    return self._delete_locked(tenant_id, name, lock_fd)
                self._count_to(lock_fd, found[-1])
                os.unlink(ndir / f"v{version}.json")  # the commit marker first: from here the version is gone
                _fsync_dir(ndir)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(ndir / f"v{version}.safetensors")
                _fsync_dir(ndir)
                self._journal(ChangeEvent("delete", tenant_id, name, version))
        except OSError as e:
            raise self._unavailable(f"delete prefix {label(tenant_id, name, version)}", e) from e
        return version

    def _exists(self, tenant_id: str, name: str, version: int | None) -> bool:
        ndir = self._name_dir(tenant_id, name)
        try:
            if version is None:
                return bool(self._scan(ndir))
            return (ndir / f"v{version}.json").is_file()
        except OSError as e:
            raise self._unavailable(f"look up {label(tenant_id, name, version)}", e) from e

    def _check_root(self) -> None:
        """The root, made if it never existed; StoreUnavailable if it existed and is gone (see `_root_seen`)."""
        if self.root.is_dir():
            self._root_seen = True
        elif self._root_seen:
            raise self._unavailable("find the root directory", OSError(errno.ENOENT, "it is gone"))
        else:
            try:
                _mkdir_durable(self.root)
            except OSError as e:
                raise self._unavailable("create the root directory", e) from e
            self._root_seen = True

    def ping(self) -> None:
        self._check_root()
        if not os.access(self.root, os.W_OK | os.X_OK) and not self.read_only:
            raise self._unavailable("write", OSError(errno.EACCES, "permission denied"))

    # -------------------------------------------------------------------------------- change journal
    def _journal(self, event: ChangeEvent) -> None:
        """Append `event` for other processes (call holding the name's lock). A failure is logged, not raised: the
        change itself is committed; the next line written is preceded by a "resync" (other processes drop what they
        cached: they missed a change), and they see it within their metadata TTL meanwhile."""
        line = self._change_message(event).encode() + b"\n"
        with self._journal_lock:
            if self._journal_missed:
                missed = ChangeEvent(op="resync", tenant_id="", name="", version=0)
                line = self._change_message(missed).encode() + b"\n" + line
            try:
                journal.append(self.root / CHANGES, line, self.changes_max_bytes)
                self._journal_missed = False
            except OSError as e:
                self._journal_missed = True
                log.warning("prefix store: could not record %s in the change journal: %s", event, e)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Also delivers the changes other processes (and other store objects) make under the same root, read from
        the journal every `poll_s` on a background thread."""
        with self._follower_lock:
            if self._closed:
                raise StoreRefused("store is closed")
            unsubscribe = super().subscribe(callback)
            if self._follower_thread is None:
                follower = journal.Follower(self.root / CHANGES)  # from here on, no change is missed
                self._follower_thread = threading.Thread(
                    target=self._follow, args=(follower,), name="prefix-store-journal", daemon=True
                )
                self._follower_thread.start()
        return unsubscribe

    def _follow(self, follower: journal.Follower) -> None:
        next_sweep = time.monotonic() + self.sweep_every_s
        try:
            while not self._stop.wait(self.poll_s):
                if time.monotonic() >= next_sweep:
                    self._sweep_leftovers()
                    next_sweep = time.monotonic() + self.sweep_every_s
                try:
                    lines = follower.poll()
                except OSError as e:
                    log.warning("prefix store: cannot read the change journal %s: %s", follower.jdir, e)
                    continue
                for line in lines:
                    if not self._notify_foreign(line):
                        follower.lost = True  # (a line cut short by a full disk: that change was missed)
                if follower.lost:  # changes were missed: subscribers drop what they cached
                    follower.lost = False
                    self._notify_resync()
        finally:
            follower.close()

    def close(self) -> None:
        with self._follower_lock:
            super().close()
            self._stop.set()
            thread, self._follower_thread = self._follower_thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
