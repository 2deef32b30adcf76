"""vLLM's beam search (`use_beam_search`, `n` beams, `length_penalty`) on /v1/completions and /v1/chat/completions:
the n best beams, best first, token-identical to a reference beam search over transformers forwards fed the same
prefix KV, and to transformers' own `generate(num_beams=...)` where no beam ends; streamed, billed and refused as the
other choices are."""

from __future__ import annotations

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
    """Beam search written out over plain transformers forwards (each candidate's whole sequence recomputed): every
    beam extended by its 2 x width most likely tokens, those that end kept aside, the width best others go on; a
    score is the summed log-probability over the length (end included) to `length_penalty`."""

    def score(b):
        return b[1] / max(1, len(b[0])) ** length_penalty

    running, done = [([], 0.0)], []
    for _ in range(max_tokens):
        cands = []
        for toks, cum in running:
            out, _, _ = _hf_forward(model, kv, prompt + toks)
            vals, ids = torch.log_softmax(out.logits[0, -1].float(), -1).topk(2 * width)
            for v, t in zip(vals.tolist(), ids.tolist(), strict=True):
                (done if t in eos else cands).append(([*toks, t], cum + v))
        running = sorted(cands, key=score, reverse=True)[:width]
        done = sorted(done, key=score, reverse=True)[:width]
        if len(done) == width and score(running[0]) <= score(done[-1]):
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
    """Where no beam ends, transformers' own beam search (`generate(num_beams=n, num_return_sequences=n)`) keeps the
    same beams in the same order."""
    c = srv.client(KEY)
    model = srv.svc.bundle.hf_model
    for n, max_tokens in ((3, 6), (2, 9)):
        got = completion(c, model="acme/base", ignore_eos=True, n=n, max_tokens=max_tokens)
        prompt = got["choices"][0]["prompt_token_ids"]
        out = model.generate(
            torch.tensor([prompt]),
            num_beams=n,
            num_return_sequences=n,
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=0,
        )
        want = out[:, len(prompt) :].tolist()
        assert not any(t in srv.svc.llm.eos_ids for seq in want for t in seq)  # (no beam ended there either)
        assert [ch["token_ids"] for ch in got["choices"]] == want


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
