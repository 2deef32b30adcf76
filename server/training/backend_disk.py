"""Training jobs on disk (one host): a directory next to the file prefix store.

Layout (``<root>``: e.g. ``/var/lib/prefixserve.jobs``)::

    records/<job_id>.json     the JobRecord (written atomically: temp file, fsync, rename)
    examples/<job_id>.json    the examples (deleted when the job ends)
    locks/<job_id>.lock       flock-ed by the worker running the job for as long as it runs
    queue/<stamp>-<job_id>~<tenant>  marker of a queued job (by name, within the tenants' turns: `claim`); stamp:
                              when it was queued (µs), or after the latest marker there if that is later
    served/<tenant>           its mtime: when a job of the tenant last started (fair turns), or just after the
                              latest such stamp (``served/@latest``'s mtime) if that is later: a clock that
                              steps back must not make the tenant served after the step look served least
    running/<job_id>          marker of a running job (what the reclaimer scans)
    active/<tenant>/<job_id>  queued or running jobs of a tenant (the per-tenant limit)
    cancel/<job_id>           exists once a cancel was requested (the trainer stats it every step)
    idempotency/<tenant>/<h>  the job_id submitted with Idempotency-Key k (h = sha256(k)); kept IDEMPOTENCY_TTL_S
    submit.lock               serializes the per-tenant limit and Idempotency-Key checks with the creation

Ownership: a worker claims a job by taking a non-blocking ``flock`` on its lock file and keeps it until the job
ends; the kernel drops the lock when the process dies (SIGKILL included). So "status running and the lock is free"
means the worker died: any worker's reclaimer (at start-up and every few seconds) puts such a job back in the queue
(or fails it with the reason once it has been started ``max_attempts`` times). A worker that is alive but whose
heartbeat stopped for ``stale_after_s`` (hung) gets its job failed with the reason; its late writes are refused.
flock is per host: run workers of one job directory on one machine (use Redis for several machines).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefix_store.errors import StoreUnavailable
from prefix_store.urls import file_url
from server.fsutil import TMP_PREFIX, write_atomic
from server.training.records import (
    ACTIVE,
    IDEMPOTENCY_TTL_S,
    RETENTION_S,
    UNDECIDED,
    JobRecord,
    TooManyJobs,
    found_stored,
    idempotency_slot,
    stored_by_dead_worker,
    trimmable,
)

log = logging.getLogger("prefixserve.training.jobs")


class LostClaim(RuntimeError):
    """The job is no longer this worker's (reclaimed or failed by another worker)."""


@dataclass
class DiskClaim:
    record: JobRecord
    examples: list[dict[str, str]]
    worker_id: str
    fd: int


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8"):
        pass


STALE_CONFIRM_S = 5.0  # a hung worker's stale heartbeat is confirmed this long later before its job is failed
_DIRS = ("records", "examples", "locks", "queue", "running", "active", "cancel", "idempotency", "served")


def _marker_job(name: str) -> tuple[str, str | None]:
    """(job id, tenant) of a queue marker's name (a marker written before tenants took turns names no tenant)."""
    rest = name.split("-", 1)[1] if "-" in name else name
    job_id, _, tenant = rest.partition("~")
    return job_id, tenant or None


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class DiskJobBackend:
    kind = "disk"

    def __init__(self, root: str | os.PathLike[str], *, max_attempts: int = 2, stale_after_s: float = 60.0,
                 retention_s: float = RETENTION_S) -> None:  # fmt: skip
        self.root = Path(root).expanduser().absolute()
        self.url = file_url(self.root)
        self.max_attempts = max_attempts
        self.stale_after_s = stale_after_s
        self.retention_s = retention_s
        # set by the JobManager: the prefix version a job stored, if any (None: none; may raise: the store is down)
        self.stored_version: Callable[[JobRecord], Any] | None = None
        self._index: dict[
            str, tuple[int, int, str, str]
        ] = {}  # `_scan`'s last answer (replaced whole, never edited)
        self._dirs = {n: self.root / n for n in _DIRS}
        # when this process last saw the records' folder become writable again after it could not write there
        # (a full disk): no worker could heartbeat meanwhile, so staleness is measured from then (0: always was)
        self._writable_since: float | None = 0.0
        # job id -> (its heartbeat, when this process first saw it and first found it stale, monotonic): failed
        # only if a pass at least `stale_confirm_s` after it was found stale finds the same heartbeat (one that
        # could not be written through a full disk lands within a heartbeat once it clears, and this process may
        # not have been looking while it was full); a heartbeat watched standing still for `stale_after_s` is
        # stale whatever the wall clock says (`_hung`)
        self._stale_seen: dict[str, tuple[float, float, float | None]] = {}
        self.stale_confirm_s = STALE_CONFIRM_S
        try:
            for d in self._dirs.values():
                d.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # reported by ping()/submit
            log.warning("job directory %s is not usable: %s", self.root, e)

    def __repr__(self) -> str:
        return f"DiskJobBackend({str(self.root)!r})"

    # ------------------------------------------------------------------------------------------ paths
    def _record(self, job_id: str) -> Path:
        return self._dirs["records"] / f"{job_id}.json"

    def _examples(self, job_id: str) -> Path:
        return self._dirs["examples"] / f"{job_id}.json"

    def _lock(self, job_id: str) -> Path:
        return self._dirs["locks"] / f"{job_id}.lock"

    def _cancel(self, job_id: str) -> Path:
        return self._dirs["cancel"] / job_id

    def _running(self, job_id: str) -> Path:
        return self._dirs["running"] / job_id

    def _active(self, tenant_id: str, job_id: str) -> Path:
        return self._dirs["active"] / tenant_id / job_id

    def _idempotency(self, tenant_id: str, key: str) -> Path:
        return self._dirs["idempotency"] / tenant_id / idempotency_slot(key)

    @contextlib.contextmanager
    def _errors(self, what: str):
        try:
            yield
        except OSError as e:
            raise StoreUnavailable(f"job directory {self.root}: cannot {what}: {e}") from e

    def _read(self, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.from_json(self._record(job_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            log.warning("unreadable job record %s: %s", job_id, e)
            return None

    def _write(self, rec: JobRecord) -> None:
        write_atomic(self._record(rec.job_id), rec.to_json())

    def _set_aside(self, job_id: str) -> None:
        """Move an unreadable record out of the way (kept as `<id>.json.unreadable` for a person to look at): the job
        is gone, and `_requeue_orphans` then frees its tenant's slot and its files, as for a record never written."""
        path = self._record(job_id)
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".unreadable"))
            log.error("job %s: its record is unreadable (torn by a crash?): set aside as %s.unreadable", job_id,
                      path.name)  # fmt: skip

    def _trylock(self, job_id: str) -> int | None:
        fd = os.open(self._lock(job_id), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)

    @contextlib.contextmanager
    def _submit_lock(self):
        """Held while a job is created, and by what must not run beside a creation (orphan and key clean-up)."""
        fd = os.open(self.root / "submit.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            self._unlock(fd)

    def _let_go(self, claim: DiskClaim) -> None:
        """Release the claim's lock, once (a descriptor closed twice could be another job's lock by then)."""
        fd, claim.fd = claim.fd, -1
        if fd >= 0:
            self._unlock(fd)

    def _enqueue(self, rec: JobRecord) -> None:
        # named by when it was queued, and after every marker there: a clock stepped back (NTP, a VM restored)
        # would put a job queued now before those queued earlier
        queue = self._dirs["queue"]
        stamp = int(time.time() * 1e6)
        with contextlib.suppress(OSError):
            stamps = [int(m.name[:20]) for m in queue.iterdir() if m.name[:20].isdigit()]
            stamp = max([stamp, *(s + 1 for s in stamps)])
        _touch(queue / f"{stamp:020d}-{rec.job_id}~{rec.tenant_id}")

    def _serve(self, tenant_id: str) -> None:
        """Stamp the tenant's last start, for the turn order: now, or just after the latest stamp if that is later
        (a clock stepped back made the tenant served after the step look served least recently, and it took every
        claim for the length of the step). The latest is ``served/@latest``'s mtime (no tenant id holds a '@')."""
        latest = self._dirs["served"] / "@latest"
        stamp = time.time()
        with contextlib.suppress(OSError):
            stamp = max(stamp, latest.stat().st_mtime + 1e-3)
        for path in (self._dirs["served"] / tenant_id, latest):
            _touch(path)
            os.utime(path, (stamp, stamp))

    def _turns(self, tenants: set[str]) -> dict[str, tuple[int, float]]:
        """Each tenant's place in the turn order: (its running jobs, when its last job started); lower goes first."""
        running: dict[str, int] = {}
        for marker in self._dirs["running"].iterdir():
            rec = self._read(marker.name)
            if rec is not None and rec.tenant_id in tenants:
                running[rec.tenant_id] = running.get(rec.tenant_id, 0) + 1
        out = {}
        for t in tenants:
            try:
                last = (self._dirs["served"] / t).stat().st_mtime
            except FileNotFoundError:
                last = 0.0
            out[t] = (running.get(t, 0), last)
        return out

    def _end(self, rec: JobRecord) -> None:
        """Bookkeeping of a job that reached a terminal status (its record already written)."""
        _unlink(self._active(rec.tenant_id, rec.job_id))
        _unlink(self._running(rec.job_id))
        _unlink(self._examples(rec.job_id))
        _unlink(self._cancel(rec.job_id))

    # ------------------------------------------------------------------------------------------ API side
    def ping(self) -> None:
        with self._errors("write"):
            probe = self.root / f".ping-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()

    def _submitted(self, tenant_id: str, key: str) -> JobRecord | None:
        """The job a submission with this Idempotency-Key created, while it is remembered."""
        path = self._idempotency(tenant_id, key)
        try:
            if time.time() - path.stat().st_mtime > IDEMPOTENCY_TTL_S:
                return None
            job_id = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        rec = self._read(job_id) if job_id else None
        return rec if rec is not None and rec.tenant_id == tenant_id else None

    def find_submitted(self, tenant_id: str, key: str) -> JobRecord | None:
        with self._errors("read the job"):
            return self._submitted(tenant_id, key)

    def create(self, rec: JobRecord, examples: list[dict[str, str]], max_active: int) -> JobRecord:
        """Queue ``rec`` and return it; or, when a job was already submitted with ``rec.idempotency_key``, return
        that job and create nothing."""
        with self._errors("create the job"):
            tdir = self._dirs["active"] / rec.tenant_id
            tdir.mkdir(parents=True, exist_ok=True)
            with self._submit_lock():
                if rec.idempotency_key is not None:
                    earlier = self._submitted(rec.tenant_id, rec.idempotency_key)
                    if earlier is not None:
                        return earlier
                active = [p.name for p in tdir.iterdir()]
                if len(active) >= max_active:
                    raise TooManyJobs(
                        f"tenant {rec.tenant_id!r} already has {len(active)} queued or running training jobs "
                        f"(max {max_active}); wait for one to finish or cancel one"
                    )
                key = rec.idempotency_key
                slot = None if key is None else self._idempotency(rec.tenant_id, key)
                # The order is what a crash between two steps leaves: the key first (pointing to no record it
                # means nothing), the record last but for the queue marker (a record is a job: its key answers
                # with it, and the reclaimer enqueues it or drops the leftovers of one never written).
                try:
                    if slot is not None:
                        slot.parent.mkdir(parents=True, exist_ok=True)
                        write_atomic(slot, rec.job_id)
                    write_atomic(self._examples(rec.job_id), json.dumps(examples))
                    _touch(self._active(rec.tenant_id, rec.job_id))
                    self._write(rec)
                    self._enqueue(rec)
                except OSError:  # refused (the caller answers 503): leave nothing behind
                    written = (slot, self._active(rec.tenant_id, rec.job_id), self._record(rec.job_id),
                               self._examples(rec.job_id))  # fmt: skip
                    for path in written:
                        if path is not None:
                            with contextlib.suppress(OSError):
                                _unlink(path)
                    raise
                return rec

    def get(self, job_id: str) -> JobRecord | None:
        with self._errors("read the job"):
            rec = self._read(job_id)
            if rec is not None and rec.status == "running" and self._cancel(job_id).exists():
                rec.cancel_requested = True
            return rec

    def _scan(self) -> dict[str, tuple[int, int, str, str]]:
        """job id -> (inode, mtime_ns, tenant, status) of every record: a record is read again only when its file
        changed, so listing one tenant's jobs, or counting them by status for /metrics, costs a directory scan and
        not a read of every tenant's every record (days of finished jobs)."""
        seen: dict[str, tuple[int, int, str, str]] = {}
        index = self._index
        with os.scandir(self._dirs["records"]) as entries:
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                job_id = entry.name[: -len(".json")]
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                hit = index.get(job_id)
                # (every write is a new file: a rename of a fresh temporary one, so its inode tells a rewrite too)
                if hit is None or hit[:2] != (st.st_ino, st.st_mtime_ns):
                    rec = self._read(job_id)
                    if rec is None:
                        continue
                    hit = (st.st_ino, st.st_mtime_ns, rec.tenant_id, rec.status)
                seen[job_id] = hit
        self._index = seen
        return seen

    def list(self, tenant_id: str | None = None) -> list[JobRecord]:
        out = []
        with self._errors("list jobs"):
            for job_id, (_, _, tenant, _) in self._scan().items():
                if tenant_id is None or tenant == tenant_id:
                    rec = self._read(job_id)
                    if rec is not None and (tenant_id is None or rec.tenant_id == tenant_id):
                        out.append(rec)
        out.sort(key=lambda r: (r.created, r.job_id))
        return out

    def counts(self) -> dict[str, int]:
        """Jobs by status (from the scan: no record read unless it changed)."""
        out: dict[str, int] = {}
        with self._errors("count jobs"):
            for _, _, _, status in self._scan().values():
                out[status] = out.get(status, 0) + 1
        return out

    def cancel(self, job_id: str) -> JobRecord | None:
        with self._errors("cancel the job"):
            rec = self._read(job_id)
            if rec is None or rec.terminal:
                return rec
            fd = self._trylock(job_id)
            if fd is None:  # a worker holds it: it is (about to be) running; flag it
                _touch(self._cancel(job_id))
                rec = self._read(job_id) or rec
                rec.cancel_requested = True
                return rec
            try:
                rec = self._read(job_id)
                if rec is None or rec.terminal:
                    return rec
                if rec.status == "queued":
                    rec.status, rec.finished, rec.cancel_requested = "cancelled", time.time(), True
                    rec.error = "cancelled before it started"
                    # its marker first: a process that dies after it leaves a queued record without one (the
                    # reclaimer enqueues it again) or a final one without one (the reclaimer ends it)
                    self._unqueue(job_id)
                    self._write(rec)
                    self._end(rec)
                else:  # "running" with a free lock: its worker died; the reclaimer ends it cancelled
                    _touch(self._cancel(job_id))
                    rec.cancel_requested = True
                return rec
            finally:
                self._unlock(fd)

    def _unqueue(self, job_id: str) -> None:
        """Remove a job's queue marker (a claim drops the marker of a job no longer queued, but with no worker
        running they piled up, and each claim lists them all)."""
        with contextlib.suppress(OSError):
            for m in self._dirs["queue"].iterdir():
                if _marker_job(m.name)[0] == job_id:
                    _unlink(m)

    def trim(self, tenant_id: str, keep: int) -> int:
        """Delete the tenant's oldest finished jobs past its newest `keep` (once past `keep` by a tenth, so that
        their records are read once in that many submissions), sparing those `trimmable` spares (an
        Idempotency-Key still answers with them); returns how many."""
        with self._errors("delete old jobs"):
            finished = [
                j for j, (_i, _m, t, st) in self._scan().items() if t == tenant_id and st not in ACTIVE
            ]
            if len(finished) <= keep + keep // 10:
                return 0
            recs = [r for j in finished if (r := self._read(j)) is not None and r.terminal]
            old = trimmable(recs, keep, time.time())
            for rec in old:
                _unlink(self._record(rec.job_id))
                _unlink(self._lock(rec.job_id))
            return len(old)

    # ------------------------------------------------------------------------------------------ worker side
    def claim(self, worker_id: str) -> DiskClaim | None:
        """Take a queued job (non-blocking); None if there is none. Tenants take turns: the oldest job of the
        tenant with the fewest running jobs and, among those, the oldest last start (so one tenant's queued jobs,
        up to its limit and each up to training_max_seconds, cannot hold every worker for hours); then by age."""
        with self._errors("claim a job"):
            markers = [(_marker_job(m.name), m) for m in self._dirs["queue"].iterdir()]
            if not markers:
                return None
            turns = self._turns({t for (_j, t), _m in markers if t is not None})
            markers.sort(key=lambda x: (turns.get(x[0][1] or "", (0, 0.0)), x[1].name))
            for (job_id, _tenant), marker in markers:
                fd = self._trylock(job_id)
                if fd is None:
                    continue
                try:
                    rec = self._read(job_id)
                    if rec is None and self._record(job_id).exists():
                        self._set_aside(
                            job_id
                        )  # unreadable (torn): its bookkeeping goes with the next reclaim
                    if rec is None or rec.status != "queued":
                        _unlink(marker)
                        self._unlock(fd)
                        continue
                    try:
                        examples = json.loads(self._examples(job_id).read_text(encoding="utf-8"))
                    except (FileNotFoundError, ValueError) as e:  # (ValueError: bad JSON or UTF-8)
                        # not a failure of the store: this job's own file is gone or torn, and it would stay so;
                        # it fails, and the queue goes on
                        rec.status, rec.finished = "failed", time.time()
                        rec.error = f"its training examples could not be read: {type(e).__name__}: {e}"[:500]
                        _unlink(marker)  # (first, as in `cancel`)
                        self._write(rec)
                        self._end(rec)
                        self._unlock(fd)
                        log.error("job %s: %s", job_id, rec.error)
                        continue
                    now = time.time()
                    rec.status, rec.worker, rec.started, rec.heartbeat = "running", worker_id, now, now
                    rec.error = None  # why an earlier attempt was given back: not an error of this one
                    rec.attempts += 1
                    _touch(self._running(job_id))
                    self._write(rec)
                    _unlink(marker)
                    self._serve(rec.tenant_id)
                except BaseException:
                    self._unlock(fd)
                    raise
                return DiskClaim(rec, examples, worker_id, fd)
        return None

    def cancel_requested(self, claim: DiskClaim) -> bool:
        return self._cancel(claim.record.job_id).exists()

    def heartbeat(self, claim: DiskClaim, progress: dict[str, Any] | None) -> bool:
        """Record a sign of life (and the latest progress); returns whether a cancel was requested."""
        with self._errors("heartbeat"):
            cur = self._read(claim.record.job_id)
            if cur is None or cur.status != "running" or cur.worker != claim.worker_id:
                raise LostClaim(f"job {claim.record.job_id} is no longer run by {claim.worker_id}")
            rec = claim.record
            rec.heartbeat = time.time()
            if progress is not None:
                rec.progress = dict(progress)
            self._write(rec)
            return self._cancel(rec.job_id).exists()

    def owns(self, claim: DiskClaim) -> bool:
        cur = self._read(claim.record.job_id)
        return cur is not None and cur.status == "running" and cur.worker == claim.worker_id

    def finish(self, claim: DiskClaim, status: str, **fields: Any) -> JobRecord:
        """End the job (terminal status) and release it. Raises LostClaim if it was taken away meanwhile."""
        try:
            with self._errors("finish the job"):
                if not self.owns(claim):
                    raise LostClaim(f"job {claim.record.job_id} is no longer run by {claim.worker_id}")
                rec = claim.record
                rec.status, rec.finished = status, time.time()
                for k, v in fields.items():
                    setattr(rec, k, v)
                if status == "cancelled":
                    rec.cancel_requested = True
                self._write(rec)
                self._end(rec)
                return rec
        finally:
            self._let_go(claim)

    def requeue(self, claim: DiskClaim, reason: str) -> None:
        """Give a running job back to the queue without counting the attempt (worker shutting down)."""
        try:
            with self._errors("requeue the job"):
                if not self.owns(claim):
                    return
                rec = claim.record
                rec.status, rec.worker, rec.started, rec.heartbeat = "queued", None, None, None
                rec.attempts = max(0, rec.attempts - 1)
                rec.progress = {"step": 0, "total_steps": None, "loss": None, "epoch": 0}
                rec.error = reason
                self._write(rec)
                _unlink(self._running(rec.job_id))
                self._enqueue(rec)
        finally:
            self._let_go(claim)

    def release(self, claim: DiskClaim) -> None:
        """Let go of a claim without touching the record (it was taken over)."""
        self._let_go(claim)

    def _requeue_orphans(self) -> builtins.list[str]:
        """Queued jobs without a queue marker (the submitting process died between writing the record and the
        marker; its client got no answer, but the job holds a slot of the tenant's limit and its Idempotency-Key
        answers with it): give them their marker. A tenant's active entry without a record (it died before the
        record) is dropped, and so is the bookkeeping of a job whose final record was written by a process that
        died before `_end` (its entry held one of the tenant's slots until the record was pruned, days later); a
        running job with neither a worker nor its running marker is recovered as a dead worker's.
        Under the submit lock, so no creation is in progress, and each job's lock, so no claim is."""
        found: list[str] = []
        with self._submit_lock():
            queued = {_marker_job(m.name)[0] for m in self._dirs["queue"].iterdir()}
            for entry in self._dirs["active"].glob("*/*"):
                job_id = entry.name
                if job_id in queued or self._running(job_id).exists():
                    continue
                fd = self._trylock(job_id)
                if fd is None:  # a worker holds it
                    continue
                try:
                    rec = self._read(job_id)
                    if rec is None and not self._record(job_id).exists():  # its record was never written
                        _unlink(entry)
                        _unlink(self._examples(job_id))
                        _unlink(self._lock(job_id))  # the lock file taking it made (held: no one else can)
                        log.warning("job %s: a submission that died before its record; cleared", job_id)
                    elif rec is not None and rec.status == "queued":
                        self._enqueue(rec)
                        found.append(job_id)
                        log.warning(
                            "job %s: queued without a queue marker (its submitter died); enqueued", job_id
                        )
                    elif rec is not None and rec.terminal:
                        self._end(rec)
                        found.append(job_id)
                    elif rec is not None and rec.status == "running":
                        # its worker is gone (the lock is free) and so is its running marker, which the reclaimer
                        # looks for: markers are not fsynced, a power cut can take one the record outlived
                        log.warning("job %s: running without a running marker or a worker", job_id)
                        self._recover(rec)
                        found.append(job_id)
                        log.warning("job %s: %s, its process died before clearing its slot; cleared", job_id,
                                    rec.status)  # fmt: skip
                finally:
                    self._unlock(fd)
        return found

    def reclaim_stale(self) -> builtins.list[str]:
        """Requeue or fail the running jobs whose worker died (lock free) or hung (no heartbeat); enqueue queued
        jobs whose submitter died before their queue marker."""
        touched: list[str] = []
        if not self._records_writable():
            return touched  # (no heartbeat can be written now: none is judged stale)
        try:
            touched += self._requeue_orphans()
            markers = list(self._dirs["running"].iterdir())
        except OSError:
            return touched
        running = {m.name for m in markers}
        for gone in [j for j in self._stale_seen if j not in running]:
            del self._stale_seen[gone]
        for marker in markers:
            job_id = marker.name
            fd = self._trylock(job_id)
            if fd is None:
                rec = self._read(job_id)
                if (
                    rec is not None
                    and rec.status == "running"
                    and rec.heartbeat is not None
                    and self._hung(job_id, rec.heartbeat)
                    and not self._found_stored(rec)
                ):
                    rec.status, rec.finished = "failed", time.time()
                    # (the error is the tenant's to read: the worker's name, its host and pid, goes to the log)
                    rec.error = (
                        f"its worker stopped heartbeating ({self._silent_s(job_id, rec.heartbeat):.0f}s "
                        f"> {self.stale_after_s:g}s) while holding the job; marked failed"
                    )
                    self._stale_seen.pop(job_id, None)
                    self._write(rec)
                    self._end(rec)
                    touched.append(job_id)
                    log.warning("job %s (worker %s): %s", job_id, rec.worker, rec.error)
                elif rec is not None and rec.status == "succeeded":
                    touched.append(job_id)
                continue
            try:
                rec = self._read(job_id)
                if rec is None or rec.status != "running":
                    _unlink(marker)  # (a final record's other bookkeeping: `_requeue_orphans`, next pass)
                    continue
                touched.append(job_id)
                self._recover(rec)
            finally:
                self._unlock(fd)
        return touched

    def _hung(self, job_id: str, heartbeat: float) -> bool:
        """Whether the worker holding a job has hung: its heartbeat is older than `stale_after_s` by the wall clock
        (counted from when records could be written again, `_writable_since`) or by how long this process has
        watched it stand still (a wall clock stepped back after the heartbeat, or a worker's clock ahead of this
        host's, kept its age negative, and a hung worker its job, for the step), and a pass `stale_confirm_s`
        after this process first found it so still finds it."""
        now = time.monotonic()
        seen = self._stale_seen.get(job_id)
        if seen is None or seen[0] != heartbeat:
            self._stale_seen[job_id] = seen = (heartbeat, now, None)
        if self._silent_s(job_id, heartbeat) <= self.stale_after_s:
            return False
        if seen[2] is None:  # first found stale now: confirmed by a pass `stale_confirm_s` later
            self._stale_seen[job_id] = (heartbeat, seen[1], now)
            return self.stale_confirm_s <= 0
        return now - seen[2] >= self.stale_confirm_s

    def _silent_s(self, job_id: str, heartbeat: float) -> float:
        """How long a job's heartbeat has stood still: by the wall clock from it (or from when records could be
        written again), and at least as long as this process has watched it stand still."""
        seen = self._stale_seen.get(job_id)
        watched = time.monotonic() - seen[1] if seen is not None and seen[0] == heartbeat else 0.0
        return max(time.time() - max(heartbeat, self._writable_since or 0.0), watched)

    def _records_writable(self) -> bool:
        """Whether a record can be written now (a probe file in the records' folder); notes when it could not and
        can again, from which a worker's heartbeat is given `stale_after_s` more (it was failed by another worker
        the moment a disk full for longer than that had room again, before its next heartbeat could land)."""
        probe = (
            self._dirs["records"] / f"{TMP_PREFIX}probe-{os.getpid()}-{threading.get_ident()}"
        )  # (left by a crash: pruned)
        try:
            with open(probe, "wb") as f:
                f.write(b"x" * 64)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if self._writable_since is not None:
                log.warning("job records at %s cannot be written (%s): no job is judged stale until they can",
                            self._dirs["records"], e)  # fmt: skip
            self._writable_since = None
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        if self._writable_since is None:
            self._writable_since = time.time()
            self._stale_seen.clear()  # (heartbeats could not land meanwhile: each is watched anew from now)
            log.info("job records at %s can be written again", self._dirs["records"])
        return True

    def _found_stored(self, rec: JobRecord) -> bool:
        """End a running job whose worker is gone or hung as succeeded if a run of it stored its prefix (a cancel
        or its last attempt must not end it as cancelled or failed while its prefix is visible). True if it was
        ended so, or if the store cannot say now (the job is left as it is, for a later pass)."""
        meta = stored_by_dead_worker(self.stored_version, rec)
        if meta is UNDECIDED:
            return True
        if meta is None:
            return False
        for k, v in found_stored(rec, meta.version, meta.training).items():
            setattr(rec, k, v)
        self._write(rec)
        self._end(rec)
        return True

    def _recover(self, rec: JobRecord) -> None:
        dead = rec.worker
        ending = self._cancel(rec.job_id).exists() or rec.attempts >= self.max_attempts
        if ending and self._found_stored(rec):
            return
        if self._cancel(rec.job_id).exists():
            rec.status, rec.finished, rec.cancel_requested = "cancelled", time.time(), True
            rec.error = "cancelled; its worker died"
        elif rec.attempts >= self.max_attempts:
            rec.status, rec.finished = "failed", time.time()
            rec.error = (
                f"its worker died while running the job (attempt {rec.attempts} of {self.max_attempts}); "
                "giving up"
            )
        else:
            rec.status, rec.worker, rec.started, rec.heartbeat = "queued", None, None, None
            rec.progress = {"step": 0, "total_steps": None, "loss": None, "epoch": 0}
            rec.error = f"its worker died during attempt {rec.attempts}; requeued"
            self._write(rec)
            _unlink(self._running(rec.job_id))
            self._enqueue(rec)
            log.warning("job %s (worker %s): %s", rec.job_id, dead, rec.error)
            return
        self._write(rec)
        self._end(rec)
        log.warning("job %s (worker %s): %s", rec.job_id, dead, rec.error)

    def prune(self) -> int:
        """Delete terminal jobs older than the retention period (returns how many) and forget Idempotency-Keys
        older than IDEMPOTENCY_TTL_S or whose job is gone."""
        n = 0
        if self.retention_s > 0:
            cutoff = time.time() - self.retention_s
            for p in self._dirs["records"].glob("*.json"):
                rec = self._read(p.stem)
                if rec is not None and rec.status not in ACTIVE and (rec.finished or rec.created) < cutoff:
                    _unlink(p)
                    _unlink(self._lock(rec.job_id))
                    n += 1
        # the temporary files of writes that died (a write takes well under a minute)
        old_tmp = time.time() - 3600
        for d in (self._dirs["records"], self._dirs["examples"], *self._dirs["idempotency"].glob("*")):
            # (".<name>.<random>.tmp": older builds' writes)
            for tmp in itertools.chain(d.glob(f"{TMP_PREFIX}*"), d.glob(".*.tmp")):
                with contextlib.suppress(OSError):
                    if tmp.stat().st_mtime < old_tmp:
                        tmp.unlink()
        # no submission writes a key meanwhile
        with self._submit_lock():
            for slot in self._dirs["idempotency"].glob("*/*"):
                if slot.name.startswith("."):  # the temporary file of a write that died
                    continue
                with contextlib.suppress(OSError):
                    old = time.time() - slot.stat().st_mtime > IDEMPOTENCY_TTL_S
                    if old or not self._record(slot.read_text(encoding="utf-8").strip()).exists():
                        _unlink(slot)
        return n

    def close(self) -> None:
        return None
