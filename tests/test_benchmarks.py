"""The engine benchmark runs end to end on a tiny model (a local HF folder): every system, the profile and the
report. Speed is never asserted here (it is measured in benchmarks/); what is asserted is that the systems agree
token for token in fp32, that each produced its tokens, and that the report carries what the issue asks for."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tiny_tokenizer()
    make_tiny_llama(tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_bench_engine_runs_every_system_and_reports(tiny_folder, tmp_path, capsys):
    from benchmarks import bench_engine

    out_md = tmp_path / "report.md"
    argv = ["--model", str(tiny_folder), "--systems", "a,b,c,d", "--tenants", "3", "--requests", "5"]
    argv += ["--prefix-len", "4,8", "--prompt-len", "12", "--new-tokens", "6", "--threads", "1"]
    argv += ["--max-num-batched-tokens", "32", "--profile", "--out", str(out_md)]
    bench_engine.main(argv)
    printed = capsys.readouterr().out
    # one JSON line last, with the keys the issue names, and a ratio for each baseline
    got = json.loads(printed.strip().splitlines()[-1])
    for k in ("naive_tok_s", "hf_batched_tok_s", "engine_single_tok_s", "engine_mixed_tok_s"):
        assert got[k] > 0
    assert set(got["ratios"]) == {"d/a", "d/b", "d/c"}
    # fp32 greedy: the naive baseline, the padded batch and the mixed-tenant engine agree on every request
    assert got["mismatches"] == {"a_vs_d": 0, "a_vs_b": 0, "d_vs_c": 0}
    # c serves tenant 0's prefix to every request: compared on d's rows of tenant 0 (requests 0 and 3 of 5)
    assert got["compared"] == {"a_vs_d": 5, "a_vs_b": 5, "d_vs_c": 2}
    assert got["engine_held_mib"] is not None and got["engine_held_mib"] >= 0
    # 60 prompt tokens in chunks of at most 32 tokens a step: at least two steps ran prompt tokens
    assert got["prefill_step_ms"]["d"] > 0
    report = out_md.read_text()
    assert "| d engine, every request its own tenant |" in report
    assert "of which" in report and "ran prompt tokens" in report
    assert "all 5 requests compared produce identical greedy tokens" in report
    assert "the engine holds from its start" in report
    assert "torch.profiler: the" in printed and "decode steps" in printed


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # the warm-up slice, the first timed run, the second one
def test_a_failing_system_is_reported_and_the_others_still_run(tiny_folder, monkeypatch, capsys, fail_at):
    from benchmarks import bench_engine

    calls = []

    def broken(bundle, work, new_tokens):
        calls.append(len(work.prompts))
        if len(calls) == fail_at:
            raise RuntimeError("simulated device failure")
        return real(bundle, work, new_tokens)

    real = bench_engine.run_hf_batched
    monkeypatch.setattr(bench_engine, "run_hf_batched", broken)
    argv = ["--model", str(tiny_folder), "--systems", "b,d", "--tenants", "2", "--requests", "4"]
    argv += [
        "--prefix-len",
        "4",
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
        "--threads",
        "1",
        "--repeats",
        "2",
    ]
    bench_engine.main(argv)
    printed = capsys.readouterr().out
    got = json.loads(printed.strip().splitlines()[-1])
    why = ("warm-up: " if fail_at == 1 else "") + "RuntimeError: simulated device failure"
    assert got["failed"] == {"b": why}
    # a system that failed in any repeat has no tok/s and no ratio; it is not run again
    assert "hf_batched_tok_s" not in got and "b" not in got["repeats_tok_s"] and got["ratios"] == {}
    assert len(got["repeats_tok_s"]["d"]) == 2 and len(calls) == fail_at
    assert f"**System b failed**: {why}" in printed and "| b HF" not in printed


def test_a_failure_inside_the_engine_leaves_the_other_engine_system_clean(tiny_folder, monkeypatch, capsys):
    """Systems c and d share one engine: requests that a failed c left behind are aborted, so d runs alone."""
    from benchmarks import bench_engine
    from server.engine.engine import LLMEngine

    real_step = LLMEngine.step
    seen = {"c": 0}

    def step(self):
        if any(s.request_id.startswith("c") for s in self.scheduler.running):
            seen["c"] += 1
            if seen["c"] == 2:
                raise RuntimeError("simulated failure during system c")
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "step", step)
    argv = ["--model", str(tiny_folder), "--systems", "c,d", "--tenants", "2", "--requests", "4"]
    argv += ["--prefix-len", "4", "--prompt-len", "8", "--new-tokens", "3", "--threads", "1"]
    bench_engine.main(argv)
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["failed"] == {"c": "RuntimeError: simulated failure during system c"}
    assert got["engine_mixed_tok_s"] > 0


# ---------------------------------------------------------------------------------------------- bench_http
def _bench_http_args(url: str, *extra: str):
    from benchmarks import bench_http

    argv = ["--base-url", url, "--tenants", "2", "--concurrency", "2", "--requests", "4", "--max-tokens", "3"]
    return bench_http.parse_args([*argv, "--warmup", "0", "--prompt-len", "4", *extra])


def test_bench_http_counts_whole_responses_against_a_live_server(server_factory):
    import asyncio

    from benchmarks import bench_http

    s = server_factory()
    for extra in (
        ["--stream", "--goodput", "ttft:60000,tpot:60000"],
        ["--stream", "--request-rate", "50"],
        [],
    ):
        (level,) = asyncio.run(bench_http.amain(_bench_http_args(s.url, *extra)))["levels"]
        assert (level["completed"], level["errors"]) == (4, {}), level
        assert level["mean_completion_tokens"] == 3 and level["out_tok_s"] > 0
        if "--stream" in extra:
            assert level["ttft_p50_ms"] > 0 and level["tpot_p50_ms"] is not None
        if "--goodput" in extra:
            assert level["goodput_req_s"] == level["req_s"]  # SLOs of a minute: every request is good


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'data: {"text": "a"}\n\n', "without [DONE]"),  # cut: no usage, no [DONE]
        (b"data: {not json\n\n", "JSONDecodeError"),
        (b'data: {"text": "a", "usage": {"completion_tokens": 1}}\n\ndata: [DONE]\n\n', "not 3"),  # short
    ],
)
def test_bench_http_counts_a_broken_stream_as_an_error(monkeypatch, body, why):
    import asyncio

    import httpx

    from benchmarks import bench_http

    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )
    real = httpx.AsyncClient
    monkeypatch.setattr(bench_http.httpx, "AsyncClient", lambda **kw: real(transport=transport, **kw))
    (level,) = asyncio.run(bench_http.amain(_bench_http_args("http://bench.invalid", "--stream")))["levels"]
    assert level["completed"] == 0 and level["errors"] in ({200: 4}, {0: 4}), level
    assert why in level["first_error"]


def _mock_server(monkeypatch, handler):
    """Every httpx.AsyncClient bench_http opens answers through `handler(request) -> httpx.Response`."""
    import httpx

    from benchmarks import bench_http

    transport = httpx.MockTransport(handler)
    real = httpx.AsyncClient
    monkeypatch.setattr(bench_http.httpx, "AsyncClient", lambda **kw: real(transport=transport, **kw))


def _gaps(times: list[float]) -> list[float]:
    from itertools import pairwise

    return [b - a for a, b in pairwise(times)]


def _usage_response(request, tokens: int = 3):
    import httpx

    return httpx.Response(200, json={"text": "x", "usage": {"prompt_tokens": 4, "completion_tokens": tokens}})


def test_bench_http_arrival_schedule_is_rescaled_seeded_and_gamma_with_burstiness():
    """As vLLM's get_request: gaps of mean 1/rate, rescaled so that N requests span exactly N / rate; one schedule
    per seed; gamma gaps of shape `burstiness` (coefficient of variation 1/sqrt(burstiness))."""
    import statistics

    from benchmarks.bench_http import arrival_offsets

    offs = arrival_offsets(32, 2.0, 1.0, seed=0)
    assert len(offs) == 32 and offs[-1] == pytest.approx(16.0) and offs[0] > 0
    assert min(_gaps(offs)) >= 0
    assert arrival_offsets(32, 2.0, 1.0, seed=0) == offs != arrival_offsets(32, 2.0, 1.0, seed=1)
    assert arrival_offsets(4, float("inf"), 1.0, seed=0) == [0.0] * 4
    for burstiness in (0.25, 1.0, 4.0):
        offs = arrival_offsets(20000, 5.0, burstiness, seed=3)
        gaps = _gaps([0.0, *offs])
        assert offs[-1] == pytest.approx(4000.0) and statistics.fmean(gaps) == pytest.approx(0.2)
        cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
        assert cv == pytest.approx(burstiness**-0.5, rel=0.1), (burstiness, cv)


def test_bench_http_open_loop_sends_one_schedule_at_every_level_and_ends_with_the_last_request(monkeypatch):
    """At --request-rate R the level lasts N / R (plus the last answer), not N / R plus a sleep after the last
    request; every level of the sweep gets the same arrivals, sent at their absolute target times."""
    import asyncio
    import time

    from benchmarks import bench_http

    sent: list[float] = []

    def handler(request):
        sent.append(time.perf_counter())
        return _usage_response(request)

    _mock_server(monkeypatch, handler)
    args = _bench_http_args("http://bench.invalid", "--concurrency", "1,3", "--requests", "5")
    args.request_rate, args.seed = 10.0, 1
    levels = asyncio.run(bench_http.amain(args))["levels"]
    assert [lv["completed"] for lv in levels] == [5, 5] and len(sent) == 10
    plan = bench_http.arrival_offsets(5, 10.0, 1.0, seed=1)
    # (loose bounds: a loaded CI machine wakes late, never early, but a late first send makes the others look early
    # next to it; the old code's run lasted 0.81 s, on another schedule at each level)
    for i, level in enumerate(levels):
        assert 0.49 <= level["duration_s"] < 0.8, level  # the last arrival at 5 / 10 s, nothing after it
        at = [t - sent[5 * i] for t in sent[5 * i : 5 * i + 5]]  # each send after the level's first one
        for k in range(1, 5):
            assert plan[k] - plan[0] - 0.05 <= at[k] < plan[k] - plan[0] + 0.15, (i, at, plan)


def test_bench_http_goodput_counts_a_one_token_output_as_tpot_0(monkeypatch):
    """vLLM's calculate_metrics: 'if output_len <= 1, we regard tpot as 0 for goodput'."""
    import asyncio

    import httpx

    from benchmarks import bench_http

    one = bench_http.Result(True, 200, ttft=0.02, e2e=0.02, completion_tokens=1)
    assert bench_http._good(one, {"tpot": 0.001}) and not bench_http._good(one, {"ttft": 0.001, "tpot": 1.0})
    slow = bench_http.Result(True, 200, ttft=0.1, e2e=1.1, completion_tokens=3)  # TPOT 0.5 s
    assert not bench_http._good(slow, {"tpot": 0.1}) and bench_http._good(slow, {"tpot": 0.5})
    body = b'data: {"text": "a", "usage": {"prompt_tokens": 4, "completion_tokens": 1}}\n\ndata: [DONE]\n\n'
    _mock_server(
        monkeypatch,
        lambda request: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}),
    )
    args = _bench_http_args("http://bench.invalid", "--stream", "--max-tokens", "1", "--goodput", "tpot:10")
    (level,) = asyncio.run(bench_http.amain(args))["levels"]
    assert level["completed"] == 4 and level["goodput_req_s"] == level["req_s"] > 0, level


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--goodput", "ttft:500"], "needs --stream"),
        (["--goodput", "e2e:100,tpot:50"], "needs --stream"),
        (["--stream", "--goodput", "ttft:1s"], "'ttft:1s'"),
        (["--stream", "--goodput", "itl:5"], "'itl:5'"),
        (["--stream", "--goodput", "e2e:-1"], "'e2e:-1'"),
        (["--request-rate", "0"], "--request-rate must be > 0"),
        (["--request-rate", "-2"], "--request-rate must be > 0"),
        (["--concurrency", "0", "--request-rate", "5"], "--concurrency"),
        (["--concurrency", "1,0"], "--concurrency"),
        (["--concurrency", "4,x"], "--concurrency"),
        (["--tenants", "0"], "--tenants must be >= 1"),
        (["--requests", "0"], "--requests must be >= 1"),
        (["--request-rate", "5", "--burstiness", "0"], "--burstiness must be > 0"),
    ],
)
def test_bench_http_refuses_bad_arguments_before_any_request(capsys, argv, why):
    from benchmarks import bench_http

    with pytest.raises(SystemExit) as e:
        bench_http.parse_args(argv)
    assert e.value.code == 2 and why in capsys.readouterr().err


def test_bench_http_parses_goodput_up_front():
    from benchmarks import bench_http

    args = bench_http.parse_args(["--stream", "--goodput", "ttft:500,tpot:50", "--request-rate", "3"])
    assert args.goodput == {"ttft": 0.5, "tpot": 0.05} and (args.request_rate, args.burstiness) == (3.0, 1.0)
    assert bench_http.parse_args(["--goodput", "e2e:4000"]).goodput == {"e2e": 4.0}  # e2e needs no stream
    assert bench_http.parse_args([]).goodput == {}


@pytest.mark.parametrize(
    "key_args", [["--api-key", "s3cret-key"], ["--api-key=s3cret-key"], ["--api", "s3cret-key"]]
)
def test_bench_http_report_does_not_carry_the_api_key(monkeypatch, tmp_path, capsys, key_args):
    """Reports are committed to benchmarks/results: the key is sent, never written."""
    import sys

    from benchmarks import bench_http

    auth = []

    def handler(request):
        auth.append(request.headers.get("authorization"))
        return _usage_response(request)

    _mock_server(monkeypatch, handler)
    out = tmp_path / "report.md"
    argv = ["--base-url", "http://bench.invalid", "--tenants", "2", "--concurrency", "1", "--requests", "2"]
    argv += ["--max-tokens", "3", "--warmup", "0", *key_args, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["bench_http.py", *argv])
    bench_http.main(argv)
    assert auth == ["Bearer s3cret-key"] * 2
    report = out.read_text()
    assert "s3cret-key" not in report and "s3cret-key" not in capsys.readouterr().out
    assert f"{key_args[0].partition('=')[0]}{'=' if '=' in key_args[0] else ' '}***" in report


def test_bench_http_exits_non_zero_when_every_request_failed(capsys):
    """A closed port: every request fails (status 0); the run says so and exits non-zero, as vLLM warns."""
    import socket

    from benchmarks import bench_http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--concurrency",
        "1,2",
        "--requests",
        "2",
        "--warmup",
        "0",
    ]
    with pytest.raises(SystemExit) as e:
        bench_http.main(argv)
    assert e.value.code not in (0, None) and "All requests failed" in str(e.value.code)
    assert "concurrency 2: all 2 requests failed" in capsys.readouterr().err


def test_readme_benchmark_tables_come_from_the_result_files():
    """README's latest CPU table and its history of runs are generated from benchmarks/results (no figure there
    without a result file); `python benchmarks/history.py` regenerates them."""
    from benchmarks import history

    assert history.main(["--check"]) == 0
    table = history.history()
    assert table.count("\n") >= 20 and "session36-epyc" in table


def test_the_gpu_scripts_parse_and_the_check_refuses_to_start_unprepared(tmp_path):
    """The device run is 15 minutes a session: its script must at least parse, and without the carried tokenizer
    it stops at once (exit 2) instead of failing stages on the machine."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        assert subprocess.run(["bash", "-n", str(root / "benchmarks" / script)]).returncode == 0, script
    work = tmp_path / "repo"
    (work / "benchmarks").mkdir(parents=True)
    shutil.copy(root / "benchmarks" / "gpu_check.sh", work / "benchmarks")
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=work, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})  # fmt: skip
    assert r.returncode == 2 and "gpu_prepare.sh" in r.stderr, r.stderr
    # prepared, but torch sees no GPU (a driver or CUDA mismatch): it stops before any stage (they would all "pass":
    # CUDA tests skipped, systems failed), saying why
    (work / ".gpu-tok").mkdir()
    (work / ".gpu-tok" / "tokenizer.json").write_text("{}")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {
        "PATH": f"{fake}:/usr/bin:/bin",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",
    }  # fmt: skip  (a machine with a GPU too)
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=work, capture_output=True, text=True, env=env)
    assert r.returncode == 3 and "no usable CUDA device" in (tmp_path / "out" / "stages.txt").read_text(), (
        r.stdout
    )


def test_bench_sampler_prints_a_row_per_batch_and_sampling(capsys):
    from benchmarks import bench_sampler

    bench_sampler.main(["--vocab", "300", "--batches", "2,3", "--repeats", "1"])
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| 2 |") or line.startswith("| 3 |")
    ]
    assert len(rows) == 2 * len(bench_sampler.CASES) and all(float(r.split("|")[3]) > 0 for r in rows)


def test_bench_sched_overhead_holds_the_queue_at_its_depth_and_reports_a_row_each(capsys):
    """Each row's queue is kept at the asked depth (what the scheduler's time is measured against)."""
    from benchmarks import bench_sched_overhead

    bench_sched_overhead.main(
        ["--waiting", "0", "40", "--tenants", "3", "--steps", "5", "--max-num-seqs", "4"]
    )
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["waiting"], r["tenants"]) for r in rows] == [(0, 3), (40, 3)]
    assert rows[1]["queued at end"] >= 40 and rows[0]["queued at end"] <= 4
    assert all(0 < r["schedule ms p50"] <= r["schedule ms p99"] for r in rows)


def test_bench_sched_overhead_with_a_small_cache_and_slow_reads_fetches_again():
    """`--cache-prefixes N --fetch-ms T`: the cache holds N prefixes and each store read takes T ms, so the tenants
    beyond N are fetched again and again (what the misses' rows measure)."""
    from benchmarks import bench_sched_overhead
    from tests.fixtures.models import tiny_llama

    kw = {"waiting": 12, "tenants": 6, "fair": True, "max_num_seqs": 4, "steps": 30}
    slow = bench_sched_overhead.run(tiny_llama(0), cache_prefixes=2, fetch_ms=5, **kw)
    roomy = bench_sched_overhead.run(tiny_llama(0), **kw)
    assert slow["fetches"] > 6 and slow["evictions"] > 0
    assert roomy["fetches"] == 6 and roomy["evictions"] == 0


# what the GPU image lacks (it has torch, transformers, triton and pytest): the API stack, and jinja2 to be safe
_NOT_ON_THE_GPU_IMAGE = r"""
import importlib, sys
# (None in sys.modules: `import` raises ModuleNotFoundError and importlib.util.find_spec says absent, as for a
# package not installed)
for name in ("fastapi", "pydantic", "pydantic_settings", "redis", "uvicorn", "starlette", "prometheus_client",
             "httpx", "llguidance", "uvloop", "httptools", "multipart", "jinja2"):
    sys.modules[name] = None
for mod in sys.argv[1:]:
    importlib.import_module(mod)
print("imported", len(sys.argv) - 1)
"""


def test_the_gpu_runs_modules_import_without_the_api_stack():
    """benchmarks/gpu_check.sh runs the engine's benchmark and CUDA tests on an image with torch, transformers,
    triton and pytest only: what they import must not need the web packages (a pydantic import in the model
    loader once failed every stage of that run at once)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    mods = ["server.engine", "server.model", "server.model.loader", "benchmarks.bench_engine",
            "tests.test_engine_cuda", "tests.test_triton_kernels"]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-c", _NOT_ON_THE_GPU_IMAGE, *mods],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.split() == ["imported", str(len(mods))], r.stderr[-3000:]


def test_bench_isolation_runs_every_shape_with_buckets_on_and_off(tiny_folder, capsys, monkeypatch):
    from benchmarks import bench_isolation
    from server.engine.model_runner import ModelRunner

    # the tiny model's key slots are 256 bytes: at the CPU's default a bucket would have to save 4,096 of them, more
    # than its 1,024 positions allow beside three short rows
    monkeypatch.setitem(ModelRunner.PART_BYTES, "cpu", 64 << 10)

    argv = [
        "--model",
        str(tiny_folder),
        "--threads",
        "1",
        "--long",
        "600",
        "--chat",
        "300",
        "--prompt-len",
        "5",
    ]
    out = bench_isolation.main([*argv, "--new-tokens", "4", "--tenants", "3", "--repeats", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    for shape in ("mixed", "chat", "short", "equal"):
        assert out[f"{shape}_identical"] is True
        assert out[f"{shape}_on_ms"] > 0 and out[f"{shape}_off_ms"] > 0
        assert out[f"{shape}_off_groups"] == 1
    # the long rows' steps attend in buckets, the others in one group
    assert out["mixed_on_groups"] == out["chat_on_groups"] == 2
    assert out["short_on_groups"] == out["equal_on_groups"] == 1
