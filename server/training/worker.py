"""A training worker process: ``prefixserve worker --store redis://... [--model smollm2]``.

It loads the base model once, then claims jobs from the job queue next to the store (or ``jobs_url``) and runs them
until SIGTERM/SIGINT; a job running at that moment stops at its next optimizer step and goes back to the queue for
another worker. The model must be the one the server serves (the prefix records carry its fingerprint).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from server.training.records import RETENTION_S

log = logging.getLogger("prefixserve.training.worker")


def run_worker(
    store_url: str,
    model: str | None = "smollm2",
    *,
    jobs_url: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | None = None,
    train_threads: int | None = None,
    max_jobs: int | None = None,
    stop_event: threading.Event | None = None,
    heartbeat_s: float = 2.0,
    stale_after_s: float = 30.0,
    max_attempts: int = 2,
    poll_s: float = 0.5,
    bundle: Any = None,
    retention_s: float = RETENTION_S,
) -> int:
    """Run jobs until ``stop_event`` is set (or ``max_jobs`` ran); returns how many ran.

    ``train_threads`` defaults to every core (a worker process exists to train); ``bundle`` skips loading.
    """
    from prefix_store import open_store
    from server.training.jobs import JobManager

    if bundle is None:
        from server.model import load_model

        bundle = load_model(model, device=device, dtype=dtype, cache_dir=cache_dir)
    store = open_store(store_url)
    jm = JobManager(
        bundle,
        store,
        jobs_url=jobs_url,
        in_process_workers=0,
        train_threads=train_threads if train_threads is not None else (os.cpu_count() or 1),
        heartbeat_s=heartbeat_s,
        stale_after_s=stale_after_s,
        max_attempts=max_attempts,
        poll_s=poll_s,
        retention_s=retention_s,
    )
    stop = stop_event or threading.Event()
    worker_id = f"{jm.worker_name}-proc"
    log.info("training worker %s: model %s, store %r, jobs %r", worker_id, bundle.name, store, jm.backend)
    try:
        return jm.work(worker_id, max_jobs=max_jobs, stop=stop)
    finally:
        jm.shutdown(wait=False)
        jm.backend.close()
        store.close()


def worker_main(
    store_url: str,
    model: str | None = "smollm2",
    jobs_url: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | None = None,
    **kwargs: Any,
) -> int:
    """Entry point of ``prefixserve worker``: SIGTERM/SIGINT stop it gracefully; returns the exit code."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("training worker: signal %d, stopping (a running job is requeued)", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        run_worker(store_url, model, jobs_url=jobs_url, device=device, dtype=dtype, cache_dir=cache_dir,
                   stop_event=stop, **kwargs)  # fmt: skip
    except Exception as e:
        log.error("training worker failed: %s", e)
        return 1
    return 0
