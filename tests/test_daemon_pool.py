"""The engine's and the service's thread pools: daemon threads, so a task hung at exit (a store read on a dead
Redis) does not hold up the process, with ThreadPoolExecutor's behaviour otherwise."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from server.engine.daemon_pool import DaemonThreadPool


def test_runs_tasks_with_results_exceptions_and_at_most_max_workers():
    pool = DaemonThreadPool(2, "t")
    assert [f.result(5) for f in [pool.submit(lambda x: x * 2, i) for i in range(20)]] == [
        i * 2 for i in range(20)
    ]
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    running, peak, lock = [0], [0], threading.Lock()

    def task():
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    for f in [pool.submit(task) for _ in range(10)]:
        f.result(5)
    assert peak[0] == 2 and len(pool._threads) == 2 and all(t.daemon for t in pool._threads)
    assert asyncio.run(_in_loop(pool)) == 42  # asyncio's run_in_executor takes it
    gate, started = threading.Event(), threading.Semaphore(0)

    def hold():
        started.release()
        return gate.wait(5)

    first = pool.submit(hold)
    pool.submit(hold)
    assert started.acquire(timeout=5) and started.acquire(timeout=5)  # both workers busy
    queued = pool.submit(lambda: "never")
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    gate.set()
    assert first.result(5) is True
    pool.shutdown(wait=True)


async def _in_loop(pool: DaemonThreadPool) -> int:
    return await asyncio.get_running_loop().run_in_executor(pool, lambda: 42)


def test_a_hung_task_does_not_hold_the_process_exit():
    code = (
        "import time\n"
        "from server.engine.daemon_pool import DaemonThreadPool\n"
        "p = DaemonThreadPool(1, 'x'); p.submit(time.sleep, 60); time.sleep(0.2)\n"
        "p.shutdown(wait=False)\n"
    )
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    assert time.monotonic() - t0 < 10


def test_max_workers_below_one_is_refused():
    # a pool of 0 workers never runs anything: every future would wait forever
    with pytest.raises(ValueError):
        DaemonThreadPool(0, "t")


def test_an_idle_worker_is_reused_rather_than_a_new_thread_started():
    pool = DaemonThreadPool(4, "t")
    for i in range(5):
        assert pool.submit(lambda x: x, i).result(5) == i
        time.sleep(0.05)  # the worker is back waiting for work
    assert len(pool._threads) == 1
    pool.shutdown()


def test_shutdown_wait_stops_every_worker():
    pool = DaemonThreadPool(3, "t")
    gate, started = threading.Event(), threading.Semaphore(0)

    def hold():
        started.release()
        gate.wait(5)

    futs = [pool.submit(hold) for _ in range(3)]
    for _ in range(3):
        assert started.acquire(timeout=5)
    assert len(pool._threads) == 3
    gate.set()
    for f in futs:
        f.result(5)
    done = threading.Event()
    threading.Thread(target=lambda: (pool.shutdown(wait=True), done.set()), daemon=True).start()
    assert done.wait(5), "shutdown(wait=True) did not return: a worker never saw the stop"
    assert not any(t.is_alive() for t in pool._threads)


def test_a_future_cancelled_before_it_runs_is_skipped_and_the_worker_lives_on():
    pool = DaemonThreadPool(1, "t")
    gate, started = threading.Event(), threading.Event()
    ran = []

    def hold():
        started.set()
        gate.wait(5)

    first = pool.submit(hold)
    assert started.wait(5)
    second = pool.submit(ran.append, "second")
    assert second.cancel()
    gate.set()
    first.result(5)
    assert pool.submit(lambda: 7).result(5) == 7  # the one worker still serves
    assert ran == [] and second.cancelled()
    pool.shutdown()


def test_a_task_raising_a_base_exception_resolves_its_future():
    pool = DaemonThreadPool(1, "t")

    def boom():
        raise SystemExit(3)

    fut = pool.submit(boom)
    assert isinstance(fut.exception(5), SystemExit)
    assert pool.submit(lambda: 1).result(5) == 1
    pool.shutdown()
