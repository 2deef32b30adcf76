"""scripts/run_tests.py, what `make test` and CI run: pytest in parallel workers, and no tests collected is a failure."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_tests.py"


def _module():
    spec = importlib.util.spec_from_file_location("run_tests", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_workers_default_to_the_cpus_between_two_and_four(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = _module()
    for cpus, want in ((1, 2), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        assert rt.workers({}) == want
    assert rt.workers({"PYTEST_WORKERS": "0"}) == 0
    assert rt.workers({"PYTEST_WORKERS": " 7 "}) == 7
    with pytest.raises(ValueError, match="PYTEST_WORKERS"):
        rt.workers({"PYTEST_WORKERS": "-1"})


def test_the_suite_runs_in_workers_unless_the_caller_chooses() -> None:
    rt = _module()
    assert importlib.util.find_spec("xdist") is not None, "pytest-xdist is a dev dependency (pyproject.toml)"
    env = {"PYTEST_WORKERS": "2"}
    assert rt.pytest_args(["-q", "tests/x.py"], env) == ["-q", "tests/x.py", "-n", "2", "--dist", "loadgroup"]
    assert rt.pytest_args(["-q"], {"PYTEST_WORKERS": "0"}) == ["-q"]  # serial, in one process
    for own in (
        ["-n", "3"],
        ["-n3"],
        ["--numprocesses=3"],
        ["--dist", "load"],
        ["--dist=each"],
        ["-p", "no:xdist"],
        ["-pno:xdist"],
    ):
        assert rt.pytest_args(["-q", *own], env) == ["-q", *own]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_no_tests_collected_fails(tmp_path: Path, workers: str) -> None:
    (tmp_path / "test_nothing.py").write_text("X = 1\n")
    env = {**os.environ, "PYTEST_WORKERS": workers}
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "collected no tests; refusing to report success" in r.stderr
    if workers != "0":
        assert "bringing up nodes" in r.stdout  # (in workers: xdist's own line)


def test_a_failing_test_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text("def test_fails():\n    assert 1 == 2\n")
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTEST_WORKERS": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout
