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
