"""POST /generate against a real uvicorn server on a loopback port (tiny random Llama, disk store)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import httpx
import pytest

from tests.fixtures.server import (
    assert_error,
    metric_value,
    parse_sse,
    put_random_prefix,
    slow_engine,
    template_calls,
)

TENANTS = ("acme", "globex", "initech")


@pytest.fixture
def srv(server_factory):
    prefixes = {(t, "default"): {"prefix_length": 8 + 4 * i, "seed": i} for i, t in enumerate(TENANTS)}
    prefixes["acme", "chatty"] = {"prefix_length": 6, "seed": 42, "prompt_format": "chat"}
    return server_factory(prefixes=prefixes)


def gen(client: httpx.Client, **body) -> httpx.Response:
    body.setdefault("max_tokens", 12)
    return client.post("/generate", json=body)


def test_generate_returns_text_usage_and_version(srv):
    c = srv.client()
    r = gen(c, tenant_id="acme", prompt="Hello there", max_tokens=10, ignore_eos=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant_id"] == "acme" and body["prefix"] == "default" and body["prefix_version"] == 1
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 10
    n_prompt = len(srv.svc.bundle.tokenizer("Hello there", add_special_tokens=False)["input_ids"])
    assert body["usage"]["prompt_tokens"] >= n_prompt
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 10
    assert body["id"] == "gen-" + r.headers["x-request-id"]  # (the request's id: logs and answers correlate)
    r = c.post("/generate", json={"tenant_id": "acme", "prompt": "Hi", "max_tokens": 2, "stream": True},
               headers={"X-Request-ID": "order-42"})  # fmt: skip
    assert {e["id"] for e in parse_sse(r.text) if isinstance(e, dict)} == {"gen-order-42"}
    # greedy generation is deterministic
    assert (
        gen(c, tenant_id="acme", prompt="Hello there", max_tokens=10, ignore_eos=True).json()["text"]
        == body["text"]
    )


def test_prefix_changes_output_and_base_means_no_prefix(srv):
    c = srv.client()
    prompt = "The quick brown fox"
    outs = {t: gen(c, tenant_id=t, prompt=prompt, ignore_eos=True).json()["text"] for t in TENANTS}
    base = gen(c, tenant_id="acme", prefix="base", prompt=prompt, ignore_eos=True).json()
    assert base["prefix"] == "base" and base["prefix_version"] is None
    assert len(set(outs.values()) | {base["text"]}) == 4, "each prefix (and none) should steer differently"
    # prefix null means "default"
    assert (
        gen(c, tenant_id="acme", prefix=None, prompt=prompt, ignore_eos=True).json()["text"] == outs["acme"]
    )


def test_chat_prompt_format_is_applied(srv):
    c = srv.client()
    r = gen(c, tenant_id="acme", prefix="chatty", prompt="hi", max_tokens=1)
    raw = len(srv.svc.bundle.tokenizer("hi", add_special_tokens=False)["input_ids"])
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] > raw  # rendered with the chat template


def test_a_request_may_choose_its_prompt_format(srv):
    """`prompt_format` overrides the prefix's (the base model's default) for one request, on /generate, /tokenize
    and /v1/completions alike: 'raw' sends the text as it is, 'chat' as one user message through the template."""
    c = srv.client()
    tok = srv.svc.bundle.tokenizer
    prompt = "Count: 1, 2, 3,"
    raw_ids = list(tok(prompt)["input_ids"])
    for prefix in ("chatty", "base", "default"):
        seen = {}
        for fmt in ("raw", "chat"):
            body = {"tenant_id": "acme", "prefix": prefix, "prompt": prompt, "prompt_format": fmt}
            t = c.post("/tokenize", json=body).json()
            assert t["prompt_format"] == fmt
            g = gen(c, **body, max_tokens=1)
            assert g.status_code == 200, g.text
            assert g.json()["usage"]["prompt_tokens"] == t["count"]
            e = c.post("/v1/completions", json={"model": f"acme/{prefix}", "prompt": prompt, "max_tokens": 0,
                                                "echo": True, "prompt_format": fmt})  # fmt: skip
            assert e.status_code == 200, e.text
            assert e.json()["usage"]["prompt_tokens"] == t["count"]
            seen[fmt] = (t["tokens"], e.json()["choices"][0]["text"])
        assert seen["raw"] == (raw_ids, prompt)  # as given, echoed as given
        chat_ids, chat_echo = seen["chat"]
        assert len(chat_ids) > len(raw_ids) and prompt in chat_echo and chat_echo != prompt
    # without it: the prefix's own format (chatty: chat) as before
    own = c.post("/tokenize", json={"tenant_id": "acme", "prefix": "chatty", "prompt": prompt}).json()
    assert own["prompt_format"] == "chat" and own["tokens"] == seen["chat"][0]
    r = gen(c, tenant_id="acme", prompt=prompt, prompt_format="markdown")
    assert assert_error(r, 422)["param"] == "prompt_format"


def test_prompt_format_chat_needs_a_chat_template():
    from types import SimpleNamespace

    from server.api.errors import APIError
    from server.api.service import prompt_format

    prefix = SimpleNamespace(prompt_format="raw")
    templated, plain = SimpleNamespace(chat_template="{{ x }}"), SimpleNamespace(chat_template=None)
    assert prompt_format(None, prefix, plain) == "raw" and prompt_format("chat", prefix, templated) == "chat"
    assert prompt_format("raw", SimpleNamespace(prompt_format="chat"), plain) == "raw"
    with pytest.raises(APIError) as ei:
        prompt_format("chat", prefix, plain)
    assert (ei.value.status, ei.value.param) == (422, "prompt_format")


def test_streaming_sse_matches_non_streaming(srv):
    c = srv.client()
    req = {"tenant_id": "globex", "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": True}
    full = gen(c, **req).json()
    r = c.post("/generate", json={**req, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2, "tokens should arrive as several events"
    assert all(ch["id"] == chunks[0]["id"] and ch["prefix_version"] == 1 for ch in chunks)
    assert all(ch["finish_reason"] is None and ch["usage"] is None for ch in chunks[:-1])
    assert chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == full["usage"]
    assert "".join(ch["text"] for ch in chunks) == full["text"]
    # every frame is exactly the documented schema (built as plain dicts for speed), logprobs and all
    from server.api.schemas import GenerateChunk

    more = {"logprobs": 2, "prompt_logprobs": 1, "stop": ["zzz"]}
    frames = parse_sse(c.post("/generate", json={**req, **more, "stream": True}).text)[:-1]
    assert frames[0]["prompt_logprobs"] and frames[-1]["usage"] and frames[-1]["logprobs"] is not None
    for ch in chunks + frames:
        assert list(ch) == list(GenerateChunk.model_fields)
        assert GenerateChunk.model_validate(ch).model_dump() == ch


def test_stop_strings_cut_the_text(srv):
    c = srv.client()
    base = gen(c, tenant_id="acme", prompt="abc", max_tokens=20, ignore_eos=True).json()["text"]
    assert len(base) >= 4
    stop = base[2:4]
    r = gen(c, tenant_id="acme", prompt="abc", max_tokens=20, stop=[stop], ignore_eos=True).json()
    assert r["finish_reason"] == "stop"
    assert r["text"] == base[: base.index(stop)]


def test_seeded_sampling_is_reproducible(srv):
    c = srv.client()
    req = {"tenant_id": "initech", "prompt": "seed", "max_tokens": 16, "temperature": 1.5, "ignore_eos": True}
    a = gen(c, **req, seed=7).json()["text"]
    b = gen(c, **req, seed=7).json()["text"]
    others = {gen(c, **req, seed=s).json()["text"] for s in range(8, 12)}
    assert a == b
    assert len(others | {a}) > 1


def test_x_request_id_is_echoed_or_generated(srv):
    c = srv.client()
    r = c.get("/health", headers={"X-Request-ID": "abc-123_x.y"})
    assert r.headers["x-request-id"] == "abc-123_x.y"
    r = gen(c, tenant_id="acme", prompt="hi", max_tokens=2).headers["x-request-id"]
    assert len(r) == 32
    bad = c.get("/health", headers={"X-Request-ID": "bad id with spaces <script>"})
    assert bad.headers["x-request-id"] != "bad id with spaces <script>"
    assert len(bad.headers["x-request-id"]) == 32
    # error responses carry it too
    assert c.get("/nope", headers={"X-Request-ID": "req-404"}).headers["x-request-id"] == "req-404"


async def _concurrent(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
        rs = await asyncio.gather(*(ac.post("/generate", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    return [r.json() for r in rs]


def test_three_tenants_batched_together_equal_alone(srv):
    c = srv.client()
    prompts = ["Alpha beta", "Gamma delta epsilon", "Zeta"]
    bodies = [
        {"tenant_id": t, "prompt": p, "max_tokens": 24, "ignore_eos": True} for t in TENANTS for p in prompts
    ]
    alone = [gen(c, **b).json()["text"] for b in bodies]
    together = asyncio.run(_concurrent(srv.url, bodies * 2))
    assert [r["text"] for r in together] == alone * 2
    # they really shared engine steps with several tenants' prefixes at once
    m = c.get("/metrics").text
    le1 = metric_value(m, "prefixserve:distinct_prefixes_per_batch_bucket", {"le": "1.0"})
    total = metric_value(m, "prefixserve:distinct_prefixes_per_batch_count")
    assert total and le1 is not None and total - le1 > 0, "no engine step mixed tenants"


def test_prompt_and_context_limits(server_factory, api_bundle, tmp_path):
    from prefix_store import open_store

    store = open_store(f"file://{tmp_path / 's'}")
    put_random_prefix(store, api_bundle, "acme", prefix_length=16)
    s = server_factory(store=store, max_prompt_tokens=20, max_new_tokens=50, max_model_len=64)
    c = s.client()
    assert_error(gen(c, tenant_id="acme", prompt="x" * 200), 413, "prompt_too_long")
    # prefix 16 + prompt 10 + 50 > 64
    err = assert_error(
        gen(c, tenant_id="acme", prompt="y" * 10, max_tokens=50), 413, "context_length_exceeded"
    )
    # vLLM's and OpenAI's words, by which clients such as LiteLLM recognise a context-window error
    assert "maximum context length is 64 tokens" in err["message"] and err["param"] == "max_tokens"
    assert_error(gen(c, tenant_id="acme", prompt="y", max_tokens=51), 422, "max_tokens_too_large")
    assert gen(c, tenant_id="acme", prompt="y" * 10, max_tokens=30).status_code == 200
    # a prompt that leaves no room for one token is the prompt's fault, named as each route names it
    roomy = server_factory(store=store, max_prompt_tokens=200, max_model_len=64).client()
    long = "y " * 60
    err = assert_error(
        gen(roomy, tenant_id="acme", prompt=long, max_tokens=1), 413, "context_length_exceeded"
    )
    assert err["param"] == "prompt"
    # the OpenAI routes answer as OpenAI and vLLM do, a 400 (clients trim or fall back on it; a 413 reaches them as
    # a generic status error)
    chat = {"model": "acme/default", "messages": [{"role": "user", "content": long}], "max_tokens": 1}
    err = assert_error(roomy.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded")
    assert err["param"] == "messages" and "maximum context length is 64 tokens" in err["message"]
    chat = {
        "model": "acme/default",
        "messages": [{"role": "user", "content": "y"}],
        "max_completion_tokens": 60,
    }
    err = assert_error(roomy.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded")
    assert err["param"] == "max_completion_tokens"
    # over the server's prompt limit: the same answer, saying which limit
    over = {"model": "acme/default", "prompt": "x" * 200, "max_tokens": 1}
    err = assert_error(c.post("/v1/completions", json=over), 400, "context_length_exceeded")
    assert "maximum context length" in err["message"] and "the limit is 20" in err["message"]
    assert err["param"] == "prompt"
    tgi = roomy.post("/tgi/generate", json={"inputs": long, "parameters": {"adapter_id": "acme/default"}})
    assert assert_error(tgi, 413)["param"] == "inputs"
    store.close()


def test_context_errors_name_the_limit_that_holds_and_what_was_asked(server_factory, api_bundle, tmp_path):
    """On a 64-token context: echo with max_tokens 0 scores a prompt that fills the context (vLLM counts prompt + 0;
    the hidden token after it takes no position), a prompt over both limits is told of the context's (it was told
    of max_prompt_tokens, 4096), and a prompt that fills the context with no max_tokens asked for is blamed alone
    in vLLM's words (it was told of a "max_tokens (1)" it never sent)."""
    from prefix_store import open_store

    store = open_store(f"file://{tmp_path / 's'}")
    put_random_prefix(store, api_bundle, "acme", prefix_length=16)
    c = server_factory(store=store, max_model_len=64).client()
    for model, room in (("acme/base", 64), ("acme/default", 48)):
        echo = {"model": model, "prompt": [65] * room, "echo": True, "max_tokens": 0, "logprobs": 0}
        r = c.post("/v1/completions", json=echo)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert len(choice["logprobs"]["tokens"]) == room and r.json()["usage"]["completion_tokens"] == 0
        err = assert_error(c.post("/v1/completions", json={**echo, "prompt": [65] * (room + 1)}), 400)
        assert err["param"] == "prompt" and "max_tokens" not in err["message"], err
        assert f"However, you requested {64 + 1} tokens" in err["message"], err
    err = assert_error(
        c.post("/v1/completions", json={"model": "acme/base", "prompt": [65] * 4097, "max_tokens": 1}), 400
    )
    assert "maximum context length is 64 tokens" in err["message"] and "4096" not in err["message"], err
    assert err["param"] == "prompt"
    chat = {"model": "acme/base", "messages": [{"role": "user", "content": "y " * 64}]}
    err = assert_error(c.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded")
    assert err["param"] == "messages" and "max_tokens" not in err["message"], err
    assert "tokens in the messages, Please reduce the length of the messages." in err["message"], err
    # a prompt that fills the context exactly: no position is left for the first output token, and it says so
    size = {k: c.post("/tokenize", json={"model": "acme/base", "messages": [{"role": "user", "content": "a" * k}]})
            .json()["count"] for k in range(1, 64)}  # fmt: skip
    exact = next(k for k, n in size.items() if n == 64)
    chat["messages"][0]["content"] = "a" * exact
    err = assert_error(c.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded")
    assert "you requested 64 tokens in the messages and the next token needs one more" in err["message"], err
    # each route's own name for the output's length, whichever field the error names (the prompt here)
    long = "y " * 64
    for route, body, name in (
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": long}], "max_completion_tokens": 5},
         "max_completion_tokens"),
        ("/v1/responses", {"model": "acme/base", "input": long, "max_output_tokens": 16}, "max_output_tokens"),
        ("/tgi/generate", {"inputs": long, "parameters": {"adapter_id": "acme/base", "max_new_tokens": 5}},
         "max_new_tokens"),
    ):  # fmt: skip
        r = c.post(route, json=body)
        assert r.status_code in (400, 413), r.text
        message = r.json()["error"]["message"]
        assert f"+ {name} (" in message and "+ max_tokens (" not in message, message
    store.close()


def test_speculative_decoding_setting_keeps_outputs_and_counts_drafts(srv, server_factory):
    """`speculative_tokens`: the same greedy text as a server without it (stream and whole), sampled requests work
    as usual, and /metrics counts drafted and accepted tokens."""
    acme = {("acme", "default"): {"prefix_length": 8, "seed": 0}}  # acme's prefix of `srv`
    spec = server_factory(prefixes=acme, speculative_tokens=4)
    assert spec.svc.llm.scheduler.cfg.spec_tokens == 4
    # the random model seldom repeats a 2-gram: with 1-grams it drafts surely
    spec.svc.llm.scheduler.cfg.spec_min_n = 1
    req = {"tenant_id": "acme", "prompt": "abc abc abc abc abc abc", "max_tokens": 24, "ignore_eos": True}
    want = gen(srv.client(), **req).json()["text"]
    c = spec.client()
    assert gen(c, **req).json()["text"] == want
    chunks = parse_sse(c.post("/generate", json={**req, "stream": True}).text)[:-1]
    assert "".join(ch["text"] for ch in chunks) == want
    assert gen(c, **req, temperature=0.8, seed=1).status_code == 200
    m = c.get("/metrics").text
    drafted = metric_value(m, "prefixserve:spec_decode_num_draft_tokens_total")
    accepted = metric_value(m, "prefixserve:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 <= accepted <= drafted
    assert drafted == spec.svc.llm.scheduler.spec_draft_tokens


def test_scheduling_policy_setting_reaches_the_engine(srv, server_factory):
    """Fair admission by default; `scheduling_policy: fcfs` gives arrival order; anything else is refused."""
    from server.settings import Settings

    assert srv.svc.llm.scheduler.cfg.fair is True
    fcfs = server_factory(scheduling_policy="fcfs")
    assert fcfs.svc.llm.scheduler.cfg.fair is False
    assert gen(fcfs.client(), tenant_id="acme", prefix="base", prompt="hi", max_tokens=2).status_code == 200
    with pytest.raises(ValueError, match="scheduling_policy"):
        Settings(scheduling_policy="random")


def test_tenant_concurrency_limit_429(server_factory, api_bundle, tmp_path):
    from prefix_store import open_store

    store = open_store(f"file://{tmp_path / 's'}")
    put_random_prefix(store, api_bundle, "acme")
    put_random_prefix(store, api_bundle, "globex")
    s = server_factory(store=store, max_concurrent_per_tenant=1)
    slow_engine(s.svc)
    c = s.client()
    body = {"tenant_id": "acme", "prompt": "long", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
        next(lines)  # running now
        assert_error(gen(c, tenant_id="acme", prompt="second"), 429, "tenant_concurrency_limit")
        assert gen(c, tenant_id="globex", prompt="other tenant", max_tokens=2).status_code == 200
    # the slot is released once the stream is closed
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = gen(c, tenant_id="acme", prompt="third", max_tokens=2)
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200
    store.close()


def test_queue_full_503_with_retry_after(server_factory, api_bundle, tmp_path):
    from prefix_store import open_store

    store = open_store(f"file://{tmp_path / 's'}")
    put_random_prefix(store, api_bundle, "acme")
    s = server_factory(store=store, max_num_seqs=1, max_queued=1)
    slow_engine(s.svc)
    c = s.client()
    long = {"tenant_id": "acme", "prompt": "long", "max_tokens": 300, "ignore_eos": True}
    with c.stream("POST", "/generate", json={**long, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
        short = {**long, "max_tokens": 20}
        waiting = threading.Thread(target=lambda: s.client().post("/generate", json=short), daemon=True)
        waiting.start()
        deadline = time.monotonic() + 5
        while s.svc.engine.num_waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.svc.engine.num_waiting == 1
        assert_error(gen(c, tenant_id="acme", prompt="third"), 503, "queue_full")
        several = {"model": "acme/default", "prompt": "x", "n": 2, "max_tokens": 5}
        assert_error(c.post("/v1/completions", json=several), 503, "queue_full")
        # more samples than a full batch and queue hold (1 + 1) can never be taken: not a 503 to retry
        err = assert_error(c.post("/v1/completions", json={**several, "n": 3}), 400, "too_many_choices")
        assert "the server takes" in err["message"]
    waiting.join(60)
    m = c.get("/metrics").text
    # one per refused HTTP request (not per sample), and a refused request is not an aborted one: the only abort
    # is the stream closed above
    assert metric_value(m, "prefixserve:requests_rejected_total", {"reason": "queue_full"}) == 2.0
    assert metric_value(m, "prefixserve:request_success_total", {"finished_reason": "abort"}) == 1.0
    store.close()


def test_a_burst_on_an_idle_server_fills_the_batch_before_the_queue(server_factory):
    """The queue limit counts requests waiting beyond the batch's free rows: on an idle server with 4 rows and a
    queue of 1, n=5 is all taken (4 rows + 1 queued); n=6 never fits (a 400, not a 503 to retry). Requests not yet
    given a row used to count as queued, so the second sample of a burst was a 503 on an idle server."""
    s = server_factory(max_num_seqs=4, max_queued=1)
    c = s.client()
    body = {"model": "acme/base", "prompt": "x", "n": 5, "max_tokens": 2, "temperature": 0}
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 5, r.text
    assert_error(c.post("/v1/completions", json={**body, "n": 6}), 400, "too_many_choices")


def test_a_refused_n_request_counts_one_rejection_and_no_aborts(server_factory):
    """n=3 with room in the queue for 2 (the one row busy): the third sample is refused, so the request is a 503; the two admitted
    samples are withdrawn, and for the metrics they never ran (they used to count as 2 aborted requests)."""
    s = server_factory(max_num_seqs=1, max_queued=2)
    slow_engine(s.svc)
    c = s.client()
    long = {"tenant_id": "acme", "prefix": "base", "prompt": "long", "max_tokens": 300, "ignore_eos": True}
    with c.stream("POST", "/generate", json={**long, "stream": True}) as r:
        lines = r.iter_lines()  # (kept: a dropped line iterator closes the stream)
        next(lines)
        several = {"model": "acme/base", "prompt": "x", "n": 3, "max_tokens": 5}
        assert_error(c.post("/v1/completions", json=several), 503, "queue_full")
        m = c.get("/metrics").text
        assert metric_value(m, "prefixserve:requests_rejected_total", {"reason": "queue_full"}) == 1.0
        assert (
            metric_value(m, "prefixserve:request_success_total", {"finished_reason": "abort"}) or 0.0
        ) == 0.0
    m = c.get("/metrics").text
    assert (
        metric_value(m, "prefixserve:request_success_total", {"finished_reason": "abort"}) == 1.0
    )  # the stream


def test_aborted_and_echo_only_requests_count_the_tokens_they_processed(server_factory):
    """Token counters count what was processed whatever the outcome (a stream the client left counts its prompt
    and the tokens generated so far, and its e2e latency); echo with max_tokens 0 counts no generated token."""
    s = server_factory()
    slow_engine(s.svc, 0.02)
    c = s.client()

    def counters() -> tuple[float, float, float]:
        m = c.get("/metrics").text
        return (
            metric_value(m, "prefixserve:prompt_tokens_total") or 0.0,
            metric_value(m, "prefixserve:generation_tokens_total") or 0.0,
            metric_value(m, "prefixserve:e2e_request_latency_seconds_count") or 0.0,
        )

    p0, g0, e0 = counters()
    body = {"tenant_id": "acme", "prefix": "base", "prompt": "Once upon a time", "max_tokens": 200,
            "ignore_eos": True, "stream": True}  # fmt: skip
    n_prompt = c.post(
        "/tokenize", json={"tenant_id": "acme", "prefix": "base", "prompt": body["prompt"]}
    ).json()
    with c.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        got = 0
        while got < 3:
            if next(lines).startswith("data: {"):
                got += 1
    deadline = time.monotonic() + 10
    while counters()[2] == e0 and time.monotonic() < deadline:
        time.sleep(0.05)
    p1, g1, e1 = counters()
    assert p1 - p0 == n_prompt["count"] and 3 <= g1 - g0 < 200 and e1 - e0 == 1
    echo = {"model": "acme/base", "prompt": "The sky is blue", "max_tokens": 0, "echo": True}
    assert c.post("/v1/completions", json=echo).json()["usage"]["completion_tokens"] == 0
    p2, g2, _ = counters()
    assert p2 > p1 and g2 == g1


def test_logprobs_streamed_and_whole_agree(srv):
    """`logprobs: N`: one entry per generated token, greedy token first in its own top-N, values the same whether
    streamed (entries spread over the chunks, none lost to held-back text) or not."""
    c = srv.client()
    req = {
        "tenant_id": "acme",
        "prompt": "Once upon a time",
        "max_tokens": 10,
        "ignore_eos": True,
        "logprobs": 3,
    }
    full = gen(c, **req).json()
    lps = full["logprobs"]
    assert len(lps) == full["usage"]["completion_tokens"] == 10
    for lp in lps:
        assert lp["logprob"] <= 0 and len(lp["top_logprobs"]) == 3
        top = lp["top_logprobs"]
        assert top[0]["id"] == lp["id"] and top[0]["logprob"] == pytest.approx(lp["logprob"])
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        decoded = srv.svc.bundle.tokenizer.decode([lp["id"]])
        assert lp["text"] == decoded or ("\ufffd" in decoded and lp["text"].startswith("bytes:"))
    chunks = parse_sse(c.post("/generate", json={**req, "stream": True}).text)[:-1]
    streamed = [lp for ch in chunks for lp in ch["logprobs"]]
    assert [lp["id"] for lp in streamed] == [lp["id"] for lp in lps]
    assert [t for ch in chunks for t in ch["token_ids"]] == [lp["id"] for lp in lps]  # ids of every token too
    assert [lp["logprob"] for lp in streamed] == pytest.approx([lp["logprob"] for lp in lps], abs=1e-4)
    # without the field nothing is computed or returned
    assert gen(c, **{**req, "logprobs": None}).json()["logprobs"] is None
    zero = gen(c, **{**req, "logprobs": 0}).json()["logprobs"]
    assert [lp["top_logprobs"] for lp in zero] == [[]] * 10


def test_prompt_logprobs_score_a_text_under_a_prefix(srv):
    """`prompt_logprobs: N` on /generate: one entry per prompt token (null first), equal to transformers fed the
    stored prefix KV; sent once, on the first streamed chunk; over the server's max_logprobs is a 422."""
    from tests.engine_utils import hf_prompt_logprobs

    c = srv.client()
    text = "Once upon a time there was a prefix"
    req = {"tenant_id": "globex", "prompt": text, "max_tokens": 2, "ignore_eos": True, "prompt_logprobs": 2}
    body = gen(c, **req).json()
    ids = c.post("/tokenize", json={"tenant_id": "globex", "prompt": text}).json()["tokens"]
    plp = body["prompt_logprobs"]
    assert len(plp) == len(ids) == body["usage"]["prompt_tokens"] and plp[0] is None
    kv = srv.svc.store.get("globex", "default").kv
    ref = hf_prompt_logprobs(srv.svc.bundle.hf_model, kv, ids)
    for t in range(1, len(ids)):
        lp = plp[t]
        assert lp["id"] == ids[t] and lp["text"] == srv.svc.token_text(ids[t])
        assert lp["logprob"] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        assert [x["id"] for x in lp["top_logprobs"]] == ref[t - 1].topk(2).indices.tolist()
    assert (
        body["logprobs"] is None
        and gen(c, **{**req, "prompt_logprobs": None}).json()["prompt_logprobs"] is None
    )
    chunks = parse_sse(c.post("/generate", json={**req, "stream": True}).text)[:-1]
    assert chunks[0]["prompt_logprobs"] == plp and all(ch["prompt_logprobs"] is None for ch in chunks[1:])
    assert "".join(ch["text"] for ch in chunks) == body["text"]
    r = gen(c, **{**req, "prompt_logprobs": 21})
    assert assert_error(r, 422, "logprobs_too_large")["param"] == "prompt_logprobs"


def test_penalties_change_greedy_output(srv):
    c = srv.client()
    req = {"tenant_id": "globex", "prompt": "la la la la", "max_tokens": 16, "ignore_eos": True}
    plain = gen(c, **req).json()
    for extra in ({"repetition_penalty": 1.8}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        r = gen(c, **req, **extra).json()
        assert r["text"] != plain["text"], f"{extra} changed nothing"
        assert gen(c, **req, **extra).json()["text"] == r["text"]  # still deterministic
    # a penalty of 0 / 1 is the plain request
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}
    assert gen(c, **req, **neutral).json()["text"] == plain["text"]


def test_sdk_logprobs_and_penalties(srv):
    """The SDK sends the new fields only when set and parses logprobs, whole and streamed."""
    import sys
    from pathlib import Path

    try:
        import prefixserve_client as ps
    except ImportError:  # pragma: no cover - bare checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))
        import prefixserve_client as ps

    with ps.Client(srv.url) as c:
        kw = dict(
            prefix="default",
            max_tokens=8,
            logprobs=2,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            logit_bias={5: -100.0},
            min_tokens=2,
            stop_token_ids=[6],
        )
        g = c.generate("acme", "Once upon a time", **kw)
        assert g.logprobs is not None and len(g.logprobs) == g.usage.completion_tokens > 0
        assert all(isinstance(lp, ps.TokenLogprob) and len(lp.top_logprobs) == 2 for lp in g.logprobs)
        assert 5 not in [lp.id for lp in g.logprobs]
        deltas = list(c.stream("acme", "Once upon a time", **kw))
        streamed = [lp for d in deltas for lp in (d.logprobs or [])]
        assert [lp.id for lp in streamed] == [lp.id for lp in g.logprobs]
        assert [t for d in deltas for t in d.token_ids] == [lp.id for lp in g.logprobs]
        assert c.generate("acme", "Once upon a time", max_tokens=4).logprobs is None
        scored = c.generate("acme", "Once upon a time", max_tokens=1, prompt_logprobs=1)
        plp = scored.prompt_logprobs
        assert plp is not None and len(plp) == scored.usage.prompt_tokens and plp[0] is None
        assert all(isinstance(lp, ps.TokenLogprob) and len(lp.top_logprobs) == 1 for lp in plp[1:])
        first = next(iter(c.stream("acme", "Once upon a time", max_tokens=1, prompt_logprobs=1)))
        assert first.prompt_logprobs == plp
        t = c.tokenize("acme", "Once upon a time")
        assert isinstance(t, ps.Tokenized) and t.count == g.usage.prompt_tokens == len(t.tokens)
        assert t.room == srv.svc.llm.max_model_len - 8 - t.count  # acme's default prefix has 8 positions
        assert c.detokenize(t.tokens) == "Once upon a time"
        with pytest.raises(TypeError):
            c.tokenize("acme")  # neither prompt nor messages

    async def async_tokenize() -> int:
        async with ps.AsyncClient(srv.url) as ac:
            msgs = [{"role": "user", "content": "hi"}]
            return (await ac.tokenize("acme", prefix="base", messages=msgs)).count

    assert asyncio.run(async_tokenize()) > 1


def test_logit_bias_min_tokens_stop_token_ids(srv):
    c = srv.client()
    req = {
        "tenant_id": "acme",
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "logprobs": 0,
        "ignore_eos": True,
    }
    plain = [lp["id"] for lp in gen(c, **req).json()["logprobs"]]
    forced = (plain[0] + 11) % 200
    r = gen(c, **req, logit_bias={str(forced): 100}).json()
    assert [lp["id"] for lp in r["logprobs"]] == [forced] * 6
    banned = gen(c, **req, logit_bias={str(plain[0]): -100}).json()
    assert banned["logprobs"][0]["id"] != plain[0]
    stop = gen(c, **{**req, "stop_token_ids": [plain[1]]}).json()
    assert [lp["id"] for lp in stop["logprobs"]] == plain[:2] and stop["finish_reason"] == "stop"
    held = gen(c, **{**req, "stop_token_ids": [plain[1]], "min_tokens": 6}).json()
    assert held["usage"]["completion_tokens"] == 6 and plain[1] not in [lp["id"] for lp in held["logprobs"]]
    vocab = srv.svc.bundle.spec.vocab_size
    for bad, param in (
        ({"logit_bias": {"x1": 5}}, "logit_bias"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"logit_bias": {str(vocab): 1}}, "logit_bias"),
        ({"stop_token_ids": [vocab]}, "stop_token_ids"),
        ({"min_tokens": 7}, "min_tokens"),
    ):
        err = assert_error(gen(c, **req, **bad), 422)
        assert err["param"].split(".")[0] == param, (bad, err)


def test_prompt_cache_is_per_tenant_and_in_metrics(srv):
    """The same long prompt twice for one tenant reuses its cached blocks (metrics count the hit tokens); the same
    prompt with another tenant's base model (same tokens, same model) does not: the cache is salted by tenant."""
    c = srv.client()
    prompt = " ".join(f"word{i}" for i in range(60))
    llm = srv.svc.llm

    def hits() -> int:
        return llm.scheduler.cache_hit_tokens

    first = gen(c, tenant_id="acme", prefix="base", prompt=prompt, max_tokens=4, ignore_eos=True).json()
    h0 = hits()
    other = gen(c, tenant_id="globex", prefix="base", prompt=prompt, max_tokens=4, ignore_eos=True).json()
    assert hits() == h0, "another tenant must not hit acme's cached prompt"
    again = gen(c, tenant_id="acme", prefix="base", prompt=prompt, max_tokens=4, ignore_eos=True).json()
    assert hits() - h0 >= 3 * 16 and again["text"] == first["text"] == other["text"]
    m = c.get("/metrics").text
    assert metric_value(m, "prefixserve:prompt_cache_hit_tokens_total") == hits()
    assert (
        metric_value(m, "prefixserve:prompt_cache_query_tokens_total") >= 3 * first["usage"]["prompt_tokens"]
    )


def test_tokenize_counts_what_generate_feeds_and_detokenize_round_trips(srv):
    c = srv.client()
    for prefix, prompt in (("default", "Once upon a time"), ("chatty", "hi there")):  # raw and chat formats
        t = c.post("/tokenize", json={"tenant_id": "acme", "prefix": prefix, "prompt": prompt})
        assert t.status_code == 200, t.text
        tok = t.json()
        g = gen(c, tenant_id="acme", prefix=prefix, prompt=prompt, max_tokens=1).json()
        assert tok["count"] == len(tok["tokens"]) == g["usage"]["prompt_tokens"]
        assert tok["prefix_length"] == (8 if prefix == "default" else 6)
        assert tok["prompt_format"] == ("raw" if prefix == "default" else "chat")
        assert tok["max_model_len"] == srv.svc.llm.max_model_len
    msgs = [{"role": "user", "content": "hi there"}]
    chat = c.post("/tokenize", json={"tenant_id": "acme", "prefix": "base", "messages": msgs}).json()
    assert chat["prompt_format"] == "chat" and chat["prefix_length"] == 0 and chat["count"] > 2
    # text content parts are joined by newlines (vLLM's rule), not run together
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "hi\nthere"}]
    as_parts, as_text = (
        c.post("/tokenize", json={"tenant_id": "acme", "prefix": "base", "messages": m}).json()["tokens"]
        for m in (parts, joined)
    )
    assert as_parts == as_text != chat["tokens"]
    raw = c.post(
        "/tokenize", json={"tenant_id": "acme", "prefix": "default", "prompt": "Once upon a time"}
    ).json()
    back = c.post("/detokenize", json={"tokens": raw["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == "Once upon a time"
    # bad input: unknown prefix, both or neither of prompt/messages, ids past the vocabulary
    assert_error(c.post("/tokenize", json={"tenant_id": "acme", "prefix": "nope", "prompt": "x"}), 404)
    assert_error(c.post("/tokenize", json={"tenant_id": "acme", "prompt": "x", "messages": msgs}), 422)
    assert_error(c.post("/tokenize", json={"tenant_id": "acme"}), 422)
    assert_error(c.post("/detokenize", json={"tokens": [srv.svc.bundle.spec.vocab_size]}), 422)


def test_add_special_tokens_and_vllms_tokenize_fields(server_factory):
    """vLLM's add_special_tokens (a BOS added to a text prompt, or on top of the chat template; it was accepted and
    ignored), the same on /tokenize and the generation routes; /tokenize and /detokenize also take vLLM's `model`
    and `return_token_strs`."""
    from tokenizers import processors

    from server.model import bundle_from_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    srv = server_factory(bundle=bundle_from_model(make_tiny_llama(tok, seed=0), tok, name="bos-llama"))
    c = srv.client()

    def tokens(**kw):
        r = c.post("/tokenize", json={"tenant_id": "acme", "prefix": "base", **kw})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    raw = tokens(prompt="hi there", prompt_format="raw")
    assert (
        raw[0] == bos and tokens(prompt="hi there", prompt_format="raw", add_special_tokens=False) == raw[1:]
    )
    chat = tokens(prompt="hi there")
    assert chat[0] != bos and tokens(prompt="hi there", add_special_tokens=True) == [bos, *chat]
    msgs = [{"role": "user", "content": "hi there"}]
    assert tokens(messages=msgs) == chat and tokens(messages=msgs, add_special_tokens=True) == [bos, *chat]

    def prompt_tokens(route, **kw):
        r = c.post(route, json={"model": "acme/base", "max_tokens": 1, **kw})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    comp = {"prompt": "hi there", "prompt_format": "raw"}
    assert prompt_tokens("/v1/completions", **comp) == len(raw)
    assert prompt_tokens("/v1/completions", **comp, add_special_tokens=False) == len(raw) - 1
    assert prompt_tokens("/v1/chat/completions", messages=msgs) == len(chat)
    assert prompt_tokens("/v1/chat/completions", messages=msgs, add_special_tokens=True) == len(chat) + 1
    # vLLM's /tokenize: the prefix as a model id, each token's string
    r = c.post(
        "/tokenize",
        json={"model": "acme/base", "prompt": "hi", "prompt_format": "raw", "return_token_strs": True},
    )
    assert r.status_code == 200 and r.json()["token_strs"] == tok.convert_ids_to_tokens(r.json()["tokens"]), (
        r.text
    )
    assert r.json()["token_strs"][0] == "<|endoftext|>"
    assert (
        c.post("/tokenize", json={"tenant_id": "acme", "prefix": "base", "prompt": "hi"}).json()["token_strs"]
        is None
    )
    err = assert_error(
        c.post("/tokenize", json={"model": "acme/base", "tenant_id": "acme", "prompt": "hi"}), 422
    )
    assert err["param"] == "model" and "tenant_id" in err["message"]
    assert_error(c.post("/tokenize", json={"model": "acme/nope", "prompt": "hi"}), 404, "model_not_found")
    assert_error(c.post("/detokenize", json={"model": "acme/nope", "tokens": [1]}), 404, "model_not_found")
    d = c.post("/detokenize", json={"model": "acme/base", "tokens": raw})
    assert d.status_code == 200 and d.json()["prompt"] == "<|endoftext|>hi there", d.text
    assert_error(c.post("/detokenize", json={"model": "a/b/c", "tokens": raw}), 404, "model_not_found")


def test_tokenize_renders_messages_as_chat_completions_does(srv):
    """/tokenize takes what /v1/chat/completions renders messages with (tools, earlier turns' tool calls,
    add_generation_prompt, continue_final_message, chat_template_kwargs) and gives the ids the chat would feed;
    they used to be refused or dropped, so a count for a tool-using chat could not be had."""
    c = srv.client()
    tok = srv.svc.bundle.tokenizer
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    msgs = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "assistant", "content": "It is"},
    ]
    opts = {
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    with template_calls(tok) as seen:
        body = {"tenant_id": "acme", "prefix": "base", "messages": msgs, "tools": [tool], **opts}
        t = c.post("/tokenize", json=body)
        chat = c.post(
            "/v1/chat/completions",
            json={"model": "acme/base", "messages": msgs, "tools": [tool], "max_tokens": 1, **opts},
        )
    assert t.status_code == 200 and chat.status_code == 200, (t.text, chat.text)
    assert t.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    (tok_msgs, tok_kw), (chat_msgs, chat_kw) = seen
    assert tok_msgs == chat_msgs and tok_kw == chat_kw
    assert tok_kw["tools"][0]["function"]["name"] == "get_time" and tok_kw["continue_final_message"] is True
    assert tok_msgs[1]["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
    assert tok_kw["enable_thinking"] is False
    # the options change the ids: the default ends with the assistant turn's opening, not inside "It is"
    plain = c.post("/tokenize", json={"tenant_id": "acme", "prefix": "base", "messages": msgs}).json()
    assert plain["tokens"] != t.json()["tokens"]
    # chat fields with a prompt, or misused, are a 422 naming the field
    for extra, param in (
        ({"prompt": "x", "tools": [tool]}, "tools"),
        ({"prompt": "x", "add_generation_prompt": False}, "add_generation_prompt"),
        ({"messages": msgs, "continue_final_message": True}, "continue_final_message"),
        ({"messages": msgs, "chat_template_kwargs": {"tools": 1}}, "chat_template_kwargs"),
        ({"messages": msgs, "prompt_format": "raw"}, "prompt_format"),  # was ignored without a word
    ):
        err = assert_error(c.post("/tokenize", json={"tenant_id": "acme", **extra}), 422)
        assert err["param"] == param, err


def test_pinned_prefix_version_serves_that_version(srv):
    """`prefix_version` (and `model: "tenant/prefix@V"` on /v1) serves a stored version, not the latest: after a
    new version is stored, pinning the old one gives exactly the tokens the old one gave as the latest, and one
    server serves both versions (different lengths)."""
    import sys
    from pathlib import Path

    try:
        import prefixserve_client as ps
    except ImportError:  # pragma: no cover - bare checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))
        import prefixserve_client as ps

    c = srv.client()
    prompt = "The quick brown fox"
    body = {"tenant_id": "globex", "prompt": prompt, "ignore_eos": True, "logprobs": 0}
    v1 = gen(c, **body).json()
    assert v1["prefix_version"] == 1
    put_random_prefix(srv.store, srv.svc.bundle, "globex", prefix_length=5, seed=99)  # version 2
    v2 = gen(c, **body).json()
    pinned = gen(c, **body, prefix_version=1).json()
    assert v2["prefix_version"] == 2 and pinned["prefix_version"] == 1
    ids = {k: [lp["id"] for lp in r["logprobs"]] for k, r in (("v1", v1), ("v2", v2), ("pinned", pinned))}
    assert ids["pinned"] == ids["v1"] != ids["v2"]
    assert gen(c, **body, prefix_version=2).json()["text"] == v2["text"]
    # the same pins through the OpenAI routes, the SDK and /tokenize (each version's own prefix length)
    oa = {"prompt": prompt, "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    r = c.post("/v1/completions", json={**oa, "model": "globex/default@1"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == v1["text"] and r.json()["model"] == "globex/default@1"
    assert (
        c.post("/v1/completions", json={**oa, "model": "globex@1"}).json()["choices"][0]["text"] == v1["text"]
    )
    with ps.Client(srv.url) as sdk:
        assert sdk.generate("globex", prompt, max_tokens=12, prefix_version=1).prefix_version == 1
        assert sdk.tokenize("globex", prompt, prefix_version=1).prefix_length == 12
        assert sdk.tokenize("globex", prompt).prefix_length == 5
    # versions that do not exist or cannot be: 404 / 422, nothing runs
    err = assert_error(gen(c, **body, prefix_version=7), 404, "prefix_not_found")
    assert "version 7" in err["message"]
    assert_error(c.post("/v1/completions", json={**oa, "model": "globex/default@7"}), 404, "model_not_found")
    for model in (
        "globex/default@0",
        "globex/default@x",
        "globex/base@1",
        "globex/default@",
        "globex/default@1@2",
    ):
        assert_error(c.post("/v1/completions", json={**oa, "model": model}), 404, "model_not_found")
    assert_error(gen(c, **body, prefix="base", prefix_version=1), 422)
    assert_error(gen(c, **body, prefix_version=0), 422)
    # versions beyond any store's range are not found, and do not make the store look down (a file name that long
    # fails with ENAMETOOLONG: it once gave 503 store_unavailable and flipped /ready)
    huge = 10**300
    assert_error(gen(c, **body, prefix_version=huge), 404, "prefix_not_found")
    assert_error(
        c.post("/tokenize", json={"tenant_id": "globex", "prompt": "x", "prefix_version": huge}), 404
    )
    assert_error(c.get("/prefixes/globex/default", params={"version": huge}), 404, "prefix_not_found")
    assert_error(c.get("/prefixes/globex/default/download", params={"version": huge}), 404)
    assert_error(c.delete("/prefixes/globex/default", params={"version": huge}), 404)
    model = f"globex/default@{10**30}"
    assert_error(c.post("/v1/completions", json={**oa, "model": model}), 404, "model_not_found")
    assert c.get("/ready").status_code == 200 and srv.svc.store_ok
    # deleting the name drops its pinned versions too
    assert c.delete("/prefixes/globex/default").status_code == 200
    assert_error(gen(c, **body, prefix_version=1), 404, "prefix_not_found")


def test_deleting_the_latest_version_rolls_back(srv):
    """DELETE ?version=N removes one version: deleting the latest serves the one before it at once (metadata and
    device KV caches dropped), exactly as that version generated before; the others stay."""
    c = srv.client()
    body = {"tenant_id": "initech", "prompt": "The quick brown fox", "ignore_eos": True}
    v1 = gen(c, **body).json()
    put_random_prefix(srv.store, srv.svc.bundle, "initech", prefix_length=6, seed=7)
    put_random_prefix(srv.store, srv.svc.bundle, "initech", prefix_length=9, seed=8)
    assert gen(c, **body).json()["prefix_version"] == 3
    v2 = gen(c, **body, prefix_version=2).json()
    assert_error(c.delete("/prefixes/initech/default", params={"version": 9}), 404, "prefix_not_found")
    assert_error(c.delete("/prefixes/initech/default", params={"version": 0}), 422)
    r = c.delete("/prefixes/initech/default", params={"version": 3})
    assert r.status_code == 200 and r.json() == {
        "tenant_id": "initech",
        "name": "default",
        "object": "prefix",
        "deleted": True,
        "version": 3,
    }
    now = gen(c, **body).json()
    assert now["prefix_version"] == 2 and now["text"] == v2["text"] != v1["text"]
    info = c.get("/prefixes/initech/default").json()
    assert info["version"] == 2 and info["versions"] == [1, 2] and info["prefix_length"] == 6
    one = c.get("/prefixes/initech/default", params={"version": 1}).json()
    assert one["version"] == 1 and one["versions"] == [1, 2] and one["prefix_length"] == 16
    assert_error(c.get("/prefixes/initech/default", params={"version": 3}), 404, "prefix_not_found")
    assert_error(gen(c, **body, prefix_version=3), 404, "prefix_not_found")
    r = c.delete("/prefixes/initech/default", params={"version": 2})
    assert r.status_code == 200
    assert gen(c, **body).json()["text"] == v1["text"]


def test_versions_put_and_deleted_under_pinned_load(srv):
    """Requests pinned to versions that are being stored and deleted meanwhile: each answers 200 with the version
    it asked for, or 404 for one already deleted — never a 5xx, never another version's output."""
    import random

    c = srv.client()
    store, bundle = srv.store, srv.svc.bundle
    live = list(store.versions("acme", "default"))
    statuses: list[tuple[int, int, int | None]] = []  # (asked version, status, served version)
    stop = threading.Event()

    def client_loop(seed: int) -> None:
        rnd = random.Random(seed)
        cl = srv.client()
        while not stop.is_set():
            v = rnd.choice(live[-4:])  # the oldest of these is the next to go
            body = {"tenant_id": "acme", "prompt": "Hi", "max_tokens": 3, "prefix_version": v}
            r = cl.post("/generate", json=body)
            statuses.append(
                (v, r.status_code, r.json().get("prefix_version") if r.status_code == 200 else None)
            )

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            live.append(
                put_random_prefix(store, bundle, "acme", prefix_length=4 + i % 5, seed=100 + i).version
            )
            time.sleep(0.05)
            if len(live) > 3:
                store.delete("acme", "default", live[-4])
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert statuses and {s for _, s, _ in statuses} <= {200, 404}, sorted({s for _, s, _ in statuses})
    assert all(served == asked for asked, s, served in statuses if s == 200)
    assert sum(s == 200 for _, s, _ in statuses) > 10
    assert any(s == 404 for _, s, _ in statuses)  # requests did race the deletes
    assert c.get("/health").status_code == 200


def test_a_request_for_the_latest_runs_on_the_new_latest_if_its_version_is_pruned_first(srv, caplog):
    """A request resolved to the latest version (v1) whose KV is fetched only after a new version (v2) was stored
    and v1 removed (`keep_versions=1`, or a delete) runs on v2 and says so, exactly as a request pinned to v2;
    a request pinned to v1 still gets 404, as does one whose name is gone altogether. The stale resolution is
    put back in the metadata cache by hand: that is the state of a request resolved just before the new put."""
    from server.api.prefix_meta import ResolvedPrefix

    c, svc, store = srv.client(), srv.svc, srv.store
    key = ("umbrella", "default")
    put_random_prefix(store, svc.bundle, *key, prefix_length=8, seed=1)
    put_random_prefix(store, svc.bundle, *key, prefix_length=5, seed=2)
    store.delete(*key, 1)  # never served: not resident on the device either

    def resolved_before_the_put(version: int | None) -> None:
        _, _, generation = svc.meta_cache.get(key, version)
        svc.meta_cache.put(
            key, ResolvedPrefix(*key, 1, 8, "raw", pinned=version is not None), generation, version
        )

    body = {"tenant_id": "umbrella", "prompt": "The quick brown fox", "ignore_eos": True}
    want = gen(c, **body, prefix_version=2).json()
    assert want["prefix_version"] == 2
    resolved_before_the_put(None)
    with caplog.at_level("INFO", logger="prefixserve.api"):
        r = gen(c, **body)
    assert r.status_code == 200, r.text
    assert r.json()["prefix_version"] == 2 and r.json()["text"] == want["text"]
    assert any("v1 is gone; running on v2" in m for m in caplog.messages), caplog.messages
    resolved_before_the_put(None)
    with c.stream("POST", "/generate", json={**body, "max_tokens": 12, "stream": True}) as s:
        chunks = parse_sse(s.read().decode())
    assert {ch["prefix_version"] for ch in chunks if isinstance(ch, dict)} == {2}
    assert "".join(ch["text"] for ch in chunks if isinstance(ch, dict)) == want["text"]
    # pinned to the version that is gone: the engine's 404 stands
    resolved_before_the_put(1)
    assert_error(gen(c, **body, prefix_version=1), 404, "prefix_not_found")
    # the whole name gone: nothing to run on
    store.delete(*key)
    resolved_before_the_put(None)
    assert_error(gen(c, **body), 404, "prefix_not_found")
    assert c.get("/health").status_code == 200


def test_a_prefix_that_changes_faster_than_a_request_can_load_it_is_a_503(srv, monkeypatch):
    """Every version a request for the latest is given is gone again before it loads (versions put and pruned
    many times a second): after a few tries a retryable 503, not a 404 for a name that exists."""
    from server.api import run
    from server.api.prefix_meta import ResolvedPrefix

    tries = []

    async def always_newer(self, ev):  # the store had moved on again each time
        tries.append(1)
        return dataclasses.replace(self.prefix, version=1000 + len(tries))

    monkeypatch.setattr(run.GenerationRun, "_newer_latest", always_newer)
    c = srv.client()
    body = {"tenant_id": "acme", "prompt": "x", "max_tokens": 2}
    key = ("acme", "default")
    _, _, generation = srv.svc.meta_cache.get(key)
    srv.svc.meta_cache.put(key, ResolvedPrefix(*key, 999, 8, "raw"), generation)  # resolved: gone since
    r = gen(c, **body)
    err = assert_error(r, 503, "prefix_changing")
    assert r.headers["retry-after"] and "retry" in err["message"]
    assert len(tries) == run.MAX_LATEST_ATTEMPTS - 1


def test_a_version_that_never_was_leaves_the_names_cached_metadata(srv):
    """A 404 for a version the server never held is no news of a change: the name's latest (and its pinned
    versions) stay cached (every such 404 dropped them, and kept fetches under way from caching). A version it
    held and the store no longer has is: the name is looked up again."""
    c = srv.client()
    body = {"tenant_id": "acme", "prompt": "x", "max_tokens": 2}
    key, cache = ("acme", "default"), srv.svc.meta_cache
    assert gen(c, **body).status_code == 200 and gen(c, **body, prefix_version=1).status_code == 200
    assert cache.get(key)[0] is not None and cache.get(key, 1)[0] is not None
    changes = cache.generation()
    assert_error(gen(c, **body, prefix_version=99), 404, "prefix_not_found")
    assert (
        cache.get(key)[0] is not None and cache.get(key, 1)[0] is not None and cache.generation() == changes
    )
    # a version it holds, gone from the store unheard of (its entry run past the TTL): the name goes
    from server.api.prefix_meta import ResolvedPrefix

    _, _, now = cache.get(key, 7)
    cache.put(key, ResolvedPrefix(*key, 7, 8, "raw", pinned=True), now, version=7)
    cache.ttl_s = 0.0
    assert_error(gen(c, **body, prefix_version=7), 404, "prefix_not_found")
    assert cache.get(key)[0] is None


def test_meta_cache_refuses_a_fetch_raced_by_a_change_and_stays_bounded():
    from server.api.prefix_meta import PrefixMetaCache, ResolvedPrefix

    cache = PrefixMetaCache(ttl_s=60)
    a, b = ("acme", "a"), ("acme", "b")
    _, _, began = cache.get(a)
    cache.invalidate(b)  # another name's change does not matter
    cache.put(a, ResolvedPrefix(*a, 1, 8, "raw"), began)
    assert cache.get(a)[0] is not None
    _, _, began = cache.get(a)
    cache.invalidate(a)  # this name changed while it was fetched: its result may be stale
    cache.put(a, ResolvedPrefix(*a, 1, 8, "raw"), began)
    assert cache.get(a)[0] is None
    _, _, began = cache.get(a)
    for i in range(
        3 * PrefixMetaCache.MAX_GENERATIONS
    ):  # names that change once each: not remembered forever
        cache.invalidate(("t", f"n{i}"))
    assert len(cache._changed_at) <= PrefixMetaCache.MAX_GENERATIONS
    cache.put(
        a, ResolvedPrefix(*a, 1, 8, "raw"), began
    )  # begun before what was forgotten: refused to be safe
    assert cache.get(a)[0] is None
    _, _, began = cache.get(a)
    cache.put(a, ResolvedPrefix(*a, 2, 8, "raw"), began)
    assert cache.get(a)[0].version == 2


def test_meta_cache_keeps_the_names_and_versions_used_last_up_to_a_bound():
    """Entries went only with a change event or a 404: a server that looked up every name of a large store (and
    pinned versions) kept every one (2,500 of 2,500 twelve seconds past their TTL). It keeps the names looked up
    last, and the versions of a name looked up last, up to a bound; the others are read again when asked for."""
    from server.api.prefix_meta import PrefixMetaCache, ResolvedPrefix

    cache = PrefixMetaCache(ttl_s=60)
    cache.MAX_ENTRIES, cache.MAX_VERSIONS = 4, 3
    gen = cache.generation()
    for i in range(4):
        cache.put(("t", f"n{i}"), ResolvedPrefix("t", f"n{i}", 1, 8, "raw"), gen)
    assert cache.get(("t", "n0"))[0] is not None  # used: the least recently used is n1 now
    cache.put(("t", "n4"), ResolvedPrefix("t", "n4", 1, 8, "raw"), gen)
    assert [cache.get(("t", f"n{i}"))[0] is not None for i in range(5)] == [True, False, True, True, True]
    for v in range(1, 6):
        cache.put(("t", "n0"), ResolvedPrefix("t", "n0", v, 8, "raw"), gen, version=v)
    cache.get(("t", "n0"), 3)
    cache.put(("t", "n0"), ResolvedPrefix("t", "n0", 6, 8, "raw"), gen, version=6)
    assert [v for v in range(1, 7) if cache.get(("t", "n0"), v)[0] is not None] == [3, 5, 6]
    assert cache._count == sum(len(d) for d in cache._entries.values()) <= 4
    assert all(len(d) <= 3 for d in cache._entries.values())


def test_meta_cache_count_stays_true_through_refreshes_invalidations_and_clears():
    """Looking a name up again once its TTL ran out (a re-put), a change event for a name and a store resync
    (clear) leave the count of cached entries true: it does not drift up and start dropping the names still
    in use (nor down, letting the cache grow past its bound)."""
    from server.api.prefix_meta import PrefixMetaCache, ResolvedPrefix

    def put(cache, name):
        cache.put(("t", name), ResolvedPrefix("t", name, 1, 8, "raw"), cache.generation())

    def cached(cache):
        assert cache._count == sum(len(d) for d in cache._entries.values()) <= cache.MAX_ENTRIES
        return sorted(n for (_, n), d in cache._entries.items() if d)

    cache = PrefixMetaCache(ttl_s=60)
    cache.MAX_ENTRIES = 4
    for name in "abc":
        put(cache, name)
    for _ in range(5):  # one name's refreshes replace its entry
        put(cache, "c")
    assert cached(cache) == ["a", "b", "c"]
    for name in "abc":
        cache.invalidate(("t", name))
    for name in "de":
        put(cache, name)
    assert cached(cache) == ["d", "e"]
    for name in "fgh":
        put(cache, name)
    cache.clear()
    for name in "ij":
        put(cache, name)
    assert cached(cache) == ["i", "j"]
    for name in "klm":
        put(cache, name)
    assert cached(cache) == ["j", "k", "l", "m"]


def test_meta_cache_refuses_a_fetch_begun_before_a_resync_clear():
    """A store resync (`clear`: a version number may now name another record) while a lookup's fetch is under
    way: what that fetch read is not cached, though no invalidation of the name was seen."""
    from server.api.prefix_meta import PrefixMetaCache, ResolvedPrefix

    cache = PrefixMetaCache(ttl_s=60)
    a = ("acme", "a")
    _, _, began = cache.get(a)
    cache.clear()
    cache.put(a, ResolvedPrefix(*a, 1, 8, "raw"), began)
    assert cache.get(a)[0] is None
    began = cache.generation()  # a fetch begun after the clear is cached
    cache.put(a, ResolvedPrefix(*a, 2, 8, "raw"), began)
    assert cache.get(a)[0].version == 2
