"""vLLM's request parameters on every generation route: min_p, include_stop_str_in_output, truncate_prompt_tokens and
priority, and TGI's typical_p (with the tenant's tier from the limits file)."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.server import assert_error

WORDS = " ".join(f"w{i}" for i in range(60))


@pytest.fixture
def srv(server_factory, tmp_path):
    f = tmp_path / "limits.json"
    f.write_text(json.dumps({"vip": {"priority": -10}, "batch": {"priority": 7}}))
    return server_factory(
        keys={"acme": "k-a", "vip": "k-v", "batch": "k-b"},
        admin_key="adm",
        tenant_limits_file=str(f),
        max_prompt_tokens=40,
    )


def generate(c, **kw):
    body = {"prefix": "base", "prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True, **kw}
    r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_min_p_reaches_the_sampler_on_every_route(srv):
    c = srv.client("k-a")
    greedy = generate(c)["text"]
    hot = dict(temperature=3.0, seed=11)
    assert generate(c, **hot)["text"] != greedy  # this temperature wanders off ...
    assert generate(c, **hot, min_p=1.0)["text"] == greedy  # ... unless only the most likely token is left
    body = {"model": "acme/base", "prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True, **hot}
    comp = c.post("/v1/completions", json={**body, "min_p": 1.0}).json()["choices"][0]["text"]
    plain = c.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    assert comp == plain
    assert_error(c.post("/generate", json={"prompt": "x", "prefix": "base", "min_p": 1.5}), 422)


def test_typical_p_reaches_the_sampler(srv):
    """TGI's typical_p on /generate and (an extension) /v1: with a tiny mass one token is left at each step (the
    one whose surprisal is closest to the entropy), so any seed gives the same text; out of (0, 1] is a 422."""
    c = srv.client("k-a")
    hot = [generate(c, temperature=3.0, seed=s)["text"] for s in (1, 2)]
    assert hot[0] != hot[1]
    narrow = [generate(c, temperature=3.0, seed=s, typical_p=1e-9)["text"] for s in (1, 2)]
    assert narrow[0] == narrow[1]
    body = {"model": "acme/base", "prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True}
    for seed in (3, 4):
        r = c.post("/v1/completions", json={**body, "temperature": 3.0, "seed": seed, "typical_p": 1e-9})
        assert r.json()["choices"][0]["text"] == narrow[0], r.text
    for bad in (0, 1.5):
        err = assert_error(c.post("/generate", json={"prompt": "x", "prefix": "base", "typical_p": bad}), 422)
        assert "typical_p" in json.dumps(err)


def test_include_stop_str_in_output(srv):
    c = srv.client("k-a")
    text = generate(c, max_tokens=16)["text"]
    stop = next(
        text[i : i + 2]
        for i in range(2, len(text) - 2)
        if text[i : i + 2].strip() and text.find(text[i : i + 2]) == i
    )
    cut = text.index(stop)
    assert generate(c, max_tokens=16, stop=[stop])["text"] == text[:cut]
    assert generate(c, max_tokens=16, stop=[stop], include_stop_str_in_output=True)["text"] == text[: cut + 2]
    body = {
        "model": "acme/base",
        "prompt": "Once upon a time",
        "max_tokens": 16,
        "ignore_eos": True,
        "stop": [stop],
        "temperature": 0,
    }
    r = c.post("/v1/completions", json={**body, "include_stop_str_in_output": True, "stream": True})
    chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == text[: cut + 2]
    # vLLM's stop_reason: the stop string matched (on the last chunk of a stream), null for a length cut
    assert [ch["choices"][0]["stop_reason"] for ch in chunks] == [None] * (len(chunks) - 1) + [stop]
    assert c.post("/v1/completions", json=body).json()["choices"][0]["stop_reason"] == stop
    assert c.post("/v1/completions", json={**body, "stop": []}).json()["choices"][0]["stop_reason"] is None
    assert generate(c, max_tokens=16, stop=["\u2603", stop])["stop_reason"] == stop
    chat = {
        "model": "acme/base",
        "messages": [{"role": "user", "content": "Once upon a time"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    said = c.post("/v1/chat/completions", json={**chat, "ignore_eos": True}).json()["choices"][0]
    assert said["stop_reason"] is None and said["finish_reason"] == "length"
    words = said["message"]["content"]
    two = next(
        ch for i, ch in enumerate(words) if i and ch.isascii() and ch.isprintable() and words.find(ch) == i
    )
    stopped = c.post("/v1/chat/completions", json={**chat, "ignore_eos": True, "stop": [two]}).json()[
        "choices"
    ][0]
    assert (stopped["finish_reason"], stopped["stop_reason"]) == ("stop", two)
    r = c.post("/v1/chat/completions", json={**chat, "ignore_eos": True, "stop": [two], "stream": True})
    last = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")][-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", two)


def test_truncate_prompt_tokens_keeps_the_last_tokens(srv):
    c = srv.client("k-a")
    assert_error(c.post("/generate", json={"prefix": "base", "prompt": WORDS}), 413, "prompt_too_long")
    full = c.post("/tokenize", json={"prefix": "base", "prompt": WORDS}).json()["tokens"]
    assert len(full) > 40
    r = generate(c, prompt=WORDS, truncate_prompt_tokens=30)
    assert r["usage"]["prompt_tokens"] == 30
    # the same as sending the last 30 tokens as they are
    ids_body = {
        "model": "acme/base",
        "prompt": full[-30:],
        "max_tokens": 10,
        "ignore_eos": True,
        "temperature": 0,
    }
    ref = c.post("/v1/completions", json=ids_body).json()["choices"][0]["text"]
    assert r["text"] == ref
    comp = c.post(
        "/v1/completions", json={**ids_body, "prompt": WORDS, "truncate_prompt_tokens": 30, "echo": True}
    )
    echoed = comp.json()["choices"][0]["text"]
    assert echoed.endswith(ref) and len(echoed) < len(WORDS) + len(
        ref
    )  # echo shows the prompt as it was used
    chat = c.post(
        "/v1/chat/completions",
        json={
            "model": "acme/base",
            "messages": [{"role": "user", "content": WORDS}],
            "truncate_prompt_tokens": 25,
        },
    )
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 25
    for bad in (0, -2):
        err = assert_error(
            c.post("/generate", json={"prefix": "base", "prompt": "x", "truncate_prompt_tokens": bad}), 422
        )
        assert err["param"] == "truncate_prompt_tokens"


def test_truncate_prompt_tokens_minus_one_keeps_what_fits(srv):
    """vLLM's -1: as many of the last tokens as fit beside the output asked for, under every limit."""
    c = srv.client("k-a")
    full = c.post("/tokenize", json={"prefix": "base", "prompt": WORDS}).json()["tokens"]
    # max_prompt_tokens (40) binds
    r = generate(c, prompt=WORDS, truncate_prompt_tokens=-1)
    assert r["usage"]["prompt_tokens"] == 40
    ids_body = {
        "model": "acme/base",
        "prompt": full[-40:],
        "max_tokens": 10,
        "ignore_eos": True,
        "temperature": 0,
    }
    assert r["text"] == c.post("/v1/completions", json=ids_body).json()["choices"][0]["text"]
    # the context binds: the output asked for leaves room for 7 prompt tokens
    info = c.get("/info").json()
    room = min(info["max_model_len"], info["max_request_tokens"])
    r = generate(c, prompt=WORDS, truncate_prompt_tokens=-1, max_tokens=room - 7)
    assert r["usage"] == {**r["usage"], "prompt_tokens": 7, "completion_tokens": room - 7}
    comp = c.post(
        "/v1/completions",
        json={"model": "acme/base", "prompt": WORDS, "max_tokens": room - 5, "truncate_prompt_tokens": -1},
    )
    assert comp.status_code == 200 and comp.json()["usage"]["prompt_tokens"] == 5
    # chat without max_tokens leaves half the room for its output
    chat = {
        "model": "acme/base",
        "messages": [{"role": "user", "content": WORDS}],
        "truncate_prompt_tokens": -1,
    }
    body = c.post("/v1/chat/completions", json=chat).json()
    assert body["usage"]["prompt_tokens"] == 40
    # a prompt that fits is kept whole
    short = generate(c, prompt="Once upon a time", truncate_prompt_tokens=-1)
    assert short["usage"]["prompt_tokens"] == generate(c, prompt="Once upon a time")["usage"]["prompt_tokens"]


def test_truncated_chat_without_max_tokens_shares_the_context(server_factory):
    """-1 on a chat without max_tokens: half the context for the prompt's end, the other half for the answer."""
    srv = server_factory(keys={"acme": "k-a"}, max_model_len=128)
    chat = {
        "model": "acme/base",
        "messages": [{"role": "user", "content": WORDS * 5}],
        "truncate_prompt_tokens": -1,
        "ignore_eos": True,
    }
    r = srv.client("k-a").post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {**r.json()["usage"], "prompt_tokens": 64, "completion_tokens": 64}


def test_priority_tenants_lower_their_own_the_tier_adds(srv, monkeypatch):
    seen: list[tuple[str | None, int]] = []
    eng = srv.svc.engine
    orig = eng.generate

    def spy(req):
        seen.append((req.cache_salt, req.priority))
        return orig(req)

    monkeypatch.setattr(eng, "generate", spy)
    a, v, b = srv.client("k-a"), srv.client("k-v"), srv.client("k-b")
    generate(a, priority=3)
    generate(v)
    generate(b, priority=2)
    chat = {"model": "batch/base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2}
    assert b.post("/v1/chat/completions", json={**chat, "priority": 1}).status_code == 200
    err = assert_error(generate_raw(a, priority=-1), 403, "priority_not_allowed")
    assert err["param"] == "priority"
    assert_error(a.post("/v1/completions", json={"model": "acme/base", "prompt": "x", "priority": -5}), 403)
    generate(srv.client("adm"), tenant_id="acme", priority=-5)  # the operator may raise one
    assert seen == [("acme", 3), ("vip", -10), ("batch", 9), ("batch", 8), ("batch", 8), ("acme", -5)]


def generate_raw(c, **kw):
    return c.post("/generate", json={"prefix": "base", "prompt": "x", "max_tokens": 2, **kw})


def test_sdk_sends_the_parameters(srv):
    import prefixserve_client as ps

    with ps.Client(srv.url, api_key="k-a") as c:
        g = c.generate(
            None, WORDS, prefix="base", max_tokens=4, truncate_prompt_tokens=20, min_p=0.5, priority=2
        )
        assert g.usage.prompt_tokens == 20
        with pytest.raises(ps.Forbidden):
            c.generate(None, "x", prefix="base", priority=-1)
        text = c.generate(None, "Once upon a time", prefix="base", max_tokens=12).text
        stop = text.strip()[:1]
        streamed = "".join(
            d.text for d in c.stream(None, "Once upon a time", prefix="base", max_tokens=12, stop=[stop],
                                     include_stop_str_in_output=True)
        )  # fmt: skip
        assert streamed == text[: text.index(stop) + 1]
        narrow = [
            c.generate(None, "Once upon a time", prefix="base", max_tokens=8, temperature=3.0, seed=s,
                       typical_p=1e-9).text
            for s in (1, 2)
        ]  # fmt: skip
        marked = c.generate(None, "Once upon a time", prefix="base", max_tokens=8, temperature=1.0, seed=4,
                            watermark=True).text  # fmt: skip
        assert (
            marked
            == generate(srv.client("k-a"), temperature=1.0, seed=4, max_tokens=8, watermark=True)["text"]
        )
        assert narrow[0] == narrow[1] == generate(srv.client("k-a"), temperature=3.0, seed=9,
                                                  typical_p=1e-9, max_tokens=8)["text"]  # fmt: skip


def test_skip_special_tokens_and_its_text_offsets(srv):
    """vLLM's skip_special_tokens: false keeps special tokens' text (it was ignored without a word), streamed or not;
    with the default, a special token the text leaves out takes no room in text_offset (later offsets drifted)."""
    c = srv.client("k-a")
    tok = srv.app.state.ps.bundle.tokenizer
    start = tok.convert_tokens_to_ids("<|im_start|>")
    body = {"model": "acme/base", "prompt": "x", "max_tokens": 3, "logprobs": 0, "ignore_eos": True}
    for skip in (True, False):
        forced = {**body, "skip_special_tokens": skip, "prompt": [start], "max_tokens": 1}
        forced["logit_bias"] = {str(start): 100}
        first = c.post("/v1/completions", json=forced).json()["choices"][0]
        assert first["text"] == ("" if skip else "<|im_start|>")
        gen = c.post("/generate", json={"prefix": "base", "prompt": "x", "max_tokens": 2, "ignore_eos": True,
                                       "logit_bias": {str(start): 100}, "skip_special_tokens": skip})  # fmt: skip
        assert gen.json()["text"] == ("" if skip else "<|im_start|><|im_start|>")
        streamed = c.post("/v1/completions", json={**forced, "stream": True})
        chunks = [json.loads(x[6:]) for x in streamed.text.split("\n\n") if x.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == first["text"]
    # text_offset: skipped special tokens take no room (the echoed prompt's are shown, and counted)
    both = {**body, "prompt": "x", "max_tokens": 2, "logit_bias": {str(start): 100}}
    got = c.post("/v1/completions", json={**both, "echo": True}).json()["choices"][0]
    assert "<|im_start|>" in got["text"]  # the rendered prompt, special tokens and all
    assert got["logprobs"]["text_offset"][-2:] == [len(got["text"])] * 2


def test_log_probabilities_asked_for_in_all_are_bounded(server_factory):
    """n x max_tokens x (top_logprobs + 1), prompt_logprobs included, at most max_logprob_entries: each field
    within its own limit could still ask for 1.3 million entries (85 MB of JSON built in one go). The answer's JSON
    is the same as FastAPI's (now encoded off the event loop)."""
    s = server_factory(max_logprob_entries=120)
    c = s.client()
    chat = {"model": "acme/base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    ok = c.post("/v1/chat/completions", json={**chat, "n": 2, "logprobs": True, "top_logprobs": 5})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    choice = ok.json()["choices"][0]
    assert "tool_calls" in choice["message"] and choice["stop_reason"] is None  # model defaults are there
    too_many = c.post("/v1/chat/completions", json={**chat, "n": 3, "logprobs": True, "top_logprobs": 5})
    err = assert_error(too_many, 400, "logprobs_too_large")  # (OpenAI's status for a bad request)
    assert err["param"] == "top_logprobs" and "max_logprob_entries" in err["message"]
    comp = {"model": "acme/base", "prompt": [5] * 30, "max_tokens": 1, "echo": True, "logprobs": 3}
    assert (
        assert_error(c.post("/v1/completions", json=comp), 400, "logprobs_too_large")["param"] == "logprobs"
    )
    assert c.post("/v1/completions", json={**comp, "prompt": [5] * 20}).status_code == 200
    gen = {"tenant_id": "acme", "prefix": "base", "prompt": "hi", "max_tokens": 41, "logprobs": 2}
    assert assert_error(c.post("/generate", json=gen), 422, "logprobs_too_large")["param"] == "logprobs"
    # prompt_logprobs alone is named as such on /v1 (it was "logprobs" / "top_logprobs")
    pl = {"model": "acme/base", "prompt": [5] * 30, "max_tokens": 1, "prompt_logprobs": 4}
    assert (
        assert_error(c.post("/v1/completions", json=pl), 400, "logprobs_too_large")["param"]
        == "prompt_logprobs"
    )
    chat_pl = {**chat, "max_tokens": 1, "prompt_logprobs": 20}
    err = assert_error(c.post("/v1/chat/completions", json=chat_pl), 400, "logprobs_too_large")
    assert err["param"] == "prompt_logprobs"
    # /tgi reports every token's log-probability (and its alternatives, and the prompt's with
    # decoder_input_details): the same bound
    tgi = {"inputs": "hi", "parameters": {"adapter_id": "acme/base", "max_new_tokens": 61, "top_n_tokens": 1}}
    err = assert_error(c.post("/tgi/generate", json=tgi), 422, "logprobs_too_large")
    assert err["param"] == "parameters.top_n_tokens" and err["message"].count("122") == 1, err
    tgi["parameters"]["max_new_tokens"] = 60
    assert c.post("/tgi/generate", json=tgi).status_code == 200
    plain = {"inputs": "hi", "parameters": {"adapter_id": "acme/base", "max_new_tokens": 121}}
    err = assert_error(c.post("/tgi/generate", json=plain), 422, "logprobs_too_large")
    assert err["param"] == "parameters.max_new_tokens"
    details = {"inputs": "hi " * 40, "parameters": {"adapter_id": "acme/base", "max_new_tokens": 1,
                                                    "decoder_input_details": True}}  # fmt: skip
    err = assert_error(c.post("/tgi/generate", json=details), 422, "logprobs_too_large")
    assert err["param"] == "parameters.decoder_input_details"
