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
    assert got["mismatches"] == {"a_vs_d": 0, "a_vs_b": 0}
    # 60 prompt tokens in chunks of at most 32 tokens a step: at least two steps ran prompt tokens
    assert got["prefill_step_ms"]["d"] > 0
    report = out_md.read_text()
    assert "| d engine, every request its own tenant |" in report
    assert "of which" in report and "ran prompt tokens" in report
    assert "torch.profiler: the" in printed and "decode steps" in printed


def test_a_failing_system_is_reported_and_the_others_still_run(tiny_folder, monkeypatch, capsys):
    from benchmarks import bench_engine

    calls = []

    def broken(bundle, work, new_tokens):
        calls.append(len(work.prompts))
        if len(work.prompts) > 2:  # the timed run, not the warm-up slice
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
    assert got["failed"] == {"b": "RuntimeError: simulated device failure"}
    assert "hf_batched_tok_s" not in got and got["engine_mixed_tok_s"] > 0
    assert len(got["repeats_tok_s"]["d"]) == 2 and calls == [2, 4]  # b is not retried in the second repeat
    assert "**System b failed**: RuntimeError: simulated device failure" in printed
