"""vLLM's beam search (`use_beam_search`, `n` beams, `length_penalty`) on /v1/completions and /v1/chat/completions:
the n best beams, best first, token-identical to a reference beam search over transformers forwards fed the same
prefix KV, and to transformers' own `generate(num_beams=...)` where no beam ends; streamed, billed and refused as the
other choices are."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import torch

from server.engine import PrefixKey
from tests.engine_utils import _hf_forward
from tests.fixtures.server import assert_error

KEY = "sk-acme-beams"


@pytest.fixture
def srv(server_factory):
    prefixes = {
        ("acme", "default"): {"seed": 11},
        ("acme", "chat-bot"): {"seed": 12, "prompt_format": "chat"},
    }
    return server_factory(prefixes=prefixes, keys={"acme": KEY})


def reference(model, kv, prompt, width, max_tokens, eos=(), length_penalty=1.0):
    """Transformers' beam search written out over plain forwards (each candidate's whole sequence recomputed): the
    k = max(2, 1 + #eos) x width likeliest extensions of all beams (by summed log-probability); those of the first
    width that end (all of them at the last step) are complete, the width likeliest others go on; a score is the
    summed log-probability over the length (end included) to `length_penalty`; done once width are complete and no
    running beam scores better than the worst of them."""

    def score(b):
        return b[1] / max(1, len(b[0])) ** length_penalty

    k = max(2, 1 + len(eos)) * width
    running, done = [([], 0.0)], []
    for step in range(max_tokens):
        cands = []
        for toks, cum in running:
            out, _, _ = _hf_forward(model, kv, prompt + toks)
            vals, ids = torch.log_softmax(out.logits[0, -1].float(), -1).topk(k)
            cands += [([*toks, t], cum + v) for v, t in zip(vals.tolist(), ids.tolist(), strict=True)]
        cands = sorted(cands, key=lambda c: c[1], reverse=True)[:k]
        last = step == max_tokens - 1
        done += [c for i, c in enumerate(cands[:width]) if last or c[0][-1] in eos]
        running = [] if last else [c for c in cands if c[0][-1] not in eos][:width]
        done = sorted(done, key=score, reverse=True)[:width]
        if not running or (len(done) == width and score(running[0]) <= score(done[-1])):
            break
    return sorted(done + running, key=score, reverse=True)[:width]


def completion(c, **kw):
    body = {"model": "acme/default", "prompt": "Tell me", "max_tokens": 6, "use_beam_search": True, "n": 3}
    r = c.post("/v1/completions", json={**body, "return_token_ids": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_beams_equal_a_transformers_reference_with_the_prefix(srv):
    c = srv.client(KEY)
    model = srv.svc.bundle.hf_model
    kv = srv.svc.llm.prefix_cache.provider.fetch(PrefixKey("acme", "default", 1))
    eos = srv.svc.llm.eos_ids
    cases = [
        {},
        {"ignore_eos": True, "n": 4, "max_tokens": 5},
        {"n": 1},
        # long enough for beams to end (the tiny model's end-of-sequence) at different lengths
        {"n": 4, "max_tokens": 12},
        {"n": 4, "max_tokens": 12, "length_penalty": 3.0},
        {"n": 4, "max_tokens": 12, "length_penalty": -2.0},
    ]
    seen = []
    for kw in cases:
        got = completion(c, **kw)
        prompt = got["choices"][0]["prompt_token_ids"]
        want = reference(
            model,
            kv,
            prompt,
            kw.get("n", 3),
            kw.get("max_tokens", 6),
            () if kw.get("ignore_eos") else eos,
            kw.get("length_penalty", 1.0),
        )
        assert [ch["token_ids"] for ch in got["choices"]] == [t for t, _ in want], kw
        assert [ch["index"] for ch in got["choices"]] == list(range(len(want)))
        for ch, (toks, _) in zip(got["choices"], want, strict=True):
            assert ch["finish_reason"] == (
                "stop" if toks[-1] in eos and not kw.get("ignore_eos") else "length"
            )
        assert got["usage"]["completion_tokens"] == sum(len(t) for t, _ in want)
        seen.append([ch["token_ids"] for ch in got["choices"]])
    assert any(ch["finish_reason"] == "stop" for ch in got["choices"])  # some beams ended ...
    assert len({str(s) for s in seen[3:]}) == 3  # ... and the length penalty changed which win
    # the prefix matters: the base model's beams differ
    base = completion(c, model="acme/base")
    assert [ch["token_ids"] for ch in base["choices"]] != [ch["token_ids"] for ch in completion(c)["choices"]]


def test_beams_equal_transformers_generate_num_beams(srv):
    """transformers' own beam search (`generate(num_beams=n, num_return_sequences=n, length_penalty=...)`) keeps the
    same beams in the same order, where beams end (at different lengths) and where none may."""
    c = srv.client(KEY)
    model = srv.svc.bundle.hf_model
    (eos,) = srv.svc.llm.eos_ids
    ended = 0
    cases = [
        (3, 6, True, 1.0),
        (2, 9, True, 1.0),
        (4, 12, False, 1.0),
        (3, 20, False, 3.0),
        (3, 20, False, -1.0),
    ]
    for n, max_tokens, ignore_eos, penalty in cases:
        for prompt_text in ("Tell me", "x y z"):
            got = completion(c, model="acme/base", prompt=prompt_text, ignore_eos=ignore_eos, n=n,
                             max_tokens=max_tokens, length_penalty=penalty)  # fmt: skip
            prompt = got["choices"][0]["prompt_token_ids"]
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(
                    1, len(prompt), dtype=torch.long
                ),  # (the prompt holds the end token)
                num_beams=n,
                num_return_sequences=n,
                do_sample=False,
                max_new_tokens=max_tokens,
                length_penalty=penalty,
                eos_token_id=None if ignore_eos else eos,
                pad_token_id=eos,
            )
            want = []
            for row in out[:, len(prompt) :].tolist():  # (an ended beam is padded with more end tokens)
                want.append(row[: row.index(eos) + 1] if not ignore_eos and eos in row else row)
            assert [ch["token_ids"] for ch in got["choices"]] == want, (n, max_tokens, ignore_eos, penalty)
            ended += sum(ch["finish_reason"] == "stop" for ch in got["choices"])
    assert ended > 0  # (beams did end)


def test_chat_streaming_logprobs_and_the_openai_package(srv):
    c = srv.client(KEY)
    msgs = [{"role": "user", "content": "Hello there"}]
    chat = {"model": "acme/chat-bot", "messages": msgs, "max_tokens": 8, "n": 3, "use_beam_search": True}
    r = c.post(
        "/v1/chat/completions", json={**chat, "return_token_ids": True, "logprobs": True, "top_logprobs": 2}
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [ch["index"] for ch in choices] == [0, 1, 2]
    # the same beams as the completions route given the rendered prompt's tokens
    prompt = r.json()["prompt_token_ids"]
    comp = completion(c, model="acme/chat-bot", prompt=prompt, max_tokens=8)
    assert [ch["token_ids"] for ch in choices] == [ch["token_ids"] for ch in comp["choices"]]
    assert [ch["message"]["content"] for ch in choices] == [ch["text"] for ch in comp["choices"]]
    for ch in choices:  # each token's log-probability, with its 2 most likely alternatives
        lps = ch["logprobs"]["content"]
        assert len(lps) == len(ch["token_ids"]) and all(len(e["top_logprobs"]) == 2 for e in lps)
        assert all(e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-6 for e in lps)
    # the beams' summed log-probabilities are the best first (length 8 each: no beam ended early here)
    if all(len(ch["token_ids"]) == 8 for ch in choices):
        sums = [sum(e["logprob"] for e in ch["logprobs"]["content"]) for ch in choices]
        assert sums == sorted(sums, reverse=True)
    # streamed: each choice's whole text in its chunks, then its finish reason
    s = c.post(
        "/v1/chat/completions", json={**chat, "stream": True, "stream_options": {"include_usage": True}}
    )
    texts, finishes, usage = {}, {}, None
    for line in s.text.split("\n\n"):
        if not line.startswith("data: {"):
            continue
        ev = __import__("json").loads(line[6:])
        usage = ev.get("usage") or usage
        for ch in ev["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + (ch["delta"].get("content") or "")
            finishes[ch["index"]] = ch["finish_reason"] or finishes.get(ch["index"])
    assert [texts[i] for i in range(3)] == [ch["message"]["content"] for ch in choices]
    assert [finishes[i] for i in range(3)] == [ch["finish_reason"] for ch in choices]
    assert usage["completion_tokens"] == sum(len(ch["token_ids"]) for ch in choices)
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0) as oai:
        got = oai.completions.create(
            model="acme/default", prompt="Tell me", max_tokens=6, n=3, extra_body={"use_beam_search": True}
        )
    assert [ch.text for ch in got.choices] == [ch["text"] for ch in completion(c)["choices"]]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop": ["x"]}, "stop"),
        ({"logit_bias": {"5": 3}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"min_tokens": 2}, "min_tokens"),
        ({"response_format": {"type": "json_object"}}, "use_beam_search"),
        ({"structured_outputs": {"regex": "a+"}}, "use_beam_search"),
        ({"echo": True}, "echo"),
        ({"n": 17}, "n"),
        ({"length_penalty": "inf"}, "length_penalty"),
        ({"use_beam_search": False, "length_penalty": 0.5}, "length_penalty"),
    ],
)
def test_what_beam_search_cannot_honour_is_refused(srv, extra, param):
    c = srv.client(KEY)
    body = {"model": "acme/default", "prompt": "x", "max_tokens": 3, "use_beam_search": True, **extra}
    err = assert_error(c.post("/v1/completions", json=body), 400)
    assert err["param"] == param, err
    ok = {
        "model": "acme/default",
        "prompt": "x",
        "max_tokens": 3,
        "use_beam_search": True,
        "length_penalty": 0.5,
    }
    assert c.post("/v1/completions", json={**ok, "temperature": 0.7, "top_p": 0.5}).status_code == 200


def test_a_client_that_leaves_ends_the_search(server_factory, api_bundle):
    """The search stops once the client is gone (it would run 300 steps, each new engine requests): no step
    starts after it, its tenant slots and KV blocks are freed."""
    import json
    import socket
    import time

    from tests.fixtures.server import put_random_prefix, slow_engine
    from tests.test_api_lifecycle import engine_idle, only_prefix_blocks_used, wait_until

    s = server_factory()
    put_random_prefix(s.store, api_bundle, "acme")
    slow_engine(s.svc, 0.01)
    steps = []
    orig = s.svc.engine.generate
    s.svc.engine.generate = lambda req: steps.append(req) or orig(req)
    body = {
        "model": "acme",
        "prompt": "go",
        "max_tokens": 300,
        "n": 2,
        "use_beam_search": True,
        "ignore_eos": True,
    }
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    wait_until(lambda: s.svc.llm.num_running == 2, timeout=5)  # the second step: both beams
    sock.close()
    wait_until(lambda: s.svc._tenant_active == {}, timeout=2)  # the choices are closed
    time.sleep(0.2)
    started = len(steps)
    time.sleep(0.5)  # (a search still going would start ~2 requests every 10 ms step)
    assert len(steps) == started < 100 and engine_idle(s.svc)
    assert only_prefix_blocks_used(s.svc)


def test_beams_that_all_end_and_the_end_tokens_text(srv, monkeypatch):
    """Every candidate of the only beam ending (a model with several end-of-sequence ids) completes the search
    instead of failing it; an ended beam's text leaves the end token out, even with skip_special_tokens false (its
    id stays in token_ids)."""
    c = srv.client(KEY)
    body = {"model": "acme/base", "prompt": "Tell me", "max_tokens": 1, "logprobs": 2, "temperature": 0,
            "return_tokens_as_token_ids": True}  # fmt: skip
    first = c.post("/v1/completions", json=body).json()
    top = [int(t.removeprefix("token_id:")) for t in first["choices"][0]["logprobs"]["top_logprobs"][0]]
    eos = set(srv.svc.llm.eos_ids)
    tok = srv.svc.bundle.tokenizer
    monkeypatch.setattr(srv.svc.llm, "eos_ids", eos | set(top))
    got = completion(c, model="acme/base", n=1, max_tokens=4)
    assert got["choices"][0]["finish_reason"] == "stop" and len(got["choices"][0]["token_ids"]) == 1
    monkeypatch.setattr(srv.svc.llm, "eos_ids", eos)
    got = completion(c, model="acme/base", prompt="x y z", n=3, max_tokens=20, skip_special_tokens=False)
    ended = [ch for ch in got["choices"] if ch["finish_reason"] == "stop"]
    assert ended
    for ch in ended:
        assert ch["token_ids"][-1] in eos
        assert ch["text"] == tok.decode(ch["token_ids"][:-1], skip_special_tokens=False)


def test_a_full_queue_does_not_fail_an_accepted_search(server_factory, api_bundle):
    """Its later steps are the work of an accepted request: a queue filled by others meanwhile does not refuse them
    (it did: a 503 after work was done)."""
    import threading

    from tests.fixtures.server import put_random_prefix, slow_engine

    s = server_factory(max_num_seqs=2, max_queued=1)
    put_random_prefix(s.store, api_bundle, "acme")
    slow_engine(s.svc, 0.01)
    engine = s.svc.engine
    submit = engine.submit
    admitted = threading.Event()

    def submit_seen(req, on_event):
        submit(req, on_event)  # (raises QueueFull when refused)
        admitted.set()

    engine.submit = submit_seen  # (nothing else is submitted before the search's first step)
    c = s.client()
    results: dict[str, int] = {}

    def beam() -> None:
        body = {
            "model": "acme",
            "prompt": "go",
            "max_tokens": 60,
            "n": 2,
            "use_beam_search": True,
            "ignore_eos": True,
        }
        results["beam"] = c.post("/v1/completions", json=body).status_code

    t = threading.Thread(target=beam)
    t.start()
    # the others come once the engine took the search's first step (its only one that a full queue may refuse)
    assert admitted.wait(30), results
    others = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, c.post("/generate", json={
            "tenant_id": "acme", "prompt": f"p{i}", "max_tokens": 30, "ignore_eos": True}).status_code))
        for i in range(3)
    ]  # fmt: skip
    for o in others:
        o.start()
    for th in (t, *others):
        th.join(60)
    assert results["beam"] == 200, results


def test_a_prefix_replaced_and_deleted_mid_search_reruns_it_on_the_latest(server_factory, api_bundle):
    """Its version replaced, then deleted, between two steps (keep_versions, an operator): a step cannot load it
    again, so the search runs again on the latest version, as a request's first step would (it was a 404 naming the
    model, which exists)."""
    import threading
    import time

    from tests.fixtures.server import put_random_prefix

    s = server_factory()
    put_random_prefix(s.store, api_bundle, "acme", seed=1)
    step = s.svc.llm.step

    def slow_step():  # (a step's one-token requests are done by its end: `slow_engine` would not wait)
        time.sleep(0.01)
        return step()

    s.svc.llm.step = slow_step
    restarts, loaded = [], []
    fetch = s.svc.llm.prefix_cache._fetch

    def counted_fetch(key):
        restarts.append(key.version)
        out = fetch(key)
        loaded.append(key.version)  # (a fetch that raised is not a load)
        return out

    s.svc.llm.prefix_cache._fetch = counted_fetch
    c = s.client()
    body = {
        "model": "acme",
        "prompt": "go",
        "max_tokens": 60,
        "n": 2,
        "use_beam_search": True,
        "ignore_eos": True,
    }
    out: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: out.update(r=c.post("/v1/completions", json={**body, "return_token_ids": True}))
    )
    t.start()
    deadline = time.monotonic() + 20
    while not loaded and time.monotonic() < deadline:  # (v1 loaded: the search has begun; a fixed wait was
        time.sleep(0.01)  # too short on a loaded machine)
    assert loaded == [1]
    time.sleep(0.05)
    put_random_prefix(s.store, api_bundle, "acme", seed=2)
    s.store.delete("acme", "default", 1)
    s.svc.llm.prefix_cache.invalidate("acme", "default")  # (the store's change event)
    t.join(60)
    assert out["r"].status_code == 200, out["r"].text
    assert restarts[:1] == [1] and 2 in restarts  # (v1 loaded for the first steps, v2 after)
    again = c.post("/v1/completions", json={**body, "return_token_ids": True}).json()  # on v2 from the start
    assert [ch["token_ids"] for ch in out["r"].json()["choices"]] == [
        ch["token_ids"] for ch in again["choices"]
    ]
