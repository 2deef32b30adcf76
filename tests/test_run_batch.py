"""`prefixserve run-batch` (vLLM's run-batch): an OpenAI Batch JSONL file through the server's own app in-process:
each line's result in input order, the same answer the HTTP route gives, errors per line, busy answers retried,
authentication as the server's, the output written whole."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.batch import parse_line, run_batch
from server.settings import Settings

KEY = "sk-acme-batch"


def line(cid, url, body, **kw):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **kw})


CHAT = {
    "model": "acme/default",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 6,
    "temperature": 0,
}
COMP = {"model": "acme/default", "prompt": "Tell me", "max_tokens": 5, "temperature": 0, "ignore_eos": True}


def batch(srv, api_bundle, lines, api_key=None, concurrency=None, **settings):
    s = Settings(store_url=srv.store.url, kv_cache_mb=16, max_model_len=512, **settings)
    return asyncio.run(
        run_batch(s, lines, concurrency=concurrency, api_key=api_key, bundle=api_bundle, store=srv.store)
    )


@pytest.fixture
def srv(server_factory):
    return server_factory(prefixes={("acme", "default"): {"seed": 3}})


def test_results_in_input_order_equal_the_http_answers(srv, api_bundle):
    c = srv.client()
    lines = [
        line("chat", "/v1/chat/completions", CHAT),
        "not json",
        line("comp", "/v1/completions", COMP),
        line("missing", "/v1/completions", {**COMP, "model": "acme/nope"}),
        line("embed", "/v1/embeddings", {"input": "x"}),
        line("streamed", "/v1/completions", {**COMP, "stream": True}),
        json.dumps({"url": "/v1/completions", "body": COMP}),
        line("native", "/generate", {"tenant_id": "acme", "prompt": "Tell me", "max_tokens": 4}),
        line("bad-field", "/v1/completions", {**COMP, "max_tokens": -1}),
        line(
            "claude", "/v1/messages", {"model": "acme/default", "max_tokens": 4, "messages": CHAT["messages"]}
        ),
    ]
    out = batch(srv, api_bundle, lines)
    assert [o["custom_id"] for o in out] == [
        "chat",
        None,
        "comp",
        "missing",
        "embed",
        "streamed",
        None,
        "native",
        "bad-field",
        "claude",
    ]
    assert len({o["id"] for o in out}) == len(out) and all(o["id"].startswith("batch_req_") for o in out)
    by = {o["custom_id"]: o for o in out if o["custom_id"]}
    assert (
        by["claude"]["response"]["status_code"] == 200
        and by["claude"]["response"]["body"]["type"] == "message"
    )
    want_chat = c.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    assert by["chat"]["response"]["status_code"] == 200 and by["chat"]["error"] is None
    assert by["chat"]["response"]["body"]["choices"][0]["message"]["content"] == want_chat
    assert by["chat"]["response"]["body"]["id"] == "chatcmpl-" + by["chat"]["response"]["request_id"]
    want_comp = c.post("/v1/completions", json=COMP).json()["choices"][0]["text"]
    assert by["comp"]["response"]["body"]["choices"][0]["text"] == want_comp
    assert (
        by["native"]["response"]["body"]["text"]
        == c.post("/generate", json=json.loads(lines[7])["body"]).json()["text"]
    )
    # an answer the server gives as an error: its status and error body (OpenAI's batch output)
    assert by["missing"]["response"]["status_code"] == 404 and by["missing"]["error"] is None
    assert by["missing"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert by["bad-field"]["response"]["status_code"] == 400
    assert by["bad-field"]["response"]["body"]["error"]["param"] == "max_tokens"
    # lines that are not requests: no response, an error saying why
    assert out[1]["response"] is None and out[1]["error"]["code"] == "invalid_json"
    assert by["embed"]["error"]["code"] == "invalid_url" and by["embed"]["response"] is None
    assert "stream" in by["streamed"]["error"]["message"]
    assert "custom_id" in out[6]["error"]["message"]


def test_busy_answers_are_retried(srv, api_bundle, monkeypatch):
    """More requests at once than the engine takes (a batch of 1, a queue of 1): without retries some are 503s,
    with them every one is answered."""
    import server.batch

    lines = [line(f"r{i}", "/v1/completions", {**COMP, "prompt": f"Tell me {i}"}) for i in range(6)]
    busy = {"concurrency": 6, "max_num_seqs": 1, "max_queued": 1}
    monkeypatch.setattr(server.batch, "RETRIES", 0)
    assert 503 in [o["response"]["status_code"] for o in batch(srv, api_bundle, lines, **busy)]
    monkeypatch.setattr(server.batch, "RETRIES", 8)
    assert [o["response"]["status_code"] for o in batch(srv, api_bundle, lines, **busy)] == [200] * 6


def test_a_tenants_concurrency_limit_is_waited_out(srv, api_bundle):
    """More lines at once than the tenant may run (its limit 1): each waits its turn (it gave up after 8 tries)."""
    lines = [line(f"r{i}", "/v1/completions", {**COMP, "prompt": f"Tell me {i}"}) for i in range(5)]
    out = batch(srv, api_bundle, lines, concurrency=5, max_concurrent_per_tenant=1)
    assert [o["response"]["status_code"] for o in out] == [200] * 5


def test_authentication_is_the_servers(srv, api_bundle):
    lines = [line("x", "/v1/completions", COMP)]
    keyed = {"api_keys": f"acme:{KEY}"}
    assert batch(srv, api_bundle, lines, **keyed)[0]["response"]["status_code"] == 401
    assert batch(srv, api_bundle, lines, api_key=KEY, **keyed)[0]["response"]["status_code"] == 200
    # the operator's admin key is the batch's when no key is given
    assert batch(srv, api_bundle, lines, admin_key="adm", **keyed)[0]["response"]["status_code"] == 200


def test_lines_split_at_newlines_only(tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 as they are: they do not split a line (they did: one request
    became two invalid lines)."""
    from server.batch import read_lines

    reqs = [
        line(f"r{i}", "/tokenize", {"prompt": f"a{ch}b"}) for i, ch in enumerate("\u2028\u2029\u0085\x1c")
    ]
    f = tmp_path / "in.jsonl"
    f.write_bytes(
        ("\r\n".join(json.dumps(json.loads(r), ensure_ascii=False) for r in reqs) + "\n\n").encode()
    )
    got = read_lines(str(f))
    assert len(got) == 4 and [parse_line(g)[1] for g in got] == [None] * 4


def test_parse_line_names_what_is_wrong():
    assert parse_line("[1]")[1]["message"] == "a line is a JSON object"
    assert parse_line(line("a", "/v1/completions", COMP, method="GET"))[1]["message"] == "method must be POST"
    assert (
        parse_line(json.dumps({"custom_id": "a", "url": "/v1/completions"}))[1]["code"] == "invalid_request"
    )
    req, err = parse_line(line("a", "/v1/completions", COMP))
    assert err is None and req["body"] == COMP


def test_the_command_writes_the_results_file(tmp_path, capsys, monkeypatch, root_logging):
    """End to end: a model folder and a store from flags; exit 0 with every line's result, the file written whole;
    2 for an input file that cannot be read (and no output file)."""
    from server.cli import main
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    folder = tmp_path / "model"
    make_tiny_llama(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    src = tmp_path / "in.jsonl"
    body = {"model": "acme/base", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    src.write_text(
        line("one", "/v1/completions", body) + "\n\n" + line("two", "/v1/completions", body) + "\n"
    )
    dst = tmp_path / "out.jsonl"
    common = [
        "--model",
        str(folder),
        "--store-url",
        f"file://{tmp_path / 'store'}",
        "--cache",
        str(tmp_path / "c"),
    ]
    common += ["--kv-cache-mb", "16", "--max-model-len", "256"]
    # a server's listening settings are not a batch's: TLS settings in the environment (here alone, which `serve`
    # refuses) are left alone, and there are no such flags
    monkeypatch.setenv("PREFIXSERVE_SSL_KEYFILE", str(tmp_path / "server.key"))
    with pytest.raises(SystemExit):
        main(["run-batch", "-i", str(src), "-o", str(dst), "--ssl-certfile", "x.pem", *common])
    assert "unrecognized arguments: --ssl-certfile" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(src), "-o", str(dst), *common]) == 0
    monkeypatch.delenv("PREFIXSERVE_SSL_KEYFILE")
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["one", "two"]
    texts = [o["response"]["body"]["choices"][0]["text"] for o in out]
    assert texts[0] == texts[1] and out[0]["response"]["body"]["usage"]["completion_tokens"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    missing = tmp_path / "nope.jsonl"
    assert main(["run-batch", "-i", str(missing), "-o", str(tmp_path / "x.jsonl"), *common]) == 2
    assert not (tmp_path / "x.jsonl").exists() and "cannot read" in capsys.readouterr().err
    # refused before the model loads (a batch's results were lost at the end): an output folder that is not there,
    # the same custom_id twice, keys required and none given
    assert main(["run-batch", "-i", str(src), "-o", str(tmp_path / "no" / "out.jsonl"), *common]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    assert (
        main(["run-batch", "-i", str(src), "-o", str(tmp_path), *common]) == 2
    )  # (a folder: a traceback at the end)
    assert "it is a folder" in capsys.readouterr().err
    twice = tmp_path / "twice.jsonl"
    twice.write_text(
        line("one", "/v1/completions", body) + "\n" + line("one", "/v1/completions", body) + "\n"
    )
    assert main(["run-batch", "-i", str(twice), "-o", str(dst), *common]) == 2
    assert "'one' is given twice" in capsys.readouterr().err
    monkeypatch.setenv("PREFIXSERVE_API_KEYS", "acme:sk-1")
    monkeypatch.delenv("PREFIXSERVE_API_KEY", raising=False)
    assert main(["run-batch", "-i", str(src), "-o", str(dst), *common]) == 2
    assert "PREFIXSERVE_API_KEY" in capsys.readouterr().err


def test_ctrl_c_writes_the_lines_done_and_exits_130(tmp_path, root_logging, caplog):
    """Ctrl-C (SIGINT) mid-batch: the request under way ends, the lines finished before it are written (whole
    results, in input order), exit 130; it was a traceback, and every finished result was lost."""
    import logging
    import os
    import signal

    from server.cli import main
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    folder = tmp_path / "model"
    make_tiny_llama(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    src = tmp_path / "in.jsonl"
    body = {"model": "acme/base", "prompt": "Hello", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    src.write_text("".join(line(f"r{i:02d}", "/v1/completions", body) + "\n" for i in range(40)))
    dst = tmp_path / "out.jsonl"

    class InterruptAfterTwo(logging.Handler):
        sent = False

        def emit(self, record: logging.LogRecord) -> None:
            if not self.sent and record.getMessage().startswith("2/40 requests done"):
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)

    handler = InterruptAfterTwo()
    logging.getLogger("prefixserve.batch").addHandler(handler)
    try:
        rc = main(["run-batch", "-i", str(src), "-o", str(dst), "--max-concurrency", "1", "--model", str(folder),
                   "--store-url", f"file://{tmp_path / 'store'}", "--cache", str(tmp_path / "c"),
                   "--kv-cache-mb", "16", "--max-model-len", "256"])  # fmt: skip
    finally:
        logging.getLogger("prefixserve.batch").removeHandler(handler)
    assert handler.sent and rc == 128 + signal.SIGINT
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert 2 <= len(out) < 40, len(out)
    assert [o["custom_id"] for o in out] == [f"r{i:02d}" for i in range(len(out))]
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 48 for o in out)
    import gc

    gc.collect()  # (asyncio says "exception was never retrieved" when such a future is collected)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_batch_runs_no_training_worker(srv, api_bundle, monkeypatch):
    """A training worker in the batch's process would join a shared job queue and take the deployment's queued
    jobs, handing them back half done when the batch ends: the batch's app runs none, whatever the settings say."""
    import server.api

    seen = []
    real = server.api.create_app
    monkeypatch.setattr(server.api, "create_app", lambda s, **kw: seen.append(s) or real(s, **kw))
    out = batch(srv, api_bundle, [line("a", "/v1/chat/completions", CHAT)], training_workers=2)
    assert out[0]["response"]["status_code"] == 200
    assert [s.training_workers for s in seen] == [0]


def test_a_line_the_server_fails_on_is_that_lines_error(
    srv, api_bundle, tmp_path, monkeypatch, root_logging, caplog
):
    """An exception in a route (a bug: the app answers 500, the in-process transport re-raises it) is that line's
    error, the other lines answered: it ended the batch at once, the others ran on orphaned, and the command wrote
    the lines done by then (none here) and exited 0 saying none had failed."""
    import logging

    import server.api.routes_openai as routes
    import server.batch
    from server.cli import main

    real_plan = routes.chat_plan

    async def plan(svc, info, body, prefix):
        if body.messages[0].content == "boom":
            raise RuntimeError("a bug")
        return await real_plan(svc, info, body, prefix)

    monkeypatch.setattr(routes, "chat_plan", plan)  # (the chat route reads it at each call)
    real_run = server.batch.run_batch  # (the command's app on the fixtures' model and store: no model load)
    monkeypatch.setattr(
        server.batch,
        "run_batch",
        lambda s, lines, **kw: real_run(s, lines, bundle=api_bundle, store=srv.store, **kw),
    )
    lines = [line(f"ok{i}", "/v1/chat/completions", CHAT) for i in range(4)]
    lines.insert(
        1, line("boom", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "boom"}]})
    )
    src, dst, folder = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "model"
    src.write_text("\n".join(lines) + "\n")
    api_bundle.hf_model.config.save_pretrained(
        folder
    )  # (what the settings check reads; the model is injected)
    (folder / "model.safetensors").write_bytes(b"")
    caplog.set_level(logging.INFO, logger="prefixserve")
    rc = main(["run-batch", "-i", str(src), "-o", str(dst), "--max-concurrency", "2", "--model", str(folder),
               "--store-url", srv.store.url, "--kv-cache-mb", "16", "--max-model-len", "512"])  # fmt: skip
    assert rc == 0  # (a request's error is a result)
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["custom_id"] for o in out] == ["ok0", "boom", "ok1", "ok2", "ok3"]
    assert out[1]["response"] is None and out[1]["error"]["code"] == "internal_error"
    assert "a bug" in out[1]["error"]["message"]
    assert [o["response"]["status_code"] for i, o in enumerate(out) if i != 1] == [200] * 4
    assert "5 requests, 1 failed" in caplog.text


@pytest.mark.parametrize("stop", [False, True])
def test_an_exception_of_the_batch_itself_is_raised(stop):
    """A task that ends with an exception (not a line's: here the progress callback's) is raised, with no task left
    running: it was filtered out, and the lines done at that instant returned as if they were all."""
    from fastapi import FastAPI

    from server.batch import run_lines

    app = FastAPI()

    @app.post("/tokenize")
    async def tokenize(body: dict) -> dict:
        await asyncio.sleep(0.01 * len(body["prompt"]))
        return {"tokens": []}

    def progress(n: int, total: int) -> None:
        if n == 2:
            raise RuntimeError("progress failed")

    lines = [line(f"r{i}", "/tokenize", {"prompt": "x" * i}) for i in range(6)]

    async def main():
        before = asyncio.all_tasks()
        with pytest.raises(RuntimeError, match="progress failed"):
            await run_lines(
                app, lines, concurrency=2, progress=progress, stop=asyncio.Event() if stop else None
            )
        assert asyncio.all_tasks() - before == set()  # nothing left running

    asyncio.run(main())
