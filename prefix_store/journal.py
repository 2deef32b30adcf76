"""The file store's change journal: how other processes sharing a store directory learn of puts and deletes.

What Redis pub/sub is for the Redis backend. Layout, under the store root::

    <root>/@changes/<N>     segment N: one line (JSON) per change, appended with O_APPEND in one write
    <root>/@changes/lock    flock(2): writers hold it shared while they append, a rotation holds it exclusive

Writers append to the highest segment. Past ``max_bytes`` a writer starts segment N+1 (exclusive lock) and removes
the segments below N. Because appends hold the lock shared, once segment N+1 exists segment N is final: a follower
that sees N+1 reads N to its end and then follows N+1 from its start, so it misses no line across rotations. A
follower more than one whole segment behind (megabytes of changes between two polls) has lost lines: it says so
and goes on from the oldest segment left. A journal that is replaced under a follower (a store directory restored
from a backup or recreated: the segment it reads is gone, another file, or written over in place — shorter than
what was read, or with other first bytes) is followed again from its end. Either way
the follower sets `lost`, and the store tells its subscribers to drop what they cached ("resync": a restored store
numbers versions again from its backup's, so a cached version number may now name other tensors).

The journal is for live notification only: not fsynced, never replayed; a follower starts at its end.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("prefix_store")

LOCK = "lock"
HEAD_BYTES = 256  # a segment's first bytes, kept by a follower: written over in place, they differ


def _segments(jdir: Path) -> list[int]:
    try:
        return sorted(int(e) for e in os.listdir(jdir) if e.isdigit())
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def _flock(jdir: Path, mode: int) -> Iterator[None]:
    fd = os.open(jdir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)


def _first_segment(jdir: Path) -> int:
    """The highest segment, creating the journal (segment 1) if there is none yet."""
    jdir.mkdir(exist_ok=True)  # not its parents: a store root that is gone (a restore) is not made again here
    segs = _segments(jdir)
    if segs:
        return segs[-1]
    with _flock(jdir, fcntl.LOCK_EX):
        segs = _segments(jdir)
        if not segs:
            os.close(os.open(jdir / "1", os.O_WRONLY | os.O_CREAT, 0o600))
            return 1
        return segs[-1]


def append(jdir: Path, line: bytes, max_bytes: int) -> None:
    """Append one line (ending in a newline) to the journal in `jdir`; rotate past `max_bytes`. Raises OSError."""
    _first_segment(jdir)
    with _flock(jdir, fcntl.LOCK_SH):
        seg = _segments(jdir)[-1]  # the current one: no rotation runs while we hold the lock shared
        fd = os.open(jdir / str(seg), os.O_RDWR | os.O_APPEND)
        try:
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                # an earlier line cut short (a full disk): ended here, or this one would be read as part of it
                line = b"\n" + line
            written = os.write(fd, line)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    if written < len(line):
        raise OSError(errno.ENOSPC, f"the change journal took {written} of the line's {len(line)} bytes")
    if size <= max_bytes:
        return
    with _flock(jdir, fcntl.LOCK_EX):
        segs = _segments(jdir)
        if segs[-1] != seg:  # another writer rotated first
            return
        os.close(os.open(jdir / str(seg + 1), os.O_WRONLY | os.O_CREAT, 0o600))
        for old in segs:
            if old < seg:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(jdir / str(old))


class Follower:
    """Reads the lines appended to the journal since it was created, in order, across rotations."""

    def __init__(self, jdir: Path) -> None:
        self.jdir = jdir
        self._seg = 0
        self._fd: int | None = None
        self._partial = b""
        self._head = b""  # the first HEAD_BYTES of the segment being read, as read
        self.lost = False  # set when lines were missed (rotated past, or the journal was replaced); the reader clears it
        # the journal was replaced: it is not created again here, only followed once it is back
        self._gone = False
        self._start()

    def _start(self) -> None:
        try:
            if self._gone:
                # never create it: a restore is writing the directory (`cp -a backup root` needs it absent)
                segs = _segments(self.jdir)
                if not segs:
                    return
                seg = segs[-1]
            else:
                seg = _first_segment(self.jdir)
            self._switch(os.open(self.jdir / str(seg), os.O_RDONLY), seg)
        except OSError as e:  # the root is not usable yet: tried again at the next poll
            log.debug("change journal %s not readable yet: %s", self.jdir, e)
            return
        assert self._fd is not None
        os.lseek(self._fd, 0, os.SEEK_END)
        if self._gone:  # what was cached between the replacement and now may be stale too: a second resync
            self._gone = False
            self.lost = True

    def _switch(self, fd: int, seg: int) -> None:
        self.close()
        self._fd, self._seg, self._partial = fd, seg, b""
        self._head = os.pread(fd, HEAD_BYTES, 0)

    def _drain(self) -> list[bytes]:
        assert self._fd is not None
        chunks = [self._partial]
        while chunk := os.read(self._fd, 1 << 16):
            chunks.append(chunk)
        *lines, self._partial = b"".join(chunks).split(b"\n")
        if len(self._head) < HEAD_BYTES:  # (a segment that was short when it was opened)
            self._head = os.pread(self._fd, HEAD_BYTES, 0)
        return [ln for ln in lines if ln]

    def _replaced(self) -> bool:
        """Whether the segment being read is no longer the journal's: gone with no next segment to go on with, or
        another file under its name."""
        assert self._fd is not None
        try:
            st = os.stat(self.jdir / str(self._seg))
        except FileNotFoundError:
            # a rotation removes a segment only once two newer ones exist: the next one is there to go on with
            return not any(s > self._seg for s in _segments(self.jdir))
        mine = os.fstat(self._fd)
        # another file, or this one written over in place (a restore: `cp` over it, `rsync --inplace`): cut shorter
        # than what was read, or its first bytes other than they were
        return (
            (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev)
            or mine.st_size < os.lseek(self._fd, 0, os.SEEK_CUR)
            or os.pread(self._fd, len(self._head), 0) != self._head
        )

    def poll(self) -> list[bytes]:
        """The complete lines written since the last poll, in order. Raises OSError."""
        if self._fd is None:
            self._start()
            return []
        if self._replaced():
            log.warning(
                "prefix store: the change journal %s was replaced (a store directory restored or recreated); "
                "following it from its end, every cached prefix dropped",
                self.jdir,
            )
            self.close()
            self.lost = self._gone = True
            self._start()  # if it is back already; else at a later poll
            return []
        lines = self._drain()
        while True:
            try:
                fd = os.open(self.jdir / str(self._seg + 1), os.O_RDONLY)
            except FileNotFoundError:
                later = [s for s in _segments(self.jdir) if s > self._seg + 1]
                if not later:
                    return lines
                log.warning(
                    "prefix store: the change journal %s rotated past this reader (segment %d to %d); changes "
                    "in between were missed: every cached prefix dropped",
                    self.jdir,
                    self._seg,
                    later[0],
                )
                self.lost = True
                fd, nxt = os.open(self.jdir / str(later[0]), os.O_RDONLY), later[0]
            else:
                nxt = self._seg + 1
                lines += self._drain()  # the next segment exists, so this one is final: read it to its end
            self._switch(fd, nxt)
            lines += self._drain()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
