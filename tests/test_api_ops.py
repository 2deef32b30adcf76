"""/health, /ready, /metrics, request logs, and serving through a prefix-store outage."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time

import pytest

from server.logging_utils import JSONFormatter
from tests.fixtures.server import FakeJobManager, assert_error, metric_value, put_random_prefix, slow_engine

KEY_A = "sk-acme-c0ffee-77"


def test_health_and_ready(server_factory):
    s = server_factory()
    c = s.client()
    assert c.get("/health").json() == {"status": "ok"}
    r = c.get("/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert r.json()["checks"] == {"model": "ok", "engine": "ok", "store": "ok", "lifecycle": "serving"}
    # HEAD, as load balancers probe: the status without a body
    for path in ("/health", "/ready"):
        h = c.head(path)
        assert h.status_code == 200 and h.content == b"", path
    # vLLM's (SageMaker's) /ping: /health, GET or POST, with no key where keys are configured too
    assert c.get("/ping").json() == c.post("/ping").json() == {"status": "ok"}
    keyed = server_factory(keys={"acme": "sk-acme-ping"}).client()
    assert keyed.post("/ping").status_code == keyed.get("/ping").status_code == 200


def test_metrics_ready_gauge_reads_the_store_at_scrape_time(server_factory, monkeypatch):
    """`prefixserve:ready` answers as /ready would at the scrape, without a /ready call in between (it kept the
    store's state of the last /ready or prefix lookup)."""
    from prefix_store.errors import StoreUnavailable

    s = server_factory()
    c = s.client()
    assert metric_value(c.get("/metrics").text, "prefixserve:ready") == 1.0

    def down() -> None:
        raise StoreUnavailable("the store is away")

    monkeypatch.setattr(s.svc.store, "ping", down)
    assert metric_value(c.get("/metrics").text, "prefixserve:ready") == 0.0
    monkeypatch.undo()
    assert metric_value(c.get("/metrics").text, "prefixserve:ready") == 1.0


def test_requests_refused_before_routing_are_counted_under_their_route(server_factory):
    """A body over max_body_bytes is refused (413) before the request reaches its route: its metrics and log line
    still name the route's template, not "unmatched" (which stays for paths no route serves)."""
    s = server_factory(max_body_bytes=4096)
    c = s.client()
    big = {"tenant_id": "acme", "prefix": "base", "prompt": "x" * 5000}
    assert_error(c.post("/generate", json=big), 413, "body_too_large")
    assert c.get("/no/such/route").status_code == 404
    m = c.get("/metrics").text
    series = {"route": "/generate", "method": "POST", "status": "413"}
    assert metric_value(m, "prefixserve:http_requests_total", series) == 1.0
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert metric_value(m, "prefixserve:http_requests_total", unmatched) == 1.0


def test_info_says_what_the_server_runs(server_factory, api_bundle):
    s = server_factory(
        keys={"acme": KEY_A},
        max_model_len=384,
        max_num_seqs=12,
        speculative_tokens=2,
        max_new_tokens=40,
        max_prompt_tokens=300,
    )
    assert_error(s.client().get("/info"), 401)  # like every API route when keys are set
    info = s.client(KEY_A).get("/info").json()
    assert info["model_fingerprint"] == api_bundle.fingerprint and info["model"] == api_bundle.name
    assert info["max_model_len"] == 384 and info["max_num_seqs"] == 12 and info["speculative_tokens"] == 2
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["cuda_graphs"] == "off"
    assert info["kernels"] == "torch" and info["async_decode"] is False
    assert info["model_path"] == "llama" and info["architecture"] == "LlamaForCausalLM"
    assert (
        info["num_layers"] == api_bundle.spec.num_layers and info["vocab_size"] == api_bundle.spec.vocab_size
    )
    kv = info["kv_cache"]
    assert kv["bytes"] == kv["blocks"] * s.svc.llm.pool.block_bytes and kv["bytes"] <= 16 * 2**20
    assert info["store"] == "disk" and info["training"] is True and info["training_workers"] == 1
    assert info["version"] == __import__("server").__version__ != "0+unknown"
    assert s.client().get("/version").json() == {"version": info["version"]}  # open, like /health
    import prefixserve_client as ps

    with ps.Client(s.url, api_key=KEY_A) as c:
        got = c.info()
        assert isinstance(got, ps.ServerInfo) and got.max_model_len == 384 and got.model_fingerprint
        assert got.kv_cache == kv
        assert {m.max_model_len for m in c.models().data} == {384}
        # the request limits: what a client needs to size max_tokens (the room /tokenize leaves was 384 less the
        # prompt, and max_tokens that large a 422)
        assert (got.max_new_tokens, got.max_prompt_tokens) == (40, 300)
        t = c.tokenize("acme", "hello there", prefix="base", prompt_format="raw")
        assert t.max_new_tokens == 40 and t.room == 40
        out = c.generate("acme", "hello there", prefix="base", prompt_format="raw", max_tokens=t.room)
        assert out.usage.completion_tokens <= 40


def test_metrics_present_and_updated(server_factory, api_bundle):
    jobs = FakeJobManager()
    s = server_factory(job_manager=jobs)
    put_random_prefix(s.store, api_bundle, "acme", prefix_length=10)
    c = s.client()
    before = c.get("/metrics").text
    assert (
        metric_value(before, "prefixserve:http_requests_in_flight") == 0
    )  # (a scrape is a probe: not counted)
    # the fixed label values exist from the start, at 0 (as vLLM's): rate() sees the first increment
    for reason in ("stop", "length", "abort", "error"):
        assert metric_value(before, "prefixserve:request_success_total", {"finished_reason": reason}) == 0
    for reason in ("too_long", "rate_limit", "tenant_limit", "queue_full"):
        assert metric_value(before, "prefixserve:requests_rejected_total", {"reason": reason}) == 0
    for name in (
        "prefixserve:time_to_first_token_seconds_count",
        "prefixserve:inter_token_latency_seconds_count",
        "prefixserve:e2e_request_latency_seconds_count",
        "prefixserve:request_queue_time_seconds_count",
        "prefixserve:num_requests_running",
        "prefixserve:num_requests_waiting",
        "prefixserve:prompt_tokens_total",
        "prefixserve:generation_tokens_total",
        "prefixserve:prefix_cache_hits_total",
        "prefixserve:prefix_cache_misses_total",
        "prefixserve:prefix_cache_fetches_total",
        "prefixserve:prefix_cache_evictions_total",
        "prefixserve:prefix_cache_resident_bytes",
        "prefixserve:distinct_prefixes_per_batch_count",
    ):
        assert metric_value(before, name) == 0.0, name
    assert metric_value(before, "prefixserve:training_jobs", {"status": "queued"}) == 0.0
    for _ in range(3):
        r = c.post(
            "/generate", json={"tenant_id": "acme", "prompt": "hello", "max_tokens": 5, "ignore_eos": True}
        )
        assert r.status_code == 200
    c.post(
        "/prefixes",
        json={"tenant_id": "acme", "name": "next", "examples": [{"prompt": "a", "completion": "b"}]},
    )
    c.post("/generate", json={"tenant_id": "acme", "prompt": ""})  # 422
    deadline = time.monotonic() + 5  # request counters are written right after the response is sent
    while True:
        m = c.get("/metrics").text
        done = metric_value(m, "prefixserve:http_requests_total", {"route": "/generate", "status": "422"})
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert metric_value(m, "prefixserve:generation_tokens_total") == 15
    assert metric_value(m, "prefixserve:prompt_tokens_total") == 3 * r.json()["usage"]["prompt_tokens"]
    assert metric_value(m, "prefixserve:time_to_first_token_seconds_count") == 3
    assert metric_value(m, "prefixserve:inter_token_latency_seconds_count") == 12
    assert metric_value(m, "prefixserve:e2e_request_latency_seconds_count") == 3
    assert metric_value(m, "prefixserve:request_queue_time_seconds_count") == 3
    # vLLM's per-request histograms: sizes, and the time split into prefill and decode
    prompt = r.json()["usage"]["prompt_tokens"]
    assert metric_value(m, "prefixserve:request_prompt_tokens_sum") == 3 * prompt
    assert metric_value(m, "prefixserve:request_generation_tokens_sum") == 15
    assert metric_value(m, "prefixserve:request_params_max_tokens_sum") == 15
    assert metric_value(m, "prefixserve:request_generation_tokens_bucket", {"le": "5.0"}) == 3
    assert metric_value(m, "prefixserve:request_generation_tokens_bucket", {"le": "2.0"}) == 0
    times = {
        k: metric_value(m, f"prefixserve:request_{k}_time_seconds_sum")
        for k in ("prefill", "decode", "inference")
    }
    assert all(metric_value(m, f"prefixserve:request_{k}_time_seconds_count") == 3 for k in times)
    assert times["inference"] >= times["decode"] > 0 and times["prefill"] > 0
    assert metric_value(m, "prefixserve:prefix_cache_misses_total") >= 1
    assert metric_value(m, "prefixserve:prefix_cache_fetches_total") >= 1
    assert metric_value(m, "prefixserve:prefix_cache_hits_total") >= 2
    assert metric_value(m, "prefixserve:prefix_cache_resident_bytes") > 0
    assert metric_value(m, "prefixserve:request_success_total", {"finished_reason": "length"}) == 3
    assert metric_value(m, "prefixserve:training_jobs", {"status": "queued"}) == 1
    assert metric_value(m, "prefixserve:http_requests_total", {"route": "/generate", "status": "200"}) == 3
    assert metric_value(m, "prefixserve:http_requests_total", {"route": "/generate", "status": "422"}) == 1
    # bounded labels: no tenant, prefix or raw path ever becomes a label
    c.get("/prefixes/acme/some-random-name-123")
    m = c.get("/metrics").text
    assert "acme" not in m and "some-random-name" not in m
    # echo with max_tokens 0 runs with 1 (its token not part of the answer): the client asked for 0
    body = {"model": "acme/base", "prompt": "hello", "max_tokens": 0, "echo": True}
    assert c.post("/v1/completions", json=body).status_code == 200
    m = c.get("/metrics").text
    assert metric_value(m, "prefixserve:request_params_max_tokens_count") == 4
    assert metric_value(m, "prefixserve:request_params_max_tokens_sum") == 15


def test_request_log_lines_have_fields_but_no_prompt_or_key(server_factory, api_bundle, caplog):
    caplog.set_level(logging.INFO, logger="prefixserve")
    s = server_factory(keys={"acme": KEY_A})
    put_random_prefix(s.store, api_bundle, "acme")
    secret_prompt = "TOP-SECRET-PROMPT-8d1f"
    c = s.client(KEY_A)
    r = c.post(
        "/generate",
        json={"prompt": secret_prompt, "max_tokens": 4, "ignore_eos": True},
        headers={"X-Request-ID": "trace-42"},
    )
    assert r.status_code == 200
    c.post("/generate", json={"prompt": secret_prompt, "stream": True, "max_tokens": 3})
    c.post(
        "/v1/chat/completions",
        json={"model": "acme", "messages": [{"role": "user", "content": secret_prompt}]},
    )
    s.client("sk-WRONG-key-31337").post("/generate", json={"prompt": secret_prompt})
    # an X-Request-ID that cannot be the id (a space) is replaced, and its line still names it
    odd = c.post("/generate", json={"prompt": "x", "max_tokens": 1}, headers={"X-Request-ID": "my trace 7"})
    deadline = time.monotonic() + 5  # the line is written right after the response is sent
    while (
        time.monotonic() < deadline
        and sum(getattr(r, "fields", {}).get("event") == "request" for r in caplog.records) < 5
    ):
        time.sleep(0.01)
    fmt = JSONFormatter()
    lines = [fmt.format(rec) for rec in caplog.records]
    blob = "\n".join(lines)
    assert secret_prompt not in blob
    assert KEY_A not in blob and "sk-WRONG-key-31337" not in blob
    access = [json.loads(x) for x in lines if '"event": "request"' in x]
    mine = next(a for a in access if a["request_id"] == "trace-42")
    # uvicorn's info lines (its logger is "uvicorn.error") do not read as errors
    up = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Application startup complete.", None, None
    )
    assert json.loads(fmt.format(up))["logger"] == "uvicorn"
    from server.logging_utils import TextFormatter

    assert " INFO uvicorn: Application startup complete." in TextFormatter().format(up)
    assert mine["status"] == 200 and mine["tenant"] == "acme" and mine["prefix"] == "default"
    assert mine["version"] == 1 and mine["prompt_tokens"] > 0 and mine["completion_tokens"] == 4
    assert mine["queue_s"] >= 0 and mine["latency_s"] > 0 and mine["finish_reason"] == "length"
    assert mine["principal"] == "tenant:acme"
    assert any(a["status"] == 401 for a in access), [(a["route"], a["status"]) for a in access]
    assert sum(1 for a in access if a["route"] == "/generate") == 4
    replaced = odd.headers["x-request-id"]
    assert (
        replaced != "my trace 7"
        and next(a for a in access if a["request_id"] == replaced)["given_request_id"] == "my trace 7"
    )
    assert "given_request_id" not in mine


def test_start_up_warns_when_every_stored_prefix_was_made_for_another_model(
    server_factory, api_bundle, caplog
):
    """A store whose prefixes were all made for another base-model fingerprint (what a transformers upgrade that
    moves it looks like: every request refused) gets one start-up warning naming the old fingerprint and the
    command that adopts them; a store with one prefix for this model (or an older version for it) gets none."""
    caplog.set_level(logging.WARNING, logger="prefixserve")
    old = "ab" * 32
    foreign = {("acme", "a"): {"fingerprint": old}, ("acme", "b"): {"fingerprint": old}}

    def hints(wait_s: float = 5.0) -> list[str]:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            found = [r.getMessage() for r in caplog.records if "prefixes adopt" in r.getMessage()]
            if found:
                return found
            time.sleep(0.02)
        return []

    server_factory(prefixes=foreign)
    (msg,) = hints()
    assert "2 were made for fingerprint abababababab" in msg and "--from-fingerprint abababababab" in msg
    caplog.clear()
    s = server_factory(prefixes={**foreign, ("acme", "c"): {}})
    assert s.client().get("/health").status_code == 200
    s2 = server_factory(prefixes={("acme", "a"): {}})
    put_random_prefix(s2.store, api_bundle, "acme", "a", fingerprint=old)  # its latest: the other model's
    s3 = server_factory(store=s2.store)
    assert s3.client().get("/health").status_code == 200
    assert hints(wait_s=1.0) == []  # (the check takes milliseconds here)


def test_log_prompts_opt_in(server_factory, api_bundle, caplog):
    caplog.set_level(logging.INFO, logger="prefixserve")
    s = server_factory(log_prompts=True)
    put_random_prefix(s.store, api_bundle, "acme")
    s.client().post("/generate", json={"tenant_id": "acme", "prompt": "visible-prompt-1", "max_tokens": 2})

    def logged() -> bool:
        return any(getattr(r, "fields", {}).get("prompt") == "visible-prompt-1" for r in caplog.records)

    deadline = time.monotonic() + 5  # the line is written right after the response is sent
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logged()


@pytest.mark.redis
def test_store_outage_cached_served_uncached_503_then_recovers(
    server_factory, api_bundle, redis_server_factory
):
    """Redis (own server, appendonly) SIGKILLed and restarted under concurrent load: the cached tenant is served
    throughout, an uncached one gets 503 + Retry-After, /ready says not ready; afterwards everything recovers
    without restarting the server and no prefix or job is lost."""
    from concurrent.futures import ThreadPoolExecutor

    from prefix_store import open_store

    redis_srv = redis_server_factory
    store = open_store(redis_srv.url, socket_timeout=1, socket_connect_timeout=0.5)
    put_random_prefix(store, api_bundle, "acme", seed=1)
    put_random_prefix(store, api_bundle, "globex", seed=2)
    s = server_factory(store=store, prefix_meta_ttl_s=0, training_workers=0)  # revalidate on every request
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "cached", "max_tokens": 6, "ignore_eos": True}
    want = c.post("/generate", json=body).json()["text"]
    job = c.post("/prefixes", json={"tenant_id": "acme", "name": "queued", "method": "prompt_tuning",
                                    "prefix_length": 2, "examples": [{"prompt": "a", "completion": "b"}]})  # fmt: skip
    assert job.status_code == 202, job.text
    stop = threading.Event()

    def load(tenant: str) -> list[tuple[int, str, str | None]]:
        out = []
        with s.client() as lc:
            while not stop.is_set():
                r = lc.post("/generate", json={**body, "tenant_id": tenant})
                text = r.json().get("text") if r.status_code == 200 else r.json()["error"]["code"]
                out.append((r.status_code, text, r.headers.get("retry-after")))
        return out

    pool = ThreadPoolExecutor(4)
    cached = [pool.submit(load, "acme") for _ in range(3)]
    time.sleep(0.3)
    redis_srv.kill()
    try:
        r = c.get("/ready")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["checks"]["store"].startswith("unavailable")
        assert r.json()["error"]["code"] == "not_ready"
        r = c.post("/generate", json={"tenant_id": "globex", "prompt": "x"})
        assert_error(r, 503, "store_unavailable")
        assert int(r.headers["retry-after"]) >= 1
        assert_error(c.get("/prefixes"), 503, "store_unavailable")
        time.sleep(1.0)  # the load keeps going through the outage
    finally:
        redis_srv.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and c.get("/ready").status_code != 200:
        time.sleep(0.1)
    assert c.get("/ready").status_code == 200
    while time.monotonic() < deadline:
        r = c.post("/generate", json={"tenant_id": "globex", "prompt": "x", "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200
    stop.set()
    results = [x for f in cached for x in f.result(timeout=60)]
    pool.shutdown()
    assert len(results) >= 6
    assert all(code == 200 and text == want for code, text, _ in results), {x[:2] for x in results}
    # nothing lost: both prefixes and the queued job are still there (appendonly Redis)
    assert {m.tenant_id for m in store.list("acme") + store.list("globex")} == {"acme", "globex"}
    j = c.get(f"/prefixes/jobs/{job.json()['job_id']}")
    assert j.status_code == 200 and j.json()["status"] == "queued"
    store.close()


def test_a_hung_store_costs_cached_prefixes_nothing(server_factory, api_bundle, tmp_path, monkeypatch):
    """The store hangs (each lookup answers only after its timeout): requests for a cached prefix whose metadata
    is due for a refresh are served at once from the cache, one lookup refreshing it in the background (they each
    waited out the timeout); an uncached name gets 503 after one timeout, and the next at once, not another wait."""
    from prefix_store import errors, open_store

    store = open_store(f"file://{tmp_path / 's'}")
    put_random_prefix(store, api_bundle, "acme", seed=1)
    put_random_prefix(store, api_bundle, "globex", seed=2)
    s = server_factory(store=store, prefix_meta_ttl_s=0)  # every request finds its metadata due for a refresh
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "x y z", "max_tokens": 4}
    want = c.post("/generate", json=body).json()["text"]
    lookups = []
    real_get_meta = store.get_meta

    def hung(*a, **k):
        lookups.append(a)
        time.sleep(1.5)
        raise errors.StoreUnavailable("timed out (as a hung Redis does)")

    monkeypatch.setattr(store, "get_meta", hung)
    for _ in range(4):
        t0 = time.monotonic()
        r = c.post("/generate", json=body)
        assert r.status_code == 200 and r.json()["text"] == want
        assert time.monotonic() - t0 < 1.0, "a cached prefix waited for the hung store"
    t0 = time.monotonic()
    assert_error(c.post("/generate", json={**body, "tenant_id": "globex"}), 503, "store_unavailable")
    t1 = time.monotonic()
    assert_error(c.post("/generate", json={**body, "tenant_id": "globex"}), 503, "store_unavailable")
    assert t1 - t0 >= 1.4 and time.monotonic() - t1 < 0.5
    assert len(lookups) <= 3  # one refresh at a time for acme, one lookup for globex
    monkeypatch.setattr(store, "get_meta", real_get_meta)
    time.sleep(1.1)  # past the fail-fast window: the store is asked again
    assert c.post("/generate", json={**body, "tenant_id": "globex"}).status_code == 200
    store.close()


def test_store_calls_stalled_in_numbers_do_not_hold_up_the_other_requests(
    server_factory, api_bundle, tmp_path
):
    """Store calls held by a stalled store (each for its socket timeout) ran on the default thread pool, which
    renders every response: six listings on a 2-core machine filled it, and a request for a cached prefix took
    seconds. They have threads of their own: with more calls stalled than any default pool has threads, a cached
    prefix is served at once, and the stalled calls end once the store answers."""
    import threading

    from prefix_store import open_store

    store = open_store(f"file://{tmp_path / 's'}")
    put_random_prefix(store, api_bundle, "acme", seed=1)
    s = server_factory(store=store)
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "x y z", "max_tokens": 4}
    want = c.post("/generate", json=body).json()["text"]  # (its metadata cached now)
    stall = threading.Event()
    real_list_page = store.list_page

    def stalled(*a, **k):
        stall.wait(30)
        return real_list_page(*a, **k)

    store.list_page = stalled  # type: ignore[method-assign]
    listings: list[int] = []
    threads = [
        threading.Thread(target=lambda: listings.append(s.client().get("/prefixes").status_code))
        for _ in range(40)  # (more than the 32 threads a default pool has at most)
    ]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)  # (every listing sent and stalled)
        t0 = time.monotonic()
        r = c.post("/generate", json=body)
        assert r.status_code == 200 and r.json()["text"] == want
        assert time.monotonic() - t0 < 2.0, "a cached prefix waited behind stalled store calls"
        assert not listings
    finally:
        stall.set()
        for t in threads:
            t.join(30)
    assert listings == [200] * 40
    store.close()


def test_a_refresh_that_finds_the_prefix_unservable_stops_serving_it(
    server_factory, api_bundle, tmp_path, monkeypatch
):
    """A cached prefix whose refresh finds it replaced by one for another base model (its change event missed):
    served as cached while the refresh runs, then the 422 the store's record calls for, not the old entry for
    good."""
    import dataclasses

    from prefix_store import open_store

    store = open_store(f"file://{tmp_path / 's'}")
    put_random_prefix(store, api_bundle, "acme", seed=1)
    s = server_factory(store=store, prefix_meta_ttl_s=0)
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "x y z", "max_tokens": 2}
    assert c.post("/generate", json=body).status_code == 200
    real = store.get_meta
    monkeypatch.setattr(
        store,
        "get_meta",
        lambda *a, **k: dataclasses.replace(real(*a, **k), base_model_fingerprint="other-model"),
    )
    deadline = time.monotonic() + 10
    r = c.post("/generate", json=body)
    while r.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
        r = c.post("/generate", json=body)
    assert_error(r, 422, "prefix_incompatible")
    store.close()


@pytest.mark.redis
def test_a_replica_drops_its_cached_prefixes_when_its_change_subscription_comes_back(
    server_factory, api_bundle, redis_server_factory
):
    """Redis emptied (restarted without persistence, say) and version 1 of a name written again, with other
    tensors, while a replica's change subscription was down (the message never reached it): the replica, which
    had that version cached, served the old tensors for good. Once its subscription is back it drops its caches
    and serves what the store now holds."""
    import redis

    from prefix_store import open_store

    srv = redis_server_factory
    writer = open_store(srv.url)
    put_random_prefix(writer, api_bundle, "acme", seed=1)
    s = server_factory(store_url=srv.url, training_workers=0)
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "x y z", "max_tokens": 8, "ignore_eos": True}
    old = c.post("/generate", json=body).json()["text"]
    raw = redis.Redis(port=srv.port)
    raw.flushall()
    writer._channel = "nobody-listens"  # its change message is lost
    assert put_random_prefix(writer, api_bundle, "acme", seed=2, prefix_length=13).version == 1
    fresh = server_factory(store_url=srv.url, training_workers=0).client()
    new = fresh.post("/generate", json=body).json()["text"]
    assert new != old
    assert c.post("/generate", json=body).json()["text"] == old  # nothing told the replica
    assert raw.client_kill_filter(_type="pubsub") >= 1  # its subscription drops; redis-py subscribes again
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and c.post("/generate", json=body).json()["text"] != new:
        time.sleep(0.1)
    r = c.post("/generate", json=body)
    assert r.json()["text"] == new and r.json()["prefix_version"] == 1
    raw.close()
    writer.close()


def test_store_change_events_invalidate_caches(server_factory, api_bundle):
    s = server_factory()  # default metadata TTL: only change events can make it see a new version
    put_random_prefix(s.store, api_bundle, "acme", seed=1)
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "v", "max_tokens": 8, "ignore_eos": True}
    v1 = c.post("/generate", json=body).json()
    assert v1["prefix_version"] == 1
    put_random_prefix(s.store, api_bundle, "acme", seed=99)
    v2 = c.post("/generate", json=body).json()
    assert v2["prefix_version"] == 2 and v2["text"] != v1["text"]
    assert c.delete("/prefixes/acme/default").status_code == 200
    assert_error(c.post("/generate", json=body), 404, "prefix_not_found")


def test_preemptions_are_counted_on_metrics(server_factory):
    """vLLM's num_preemptions_total: requests put back in the queue for KV room were invisible from outside."""
    s = server_factory(kv_cache_mb=1, max_model_len=1024)
    c = s.client()
    assert metric_value(c.get("/metrics").text, "prefixserve:num_preemptions_total") == 0.0
    body = {"tenant_id": "acme", "prefix": "base", "prompt": "x" * 200, "max_tokens": 300, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda _: s.client().post("/generate", json=body).status_code, range(8)))
    assert codes == [200] * 8
    preempted = s.svc.llm.scheduler.num_preemptions
    assert preempted > 0  # the pool holds fewer than 8 of these at once
    assert metric_value(c.get("/metrics").text, "prefixserve:num_preemptions_total") == preempted
    # all one tenant: none of these made room for a starved tenant
    assert metric_value(c.get("/metrics").text, "prefixserve:num_fair_preemptions_total") == 0.0
    s.svc.llm.scheduler.num_fair_preemptions = 3  # the scheduler's counter is what is exported
    assert metric_value(c.get("/metrics").text, "prefixserve:num_fair_preemptions_total") == 3.0


def test_a_lookup_joining_a_read_begun_before_a_new_version_does_not_cache_the_old_one(
    server_factory, api_bundle
):
    """Single flight: a request that joins a store read begun before a new version was stored shares that read's
    (old) answer, but must not cache it as the latest with its own newer generation: the next request serves the
    new version (it served the old one until the metadata TTL ran out)."""
    s = server_factory(prefixes={("acme", "p"): {"seed": 1}}, prefix_meta_ttl_s=60)
    real, get_meta = s.store.get_meta, s.svc._get_meta
    read, joined = threading.Event(), threading.Event()
    lookups = []

    def slow(*a, **kw):
        meta = real(*a, **kw)
        read.set()  # A's read is made (version 1)...
        joined.wait(30)  # ... and answers late: once B's lookup joined it, after the new version landed
        return meta

    async def lookup_seen(*a):
        lookups.append(a)
        if len(lookups) == 2:
            # B's: it joins A's read before this thread lets that read end (no await until then)
            joined.set()
        return await get_meta(*a)

    body = {"tenant_id": "acme", "prefix": "p", "prompt": "x", "max_tokens": 1}
    s.store.get_meta, s.svc._get_meta = slow, lookup_seen
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            a = ex.submit(lambda: s.client().post("/generate", json=body).json())
            assert read.wait(30)
            put_random_prefix(s.store, api_bundle, "acme", "p", seed=2)
            s.svc.meta_cache.invalidate(("acme", "p"))  # (what the store's change event does)
            b = ex.submit(lambda: s.client().post("/generate", json=body).json())
            # (B shares A's answer: the old version)
            assert a.result()["prefix_version"] == b.result()["prefix_version"] == 1
    finally:
        s.store.get_meta, s.svc._get_meta = real, get_meta
    assert len(lookups) == 2 and joined.is_set()
    assert s.client().post("/generate", json=body).json()["prefix_version"] == 2


def _access_lines(caplog: pytest.LogCaptureFixture, n: int) -> list[logging.LogRecord]:
    """The access-log records captured so far, once at least `n` are there (each is written as its response ends)."""
    deadline = time.monotonic() + 5
    while True:
        got = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "request"]
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def test_refusals_name_their_error_code_on_the_access_line(server_factory, api_bundle, caplog):
    """Every refusal's access line carries the code its client got (a 404 from a route, a 422 from validation, a
    401 from the key check, a 503 answered before routing), so an operator can match one to the other; a 5xx is a
    warning, a 4xx is not."""
    caplog.set_level(logging.INFO, logger="prefixserve")
    s = server_factory(keys={"acme": KEY_A}, prefixes={("acme", "default"): {}})
    c = s.client(KEY_A)
    sent = {
        "r-404": lambda h: c.post("/v1/completions", json={"model": "acme/nope", "prompt": "x"}, headers=h),
        "r-422": lambda h: c.post("/generate", json={"prompt": "x", "max_tokens": -1}, headers=h),
        "r-401": lambda h: s.client("sk-WRONG-key-31337").post("/generate", json={"prompt": "x"}, headers=h),
    }
    got = {rid: send({"X-Request-ID": rid}).json()["error"]["code"] for rid, send in sent.items()}
    s.app.state.ps.draining = True  # answered by the middleware, before any route
    try:
        got["r-503"] = c.post("/generate", json={"prompt": "x"}, headers={"X-Request-ID": "r-503"}).json()[
            "error"
        ]["code"]
    finally:
        s.app.state.ps.draining = False
    assert got == {"r-404": "model_not_found", "r-422": "invalid_value", "r-401": "invalid_api_key",
                   "r-503": "shutting_down"}  # fmt: skip
    lines = {r.fields["request_id"]: r for r in _access_lines(caplog, 4) if r.fields["request_id"] in got}
    assert {rid: r.fields.get("error_code") for rid, r in lines.items()} == got
    assert {rid: r.levelno for rid, r in lines.items()} == {
        "r-404": logging.INFO, "r-422": logging.INFO, "r-401": logging.INFO, "r-503": logging.WARNING
    }  # fmt: skip


@pytest.mark.redis
def test_store_refusal_is_a_logged_500_and_a_corrupt_record_a_logged_422(
    server_factory, api_bundle, redis_store_url, caplog
):
    """A Redis error reply (here WRONGTYPE: a key overwritten by something else) is the deployment's fault: a 500
    `store_error` whose message names no host or key, and an ERROR line with the cause under the request's id. A
    record that does not parse is that prefix's: 422 `prefix_corrupt`, and a WARNING naming it."""
    import redis

    from prefix_store import open_store

    store = open_store(redis_store_url)
    try:
        put_random_prefix(store, api_bundle, "acme", "wrongtype")
        put_random_prefix(store, api_bundle, "acme", "garbled")
        raw = redis.Redis.from_url(redis_store_url.split("?")[0])
        meta = store._meta_key("acme", "wrongtype", 1)  # type: ignore[attr-defined]
        raw.delete(meta)
        raw.hset(meta, "x", "1")
        raw.set(store._meta_key("acme", "garbled", 1), b"{not json")  # type: ignore[attr-defined]
        caplog.set_level(logging.INFO, logger="prefixserve")
        c = server_factory(store=store, training_workers=0).client()
        r = c.post("/generate", json={"tenant_id": "acme", "prefix": "wrongtype", "prompt": "x"},
                   headers={"X-Request-ID": "wt-1"})  # fmt: skip
        assert_error(r, 500, "store_error")
        assert "wt-1" in r.json()["error"]["message"]
        assert "WRONGTYPE" not in r.text and "redis" not in r.text.lower() and "127.0.0.1" not in r.text
        r = c.post("/generate", json={"tenant_id": "acme", "prefix": "garbled", "prompt": "x"},
                   headers={"X-Request-ID": "gb-1"})  # fmt: skip
        assert_error(r, 422, "prefix_corrupt")
        _access_lines(caplog, 2)
        said = [(rec.levelno, rec.getMessage()) for rec in caplog.records if rec.name == "prefixserve.api"]
        assert any(lv == logging.ERROR and "wt-1" in m and "WRONGTYPE" in m for lv, m in said), said
        assert any(lv == logging.WARNING and "gb-1" in m and "acme/garbled" in m for lv, m in said), said
    finally:
        store.close()


@pytest.mark.redis
def test_a_redis_acl_without_read_permission_is_a_store_error(
    server_factory, api_bundle, redis_server_factory
):
    """A Redis user whose ACL refuses the reads (NOPERM: a deployment's mistake) gets the same logged 500
    `store_error`, not a 422 calling every uncached prefix corrupt."""
    import redis

    from prefix_store import open_store

    srv = redis_server_factory
    admin = open_store(srv.url)
    put_random_prefix(admin, api_bundle, "acme", "p")
    admin.close()
    redis.Redis(port=srv.port).execute_command("ACL", "SETUSER", "limited", "on", ">pw-limited", "~*", "&*",
                                               "+@all", "-get", "-mget")  # fmt: skip
    store = open_store(srv.url.replace("redis://", "redis://limited:pw-limited@"))
    try:
        c = server_factory(store=store, training_workers=0).client()
        r = c.post("/generate", json={"tenant_id": "acme", "prefix": "p", "prompt": "x"})
        assert_error(r, 500, "store_error")
        assert "pw-limited" not in r.text and "NOPERM" not in r.text
    finally:
        store.close()


def test_engine_stats_lines_while_requests_run_and_none_when_idle(server_factory, caplog):
    """vLLM's periodic line: while requests run, throughput (of the interval's engine steps), running/waiting and
    cache use each interval; one more when the work ends (its last tokens); then nothing while the server is idle."""
    caplog.set_level(logging.INFO, logger="prefixserve.stats")
    s = server_factory(prefixes={("acme", "default"): {}}, log_stats_interval_s=0.1)
    slow_engine(s.svc, 0.02)
    r = s.client().post(
        "/generate", json={"tenant_id": "acme", "prompt": "go", "max_tokens": 40, "ignore_eos": True}
    )
    assert r.status_code == 200

    def stats_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "engine_stats"]

    def ended(x: logging.LogRecord) -> bool:
        return x.fields["running"] == x.fields["waiting"] == 0

    deadline = time.monotonic() + 10  # the line after the work (none else says running 0 and waiting 0)
    while not any(ended(x) for x in stats_lines()) and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = stats_lines()
    assert lines, "no engine stats line while a request ran"
    assert ended(lines[-1]) and not any(ended(x) for x in lines[:-1]), [x.fields for x in lines]
    busy = [x for x in lines if x.fields["running"] == 1]

    def tokens_of(xs: list[logging.LogRecord]) -> float:
        return sum(x.fields["generation_tokens_per_s"] * x.fields["interval_s"] for x in xs)

    # the tokens show up as the steps make them, not when the request ends (the first line may precede them):
    # most of them in the lines while it ran, and most of those lines show some (an interval in which a loaded
    # machine ran no step shows none)
    assert len(busy) >= 3 and tokens_of(busy) >= 20, [x.fields for x in lines]
    moving = [x for x in busy[1:] if x.fields["generation_tokens_per_s"] > 0]
    assert len(moving) >= len(busy[1:]) / 2, [x.fields for x in lines]
    tokens = tokens_of(lines)
    assert tokens == pytest.approx(40, abs=1.5)  # every generated token shows up in some line, once
    prompt = sum(x.fields["prompt_tokens_per_s"] * x.fields["interval_s"] for x in lines)
    assert prompt == pytest.approx(r.json()["usage"]["prompt_tokens"], abs=1.5)
    assert "Avg generation throughput: " in lines[0].getMessage() and "Running: " in lines[0].getMessage()
    n = len(lines)
    time.sleep(0.4)  # idle: no more lines
    assert len(stats_lines()) == n


def test_engine_stats_line_figures():
    from server.api.stats_log import Sample, stats_line
    from server.logging_utils import TextFormatter

    idle = Sample(0.0, 100, 50, 0, 0, 0.0, 3, 1, 0, 64, 32, 2)
    assert stats_line(idle, idle) is None  # nothing ran, nothing runs: no line
    busy = Sample(10.0, 1100, 550, 2, 1, 0.25, 7, 1, 1, 128, 80, 2)
    msg, fields = stats_line(idle, busy)
    assert fields["prompt_tokens_per_s"] == 100.0 and fields["generation_tokens_per_s"] == 50.0
    assert fields["prefix_cache_hit_rate_perc"] == 100.0 and fields["prompt_cache_hit_rate_perc"] == 75.0
    assert (fields["running"], fields["waiting"], fields["kv_cache_usage_perc"]) == (2, 1, 25.0)
    assert "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 25.0%" in msg and "(1 evicted)" in msg
    # the interval after the work ended still gets its line (its last tokens), the next idle one none
    assert stats_line(busy, Sample(20.0, 1100, 560, 0, 0, 0.0, 7, 1, 1, 128, 80, 2)) is not None
    rec = logging.LogRecord("prefixserve.stats", logging.INFO, __file__, 1, "%s", (msg,), None)
    rec.fields, rec.message_says_fields = fields, True
    assert (
        "running=" not in TextFormatter().format(rec)
        and json.loads(JSONFormatter().format(rec))["running"] == 2
    )


def test_a_json_log_lines_two_timestamps_are_the_same_millisecond():
    """`ts` (epoch seconds) and `time` (ISO) name one instant: `ts` was rounded, `time` truncated, 1 ms apart at
    times."""
    fmt = JSONFormatter()
    for i in range(3000):
        rec = logging.LogRecord("prefixserve", logging.INFO, __file__, 1, "m", None, None)
        rec.created = 1_765_000_000 + i * 0.000731 + 0.0006
        rec.msecs = int((rec.created - int(rec.created)) * 1000)
        line = json.loads(fmt.format(rec))
        assert line["time"][-4:-1] == f"{line['ts']:.3f}"[-3:], line


def test_stream_interval_groups_a_streams_tokens(server_factory):
    """--stream-interval 4 (vLLM's): a stream's first token comes alone, then at least 4 per frame; the text is the
    same as unstreamed."""
    s = server_factory(prefixes={("acme", "default"): {}}, stream_interval=4)
    c = s.client()
    body = {"model": "acme/default", "prompt": "go", "max_tokens": 14, "ignore_eos": True, "temperature": 0}
    whole = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    frames = [json.loads(x[6:]) for x in c.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
              if x.startswith("data: {")]  # fmt: skip
    texts = [f["choices"][0]["text"] for f in frames if f["choices"] and f["choices"][0]["text"]]
    assert "".join(texts) == whole
    assert 2 <= len(texts) <= 5, (
        texts
    )  # 14 tokens: 1, then groups of 4 (the end with what is left): 1+4+4+4+1


def test_inter_token_latency_is_per_step_whatever_the_stream_interval(server_factory):
    """--stream-interval 8 joins 8 steps' tokens in one event: the ITL histogram still gets one gap per step (it got
    one 8-step gap per event: 4 samples of 8x the latency instead of 32)."""
    s = server_factory(prefixes={("acme", "default"): {}}, stream_interval=8)
    slow_engine(s.svc, 0.01)
    c = s.client()
    seen, before = {}, (0.0, 0.0)
    for interval in (8, 1):
        s.svc.engine.stream_interval = interval
        body = {"tenant_id": "acme", "prompt": "go", "max_tokens": 33, "ignore_eos": True}
        assert c.post("/generate", json=body).status_code == 200
        m = c.get("/metrics").text
        now = (
            metric_value(m, "prefixserve:inter_token_latency_seconds_count"),
            metric_value(m, "prefixserve:inter_token_latency_seconds_sum"),
        )
        n = now[0] - before[0]
        seen[interval], before = (n, (now[1] - before[1]) / n), now
    assert metric_value(m, "prefixserve:time_to_first_token_seconds_count") == 2
    assert seen[1][0] == seen[8][0] == 32
    assert 0.01 <= seen[8][1] < 3 * seen[1][1], seen


def test_the_drain_line_counts_training_jobs_running_here(server_factory, caplog):
    """The drain's line says which training jobs this server's own workers are running (they go back to the queue
    at shutdown): it said "0 in flight" while one trained."""
    caplog.set_level(logging.INFO, logger="prefixserve.api")
    s = server_factory()
    ps = s.app.state.ps
    saved = ps.job_manager, ps.owns_jobs
    ps.job_manager, ps.owns_jobs = type("Jobs", (), {"num_running": 2})(), True
    try:
        ps.begin_drain()
    finally:
        ps.job_manager, ps.owns_jobs = saved
        ps.draining = s.svc.draining = False
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("draining")]
    assert said == [
        "draining: refusing new requests, 0 in flight; 2 training job(s) running here go back to the queue"
    ]


@pytest.fixture
def read_only_mount(tmp_path):
    """A folder and a read-only bind mount of it (mount(8): needs root, else the test is skipped, saying so)."""
    import shutil
    import subprocess

    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) here to make a read-only filesystem")
    first = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True, text=True)
    if first.returncode != 0:
        pytest.skip(f"cannot bind-mount here (not root?): {first.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=True, capture_output=True)
        yield src, mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(params=["mounted", "patched"])
def read_only_store(request, tmp_path, monkeypatch, api_bundle):
    """The URL of a file store holding acme/default, read-only: on a real read-only bind mount, or told so by
    patching (it runs where mount(8) is not allowed: the filesystem's flag, and EROFS for every change)."""
    from prefix_store import open_store

    src, url = tmp_path, f"file://{tmp_path}/store"
    if request.param == "mounted":
        src, mnt = request.getfixturevalue("read_only_mount")
        url = f"file://{mnt}/store"
    writer = open_store(f"file://{src}/store")
    put_random_prefix(writer, api_bundle, "acme", "default", prefix_length=4, seed=1)
    writer.close()
    if request.param == "mounted":
        return url
    import errno

    from prefix_store.disk import DiskStore

    monkeypatch.setattr(DiskStore, "read_only", property(lambda self: True))

    def refuse(self, *a, **kw):
        raise self._unavailable("change it", OSError(errno.EROFS, "Read-only file system"))

    for primitive in ("_put", "_delete", "_delete_version"):
        monkeypatch.setattr(DiskStore, primitive, refuse)
    return url


def test_a_store_on_a_read_only_filesystem_is_served_and_refuses_writes(
    server_factory, read_only_store, caplog
):
    """Prefixes on a read-only volume (baked into an image, a ReadOnlyMany claim): the store's ping asked for a
    writable folder, so /ready stayed 503 for good and no traffic came, though every read worked. A store whose
    filesystem is mounted read-only is ready (`store: ok (read-only)`), says so once at start-up, serves its
    prefixes, and refuses changes with a 503 that says why."""
    caplog.set_level(logging.WARNING, logger="prefixserve")
    s = server_factory(store_url=read_only_store)
    c = s.client()
    r = c.get("/ready")
    assert r.status_code == 200 and r.json()["checks"]["store"] == "ok (read-only)", r.text
    assert any("read-only" in m for m in caplog.messages), caplog.messages
    body = {"tenant_id": "acme", "prefix": "default", "prompt": "hi", "max_tokens": 2}
    assert c.post("/generate", json=body).status_code == 200
    err = assert_error(c.delete("/prefixes/acme/default"), 503, "store_read_only")
    assert "read-only" in err["message"]
    assert c.get("/prefixes/acme/default").status_code == 200
    # a training job's prefix could never be stored: refused, not trained and then failed
    train = {"tenant_id": "acme", "name": "new", "examples": [{"prompt": "a", "completion": "b"}]}
    assert_error(c.post("/prefixes", json=train), 503, "store_read_only")
