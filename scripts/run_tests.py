"""Run the test suite; "no tests collected" (pytest exit 5) is a failure, never a pass.

The tests run in parallel worker processes (pytest-xdist): most of the suite's time is spent waiting (servers
starting, subprocesses, timeouts, Redis round trips), so two workers on 2 cores take about 0.56 of the serial time
(358 s against 638 s on a 2-core Intel Xeon, 2026-12-07; 3 workers: 299 s). Workers: `PYTEST_WORKERS` (0: serial, in this process), else
the CPUs this process may use, at least 2 and at most 4 (each worker loads torch and the test models: memory, not
CPU, bounds more). Passing `-n`/`--numprocesses` or `-p no:xdist` yourself overrides it. Tests marked
`xdist_group` run in one worker, in file order (`--dist loadgroup`): one reads what the others of its group recorded.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys


def workers(env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    given = env.get("PYTEST_WORKERS", "").strip()
    if given:
        n = int(given)
        if n < 0:
            raise ValueError(f"PYTEST_WORKERS must be 0 or more, not {given}")
        return n
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(2, min(4, cpus))


def pytest_args(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """pytest's arguments: `argv`, with `-n <workers>` added unless they choose themselves (or xdist is missing)."""
    chose = any(
        a in ("-n", "--numprocesses", "--dist") or a.startswith(("-n", "--numprocesses=", "--dist="))
        for a in argv
    )
    chose = chose or any(a == "no:xdist" or a == "-pno:xdist" for a in argv)
    if chose or importlib.util.find_spec("xdist") is None:
        return list(argv)
    n = workers(env)
    return [*argv, "-n", str(n), "--dist", "loadgroup"] if n else list(argv)


def main(argv: list[str]) -> int:
    rc = subprocess.call([sys.executable, "-m", "pytest", *pytest_args(argv)])
    if rc == 5:
        print("ERROR: pytest collected no tests; refusing to report success.", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
