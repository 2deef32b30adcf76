"""Durable training jobs on disk and in Redis (real Redis): lifecycle, the prefix visible only once the job
succeeded, failure and cancel write nothing, per-tenant limits, validation, workers that die mid-job (their job is
taken over or failed with a reason, never stuck running), graceful shutdown requeues, and serving is unaffected
while a job trains on the same model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prefix_store import open_store
from prefix_store.errors import StoreUnavailable
from server.engine import DictPrefixProvider, EngineConfig, LLMEngine, PrefixKey, Request, SamplingParams
from server.model import render_prompt
from server.training import (
    IdempotencyKeyReused,
    JobManager,
    JobNotFound,
    JobRecord,
    TooManyJobs,
    TrainingValidationError,
    run_worker,
)
from server.training import backend_disk as jobs_disk
from server.training import jobs as jobs_mod
from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

REPO = Path(__file__).resolve().parents[1]
FAST = {"heartbeat_s": 0.1, "stale_after_s": 1.5, "poll_s": 0.05, "train_threads": 1, "train_nice": 0}


def request_(tenant="acme", name="bot", method="prefix_tuning", n=8, epochs=4, **hp):
    return {
        "tenant_id": tenant,
        "name": name,
        "method": method,
        "prefix_length": 3,
        "examples": [{"prompt": f"q{i}", "completion": "zebra"} for i in range(n)],
        "hyperparameters": {"epochs": epochs, "batch_size": 2, **hp},
    }


def wait_for(pred, timeout=60.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def wait_status(jm, job_id, statuses, timeout=60.0):
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)

    def check():
        r = jm.get(job_id)
        return r if r is not None and r.status in statuses else None

    return wait_for(check, timeout, what=f"job {job_id} in {statuses}")


@pytest.fixture(params=["disk", "redis"])
def store(request, tmp_path):
    if request.param == "disk":
        st = open_store(f"file://{tmp_path / 'store'}")
    else:
        st = open_store(request.getfixturevalue("redis_store_url"))
    yield st
    st.close()


@pytest.fixture
def managers(tiny_llama_bundle, store):
    made: list[JobManager] = []

    def make(**kw) -> JobManager:
        kw = {**FAST, "in_process_workers": 0, **kw}
        jm = JobManager(kw.pop("bundle", tiny_llama_bundle), store, **kw)
        made.append(jm)
        return jm

    yield make
    for jm in made:
        jm.shutdown(wait=True, timeout=30)


# ------------------------------------------------------------------------------------------------ lifecycle
@pytest.mark.parametrize("method", ["prefix_tuning", "prefix_propagation", "prompt_tuning"])
def test_lifecycle_prefix_visible_only_after_success(managers, store, tiny_llama_bundle, method):
    api = managers()  # the server side: validates and queues, runs nothing
    rec = api.submit(request_(method=method, epochs=40))
    assert rec.status == "queued" and rec.job_id.startswith("job-")
    d = api.get(rec.job_id).to_dict()
    json.dumps(d)
    for key in ("job_id", "tenant_id", "name", "method", "prefix_length", "status", "progress", "created",
                "started", "finished", "error", "prefix_version", "summary", "hyperparameters"):  # fmt: skip
        assert key in d, key
    assert d["hyperparameters"]["epochs"] == 40 and d["hyperparameters"]["prompt_format"] == "chat"
    assert [r.job_id for r in api.list("acme")] == [rec.job_id] and api.list("other") == []
    time.sleep(0.2)
    assert api.get(rec.job_id).status == "queued" and not store.exists("acme", "bot")

    worker = managers(in_process_workers=1)
    worker.start()
    running = wait_for(lambda: (r := api.get(rec.job_id)).status == "running" and r.progress["step"] > 0 and r,
                       what="running with progress")  # fmt: skip
    assert running.progress["total_steps"] == 160 and running.started >= running.created
    assert not store.exists("acme", "bot")  # not before the job succeeded
    done = wait_status(api, rec.job_id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.finished >= done.started and done.attempts == 1 and done.error is None
    assert done.progress["step"] == done.progress["total_steps"] == 160
    meta = store.get_meta("acme", "bot")
    assert done.prefix_version == meta.version == 1
    assert meta.kind == method and meta.prefix_length == 3
    assert meta.base_model_fingerprint == tiny_llama_bundle.fingerprint
    # stored once per job: under the job's own Idempotency-Key
    key = {"key": f"training job {rec.job_id}", "digest": rec.job_id}
    assert meta.extra == {"prompt_format": "chat", "idempotency": key}
    assert meta.training["job_id"] == rec.job_id and meta.training["steps"] == 160
    assert done.summary["final_loss"] == meta.training["final_loss"]
    kv = store.get("acme", "bot", expected_fingerprint=tiny_llama_bundle.fingerprint).tensors["kv"]
    assert kv.shape[3] == 3
    assert api.counts() == {"succeeded": 1}


def test_failure_is_recorded_and_writes_nothing(managers, store, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom: out of ideas")

    monkeypatch.setattr(jobs_mod, "train_prefix", boom)
    jm = managers(in_process_workers=1)
    jm.start()
    rec = jm.submit(request_())
    done = wait_status(jm, rec.job_id, ("succeeded", "failed"))
    assert done.status == "failed" and "boom: out of ideas" in done.error
    assert done.prefix_version is None and store.list() == []


def test_store_failure_fails_the_job(managers, store, monkeypatch, caplog):
    """Puts that keep failing (retried, backing off) fail the job once the store says nothing was stored; every
    retry and the failure are warnings that name the job (the failure also its prefix), and the training's own lines
    name it too."""
    caplog.set_level(logging.INFO, logger="prefixserve")
    tries = []

    where = store._locations()[0]  # (a path, a Redis host: the operator's, not for the tenant's eyes)

    def down(*a, **k):
        tries.append(1)
        raise StoreUnavailable(f"prefix store at {where}: prefix store down")

    monkeypatch.setattr(store, "put_once", down)
    monkeypatch.setattr(jobs_mod, "RETRY_BACKOFF_S", 0.0)
    jm = managers(in_process_workers=1)
    jm.start()
    rec = jm.submit(request_(epochs=1))
    done = wait_status(jm, rec.job_id, ("succeeded", "failed"))
    assert done.status == "failed" and "prefix store down" in done.error and where not in done.error
    assert len(tries) == jobs_mod.TRANSIENT_ATTEMPTS and store.list() == []
    deadline = time.monotonic() + 5  # (the line follows the recorded outcome)
    while time.monotonic() < deadline and not any(" failed: " in r.getMessage() for r in caplog.records):
        time.sleep(0.01)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if rec.job_id in r.getMessage()]
    retries = [m for lv, m in said if lv == logging.WARNING and "could not store the prefix (attempt" in m]
    assert len(retries) == jobs_mod.TRANSIENT_ATTEMPTS - 1, said
    assert any(lv == logging.WARNING and f"({rec.tenant_id}/{rec.name}) failed: " in m for lv, m in said), (
        said
    )
    assert any(m.startswith(f"job {rec.job_id} ({rec.tenant_id}/{rec.name}): trained ") for _, m in said), (
        said
    )


def test_a_put_that_stored_but_answered_an_error_succeeds_with_one_version(managers, store, monkeypatch):
    """The store wrote the version and the answer was lost (a Redis EXEC whose reply timed out, a directory fsync
    that failed after the rename): the job's retry of its put finds that version by the job's key and the job
    succeeds with it, never failed beside a visible prefix, nor stored twice. A passing error while checking the
    job's owner after training is waited out too (it failed the job)."""
    real_put, real_owns = store.put_once, None
    calls = []

    def lost_answer(*a, **k):
        calls.append(real_put(*a, **k)[1])
        if len(calls) == 1:
            raise StoreUnavailable("timeout reading the reply")
        return store.get_meta(a[0], a[1]), calls[-1]

    jm = managers(in_process_workers=1)
    real_owns, blips = jm.backend.owns, []

    def owns_once_down(claim):
        if not blips:
            blips.append(1)
            raise StoreUnavailable("job queue: connection reset")
        return real_owns(claim)

    monkeypatch.setattr(store, "put_once", lost_answer)
    monkeypatch.setattr(jm.backend, "owns", owns_once_down)
    monkeypatch.setattr(jobs_mod, "RETRY_BACKOFF_S", 0.0)
    jm.start()
    rec = jm.submit(request_(epochs=1))
    done = wait_status(jm, rec.job_id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert calls == [True, False] and blips == [1]  # stored once, then found by its key
    assert done.prefix_version == 1 and store.versions("acme", "bot") == [1]


def test_a_put_whose_outcome_cannot_be_known_leaves_the_job_running(managers, store, monkeypatch):
    """The store stays down through the put's retries and the look that would tell whether it was stored: the job
    is neither failed nor succeeded but left running, to be settled once stale."""
    jm = managers(in_process_workers=1, stale_after_s=600)
    real_versions, puts = store.versions, []

    def put_down(*a, **k):
        puts.append(1)
        raise StoreUnavailable("prefix store down")

    def versions(*a, **k):  # up at the start of the run, down from its put on
        if puts:
            raise StoreUnavailable("prefix store down")
        return real_versions(*a, **k)

    monkeypatch.setattr(store, "put_once", put_down)
    monkeypatch.setattr(store, "versions", versions)
    monkeypatch.setattr(jobs_mod, "RETRY_BACKOFF_S", 0.0)
    # (the disk reclaimer would take the released job for a dead worker's within a second and requeue it, a race
    # with the look below: what the run itself leaves is what is checked here)
    monkeypatch.setattr(jm.backend, "reclaim_stale", lambda: [])
    jm.start()
    rec = jm.submit(request_(epochs=1))
    wait_for(lambda: puts and not jm._running, what="the run to give up")
    assert len(puts) == jobs_mod.TRANSIENT_ATTEMPTS
    job = jm.get(rec.job_id)
    assert job.status == "running" and job.attempts == 1, job.error


def test_a_failure_to_record_success_after_storing_does_not_fail_the_job(managers, store, monkeypatch):
    """The prefix is stored (and served from then on); recording `succeeded` then hits a passing job-queue error:
    it is retried, and the job ends succeeded with that version, never failed beside a served prefix."""
    jm = managers(in_process_workers=1)
    real, calls = jm.backend.finish, []

    def flaky(claim, status, **kw):
        calls.append(status)
        if len(calls) == 1:
            raise StoreUnavailable("job queue: a passing error")
        return real(claim, status, **kw)

    monkeypatch.setattr(jm.backend, "finish", flaky)
    monkeypatch.setattr(jobs_mod, "RETRY_BACKOFF_S", 0.0)
    jm.start()
    rec = jm.submit(request_(epochs=1))
    done = wait_status(jm, rec.job_id, ("succeeded", "failed"))
    assert calls == ["succeeded", "succeeded"]
    assert done.status == "succeeded" and done.prefix_version == 1 and store.versions("acme", "bot") == [1]


def test_the_version_a_job_stored_is_found_whatever_its_workers_clock(managers, store):
    """Versions older than the job (by the job's server's clock, less an hour for skew) were not looked at: a worker
    whose clock was more than an hour behind stored the prefix and died, and the job failed (`giving up`) beside it.
    The newest versions are always looked at; past them, the time bound keeps a long history from being read."""
    api = managers()
    rec = api.submit(request_(epochs=1))
    kv = {"kv": torch.zeros(2, 2, 2, 3, 16)}

    def put(job_id: str, created: float) -> None:
        store.put("acme", "bot", "prompt_tuning", kv, base_model_fingerprint="x", prefix_length=3,
                  training={"job_id": job_id}, created=created)  # fmt: skip

    put(rec.job_id, rec.created - 7200)  # by a worker two hours behind
    for i in range(3):
        put(f"job-other-{i}", rec.created + i)
    found = api._stored_by(rec)
    assert found is not None and found.version == 1
    for i in range(jobs_mod.RECENT_VERSIONS):  # a long history since: past the newest, the time bound holds
        put(f"job-later-{i}", rec.created - 7200)
    assert api._stored_by(rec) is None


def test_exactly_the_newest_recent_versions_are_looked_at_whatever_their_age(managers, store):
    """The newest RECENT_VERSIONS versions of a name are looked at for the one a job stored, however old their
    dates; one further back, dated before the job (less the clock skew allowed), is not: with a long history the
    look stops there instead of reading every version's metadata."""
    api = managers()
    rec = api.submit(request_(epochs=1))
    kv = {"kv": torch.zeros(2, 2, 2, 3, 16)}

    def put(job_id: str) -> None:
        store.put("acme", "bot", "prompt_tuning", kv, base_model_fingerprint="x", prefix_length=3,
                  training={"job_id": job_id}, created=rec.created - 7200)  # fmt: skip

    put(rec.job_id)
    for i in range(jobs_mod.RECENT_VERSIONS - 1):
        put(f"job-later-{i}")
    found = api._stored_by(rec)  # the newest RECENT_VERSIONS: the job's among them
    assert found is not None and found.version == 1
    put("job-one-more")  # now RECENT_VERSIONS newer ones: the job's is past them, and older than the job
    assert api._stored_by(rec) is None


def test_a_job_whose_prefix_an_earlier_run_stored_is_not_trained_again(managers, store, monkeypatch):
    """A worker died between storing the prefix and recording the job's success: the run that picks the job up
    again finds the version by the job id in its summary and records it, instead of storing a second one."""
    api = managers()
    rec = api.submit(request_(epochs=1))
    kv = {"kv": torch.zeros(2, 2, 2, 3, 16)}
    mine = store.put("acme", "bot", "prompt_tuning", kv, base_model_fingerprint="x", prefix_length=3,
                     training={"job_id": rec.job_id, "steps": 4, "total_steps": 4, "epochs": 1})  # fmt: skip
    # a newer version, another job's: passed over
    store.put(
        "acme",
        "bot",
        "prompt_tuning",
        kv,
        base_model_fingerprint="x",
        prefix_length=3,
        training={"job_id": "job-of-another-run"},
    )

    def never(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(jobs_mod, "train_prefix", never)
    worker = managers(in_process_workers=1)
    worker.start()
    done = wait_status(api, rec.job_id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.prefix_version == mine.version == 1 and store.versions("acme", "bot") == [1, 2]
    assert done.progress["step"] == 4


# ------------------------------------------------------------------------------------------------ cancel
def test_cancel_queued_job(managers, store):
    jm = managers()
    rec = jm.submit(request_())
    c = jm.cancel(rec.job_id)
    assert c.status == "cancelled" and c.finished is not None
    worker = managers(in_process_workers=1)
    worker.start()
    time.sleep(0.5)
    assert jm.get(rec.job_id).status == "cancelled" and jm.get(rec.job_id).attempts == 0
    assert not store.exists("acme", "bot")
    with pytest.raises(JobNotFound):
        jm.cancel("job-doesnotexist")
    assert jm.get("job-doesnotexist") is None


@pytest.mark.parametrize("where", ["same_process", "other_manager"])
def test_cancel_running_job_within_one_step(managers, store, monkeypatch, where):
    """Cancel through the manager that runs the job (in-process flag) or through another one (the backend's flag,
    read before every step): at most one optimizer step completes after cancel() returned; nothing is written."""
    steps: list[tuple[float, int]] = []
    real = jobs_mod.train_prefix

    def spy(*a, **k):
        cb = k["progress_cb"]

        def record(step, total, loss, epoch):
            steps.append((time.monotonic(), step))
            time.sleep(0.02)  # steps of a real model take a while; keep them > one backend round trip
            cb(step, total, loss, epoch)

        return real(*a, **{**k, "progress_cb": record})

    monkeypatch.setattr(jobs_mod, "train_prefix", spy)
    worker = managers(in_process_workers=1)
    api = worker if where == "same_process" else managers()
    worker.start()
    rec = api.submit(request_(epochs=100))
    wait_for(lambda: len(steps) >= 3, what="3 steps")
    c = api.cancel(rec.job_id)
    t_cancel = time.monotonic()
    assert c.status in ("running", "cancelled") and c.cancel_requested
    done = wait_status(api, rec.job_id, ("cancelled", "succeeded", "failed"))
    assert done.status == "cancelled" and done.prefix_version is None
    after = [s for t, s in steps if t > t_cancel]
    assert len(after) <= 1, after
    assert not store.exists("acme", "bot") and store.list() == []


# ------------------------------------------------------------------------------------------------ limits
def test_tenants_take_turns_at_the_workers(managers, store):
    """Jobs are not first come, first served across tenants: a tenant with a running job waits behind one without,
    and after a tenant's job the next goes to a tenant whose last job started earlier. (First come, first served,
    one tenant's two long jobs held the only worker for up to two hours while others' waited.)"""
    api = managers()
    a1, a2 = (api.submit(request_(name=n, epochs=1)) for n in ("bot1", "bot2"))
    g1 = api.submit(request_(tenant="globex", epochs=1))
    # two workers: acme's first job runs, so the second worker takes globex's before acme's second
    claims = [_ghost_claim(api) for _ in range(2)]
    assert [c.record.job_id for c in claims] == [a1.job_id, g1.job_id]
    for c in claims:
        _kill_ghost(api, c)
    # one worker: of two tenants that never ran a job, the older job first (initech's first), then umbrella's
    # (initech's last start is the later one); then by last start: acme (the ghost's first claim), globex,
    # initech, acme again
    i1, i2 = (api.submit(request_(tenant="initech", name=n, epochs=1)) for n in ("bot1", "bot2"))
    u1 = api.submit(request_(tenant="umbrella", epochs=1))
    for c in claims:  # (given back: their tenants' last starts are later than any of these)
        api.backend.requeue(c, "test: given back")
    worker = managers(in_process_workers=1)
    worker.start()
    done = [wait_status(api, j.job_id, ("succeeded", "failed")) for j in (i1, i2, u1, a1, a2, g1)]
    assert all(d.status == "succeeded" for d in done), [d.error for d in done]
    order = [d.job_id for d in sorted(done, key=lambda d: d.started)]
    tenants = {j.job_id: j.tenant_id for j in (i1, i2, u1, a1, a2, g1)}
    assert [tenants[o] for o in order] == ["initech", "umbrella", "acme", "globex", "initech", "acme"], order


def test_a_job_stuck_with_a_dead_reader_does_not_hold_the_others_back(managers, store):
    """Redis: an entry read by a worker that died before taking it still says queued, but no read returns it until
    it is stale; counting it as a waiting tenant deferred every other job round and round (thousands of Redis
    commands a claim, nothing taken for stale_after_s)."""
    api = managers()
    if api.backend.kind != "redis":
        pytest.skip("a Redis stream's delivered entries")
    be = api.backend
    stuck = api.submit(request_(tenant="globex", epochs=1))
    assert be._r.xreadgroup("trainers", "dead-reader", {be._stream: ">"}, count=1)  # read, never taken
    be._r.hset(be._served, "acme", repr(time.time()))  # acme's turn comes after globex's (never served)
    a1 = api.submit(request_(epochs=1))
    t0 = time.monotonic()
    claim = be.claim("w1", block_ms=100)
    assert claim is not None and claim.record.job_id == a1.job_id and time.monotonic() - t0 < 2
    assert api.get(stuck.job_id).status == "queued"


def test_too_many_jobs_per_tenant(managers):
    jm = managers(max_jobs_per_tenant=2)
    a = jm.submit(request_(name="a"))
    jm.submit(request_(name="b"))
    with pytest.raises(TooManyJobs, match="2 queued or running"):
        jm.submit(request_(name="c"))
    jm.submit(request_(tenant="other", name="c"))  # per tenant
    jm.cancel(a.job_id)
    jm.submit(request_(name="c"))  # a slot is free again


def test_a_tenants_finished_jobs_are_kept_up_to_a_cap(managers, store):
    """Finished jobs were kept 7 days whatever their number, and `max_jobs_per_tenant` counts only unfinished
    ones: a tenant submitting and cancelling in a loop (9 ms a cycle) left a record (and on disk a lock file and a
    queue marker) each time, and every listing read them all (3,000: 352 ms, 3 MiB). A submission past
    `jobs_kept_per_tenant` (by a tenth) deletes the tenant's oldest finished jobs; unfinished ones and other
    tenants' stay."""
    api = managers(max_jobs_per_tenant=2, jobs_kept_per_tenant=10)
    other = api.submit(request_(tenant="globex"))
    api.cancel(other.job_id)
    keyed, _ = api.submit_once(request_(name="keyed"), "retry-me")
    api.cancel(keyed.job_id)
    running = api.submit(request_(name="keep"))
    ids = []
    for i in range(25):
        rec = api.submit(request_(name=f"n{i}"))
        api.cancel(rec.job_id)
        ids.append(rec.job_id)
    mine = {r.job_id for r in api.list("acme")}
    finished = [j for j in ids if j in mine]
    assert 10 <= len(finished) <= 11 and finished == ids[-len(finished) :]  # the newest, in order
    assert running.job_id in mine and api.get(running.job_id).status == "queued"
    assert [r.job_id for r in api.list("globex")] == [other.job_id]
    # the oldest, but its Idempotency-Key still answers with it (a retry must not queue the training again)
    assert keyed.job_id in mine and api.submit_once(request_(name="keyed"), "retry-me") == (
        api.get(keyed.job_id),
        True,
    )
    # as many again at most: the SDK sends a key with every submission (sparing them all bounded nothing)
    for i in range(40):
        rec, _ = api.submit_once(request_(name=f"k{i}"), f"key-{i}")
        api.cancel(rec.job_id)
    finished = [r for r in api.list("acme") if r.status != "queued"]
    assert 20 <= len(finished) <= 22, len(finished)
    backend = api.backend
    if hasattr(backend, "_dirs"):  # what the disk queue keeps of the deleted ones: nothing
        names = [p.name for d in ("records", "locks", "queue") for p in backend._dirs[d].iterdir()]
        assert not [n for n in names if any(j in n for j in ids[:14])], names
    else:  # the stream holds the queued job's entry only (the cancelled ones' went with them)
        assert backend._r.xlen(backend._stream) == 1


def _finished(job_id, created, finished, key=None):
    return JobRecord(job_id=job_id, tenant_id="acme", name="bot", method="prefix_tuning", prefix_length=4,
                     status="cancelled", created=created, finished=finished, idempotency_key=key)  # fmt: skip


def test_the_jobs_that_finished_last_are_kept_whenever_they_were_submitted():
    """The cap on a tenant's finished jobs keeps the ones that finished last: a long training submitted first
    but finished a moment ago stays, and a job submitted after it but cancelled long ago goes."""
    from server.training.records import trimmable

    now = time.time()
    long_training = _finished("job-long", created=now - 100, finished=now - 1)
    cancelled = _finished("job-cancelled", created=now - 50, finished=now - 49)
    assert [r.job_id for r in trimmable([long_training, cancelled], 1, now)] == ["job-cancelled"]
    assert [r.job_id for r in trimmable([cancelled, long_training], 1, now)] == ["job-cancelled"]


def test_the_newest_jobs_an_idempotency_key_answers_with_are_spared_by_the_cap():
    """Past the cap, of the old jobs an Idempotency-Key still answers with, the newest `keep` are spared (the
    submissions most likely to be retried find their job instead of queueing the training again); the oldest
    keyed ones go."""
    from server.training.records import trimmable

    now = time.time()
    keyed = [_finished(f"job-k{i}", now - 100 + i, now - 100 + i, key=f"key-{i}") for i in range(4)]
    plain = [_finished(f"job-p{i}", now - 10 + i, now - 10 + i) for i in range(2)]
    assert sorted(r.job_id for r in trimmable(keyed + plain, 2, now)) == ["job-k0", "job-k1"]


def test_a_submission_stands_when_deleting_the_oldest_finished_jobs_fails(
    managers, store, monkeypatch, caplog
):
    """Deleting a tenant's oldest finished jobs is bookkeeping done after a submission is queued: when it fails (the
    job store went away a moment) the submission still answers with its job, which is queued and runs; a retry
    would queue the training twice. The failure is logged."""
    api = managers(jobs_kept_per_tenant=1)  # every submission trims

    def fail(*a, **kw):
        raise StoreUnavailable("jobs store unavailable")

    monkeypatch.setattr(api.backend, "trim", fail)
    caplog.set_level(logging.WARNING, logger="prefixserve.training")
    rec = api.submit(request_())
    assert rec.status == "queued" and api.get(rec.job_id).status == "queued"
    assert [r.job_id for r in api.list("acme")] == [rec.job_id]
    assert "deleting its oldest finished jobs failed" in caplog.text


def test_a_worker_beside_a_read_only_store_takes_no_job(managers, store, monkeypatch, caplog):
    """A worker whose prefix store is read-only (a serving replica on a read-only volume, sharing the job queue with a
    trainer that can write) took jobs, trained them, then failed them after retrying the put: it leaves them to a
    worker that can store their prefix, and says so once."""
    api = managers()
    rec = api.submit(request_())
    monkeypatch.setattr(type(store), "read_only", property(lambda self: True))
    caplog.set_level(logging.WARNING, logger="prefixserve.training")
    assert api.run_one("w-ro", block_s=0.01) is False and api.run_one("w-ro", block_s=0.01) is False
    assert api.get(rec.job_id).status == "queued"
    assert sum("read-only" in m for m in caplog.messages) == 1


def test_a_read_only_store_is_not_retried_as_a_store_gone_a_moment():
    """A store write refused because the store is read-only (mounted so: it stays so) fails at once, where a store
    unreachable a moment is retried with back-off: the job is not held up by seconds of back-off first."""
    from prefix_store.errors import StoreReadOnly

    calls = []

    def put():
        calls.append(1)
        raise StoreReadOnly("the prefix store is read-only")

    t0 = time.monotonic()
    with pytest.raises(StoreReadOnly):
        JobManager._transient("store the prefix", put, attempts=3, job="job-a")
    assert len(calls) == 1 and time.monotonic() - t0 < 0.4


def test_seconds_until_slot_estimates_the_soonest_running_job_end():
    """The Retry-After of a submission refused with TooManyJobs: the soonest end among the tenant's running jobs,
    from their pace (elapsed / step × steps left), bounded by their time limit; None without any estimate."""
    now = 1_000.0

    def rec(status, started=None, step=0, total=0, max_seconds=None):
        limits = None if max_seconds is None else {"max_seconds": max_seconds}
        return JobRecord(job_id=f"j{step}{status}", tenant_id="acme", name="n", method="prefix_tuning",
                         prefix_length=4, status=status, started=started,
                         progress={"step": step, "total_steps": total}, limits=limits)  # fmt: skip

    def estimate(*records):
        backend = SimpleNamespace(list=lambda tenant: list(records))
        return JobManager.seconds_until_slot(SimpleNamespace(backend=backend), "acme", now=now)

    assert estimate() is None
    assert estimate(rec("queued"), rec("running", started=990.0)) is None  # no step yet, no limit
    # 10 steps in 20 s, 30 left: 60 s; another at 5 of 10 steps in 50 s: 50 s, the soonest
    assert estimate(rec("running", 980.0, 10, 40), rec("running", 950.0, 5, 10)) == pytest.approx(50.0)
    # the time limit ends a slow job sooner than its pace would (started 100 s ago, 3600 s limit, pace says 9900)
    assert estimate(rec("running", 900.0, 1, 100, max_seconds=150.0)) == pytest.approx(50.0)
    # a job at step 0 says nothing of its pace: its limit (an hour by default) is no estimate
    assert estimate(rec("running", 995.0, 0, 100, max_seconds=3600.0)) is None
    assert estimate(rec("running", 990.0, 0, 100, max_seconds=float("inf"))) is None
    # the pace on the worker's clock (start to last heartbeat): this server's an hour behind changes nothing
    now = 1_000.0 - 3600
    late = rec("running", 980.0, 10, 40)
    late.heartbeat = 1_000.0
    assert estimate(late) == pytest.approx(60.0)
    late.limits = {"max_seconds": 50.0}
    assert estimate(late) == pytest.approx(30.0)


# ------------------------------------------------------------------------------------------------ idempotency
def test_an_idempotency_key_makes_one_job_even_for_racing_submissions(managers, monkeypatch):
    """Eight threads submit the same request with one key at once, past the quick lookup (as when a client's
    retry arrives while its first attempt is still being handled): the backend's atomic check lets one create."""
    jm = managers(max_jobs_per_tenant=1)
    monkeypatch.setattr(jm.backend, "find_submitted", lambda tenant, key: None)
    results: list[tuple] = []
    barrier = threading.Barrier(8)

    def go() -> None:
        barrier.wait()
        results.append(jm.submit_once(request_(), "k-1"))

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and len({rec.job_id for rec, _ in results}) == 1
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 7
    assert [r.job_id for r in jm.list()] == [results[0][0].job_id]


def test_an_idempotency_key_replays_its_job_and_refuses_another_request(managers):
    jm = managers(max_jobs_per_tenant=1)
    rec, replayed = jm.submit_once(request_(), "k-1")
    assert not replayed and rec.idempotency_key == "k-1" and "request_digest" not in rec.public_dict()
    # over the tenant's limit, but it is the same submission
    again, replayed = jm.submit_once(request_(), "k-1")
    assert replayed and again.job_id == rec.job_id
    with pytest.raises(IdempotencyKeyReused, match=rec.job_id):
        jm.submit_once(request_(epochs=5), "k-1")
    with pytest.raises(TooManyJobs):
        jm.submit_once(request_(), "k-2")  # a new key is a new job
    other, replayed = jm.submit_once(request_(tenant="globex"), "k-1")  # keys are per tenant
    assert not replayed and other.job_id != rec.job_id
    assert len(jm.list()) == 2


def test_an_idempotency_key_is_forgotten_with_its_job(managers, store):
    """Past IDEMPOTENCY_TTL_S, or once its job's record is gone, a key makes a new job."""
    jm = managers(retention_s=3600)
    rec, _ = jm.submit_once(request_(), "k-1")
    jm.cancel(rec.job_id)
    backend = jm.backend
    if backend.kind == "redis":
        slot = backend._idempotency("acme", "k-1")
        assert 0 < backend._r.ttl(slot) <= 86400  # remembered a day at most
        backend._r.delete(backend._job(rec.job_id))  # the job's record expired (retention) before the key
    else:
        slot = backend._idempotency("acme", "k-1")
        assert slot.read_text() == rec.job_id
        rec2 = backend._read(rec.job_id)
        rec2.finished = time.time() - 7200
        backend._write(rec2)
        assert backend.prune() == 1 and not slot.exists()  # the job is gone, and the key with it
    new, replayed = jm.submit_once(request_(), "k-1")
    assert not replayed and new.job_id != rec.job_id
    if backend.kind == "disk":
        os.utime(slot, (time.time() - 86400 - 60,) * 2)  # older than a day: forgotten, and pruned
        again, replayed = jm.submit_once(request_(name="bot2"), "k-1")
        assert not replayed and again.job_id != new.job_id
        os.utime(backend._idempotency("acme", "k-1"), (time.time() - 86400 - 60,) * 2)
        backend.prune()
        assert not backend._idempotency("acme", "k-1").exists() and backend._read(again.job_id) is not None


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"tenant_id": "bad/tenant"}, "tenant_id"),
        ({"name": ""}, "name"),
        ({"name": ".."}, "name"),
        ({"method": "lora"}, "method"),
        ({"examples": []}, "examples"),
        ({"examples": [{"prompt": "a", "completion": ""}]}, "examples[0].completion"),
        ({"prefix_length": 1000}, "prefix_length"),
        ({"hyperparameters": {"epochs": 1000}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"weight_decay": 10**400}}, "hyperparameters.weight_decay"),  # no float holds it
        ({"hyperparameters": {"learning_rate": float("nan")}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": "fast"}, "hyperparameters"),
        ({"lr": 0, "hyperparameters": {}}, "lr"),
        ({"epochs": 0, "hyperparameters": {}}, "epochs"),
        ({"epochs": 2}, "hyperparameters.epochs"),  # given twice
        # the learning rate under both its names: refused, not one silently winning
        ({"lr": 0.1, "learning_rate": 0.2, "hyperparameters": {}}, "learning_rate"),
        ({"hyperparameters": {"lr": 0.1, "learning_rate": 0.2}}, "hyperparameters.learning_rate"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_submit_validates_synchronously(managers, patch, param):
    jm = managers()
    req = {**request_(), **patch}
    with pytest.raises(TrainingValidationError) as ei:
        jm.submit(req)
    assert ei.value.param == param, str(ei.value)
    assert jm.list() == []


def test_both_names_of_the_learning_rate_nested_say_so():
    from server.training.config import parse_request

    with pytest.raises(
        TrainingValidationError, match=re.escape("'hyperparameters.lr' and 'hyperparameters.learning_rate'")
    ):
        parse_request(request_(lr=0.1, learning_rate=0.2))


def test_a_warm_start_of_prompt_tuning_defaults_to_a_lower_learning_rate():
    """Continuing a prompt-tuning prefix at the method's fresh-start 1e-1 threw the trained soft prompt away (a
    fresh AdamW moves every coordinate by ~lr at once): `init_from` without a learning rate takes 1e-2; one given
    is kept, and the other methods keep their defaults."""
    from server.training.config import DEFAULTS, parse_request

    def lr(method, **extra):
        req = {**request_(method=method), "hyperparameters": None, **extra}
        return parse_request(req).hyperparameters.learning_rate

    warm = {"init_from": {"name": "bot"}}
    assert lr("prompt_tuning") == DEFAULTS["prompt_tuning"].learning_rate == 0.1
    assert lr("prompt_tuning", **warm) == 1e-2
    assert lr("prompt_tuning", **warm, lr=0.05) == lr("prompt_tuning", **warm, learning_rate=0.05) == 0.05
    assert lr("prompt_tuning", **warm, hyperparameters={"learning_rate": 0.05}) == 0.05
    for method in ("prefix_tuning", "prefix_propagation"):
        assert lr(method, **warm) == DEFAULTS[method].learning_rate


def test_top_level_hyperparameters_like_the_cli_and_sdk_send(managers):
    jm = managers()
    req = request_()
    del req["hyperparameters"]
    rec = jm.submit({**req, "epochs": 3, "lr": 0.002, "max_steps": 5, "seed": 4, "prompt_format": "raw"})
    hp = rec.hyperparameters
    assert (hp["epochs"], hp["learning_rate"], hp["max_steps"], hp["seed"]) == (3, 0.002, 5, 4)
    assert hp["prompt_format"] == "raw"
    defaults = jm.submit({"tenant_id": "t2", "name": "n", "examples": req["examples"]})
    assert defaults.method == "prefix_tuning" and defaults.prefix_length == 16


def test_token_limit_checked_at_submit(tiny_llama_bundle, store):
    from server.training import TrainingLimits

    jm = JobManager(
        tiny_llama_bundle, store, in_process_workers=0, limits=TrainingLimits(max_total_tokens=100)
    )
    with pytest.raises(TrainingValidationError, match="100 tokens") as ei:
        jm.submit(request_(n=8))
    assert ei.value.param == "examples"
    jm.shutdown()


def test_a_record_over_the_upload_limit_is_refused_at_submit_naming_what_fits(tiny_llama_bundle, store):
    """A prefix-tuning MLP of 8192 made a 397 MB record on SmolLM2: its download could not be uploaded again (64 MiB)
    and each prefix-cache miss read it all. The record (KV and trained tensors, float32) must fit the server's
    max_upload_bytes: a wider MLP is a 422 naming the widest that fits (which is accepted), and a prefix too long
    for any MLP, or for another kind, names the longest that fits."""
    from server.training import TrainingLimits
    from server.training.trainer import trainable_parameter_count

    sp = tiny_llama_bundle.spec
    kv_per_position = sp.num_layers * 2 * sp.num_kv_heads * sp.head_dim

    def size(method: str, p: int, h: int) -> int:
        return 4 * (kv_per_position * p + trainable_parameter_count(method, sp, p, h))

    most = size("prefix_tuning", 3, 100)
    jm = JobManager(
        tiny_llama_bundle, store, in_process_workers=0, limits=TrainingLimits(max_record_bytes=most)
    )
    with pytest.raises(TrainingValidationError, match="at most 100 fits") as ei:
        jm.submit(request_(mlp_hidden=101))
    assert ei.value.param == "hyperparameters.mlp_hidden"
    assert jm.submit(request_(mlp_hidden=100)).status == "queued"
    for method in ("prefix_propagation", "prompt_tuning"):
        longest = max(p for p in range(1, 400) if size(method, p, 0) <= most)
        req = {**request_(method=method), "prefix_length": longest + 1}
        if longest + 1 <= 256:
            with pytest.raises(TrainingValidationError, match=f"at most {longest} positions fit") as ei:
                jm.submit({**req, "tenant_id": f"t-{method}"})
            assert ei.value.param == "prefix_length"
    jm.shutdown()


def test_a_job_runs_under_the_limits_it_was_accepted_with(managers):
    """The accepting server's limits travel in the job record: a worker with other (default) limits runs the job
    under them, both ways (a larger epoch limit it would refuse, a time limit it does not have)."""
    from server.training import TrainingLimits

    server = managers(limits=TrainingLimits(max_epochs=150, max_seconds=1e-9))
    worker = managers()
    rec = server.submit(request_(epochs=120))
    assert rec.limits is not None and rec.limits["max_epochs"] == 150 and rec.limits["max_seconds"] == 1e-9
    assert server.get(rec.job_id).public_dict()["limits"]["max_seconds"] == 1e-9  # shown with the job
    with pytest.raises(TrainingValidationError):  # what the worker's own limits would say
        worker.validate(request_(epochs=120))
    assert worker.work("w1", max_jobs=1) == 1
    done = wait_status(worker, rec.job_id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.summary["stopped"] == "time_limit" and done.summary["steps"] == 1


def test_what_the_server_could_not_serve_is_refused_at_submission(managers):
    """A prefix, or an example with it, longer than the positions this server serves (its max_model_len), and an
    empty raw prompt (nothing before the completion; no request may be empty either) are 422s, not jobs that
    succeed into a prefix every request then fails on."""
    from server.training import TrainingLimits

    jm = managers(limits=TrainingLimits(max_positions=40))
    for req, param in [
        ({**request_(), "prefix_length": 40}, "prefix_length"),
        ({**request_(), "prefix_length": 30}, "examples[0]"),  # each example is 27 tokens (chat format)
        (
            {**request_(prompt_format="raw"), "examples": [{"prompt": "", "completion": "zebra"}]},
            "examples[0].prompt",
        ),
    ]:
        with pytest.raises(TrainingValidationError) as ei:
            jm.submit(req)
        assert ei.value.param == param, (param, ei.value)
    assert jm.list() == []
    assert jm.submit({**request_(), "prefix_length": 4}).status == "queued"  # what fits is taken


def test_a_worker_with_another_base_model_gives_the_job_back_for_one_with_its_model(
    managers, store, tiny_llama_bundle, monkeypatch
):
    """A misconfigured worker (another --model) on the shared queue takes a job, sees the job's base model is not
    its own and gives it back, the attempt not counted, and claims nothing for a while: a worker of the job's model
    runs it. It used to fail every job it took (4 of 6 with one right and one wrong worker)."""
    import dataclasses

    server = managers()
    rec = server.submit(request_())
    assert rec.base_model_fingerprint == tiny_llama_bundle.fingerprint
    other = dataclasses.replace(tiny_llama_bundle, fingerprint="f" * 64)
    wrong = managers(bundle=other)
    assert wrong.run_one("w-wrong") is False  # took it (not a job run) ...
    back = server.get(rec.job_id)
    assert back.status == "queued" and back.attempts == 0 and back.worker is None  # ... and gave it back
    assert "another base model" in back.error and store.versions("acme", "bot") == []
    t0 = time.monotonic()
    assert wrong.run_one("w-wrong") is False  # backing off: does not take it again at once
    assert (
        time.monotonic() - t0 >= jobs_mod.FOREIGN_BACKOFF_S - 0.2
        and server.get(rec.job_id).status == "queued"
    )
    right = managers()
    assert right.work("w-right", max_jobs=1) == 1
    done = wait_status(right, rec.job_id, ("succeeded", "failed"))
    assert done.status == "succeeded" and done.attempts == 1 and done.worker == "w-right", done.error
    assert store.versions("acme", "bot") == [done.prefix_version]
    # with no worker of its model for FOREIGN_GIVE_UP_S, a job fails saying so (it would hold a job slot for good)
    rec2 = server.submit(request_(name="bot2"))
    monkeypatch.setattr(jobs_mod, "FOREIGN_GIVE_UP_S", 0.0)
    wrong._claim_after = 0.0
    assert wrong.run_one("w-wrong") is True
    failed = server.get(rec2.job_id)
    assert failed.status == "failed" and "a worker must load the server's model" in failed.error


def test_a_job_backend_outage_after_training_is_waited_out(managers, store, monkeypatch, caplog):
    """The job backend stops answering as training ends (its prefix in memory): the run waits for it to come back
    and records its success, instead of throwing the trained prefix away for another attempt to train again."""
    from prefix_store.errors import StoreUnavailable

    jm = managers()
    rec = jm.submit(request_(epochs=1))
    owns, cancel_requested = jm.backend.owns, jm.backend.cancel_requested
    outage: dict[str, float] = {}
    tries: list[str] = []
    answered: list[str] = []

    def down_for_a_while(fn, starts: bool):
        # the outage begins at the ownership check after training (the cancel flag is also read before every
        # step, which must not start it), and lasts longer than the quick tries of before (~0.15 s here)
        def call(claim):
            if starts:
                outage.setdefault("start", time.monotonic())
            if "start" in outage and time.monotonic() - outage["start"] < 0.25:
                tries.append(fn.__name__)
                raise StoreUnavailable("connection refused")
            if "start" in outage:
                answered.append(fn.__name__)
            return fn(claim)

        return call

    monkeypatch.setattr(jm.backend, "owns", down_for_a_while(owns, True))
    monkeypatch.setattr(jm.backend, "cancel_requested", down_for_a_while(cancel_requested, False))
    monkeypatch.setattr(jobs_mod, "TRANSIENT_ATTEMPTS", 3)
    monkeypatch.setattr(jobs_mod, "RETRY_BACKOFF_S", 0.05)  # (a tenth of the real waits)
    caplog.set_level(logging.WARNING, logger="prefixserve")
    assert jm.work("w1", max_jobs=1) == 1
    done = jm.get(rec.job_id)
    assert done.status == "succeeded" and done.attempts == 1, done.error
    assert store.versions("acme", "bot") == [done.prefix_version]
    # it did wait: tries at 0, 0.05, 0.15 s into the outage, ..., then an answer, not a guess after 3 tries
    assert tries.count("owns") >= 3 and "owns" in answered, (tries, answered)
    guessed = [r.getMessage() for r in caplog.records if "going on as if" in r.getMessage()]
    assert not guessed, guessed

    def unreachable(claim):
        raise StoreUnavailable("connection refused")

    claim = SimpleNamespace(record=rec)
    # a worker shutting down does not wait: it answers at once, as if the backend stayed unreachable
    t0 = time.monotonic()
    assert jm._after_training("check", unreachable, claim, unknown=True, stopping=lambda: True) is True
    assert time.monotonic() - t0 < 1.0
    # unreachable for longer than the patience: the run goes on as the owner (its put is idempotent per job)
    monkeypatch.setattr(jobs_mod, "AFTER_TRAINING_ATTEMPTS", 2)
    assert jm._after_training("check the job's owner", unreachable, claim, unknown=True) is True
    assert jm._after_training("read the cancel flag", unreachable, claim, unknown=False) is False


def test_a_chat_format_the_model_cannot_render_is_named_where_it_was_sent(
    managers, tiny_llama_bundle, monkeypatch
):
    """A base model without a chat template: `prompt_format: chat` is refused naming the field as sent, at the top
    level (as a plain HTTP body may send it) or under "hyperparameters" (as the SDK sends it; it was named the nested
    way always)."""
    from server.training import TrainingValidationError

    monkeypatch.setattr(tiny_llama_bundle.tokenizer, "chat_template", None)
    jm = managers()
    for req, param in (
        (request_(prompt_format="chat"), "hyperparameters.prompt_format"),
        ({**request_(), "prompt_format": "chat"}, "prompt_format"),
    ):
        with pytest.raises(TrainingValidationError, match="needs a tokenizer with a chat template") as e:
            jm.submit(req)
        assert e.value.param == param, req


def test_defaults_stay_within_the_operators_limits(managers):
    """A prefix length or step count left to the method never exceeds the server's limits (the job would be
    accepted, then fail on its worker), and the step limit bounds what a job runs, whatever its epochs x examples."""
    from server.training import TrainingLimits

    jm = managers(limits=TrainingLimits(max_prefix_length=8, max_steps=5))
    req = request_(epochs=4)  # 8 examples at batch 2: 16 steps planned
    del req["prefix_length"]  # the method's default is 16
    rec = jm.submit(req)
    assert rec.prefix_length == 8
    no_epochs = request_(name="bot2")
    del no_epochs["hyperparameters"]["epochs"]  # the method's min_steps (12) is above the limit
    rec2 = jm.submit(no_epochs)
    assert rec2.hyperparameters["min_steps"] == 5
    assert jm.work("w1", max_jobs=2) == 2
    for r in (rec, rec2):
        done = wait_status(jm, r.job_id, ("succeeded", "failed"))
        assert done.status == "succeeded", done.error
        assert done.summary["steps"] == done.summary["total_steps"] == 5


def test_a_job_given_epochs_stores_no_min_steps_for_older_workers(managers):
    jm = managers()
    assert "min_steps" not in jm.submit(request_(epochs=2)).hyperparameters
    req = request_(name="bot2")
    del req["hyperparameters"]["epochs"]
    assert (
        jm.submit(req).hyperparameters["min_steps"] == 12
    )  # the method's default, which the worker must see


# ------------------------------------------------------------------------------------------------ dead workers
def _ghost_claim(jm: JobManager):
    """A worker that takes the job and then never heartbeats again (as if it had died)."""
    if jm.backend.kind == "redis":
        return wait_for(lambda: jm.backend.claim("ghost-worker", block_ms=100), what="ghost claim")
    return wait_for(lambda: jm.backend.claim("ghost-worker"), what="ghost claim")


def _kill_ghost(jm: JobManager, claim) -> None:
    if jm.backend.kind == "disk":  # the kernel drops a dead process's flock: do what it would do
        os.close(claim.fd)


class _Crash(BaseException):
    """The process dying at that point (nothing after it runs, no clean-up)."""


def test_disk_submission_interrupted_at_each_step(tiny_llama_bundle, tmp_path, monkeypatch):
    """A submission refused while writing (disk full) leaves nothing. One whose process died part-way leaves either
    nothing visible (before its record: the reclaimer drops the tenant's slot it took, a retry with its key makes
    one job) or a job (after its record: the retry answers with it and the reclaimer enqueues it): one key, one
    job, run once."""
    store = open_store(f"file://{tmp_path / 'store'}")
    jm = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0}, max_jobs_per_tenant=1)
    backend = jm.backend

    def fail_with(exc):
        def f(*a, **k):
            raise exc

        return f

    with monkeypatch.context() as m:  # disk full at the last step: 503, nothing left
        m.setattr(backend, "_enqueue", fail_with(OSError(28, "No space left on device")))
        with pytest.raises(StoreUnavailable):
            jm.submit_once(request_(epochs=1), "k-1")
    assert jm.list() == [] and backend.find_submitted("acme", "k-1") is None
    assert not any(backend._dirs["active"].glob("*/*"))
    write_atomic = jobs_disk.write_atomic

    def crash_at_key(path, text):
        if "idempotency" in path.parts:
            raise _Crash()
        write_atomic(path, text)

    for where, target, fn in (
        (jobs_disk, "write_atomic", crash_at_key),
        (backend, "_write", fail_with(_Crash())),
    ):
        with monkeypatch.context() as m:  # dies writing its key, or before its record
            m.setattr(where, target, fn)
            with pytest.raises(_Crash):
                jm.submit_once(request_(epochs=1), "k-1")
        assert jm.list() == [] and backend.find_submitted("acme", "k-1") is None
        assert backend.reclaim_stale() == []
        assert not any(backend._dirs["active"].glob("*/*"))  # the tenant's slot is given back
    with monkeypatch.context() as m:  # dies after the record, before the queue marker
        m.setattr(backend, "_enqueue", fail_with(_Crash()))
        with pytest.raises(_Crash):
            jm.submit_once(request_(epochs=1), "k-1")
    (rec,) = jm.list()
    again, replayed = jm.submit_once(request_(epochs=1), "k-1")  # the client's retry
    assert replayed and again.job_id == rec.job_id
    assert backend.claim("w") is None
    assert backend.reclaim_stale() == [rec.job_id]
    assert backend.reclaim_stale() == []  # once
    assert jm.run_one("w") and jm.get(rec.job_id).status == "succeeded"
    assert [r.job_id for r in jm.list()] == [rec.job_id] and len(store.versions("acme", "bot")) == 1
    jm.shutdown()
    store.close()


def test_an_idempotency_key_compares_the_request_not_its_spelling(managers):
    """The same request written another accepted way (hyperparameters nested or at the top level, `lr`, a null or
    absent field, 2 or 2.0) is the same submission; a different value is not."""
    jm = managers(max_jobs_per_tenant=3)
    base = {k: v for k, v in request_().items() if k != "hyperparameters"}
    first, _ = jm.submit_once({**base, "hyperparameters": {"epochs": 2, "learning_rate": 0.001}}, "k")
    for variant in (
        {**base, "epochs": 2, "learning_rate": 1e-3},
        {**base, "hyperparameters": {"epochs": 2.0, "lr": 0.001}},
        {**base, "epochs": 2, "hyperparameters": {"learning_rate": 0.001, "seed": None}},
        {**base, "init_from": None, "hyperparameters": {"epochs": 2, "learning_rate": 0.001}},
    ):
        rec, replayed = jm.submit_once(variant, "k")
        assert replayed and rec.job_id == first.job_id, variant
    with pytest.raises(IdempotencyKeyReused):
        jm.submit_once({**base, "hyperparameters": {"epochs": 3, "learning_rate": 0.001}}, "k")


def test_dead_worker_job_is_taken_over(managers, store):
    api = managers()
    rec = api.submit(request_(epochs=2))
    ghost = _ghost_claim(api)
    assert api.get(rec.job_id).status == "running" and api.get(rec.job_id).worker == "ghost-worker"
    _kill_ghost(api, ghost)
    worker = managers(in_process_workers=1)
    worker.start()
    done = wait_status(api, rec.job_id, ("succeeded", "failed"), timeout=60)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2 and done.worker != "ghost-worker"
    assert store.get_meta("acme", "bot").version == done.prefix_version


def test_dead_worker_job_fails_with_reason_after_max_attempts(managers, store):
    api = managers(max_attempts=1)
    rec = api.submit(request_(epochs=2))
    ghost = _ghost_claim(api)
    _kill_ghost(api, ghost)
    worker = managers(in_process_workers=1, max_attempts=1)
    worker.start()
    done = wait_status(api, rec.job_id, ("succeeded", "failed"), timeout=60)
    assert done.status == "failed"
    # the tenant reads the error: the worker's name (its host and pid) goes to the log only
    assert "its worker" in done.error and "giving up" in done.error and "ghost-worker" not in done.error
    assert store.list() == []
    # the slot of the tenant is free again
    assert api.submit(request_(name="next")).status == "queued"


def test_jobs_of_dead_workers_are_taken_over_one_each_at_once(managers, store):
    """Two jobs whose workers died: two workers polling take one each as soon as they are stale (a worker taking
    over a stale job used to reclaim all of them, restarting the others' idle time: the second waited for another
    stale period with a worker idle)."""
    api = managers()
    recs = [api.submit(request_(tenant=t, epochs=1)) for t in ("acme", "globex")]
    ghosts = [_ghost_claim(api), _ghost_claim(api)]
    for g in ghosts:
        _kill_ghost(api, g)
    kw = {"block_ms": 50} if api.backend.kind == "redis" else {}
    # (the disk backend's reclaimer requeues dead workers' jobs; Redis's claim takes them over)
    if api.backend.kind == "disk":
        assert len(api.backend.reclaim_stale()) == 2
    first = wait_for(lambda: api.backend.claim("w1", **kw), what="the first take-over")
    second = api.backend.claim("w2", **kw)  # at once: the other job is as stale as the first was
    assert second is not None, "the second stale job was not available to an idle worker"
    assert {first.record.job_id, second.record.job_id} == {r.job_id for r in recs}


@pytest.mark.redis
def test_a_dead_workers_job_behind_many_running_ones_is_taken_over(tiny_llama_bundle, redis_store_url):
    """XAUTOCLAIM looks at 10 pending entries a call: a stale job queued after a dozen running ones (pending too,
    kept fresh by their heartbeats) is still found (the scan follows its cursor)."""
    from server.training.jobs import open_backend
    from server.training.records import JobRecord

    backend = open_backend(redis_store_url, max_attempts=2, stale_after_s=0.5, retention_s=60)
    examples = [{"prompt": "a", "completion": "b"}]

    def record(job_id: str, tenant: str) -> JobRecord:
        return JobRecord(job_id, tenant, "bot", "prompt_tuning", 2)

    try:
        live = []
        for i in range(12):
            backend.create(record(f"job-live-{i:02d}", f"t{i}"), examples, 10)
            live.append(wait_for(lambda: backend.claim("alive", block_ms=50), what="a live claim"))
        backend.create(record("job-orphan", "orphan"), examples, 10)
        assert wait_for(lambda: backend.claim("ghost", block_ms=50), what="the ghost's claim")
        deadline = time.monotonic() + 10
        got = None
        while got is None and time.monotonic() < deadline:
            for c in live:  # the live jobs keep beating
                backend.heartbeat(c, {"step": 1})
            got = backend.claim("rescuer", block_ms=50)
            time.sleep(0.1)
        assert got is not None and got.record.job_id == "job-orphan"
    finally:
        backend.close()


def test_a_job_whose_prefix_is_stored_succeeds_whatever_model_the_next_worker_loaded(
    managers, store, tiny_llama_bundle
):
    """A run stored the job's prefix and died; a worker with another model takes the job: it records the stored
    version (the job succeeded: its prefix is visible) instead of failing it for the model mismatch."""
    import dataclasses

    api = managers(max_attempts=3)
    rec = api.submit(request_(epochs=1))
    ghost = _ghost_claim(api)
    kv = {"kv": torch.zeros(2, 2, 2, 3, 16)}
    stored = store.put("acme", "bot", "prompt_tuning", kv, base_model_fingerprint=tiny_llama_bundle.fingerprint,
                       prefix_length=3, training={"job_id": rec.job_id, "steps": 4, "total_steps": 4, "epochs": 1})  # fmt: skip
    _kill_ghost(api, ghost)
    other = dataclasses.replace(tiny_llama_bundle, fingerprint="f" * 64)
    wrong = managers(bundle=other, in_process_workers=1, max_attempts=3)
    wrong.start()
    done = wait_status(api, rec.job_id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded" and done.prefix_version == stored.version, done.error


@pytest.mark.parametrize("ending", ["cancel", "last attempt", "cancel, the worker's clock 2 minutes behind"])
def test_a_dead_worker_that_stored_its_prefix_ends_its_job_succeeded(managers, store, ending, monkeypatch):
    """The worker stored the job's prefix and died before recording it; then the job is cancelled, or that was
    its last attempt. Whoever ends it finds the version by the job id and records `succeeded` with it: it used to
    end `cancelled` or `failed` while its prefix was visible (also when the worker's clock, which dates the
    version, is behind the clock of the server that dated the job)."""
    import types

    import prefix_store.disk
    import prefix_store.redis_store

    api = managers(max_attempts=1)
    rec = api.submit(request_(epochs=1))
    ghost = _ghost_claim(api)
    kv = {"kv": torch.zeros(2, 2, 2, 3, 16)}
    behind = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    behind.time = lambda: time.time() - (120 if "clock" in ending else 0)
    with monkeypatch.context() as m:
        for mod in (prefix_store.disk, prefix_store.redis_store):
            m.setattr(mod, "time", behind)
        stored = store.put("acme", "bot", "prompt_tuning", kv, base_model_fingerprint="x", prefix_length=3,
                       training={"job_id": rec.job_id, "steps": 4, "total_steps": 4, "epochs": 1})  # fmt: skip
    assert stored.created < rec.created or "clock" not in ending
    if ending.startswith("cancel"):
        assert api.cancel(rec.job_id).status == "running"  # asked of a running job: its worker would stop
    _kill_ghost(api, ghost)
    worker = managers(in_process_workers=1, max_attempts=1)
    worker.start()
    done = wait_status(api, rec.job_id, ("succeeded", "failed", "cancelled"), timeout=60)
    assert done.status == "succeeded", (done.status, done.error)
    assert done.prefix_version == stored.version and done.error is None and done.progress["step"] == 4
    assert store.versions("acme", "bot") == [stored.version]


def test_ghost_cannot_overwrite_the_outcome(managers, store):
    """A worker presumed dead that comes back cannot record anything for the job it lost."""
    from server.training.backend_disk import LostClaim as DiskLost
    from server.training.backend_redis import LostClaim as RedisLost

    api = managers()
    rec = api.submit(request_(epochs=1))
    ghost = _ghost_claim(api)
    _kill_ghost(api, ghost)
    worker = managers(in_process_workers=1)
    worker.start()
    wait_status(api, rec.job_id, "succeeded", timeout=60)
    if api.backend.kind == "disk":
        ghost.fd = os.open(os.devnull, os.O_RDONLY)  # its old fd was closed above
    with pytest.raises((DiskLost, RedisLost)):
        api.backend.heartbeat(ghost, {"step": 1})
    with pytest.raises((DiskLost, RedisLost)):
        api.backend.finish(ghost, "failed", error="late")
    assert api.get(rec.job_id).status == "succeeded"


WORKER_SCRIPT = """
import sys
import threading
from server.training import worker_main
sys.exit(worker_main(sys.argv[1], model=sys.argv[2], jobs_url=None, device="cpu", dtype="float32",
                     heartbeat_s=0.1, stale_after_s=1.5, poll_s=0.05, train_threads=1))
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tiny_tokenizer()
    make_tiny_llama(tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_sigkilled_worker_process_job_is_reclaimed(managers, store, tiny_model_dir, tmp_path):
    """`prefixserve worker` (worker_main) in a subprocess takes the job; SIGKILL mid-job; an in-process worker
    takes it over and it succeeds (the subprocess never wrote anything)."""
    api = managers()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFIXSERVE_CACHE": str(tmp_path / "cache")}
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, store.url, str(tiny_model_dir)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        rec = api.submit(request_(epochs=30))
        running = wait_for(
            lambda: (r := api.get(rec.job_id)).status == "running" and r.progress["step"] > 0 and r,
            timeout=120, what="the subprocess worker running the job",
        )  # fmt: skip
        assert running.worker.endswith("-proc") and str(proc.pid) in running.worker
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert api.get(rec.job_id).status == "running"  # nobody knows yet
    worker = managers(in_process_workers=1)
    worker.start()
    done = wait_status(api, rec.job_id, ("succeeded", "failed"), timeout=300)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2 and done.worker != running.worker
    assert store.get_meta("acme", "bot").version == 1


def test_sigkilled_server_during_training_leaves_nothing_and_job_is_reclaimed(
    managers, store, subprocess_server
):
    """A `prefixserve serve` process training in-process is SIGKILLed mid-job: no prefix (or half of one) is
    visible, and another worker takes the job over once its heartbeat is stale; it then succeeds exactly once."""
    import httpx

    srv = subprocess_server(store_url=store.url, training_workers=1)
    # long enough (400 optimizer steps, ~3 s on a 2-core machine) that the kill, 0.2 s after the job is seen
    # running, lands mid-job; the server persists progress only on its heartbeats (every 2 s), so "running" is
    # what the test can see
    r = httpx.post(f"{srv.url}/prefixes", json=request_(n=32, epochs=25), timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    api = managers()
    running = wait_for(
        lambda: (j := api.get(job_id)).status != "queued" and j,
        timeout=120, interval=0.01, what="the server's in-process worker taking the job",
    )  # fmt: skip
    assert running.status == "running", f"job ended {running.status} before the kill: make it longer"
    time.sleep(0.2)
    srv.proc.send_signal(signal.SIGKILL)
    assert srv.proc.wait(10) == -signal.SIGKILL
    assert not store.exists("acme", "bot") and store.list("acme") == []
    assert api.get(job_id).status == "running"  # nobody knows yet
    worker = managers(in_process_workers=1)
    worker.start()
    done = wait_status(api, job_id, ("succeeded", "failed"), timeout=300)
    assert done.status == "succeeded", done.error
    assert done.attempts == 2 and done.worker != running.worker
    assert [m.version for m in store.list("acme")] == [1]


def test_worker_process_sigterm_requeues_its_job(managers, store, tiny_model_dir, tmp_path):
    """`prefixserve worker` itself (the CLI): SIGTERM mid-job puts the job back in the queue and exits 0."""
    api = managers()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFIXSERVE_CACHE": str(tmp_path / "cache")}
    cli = ["-m", "server", "worker", "--store", store.url, "--model", str(tiny_model_dir), "--device", "cpu",
           "--dtype", "float32", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, *cli], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        rec = api.submit(request_(epochs=100))
        wait_for(
            lambda: api.get(rec.job_id).status == "running", timeout=120, what="running in the subprocess"
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    r = api.get(rec.job_id)
    assert r.status == "queued" and r.attempts == 0 and "requeued" in r.error
    assert not store.exists("acme", "bot")


# ------------------------------------------------------------------------------------------------ shutdown, worker
def test_shutdown_requeues_and_next_worker_finishes(managers, store):
    jm = managers(in_process_workers=1)
    jm.start()
    rec = jm.submit(request_(epochs=30))
    wait_for(lambda: jm.get(rec.job_id).progress["step"] > 0, what="progress")
    jm.shutdown(wait=True)
    r = jm.get(rec.job_id) if jm.backend.kind == "disk" else managers().get(rec.job_id)
    assert r.status == "queued" and r.attempts == 0 and "requeued" in r.error  # why it waits again
    nxt = managers(in_process_workers=1)
    nxt.start()
    # running again: the reason of the attempt given back is no error of this one (clients read `error` as failure)
    wait_for(lambda: nxt.get(rec.job_id).status != "queued", what="claimed again")
    assert nxt.get(rec.job_id).error is None
    done = wait_status(nxt, rec.job_id, ("succeeded", "failed"), timeout=120)
    assert done.status == "succeeded" and done.attempts == 1 and done.error is None


def test_terminal_jobs_are_pruned_hourly_not_once_per_process(managers, monkeypatch):
    """A long-lived worker prunes terminal jobs past retention at its first reclaim and then every PRUNE_EVERY_S
    (it pruned once, so a server running for weeks kept every record and every list read them all)."""
    jm = managers()
    pruned = []
    monkeypatch.setattr(jm.backend, "prune", lambda: pruned.append(1) or 0)
    clock = [1000.0]
    fake_time = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.monotonic = lambda: clock[0]
    monkeypatch.setattr(jobs_mod, "time", fake_time)  # this module's clock only
    for dt in (0, 5, 60, jobs_mod.PRUNE_EVERY_S - 60, 1, jobs_mod.PRUNE_EVERY_S):
        clock[0] += dt
        jm._maybe_reclaim()
    assert len(pruned) == 3  # at the start, past the first hour, past the second


def test_run_worker_runs_queued_jobs(managers, store, tiny_llama_bundle):
    api = managers()
    ids = [api.submit(request_(name=f"p{i}", epochs=1)).job_id for i in range(2)]
    n = run_worker(store.url, bundle=tiny_llama_bundle, max_jobs=2, train_threads=1, poll_s=0.05,
                   heartbeat_s=0.1, stale_after_s=1.5)  # fmt: skip
    assert n == 2
    assert [api.get(i).status for i in ids] == ["succeeded", "succeeded"]
    assert {m.name for m in store.list("acme")} == {"p0", "p1"}


def test_run_worker_hands_its_retention_to_the_jobs_backend(store, tiny_llama_bundle, monkeypatch):
    """`prefixserve worker --jobs-retention-s` (PREFIXSERVE_JOBS_RETENTION_S) sets how long the jobs the worker
    ends are kept: the backend it opens deletes them after that time, not after the default 7 days."""
    seen: list[float] = []
    monkeypatch.setattr(JobManager, "work", lambda self, *a, **kw: seen.append(self.backend.retention_s) or 0)
    assert run_worker(store.url, bundle=tiny_llama_bundle, max_jobs=0, train_threads=1, retention_s=60) == 0
    assert seen == [60]


def test_ping_reports_an_unreachable_backend(tiny_llama_bundle, tmp_path):
    st = open_store(f"file://{tmp_path / 's'}")
    jm = JobManager(tiny_llama_bundle, st, jobs_url="redis://127.0.0.1:1/0", in_process_workers=0)
    with pytest.raises(StoreUnavailable):
        jm.ping()
    with pytest.raises(StoreUnavailable):
        jm.submit(request_())
    jm.shutdown()


def test_jobs_live_next_to_the_store(tiny_llama_bundle, tmp_path, redis_store_url):
    st = open_store(f"file://{tmp_path / 'store'}")
    jm = JobManager(tiny_llama_bundle, st, in_process_workers=0)
    assert jm.backend.kind == "disk" and jm.backend.root == tmp_path / "store.jobs"
    jm.submit(request_())
    assert len(list((tmp_path / "store.jobs" / "records").glob("*.json"))) == 1
    jm.shutdown()
    rs = open_store(redis_store_url)
    jr = JobManager(tiny_llama_bundle, rs, in_process_workers=0)
    assert jr.backend.kind == "redis" and jr.backend.ns == rs.namespace
    jr.shutdown()
    rs.close()


# ------------------------------------------------------------------------------------------------ serving meanwhile
def test_serving_unaffected_while_a_propagation_job_trains(managers, tiny_llama_bundle):
    """The trainer's hooks act only in its own thread: the engine's outputs on the shared model are identical
    while a prefix-propagation job trains, and generation keeps going."""
    b = tiny_llama_bundle
    key = PrefixKey("t", "p", 1)
    kv = torch.randn(
        b.spec.num_layers,
        2,
        b.spec.num_kv_heads,
        4,
        b.spec.head_dim,
        generator=torch.Generator().manual_seed(3),
    )
    engine = LLMEngine(b, DictPrefixProvider({key: kv}), EngineConfig(kv_cache_bytes=8 * 2**20))
    prompts = [render_prompt(b.tokenizer, f"hello {i}", "chat") for i in range(4)]

    def gen():
        reqs = [Request(f"r{i}-{time.monotonic_ns()}", p, SamplingParams(max_tokens=12, ignore_eos=True),
                        key if i % 2 else None) for i, p in enumerate(prompts)]  # fmt: skip
        return [o.token_ids for o in engine.generate(reqs)]

    before = gen()
    jm = managers(in_process_workers=1)
    jm.start()
    rec = jm.submit(request_(method="prefix_propagation", epochs=100))
    wait_for(lambda: jm.get(rec.job_id).progress["step"] > 0, what="training running")
    during = [gen() for _ in range(3)]
    assert jm.get(rec.job_id).status == "running", jm.get(rec.job_id).error
    jm.cancel(rec.job_id)
    assert all(d == before for d in during)


def test_in_process_training_thread_yields_the_cpu_to_serving(managers, monkeypatch):
    """In-process workers train at a lower OS priority (nice +train_nice, per thread) with their own torch
    thread count; the calling (serving) thread keeps its priority and threads."""
    seen = {}
    real = jobs_mod.train_prefix

    def spy(*a, **k):
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        res = real(*a, **k)
        seen["threads"] = k["num_threads"]
        return res

    monkeypatch.setattr(jobs_mod, "train_prefix", spy)
    base_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    jm = managers(in_process_workers=1, train_nice=5)
    jm.start()
    rec = jm.submit(request_(epochs=1))
    assert wait_status(jm, rec.job_id, ("succeeded", "failed")).status == "succeeded"
    assert seen["nice"] == min(19, base_nice + 5) and seen["threads"] == 1
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base_nice


def test_workers_on_the_same_host_and_pid_have_different_ids(managers):
    """Pods of one Deployment differ only at the end of a long host name and all run as pid 1: ids made from host
    and pid alone collided, and a presumed-dead worker's late writes were taken for the new owner's."""
    a, b = managers(), managers()
    assert a.worker_name != b.worker_name
    assert a.worker_name.startswith(os.uname().nodename[-40:] + f"-{os.getpid()}-")


def test_redis_jobs_cancelled_while_queued_leave_no_pending_entries(tiny_llama_bundle, redis_store_url):
    """A worker reading the stream entry of a job cancelled while it was queued acknowledges and drops it (it was
    left pending for good and handed out again to every worker after stale_after_s)."""
    store = open_store(redis_store_url)
    api = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0})
    try:
        ids = [api.submit(request_(name=f"b{i}")).job_id for i in range(3)]
        for j in ids:
            api.cancel(j)
        for _ in range(3):
            assert api.run_one("w1", block_s=0.1) is False
        r, stream = api.backend._r, api.backend._stream
        assert r.xlen(stream) == 0 and r.xpending(stream, "trainers")["pending"] == 0
        assert [api.get(j).status for j in ids] == ["cancelled"] * 3
    finally:
        api.shutdown()
        store.close()


def test_redis_a_job_cancelled_while_its_turn_is_deferred_leaves_no_entry(tiny_llama_bundle, redis_store_url):
    """A worker moving a queued job's entry to the stream's end (another tenant's turn first) while the job is
    cancelled: the move added a fresh entry for the cancelled job, left until some worker read it."""
    store = open_store(redis_store_url)
    api = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0})
    try:
        b = api.backend
        job = api.submit(request_()).job_id
        ((entry, _),) = b._r.xrange(b._stream)  # read by a worker, which then defers it...
        api.cancel(job)  # ...as the job is cancelled
        assert b._move_back(keys=[b._stream, b._job(job)], args=[entry, job]) is None
        assert b._r.xlen(b._stream) == 0 and api.get(job).status == "cancelled"
        queued = api.submit(request_(name="other")).job_id  # one still queued is moved, and its entry known
        ((entry, _),) = b._r.xrange(b._stream)
        moved = b._move_back(keys=[b._stream, b._job(queued)], args=[entry, queued])
        assert [e for e, _ in b._r.xrange(b._stream)] == [moved] and b._r.hget(
            b._job(queued), "queue_entry"
        ) == moved
    finally:
        api.shutdown()
        store.close()


def test_redis_a_requeued_job_cancelled_leaves_no_entry(tiny_llama_bundle, redis_store_url):
    """A job put back in the queue (its worker shut down, or its job was taken back) and then cancelled: its fresh
    stream entry goes with it, not left for some worker to read (they piled up with no worker reading)."""
    store = open_store(redis_store_url)
    api = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0})
    try:
        b = api.backend
        job = api.submit(request_()).job_id
        claim = b.claim("w1", block_ms=10)
        assert claim is not None and claim.record.job_id == job
        b.requeue(claim, "its worker shut down")
        assert api.get(job).status == "queued" and b._r.xlen(b._stream) == 1
        api.cancel(job)
        assert api.get(job).status == "cancelled" and b._r.xlen(b._stream) == 0
    finally:
        api.shutdown()
        store.close()


def test_redis_deleting_a_tenants_oldest_jobs_drops_them_from_the_global_index(
    tiny_llama_bundle, redis_store_url
):
    """The jobs the per-tenant cap deletes leave the index of every job too (what an admin's listing and the
    job counts read), not only the tenant's: it does not grow with every job ever submitted."""
    store = open_store(redis_store_url)
    api = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0, "jobs_kept_per_tenant": 2})
    try:
        b = api.backend
        for i in range(8):
            api.cancel(api.submit(request_(name=f"n{i}")).job_id)
        kept = {r.job_id for r in api.list("acme")}
        assert len(kept) < 8
        assert {m.decode() for m in b._r.zrange(b._index, 0, -1)} == kept
    finally:
        api.shutdown()
        store.close()


def test_redis_job_queue_survives_losing_its_stream(tiny_llama_bundle, redis_store_url):
    """The stream key gone (a Redis restart without persistence, a flush): the next submit makes a bare stream, and
    the workers create the consumer group again instead of failing with NOGROUP forever."""
    store = open_store(redis_store_url)
    jm = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 1})
    try:
        jm.start()
        first = jm.submit(request_(epochs=1))
        assert wait_status(jm, first.job_id, ("succeeded", "failed")).status == "succeeded"
        jm.backend._r.delete(jm.backend._stream)
        second = jm.submit(request_(name="bot2", epochs=1))
        assert wait_status(jm, second.job_id, ("succeeded", "failed"), timeout=30).status == "succeeded"
    finally:
        jm.shutdown(wait=True, timeout=30)
        store.close()


def test_a_dead_workers_job_settles_past_an_unreadable_version(tiny_llama_bundle, tmp_path):
    """The name's newest version has metadata refused when read (a lone surrogate, stored before writes refused
    them): looking for the job's prefix skips it, so the dead worker's cancelled job ends cancelled (it stayed
    running forever, "cannot tell whether it stored its prefix"), and a new job for the name trains."""
    store = open_store(f"file://{tmp_path / 'store'}")
    kv = {"kv": torch.zeros(2, 2, 2, 3, 16)}
    meta = store.put("acme", "bot", "prompt_tuning", kv, base_model_fingerprint="x", prefix_length=3,
                     extra={"note": "ok"})  # fmt: skip
    mf = next((tmp_path / "store").rglob(f"v{meta.version}.json"))
    mf.write_text(mf.read_text().replace('"ok"', '"\\ud800"'))
    assert store.list("acme") == []  # refused when read
    api = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0, "max_attempts": 1})
    try:
        rec = api.submit(request_(epochs=1))
        ghost = _ghost_claim(api)
        assert api._stored_by(api.get(rec.job_id)) is None
        api.cancel(rec.job_id)
        _kill_ghost(api, ghost)
        api.backend.reclaim_stale()
        assert api.get(rec.job_id).status == "cancelled"
    finally:
        api.shutdown(wait=True, timeout=10)
        store.close()


def _disk_job(backend, tenant: str, job_id: str):
    from server.training.records import JobRecord

    rec = JobRecord(job_id=job_id, tenant_id=tenant, name="bot", method="prefix_tuning", prefix_length=4)
    return backend.create(rec, [{"prompt": "q", "completion": "a"}], max_active=1)


def test_a_worker_that_could_not_heartbeat_through_a_full_disk_is_not_failed_when_it_clears(
    tmp_path, monkeypatch
):
    """Two servers sharing a job folder; the disk is full for longer than `stale_after_s` while one trains, so its
    heartbeats fail. The other's reclaimer failed the job ("stopped heartbeating") the moment the disk had room
    again, before the worker's next heartbeat could land. A reclaimer judges no job stale while it cannot write a
    record, and gives each one `stale_after_s` from when it can again; a worker that stays silent past that is
    still failed."""

    from server.training.backend_disk import DiskJobBackend

    worker = DiskJobBackend(tmp_path / "jobs", stale_after_s=30)
    other = DiskJobBackend(tmp_path / "jobs", stale_after_s=30)
    _disk_job(worker, "acme", "job-a")
    claim = worker.claim("w1")
    assert claim is not None
    rec = worker.get("job-a")
    rec.heartbeat = time.time() - 40  # its last heartbeat before the disk filled up
    worker._write(rec)
    with _disk_full_for_records():
        assert other.reclaim_stale() == [] and other.get("job-a").status == "running"
    # room again: the worker has stale_after_s to heartbeat (it was failed here, before its next heartbeat)
    assert other.reclaim_stale() == [] and other.get("job-a").status == "running"
    assert not worker.heartbeat(claim, None) and other.reclaim_stale() == []
    # a reclaimer that was not looking while the disk was full (busy training, started since) finds the heartbeat
    # stale: it confirms it a pass later, by when the worker's heartbeat has landed
    fresh = DiskJobBackend(tmp_path / "jobs", stale_after_s=30)
    fresh.stale_confirm_s = 0.2
    rec = worker.get("job-a")
    rec.heartbeat = time.time() - 40
    worker._write(rec)
    assert fresh.reclaim_stale() == [] and not worker.heartbeat(claim, None)
    time.sleep(0.25)
    assert fresh.reclaim_stale() == [] and fresh.get("job-a").status == "running"
    # one that stays silent past stale_after_s, confirmed, is failed, as before
    rec = worker.get("job-a")
    rec.heartbeat = time.time() - 40
    worker._write(rec)
    assert fresh.reclaim_stale() == []
    time.sleep(0.25)
    assert fresh.reclaim_stale() == ["job-a"]
    other = fresh
    assert "stopped heartbeating" in other.get("job-a").error
    assert not list(other._dirs["records"].glob(".tmp-probe-*"))


@contextlib.contextmanager
def _disk_full_for_records() -> Iterator[None]:
    """Inside the block the jobs folder's disk is full: writing a job backend's probe file fails with ENOSPC."""
    import builtins

    from server.training import backend_disk

    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if "w" in mode and ".tmp-probe-" in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(backend_disk, "open", full, raising=False)
        yield


def _watched_job(tmp_path, monkeypatch, stale_after_s: float, stale_confirm_s: float):
    """A worker running job-a and a reclaimer beside it, with both clocks (wall, monotonic) moved forward by the
    test (`ahead[0] += s`): seconds of slack, whatever the machine's load."""
    from server.training.backend_disk import DiskJobBackend

    real_time, real_mono = time.time, time.monotonic
    ahead = [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + ahead[0])
    monkeypatch.setattr(time, "monotonic", lambda: real_mono() + ahead[0])
    worker = DiskJobBackend(tmp_path / "jobs", stale_after_s=stale_after_s)
    reaper = DiskJobBackend(tmp_path / "jobs", stale_after_s=stale_after_s)
    reaper.stale_confirm_s = stale_confirm_s
    _disk_job(worker, "acme", "job-a")
    claim = worker.claim("w1")
    assert claim is not None
    return ahead, worker, reaper, claim


def test_a_heartbeat_watched_before_the_disk_filled_gets_stale_after_s_once_it_clears(tmp_path, monkeypatch):
    """A reclaimer that watched a worker's heartbeat before the disk filled up: the worker could not heartbeat
    while it was full, and the time it was full does not count as the heartbeat standing still. Once records can
    be written again the worker has `stale_after_s` to heartbeat; its job is not failed the moment the disk
    clears. (Both clocks are moved by the test: seconds of slack, whatever the machine's load.)"""

    ahead, worker, reaper, claim = _watched_job(tmp_path, monkeypatch, stale_after_s=5, stale_confirm_s=0)
    assert not worker.heartbeat(claim, None)
    assert reaper.reclaim_stale() == []  # watching the heartbeat from now
    with _disk_full_for_records():
        ahead[0] += 6  # full for longer than stale_after_s
        assert reaper.reclaim_stale() == []
    assert reaper.reclaim_stale() == [] and reaper.get("job-a").status == "running"
    assert not worker.heartbeat(claim, None)
    assert reaper.reclaim_stale() == [] and reaper.get("job-a").status == "running"


def test_a_stale_heartbeat_is_confirmed_stale_confirm_s_after_it_was_found_stale(tmp_path, monkeypatch):
    """A reclaimer that finds a heartbeat stale fails its job only on a pass `stale_confirm_s` after it first found
    it stale (giving a worker whose disk was full meanwhile the time to get its heartbeat in), not after it first
    saw the heartbeat: a heartbeat watched for long while fresh is not failed the moment it turns stale. (Both
    clocks are moved by the test: seconds of slack either side, whatever the machine's load.)"""

    ahead, worker, reaper, _ = _watched_job(tmp_path, monkeypatch, stale_after_s=30, stale_confirm_s=5.0)
    rec = worker.get("job-a")
    rec.heartbeat = time.time() - 20  # stale 10 s from now
    worker._write(rec)
    assert reaper.reclaim_stale() == []  # fresh: first seen now
    ahead[0] += 11
    assert reaper.reclaim_stale() == []  # found stale now: to be confirmed 5 s later
    assert reaper.reclaim_stale() == [] and reaper.get("job-a").status == "running"  # not yet
    ahead[0] += 6
    assert reaper.reclaim_stale() == ["job-a"] and "stopped heartbeating" in reaper.get("job-a").error


def test_a_hung_worker_is_failed_though_the_clock_stepped_back_after_its_last_heartbeat(tmp_path):
    """A job's staleness was its heartbeat's age by the wall clock alone: stepped back an hour after a worker's
    last heartbeat (NTP, a VM restored), or a reclaimer on a host whose clock is behind the worker's, that age
    stayed negative and a hung worker kept its job for the hour. A heartbeat this process watched stand still
    for `stale_after_s` by its own monotonic clock is stale whatever the wall clock says."""
    from server.training.backend_disk import DiskJobBackend

    worker = DiskJobBackend(tmp_path / "jobs", stale_after_s=2.0)
    reaper = DiskJobBackend(tmp_path / "jobs", stale_after_s=2.0)
    reaper.stale_confirm_s = 0.2
    _disk_job(worker, "acme", "job-a")
    claim = worker.claim("w1")  # holds the job's lock: hung, not dead
    assert claim is not None
    rec = worker.get("job-a")
    rec.heartbeat = time.time() + 3600  # written before the clock went an hour back
    worker._write(rec)
    assert reaper.reclaim_stale() == []
    time.sleep(0.3)
    assert reaper.reclaim_stale() == [] and reaper.get("job-a").status == "running"  # (0.3 s < stale_after_s)
    time.sleep(2.0)
    # found stale by its watch, after a gap with no pass (a reclaimer busy training): confirmed a pass later,
    # not at once (the worker of a disk that was full meanwhile gets its heartbeat in first)
    assert reaper.reclaim_stale() == [] and reaper.get("job-a").status == "running"
    time.sleep(0.3)
    assert reaper.reclaim_stale() == ["job-a"] and "stopped heartbeating" in reaper.get("job-a").error
    # a live worker's heartbeat moves: however far ahead its clock, its job stays
    _disk_job(worker, "acme", "job-b")
    claim = worker.claim("w1")
    assert claim is not None and claim.record.job_id == "job-b"
    for _ in range(4):
        rec = worker.get("job-b")
        rec.heartbeat = time.time() + 3600 + _
        worker._write(rec)
        assert reaper.reclaim_stale() == []
        time.sleep(0.25)
    assert reaper.get("job-b").status == "running"


def test_turns_and_queue_order_survive_the_clock_stepping_back(tmp_path, monkeypatch):
    """Tenants' turns went by when each was last served, and the queue by when each job was queued, both by the
    wall clock: stepped back an hour (NTP, a VM restored), the tenant served after the step looked served least
    recently and took every claim for the hour (ABAAAAABBBBB), and a job queued after the step went before those
    queued earlier. Both are now stamped after the latest stamp there."""
    from server.training.backend_disk import DiskJobBackend
    from server.training.records import JobRecord

    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    b = DiskJobBackend(tmp_path / "jobs")

    def submit(job_id: str, tenant: str) -> None:
        rec = JobRecord(job_id=job_id, tenant_id=tenant, name="p", method="prefix_tuning", prefix_length=4)
        b.create(rec, [{"prompt": "x", "completion": "y"}], max_active=100)

    for i in range(4):
        submit(f"job-a{i}", "A")
        submit(f"job-b{i}", "B")
    order = []
    for k in range(8):
        if k == 2:
            offset[0] -= 3600
        claim = b.claim("w")
        assert claim is not None
        order.append(claim.record.tenant_id)
        b.finish(claim, "succeeded")
    assert "".join(order) == "ABABABAB"
    submit("job-c1", "C")
    submit("job-c2", "C")
    offset[0] -= 3600
    submit("job-c3", "C")
    assert _run_all(b) == ["job-c1", "job-c2", "job-c3"]


def _run_all(b) -> list[str]:
    """Claim and finish every queued job: their ids in the order they were claimed."""
    got = []
    while (claim := b.claim("w")) is not None:
        got.append(claim.record.job_id)
        b.finish(claim, "succeeded")
    return got


def test_jobs_queued_after_the_clock_stepped_back_keep_their_order_whatever_their_ids(tmp_path, monkeypatch):
    """Jobs queued after the wall clock stepped back are each stamped after every job already queued, not with
    the same stamp: they are claimed in the order they were queued, not in their job ids' order."""
    from server.training.backend_disk import DiskJobBackend
    from server.training.records import JobRecord

    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    b = DiskJobBackend(tmp_path / "jobs")

    def submit(job_id: str) -> None:
        rec = JobRecord(job_id=job_id, tenant_id="A", name="p", method="prefix_tuning", prefix_length=4)
        b.create(rec, [{"prompt": "x", "completion": "y"}], max_active=100)

    submit("job-z1")
    offset[0] -= 3600
    submit("job-y2")
    submit("job-x3")
    assert _run_all(b) == ["job-z1", "job-y2", "job-x3"]


def test_redis_turns_go_by_the_redis_clock_not_the_workers(redis_store_url, monkeypatch):
    """On Redis a tenant's last start was stamped with the claiming worker's clock: a worker whose clock is behind
    the others' (or stepped back) made its tenant look served least recently, and it took the turns. Stamped
    with Redis' clock, which every worker shares, and after the latest stamp (Redis' clock may step back too)."""
    from server.training.jobs import open_backend
    from server.training.records import JobRecord

    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    b = open_backend(redis_store_url, max_attempts=2, stale_after_s=60, retention_s=60)
    try:
        # and Redis' own clock stepped back an hour since B was last served
        ahead = f"{float(b._r.time()[0]) + 3600:.6f}"
        b._r.hset(b._served, mapping={"B": ahead, "@latest": ahead})
        for i in range(3):
            for t in ("A", "B"):
                rec = JobRecord(
                    job_id=f"job-{t}{i}", tenant_id=t, name="p", method="prefix_tuning", prefix_length=4
                )
                b.create(rec, [{"prompt": "x", "completion": "y"}], max_active=100)
        order = []
        for k in range(6):
            offset[0] = -3600.0 if k % 2 == 0 else 0.0  # two workers, one of them an hour behind
            claim = b.claim("w", block_ms=0)
            assert claim is not None
            order.append(claim.record.tenant_id)
            b.finish(claim, "succeeded")
        assert "".join(order) == "ABABAB"
    finally:
        b.close()


def test_a_torn_examples_file_fails_its_job_and_the_queue_goes_on(tmp_path):
    """A job whose examples file a crash left torn fails with the reason; the next job is taken (every worker
    retried the torn one forever, and nothing else trained)."""
    from server.training.backend_disk import DiskJobBackend

    b = DiskJobBackend(tmp_path / "jobs")
    _disk_job(b, "acme", "job-a")
    _disk_job(b, "globex", "job-b")
    b._examples("job-a").write_text('[{"prompt": "q", "compl')
    claim = b.claim("w1")
    assert claim is not None and claim.record.job_id == "job-b"
    torn = b.get("job-a")
    assert torn.status == "failed" and "examples could not be read" in torn.error
    _disk_job(b, "acme", "job-c")  # the tenant's slot is free again (no 429)


def test_a_torn_job_record_is_set_aside_and_frees_its_tenant(tmp_path):
    """An unreadable record (torn by a crash): the job is set aside, and its tenant's only job slot comes back at
    the next reclaim instead of answering 429 forever; stray temporary files are swept after an hour."""
    import os

    from server.training.backend_disk import DiskJobBackend
    from server.training.records import TooManyJobs

    b = DiskJobBackend(tmp_path / "jobs")
    _disk_job(b, "acme", "job-a")
    with pytest.raises(TooManyJobs):
        _disk_job(b, "acme", "job-b")
    path = b._record("job-a")
    path.write_text(path.read_text()[:40])
    assert b.claim("w1") is None
    assert not path.exists() and path.with_name(path.name + ".unreadable").exists()
    b.reclaim_stale()
    _disk_job(b, "acme", "job-b")
    # what a record write killed before its rename leaves (the sweep looked for a name no write gave its files)
    killed = "import os, sys; from pathlib import Path; from server import fsutil\n"
    killed += "os.replace = lambda *a: os._exit(9)\nfsutil.write_atomic(Path(sys.argv[1]), 'x')"
    target = b._record("job-b")
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", killed, str(target)], cwd=root).returncode == 9
    (old,) = b._dirs["records"].glob(".*.tmp*")
    new = b._dirs["records"] / ".tmp-new"
    new.write_text("x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    legacy = b._dirs["records"] / ".job-x.json.abc123.tmp"  # (named so by older builds)
    legacy.write_text("x")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    b.prune()
    assert not old.exists() and not legacy.exists() and new.exists()


def test_listing_one_tenants_jobs_reads_only_its_records(tmp_path, monkeypatch):
    """Days of finished jobs of every tenant: a tenant's listing, and the counts /metrics scrapes, read a record
    again only when it changed (50k records made each take ~25 s and 9 s)."""
    from server.training.backend_disk import DiskJobBackend
    from server.training.records import JobRecord

    b = DiskJobBackend(tmp_path / "jobs")
    for i in range(30):
        rec = JobRecord(job_id=f"job-{i:04d}", tenant_id="acme" if i < 25 else "globex", name="bot",
                        method="prefix_tuning", prefix_length=4)  # fmt: skip
        b.create(rec, [{"prompt": "q", "completion": "a"}], max_active=100)
    assert b.counts() == {"queued": 30}
    reads: list[str] = []
    real = b._read
    monkeypatch.setattr(b, "_read", lambda job_id: reads.append(job_id) or real(job_id))
    assert [r.job_id for r in b.list("globex")] == [f"job-{i:04d}" for i in range(25, 30)]
    assert sorted(reads) == [f"job-{i:04d}" for i in range(25, 30)]
    reads.clear()
    assert b.counts() == {"queued": 30} and reads == []
    b.cancel("job-0003")  # a changed record is read again
    assert b.counts() == {"queued": 29, "cancelled": 1} and reads == ["job-0003"] * (
        reads.count("job-0003") or 1
    )


def test_redis_job_counts_read_only_each_jobs_status(redis_store_url, monkeypatch):
    """/metrics scrapes the counts: the Redis backend reads each job's status field, not every record decoded."""
    from server.training.jobs import open_backend
    from server.training.records import JobRecord

    b = open_backend(redis_store_url, max_attempts=2, stale_after_s=60, retention_s=60)
    try:
        for i in range(5):
            b.create(JobRecord(f"job-c{i}", "acme" if i < 3 else "globex", "bot", "prompt_tuning", 2),
                     [{"prompt": "q", "completion": "a"}], 10)  # fmt: skip
        b.cancel("job-c1")
        expected = {"queued": 4, "cancelled": 1}
        assert {s: sum(r.status == s for r in b.list()) for s in expected} == expected
        monkeypatch.setattr(b, "_decode", lambda h: pytest.fail("counts decoded a whole record"))
        assert b.counts() == expected
    finally:
        b.close()


@pytest.mark.parametrize("fail", ["build", "start"])
def test_no_job_is_claimed_before_the_server_is_ready(tiny_llama_bundle, tmp_path, monkeypatch, fail):
    """The server's training workers start last, once the service is up: they started before it was built and
    warmed up, so a worker could claim a queued job that a signal during start-up (an immediate exit) or a failed
    start-up then left running. A start-up that fails leaves the queued job queued, no worker started."""
    import asyncio

    import server.api.app as app_mod
    from server.api import create_app
    from server.settings import Settings

    store = open_store(f"file://{tmp_path / 'store'}")
    job = JobManager(tiny_llama_bundle, store, in_process_workers=0).submit(request_()).job_id
    seen: list[bool] = []
    real_build = app_mod.Service.build

    def failed() -> None:
        raise RuntimeError("start-up failed")

    def build(*args, **kw):
        seen.append(kw["job_manager"]._started)
        if fail == "build":
            failed()
        svc = real_build(*args, **kw)
        svc.start = failed  # the warm-up fails
        return svc

    monkeypatch.setattr(app_mod.Service, "build", build)
    app = create_app(Settings(store_url=store.url, training_workers=1, kv_cache_mb=16), bundle=tiny_llama_bundle,
                     store=store)  # fmt: skip

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(RuntimeError, match="start-up failed"):
        asyncio.run(start())
    jm = app.state.ps.job_manager
    assert seen == [False] and not jm._started and not jm._threads
    rec = JobManager(tiny_llama_bundle, store, in_process_workers=0).get(job)
    assert rec.status == "queued" and rec.attempts == 0


def test_training_threads_and_niceness_are_settings(tiny_llama_bundle, tmp_path):
    """`training_threads` / `training_nice` reach the in-process job manager (they were its constructor's only:
    an operator could not give training fewer threads or serving's priority); unset, half the cores and nice 10."""
    from server.api.app import _make_job_manager
    from server.settings import Settings
    from server.training.trainer import default_train_threads

    store = open_store(f"file://{tmp_path / 'store'}")
    for given, threads, nice in (
        ({}, default_train_threads(), 10),
        ({"training_threads": 3, "training_nice": 0}, 3, 0),
    ):
        settings = Settings(store_url=store.url, training_workers=0, **given)
        jm = _make_job_manager(settings, tiny_llama_bundle, store)
        assert (jm.train_threads, jm.train_nice) == (threads, nice)
    for bad in ({"training_threads": 0}, {"training_nice": 20}, {"training_nice": -1}):
        with pytest.raises(ValueError):
            Settings(**bad)


@pytest.mark.parametrize("where", ["finish", "cancel_queued", "bad_examples"])
def test_disk_job_whose_process_died_after_its_final_record_gives_its_slot_back(
    tiny_llama_bundle, tmp_path, monkeypatch, where
):
    """A process killed between writing a job's final record and its bookkeeping (`_end`: the tenant's active
    entry, the examples file, the running marker) left the entry holding one of the tenant's job slots until the
    record was pruned (7 days): with max_jobs_per_tenant crashes, the tenant could submit nothing. The reclaimer
    clears that bookkeeping (once), and the job keeps its final status."""
    store = open_store(f"file://{tmp_path / 'store'}")
    jm = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0}, max_jobs_per_tenant=1)
    backend = jm.backend
    rec = jm.submit(request_(epochs=1))
    end = backend._end

    def die(*a, **k):
        raise _Crash()

    with monkeypatch.context() as m:
        m.setattr(backend, "_end", die)
        if where == "finish":
            with pytest.raises(_Crash):
                jm.run_one("w")
        elif where == "cancel_queued":
            with pytest.raises(_Crash):
                backend.cancel(rec.job_id)
        else:
            backend._examples(rec.job_id).write_text("{torn", encoding="utf-8")
            with pytest.raises(_Crash):
                backend.claim("w")
    for fd in range(3, 1024):  # the dead process's locks go with it
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(f"{rec.job_id}.lock"):
                os.close(fd)
    status = backend.get(rec.job_id).status
    assert status in ("succeeded", "cancelled", "failed") and any(backend._dirs["active"].glob("*/*"))
    with pytest.raises(TooManyJobs):  # the slot is held
        jm.submit(request_(epochs=1))
    monkeypatch.setattr(backend, "_end", end)
    assert (
        rec.job_id in backend.reclaim_stale() + backend.reclaim_stale()
    )  # (a running marker: the next pass)
    assert rec.job_id not in backend.reclaim_stale()  # once
    assert not any(backend._dirs["active"].glob("*/*")) and not backend._examples(rec.job_id).exists()
    assert not any(backend._dirs["running"].iterdir()) and not any(backend._dirs["queue"].iterdir())
    assert backend.get(rec.job_id).status == status
    again = jm.submit(request_(epochs=1))  # the slot is back
    assert jm.run_one("w") and jm.get(again.job_id).status == "succeeded"
    jm.shutdown()
    store.close()


def test_disk_running_job_that_lost_its_marker_is_recovered(tiny_llama_bundle, tmp_path):
    """A running job's record is fsynced, its running marker is not: after a power cut the record can say
    `running` with no marker, the only thing the reclaimer looked for, and the job stayed running for ever (its
    tenant's slot too). With its worker gone (its lock free), it is recovered as a dead worker's job."""
    store = open_store(f"file://{tmp_path / 'store'}")
    jm = JobManager(tiny_llama_bundle, store, **{**FAST, "in_process_workers": 0}, max_jobs_per_tenant=1)
    backend = jm.backend
    rec = jm.submit(request_(epochs=1))
    claim = _ghost_claim(jm)
    _kill_ghost(jm, claim)
    backend._running(rec.job_id).unlink()  # lost with the power
    assert backend.get(rec.job_id).status == "running"
    assert rec.job_id in backend.reclaim_stale()
    assert backend.get(rec.job_id).status == "queued" and backend.reclaim_stale() == []
    assert jm.run_one("w") and jm.get(rec.job_id).status == "succeeded"
    assert not any(backend._dirs["active"].glob("*/*"))
    jm.shutdown()
    store.close()


def test_hyperparameters_that_would_learn_nothing_are_refused(tiny_llama_bundle, store):
    """Accepted before and useless: learning_rate x weight_decay >= 1 (AdamW scales the prefix by 1 - their product
    each step: zeroed, the job "succeeded" having learnt nothing; or flipped until it diverged after every step),
    and a completion that is only the end-of-sequence token's text (taught the model to answer nothing)."""
    jm = JobManager(tiny_llama_bundle, store, in_process_workers=0)
    for hp, param in (
        ({"learning_rate": 0.1, "weight_decay": 10}, "hyperparameters.weight_decay"),
        ({"learning_rate": 1.0, "weight_decay": 1}, "hyperparameters.weight_decay"),
    ):
        with pytest.raises(TrainingValidationError, match="below 1") as ei:
            jm.submit(request_(**hp))
        assert ei.value.param == param
    assert jm.submit(request_(learning_rate=0.1, weight_decay=5)).status == "queued"  # (0.5: allowed)
    eos = tiny_llama_bundle.tokenizer.eos_token
    req = request_(tenant="t2")
    req["examples"][1] = {"prompt": "q", "completion": eos}
    with pytest.raises(TrainingValidationError, match="only the end-of-sequence token") as ei:
        jm.submit(req)
    assert ei.value.param == "examples[1].completion"
    jm.shutdown()
