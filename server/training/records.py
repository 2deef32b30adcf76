"""Job records and the errors of the job system."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

# a job is queued, then running, then one of TERMINAL
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"queued", "running"})

log = logging.getLogger("prefixserve.training.jobs")


class TooManyJobs(RuntimeError):
    """The tenant already has ``max_jobs_per_tenant`` queued or running jobs (HTTP 429)."""


class JobNotFound(LookupError):
    """No job with that id."""


class IdempotencyKeyReused(ValueError):
    """An ``Idempotency-Key`` sent again with a different request (HTTP 422, as the IETF draft says)."""


# How long a training submission's Idempotency-Key is remembered (as long as its job's record, at most this).
IDEMPOTENCY_TTL_S = 86400.0
RETENTION_S = 7 * 86400.0  # how long a finished job is kept by default (the server's `jobs_retention_s`)


def request_digest(request: dict[str, Any]) -> str:
    """sha256 of a submission's canonical JSON: what a replayed Idempotency-Key is compared by."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def idempotency_slot(key: str) -> str:
    """The file / Redis key component of an Idempotency-Key (any header value maps to 64 safe characters)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def trimmable(finished: list[JobRecord], keep: int, now: float) -> list[JobRecord]:
    """Of a tenant's finished jobs, those to delete so that its newest `keep` remain (oldest first), less the newest
    `keep` of those an Idempotency-Key still answers with (submitted with one less than IDEMPOTENCY_TTL_S ago: a
    retry of their submission must find them, not queue the same training again). At most as many again: the SDK
    sends a key with every submission, and sparing them all left the cap nothing to bound for a day."""
    by_age = sorted(finished, key=lambda r: (r.finished or r.created, r.created, r.job_id))
    old = by_age[: max(0, len(by_age) - keep)]
    answering = [r for r in old if r.idempotency_key is not None and now - r.created < IDEMPOTENCY_TTL_S]
    spared = {r.job_id for r in answering[max(0, len(answering) - keep) :]}
    return [r for r in old if r.job_id not in spared]


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


def _progress() -> dict[str, Any]:
    return {"step": 0, "total_steps": None, "loss": None, "epoch": 0}


@dataclass
class JobRecord:
    """A training job as the API shows it (``to_dict()``), plus bookkeeping (attempts, worker, heartbeat)."""

    job_id: str
    tenant_id: str
    name: str
    method: str
    prefix_length: int
    status: str = "queued"
    progress: dict[str, Any] = field(default_factory=_progress)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    prefix_version: int | None = None
    summary: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    num_examples: int = 0
    init_from: dict[str, Any] | None = None  # {"name", "version"}: the stored version training continues from
    # the server's training limits when the job was accepted (TrainingLimits.to_dict()): the job runs under them on
    # whichever worker takes it, whatever that worker's own defaults
    limits: dict[str, Any] | None = None
    # the base model of the server that accepted it: a worker serving another model refuses to run it (what it
    # stored could not be served: every request for the tenant's latest version would fail)
    base_model_fingerprint: str | None = None
    attempts: int = 0  # how many times a worker started it
    worker: str | None = None  # the worker running it (or that last ran it)
    heartbeat: float | None = None  # last sign of life of that worker (unix seconds)
    cancel_requested: bool = False
    idempotency_key: str | None = None  # the submission's Idempotency-Key header, if it had one
    request_digest: str | None = None  # request_digest() of the submission (internal: compared on a replay)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["object"] = "training_job"
        return d

    def public_dict(self) -> dict[str, Any]:
        """What the API shows (no internal bookkeeping of the submission)."""
        d = self.to_dict()
        d.pop("request_digest", None)
        return d

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        known = {f for f in cls.__dataclass_fields__}
        rec = cls(**{k: v for k, v in d.items() if k in known})
        if not isinstance(rec.progress, dict):
            rec.progress = _progress()
        return rec

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls.from_dict(json.loads(text))


def final_progress(progress: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """A succeeded job's progress: its last step, from the training summary."""
    return {**progress, "step": summary.get("steps"), "total_steps": summary.get("total_steps"),
            "loss": summary.get("last_step_loss"), "epoch": summary.get("epochs")}  # fmt: skip


def found_stored(rec: JobRecord, version: int, training: dict[str, Any] | None) -> dict[str, Any]:
    """The fields that end a job as succeeded with `version`, which a run of it stored before its worker died (or
    before it could record that): its prefix is visible, so the job succeeded, whatever else was asked since."""
    summary = dict(training or {})
    return {"status": "succeeded", "finished": time.time(), "prefix_version": version, "summary": summary,
            "error": None, "progress": final_progress(rec.progress, summary)}  # fmt: skip


UNDECIDED = object()  # `stored_by_dead_worker`: the store cannot say now


def stored_by_dead_worker(check: Any, rec: JobRecord) -> Any:
    """What a job backend ending a dead worker's job (cancelled, or out of attempts) learns from `check(rec)`
    (`JobManager._stored_by`; None: no check): the prefix metadata that job stored, None if it stored none (or
    looking failed in a way a later look would too), or UNDECIDED while the store is unavailable (leave the job as
    it is for a later pass). Logged here, the same for both backends."""
    from prefix_store.errors import StoreError, StoreUnavailable

    if check is None or not rec.worker:
        return None
    try:
        meta = check(rec)
    except StoreUnavailable as e:
        log.warning("job %s: cannot tell whether it stored its prefix (%s); left for later", rec.job_id, e)
        return UNDECIDED
    except StoreError as e:
        log.warning("job %s: looking for its prefix failed (%s); taken as not stored", rec.job_id, e)
        return None
    if meta is not None:
        log.warning("job %s: its worker %s stored version %d before it went away; succeeded", rec.job_id,
                    rec.worker, meta.version)  # fmt: skip
    return meta
