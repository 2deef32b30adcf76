"""A thread pool whose threads do not hold up the process's exit.

`concurrent.futures.ThreadPoolExecutor` joins every worker at interpreter exit (its atexit hook), whatever
`shutdown(wait=False)` said: one store read hung on a dead Redis or a slow disk kept a drained server from exiting
for the read's whole timeout (20 s measured against the promised grace + 2 s). These workers are daemon threads:
what they run when the process ends is abandoned, as the drain already gave up on it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class DaemonThreadPool(Executor):
    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)  # released by a worker waiting for work
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            fut: Future = Future()
            self._queue.put((fut, fn, args, kwargs))
            # a new worker only when none is idle (as ThreadPoolExecutor), up to max_workers
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                t = threading.Thread(
                    target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
            return fut

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)  # the next worker stops too
                return
            fut, fn, args, kwargs = item
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:
                    fut.set_exception(e)
                else:
                    fut.set_result(result)
            del item, fut, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join()
