"""Durable training jobs: submit, list, cancel; workers inside the server (threads) or in separate processes.

    jm = JobManager(bundle, store)                 # jobs next to the store: Redis if the store is redis://, else disk
    jm.start()                                     # in-process workers (default 1 thread)
    rec = jm.submit({"tenant_id": "acme", "name": "support", "method": "prefix_tuning", "examples": [...]})
    jm.get(rec.job_id).status                      # queued -> running -> succeeded | failed | cancelled
    jm.cancel(rec.job_id)                          # stops within one optimizer step; nothing is written
    jm.shutdown()                                  # running jobs go back to the queue for the next worker

On success the prefix is written with ``store.put`` (kind = method, the compiled ``kv`` + the trained tensors, the
training summary, ``extra={"prompt_format": ...}``) and only then is the job marked ``succeeded`` with the
``prefix_version``: the prefix becomes visible exactly when the job succeeds. Failure or cancel writes nothing.

Backends: ``backend_redis`` (a Stream + consumer group; XAUTOCLAIM takes over jobs of dead workers) and
``backend_disk`` (one JSON per job, flock ownership; dead workers' jobs are reclaimed by any worker).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from prefix_store.errors import InvalidPrefix, PrefixNotFound, StoreError, StoreReadOnly, StoreUnavailable
from prefix_store.format import PrefixMeta
from prefix_store.names import is_valid_name
from prefix_store.outage import RepeatedFailure
from prefix_store.urls import file_url
from server.prefixes import TRAINED_KEYS
from server.training.config import (
    InitFromNotFound,
    TrainingCancelled,
    TrainingLimits,
    TrainingValidationError,
    canonical_request,
    check_init_from,
    parse_request,
)
from server.training.data import encode_examples
from server.training.records import (
    ACTIVE,
    RETENTION_S,
    IdempotencyKeyReused,
    JobNotFound,
    JobRecord,
    TooManyJobs,
    final_progress,
    new_job_id,
    request_digest,
)
from server.training.trainer import (
    TrainingDiverged,
    default_train_threads,
    train_prefix,
    trainable_parameter_count,
)

log = logging.getLogger("prefixserve.training.jobs")


class _Shutdown(Exception):
    """The worker is stopping: the job goes back to the queue."""


class _Lost(Exception):
    """Another worker took the job over (we were presumed dead)."""


class _Undecided(Exception):
    """The store could not say whether the trained prefix was stored: the job is left running, to be picked up
    once stale by a run (or the reclaimer) that asks the store again (`JobManager._stored_by`)."""


class _ForeignModel(Exception):
    """The job was submitted for another base model than this worker loaded: it goes back to the queue (the attempt
    not counted) for a worker that loaded that model."""

    def __init__(self, want: str) -> None:
        super().__init__(want)
        self.want = want


# how often a store or job-backend call after training is tried before the run gives up on it
TRANSIENT_ATTEMPTS = 5
# the wait before its first retry, doubled for each further one up to 16 times this (0.5 s, 1 s, 2 s, 4 s, then 8 s)
RETRY_BACKOFF_S = 0.5


def retry_delay(attempt: int) -> float:
    """The wait before retry `attempt + 1` (0-based `attempt`): RETRY_BACKOFF_S doubled per attempt, 16x at most."""
    return RETRY_BACKOFF_S * 2 ** min(attempt, 4)


# once a job is trained its prefix is in memory: the job backend gets this many tries to answer whether the job
# is still this worker's (backing off 0.5 s, 1 s, 2 s, 4 s, then 8 s: about 2 minutes in all) before the run goes on
AFTER_TRAINING_ATTEMPTS = 18
# a worker that gave a job back for another base model waits this long before claiming again, so that a worker
# of that model takes it (a worker of the wrong model alone cannot spin on it)
FOREIGN_BACKOFF_S = 2.0
# a job still given back by workers of other models this long after its submission fails, saying so: no worker of
# its model is running (it would otherwise hold one of its tenant's job slots for good)
FOREIGN_GIVE_UP_S = 900.0
# how far the clocks of the machines running servers and workers may disagree (NTP keeps them far closer): looking
# for the version a job stored goes back this much before the job's submission time
CLOCK_SKEW_S = 3600.0
RECENT_VERSIONS = 16  # a name's newest versions looked at for a job's, whatever their dates
# how often a worker deletes terminal jobs past their retention (and stale Idempotency-Keys): at its first reclaim,
# then this often (a long-lived process used to prune once, so old records piled up and every list read them all)
PRUNE_EVERY_S = 3600.0


def _idempotency_key(job_id: str) -> str:
    """The Idempotency-Key a job stores its prefix under: at most one version per job, however often the put is
    retried or the job re-run (spaces: never an HTTP Idempotency-Key, so no upload can collide with it)."""
    return f"training job {job_id}"


# ------------------------------------------------------------------------------------------------ backends
def jobs_location(store: Any, jobs_url: str | None = None) -> str:
    """Where jobs live: ``jobs_url`` if given, else next to the store (Redis: same server and namespace; disk:
    the sibling directory ``<store root>.jobs``)."""
    if jobs_url:
        return jobs_url
    url = getattr(store, "url", None) or ""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        return url
    root = getattr(store, "root", None)
    if root is None and scheme == "file":
        root = Path(unquote(urlsplit(url).path))
    if root is None:
        raise ValueError(f"cannot place training jobs next to store {store!r}: pass jobs_url")
    root = Path(root)
    return file_url(root.parent / f"{root.name}.jobs")


def open_backend(location: str, *, max_attempts: int, stale_after_s: float, retention_s: float) -> Any:
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        from prefix_store.redis_store import split_url
        from server.training.backend_redis import RedisJobBackend

        client_url, ns = split_url(location)
        return RedisJobBackend(client_url, ns, max_attempts=max_attempts, stale_after_s=stale_after_s,
                               retention_s=retention_s)  # fmt: skip
    from server.training.backend_disk import DiskJobBackend

    if scheme not in (
        "",
        "file",
    ):  # a mistyped scheme would be a folder of that name: a queue no worker reads
        raise ValueError(
            f"unsupported jobs URL {location!r}: use file:///abs/path, a path, or redis://host:port/db"
        )
    path = Path(unquote(parts.path)) if scheme == "file" else Path(location)
    return DiskJobBackend(
        path, max_attempts=max_attempts, stale_after_s=stale_after_s, retention_s=retention_s
    )


def _is_lost(e: BaseException) -> bool:
    return type(e).__name__ == "LostClaim"


# ------------------------------------------------------------------------------------------------ manager
class JobManager:
    """Training jobs of one base model and one prefix store.

    ``in_process_workers`` threads train inside this process (0: only queue jobs, for ``prefixserve worker``
    processes to run). Each job trains with ``train_threads`` intra-op threads (default: half the cores), set on
    the worker thread only, so the serving threads keep theirs; in-process worker threads also run at OS priority
    ``nice +train_nice`` (Linux, per thread) so that serving wins the CPU when both want it. The trade-off: training
    in the server is slower (it gets the cores serving leaves idle); for heavy training run ``prefixserve worker``
    processes (on other machines, or other cores) and set the server's ``training_workers`` to 0.
    """

    def __init__(
        self,
        bundle: Any,
        store: Any,
        *,
        jobs_url: str | None = None,
        in_process_workers: int = 1,
        max_jobs_per_tenant: int = 4,
        limits: TrainingLimits | None = None,
        train_threads: int | None = None,
        heartbeat_s: float = 2.0,
        stale_after_s: float = 30.0,
        max_attempts: int = 2,
        poll_s: float = 0.5,
        retention_s: float = RETENTION_S,
        worker_name: str | None = None,
        train_nice: int = 10,
        jobs_kept_per_tenant: int = 1000,
    ) -> None:
        if stale_after_s <= heartbeat_s:
            raise ValueError("stale_after_s must be larger than heartbeat_s")
        self.bundle = bundle
        self.store = store
        self.limits = limits or TrainingLimits()
        self.in_process_workers = in_process_workers
        self.max_jobs_per_tenant = max_jobs_per_tenant
        self.jobs_kept_per_tenant = jobs_kept_per_tenant
        # tenant -> its submissions here since its jobs were last trimmed
        self._untrimmed: dict[str, int] = {}
        self._read_only_told = False
        self.train_threads = train_threads if train_threads is not None else default_train_threads()
        self.train_nice = train_nice
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.location = jobs_location(store, jobs_url)
        self.backend = open_backend(
            self.location, max_attempts=max_attempts, stale_after_s=stale_after_s, retention_s=retention_s
        )
        # a dead worker's job is ended as cancelled or failed only if it did not store its prefix first
        self.backend.stored_version = self._stored_by
        # host and pid say where it runs; the random part keeps two workers apart even when those are the same
        # (pods of one Deployment differ only at the end of a long name, and all run as pid 1)
        self.worker_name = worker_name or f"{os.uname().nodename[-40:]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        # job_id -> cancel event of the jobs running in this process
        self._running: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._started = False
        self._last_reclaim = 0.0
        self._last_prune: float | None = None  # monotonic time of the last prune (None: not yet)
        # after giving back a job of another base model: no claim before this (monotonic) time
        self._claim_after = 0.0
        self._foreign_logged: set[str] = set()

    def __repr__(self) -> str:
        return f"JobManager({self.backend!r}, workers={self.in_process_workers})"

    # ------------------------------------------------------------------------------------------ API
    def validate(self, request: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Full validation of a request (structure, names, limits, tokenization); returns (spec, hyperparameters)."""
        request = self._resolve_init_from(request)
        spec = parse_request(request, self.limits)
        hp = spec.hyperparameters
        from server.model import default_prompt_format

        self._check_record_size(spec, hp)
        fmt = hp.prompt_format or default_prompt_format(self.bundle)
        try:
            encode_examples(self.bundle, spec.examples, fmt, spec.prefix_length, append_eos=hp.append_eos,
                            limits=self.limits)  # fmt: skip
        except TrainingValidationError as e:
            if e.param == "hyperparameters.prompt_format" and request.get("prompt_format") is not None:
                e.param = "prompt_format"  # (named where it was sent)
            raise
        stored = {**hp.to_dict(), "prompt_format": fmt}
        if not stored["min_steps"]:
            # what a request with its own epochs resolves to anyway; left out, workers from before min_steps
            # existed (which refuse unknown hyperparameters) can still run the job
            del stored["min_steps"]
        return spec, stored

    def _check_record_size(self, spec: Any, hp: Any) -> None:
        """TrainingValidationError when the record the job would store (its KV and trained tensors, float32) is
        over `max_record_bytes`, naming the largest mlp_hidden (prefix_tuning) or prefix_length that fits."""
        most = self.limits.max_record_bytes
        if most is None:
            return
        sp, P = self.bundle.spec, spec.prefix_length
        kv = sp.num_layers * 2 * sp.num_kv_heads * P * sp.head_dim

        def record_bytes(prefix_length: int, mlp_hidden: int) -> int:
            kv_n = kv // P * prefix_length
            return 4 * (kv_n + trainable_parameter_count(spec.method, sp, prefix_length, mlp_hidden))

        need = record_bytes(P, hp.mlp_hidden)
        if need <= most:
            return
        mib = f"{need / 2**20:.0f} MiB, more than the {most / 2**20:.0f} MiB a record may take (max_upload_bytes)"
        if spec.method == "prefix_tuning" and record_bytes(P, 1) <= most:
            per_unit = record_bytes(P, 1) - record_bytes(
                P, 0
            )  # (the record grows linearly with the MLP's width)
            raise TrainingValidationError(
                f"mlp_hidden {hp.mlp_hidden} makes a record of {mib}; at most "
                f"{(most - record_bytes(P, 0)) // per_unit} fits",
                param="hyperparameters.mlp_hidden",
            )
        fits = max((n for n in range(1, P) if record_bytes(n, 1 if spec.method == "prefix_tuning" else 0) <= most),
                   default=0)  # fmt: skip
        raise TrainingValidationError(
            f"a prefix of {P} positions makes a record of {mib}; at most {fits} positions fit",
            param="prefix_length",
        )

    def job_limits(self, rec: JobRecord) -> TrainingLimits:
        """The limits `rec` runs under: those it was accepted with (a record from before they were kept: ours)."""
        return TrainingLimits.from_dict(rec.limits) if rec.limits is not None else self.limits

    def _resolve_init_from(self, request: dict[str, Any]) -> dict[str, Any]:
        """`init_from` pinned to a stored version of the tenant's that this base model can continue: the job takes
        its method, prefix length, prompt format and (prefix-tuning) MLP width unless the request sets them, and
        must agree with them if it does."""
        src = check_init_from(request.get("init_from"))
        tenant = request.get("tenant_id")
        if src is None or not is_valid_name(tenant):  # a bad tenant id is parse_request's to refuse
            return request
        try:
            meta = self.store.servable_meta(tenant, src["name"], src["version"], self.bundle.fingerprint)
        except PrefixNotFound:
            v = "" if src["version"] is None else f" version {src['version']}"
            raise InitFromNotFound(
                f"init_from: prefix {src['name']!r}{v} not found", param="init_from"
            ) from None
        except InvalidPrefix as e:  # its stored metadata is unreadable: nothing to continue from
            raise TrainingValidationError(f"init_from: {e}", param="init_from") from None
        if meta.base_model_fingerprint != self.bundle.fingerprint:
            raise TrainingValidationError(
                f"init_from: {meta.label} was trained for another base model", param="init_from"
            )
        out = dict(request)
        for key, have in (("method", meta.kind), ("prefix_length", meta.prefix_length)):
            if out.get(key) is None:
                out[key] = have
            elif out[key] != have:
                raise TrainingValidationError(
                    f"init_from: {meta.label} has {key} {have!r}, the request {out[key]!r}", param=key
                )
        missing = [k for k in TRAINED_KEYS[meta.kind] if k not in meta.shapes]
        if missing:
            raise TrainingValidationError(
                f"init_from: {meta.label} has no trained tensors to continue from (missing {', '.join(missing)}; a "
                "prefix imported from PEFT or uploaded as served holds only what is needed to serve it)",
                param="init_from",
            )
        hp_given = out.get("hyperparameters") or {}
        inherited = {"prompt_format": (meta.extra or {}).get("prompt_format")}
        if meta.kind == "prefix_tuning":
            inherited["mlp_hidden"] = meta.shapes["mlp.0.weight"][0]
        for key, have in inherited.items():
            if have is None:
                continue
            # (the field is named where it was sent: at the top level or in "hyperparameters")
            param, asked = key, out.get(key)
            if asked is None and isinstance(hp_given, dict) and hp_given.get(key) is not None:
                param, asked = f"hyperparameters.{key}", hp_given[key]
            if asked is None:
                out[key] = have
            elif asked != have:  # what it was trained with is what it continues with
                raise TrainingValidationError(
                    f"init_from: {meta.label} has {key} {have!r}, the request {asked!r}", param=param
                )
        out["init_from"] = {"name": meta.name, "version": meta.version}
        return out

    def submit(self, request: dict[str, Any]) -> JobRecord:
        """Validate and queue a job. Raises TrainingValidationError (bad request), TooManyJobs (tenant limit),
        prefix_store.errors.StoreUnavailable (job backend down)."""
        return self.submit_once(request, None)[0]

    def submit_once(self, request: dict[str, Any], idempotency_key: str | None) -> tuple[JobRecord, bool]:
        """``submit`` that creates at most one job per ``idempotency_key`` (per tenant, while the key is
        remembered: IDEMPOTENCY_TTL_S, or until the job's record is pruned): a repeat of a submission returns the
        job the first one created, with True (replayed). The same key with a different request raises
        IdempotencyKeyReused."""
        digest = request_digest(canonical_request(request)) if idempotency_key is not None else None
        tenant = request.get("tenant_id")
        if idempotency_key is not None and is_valid_name(tenant):
            # a replay answers even if validation would not now (its init_from deleted since, ...)
            earlier = self.backend.find_submitted(tenant, idempotency_key)
            if earlier is not None:
                return self._replayed(earlier, digest), True
        spec, hp = self.validate(request)
        rec = JobRecord(
            job_id=new_job_id(),
            tenant_id=spec.tenant_id,
            name=spec.name,
            method=spec.method,
            prefix_length=spec.prefix_length,
            hyperparameters=hp,
            num_examples=len(spec.examples),
            init_from=spec.init_from,
            limits=self.limits.to_dict(),
            base_model_fingerprint=self.bundle.fingerprint,
            idempotency_key=idempotency_key,
            request_digest=digest,
        )
        stored = self.backend.create(rec, spec.examples, self.max_jobs_per_tenant)
        if stored.job_id != rec.job_id:  # a concurrent submission with the same key won
            return self._replayed(stored, digest), True
        log.info(
            "job %s queued: %s/%s %s P=%d, %d examples",
            rec.job_id, rec.tenant_id, rec.name, rec.method, rec.prefix_length, rec.num_examples,
        )  # fmt: skip
        self._wake.set()
        self._trim(rec.tenant_id)
        return rec, False

    def _trim(self, tenant_id: str) -> None:
        """Delete the tenant's oldest finished jobs past `jobs_kept_per_tenant` (bookkeeping of a submission, once
        in a tenth of that many of the tenant's submissions here: a trim reads every record's status on disk; a
        failure is logged, the submission stands)."""
        with self._lock:
            if len(self._untrimmed) > 10_000:  # (bounded: forgetting a count only puts a trim off)
                self._untrimmed.clear()
            n = self._untrimmed[tenant_id] = self._untrimmed.get(tenant_id, 0) + 1
            if n < max(1, self.jobs_kept_per_tenant // 10):
                return
            self._untrimmed[tenant_id] = 0
        try:
            n = self.backend.trim(tenant_id, self.jobs_kept_per_tenant)
        except Exception as e:
            log.warning("jobs of tenant %s: deleting its oldest finished jobs failed: %s", tenant_id, e)
            return
        if n:
            log.info("jobs of tenant %s: deleted its %d oldest finished jobs (%d kept)", tenant_id, n,
                     self.jobs_kept_per_tenant)  # fmt: skip

    @staticmethod
    def _replayed(earlier: JobRecord, digest: str | None) -> JobRecord:
        if earlier.request_digest != digest:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {earlier.idempotency_key!r} was already used for job {earlier.job_id} with a "
                "different request; use a new key for a new job"
            )
        log.info("job %s: submission replayed (Idempotency-Key %r)", earlier.job_id, earlier.idempotency_key)
        return earlier

    def get(self, job_id: str) -> JobRecord | None:
        rec = self.backend.get(job_id)
        ev = self._running.get(job_id)  # (one read: the worker thread may drop it meanwhile)
        if rec is not None and rec.status == "running" and ev is not None:
            rec.cancel_requested = rec.cancel_requested or ev.is_set()
        return rec

    def list(self, tenant_id: str | None = None) -> list[JobRecord]:
        return self.backend.list(tenant_id)

    def seconds_until_slot(self, tenant_id: str, now: float | None = None) -> float | None:
        """About how long until one of ``tenant_id``'s unfinished jobs ends (the Retry-After of a submission refused
        with TooManyJobs): the soonest estimate among its running jobs, from their pace so far and bounded by their
        time limit; None when none has made a step yet (queued ones wait on other tenants' jobs too). A job's pace
        is read on its worker's clock (start to last heartbeat, which wrote its progress): this server's may differ
        from it (a 30 s skew halved the estimate, a minute's made it 0)."""
        now = time.time() if now is None else now
        soonest: float | None = None
        for rec in self.backend.list(tenant_id):
            if rec.status != "running" or rec.started is None:
                continue
            at = rec.heartbeat if rec.heartbeat is not None else now
            elapsed = max(0.0, at - rec.started)
            step, total = rec.progress.get("step") or 0, rec.progress.get("total_steps") or 0
            left = elapsed / step * max(0, total - step) if step > 0 and total > 0 else None
            max_s = (rec.limits or {}).get("max_seconds")
            if left is not None and isinstance(max_s, (int, float)) and math.isfinite(max_s):
                # the time limit only bounds an estimate: a job at step 0 says nothing of its pace (its limit,
                # an hour by default, would be a poor guess)
                left = min(left, max(0.0, rec.started + max_s - at))
            if left is not None:
                soonest = left if soonest is None else min(soonest, left)
        return soonest

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job at once, a running one within one optimizer step. Raises JobNotFound."""
        ev = self._running.get(job_id)
        if ev is not None:
            ev.set()
        rec = self.backend.cancel(job_id)
        if rec is None:
            raise JobNotFound(f"job {job_id!r} not found")
        return rec

    def ping(self) -> None:
        self.backend.ping()

    def counts(self) -> dict[str, int]:
        if hasattr(self.backend, "counts"):
            return dict(self.backend.counts())
        out: dict[str, int] = {}
        for r in self.list():
            out[r.status] = out.get(r.status, 0) + 1
        return out

    # ------------------------------------------------------------------------------------------ workers
    def start(self) -> None:
        """Start the in-process worker threads (idempotent)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._stop.clear()
            for i in range(self.in_process_workers):
                t = threading.Thread(target=self._in_process_worker, name=f"prefixserve-trainer-{i}",
                                     daemon=True, args=(f"{self.worker_name}-t{i}",))  # fmt: skip
                t.start()
                self._threads.append(t)
        if self.in_process_workers:
            log.info("training: %d in-process worker(s), jobs at %r", self.in_process_workers, self.backend)
        else:
            log.info(
                "training: no in-process workers (training_workers 0): jobs at %r wait for `prefixserve worker` "
                "processes",
                self.backend,
            )

    def _in_process_worker(self, worker_id: str) -> None:
        """A worker thread inside the server: lower its scheduling priority (Linux: per thread) so that under CPU
        contention the engine's threads win; training still gets every idle cycle."""
        if self.train_nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.train_nice)
            except OSError as e:  # not fatal: just no priority drop
                log.debug("could not lower the training thread's priority: %s", e)
        self.work(worker_id)

    @property
    def num_running(self) -> int:
        """Jobs this process's workers are running now."""
        return len(self._running)

    def shutdown(self, wait: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the workers; a running job stops at its next step and goes back to the queue."""
        self._stop.set()
        self._wake.set()
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for t in self._threads:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._started = False
        if wait and not self._threads:
            self.backend.close()

    close = shutdown

    def work(self, worker_id: str | None = None, *, max_jobs: int | None = None,
             stop: threading.Event | None = None) -> int:  # fmt: skip
        """Worker loop: claim and run jobs until ``stop``/shutdown (or ``max_jobs`` ran); returns jobs run."""
        worker_id = worker_id or f"{self.worker_name}-w"
        stop = stop or self._stop
        done = 0
        down = RepeatedFailure(log, f"training worker {worker_id}")
        while not (stop.is_set() or self._stop.is_set()) and (max_jobs is None or done < max_jobs):
            try:
                if self.run_one(worker_id, block_s=self.poll_s, stop=stop):
                    done += 1
            except Exception as e:  # backend down: keep trying, quietly
                down.failed(e)
                stop.wait(min(5.0, max(self.poll_s, 1.0)))
            else:
                if down.recovered():
                    log.warning("training worker %s: the job queue answers again", worker_id)
        return done

    def _maybe_reclaim(self) -> None:
        """Every few seconds: take care of jobs whose worker died (disk; Redis does it in claim). At the first
        call and every PRUNE_EVERY_S also delete terminal jobs past their retention."""
        now = time.monotonic()
        if now - self._last_reclaim < max(1.0, self.heartbeat_s):
            return
        self._last_reclaim = now
        with contextlib.suppress(Exception):
            self.backend.reclaim_stale()
            if self._last_prune is None or now - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = now
                self.backend.prune()

    def run_one(self, worker_id: str, block_s: float = 0.0, stop: threading.Event | None = None) -> bool:
        """Claim one job (waiting up to ``block_s``) and run it to its end; returns whether one ran."""
        stop = stop or self._stop
        self._maybe_reclaim()
        wait = self._claim_after - time.monotonic()
        if wait > 0:
            stop.wait(wait)
            return False
        if self._store_read_only():  # its prefix could not be stored: a worker of a writable store runs it
            stop.wait(max(block_s, 1.0))
            return False
        if self.backend.kind == "redis":
            claim = self.backend.claim(worker_id, block_ms=max(1, int(block_s * 1000)))
        else:
            claim = self.backend.claim(worker_id)
            if claim is None and block_s > 0:
                self._wake.wait(block_s)
                self._wake.clear()
                claim = self.backend.claim(worker_id)
        if claim is None:
            return False
        return self._run(claim, stop)

    def _store_read_only(self) -> bool:
        """Whether the prefix store is read-only (told once in the log, while it is so)."""
        try:
            read_only = bool(self.store.read_only)
        except Exception:
            read_only = False
        if read_only != self._read_only_told:
            self._read_only_told = read_only
            if read_only:
                log.warning("the prefix store is read-only: this process's training workers take no job")
        return read_only

    def _run(self, claim: Any, stop: threading.Event) -> bool:
        """Run a claimed job to its end; False if it was given back unrun (another base model's)."""
        rec: JobRecord = claim.record
        job_id = rec.job_id
        cancel_ev = threading.Event()
        lost_ev = threading.Event()
        self._running[job_id] = cancel_ev
        progress: dict[str, Any] = dict(rec.progress)
        dirty = threading.Event()
        hb_stop = threading.Event()

        def beat() -> None:
            while not hb_stop.wait(self.heartbeat_s if not dirty.is_set() else 0.2):
                try:
                    snap = dict(progress) if dirty.is_set() else None
                    dirty.clear()
                    if self.backend.heartbeat(claim, snap):
                        cancel_ev.set()
                except Exception as e:
                    if _is_lost(e):
                        lost_ev.set()
                        return
                    log.warning("job %s: heartbeat failed: %s", job_id, e)

        hb = threading.Thread(target=beat, name=f"prefixserve-heartbeat-{job_id}", daemon=True)
        hb.start()

        def should_stop() -> bool:
            if stop.is_set() or self._stop.is_set() or lost_ev.is_set() or cancel_ev.is_set():
                return True
            try:  # the cancel flag straight from the backend before every step (one stat / one HGET)
                if self.backend.cancel_requested(claim):
                    cancel_ev.set()
            except Exception:
                pass
            return cancel_ev.is_set()

        def on_progress(step: int, total: int, loss: float, epoch: int) -> None:
            progress.update(step=step, total_steps=total, loss=round(loss, 6) if math.isfinite(loss) else None,
                            epoch=epoch)  # fmt: skip
            dirty.set()

        def halt() -> None:  # no heartbeat may write after the final transition
            hb_stop.set()
            if hb is not threading.current_thread():
                hb.join(timeout=10)

        log.info("job %s running on %s (attempt %d)", job_id, claim.worker_id, rec.attempts)
        try:
            # (False only from a give-back; every other end returns None: the job ran)
            return self._execute(
                claim, rec, should_stop, on_progress, cancel_ev, lost_ev, progress, halt,
                lambda: stop.is_set() or self._stop.is_set(),
            ) is not False  # fmt: skip
        finally:
            halt()
            self._running.pop(job_id, None)

    def _execute(
        self, claim, rec, should_stop, on_progress, cancel_ev, lost_ev, progress, halt, stopping
    ) -> bool | None:
        hp = dict(rec.hyperparameters)
        try:
            # an earlier run stored the prefix and died before recording that: record it, no second version
            try:
                stored = self._transient("look for the job's prefix", self._stored_by, rec, job=rec.job_id)
            except StoreUnavailable as e:
                raise _Undecided(str(e)) from e
            if stored is not None:
                halt()
                summary = dict(stored.training or {})
                log.info("job %s: found its prefix already stored as version %d", rec.job_id, stored.version)
                self._record_success(claim, stored.version, summary, final_progress(progress, summary))
                return None
            want = rec.base_model_fingerprint
            if want is not None and want != self.bundle.fingerprint:
                raise _ForeignModel(want)
            init = None
            if (
                rec.init_from is not None
            ):  # the pinned version (gone since submission: the job fails, saying so)
                src = rec.init_from
                init = self.store.get(
                    rec.tenant_id, src["name"], src["version"], expected_fingerprint=self.bundle.fingerprint
                ).tensors
            try:
                result = train_prefix(
                    self.bundle, rec.method, claim.examples, rec.prefix_length, hp,
                    progress_cb=on_progress, should_stop=should_stop, limits=self.job_limits(rec),
                    num_threads=self.train_threads, init_tensors=init,
                    label=f"job {rec.job_id} ({rec.tenant_id}/{rec.name})",
                )  # fmt: skip
            except TrainingCancelled:
                if lost_ev.is_set():
                    raise _Lost() from None
                if cancel_ev.is_set():
                    raise
                raise _Shutdown() from None
            # the trained prefix is in memory: a backend or store outage from here on is waited out (the heartbeat
            # keeps the claim once the backend is back), not a failure
            if lost_ev.is_set() or not self._after_training("check the job's owner", self.backend.owns, claim,
                                                            unknown=True, stopping=stopping):  # fmt: skip
                raise _Lost()
            if cancel_ev.is_set() or self._after_training(
                "read the cancel flag", self.backend.cancel_requested, claim, unknown=False, stopping=stopping
            ):
                raise TrainingCancelled("cancelled after the last step")
            summary = dict(result.summary)
            summary["job_id"] = rec.job_id
            if rec.init_from is not None:
                summary["init_from"] = dict(rec.init_from)
            try:
                # put_once: a put whose answer was lost (stored, then an error) is retried without a second version
                meta, _ = self._transient(
                    "store the prefix",
                    lambda: self.store.put_once(
                        rec.tenant_id,
                        rec.name,
                        rec.method,
                        result.tensors,
                        idempotency_key=_idempotency_key(rec.job_id),
                        digest=rec.job_id,
                        base_model_fingerprint=self.bundle.fingerprint,
                        prefix_length=rec.prefix_length,
                        training=summary,
                        extra={"prompt_format": result.prompt_format},
                    ),
                    job=rec.job_id,
                )
            except StoreUnavailable as e:  # it may have been stored all the same (an answer lost): look
                try:
                    stored = self._stored_by(rec)
                except StoreError:
                    raise _Undecided(str(e)) from e
                if stored is None:
                    raise  # not stored: the job fails, saying why
                meta = stored
            halt()
            self._record_success(claim, meta.version, summary, final_progress(progress, summary))
        except TrainingCancelled:
            halt()
            self._finish(claim, "cancelled", error="cancelled by request", progress=dict(progress))
        except _Shutdown:
            halt()
            with contextlib.suppress(Exception):
                self.backend.requeue(claim, "worker shut down while running the job; requeued")
            log.info("job %s: worker stopping, requeued", rec.job_id)
        except _ForeignModel as e:
            halt()
            mine, theirs = self.bundle.fingerprint[:16], e.want[:16]
            if time.time() - rec.created > FOREIGN_GIVE_UP_S:
                self._finish(claim, "failed", progress=dict(progress), error=(
                    f"no worker of the server's base model ({theirs}) took the job within {FOREIGN_GIVE_UP_S:.0f} s "
                    f"of its submission; a worker that loaded another model ({mine}) gave it back: a worker must "
                    "load the server's model"))  # fmt: skip
                return True
            reason = (
                f"taken by a worker that loaded another base model ({mine}) and given back: it runs on a worker "
                f"that loaded the server's model ({theirs})"
            )
            with contextlib.suppress(Exception):
                self.backend.requeue(claim, reason)
            self._claim_after = time.monotonic() + FOREIGN_BACKOFF_S
            if e.want not in self._foreign_logged:  # once per model, not at every pass of the job
                self._foreign_logged.add(e.want)
                log.error("job %s is for base model %s; this worker loaded %s: given back to the queue (check this "
                          "worker's --model)", rec.job_id, e.want, self.bundle.fingerprint)  # fmt: skip
            return False
        except _Lost:
            halt()
            log.warning("job %s was taken over by another worker; dropping this run", rec.job_id)
            with contextlib.suppress(Exception):
                self.backend.release(claim)
        except _Undecided as e:
            halt()
            log.error("job %s: the prefix store cannot say whether the job stored its prefix (%s); left running, to "
                      "be settled once stale", rec.job_id, e)  # fmt: skip
            with contextlib.suppress(Exception):
                self.backend.release(claim)
        except (TrainingValidationError, TrainingDiverged, StoreError, ValueError) as e:
            halt()
            error = f"{type(e).__name__}: {e}"
            # (the tenant reads the record's: the store's path or host is the operator's, in the log line only)
            shown = self.store.redact(error) if isinstance(e, StoreError) else error
            self._finish(claim, "failed", error=shown, progress=dict(progress), logged=error)
        except Exception as e:
            log.error("job %s: unexpected error", rec.job_id, exc_info=True)
            halt()
            self._finish(claim, "failed", error=f"{type(e).__name__}: {e}", progress=dict(progress))
        return None

    @staticmethod
    def _transient(
        what: str, fn: Any, *args: Any, attempts: int | None = None, stopping: Any = None, job: str = "?"
    ) -> Any:
        """`fn(*args)`, tried again while it raises StoreUnavailable, `attempts` times in all (TRANSIENT_ATTEMPTS by
        default), backing off 0.5 s, 1 s, 2 s, 4 s, then 8 s, and no longer once `stopping()` says the worker is
        shutting down; the last error is raised."""
        n = TRANSIENT_ATTEMPTS if attempts is None else attempts
        for attempt in range(n):
            try:
                return fn(*args)
            except StoreReadOnly:  # (not passing: a store mounted read-only stays so)
                raise
            except StoreUnavailable as e:
                if attempt == n - 1 or (stopping is not None and stopping()):
                    raise
                log.warning("job %s: could not %s (attempt %d): %s", job, what, attempt + 1, e)
                delay = retry_delay(attempt)
                if stopping is None:
                    time.sleep(delay)
                    continue
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not stopping():
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        raise AssertionError("unreachable")  # pragma: no cover

    def _after_training(self, what: str, fn: Any, claim: Any, *, unknown: bool, stopping: Any = None) -> bool:
        """A yes/no question to the job backend once the prefix is trained, tried AFTER_TRAINING_ATTEMPTS times
        (about 2 min); if the backend stays unreachable, `unknown`: the run goes on (storing is idempotent per job,
        so a run that lost its claim meanwhile makes no second version) rather than throwing its prefix away."""
        try:
            return bool(
                self._transient(
                    what,
                    fn,
                    claim,
                    attempts=AFTER_TRAINING_ATTEMPTS,
                    stopping=stopping,
                    job=claim.record.job_id,
                )
            )
        except StoreUnavailable as e:
            log.error("job %s: could not %s (%s); going on as if %s", claim.record.job_id, what, e, unknown)
            return unknown

    def _stored_by(self, rec: JobRecord) -> PrefixMeta | None:
        """The version this job already stored, if any: a run that died (or could not record its success) after
        `store.put` left it, with the job id in its training summary. The newest RECENT_VERSIONS versions are
        looked at, and older ones made since the job was submitted: a version is dated by its worker's clock, the
        job by its server's, so "since" allows for clocks that disagree by up to CLOCK_SKEW_S (a worker further
        behind stored versions that read as older: its job failed beside its prefix)."""
        for i, v in enumerate(reversed(self.store.versions(rec.tenant_id, rec.name))):
            try:
                meta = self.store.get_meta(rec.tenant_id, rec.name, v)
            except (PrefixNotFound, InvalidPrefix):  # gone, or a record that cannot be read: not this job's
                continue
            if i >= RECENT_VERSIONS and meta.created < rec.created - CLOCK_SKEW_S:
                return None
            if (meta.training or {}).get("job_id") == rec.job_id:
                return meta
        return None

    def _record_success(
        self, claim: Any, version: int, summary: dict[str, Any], progress: dict[str, Any]
    ) -> None:
        """Record that the job stored `version`. Its prefix is visible from the put on, so a failure to record it
        is retried, never turned into `failed`; if it keeps failing the job stays running, is picked up again once
        stale, and that run finds the stored version (`_stored_by`) instead of training again."""
        rec = claim.record
        for attempt in range(5):
            try:
                self.backend.finish(claim, "succeeded", prefix_version=version, summary=summary, progress=progress,
                                    error=None)  # fmt: skip
            except Exception as e:
                if _is_lost(e):  # taken over: the new owner records this version
                    log.warning("job %s was taken over after storing version %d", rec.job_id, version)
                    return
                log.warning(
                    "job %s: could not record its success (attempt %d): %s", rec.job_id, attempt + 1, e
                )
                time.sleep(retry_delay(attempt))
                continue
            log.info("job %s succeeded: %s/%s v%d in %.1fs", rec.job_id, rec.tenant_id, rec.name, version,
                     summary.get("wall_time_s", 0.0))  # fmt: skip
            return
        log.error("job %s: stored version %d but could not record it; it will be recorded when the job is picked "
                  "up again", rec.job_id, version)  # fmt: skip

    def _finish(self, claim: Any, status: str, logged: str | None = None, **fields: Any) -> None:
        """End the job with `fields`; its log line says `logged` (else the record's error)."""
        try:
            self.backend.finish(claim, status, **fields)
            rec = claim.record
            said = logged or fields.get("error")
            # a failed job is worth a look (an operator alerts on warnings); a cancelled one is what was asked
            log.log(logging.WARNING if status == "failed" else logging.INFO, "job %s (%s/%s) %s%s", rec.job_id,
                    rec.tenant_id, rec.name, status, f": {said}" if said and status != "cancelled" else "")  # fmt: skip
        except Exception as e:
            log.warning("job %s: could not record %s: %s", claim.record.job_id, status, e)


__all__ = ["ACTIVE", "JobManager", "JobNotFound", "JobRecord", "TooManyJobs", "jobs_location", "open_backend"]
