"""`prefixserve` CLI: settings precedence, `prefixes list`, `train` (submit + progress until done), `serve` checks."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from prefix_store import errors
from server import cli
from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer
from tests.fixtures.server import FakeJobManager, put_random_prefix


def test_settings_env_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFIXSERVE_PORT", "9001")
    monkeypatch.setenv("PREFIXSERVE_MAX_QUEUED", "7")
    monkeypatch.setenv("PREFIXSERVE_STORE_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("PREFIXSERVE_API_KEYS", "acme:k-1")
    monkeypatch.setenv("PREFIXSERVE_LOG_PROMPTS", "true")
    ns = cli.build_parser().parse_args(["serve", "--port", "9100", "--kv-cache-mb", "64", "--no-log-json"])
    s = cli.settings_from_args(ns)
    assert s.port == 9100  # flag beats env
    assert s.max_queued == 7 and s.store_url == "redis://127.0.0.1:6379/3"  # env beats default
    assert s.kv_cache_mb == 64 and s.log_json is False and s.log_prompts is True
    assert s.tenant_keys() == {"k-1": "acme"}
    assert s.model == "smollm2" and s.host == "127.0.0.1"
    # `--store` as `worker` and `prefixes` spell it works for `serve` too
    ns = cli.build_parser().parse_args(["serve", "--store", "redis://127.0.0.1:6379/4"])
    assert cli.settings_from_args(ns).store_url == "redis://127.0.0.1:6379/4"
    # a choice in any case and a switch with spaces around it, as log_level always was (they were refused)
    for name, value in {
        "SCHEDULING_POLICY": "FCFS",
        "DTYPE": "Float16",
        "PROMPT_CACHE": " 0 ",
        "KERNELS": "Torch",
    }.items():
        monkeypatch.setenv("PREFIXSERVE_" + name, value)
    s = cli.settings_from_args(cli.build_parser().parse_args(["serve"]))
    assert (s.scheduling_policy, s.dtype, s.prompt_cache, s.kernels) == ("fcfs", "float16", False, "torch")


def test_worker_flags_reach_the_worker(monkeypatch, capsys):
    """`prefixserve worker --threads N` sets how many torch threads its jobs train with (default: every core)."""
    import server.logging_utils
    import server.training

    # (the real set-up would reconfigure this process's logging, which later tests' caplog relies on)
    monkeypatch.setattr(server.logging_utils, "setup_logging", lambda *a, **kw: None)
    seen: list[dict] = []
    monkeypatch.setattr(server.training, "worker_main", lambda *a, **kw: seen.append({"args": a, **kw}) or 0)
    parse = cli.build_parser().parse_args
    assert (
        cli.cmd_worker(parse(["worker", "--store", "/tmp/s", "--threads", "3", "--log-level", "error"])) == 0
    )
    assert cli.cmd_worker(parse(["worker", "--store", "/tmp/s", "--log-level", "error"])) == 0
    assert seen[0]["args"] == ("/tmp/s", "smollm2") and seen[0]["train_threads"] == 3
    assert seen[1]["train_threads"] is None
    # how long the jobs it ends are kept (the server's `jobs_retention_s`): flag, else env, else 7 days
    assert seen[1]["retention_s"] == 7 * 86400
    monkeypatch.setenv("PREFIXSERVE_JOBS_RETENTION_S", "3600")
    assert cli.cmd_worker(parse(["worker", "--store", "/tmp/s", "--log-level", "error"])) == 0
    assert cli.cmd_worker(parse(["worker", "--store", "/tmp/s", "--jobs-retention-s", "60"])) == 0
    assert seen[2]["retention_s"] == 3600 and seen[3]["retention_s"] == 60
    with pytest.raises(SystemExit):
        parse(["worker", "--store", "/tmp/s", "--threads", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_default_store_url_is_the_local_share(monkeypatch, tmp_path):
    from server.settings import Settings

    monkeypatch.delenv("PREFIXSERVE_STORE_URL", raising=False)
    monkeypatch.delenv("PREFIXSERVE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings().store_url == f"file://{tmp_path}/.local/share/prefixserve"
    assert Settings(store_url="file://~/x").store_url == f"file://{tmp_path}/x"


def test_prefixserve_variables_are_read_in_any_case(monkeypatch, tmp_path):
    """Every PREFIXSERVE_* variable is read whatever the case of its name, as `serve` reads its settings: the
    model's device for import-peft, the model cache, the default store folder and the client commands' key and
    URL read only the upper-case name (import-peft loaded on the CPU with prefixserve_device=cuda set)."""
    import argparse

    import server.model
    from server.model.loader import default_cache_dir
    from server.settings import Settings

    for var in ("DEVICE", "CACHE", "HOME", "STORE_URL", "API_KEY", "BASE_URL"):
        monkeypatch.delenv("PREFIXSERVE_" + var, raising=False)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(server.model, "load_model", lambda name, **kw: seen.update(kw) or "bundle")
    monkeypatch.setenv("prefixserve_device", "cuda")
    ns = argparse.Namespace(device=None, dtype=None, model=None, cache=None, store=None)
    assert cli._load_bundle(ns) == "bundle" and seen["device"] == "cuda"
    monkeypatch.setenv("prefixserve_cache", str(tmp_path / "c"))
    monkeypatch.setenv("Prefixserve_Home", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "c"
    assert Settings().store_url == f"file://{tmp_path}/home"
    monkeypatch.setenv("prefixserve_api_key", "sk-1")
    monkeypatch.setenv("prefixserve_base_url", "http://h:1/")
    ns = argparse.Namespace(api_key=None, base_url=None)
    assert (cli._api_key(ns), cli._base_url(ns)) == ("sk-1", "http://h:1")
    # two spellings set: the last in the environment, for a command as for the server's settings
    monkeypatch.setenv("PREFIXSERVE_DEVICE", "cpu")
    monkeypatch.delenv("prefixserve_device")
    monkeypatch.setenv("prefixserve_device", "cuda")
    from server.settings import env_get

    assert env_get("PREFIXSERVE_DEVICE") == Settings().device == "cuda"
    monkeypatch.delenv("prefixserve_device")
    monkeypatch.setenv("prefixserve_device", "")  # (empty: unset, for the settings too)
    assert env_get("PREFIXSERVE_DEVICE") == Settings().device == "cpu"


def test_keys_are_not_command_line_flags():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--api-keys", "acme:k"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--admin-key", "k"])


def test_serve_refuses_bad_settings(monkeypatch, capsys):
    monkeypatch.setenv("PREFIXSERVE_API_KEYS", "acme:same-key,globex:same-key")
    assert cli.main(["serve", "--port", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid settings" in err and "same-key" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "tpu"], "unknown device"),
        (["--dtype", "float64"], "dtype must be"),
        (
            ["--store-url", "bogus://x"],
            "--store-url / --store: unsupported scheme",
        ),  # (as `worker` spells it too)
        (["--jobs-url", "redsi://redis:6379/0"], "--jobs-url: unsupported scheme"),  # was a folder "redsi:"
        (["--limits-url", "file:///tmp/x"], "--limits-url: unsupported scheme"),
        (["--model", "/nonexistent/model"], "no config.json"),
        (["--device", "cpu", "--kernels", "triton"], "kernels 'triton' needs triton and a CUDA device"),
        # infinity is not a limit (`none` is): it could not be written into a job record (JSON)
        (["--training-max-seconds", "inf"], "--training-max-seconds: Input should be a finite number"),
        # decided before the model loads (they were tracebacks after it, with no one-line reason)
        (["--store-url", "file://relative/path"], "file:///absolute/path"),
        (["--store-url", "rediss//127.0.0.1:6379/0"], "a prefix store path must be absolute"),
        (["--store-url", "file:///x?keep_versions=0"], "keep_versions must be a positive integer"),
        (["--store-url", "redis://127.0.0.1:6379/abc"], "the Redis database in a store URL is a number"),
        # (a port redis-py cannot read was a traceback once the model had loaded; the password stays unsaid)
        (["--store-url", "redis://:s3cret@127.0.0.1:notaport/1"], "got '127.0.0.1:notaport'"),
        (["--limits-url", "redis://127.0.0.1:99999/0"], "the port in a Redis URL is a number up to 65535"),
        (
            ["--speculative-tokens", "4", "--async-decode", "on"],
            "async_decode on cannot run with speculative",
        ),
        # an option the store's backend does not take (redis-py: a TypeError at the first command, after the
        # model loaded; a file URL: ignored)
        (["--store-url", "redis://127.0.0.1:6379/0?keep_version=2"], "unknown option 'keep_version'"),
        (["--jobs-url", "file:///tmp/jobs?keep_version=2"], "takes one option, keep_versions=N"),
    ],
)
def test_serve_refuses_unusable_settings_in_one_line(args, needle, capsys, tmp_path, monkeypatch):
    """Each is an exit 2 with a message saying why, before anything loads (they were tracebacks from start-up,
    or a job queue folder named after a mistyped scheme, created in the working directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the suite's, for the kernel tests on a CPU)
    assert cli.main(["serve", "--port", "0", *args]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid settings" in err and needle in err and "Traceback" not in err and "s3cret" not in err
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_model_folder_it_cannot_load_in_one_line(capsys, tmp_path, monkeypatch):
    """A folder that is no decoder-only causal LM, whose config.json does not parse, or that has no weights, and an
    embedded model's cache that cannot be made: exit 2 saying why, before anything loads (each was a traceback
    from the server's start-up; the cache one after a 20 s conversion)."""
    import json

    def folder(name: str, config: str, weights: bool = False) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        if weights:
            (d / "model.safetensors").write_bytes(b"")
        return str(d)

    llama = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 2,
             "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10}  # fmt: skip
    bert = {"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
            "intermediate_size": 8, "vocab_size": 10}  # fmt: skip
    for model, needle in (
        (folder("bert", json.dumps(bert), weights=True), "not a decoder-only causal LM"),
        (folder("torn", "{not json", weights=True), "its config.json cannot be read"),
        (folder("empty", json.dumps(llama)), "the folder has no weights"),
    ):
        assert cli.main(["serve", "--port", "0", "--model", model]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("PREFIXSERVE_CACHE", str(tmp_path / "torn" / "config.json" / "cache"))  # under a file
    assert cli.main(["serve", "--port", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "PREFIXSERVE_CACHE: cannot make the model cache" in err, err


def test_an_empty_keys_file_does_not_start_an_open_server(tmp_path, capsys, monkeypatch):
    """A keys file with no key (mounted before it was filled in, say) and no admin key: exit 2 saying why, not a
    server every caller may use as admin. With an admin key it starts (every tenant key revoked, on purpose)."""
    keys = tmp_path / "keys.txt"
    keys.write_text("# filled in by the deploy job\n")
    assert cli.main(["serve", "--port", "0", "--api-keys-file", str(keys)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "no 'tenant:key' line" in err and "open to everyone" in err
    from server.settings import Settings

    monkeypatch.setenv("PREFIXSERVE_ADMIN_KEY", "admin-secret-1")
    assert Settings(api_keys_file=str(keys)).tenant_keys() == {}


def test_serve_help_names_each_flags_variable_and_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # (argparse wraps the lines)
    assert (
        "[env PREFIXSERVE_MAX_NUM_SEQS; default: 64]" in out
        and "[env PREFIXSERVE_STREAM_INTERVAL; default: 1]" in out
    )
    assert "[env PREFIXSERVE_MAX_MODEL_LEN]" in out  # (automatic: the text says how)


def test_settings_errors_name_the_env_var_and_the_flag(capsys, monkeypatch):
    """A bad value from the environment is reported under the variable the user set (and the flag), with what was
    given, one line, no pydantic links."""
    monkeypatch.setenv("PREFIXSERVE_MAX_NEW_TOKENS", "abc")
    assert cli.main(["serve", "--port", "0", "--max-num-seqs", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "PREFIXSERVE_MAX_NEW_TOKENS / --max-new-tokens: Input should be a valid integer" in err
    assert "(got 'abc')" in err and "PREFIXSERVE_MAX_NUM_SEQS / --max-num-seqs:" in err
    assert "errors.pydantic.dev" not in err and len(err.splitlines()) == 1


def test_start_up_log_hides_url_passwords():
    from server.settings import Settings, redact_url

    s = Settings(
        store_url="redis://:hunter2@redis:6379/0?prefix=ps",
        limits_url="rediss://user:limitpw@cache:6380/1",
        jobs_url="redis://redis:6379/2?password=queuepw&prefix=jobs",
    )
    logged = json.dumps(s.public_dict())
    assert not any(pw in logged for pw in ("hunter2", "limitpw", "queuepw")), logged
    assert s.public_dict()["store_url"] == "redis://:***@redis:6379/0?prefix=ps"
    assert s.public_dict()["limits_url"] == "rediss://user:***@cache:6380/1"
    assert redact_url("file:///data/prefixes") == "file:///data/prefixes" and redact_url(None) is None
    assert redact_url("redis://:pa/ss?w#d@host:6379/0") == "redis://:***@host:6379/0"  # unencoded / ? #
    assert redact_url("redis://user@host/0") == "redis://user@host/0"  # no password
    # a refused URL's password is not echoed by the settings error either
    with pytest.raises(ValueError) as e:
        Settings(store_url="redsi://:hunter2@db:6379/0")
    assert "hunter2" not in str(e.value) and "redsi" in str(e.value)


def test_an_unknown_jobs_url_scheme_is_refused():
    from server.training.jobs import open_backend

    with pytest.raises(ValueError, match="unsupported jobs URL"):
        open_backend("redsi://redis:6379/0", max_attempts=2, stale_after_s=30, retention_s=60)


def test_start_up_failure_is_one_line(tmp_path, capsys, root_logging):
    """A limits file that cannot be read fails start-up with exit 3 and its reason, not a traceback."""
    rc = cli.main(["serve", "--port", "0", "--store-url", f"file://{tmp_path}/s", "--tenant-limits-file",
                   str(tmp_path / "missing.json"), "--no-log-json"])  # fmt: skip
    assert rc == cli.EXIT_STARTUP
    err = capsys.readouterr().err
    assert "start-up failed" in err and "missing.json" in err and "Traceback" not in err


def test_a_model_that_fails_to_load_says_so_in_one_line_before_the_traceback(tmp_path, caplog):
    """A model folder whose weights are torn fails start-up (exit 3) with one error line naming the model, ahead of
    the traceback uvicorn prints (which kept it: the line was the traceback's last, after ~50 frames)."""
    folder = tmp_path / "torn"
    tok = make_tiny_tokenizer()
    make_tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    caplog.set_level(logging.INFO)
    rc = cli.main(["serve", "--port", "0", "--model", str(folder), "--store-url", f"file://{tmp_path}/s",
                   "--no-log-json", "--training-workers", "0"])  # fmt: skip
    assert rc == cli.EXIT_STARTUP  # (uvicorn's own sys.exit(3) is not let through: the same code, returned)
    said = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("prefixserve") and r.levelno >= logging.ERROR
    ]
    assert any(m.startswith(f"cannot start: loading model {folder} failed: ") for m in said), said


def test_a_setting_that_fails_start_up_is_one_line_without_a_traceback(tmp_path, caplog):
    """A KV cache too small for one request fails start-up (exit 3) with the engine's one line saying what to raise;
    uvicorn logged Starlette's 60-line traceback after it (no bug to debug: a setting)."""
    folder = tmp_path / "wide"
    tok = make_tiny_tokenizer()
    make_tiny_llama(tok, kv_heads=4, head_dim=2048).save_pretrained(folder)  # a 2 MiB KV block: 1 MiB holds 0
    tok.save_pretrained(folder)
    caplog.set_level(logging.INFO)
    rc = cli.main(["serve", "--port", "0", "--model", str(folder), "--store-url", f"file://{tmp_path}/s",
                   "--no-log-json", "--training-workers", "0", "--kv-cache-mb", "1"])  # fmt: skip
    assert rc == cli.EXIT_STARTUP
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    said = [r.getMessage() for r in errors]
    assert any(
        m.startswith("cannot start: the KV cache (2 blocks") and "raise kv_cache_mb" in m for m in said
    ), said
    assert not any("Traceback" in m or r.exc_info for r, m in zip(errors, said, strict=True)), said


def test_a_signal_during_start_up_exits_at_once(monkeypatch, api_bundle, tmp_path):
    """Ctrl-C or SIGTERM while the model loads exits at once (128 + the signal) instead of waiting out the load
    and the warm-up, then logging "listening" and draining nothing."""
    import asyncio
    import signal

    import server.api.app as app_mod
    from server.api import create_app
    from server.settings import Settings

    loading, exited = threading.Event(), []

    def slow_load(settings):
        loading.set()
        time.sleep(3)
        return api_bundle

    def fake_exit(code: int) -> None:
        exited.append(code)
        raise SystemExit(code)  # (ends the serving thread's handler, not the test process)

    monkeypatch.setattr(app_mod, "_load_bundle", slow_load)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    s = Settings(
        store_url=f"file://{tmp_path}/s", kv_cache_mb=16, max_model_len=256, training_workers=0, port=0
    )
    server = cli.make_server(create_app(s), s)
    t = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    t.start()
    assert loading.wait(10)
    t0 = time.monotonic()
    with pytest.raises(SystemExit):
        server.handle_exit(signal.SIGINT, None)
    assert exited == [128 + signal.SIGINT] and time.monotonic() - t0 < 1 and not server.started
    server.should_exit = True  # (the real process is gone by now; this one's serving thread stops)
    t.join(10)
    assert not t.is_alive()


def test_a_port_in_use_fails_start_up_before_the_model_loads(tmp_path, capsys, root_logging, monkeypatch):
    """The port is bound before anything loads: a port another process listens on is exit 3 at once, saying so,
    instead of a model load, a "ready" line and then a bind error."""
    import socket

    import server.api

    def must_not_load(*a, **k):
        raise AssertionError("the app was built although the port is taken")

    monkeypatch.setattr(server.api, "create_app", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = cli.main(["serve", "--host", "127.0.0.1", "--port", str(port), "--store-url", f"file://{tmp_path}/s",
                       "--no-log-json"])  # fmt: skip
    assert rc == cli.EXIT_STARTUP
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_prefixes_list_reads_the_store(api_bundle, tmp_path, capsys):
    from prefix_store import open_store

    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    put_random_prefix(store, api_bundle, "acme", "default")
    put_random_prefix(store, api_bundle, "acme", "default", seed=2)
    put_random_prefix(store, api_bundle, "globex", "helper", prefix_length=5)
    store.close()
    assert cli.main(["prefixes", "list", "--store", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TENANT", "NAME", "VERSION", "KIND", "P", "CREATED"]
    assert out[1].split()[:5] == ["acme", "default", "2", "prefix_tuning", "8"]
    assert out[2].split()[:5] == ["globex", "helper", "1", "prefix_tuning", "5"]
    assert cli.main(["prefixes", "list", "--store", url, "--tenant-id", "globex", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["tenant_id"], r["name"]) for r in rows] == [("globex", "helper")]


def test_prefixes_list_store_down_fails_cleanly(capsys, tmp_path):
    assert cli.main(["prefixes", "list", "--store", "redis://127.0.0.1:1/0"]) == cli.EXIT_FAIL
    assert "prefixserve:" in capsys.readouterr().err
    # a file store that cannot be used, or no store URL at all: an error, not an empty list
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["prefixes", "list", "--store", f"file://{blocker}/store"]) == cli.EXIT_FAIL
    assert "prefixserve:" in capsys.readouterr().err
    assert cli.main(["prefixes", "list", "--store", "bogus://x"]) == cli.EXIT_FAIL
    assert "unsupported prefix store URL" in capsys.readouterr().err
    # a path with no store: an error, and nothing created (it made the folder and listed nothing)
    missing = tmp_path / "typo" / "store"
    for args in (
        ["list"],
        ["export", "acme", "x", "-o", str(tmp_path / "x.safetensors")],
        ["delete", "acme", "x"],
    ):
        assert cli.main(["prefixes", *args, "--store", f"file://{missing}"]) == cli.EXIT_FAIL, args
        assert "no prefix store at" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def _examples(tmp_path):
    f = tmp_path / "examples.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": " ZEBRA"}) for i in range(4)) + "\n")
    return f


CLIENT_DIR = str(Path(__file__).resolve().parents[1] / "clients" / "python")


@pytest.mark.parametrize("via", ["sdk", "httpx"])
@pytest.mark.parametrize("outcome,rc", [("succeeded", 0), ("failed", 1)])
def test_train_submits_and_waits_with_progress(
    server_factory, tmp_path, capsys, monkeypatch, outcome, rc, via
):
    jobs = FakeJobManager()
    s = server_factory(job_manager=jobs, keys={"acme": "k-acme-1"})
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "k-acme-1")
    used: list[object] = []
    if via == "sdk":
        monkeypatch.syspath_prepend(CLIENT_DIR)
        real = cli._sdk_jobs
        monkeypatch.setattr(cli, "_sdk_jobs", lambda *a: used.append(real(*a)) or used[-1])
    else:
        monkeypatch.setattr(cli, "_sdk_jobs", lambda *a: None)

    def finish_later() -> None:
        deadline = time.monotonic() + 20
        while not jobs.jobs and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        jobs.finish(next(iter(jobs.jobs)), outcome)

    t = threading.Thread(target=finish_later, daemon=True)
    t.start()
    # --tenant-id or, without it, the key's tenant (as POST /prefixes takes it)
    args = ["train", *(["--tenant-id", "acme"] if outcome == "succeeded" else []), "--name", "zebra"]
    args += [
        "--method",
        "prefix_tuning",
        "--data",
        str(_examples(tmp_path)),
        "--prefix-length",
        "8",
        "--epochs",
        "3",
    ]
    args += ["--base-url", s.url, "--poll-interval", "0.05", "--init-from", "zebra@3"]
    assert cli.main(args) == rc
    t.join()
    job = next(iter(jobs.jobs.values()))
    assert job["tenant_id"] == "acme" and job["name"] == "zebra" and job["method"] == "prefix_tuning"
    assert job["init_from"] == {"name": "zebra", "version": 3}  # the SDK takes it as ("zebra", 3)
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["status"] == outcome
    assert "training job0001" in captured.err  # the tqdm bar
    if via == "sdk":
        assert used and used[0] is not None, "the SDK should have been used"


def test_train_reports_server_errors(server_factory, tmp_path, capsys):
    s = server_factory(job_manager=FakeJobManager(), keys={"acme": "k-acme-1"})
    args = [
        "train",
        "--tenant-id",
        "acme",
        "--name",
        "x",
        "--data",
        str(_examples(tmp_path)),
        "--base-url",
        s.url,
    ]
    assert cli.main([*args, "--api-key", "wrong"]) == cli.EXIT_FAIL
    assert "401" in capsys.readouterr().err
    assert cli.main([*args, "--api-key", "k-acme-1", "--init-from", "zebra@latest"]) == cli.EXIT_USAGE
    # a job that cannot be read (gone, or not this key's): an error at once, not polling forever
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FakeJobManager, "get", lambda self, job_id: None)
        assert cli.main([*args, "--api-key", "k-acme-1", "--poll-interval", "0.05"]) == cli.EXIT_FAIL
        assert "cannot follow job" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert (
        cli.main(["train", "--tenant-id", "acme", "--name", "x", "--data", str(bad), "--base-url", s.url])
        == 2
    )


def test_waiting_on_a_job_gives_up_on_a_server_gone_for_long_and_says_so_once(capsys):
    """A server that stops answering is polled on (said once on stderr, also with --quiet) until --give-up-after
    seconds without an answer: exit 1 naming the job (it polled forever, silently with --quiet). One that answers
    again in time resets the clock."""

    class Flaky:
        def __init__(self, answers: list[Any]) -> None:
            self.answers, self.polls = answers, 0

        def get(self, job_id: str) -> dict[str, Any]:
            self.polls += 1
            got = self.answers.pop(0) if self.answers else ConnectionError("Connection refused")
            if isinstance(got, Exception):
                raise got
            return got

    gone = Flaky([{"status": "running"}])
    assert cli._wait(gone, "job-1", 0.01, quiet=True, give_up_after=0.2) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert err.count("the server does not answer") == 1 and "stopped waiting, job job-1 may go on" in err
    assert gone.polls > 3
    down = ConnectionError("Connection refused")
    back = Flaky([down] * 5 + [{"status": "running"}] + [down] * 5 + [{"status": "succeeded"}])
    assert cli._wait(back, "job-2", 0.03, quiet=True, give_up_after=1.0) == cli.EXIT_OK
    assert "stopped waiting" not in capsys.readouterr().err


def test_train_refuses_a_poll_interval_that_is_not_positive_and_a_learning_rate_json_cannot_carry(capsys):
    """(--lr nan / inf reached the submit, which failed with "Out of range float values are not JSON compliant",
    exit 1)"""
    for flag, bad in (("--poll-interval", "-1"), ("--poll-interval", "0"), ("--poll-interval", "inf"),
                      ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--tenant-id", "acme", "--name", "x", "--data", "x.jsonl", f"{flag}={bad}"])
        assert e.value.code == cli.EXIT_USAGE and f"argument {flag}: must be" in capsys.readouterr().err


def test_import_peft_into_the_store(tmp_path, capsys):
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    from prefix_store import open_store
    from server.model import load_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    base = make_tiny_llama(tok, seed=0)
    base.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    peft_model.save_pretrained(tmp_path / "adapter")
    url = f"file://{tmp_path / 'store'}"
    args = ["import-peft", str(tmp_path / "adapter"), "--tenant-id", "acme", "--name", "imported"]
    args += ["--model", str(tmp_path / "model"), "--store", url, "--cache", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (meta["tenant_id"], meta["name"], meta["prefix_length"], meta["kind"]) == (
        "acme",
        "imported",
        5,
        "prefix_tuning",
    )
    store = open_store(url)
    fp = load_model(str(tmp_path / "model"), device="cpu", cache_dir=tmp_path / "cache").fingerprint
    assert store.get("acme", "imported", expected_fingerprint=fp).tensors["kv"].shape[3] == 5
    store.close()
    assert cli.main([*args[:1], str(tmp_path / "nope"), *args[2:]]) == cli.EXIT_FAIL
    bad_model = [a if a != str(tmp_path / "model") else str(tmp_path / "no-model") for a in args]
    assert cli.main(bad_model) == cli.EXIT_FAIL
    assert "cannot load model" in capsys.readouterr().err


def test_prefixes_adopt_stores_an_old_fingerprints_prefixes_again_for_this_model(tmp_path, capsys):
    """A config.json field the model never reads, added (what a transformers upgrade's new defaults do too), moves
    the fingerprint: every stored prefix is refused. `prefixes adopt --from-fingerprint OLD` stores each name's
    newest old version again for this model (same tensors, a new version, the old one kept); one that does not fit
    the model is reported; --dry-run stores nothing; a second run has nothing to do."""
    import torch

    from prefix_store import open_store
    from server.model import load_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer, tiny_gpt2
    from tests.fixtures.server import put_random_prefix

    tok = make_tiny_tokenizer()
    folder, cache = tmp_path / "model", tmp_path / "cache"
    make_tiny_llama(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    old = load_model(str(folder), device="cpu", cache_dir=cache)
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url)
    put_random_prefix(store, old, "acme", "a", seed=1)
    put_random_prefix(store, old, "acme", "b", seed=2)
    put_random_prefix(store, old, "acme", "b", seed=3)  # v2: the one adopted
    put_random_prefix(store, tiny_gpt2(), "acme", "odd", seed=4, fingerprint=old.fingerprint)  # another shape
    put_random_prefix(store, old, "globex", "c", seed=5, fingerprint="f" * 64)  # another model's: left alone
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "note": "edited by hand"}))
    new_fp = load_model(str(folder), device="cpu", cache_dir=cache).fingerprint
    assert new_fp != old.fingerprint
    argv = ["prefixes", "adopt", "--from-fingerprint", old.fingerprint[:12], "--model", str(folder)]
    argv += ["--store", url, "--cache", str(cache)]
    assert cli.main([*argv, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and (plan["fingerprint"], plan["from_fingerprint"]) == (new_fp, old.fingerprint)
    assert [(a["name"], a["from_version"]) for a in plan["adopted"]] == [("a", 1), ("b", 2), ("odd", 1)]
    assert store.versions("acme", "b") == [1, 2]
    assert cli.main(argv) == cli.EXIT_FAIL  # one did not fit
    out = capsys.readouterr()
    res = json.loads(out.out)
    done = [(a["name"], a["from_version"], a["version"]) for a in res["adopted"]]
    assert done == [("a", 1, 2), ("b", 2, 3)]
    assert [f["name"] for f in res["failed"]] == ["odd"] and "'acme/odd' v1 not adopted" in out.err
    for name, old_v, new_v in (("a", 1, 2), ("b", 2, 3)):
        got = store.servable_meta("acme", name, None, new_fp)
        assert got.version == new_v and got.extra["adopted_from"]["version"] == old_v
        assert got.extra["prompt_format"] == "raw"
        assert torch.equal(store.get("acme", name, new_v).kv, store.get("acme", name, old_v).kv)
        assert store.servable_meta("acme", name, None, old.fingerprint).version == old_v  # the old fleet's
    assert store.versions("globex", "c") == [1]
    assert cli.main(argv) == cli.EXIT_FAIL  # again: only the misfit left to do
    res = json.loads(capsys.readouterr().out)
    assert (res["adopted"], res["already_current"], len(res["failed"])) == ([], 2, 1)
    for bad in ("abc", "z" * 12, new_fp[:12]):
        assert cli.main([*argv[:3], bad, *argv[4:]]) == cli.EXIT_USAGE
        assert "prefixserve:" in capsys.readouterr().err
    assert cli.main([*argv[:3], "0123456789ab", *argv[4:]]) == cli.EXIT_FAIL  # a typo: matches nothing
    assert "no stored version was made for a fingerprint starting with" in capsys.readouterr().err
    store.close()


def test_adopt_refuses_an_abbreviation_of_two_stored_fingerprints(tmp_path):
    from prefix_store import open_store
    from server.prefixes import adopt
    from tests.fixtures.server import put_random_prefix, tiny_bundle

    store, bundle = open_store(f"file://{tmp_path / 's'}"), tiny_bundle()
    put_random_prefix(store, bundle, "acme", "a", fingerprint="a" * 64)
    assert [x.name for x in adopt.plan(store, "a" * 12, bundle.fingerprint).adopt] == ["a"]
    put_random_prefix(store, bundle, "acme", "b", fingerprint="a" * 63 + "b")
    with pytest.raises(adopt.AmbiguousFingerprint, match="abbreviates 2 stored fingerprints"):
        adopt.plan(store, "a" * 12, bundle.fingerprint)
    assert [x.name for x in adopt.plan(store, "a" * 64, bundle.fingerprint).adopt] == ["a"]
    store.close()


def test_prefixes_copy_keeps_version_numbers_and_can_be_run_again(tmp_path, capsys, redis_store_url):
    """A file store moved to Redis with `prefixes copy`: every version of every name, each with its number (gaps
    left by deletes included: a pinned `acme/faq@3` names the same prefix after the move) and creation time; a
    second run copies nothing; a version the target holds with other bytes is reported, the rest still copied."""
    import torch

    from prefix_store import open_store
    from tests.fixtures.server import put_random_prefix, tiny_bundle

    src_url = f"file://{tmp_path / 'src'}"
    src, bundle = open_store(src_url), tiny_bundle()
    for seed in (1, 2, 3):
        put_random_prefix(src, bundle, "acme", "faq", prefix_length=5, seed=seed)
    src.delete("acme", "faq", 2)
    put_random_prefix(src, bundle, "globex", "bot", prefix_length=4, seed=4)
    dst = open_store(redis_store_url)
    argv = ["prefixes", "copy", "--from", src_url, "--to", redis_store_url]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"copied": 3, "already_there": 0, "pruned": 0, "failed": 0}
    assert dst.versions("acme", "faq") == [1, 3] and dst.versions("globex", "bot") == [1]
    for v in (1, 3):
        a, b = src.get("acme", "faq", v), dst.get("acme", "faq", v)
        assert torch.equal(a.kv, b.kv) and (a.meta.created, a.meta.sha256) == (b.meta.created, b.meta.sha256)
    assert cli.main(argv) == 0  # again: nothing to do
    assert json.loads(capsys.readouterr().out) == {"copied": 0, "already_there": 3, "pruned": 0, "failed": 0}
    put_random_prefix(src, bundle, "acme", "faq", prefix_length=5, seed=5)  # v4 in the source
    put_random_prefix(dst, bundle, "globex", "bot", prefix_length=4, seed=6)  # v2 in the target only
    put_random_prefix(src, bundle, "globex", "bot", prefix_length=4, seed=7)  # another v2 in the source
    assert cli.main([*argv, "--tenant-id", "acme"]) == 0
    assert json.loads(capsys.readouterr().out)["copied"] == 1 and dst.versions("acme", "faq") == [1, 3, 4]
    assert cli.main(argv) == cli.EXIT_FAIL
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"copied": 0, "already_there": 4, "pruned": 0, "failed": 1}
    assert "'globex/bot' v2 not copied" in captured.err
    # the store refuses a number below what the name has had
    with pytest.raises(errors.VersionTaken):
        put_random_prefix_at(dst, bundle, "acme", "faq", 2)
    assert (
        cli.main(["prefixes", "copy", "--from", f"file://{tmp_path / 'none'}", "--to", redis_store_url]) == 1
    )
    assert "no prefix store at" in capsys.readouterr().err
    assert cli.main([*argv, "--name", "nope"]) == 1  # a typo copies nothing: not a success
    assert "no prefix named 'nope'" in capsys.readouterr().err
    # a number deleted at the source is not given out again at the target (the copy carries the counter)
    put_random_prefix(src, bundle, "acme", "faq", prefix_length=5, seed=8)  # v5
    src.delete("acme", "faq", 5)
    assert cli.main([*argv, "--tenant-id", "acme"]) == 0
    capsys.readouterr()
    assert put_random_prefix(dst, bundle, "acme", "faq", prefix_length=5, seed=9).version == 6
    # also for a name deleted whole at the source
    put_random_prefix(src, bundle, "acme", "gone", prefix_length=5, seed=10)
    src.delete("acme", "gone")
    assert cli.main([*argv, "--tenant-id", "acme"]) == 0
    capsys.readouterr()
    assert put_random_prefix(dst, bundle, "acme", "gone", prefix_length=5, seed=11).version == 2


def test_prefixes_copy_goes_on_past_a_damaged_version_and_a_crash(tmp_path, capsys):
    """One damaged source version (bad bytes, or the latest's metadata unreadable) is reported and the rest is
    copied; a copy killed after a file store target took a version's number but before its commit can store it when
    run again; versions older than a keep_versions target keeps are not copied again and again."""
    from prefix_store import open_store
    from tests.fixtures.server import put_random_prefix, tiny_bundle

    src_url, dst_url = f"file://{tmp_path / 'src'}", f"file://{tmp_path / 'dst'}"
    src, bundle = open_store(src_url), tiny_bundle()
    for seed in (1, 2):
        put_random_prefix(src, bundle, "acme", "a1", prefix_length=4, seed=seed)
    put_random_prefix(src, bundle, "acme", "b2", prefix_length=4, seed=3)
    put_random_prefix(src, bundle, "zeta", "c3", prefix_length=4, seed=4)
    (tmp_path / "src" / "acme" / "a1" / "v2.json").write_text("{not json")  # its latest: unlisted
    blob = tmp_path / "src" / "acme" / "b2" / "v1.safetensors"
    data = blob.read_bytes()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    argv = ["prefixes", "copy", "--from", src_url, "--to", dst_url]
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    assert json.loads(out.out) == {"copied": 2, "already_there": 0, "pruned": 0, "failed": 2}
    assert "'acme/a1' v2 not copied" in out.err and "'acme/b2' v1 not copied" in out.err
    dst = open_store(dst_url)
    assert dst.versions("acme", "a1") == [1] and dst.versions("zeta", "c3") == [1]
    keep_url = f"file://{tmp_path / 'keep'}?keep_versions=1"
    for seed in (5, 6, 7):
        put_random_prefix(src, bundle, "acme", "k", prefix_length=4, seed=seed)
    again = ["prefixes", "copy", "--from", src_url, "--to", keep_url, "--name", "k"]
    assert cli.main(again) == 0 and cli.main(again) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {
        "copied": 0,
        "already_there": 1,
        "pruned": 2,
        "failed": 0,
    }
    assert open_store(keep_url).versions("acme", "k") == [3]


def test_a_file_store_put_of_an_asked_version_takes_its_number_once_committed(tmp_path, monkeypatch):
    """A copy killed between taking a version's number and committing it (its metadata file) can store that version
    when run again: for an asked-for number, the counter is written after the commit."""
    import prefix_store.disk as disk
    from prefix_store import open_store

    store = open_store(f"file://{tmp_path / 's'}")
    real = disk._write_file_atomic

    def crash_at_commit(path, data):
        if str(path).endswith("v3.json"):
            raise OSError("killed")
        return real(path, data)

    monkeypatch.setattr(disk, "_write_file_atomic", crash_at_commit)
    from tests.fixtures.server import tiny_bundle

    bundle = tiny_bundle()
    with pytest.raises(errors.StoreUnavailable):
        put_random_prefix_at(store, bundle, "acme", "faq", 3)
    monkeypatch.undo()
    assert put_random_prefix_at(store, bundle, "acme", "faq", 3).version == 3


def put_random_prefix_at(store, bundle, tenant, name, version):
    from tests.fixtures.server import random_kv

    kv = random_kv(bundle, 4, 0)
    return store.put(tenant, name, "prefix_tuning", {"kv": kv}, base_model_fingerprint=bundle.fingerprint,
                     prefix_length=4, version=version)  # fmt: skip


def test_prefixes_import_refuses_what_the_server_would_not_serve(tmp_path, capsys):
    """The CLI has no model, so it skipped the server's kv checks: a float8 export was a raw traceback (e4m3fn) or
    stored (e5m2, then every request for it failed), and kv over the 1e4 bound was stored for the server to refuse.
    The store refuses them itself now: rc 1, a one-line reason, nothing stored."""
    import torch

    from prefix_store import open_store
    from tests.fixtures.server import put_unchecked, random_kv, tiny_bundle

    bundle = tiny_bundle()
    url = f"file://{tmp_path / 'store'}"
    base = random_kv(bundle, 4, 0)
    src = open_store(f"file://{tmp_path / 'src'}")
    for name, kv, why in (
        ("e4m3", base.to(torch.float8_e4m3fn), "dtype float8_e4m3fn"),
        ("e5m2", base.to(torch.float8_e5m2), "dtype float8_e5m2"),
        ("huge", base * 2e4, "at most 10000 in magnitude"),
    ):
        out = tmp_path / f"{name}.safetensors"
        out.write_bytes(put_unchecked(src, bundle, "acme", name, kv))
        args = ["prefixes", "import", str(out), "--tenant-id", "acme", "--name", name, "--store", url]
        assert cli.main(args) == cli.EXIT_FAIL
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
    # what an upload refuses without a model, refused here too (they were stored, then could not be moved on: the
    # upload elsewhere refused them, or answered a 500)
    from prefix_store.export import export_prefix

    out = base.shape[0] * 2 * base.shape[2] * base.shape[4]
    mlp = {"embedding": torch.zeros(4, 8), "mlp.0.weight": torch.zeros(16, 8), "mlp.0.bias": torch.zeros(16),
           "mlp.2.weight": torch.zeros(out, 16), "mlp.2.bias": torch.zeros(out)}  # fmt: skip
    for name, tensors, extra, why in (
        ("junk", {"junk": torch.zeros(2)}, {}, "unexpected tensors ['junk']"),
        ("zero-d", {**mlp, "mlp.0.weight": torch.zeros(())}, {}, "'mlp.0.weight' must be [width >= 1, E]"),
        ("bomb", {**mlp, "embedding": torch.zeros(4, 0)}, {}, "embedding must be [P, E], got [4, 0]"),
        ("xml", {}, {"prompt_format": "xml"}, "prompt_format 'xml' is not one of chat, raw"),
    ):
        meta = src.put("acme", name, "prefix_tuning", {"kv": base, **tensors},
                       base_model_fingerprint=bundle.fingerprint, prefix_length=4, extra=extra)  # fmt: skip
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(export_prefix(src.get("acme", name, meta.version)))
        args = ["prefixes", "import", str(path), "--tenant-id", "acme", "--name", name, "--store", url]
        assert cli.main(args) == cli.EXIT_FAIL, name
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
    assert open_store(url).list() == []


def test_prefixes_export_then_import_moves_a_prefix_between_stores(tmp_path, capsys, redis_store_url):
    """A file store's prefix, exported and imported into a Redis store (a migration), is the same record there;
    a damaged file is refused and writes nothing."""
    import torch

    from prefix_store import open_store
    from tests.fixtures.server import put_random_prefix, tiny_bundle

    redis_url = redis_store_url
    src_url = f"file://{tmp_path / 'src'}"
    src = open_store(src_url)
    bundle = tiny_bundle()
    put_random_prefix(src, bundle, "acme", "faq", prefix_length=5, seed=1)
    put_random_prefix(src, bundle, "acme", "faq", prefix_length=5, seed=2, prompt_format="chat")
    out = tmp_path / "faq.safetensors"
    assert (
        cli.main(["prefixes", "export", "acme", "faq", "--version", "1", "-o", str(out), "--store", src_url])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["version"] == 1
    dst = open_store(redis_url)
    args = ["prefixes", "import", str(out), "--tenant-id", "globex", "--name", "faq", "--store", redis_url]
    assert cli.main(args) == 0
    meta = json.loads(capsys.readouterr().out)
    got = dst.get("globex", "faq", expected_fingerprint=bundle.fingerprint)
    assert meta["version"] == got.meta.version == 1
    assert torch.equal(got.kv, src.get("acme", "faq", 1).kv)
    assert (
        got.meta.extra["imported_from"]["prefix"] == "'acme/faq' v1"
        and got.meta.extra["prompt_format"] == "raw"
    )
    bad = bytearray(out.read_bytes())
    bad[-1] ^= 1
    out.write_bytes(bytes(bad))
    assert cli.main(args) == cli.EXIT_FAIL
    assert "changed since export" in capsys.readouterr().err
    assert dst.versions("globex", "faq") == [1]
    # names the API refuses, refused here too (the tenant "jobs": its prefixes could never be read over HTTP)
    for tenant, name, why in (("jobs", "faq", "cannot store prefixes"), ("globex", "base", "reserved")):
        flags = ["--tenant-id", tenant, "--name", name, "--store", redis_url]
        assert cli.main(["prefixes", "import", str(out), *flags]) == cli.EXIT_USAGE
        assert why in capsys.readouterr().err
    assert dst.versions("jobs", "faq") == [] and dst.versions("globex", "base") == []
    assert (
        cli.main(["prefixes", "export", "acme", "nope", "-o", str(out), "--store", src_url]) == cli.EXIT_FAIL
    )
    # delete: one version (the latest: the one before becomes the latest), then the name
    capsys.readouterr()
    assert cli.main(["prefixes", "delete", "acme", "faq", "--version", "2", "--store", src_url]) == 0
    assert "deleted acme/faq version 2" in capsys.readouterr().out
    assert src.versions("acme", "faq") == [1] and src.get_meta("acme", "faq").version == 1
    assert (
        cli.main(["prefixes", "delete", "acme", "faq", "--version", "2", "--store", src_url]) == cli.EXIT_FAIL
    )
    assert "not found" in capsys.readouterr().err
    assert cli.main(["prefixes", "delete", "globex", "faq", "--store", redis_url]) == 0
    assert dst.versions("globex", "faq") == []
    src.close()
    dst.close()


def test_readme_settings_table_is_current():
    """The README's settings table is what scripts/settings_table.py prints from `Settings` (one source)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("settings_table", root / "scripts" / "settings_table.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.table().strip() in (root / "README.md").read_text(encoding="utf-8"), (
        "README settings table is stale: run `.venv/bin/python scripts/settings_table.py` and paste it"
    )


def test_an_empty_variable_is_unset(monkeypatch):
    """`PREFIXSERVE_HOST=` (an empty value, as compose and shells pass through) is the default, not "": uvicorn
    binds "" to every interface, which made an open server reachable from anywhere."""
    from server.settings import Settings

    for name in (
        "PREFIXSERVE_HOST",
        "PREFIXSERVE_API_KEYS_FILE",
        "PREFIXSERVE_LIMITS_URL",
        "PREFIXSERVE_PORT",
    ):
        monkeypatch.setenv(name, "")
    s = Settings()
    assert (s.host, s.api_keys_file, s.limits_url, s.port) == ("127.0.0.1", None, None, 8000)


def test_worker_and_import_peft_read_the_environment(monkeypatch, tmp_path, capsys):
    """The worker took neither PREFIXSERVE_STORE_URL (`--store` was required) nor PREFIXSERVE_MODEL (a worker next to
    a server on another model loaded SmolLM2 and handed every job back); flags still win."""
    import server.logging_utils
    import server.training

    monkeypatch.setattr(server.logging_utils, "setup_logging", lambda *a, **kw: None)
    seen: list[dict] = []
    monkeypatch.setattr(server.training, "worker_main", lambda *a, **kw: seen.append({"args": a, **kw}) or 0)
    monkeypatch.setenv("PREFIXSERVE_STORE_URL", f"file://{tmp_path}/env-store")
    monkeypatch.setenv("PREFIXSERVE_MODEL", "/models/mine")
    monkeypatch.setenv("PREFIXSERVE_DTYPE", "bfloat16")
    monkeypatch.setenv("PREFIXSERVE_PORT", "not-a-port")  # not the worker's: no matter
    assert cli.main(["worker"]) == 0
    assert (
        seen[-1]["args"] == (f"file://{tmp_path}/env-store", "/models/mine")
        and seen[-1]["dtype"] == "bfloat16"
    )
    assert cli.main(["worker", "--store", f"file://{tmp_path}/flag", "--model", "smollm2"]) == 0
    assert seen[-1]["args"] == (f"file://{tmp_path}/flag", "smollm2")
    monkeypatch.setenv("PREFIXSERVE_DTYPE", "float64")
    assert cli.main(["worker"]) == cli.EXIT_USAGE
    assert "PREFIXSERVE_DTYPE / --dtype: dtype must be" in capsys.readouterr().err
    monkeypatch.delenv("PREFIXSERVE_DTYPE")
    assert cli.main(["worker", "--log-level", "INFO"]) == 0  # as `serve` and PREFIXSERVE_LOG_LEVEL take it
    # import-peft compiles on the CPU unless told (beside a server that holds the GPU), and names the model it tried
    import server.model

    tried: list[dict] = []

    def refuse(model, **kw):
        tried.append({"model": model, **kw})
        raise OSError("no such model")

    monkeypatch.setattr(server.model, "load_model", refuse)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert cli.main(["import-peft", str(tmp_path), "--tenant-id", "acme", "--name", "p"]) == cli.EXIT_FAIL
    assert tried[-1]["model"] == "/models/mine" and tried[-1]["device"] == "cpu"
    assert "cannot load model '/models/mine'" in capsys.readouterr().err
    # what can be told without the model is told before it loads (seconds; a first run converts for ~20 s)
    tried.clear()
    bad = {
        "invalid tenant_id 'a b'": ["import-peft", str(tmp_path), "--tenant-id", "a b", "--name", "p"],
        "invalid name 'p/q'": ["import-peft", str(tmp_path), "--tenant-id", "acme", "--name", "p/q"],
        "has no adapter_config.json": [
            "import-peft",
            str(tmp_path / "nope"),
            "--tenant-id",
            "acme",
            "--name",
            "p",
        ],
        "no prefix store at": [
            "prefixes",
            "adopt",
            "--from-fingerprint",
            "ab" * 6,
            "--store",
            f"file://{tmp_path}/x",
        ],
    }
    for said, argv in bad.items():
        assert cli.main(argv) in (cli.EXIT_USAGE, cli.EXIT_FAIL), argv
        assert said in capsys.readouterr().err, argv
    assert tried == [] and not (tmp_path / "x").exists()


def test_prefixes_commands_read_only_the_store_setting(api_bundle, tmp_path, capsys, monkeypatch):
    """A bad variable the command does not use no longer stops it (every setting was read, and a traceback came
    out); `file://~/...` works as for `serve`; a file that cannot be written is one line, exit 1."""
    monkeypatch.setenv("HOME", str(tmp_path))
    put_random_prefix(cli_store(tmp_path / "shared"), api_bundle, "acme", "p")
    monkeypatch.setenv("PREFIXSERVE_PORT", "abc")
    assert cli.main(["prefixes", "list", "--store", "file://~/shared"]) == 0
    assert "acme" in capsys.readouterr().out
    monkeypatch.setenv("PREFIXSERVE_STORE_URL", "file://~/shared")
    assert cli.main(["prefixes", "list"]) == 0
    assert "acme" in capsys.readouterr().out
    # a variable's name in any case, as `serve` reads it (the lower-case one listed the default store, empty); a
    # flag's spelling as a variable is named, with the setting meant
    monkeypatch.delenv("PREFIXSERVE_STORE_URL")
    monkeypatch.setenv("prefixserve_store_url", "file://~/shared")
    monkeypatch.setenv("PREFIXSERVE_STORE", "file://~/elsewhere")
    assert cli.main(["prefixes", "list"]) == 0
    got = capsys.readouterr()
    assert "acme" in got.out
    assert "PREFIXSERVE_STORE is not a setting: ignored (did you mean PREFIXSERVE_STORE_URL?)" in got.err
    monkeypatch.delenv("prefixserve_store_url")
    monkeypatch.delenv("PREFIXSERVE_STORE")
    monkeypatch.setenv("PREFIXSERVE_STORE_URL", "file://~/shared")
    rc = cli.main(["prefixes", "export", "acme", "p", "-o", str(tmp_path / "missing" / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_FAIL and "cannot write" in err and "Traceback" not in err


def cli_store(path: Path):
    from prefix_store import open_store

    return open_store(f"file://{path}")


def test_version_flag(capsys):
    from server import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"prefixserve {__version__}"


def test_a_store_url_at_something_that_is_not_redis_is_unavailable(capsys):
    """A port that answers, but not as Redis (an HTTP server): a clean "unavailable", not redis-py's InvalidResponse
    traceback."""
    import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    stop = threading.Event()

    def answer() -> None:
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                time.sleep(0.3)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        port = lsock.getsockname()[1]
        assert cli.main(["prefixes", "list", "--store", f"redis://127.0.0.1:{port}/0"]) == cli.EXIT_FAIL
        err = capsys.readouterr().err
        assert "does not answer as Redis" in err and "Traceback" not in err
    finally:
        stop.set()
        t.join(5)
        lsock.close()


def test_a_failure_that_repeats_is_logged_once_then_as_a_reminder(caplog):
    import logging

    from prefix_store.outage import RepeatedFailure

    log = logging.getLogger("prefixserve.test.outage")
    f = RepeatedFailure(log, "redis lost", every_s=3600)
    with caplog.at_level(logging.DEBUG, "prefixserve.test.outage"):
        for _ in range(50):
            f.failed(ConnectionError("refused"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "redis lost: refused" in warnings[0].getMessage()
    assert f.recovered() == 50 and f.recovered() == 0
    f.every_s = 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, "prefixserve.test.outage"):
        f.failed(ConnectionError("a"))
        f.failed(ConnectionError("b"))
    assert "still failing (2 attempts" in caplog.records[-1].getMessage()


def test_text_logs_escape_line_breaks_in_fields():
    """With --log-prompts and text logs, a prompt holding a newline and a fake record could forge a log line."""
    import logging

    from server.logging_utils import TextFormatter

    r = logging.LogRecord("prefixserve.api", logging.INFO, "x", 1, "request", None, None)
    r.fields = {"prompt": "hi\n2026-12-05 10:00:00 ERROR forged", "status": 200}
    line = TextFormatter().format(r)
    assert "\n" not in line and "prompt='hi\\n2026" in line and line.endswith("status=200")


def test_make_serve_takes_the_servers_own_port_variables():
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PREFIXSERVE_PORT": "9123", "PREFIXSERVE_HOST": "0.0.0.0"}
    out = subprocess.run(["make", "-n", "serve"], cwd=root, env=env, capture_output=True, text=True).stdout
    assert "--host 0.0.0.0 --port 9123" in out
    out = subprocess.run(
        ["make", "-n", "serve", "PORT=9200"], cwd=root, env=env, capture_output=True, text=True
    )
    assert "--port 9200" in out.stdout


def test_settings_refuse_a_keyword_that_is_no_setting(monkeypatch):
    """`Settings(keep_versions=3)` (which lives in the store URL) was dropped without a word (extra="ignore"), so
    an embedding program ran on the default; a keyword no setting reads is an error naming it. Unknown
    PREFIXSERVE_* variables stay a warning (the server's environment is shared with other tools)."""
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="keep_versions"):
        Settings(keep_versions=3)
    monkeypatch.setenv("PREFIXSERVE_KEEP_VERSIONS", "3")
    assert Settings(max_queued=4).max_queued == 4


def test_unknown_prefixserve_variables_are_warned_of(monkeypatch, caplog, tmp_path):
    """A mistyped PREFIXSERVE_* variable was ignored without a word (an open server for PREFIXSERVE_APIKEYS): the
    server logs each one it does not read, with the setting it probably meant (as vLLM warns of VLLM_* ones)."""
    import server.api
    import server.logging_utils
    from server.settings import Settings, unknown_env

    env = {"PREFIXSERVE_MAX_QUEUD": "5", "PREFIXSERVE_APIKEYS": "a:k", "PREFIXSERVE_COLOUR": "1",
           "PREFIXSERVE_PORT": "1", "PREFIXSERVE_CACHE": "/c", "PREFIXSERVE_API_KEY": "sdk", "OTHER": "x",
           "PREFIXSERVE_Max_Queued": "7", "prefixserve_colour2": "1"}  # fmt: skip
    assert unknown_env(env) == [
        ("PREFIXSERVE_APIKEYS", "PREFIXSERVE_API_KEYS"),
        ("PREFIXSERVE_COLOUR", None),
        ("PREFIXSERVE_MAX_QUEUD", "PREFIXSERVE_MAX_QUEUED"),
        ("prefixserve_colour2", None),
    ]
    monkeypatch.setattr(server.logging_utils, "setup_logging", lambda *a, **kw: None)
    monkeypatch.setenv("PREFIXSERVE_MAX_QUEUD", "5")

    def no_app(*a, **kw):
        raise ValueError("stop here")

    monkeypatch.setattr(server.api, "create_app", no_app)
    caplog.set_level("WARNING")
    assert cli.run_server(Settings(port=0, store_url=str(tmp_path / "s"))) == cli.EXIT_STARTUP
    assert (
        "PREFIXSERVE_MAX_QUEUD is not a setting: ignored (did you mean PREFIXSERVE_MAX_QUEUED?)"
        in caplog.text
    )


def test_offline_store_commands_check_reserved_names_without_loading_the_http_app(tmp_path):
    """`prefixes import` refuses what the API refuses (the tenant id 'jobs', the name 'base') before reading the
    file, and the check lives in prefix_store.names: the offline command does not load fastapi and the app for it."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom server.cli import main\n"
        f"rc = main(['prefixes', 'import', {str(tmp_path / 'x.safetensors')!r}, '--tenant-id', 'jobs', '--name', 'x',"
        f" '--store', {(tmp_path / 's').as_uri()!r}])\n"
        "print('RC', rc, sorted(m for m in sys.modules if m.split('.')[0] == 'fastapi' or m.startswith('server.api')))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert "tenant id 'jobs' cannot store prefixes" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"RC {cli.EXIT_USAGE} []"


@pytest.mark.parametrize("when", ["import", "main"])
def test_ctrl_c_before_a_command_handles_it_ends_quietly_with_130(when):
    """Ctrl-C in the command's first second or two (torch imports) printed a 40-frame KeyboardInterrupt traceback
    from inside an import and exited -2; now one line and 130, as later."""
    import subprocess
    import sys

    code = (
        "import builtins, os, signal\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'torch' and WHEN == 'import':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "from server import console\n"
        "if WHEN == 'main':\n"
        "    from server import cli\n"
        "    def main():\n"
        "        raise KeyboardInterrupt\n"
        "    cli.main = main\n"
        "console.console()\n"
    ).replace("WHEN", repr(when))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 130 and out.stderr == "prefixserve: interrupted\n", (
        out.returncode,
        out.stderr[-2000:],
    )


def test_the_command_ends_without_the_interpreters_teardown():
    """`prefixserve` (`server.console`) ends with main's code, its output and logs flushed, and does not wait for threads
    still running (the interpreter's teardown could abort in native code after a clean drain: SIGABRT, -6)."""
    import subprocess
    import sys

    code = (
        "import logging, sys, threading, time\n"
        "from server import cli, console\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon: a teardown would wait for it\n"
        "def main():\n"
        "    logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
        "    logging.getLogger('x').info('logged')\n"
        "    sys.stdout.write('written')  # (no newline: flushed by end_process, not by a line buffer)\n"
        "    return 3\n"
        "cli.main = main\n"
        "console.console()\n"
    )
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=50)
    assert out.returncode == 3 and out.stdout == "written" and "logged" in out.stderr
    assert time.monotonic() - t0 < 40  # did not wait for the 60 s thread
