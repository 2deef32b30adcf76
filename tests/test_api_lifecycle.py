"""Client disconnects abort their engine request; SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time

import httpx

from prefix_store import open_store
from tests.fixtures.server import assert_error, metric_value, parse_sse, put_random_prefix, slow_engine


def wait_until(pred, timeout: float = 5.0, interval: float = 0.005) -> float:
    """Seconds until `pred()` held (AssertionError on timeout)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)
    return time.monotonic() - t0


def engine_idle(svc) -> bool:
    llm = svc.llm
    return llm.num_running == 0 and llm.num_waiting == 0 and not llm._seqs


def only_prefix_blocks_used(svc) -> bool:
    llm = svc.llm
    return llm.pool.num_used == sum(len(e.blocks) for e in llm.prefix_cache.entries.values())


def test_stream_disconnect_aborts_within_a_step(server_factory, api_bundle, caplog):
    caplog.set_level(logging.INFO, logger="prefixserve.access")
    s = server_factory()
    put_random_prefix(s.store, api_bundle, "acme")
    slow_engine(s.svc, 0.01)
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "go", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with c.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        assert s.svc.llm.num_running == 1
    # closing the response closes the connection; the engine drops the request at its next step
    took = wait_until(lambda: engine_idle(s.svc), timeout=3)
    assert took < 1.5  # generating the 400 tokens would take > 4 s
    assert only_prefix_blocks_used(s.svc), "the aborted request's KV blocks were not freed"
    m = c.get("/metrics").text
    assert metric_value(m, "prefixserve:request_success_total", {"finished_reason": "abort"}) == 1
    # the tokens it generated before the client left are counted (they were computed), not the 400 asked for
    generated = metric_value(m, "prefixserve:generation_tokens_total")
    assert 0 < generated < 50
    assert s.svc._tenant_active == {}
    # its log line says so too
    line = next(r.fields for r in caplog.records if getattr(r, "fields", {}).get("route") == "/generate")
    assert line["finish_reason"] == "abort" and line["completion_tokens"] == generated, line
    assert line["prompt_tokens"] > 0


def test_many_aborted_streams_then_a_request_completes_promptly(server_factory, api_bundle):
    s = server_factory()
    put_random_prefix(s.store, api_bundle, "acme")
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "go", "max_tokens": 300, "ignore_eos": True, "stream": True}
    t_start = time.monotonic()
    for _ in range(200):  # vLLM's abort test: 200 streams dropped after their first event
        with c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
    wait_until(lambda: engine_idle(s.svc), timeout=10)
    assert only_prefix_blocks_used(s.svc)
    t0 = time.monotonic()
    r = c.post("/generate", json={"tenant_id": "acme", "prompt": "after", "max_tokens": 8})
    assert r.status_code == 200 and time.monotonic() - t0 < 5
    print(f"\n200 aborted streams in {t0 - t_start:.1f} s; next request {time.monotonic() - t0:.3f} s")


def test_non_streaming_disconnect_aborts(server_factory, api_bundle):
    s = server_factory()
    put_random_prefix(s.store, api_bundle, "acme")
    slow_engine(s.svc, 0.01)
    payload = json.dumps(
        {"tenant_id": "acme", "prompt": "go", "max_tokens": 400, "ignore_eos": True}
    ).encode()
    port = int(s.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    wait_until(lambda: s.svc.llm.num_running == 1, timeout=5)
    sock.close()
    took = wait_until(lambda: engine_idle(s.svc), timeout=3)
    assert took < 1.5  # 400 tokens would take > 4 s
    assert only_prefix_blocks_used(s.svc)
    assert s.svc._tenant_active == {}


def test_a_client_that_leaves_while_queued_is_a_quiet_499(server_factory, api_bundle, caplog):
    """A client gone before its request started (queued behind a busy engine) on each route: its request is
    aborted and recorded as 499, without an 'unhandled error' traceback or a 500 in the metrics (there was one
    per route)."""
    s = server_factory(max_num_seqs=1, max_queued=8)
    put_random_prefix(s.store, api_bundle, "acme")
    slow_engine(s.svc, 0.01)
    hog = threading.Thread(
        target=lambda: s.client().post(
            "/generate", json={"tenant_id": "acme", "prompt": "hog", "max_tokens": 300, "ignore_eos": True}
        ),
        daemon=True,
    )
    hog.start()
    wait_until(lambda: s.svc.llm.num_running == 1, timeout=5)
    asks = [
        ("/generate", {"tenant_id": "acme", "prompt": "q", "max_tokens": 5}),
        ("/generate", {"tenant_id": "acme", "prompt": "q", "max_tokens": 5, "stream": True}),
        ("/v1/completions", {"model": "acme", "prompt": "q", "max_tokens": 5}),
        (
            "/v1/chat/completions",
            {"model": "acme", "messages": [{"role": "user", "content": "q"}], "max_tokens": 5},
        ),
        ("/tgi/generate", {"inputs": "q", "parameters": {"max_new_tokens": 5, "adapter_id": "acme"}}),
    ]
    with caplog.at_level("ERROR"):
        for path, body in asks:
            with s.client(timeout=0.3) as c, contextlib.suppress(httpx.TimeoutException):
                c.post(path, json=body)
            wait_until(lambda: s.svc.llm.num_waiting == 0, timeout=5)
        hog.join(30)
        wait_until(lambda: engine_idle(s.svc), timeout=10)
    m = s.client().get("/metrics").text
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/tgi/generate"):
        labels = {"route": path, "method": "POST"}
        assert metric_value(m, "prefixserve:http_requests_total", {**labels, "status": "500"}) is None, path
        assert metric_value(m, "prefixserve:http_requests_total", {**labels, "status": "499"}), path
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]
    assert only_prefix_blocks_used(s.svc) and s.svc._tenant_active == {}


def test_sigterm_drains_in_flight_and_exits_zero(subprocess_server, tmp_path):
    from tests.fixtures.server import tiny_bundle

    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    put_random_prefix(store, tiny_bundle(), "acme")
    store.close()
    sp = subprocess_server(store_url=store_url, shutdown_grace_s=60, step_delay=0.02)
    c = sp.client()
    assert c.get("/ready").status_code == 200
    result: dict = {}
    first = threading.Event()

    def stream() -> None:
        with (
            sp.client() as sc,
            sc.stream(
                "POST",
                "/generate",
                json={
                    "tenant_id": "acme",
                    "prompt": "drain",
                    "max_tokens": 250,
                    "ignore_eos": True,
                    "stream": True,
                },
            ) as r,
        ):
            chunks = []
            for chunk in r.iter_text():
                chunks.append(chunk)
                first.set()
            result["status"] = r.status_code
            result["body"] = "".join(chunks)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert first.wait(30)
    sp.terminate()
    wait_until(lambda: c.get("/ready").status_code == 503, timeout=5, interval=0.02)
    assert c.head("/ready").status_code == 503  # to a HEAD probe too
    r = c.get("/ready")
    assert r.headers["retry-after"] and r.json()["checks"]["lifecycle"] == "shutting_down"
    assert_error(
        c.post("/generate", json={"tenant_id": "acme", "prompt": "late", "max_tokens": 2}),
        503,
        "shutting_down",
    )
    assert t.is_alive(), "the in-flight stream should still be running while draining"
    t.join(60)
    assert result["status"] == 200
    frames = parse_sse(result["body"])
    assert frames[-1] == "[DONE]"
    assert frames[-2]["finish_reason"] == "length" and frames[-2]["usage"]["completion_tokens"] == 250
    assert sp.wait(60) == 0
    c.close()


def test_sighup_does_not_stop_the_server(subprocess_server, tmp_path):
    """SIGHUP (a closed terminal, `systemctl reload`) killed the server at once (exit 129, no drain)."""
    import signal

    sp = subprocess_server(store_url=f"file://{tmp_path / 'store'}")
    c = sp.client()
    assert c.get("/ready").status_code == 200
    sp.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert sp.proc.poll() is None and c.get("/ready").status_code == 200
    assert "SIGHUP ignored" in sp.log()  # (with a line saying so: what a reload does instead)
    sp.terminate()
    assert sp.wait(60) == 0
    c.close()


class _TwoLongRequests:
    """A subprocess server with a prefix, one streamed and one whole long request in flight on it; `finish()`
    collects their outcomes once the server has gone."""

    def __init__(self, subprocess_server, tmp_path, grace_s: float) -> None:
        from tests.fixtures.server import tiny_bundle

        store_url = f"file://{tmp_path / 'store'}"
        store = open_store(store_url)
        put_random_prefix(store, tiny_bundle(), "acme")
        store.close()
        self.sp = sp = subprocess_server(store_url=store_url, shutdown_grace_s=grace_s, step_delay=0.05)
        body = {"tenant_id": "acme", "prompt": "long", "max_tokens": 400, "ignore_eos": True}
        self.result: dict = {}
        first = threading.Event()

        def stream() -> None:
            with sp.client() as sc, sc.stream("POST", "/generate", json={**body, "stream": True}) as r:
                chunks = []
                for chunk in r.iter_text():
                    chunks.append(chunk)
                    first.set()
                self.result["stream"] = (r.status_code, "".join(chunks))

        def whole() -> None:
            with sp.client() as wc:
                r = wc.post("/generate", json=body)
                self.result["whole"] = (r.status_code, r.json(), r.headers.get("retry-after"))

        self.threads = [threading.Thread(target=f, daemon=True) for f in (stream, whole)]
        for t in self.threads:
            t.start()
        assert first.wait(30)

    def assert_ended_with_503s(self, why: str) -> None:
        """The stream ended with a 503 `shutting_down` error event (then [DONE]), the whole request with the 503."""
        for t in self.threads:
            t.join(10)
        status, text = self.result["stream"]
        frames = parse_sse(text)
        assert status == 200 and frames[-1] == "[DONE]", frames[-3:]
        err = frames[-2]["error"]
        assert err["code"] == "shutting_down" and err["status"] == 503 and why in err["message"]
        status, payload, retry_after = self.result["whole"]
        assert status == 503 and payload["error"]["code"] == "shutting_down" and retry_after


def test_sigterm_past_the_grace_period_ends_streams_with_an_error_and_exits_promptly(
    subprocess_server, tmp_path
):
    """A stream still running when the grace period runs out ends with a 503 `shutting_down` error event (it was
    cut off without one, and uvicorn then waited a second grace period before exiting); a non-streaming request
    gets the 503 itself; the process exits 0 within the grace period plus a couple of seconds."""
    two = _TwoLongRequests(subprocess_server, tmp_path, grace_s=1)
    t0 = time.monotonic()
    two.sp.terminate()
    assert two.sp.wait(30) == 0
    took = time.monotonic() - t0
    assert took < 1 + 4, took  # grace + the flush, not two graces
    two.assert_ended_with_503s("grace period")


def test_a_second_sigterm_ends_the_drain_with_503s_and_exits_1(subprocess_server, tmp_path):
    """A second signal during the drain ends what is in flight as the end of the grace period does (a 503
    `shutting_down`: an error event in a stream, the JSON error otherwise) and exits 1, so a supervisor can tell a
    cut drain from a clean one. It used to hand over to uvicorn: streams cut without an error event, a plain-text
    500 for the rest, tracebacks in the log, and exit 0."""
    two = _TwoLongRequests(subprocess_server, tmp_path, grace_s=60)
    with two.sp.client() as c:
        two.sp.terminate()
        wait_until(lambda: c.get("/ready").status_code == 503, timeout=5, interval=0.02)
    t0 = time.monotonic()
    two.sp.terminate()
    assert two.sp.wait(30) == 1
    assert time.monotonic() - t0 < 5  # the flush, not the 60 s grace
    two.assert_ended_with_503s("second time")


def test_engine_thread_death_fails_requests_instead_of_hanging(server_factory, api_bundle):
    s = server_factory()
    put_random_prefix(s.store, api_bundle, "acme")
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "x", "max_tokens": 200, "ignore_eos": True}
    llm = s.svc.llm
    step = llm.step
    calls = {"n": 0}

    def dying_step():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated engine crash")
        return step()

    llm.step = dying_step
    t0 = time.monotonic()
    r = c.post("/generate", json=body)
    err = assert_error(r, 503, "engine_dead")
    assert err["message"] == "the inference engine stopped"  # what it was is logged, not sent to clients
    assert time.monotonic() - t0 < 5
    r = c.get("/ready")
    assert r.status_code == 503 and r.json()["checks"]["engine"] == "dead"
    assert_error(c.post("/generate", json=body), 503, "engine_unavailable")
    # liveness fails too (only a restart brings the engine back), and a SIGTERM drain has nothing to wait for
    assert_error(c.get("/health"), 503, "engine_dead")
    assert s.svc.engine.idle()
    m = c.get("/metrics").text  # its requests were failed: the gauges do not keep the last step's counts
    assert (
        metric_value(m, "prefixserve:num_requests_running")
        == metric_value(m, "prefixserve:num_requests_waiting")
        == 0
    )


def test_the_server_process_freezes_its_start_up_objects_for_the_gc(api_bundle, tmp_path):
    """The CLI's app moves what start-up made to the GC's permanent generation (full collections over ~400k
    long-lived objects paused every stream for 0.2-0.7 s); an app built without it (tests, embedding) does not."""
    import gc

    from server.api.app import create_app
    from server.settings import Settings
    from tests.fixtures.server import start_server

    before = gc.get_freeze_count()  # (0 on Python 3.11; 3.12 starts with a few hundred there)
    assert before < 10_000
    store = open_store(f"file://{tmp_path / 'store'}")
    s = Settings(store_url=store.url, kv_cache_mb=16, max_model_len=512, training_workers=0)
    server, thread, url = start_server(create_app(s, bundle=api_bundle, store=store, freeze_gc=True))
    try:
        assert gc.get_freeze_count() > before + 10_000
        body = {"tenant_id": "acme", "prefix": "base", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(url + "/generate", json=body, timeout=30).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
        gc.unfreeze()
        store.close()


def test_sigterm_waits_for_a_request_whose_body_is_still_arriving(subprocess_server, tmp_path):
    """A request let in before SIGTERM, its body still arriving (an upload's can take minutes): the drain waits for
    it and serves it (it was not counted in flight until its body was read, so the server exited under it and the
    client's connection was cut)."""
    from urllib.parse import urlsplit

    sp = subprocess_server(shutdown_grace_s=30)
    c = sp.client()
    assert c.get("/ready").status_code == 200
    body = json.dumps(
        {"tenant_id": "acme", "prefix": "base", "prompt": "late body", "max_tokens": 3}
    ).encode()
    u = urlsplit(sp.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body[:10])
        # the server let it in and is reading its body (probes are not counted: it is the only one; a server that
        # counted it only once its body was read fails here)
        wait_until(
            lambda: metric_value(c.get("/metrics").text, "prefixserve:http_requests_in_flight") == 1.0,
            timeout=30,
            interval=0.02,
        )
        sp.terminate()
        wait_until(lambda: c.get("/ready").status_code == 503, timeout=30, interval=0.02)
        time.sleep(2.5)  # past the 2 s the drain used to wait for requests it counted
        sock.sendall(body[10:])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 20:
            got = sock.recv(65536)
            if not got:
                break
            answer += got
    status = answer.split(b"\r\n", 1)[0]
    assert b" 200 " in status, answer[:300]
    assert sp.wait(60) == 0
    c.close()
