"""Per-tenant usage (GET /usage), cached prompt tokens in responses, and per-tenant rate limits (requests and tokens
per minute, per-tenant overrides, OpenAI's x-ratelimit-* headers)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from server.api.errors import APIError
from server.api.limits import Bucket, RateLimiter, TenantLimit, _duration, parse_limits
from tests.fixtures.server import assert_error, slow_engine

LONG = " ".join(f"word{i}" for i in range(40))  # several KV blocks of 16 tokens


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def remaining(c, tenant: str) -> int | None:
    """What is left of the tenant's token budget, as GET /usage reports it."""
    return c.get("/usage", params={"tenant_id": tenant}).json()["data"][0]["limits"]["remaining_tokens"]


def gen(c, tenant: str | None = None, **kw):
    body = {"prefix": "base", "prompt": "Once upon a time", "max_tokens": 6, "ignore_eos": True, **kw}
    if tenant:
        body["tenant_id"] = tenant
    return c.post("/generate", json=body)


def usage_once(c, tenant: str, done, timeout: float = 10.0) -> dict:
    """The tenant's /usage entry once `done(entry)` holds (counts land as runs close, or a replica flushes), or
    as it is at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        (u,) = c.get("/usage", params={"tenant_id": tenant}).json()["data"]
        if done(u) or time.monotonic() > deadline:
            return u
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ usage
def test_usage_per_tenant_and_prefix_matches_what_responses_reported(server_factory):
    s = server_factory(
        keys={"acme": "k-a", "globex": "k-g"}, admin_key="adm", prefixes={("acme", "default"): {"seed": 1}}
    )
    a, g, adm = s.client("k-a"), s.client("k-g"), s.client("adm")
    reported = []
    for body in ({"prefix": "default"}, {"prefix": "base"}, {"prefix": "default", "prompt": LONG}):
        r = gen(a, **body)
        assert r.status_code == 200, r.text
        reported.append(r.json()["usage"])
    # the same prompt again: its leading blocks come from the prompt cache
    again = gen(a, prefix="default", prompt=LONG).json()["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= 16
    assert reported[2]["prompt_tokens_details"]["cached_tokens"] == 0
    reported.append(again)
    comp = a.post("/v1/completions", json={"model": "acme/default", "prompt": LONG, "max_tokens": 3, "n": 2})
    assert comp.status_code == 200, comp.text
    cu = comp.json()["usage"]
    assert cu["prompt_tokens_details"]["cached_tokens"] >= 16  # the prompt was cached by the requests above
    assert gen(g, max_tokens=2).status_code == 200

    (mine,) = a.get("/usage").json()["data"]
    assert mine["tenant_id"] == "acme" and mine["requests"] == 5 and mine["completions"] == 6
    # n=2: the prompt counts once, as the response's usage says (Prometheus' prompt_tokens_total: per sample)
    want_prompt = sum(u["prompt_tokens"] for u in reported) + cu["prompt_tokens"]
    assert mine["prompt_tokens"] == want_prompt
    assert (
        mine["completion_tokens"] == sum(u["completion_tokens"] for u in reported) + cu["completion_tokens"]
    )
    assert mine["total_tokens"] == mine["prompt_tokens"] + mine["completion_tokens"]
    assert (
        mine["cached_tokens"]
        >= again["prompt_tokens_details"]["cached_tokens"] + cu["prompt_tokens_details"]["cached_tokens"]
    )
    assert mine["aborted"] == mine["failed"] == mine["rejected"] == 0
    assert set(mine["prefixes"]) == {"default", "base"}
    assert mine["prefixes"]["base"]["requests"] == 1 and mine["prefixes"]["default"]["requests"] == 4
    assert sum(p["prompt_tokens"] for p in mine["prefixes"].values()) == mine["prompt_tokens"]
    assert mine["limits"] == {
        "requests_per_minute": None,
        "tokens_per_minute": None,
        "max_concurrent": 64,
        "remaining_requests": None,
        "remaining_tokens": None,
        "in_flight": 0,
    }
    # a tenant sees only itself; the admin every tenant, or one
    assert_error(a.get("/usage", params={"tenant_id": "globex"}), 404, "tenant_not_found")
    assert [d["tenant_id"] for d in g.get("/usage").json()["data"]] == ["globex"]
    assert [d["tenant_id"] for d in adm.get("/usage").json()["data"]] == ["acme", "globex"]
    # (pages by tenant id: every tenant ever seen was one answer of megabytes)
    page = adm.get("/usage", params={"limit": 1}).json()
    assert (
        [d["tenant_id"] for d in page["data"]] == ["acme"] and page["has_more"] and page["last_id"] == "acme"
    )
    page = adm.get("/usage", params={"limit": 1, "after": "acme"}).json()
    assert [d["tenant_id"] for d in page["data"]] == ["globex"] and not page["has_more"]
    import prefixserve_client as ps

    with ps.Client(s.url, api_key="adm") as sdk:
        first = sdk.usage(limit=1)
        assert [d.tenant_id for d in first.data] == ["acme"] and first.has_more and first.last_id == "acme"
        assert [d.tenant_id for d in sdk.usage(limit=1, after=first.last_id).data] == ["globex"]
    assert adm.get("/usage", params={"tenant_id": "acme"}).json()["data"][0]["requests"] == 5
    for bad in ("..", ".", "a/b", "x" * 200):  # not a tenant id: 422, not an empty report of a made-up tenant
        assert_error(adm.get("/usage", params={"tenant_id": bad}), 422)
    assert_error(s.client().get("/usage"), 401)


def test_aborted_stream_and_failed_request_are_counted(server_factory):
    s = server_factory()
    slow_engine(s.svc, 0.02)
    c = s.client()
    body = {
        "tenant_id": "acme",
        "prefix": "base",
        "prompt": "Hi",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    seen = 0
    with c.stream("POST", "/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += len(json.loads(line[6:])["token_ids"])
                if seen >= 3:
                    break
    u = usage_once(c, "acme", lambda u: u["aborted"] == 1)
    assert u["aborted"] == 1 and u["completions"] == 1 and u["requests"] == 1
    assert seen <= u["completion_tokens"] < 200 and u["prompt_tokens"] > 0
    # a prefix that cannot be served: the request fails in the engine, no tokens counted
    s.svc.llm.prefix_cache.provider.fetch_digested = lambda key: (_ for _ in ()).throw(RuntimeError("broken"))
    from tests.fixtures.server import put_random_prefix

    put_random_prefix(s.store, s.state.bundle, "acme", "bad")
    assert gen(c, "acme", prefix="bad").status_code >= 500
    (u2,) = c.get("/usage", params={"tenant_id": "acme"}).json()["data"]
    assert (
        u2["failed"] == 1
        and u2["prompt_tokens"] == u["prompt_tokens"]
        and u2["prefixes"]["bad"]["failed"] == 1
    )
    assert u2["requests"] == u2["completions"] == 2  # the failed one is a request too, not only a completion
    # one that fails after generating (its grammar goes past the parser's limits mid-output): the caller got an
    # error, so none of its tokens count either, nor stay charged
    pytest.importorskip("llguidance")
    so = {"regex": "b{1,5}((a{60}){60}){60}"}
    body = {"tenant_id": "acme", "prefix": "base", "prompt": "Hi", "max_tokens": 50, "structured_outputs": so}
    assert_error(c.post("/generate", json=body), 422, "structured_output_failed")
    (u3,) = c.get("/usage", params={"tenant_id": "acme"}).json()["data"]
    assert u3["failed"] == 2 and u3["completion_tokens"] == u2["completion_tokens"]
    assert u3["prompt_tokens"] == u2["prompt_tokens"]


# ------------------------------------------------------------------------------------------ rate limits
def test_samples_of_one_prompt_bill_it_once_as_the_response_says(server_factory):
    """`n`, TGI's `best_of` and beam search run one engine request per sample: /usage billed the prompt n times
    while the response's usage (what a tenant adds up) says it once. Now both agree, per distinct prompt of a
    prompt list; Prometheus' prompt_tokens_total keeps counting it per sample, as vLLM's does."""
    from tests.fixtures.server import metric_value

    s = server_factory()
    c = s.client()

    def prom() -> float:
        return metric_value(c.get("/metrics").text, "prefixserve:prompt_tokens_total") or 0.0

    def mine() -> dict:
        (u,) = c.get("/usage", params={"tenant_id": "acme"}).json()["data"]
        return u

    before = prom()
    r = c.post("/v1/completions", json={"model": "acme/base", "prompt": ["Once upon", "a time there"],
                                        "max_tokens": 3, "n": 3, "seed": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    first = r.json()["usage"]
    u = mine()
    assert (
        u["prompt_tokens"] == first["prompt_tokens"] and u["completion_tokens"] == first["completion_tokens"]
    )
    assert u["requests"] == 1 and u["completions"] == 6
    assert prom() - before == 3 * first["prompt_tokens"]
    r = c.post("/v1/completions", json={"model": "acme/base", "prompt": "Hello", "max_tokens": 2, "n": 2,
                                        "use_beam_search": True})  # fmt: skip
    assert r.status_code == 200, r.text
    beams = r.json()["usage"]
    r = c.post("/generate", json={"tenant_id": "acme", "prefix": "base", "prompt": "Hello", "max_tokens": 2,
                                  "ignore_eos": True})  # fmt: skip
    alone = r.json()["usage"]
    u2 = mine()
    assert u2["prompt_tokens"] - u["prompt_tokens"] == beams["prompt_tokens"] + alone["prompt_tokens"]
    assert u2["completion_tokens"] - u["completion_tokens"] == (
        beams["completion_tokens"] + alone["completion_tokens"]
    )


def test_a_request_the_client_leaves_while_queued_is_an_aborted_completion(server_factory):
    """A request waiting for a batch row when its client gives up was counted as an abort by the metrics and
    charged to the rate limit, but /usage left it out (neither a request nor a completion): it is both, aborted,
    with no tokens."""
    import httpx

    from tests.fixtures.server import metric_value

    s = server_factory(max_num_seqs=1)
    slow_engine(s.svc, 0.02)
    c = s.client()
    long = {"tenant_id": "acme", "prefix": "base", "prompt": "Hi", "max_tokens": 150, "ignore_eos": True}
    holder = threading.Thread(target=lambda: c.post("/generate", json=long), daemon=True)
    holder.start()
    deadline = time.monotonic() + 10
    while s.svc.llm.num_running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    aborts = metric_value(
        c.get("/metrics").text, "prefixserve:request_success_total", {"finished_reason": "abort"}
    )
    for stream in (False, True):
        with pytest.raises(httpx.ReadTimeout):
            body = {**long, "tenant_id": "globex", "max_tokens": 5, "stream": stream}
            with httpx.Client(base_url=s.url, timeout=0.5) as quick:
                r = quick.post("/generate", json=body)
                r.read()
    u = usage_once(c, "globex", lambda u: u["aborted"] == 2)
    assert u["requests"] == u["completions"] == u["aborted"] == 2
    assert u["prompt_tokens"] == u["completion_tokens"] == u["failed"] == 0
    text = c.get("/metrics").text
    assert metric_value(text, "prefixserve:request_success_total", {"finished_reason": "abort"}) == aborts + 2
    holder.join(30)


def test_a_beam_search_left_mid_search_bills_what_it_ran(server_factory):
    """A beam search's choices have one event each, when the search ends: one its client left after many steps
    was metered as aborted completions of no tokens, its whole reservation refunded (beam searches cost nothing
    if left before their end). The prompt is billed once and each choice the tokens its beam had."""
    import httpx

    s = server_factory()
    slow_engine(s.svc, 0.02)
    c = s.client()
    body = {"model": "globex/base", "prompt": "Once upon a time", "max_tokens": 400, "n": 2,
            "use_beam_search": True, "ignore_eos": True}  # fmt: skip
    with httpx.Client(base_url=s.url, timeout=0.6) as quick, pytest.raises(httpx.ReadTimeout):
        quick.post("/v1/completions", json=body)
    u = usage_once(c, "globex", lambda u: u["completions"] == 2)
    assert u["requests"] == 1 and u["completions"] == u["aborted"] == 2
    whole = c.post("/v1/completions", json={**body, "max_tokens": 1}).json()["usage"]
    assert u["prompt_tokens"] == whole["prompt_tokens"]  # once, as a search run to its end bills it
    assert 2 <= u["completion_tokens"] < 2 * 400 and u["completion_tokens"] % 2 == 0


def test_a_beam_search_that_fails_after_some_rounds_costs_nothing(server_factory, tmp_path, monkeypatch):
    """A beam search answered with an error after some of its rounds ran (a 503 `prefix_changing`: its prefix's
    versions went away under it) counts as refused, as any failed request: nothing billed, its tokens and request
    given back (it was billed the rounds run while its request was refunded: a retry paid again)."""
    from server.api import beam as beam_mod
    from server.engine import TokenEvent

    f = tmp_path / "limits.json"
    f.write_text(json.dumps({"*": {"tokens_per_minute": 5000, "requests_per_minute": 100}}))
    s = server_factory(tenant_limits_file=str(f))
    s.svc.limiter.clock = Clock()
    real = s.svc.engine.generate

    def generate(req):
        if req.continuation and len(req.prompt_token_ids) >= 8:  # a later step: its prefix version is gone

            async def gone():
                yield TokenEvent(request_id=req.request_id, token_ids=[], text="", finished=True,
                                 finish_reason="error", error="gone", error_type="prefix_not_found")  # fmt: skip

            return gone()
        return real(req)

    async def same(self, ev):
        return self.prefix

    monkeypatch.setattr(s.svc.engine, "generate", generate)
    monkeypatch.setattr(beam_mod.BeamSearch, "_churned", lambda self, ev: True)
    monkeypatch.setattr(beam_mod.BeamSearch, "_newer_latest", same)
    c = s.client()
    body = {"model": "acme/base", "prompt": "Once upon a time", "max_tokens": 50, "n": 2,
            "use_beam_search": True, "ignore_eos": True}  # fmt: skip
    r = c.post("/v1/completions", json=body)
    assert_error(r, 503, "prefix_changing")
    assert r.headers["x-ratelimit-remaining-tokens"] == "5000"
    (u,) = c.get("/usage", params={"tenant_id": "acme"}).json()["data"]
    assert u["prompt_tokens"] == u["completion_tokens"] == u["completions"] == u["requests"] == 0
    assert u["limits"]["remaining_tokens"] == 5000 and u["limits"]["remaining_requests"] == 100


def test_requests_per_minute_429_with_retry_after_and_headers(server_factory):
    s = server_factory(keys={"acme": "k-a", "globex": "k-g"}, tenant_requests_per_minute=2)
    clock = Clock()
    s.svc.limiter.clock = clock
    a, g = s.client("k-a"), s.client("k-g")
    r = gen(a)
    assert r.status_code == 200
    assert (
        r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "1"
    )
    assert "x-ratelimit-limit-tokens" not in r.headers  # no token limit configured
    assert gen(a, stream=True).headers["x-ratelimit-remaining-requests"] == "0"  # streams carry them too
    err = assert_error(gen(a), 429, "rate_limit_exceeded")
    assert "2 requests per minute" in err["message"]
    limited = gen(a)
    assert 25 <= int(limited.headers["retry-after"]) <= 30  # one request refills in 30 s
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert gen(g).status_code == 200  # other tenants have their own budget
    clock.t += 30
    assert gen(a).status_code == 200
    (u,) = a.get("/usage").json()["data"]
    assert u["rejected"] == 2 and u["requests"] == 3 and u["limits"]["remaining_requests"] == 0
    m = s.client("k-a").get("/metrics").text
    assert 'prefixserve:requests_rejected_total{reason="rate_limit"} 2.0' in m


def test_tokens_per_minute_charges_prompt_plus_max_tokens_and_refunds_the_rest(server_factory, tmp_path):
    f = tmp_path / "limits.json"
    f.write_text(json.dumps({"acme": {"tokens_per_minute": 200}}))
    s = server_factory(tenant_limits_file=str(f))
    clock = Clock()
    s.svc.limiter.clock = clock
    c = s.client()
    p = c.post(
        "/tokenize", json={"tenant_id": "acme", "prefix": "base", "prompt": "Once upon a time"}
    ).json()["count"]
    # the third greedy token (from an unlimited tenant) ends acme's request early
    ids = [lp["id"] for lp in gen(c, "probe", max_tokens=3, logprobs=0).json()["logprobs"]]
    err = assert_error(gen(c, "acme", max_tokens=300), 413, "tokens_per_minute_exceeded")  # can never fit
    assert err["param"] == "max_tokens"
    r = gen(c, "acme", max_tokens=100, ignore_eos=False, stop_token_ids=[ids[2]])
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit-tokens"] == "200"
    assert r.headers["x-ratelimit-remaining-tokens"] == str(
        200 - p - 100
    )  # the reservation, taken at admission
    u = r.json()["usage"]
    assert u["prompt_tokens"] == p and u["completion_tokens"] == 3
    (rep,) = c.get("/usage", params={"tenant_id": "acme"}).json()["data"]
    assert rep["limits"]["remaining_tokens"] == 200 - p - 3  # after the run, only what it used stays charged
    left = 200 - p - 3
    big = gen(c, "acme", max_tokens=left)  # prompt + left > left: refused, Retry-After until it fits
    assert big.status_code == 429 and int(big.headers["retry-after"]) == -(-p * 60 // 200)
    clock.t += 60
    assert gen(c, "acme", max_tokens=left).status_code == 200
    # n samples are charged together, their prompt once (OpenAI's prompt + n x max_tokens, as the response's
    # usage bills it): more than the whole budget is a 413, less but more than is left a 429, and either way
    # nothing is taken
    clock.t += 60
    m = (200 - p) // 3 + 1
    body = {"model": "acme/base", "prompt": "Once upon a time", "max_tokens": m, "n": 3, "ignore_eos": True}
    assert_error(c.post("/v1/completions", json=body), 413, "tokens_per_minute_exceeded")
    r = c.post("/v1/completions", json={**body, "n": 2})
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == str(200 - p - 2 * m)
    assert remaining(c, "acme") == 200 - p - 2 * m  # all of it used: the prompt once
    assert_error(c.post("/v1/completions", json={**body, "n": 2}), 429, "rate_limit_exceeded")
    clock.t += 60
    assert remaining(c, "acme") == 200
    # refused after it was charged (the engine refuses it): its headers show the refund, not the charge
    real = s.svc.llm.validate

    def refuse(req, **kw):
        raise ValueError("refused by the engine")

    s.svc.llm.validate = refuse
    try:
        r = c.post("/v1/completions", json={**body, "n": 2})  # (its prompt, charged once, comes back too)
    finally:
        s.svc.llm.validate = real
    assert_error(r, 400)
    assert r.headers["x-ratelimit-remaining-tokens"] == "200" and remaining(c, "acme") == 200
    (rep,) = c.get("/usage", params={"tenant_id": "acme"}).json()["data"]
    assert rep["rejected"] == 2 and rep["limits"]["tokens_per_minute"] == 200  # the two 429s
    # echo with max_tokens 0 (lm-eval's scoring): the prompt is billed, the one token run to score it is not
    score = {"model": "acme/base", "prompt": "Once upon a time", "echo": True, "max_tokens": 0, "logprobs": 0}
    r = c.post("/v1/completions", json=score)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0
    assert remaining(c, "acme") == 200 - p
    clock.t += 60
    r = c.post("/v1/completions", json={**score, "n": 3})  # (the prompt once for its samples)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == p
    assert remaining(c, "acme") == 200 - p
    (after,) = c.get("/usage", params={"tenant_id": "acme"}).json()["data"]
    assert (
        after["completion_tokens"] == rep["completion_tokens"]
        and after["prompt_tokens"] == rep["prompt_tokens"] + 2 * p
    )
    assert (
        c.get("/usage", params={"tenant_id": "probe"}).json()["data"][0]["limits"]["remaining_tokens"] is None
    )


def test_per_tenant_overrides_from_the_limits_file(server_factory, tmp_path):
    f = tmp_path / "limits.json"
    f.write_text(
        json.dumps(
            {
                "*": {"requests_per_minute": 1},
                "vip": {"requests_per_minute": None},
                "solo": {"max_concurrent": 1, "requests_per_minute": None},
                "duo": {"max_concurrent": 2, "requests_per_minute": 100, "tokens_per_minute": 1000},
            }
        )
    )
    s = server_factory(tenant_limits_file=str(f))
    s.svc.limiter.clock = Clock()
    c = s.client()
    assert gen(c, "acme").status_code == 200
    assert_error(gen(c, "acme"), 429, "rate_limit_exceeded")
    for _ in range(3):
        assert gen(c, "vip").status_code == 200
    slow_engine(s.svc, 0.02)

    def in_background(tenant: str) -> tuple[threading.Thread, list[int]]:
        out: list[int] = []
        t = threading.Thread(target=lambda: out.append(gen(c, tenant, max_tokens=60).status_code))
        t.start()
        deadline = time.monotonic() + 10
        while s.svc.in_flight(tenant) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return t, out

    t, out = in_background("solo")
    assert_error(gen(c, "solo"), 429, "tenant_concurrency_limit")
    err = assert_error(c.post("/v1/completions", json={"model": "solo/base", "prompt": "Hi", "n": 2}), 400)
    assert err["code"] == "too_many_choices" and "1 requests" in err["message"]  # the tenant's own limit
    t.join(30)
    assert out == [200]
    # two samples where one slot is left: refused, and neither the request nor its samples' tokens stay charged
    t, out = in_background("duo")

    def budget() -> tuple[int, int]:
        lim = c.get("/usage", params={"tenant_id": "duo"}).json()["data"][0]["limits"]
        return lim["remaining_requests"], lim["remaining_tokens"]

    before = budget()  # the clock stands still
    assert before[0] == 99 and before[1] < 1000
    body = {"model": "duo/base", "prompt": "Hi", "max_tokens": 5, "n": 2}
    assert_error(c.post("/v1/completions", json=body), 429, "tenant_concurrency_limit")
    assert budget() == before
    t.join(30)
    assert out == [200]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1]", "expected a JSON object"),
        ('{"acme": {"requests_per_minute": 0}}', "positive integer"),
        ('{"acme": {"rpm": 5}}', "unknown field"),
        ("{nope", "tenant limits file"),
    ],
)
def test_bad_limits_file_fails_at_start(tmp_path, match, text):
    from server.api import create_app
    from server.settings import Settings

    f = tmp_path / "limits.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        create_app(Settings(tenant_limits_file=f, store_url=f"file://{tmp_path}/s"))


# ------------------------------------------------------------------------------------------ units
def test_bucket_refills_at_its_rate_and_caps_refunds():
    b = Bucket(60, now=0.0)  # one unit a second
    assert b.wait(60) == 0.0
    b.add(-60)
    assert b.level == 0
    assert b.refill(2.0) == pytest.approx(2.0) and b.wait(5) == pytest.approx(3.0)  # 3 more seconds for 5
    b.add(1000)
    assert b.level == 60  # never above capacity


DEFAULT_LIMIT = TenantLimit(requests_per_minute=10, max_concurrent=8)
OVERRIDES = {"*": {"tokens_per_minute": 100}, "big": {"tokens_per_minute": 1000, "requests_per_minute": None}}


def test_rate_limiter_overrides_and_headers():
    clock = Clock()
    rl = RateLimiter(DEFAULT_LIMIT, parse_limits(OVERRIDES, "x"), clock)

    async def main() -> None:
        assert rl.limit("any") == TenantLimit(10, 100, 8) and rl.limit("big") == TenantLimit(None, 1000, 8)
        h = await rl.charge("any", 60)
        assert h["x-ratelimit-limit-tokens"] == "100" and h["x-ratelimit-remaining-tokens"] == "40"
        assert h["x-ratelimit-limit-requests"] == "10" and h["x-ratelimit-remaining-requests"] == "9"
        with pytest.raises(APIError) as e:
            await rl.charge("any", 60)  # tokens short: 20 missing at 100/60 a second; nothing taken
        assert e.value.status == 429 and e.value.headers["Retry-After"] == "12"
        assert e.value.headers["x-ratelimit-remaining-requests"] == "9"
        await rl.refund("any", 30, requests=1)  # a request refused after its charge is given back
        assert (await rl.state("any"))["remaining_requests"] == 10
        await rl.charge("any", 0)  # (back to where it was)
        h = await rl.charge("any", 60)
        assert h["x-ratelimit-remaining-tokens"] == "10" and h["x-ratelimit-reset-tokens"] == "54s"
        with pytest.raises(APIError) as e:
            await rl.charge("any", 101)  # more than the whole budget: never fits
        assert e.value.status == 413 and e.value.code == "tokens_per_minute_exceeded"
        for _ in range(8):
            await rl.charge("any", 0)
        with pytest.raises(APIError) as e:  # the 11th request in the minute
            await rl.charge("any", 0)
        assert e.value.code == "rate_limit_exceeded" and "10 requests per minute" in e.value.message
        state = await rl.state("any")
        assert state["remaining_requests"] == 0 and state["remaining_tokens"] == 10
        assert "x-ratelimit-limit-requests" not in await rl.charge("big", 5)
        for _ in range(100):
            await rl.charge("big", 1)  # no request limit
        assert (await rl.state("big"))["remaining_requests"] is None
        clock.t += 30  # half a minute refills half of each budget
        state = await rl.state("any")
        assert state["remaining_requests"] == 5 and state["remaining_tokens"] == 60

    asyncio.run(main())
    assert _duration(0.04) == "0.1s" and _duration(360) == "6m0s" and _duration(61.2) == "1m2s"
    with pytest.raises(ValueError, match="unknown field"):
        parse_limits({"a": {"tpm": 1}}, "x")
    with pytest.raises(ValueError, match="'bad tenant!' is not a tenant id"):  # it would apply to nobody
        parse_limits({"bad tenant!": {"max_concurrent": 1}}, "x")


def test_star_defaults_apply_under_a_tenant_override():
    """A tenant's override changes only the fields it names; the others come from "*", not the built-in default."""
    rl = RateLimiter(
        TenantLimit(),
        parse_limits(
            {"*": {"tokens_per_minute": 100, "max_concurrent": 4}, "acme": {"requests_per_minute": 5}}, "x"
        ),
    )
    assert rl.limit("acme") == TenantLimit(5, 100, 4)


def test_a_request_of_exactly_the_whole_token_budget_fits():
    rl = RateLimiter(TenantLimit(tokens_per_minute=100), {})
    h = asyncio.run(rl.charge("t", 100))
    assert h["x-ratelimit-remaining-tokens"] == "0"


def test_a_reloaded_limit_takes_effect_for_a_tenant_already_seen():
    """`reconfigure` (a limits reload) applies to tenants whose buckets already exist, not only to new ones."""
    rl = RateLimiter(TenantLimit(tokens_per_minute=100), {})

    async def main():
        await rl.charge("t", 90)
        rl.reconfigure(TenantLimit(tokens_per_minute=1000), {})
        h = await rl.charge("t", 500)
        assert h["x-ratelimit-limit-tokens"] == "1000"

    asyncio.run(main())


def test_redis_rate_limiter_shares_budgets_and_falls_back_when_redis_is_down(redis_store_url):
    """The buckets in Redis: two limiters (two replicas) draw on one budget, refunds and request limits included;
    with Redis gone each counts alone instead of refusing work. (Redis keeps the time: budgets refill while the
    test runs, 100 tokens and 10 requests a minute, hence the ranges.)"""
    from server.api.limits import RedisRateLimiter

    async def main() -> None:
        a = RedisRateLimiter(redis_store_url, DEFAULT_LIMIT, parse_limits(OVERRIDES, "x"))
        b = RedisRateLimiter(redis_store_url, DEFAULT_LIMIT, parse_limits(OVERRIDES, "x"))
        try:
            h = await a.charge("any", 60)
            assert h["x-ratelimit-remaining-tokens"] == "40" and h["x-ratelimit-remaining-requests"] == "9"
            with pytest.raises(APIError) as e:  # replica b sees replica a's spending
                await b.charge("any", 60)
            assert e.value.status == 429 and 8 <= int(e.value.headers["Retry-After"]) <= 12
            assert 40 <= (await b.state("any"))["remaining_tokens"] <= 45
            await b.refund("any", 30)
            assert 70 <= (await a.state("any"))["remaining_tokens"] <= 75
            await a.refund("any", 0, requests=5)  # a refund never lifts a budget above its capacity
            assert (await b.state("any"))["remaining_requests"] == 10
            await a.charge("any", 0)
            for _ in range(9):
                await (a if _ % 2 else b).charge("any", 0)
            with pytest.raises(APIError) as e:
                await a.charge("any", 0)
            assert e.value.code == "rate_limit_exceeded" and "requests per minute" in e.value.message
            with pytest.raises(APIError) as e:
                await b.charge("any", 101)
            assert e.value.status == 413
            assert (await a.state("big"))["remaining_requests"] is None
            # both budgets short at once: Retry-After is the longer wait (1 request a minute: ~60 s, not the
            # tokens' 12 s), as the local limiter says, or a client that honours it only comes back to a 429
            slow = {"slow": {"requests_per_minute": 1, "tokens_per_minute": 100}}
            for rl in (RedisRateLimiter(redis_store_url, DEFAULT_LIMIT, parse_limits(slow, "x")),
                       RateLimiter(DEFAULT_LIMIT, parse_limits(slow, "x"))):  # fmt: skip
                await rl.charge("slow", 60)
                with pytest.raises(APIError) as e:
                    await rl.charge("slow", 60)
                assert 55 <= int(e.value.headers["Retry-After"]) <= 60, (rl, e.value.headers)
                await rl.close()
        finally:
            await a.close()
            await b.close()
        down = RedisRateLimiter("redis://127.0.0.1:1/0", DEFAULT_LIMIT, parse_limits(OVERRIDES, "x"))
        assert (await down.charge("any", 60))["x-ratelimit-remaining-tokens"] == "40"  # its own buckets
        with pytest.raises(APIError):
            await down.charge("any", 60)
        await down.close()

    asyncio.run(main())


def test_redis_buckets_survive_the_redis_clock_stepping_back(redis_store_url):
    """The buckets refill by Redis' clock (TIME): stepped back (an NTP step, a failover to a replica whose clock is
    behind) below a bucket's last write, the refill went negative: each bucket lost step x capacity / 60 (an hour:
    every active tenant refused for an hour, `Retry-After: 3541`), and a level below zero read as "no limit". A step
    back now refills nothing for that charge and counts on from the new time."""
    import redis as redis_sync

    from prefix_store.redis_store import split_url
    from server.api.limits import RedisRateLimiter

    async def main():
        rl = RedisRateLimiter(redis_store_url, TenantLimit(requests_per_minute=10, tokens_per_minute=1000))
        r = redis_sync.Redis.from_url(split_url(redis_store_url)[0])
        try:
            await rl.charge("back", 400)
            for kind in ("requests", "tokens"):  # as if Redis' clock went an hour back after that write
                key = rl._key("back", kind)
                r.hset(key, "ts", str(float(r.hget(key, "ts")) + 3600))
            h = await rl.charge("back", 100)  # refused with a Retry-After of ~an hour before
            assert (
                h["x-ratelimit-remaining-tokens"] == "500" and h["x-ratelimit-remaining-requests"] == "8"
            ), h
            left = await rl.state("back")
            assert 500 <= left["remaining_tokens"] <= 600 and left["remaining_requests"] == 8, left
            r.hset(
                rl._key("back", "tokens"), "level", "-50000"
            )  # left so by an older build: empty, not -50000
            h = await rl.charge("back", 0)
            assert 0 <= int(h["x-ratelimit-remaining-tokens"]) <= 100, h
        finally:
            await rl.close()
            r.close()

    asyncio.run(main())


def test_redis_buckets_refill_at_capacity_per_minute(redis_store_url):
    from server.api.limits import RedisRateLimiter

    async def main():
        rl = RedisRateLimiter(redis_store_url, TenantLimit(tokens_per_minute=600_000))  # 10,000 a second
        try:
            await rl.charge("t", 600_000)
            await asyncio.sleep(0.5)
            left = (await rl.state("t"))["remaining_tokens"]
            assert 4_000 <= left <= 9_000, left
        finally:
            await rl.close()

    asyncio.run(main())


def test_redis_down_is_not_asked_again_within_the_fallback_window(monkeypatch):
    """Once Redis failed, the limiter counts locally for a while instead of trying Redis on every request."""
    from server.api.limits import RedisRateLimiter

    async def main():
        rl = RedisRateLimiter("redis://127.0.0.1:18099/0", TenantLimit(tokens_per_minute=100))
        calls = []

        async def failing(**kw):
            calls.append(1)
            raise ConnectionError("down")

        rl._script = failing
        await rl.charge("t", 10)
        await rl.charge("t", 10)
        await rl.charge("t", 10)
        assert len(calls) == 1
        await rl.close()

    asyncio.run(main())


def test_sdk_usage_and_cached_tokens(server_factory):
    import prefixserve_client as ps

    s = server_factory(keys={"acme": "k-a"}, admin_key="adm", tenant_tokens_per_minute=5000)
    s.svc.limiter.clock = Clock()
    with ps.Client(s.url, api_key="k-a") as c:
        g1 = c.generate("acme", LONG, prefix="base", max_tokens=4)
        g2 = c.generate("acme", LONG, prefix="base", max_tokens=4)
        assert g1.usage.cached_tokens == 0 and g2.usage.cached_tokens >= 16
        rep = c.usage()
        assert isinstance(rep, ps.UsageReport) and rep.since <= time.time()
        (u,) = rep.data
        assert isinstance(u, ps.TenantUsage) and u.tenant_id == "acme" and u.requests == 2
        assert u.prompt_tokens == g1.usage.prompt_tokens + g2.usage.prompt_tokens
        assert u.cached_tokens == g2.usage.cached_tokens and u.prefixes["base"].completion_tokens == 8
        assert u.limits.tokens_per_minute == 5000 and u.limits.remaining_tokens == 5000 - u.total_tokens
        with pytest.raises(ps.NotFound):
            c.usage("globex")

    async def main() -> None:
        async with ps.AsyncClient(s.url, api_key="adm") as a:
            assert [t.tenant_id for t in (await a.usage()).data] == ["acme"]

    import asyncio

    asyncio.run(main())


def test_redis_usage_counts_of_tenants_named_like_its_bookkeeping_keys(redis_store_url):
    """Tenant ids `tenants` and `since` are valid: their counters must not land on the set of tenants or the start
    time (a WRONGTYPE there made every flush fail after applying part of it, counting the others' again each
    second); a refused transaction is not sent again."""
    import redis as sync_redis

    from prefix_store.redis_store import split_url
    from server.api.usage import RedisUsageMeter

    async def main() -> None:
        meter = RedisUsageMeter(redis_store_url)
        try:
            for tenant in ("acme", "tenants", "since"):
                meter.request(tenant, None)
            meter.request("acme", "faq")
            await meter.flush()
            await meter.flush()  # nothing pending: nothing added
            assert await meter.tenants() == ["acme", "since", "tenants"]
            assert isinstance(await meter.since(), float)
            reports = {t: await meter.report(t) for t in ("acme", "tenants", "since")}
            assert [reports[t]["requests"] for t in ("acme", "tenants", "since")] == [2, 1, 1]
            assert reports["acme"]["prefixes"]["faq"]["requests"] == 1
            # a key of the wrong type where a tenant's counts go: redis applies the rest and refuses that one
            client_url, ns = split_url(redis_store_url)
            r = sync_redis.Redis.from_url(client_url)
            r.set(f"{ns}:usage:tenant:initech", "not a hash")
            meter.request("initech", None)
            meter.request("acme", None)
            with pytest.raises(sync_redis.ResponseError):
                await meter.flush()
            await meter.flush()
            await meter.flush()
            assert (await meter.report("acme"))["requests"] == 3  # once, not at every flush
            r.close()
        finally:
            await meter.close()

    asyncio.run(main())


def test_redis_usage_counts_survive_a_read_only_window(redis_server_factory):
    """A Redis that refuses writes as a whole (a replica during failover, out of memory) applies nothing: the counts
    stay pending and are sent once it takes writes again (only a part-applied transaction drops its counts)."""
    import redis as sync_redis

    from server.api.usage import RedisUsageMeter

    srv = redis_server_factory
    r = sync_redis.Redis.from_url(srv.url)

    async def main() -> None:
        meter = RedisUsageMeter(srv.url)
        try:
            meter.request("acme", None)
            await meter.flush()
            r.replicaof("127.0.0.1", 1)  # read-only: a replica of nobody reachable
            meter.request("acme", None)
            meter.request("acme", None)
            with pytest.raises(sync_redis.ReadOnlyError):
                await meter.flush()
            r.replicaof("NO", "ONE")
            await meter.flush()
            assert (await meter.report("acme"))["requests"] == 3
        finally:
            await meter.close()

    try:
        asyncio.run(main())
    finally:
        r.close()


def test_redis_usage_counts_once_when_redis_stalls_past_the_timeout(redis_server_factory):
    """A flush whose reply times out while Redis stalls still runs when Redis wakes up: sent again, it must not be
    counted twice (every stall over a second used to double the counts of the batch in flight)."""
    import threading

    import redis as sync_redis

    from server.api.usage import RedisUsageMeter

    srv = redis_server_factory
    r = sync_redis.Redis.from_url(srv.url, socket_timeout=10)

    async def main() -> None:
        meter = RedisUsageMeter(srv.url, timeout_s=0.3)
        try:
            meter.request("acme", None)
            await meter.flush()  # (a connection open before the stall: the batch reaches Redis)
            for _ in range(5):
                meter.request("acme", "faq")
            stall = threading.Thread(target=r.execute_command, args=("DEBUG", "SLEEP", "1.5"))
            stall.start()
            await asyncio.sleep(0.2)
            with pytest.raises(sync_redis.TimeoutError):
                await meter.flush()  # Redis has the batch; the reply is lost
            meter.request("acme", None)  # counted meanwhile
            stall.join()
            await meter.flush()
            await meter.flush()
            got = await meter.report("acme")
            assert (got["requests"], got["prefixes"]["faq"]["requests"]) == (7, 5), got
        finally:
            await meter.close()

    try:
        asyncio.run(main())
    finally:
        r.close()


def test_usage_and_rate_limits_reconnect_at_once_after_a_redis_restart(redis_server_factory):
    """Connections opened before Redis restarted are stale: the next command reconnects once instead of failing
    (a 503 on /usage while /ready said 200; a rate limiter counting alone for seconds, its shared budget then per
    replica)."""
    from server.api.limits import RedisRateLimiter
    from server.api.usage import RedisUsageMeter

    srv = redis_server_factory
    limited = parse_limits({"acme": {"requests_per_minute": 10}}, "x")

    async def main() -> None:
        meter, limiter = RedisUsageMeter(srv.url), RedisRateLimiter(srv.url, DEFAULT_LIMIT, limited)
        try:
            meter.request("acme", None)
            await meter.flush()
            await limiter.charge("acme", 0)
            srv.kill()
            srv.start()  # (AOF: the counts and buckets survive)
            assert (await meter.report("acme"))["requests"] == 1
            h = await limiter.charge("acme", 0)
            assert limiter._down_until == 0.0 and h["x-ratelimit-remaining-requests"] == "8"
        finally:
            await meter.close()
            await limiter.close()

    asyncio.run(main())


def test_redis_usage_since_is_the_first_replicas_start(redis_store_url):
    """Replicas sharing Redis report one `since`, the start recorded by the first to flush (here the replica that
    started earlier), not each replica's own start."""
    from server.api.usage import RedisUsageMeter

    async def main():
        a, b = RedisUsageMeter(redis_store_url), RedisUsageMeter(redis_store_url)
        b._since = a._since + 100.0  # started later (a restart)
        try:
            a.request("t", None)
            await a.flush()
            b.request("t", None)
            await b.flush()
            assert await a.since() == pytest.approx(a._since, abs=1e-3) and await b.since() == pytest.approx(
                a._since, abs=1e-3
            )
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_redis_usage_report_includes_what_was_just_counted(redis_store_url):
    """A report includes what was counted just before it, not yet flushed to Redis."""
    from server.api.usage import RedisUsageMeter

    async def main():
        m = RedisUsageMeter(redis_store_url)
        try:
            m.request("t", "p")
            m.completion("t", "p", "stop", 5, 2, 3)
            r = await m.report("t")
            assert (r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"]) == (
                1,
                5,
                3,
                2,
            )
        finally:
            await m.close()

    asyncio.run(main())


def test_replicas_share_rate_limits_and_usage_through_redis(server_factory, redis_store_url):
    """limits_url: two servers draw on one budget and add to one set of usage counts, which outlive a restart;
    with that Redis down, requests are still served (each replica counting alone) and /usage is a 503."""
    one = server_factory(limits_url=redis_store_url, tenant_requests_per_minute=3)
    two = server_factory(limits_url=redis_store_url, tenant_requests_per_minute=3)
    c1, c2 = one.client(), two.client()
    assert gen(c1, "acme").status_code == 200
    assert gen(c2, "acme").status_code == 200
    r = gen(c1, "acme")
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert_error(gen(c2, "acme"), 429, "rate_limit_exceeded")  # the third was spent on the other replica
    assert gen(c2, "globex").status_code == 200
    # the other replica flushes its counts within a second
    u = usage_once(c2, "acme", lambda u: u["requests"] == 3)
    assert u["requests"] == 3 and u["completions"] == 3 and u["rejected"] == 1  # both replicas' counts
    assert u["completion_tokens"] == 3 * 6 and u["limits"]["remaining_requests"] == 0
    since = c1.get("/usage").json()["since"]
    assert {d["tenant_id"] for d in c1.get("/usage").json()["data"]} == {"acme", "globex"}
    one.stop()
    two.stop()
    three = server_factory(limits_url=redis_store_url)  # a restart: the counts are still there
    body = three.client().get("/usage", params={"tenant_id": "acme"}).json()
    assert body["data"][0]["requests"] == 3 and body["since"] == since
    dead = server_factory(limits_url="redis://127.0.0.1:1/0", tenant_requests_per_minute=100)
    d = dead.client()
    assert gen(d, "acme").status_code == 200
    assert_error(d.get("/usage"), 503, "store_unavailable")


def test_a_stream_left_early_refunds_its_unused_tokens_when_the_limiter_awaits(server_factory, tmp_path):
    """A client that leaves a stream: each run's close gives back the tokens it did not use, also when the limiter
    suspends to do it (Redis's does): Starlette closes the body in the cancelled scope of the disconnect, where
    such an await raised at once, and the refund (and the closing of the other choices) was lost."""
    import httpx

    f = tmp_path / "limits.json"
    f.write_text(json.dumps({"acme": {"tokens_per_minute": 1_000}}))
    s = server_factory(tenant_limits_file=str(f))
    slow_engine(s.svc, 0.02)
    lim = s.svc.limiter
    apply = lim._apply

    async def suspending(*a, **kw):
        await asyncio.sleep(0.01)
        return await apply(*a, **kw)

    lim._apply = suspending
    lim.clock = Clock()  # no refill meanwhile
    body = {
        "model": "acme/base",
        "prompt": "x",
        "n": 2,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=s.url, timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    c = s.client()
    deadline = time.monotonic() + 10
    while (s.svc.llm.num_running or remaining(c, "acme") < 900) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.svc.llm.num_running == 0
    # charged 2 x (prompt + 400) at admission; after the close only what the two choices used stays charged
    assert remaining(c, "acme") >= 900


def test_full_rate_limit_buckets_are_forgotten():
    """A bucket untouched for a minute has refilled to capacity, what a new tenant gets: forgotten (every tenant id
    ever seen kept its buckets for ever), the others kept with their levels."""
    import asyncio

    from server.api.limits import RateLimiter, TenantLimit

    now = [0.0]
    lim = RateLimiter(TenantLimit(requests_per_minute=10, tokens_per_minute=1000), clock=lambda: now[0])

    async def scenario() -> None:
        for i in range(200):
            await lim.charge(f"t{i}", 10)
        assert len(lim._requests) == len(lim._tokens) == 200
        now[0] = 61.0  # all refilled but t-busy's, charged just now
        for _ in range(9):
            await lim.charge("busy", 100)
        assert len(lim._requests) == 1 and (await lim.state("busy"))["remaining_requests"] == 1
        now[0] = 62.0  # busy was touched a second ago: kept
        await lim.state("other")
        assert list(lim._tokens) == ["busy", "other"]
        now[0] = 121.5  # busy idle for a minute, other not yet
        await lim.state("third")
        assert list(lim._tokens) == ["other", "third"]

    asyncio.run(scenario())
    # what makes forgetting exact: a minute refills a bucket to exactly its capacity (60 x (123 / 60) < 123)
    b = Bucket(123, 0.0)
    b.add(-123)
    assert b.refill(60.0) == 123


@pytest.mark.parametrize("seed", range(4))
def test_forgetting_rate_limit_buckets_changes_no_answer(seed):
    """Random charges, refunds and reads of many tenants at random times, from a limiter that forgets idle
    buckets and one that never does: the same answer (headers, 429s with their Retry-After, states) every time;
    and the forgetting one holds only the tenants touched in the last minute."""
    import asyncio
    import random

    from server.api.errors import APIError
    from server.api.limits import FORGET_AFTER_S, RateLimiter, TenantLimit

    class Keeping(RateLimiter):
        def _sweep(self, now: float) -> None:
            pass

    rng = random.Random(seed)
    now = [0.0]
    default = TenantLimit(requests_per_minute=5, tokens_per_minute=300)
    # 123 a minute: 60 x (123 / 60) < 123, a bucket a minute idle is full all the same
    overrides = {
        "t0": {"tokens_per_minute": None},
        "t1": {"requests_per_minute": 2},
        "t2": {"tokens_per_minute": 123},
    }
    forgetting = RateLimiter(default, overrides, clock=lambda: now[0])
    keeping = Keeping(default, overrides, clock=lambda: now[0])
    touched: dict[str, float] = {}

    async def step(lim: RateLimiter, op: str, tenant: str, n: int) -> object:
        try:
            if op == "charge":
                return await lim.charge(tenant, n)
            if op == "refund":
                return await lim.refund(tenant, n, requests=n % 2)
            return await lim.state(tenant)
        except APIError as e:
            return (e.status, e.headers)

    async def scenario() -> None:
        for _ in range(600):
            now[0] += rng.choice([0.0, 0.5, 3.0, 20.0, 59.9, 60.0, 75.0])
            tenant, n = f"t{rng.randrange(12)}", rng.randrange(120)
            op = rng.choice(["charge", "charge", "refund", "state"])
            assert await step(forgetting, op, tenant, n) == await step(keeping, op, tenant, n), (
                op,
                tenant,
                n,
            )
            touched[tenant] = now[0]
            recent = {t for t, at in touched.items() if now[0] - at < FORGET_AFTER_S}
            assert set(forgetting._requests) <= recent and set(forgetting._tokens) <= recent

    asyncio.run(scenario())
