"""The error body `{"error": {"message", "type", "param", "code"}}` for every failure, and hostile input → clear 4xx."""

from __future__ import annotations

import json
import socket
import sys
import time
import warnings

import pytest

from tests.fixtures.server import assert_error, metric_value, put_random_prefix


@pytest.fixture
def srv(server_factory):
    return server_factory(
        prefixes={("acme", "default"): {}}, max_body_bytes=4096, max_stop_strings=4, max_stop_chars=16
    )


def raw(client, body: bytes, path: str = "/generate"):
    return client.post(path, content=body, headers={"content-type": "application/json"})


def _nest(depth: int, leaf: object = "x") -> object:
    """`leaf` inside `depth` arrays and objects in turn (depth 0: the leaf itself)."""
    out = leaf
    for i in range(depth):
        out = [out] if i % 2 else {"a": out}
    return out


def _depth(doc: object) -> int:
    if isinstance(doc, dict):
        return 1 + max((_depth(v) for v in doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max((_depth(v) for v in doc), default=0)
    return 0


@pytest.mark.parametrize("seed", range(3))
def test_json_depth_is_measured_as_parsing_would_find_it(seed):
    """`json_too_deep` against the parsed document's depth, on random documents whose strings hold brackets,
    quotes and escapes (inside a string a bracket is text), near the limit and with many brackets."""
    import random

    from server.api.errors import json_too_deep

    rng = random.Random(seed)
    pieces = ['"', "[", "]", "{", "}", "\\", "x", "\n", "\u00e9"]

    def doc(depth: int) -> object:
        if depth == 0:
            return "".join(rng.choice(pieces) for _ in range(rng.randrange(6)))
        kids = [doc(depth - 1)] + [doc(rng.randrange(depth)) for _ in range(rng.randrange(3))]
        rng.shuffle(kids)
        return kids if rng.random() < 0.5 else {f"k{i}]{{": k for i, k in enumerate(kids)}

    for _ in range(40):
        d = doc(rng.choice([1, 3, 7, 8, 9, 15]))
        text = json.dumps(d, ensure_ascii=rng.random() < 0.5).encode()
        for limit in (1, 2, 4, 7, 8, 9, 14):
            assert json_too_deep(text, limit) == (_depth(d) > limit), (text[:200], limit)


def test_measuring_depth_takes_one_pass_whatever_the_body():
    """A string never closed, full of escaped quotes, made the string-skipping regex start a scan to the end of the
    body at each quote: quadratic (80 KB: 30 s; a 1 MB body would hold the event loop for about an hour). One pass:
    60 KB of them are measured in milliseconds (the quadratic scan took ~20 s), 1 MB in ~40 ms."""
    from server.api.errors import json_too_deep

    body = b"[" * 200 + b'"' + b'\\"' * 30_000
    t0 = time.monotonic()
    assert json_too_deep(body)
    assert time.monotonic() - t0 < 2.0


def test_a_body_nested_past_the_limit_is_refused_on_every_route_before_it_runs(server_factory):
    """Python's parsers, the chat template and the response serialiser each failed at a depth of their own: tool
    parameters 400 deep were a 400 on Python 3.11 and served on 3.12, a Responses request echoing `text` 300 deep
    ran, was billed, and then failed to serialise (a 500), /invocations' own parse let a RecursionError out (a 500
    and a dropped connection). Now every JSON body deeper than MAX_JSON_DEPTH is a 400 before it runs, in the
    route's error shape, charging nothing; one at the limit is served."""
    from server.api.errors import MAX_JSON_DEPTH

    s = server_factory(keys={"acme": "k-acme-1234567890abcdefghij"}, tenant_tokens_per_minute=100_000)
    c = s.client("k-acme-1234567890abcdefghij")
    msgs = [{"role": "user", "content": "hi"}]

    def tool(depth: int) -> list[dict]:
        # the parameters sit 5 levels into the body (body, tools, [0], function, parameters)
        return [
            {
                "type": "function",
                "function": {"name": "f", "parameters": _nest(depth - 5, {"type": "string"})},
            }
        ]

    def bodies(depth: int) -> list[tuple[str, dict]]:
        return [
            (
                "/generate",
                {
                    "tenant_id": "acme",
                    "prefix": "base",
                    "prompt": "x",
                    "max_tokens": 2,
                    "x": _nest(depth - 1),
                },
            ),
            (
                "/v1/chat/completions",
                {"model": "acme/base", "messages": msgs, "max_tokens": 2, "tools": tool(depth)},
            ),
            (
                "/v1/responses",
                {"model": "acme/base", "input": "hi", "max_output_tokens": 2, "text": _nest(depth - 1)},
            ),
            ("/invocations", {"model": "acme/base", "prompt": "x", "max_tokens": 2, "x": _nest(depth - 1)}),
            (
                "/tgi/generate",
                {
                    "inputs": "x",
                    "parameters": {"adapter_id": "acme/base", "max_new_tokens": 2},
                    "x": _nest(depth - 1),
                },
            ),
            (
                "/v1/messages",
                {"model": "acme/base", "messages": msgs, "max_tokens": 2, "metadata": _nest(depth - 1)},
            ),
        ]

    before = c.get("/usage", params={"tenant_id": "acme"}).json()["data"][0]
    for path, body in bodies(MAX_JSON_DEPTH + 1):
        text = json.dumps(body).encode()
        r = raw(c, text, path)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        if path == "/v1/messages":
            assert r.json()["error"]["type"] == "invalid_request_error", r.text
            continue
        err = assert_error(r, 400, "invalid_json")
        assert f"more than {MAX_JSON_DEPTH} levels" in err["message"], err
        if path.startswith("/tgi"):
            assert r.json().get("error_type") == "validation", r.text
    after = c.get("/usage", params={"tenant_id": "acme"}).json()["data"][0]
    assert after == before  # nothing ran, nothing charged
    for path, body in bodies(MAX_JSON_DEPTH):  # at the limit: served, or refused on the body's merits (`x`)
        r = raw(c, json.dumps(body).encode(), path)
        assert r.status_code < 500 and "levels of JSON" not in r.text, (path, r.status_code, r.text[:300])
        if path in ("/v1/chat/completions", "/v1/responses"):
            assert r.status_code == 200, (path, r.text[:300])


def test_invocations_reads_json_as_the_other_routes_do(srv):
    """/invocations parses its body itself: a Content-Type FastAPI would not read as JSON is a 415 there too
    (`application/jsonx` was served), and JSON Python's parser cannot read is a 400 naming why."""
    c = srv.client()
    body = json.dumps({"model": "acme/base", "prompt": "x", "max_tokens": 2}).encode()
    for ctype in ("application/jsonx", "text/json", "text/plain"):
        for path in ("/invocations", "/v1/completions"):
            r = c.post(path, content=body, headers={"content-type": ctype})
            assert_error(r, 415, "unsupported_media_type")
    r = c.post(
        "/invocations", content=body, headers={"content-type": "application/vnd.api+json; charset=utf-8"}
    )
    assert r.status_code == 200, r.text
    err = assert_error(raw(c, b'{"prompt": "x", "max_tokens": ', "/invocations"), 400, "invalid_json")
    assert "not valid JSON" in err["message"], err


def assert_error_allow(r) -> list[str]:
    assert_error(r, 405, "method_not_allowed")
    return [m.strip() for m in r.headers["allow"].split(",")]


def test_unknown_route_404_and_wrong_method_405(srv):
    c = srv.client()
    assert_error(c.get("/no/such/route"), 404, "not_found")
    r = c.put("/generate", json={})
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]
    assert_error(c.delete("/v1/models"), 405)
    # Allow lists every method served at the path, across routes
    assert set(assert_error_allow(c.request("OPTIONS", "/prefixes"))) == {"GET", "HEAD", "POST"}
    assert set(assert_error_allow(c.put("/prefixes/acme/default"))) == {"GET", "HEAD", "DELETE"}
    # made-up methods (any token is one) share one metric label: they cannot grow /metrics without bound (with
    # httptools, uvicorn's fast parser, a method it does not know is a 400 before the app, as in vLLM)
    for i in range(5):
        assert c.request(f"BOGUS{i}" + "X" * 200, "/x").status_code in (400, 404, 405)
    for method in (
        "PROPFIND",
        "MKCOL",
        "PURGE",
        "LINK",
        "UNLINK",
    ):  # methods the parser knows, no route serves
        assert c.request(method, "/generate").status_code == 405
    metrics = c.get("/metrics").text
    assert "BOGUS" not in metrics and "PROPFIND" not in metrics and 'method="other"' in metrics


def test_validation_errors_are_422_with_param(srv):
    c = srv.client()
    err = assert_error(c.post("/generate", json={"tenant_id": "acme"}), 422)
    assert err["param"] == "prompt" and err["type"] == "invalid_request_error"
    err = assert_error(c.post("/generate", json={"tenant_id": "acme", "prompt": "x", "max_tokens": 0}), 422)
    assert err["param"] == "max_tokens"
    err = assert_error(c.post("/generate", json={"tenant_id": "acme", "prompt": "x", "bogus": 1}), 422)
    assert err["param"] == "bogus"
    assert_error(c.post("/generate", json=[1, 2]), 422)
    assert_error(c.post("/generate"), 422, "missing_body")


def test_malformed_json_and_invalid_utf8_are_400(srv):
    c = srv.client()
    assert_error(raw(c, b'{"tenant_id": "acme", "prompt": '), 400, "invalid_json")
    assert_error(raw(c, b'{"tenant_id": "acme", "prompt": "\xff\xfe bad"}'), 400, "invalid_json")


@pytest.mark.parametrize("limit", [None, 1000])
def test_valid_json_the_parser_refuses_is_not_called_invalid(server_factory, limit):
    """JSON nested past Python's recursion limit, or with an integer of over 4300 digits (Python's default limit;
    the message says the process's own), is valid JSON that the server cannot parse: "not valid JSON" sent its
    writer looking for a syntax error that is not there."""
    default = sys.get_int_max_str_digits()
    if limit is not None:
        sys.set_int_max_str_digits(limit)
    try:
        _refused_json(server_factory, limit or 4300)
    finally:
        sys.set_int_max_str_digits(default)


def _refused_json(server_factory, digits: int) -> None:
    c = server_factory().client()
    deep = b"[" * 1500 + b"]" * 1500
    err = assert_error(
        raw(c, b'{"tenant_id": "acme", "prompt": "x", "x": ' + deep + b"}"), 400, "invalid_json"
    )
    assert "nested too deeply" in err["message"]
    err = assert_error(
        raw(c, b'{"tenant_id": "acme", "prompt": "x", "max_tokens": ' + b"9" * (digits + 1) + b"}"), 400
    )
    assert f"more than {digits} digits" in err["message"] and err["code"] == "invalid_json"


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("top_p", "-Infinity"),
        ("temperature", "-0.5"),
        ("top_p", "0"),
        ("top_p", "1.5"),
        ("top_k", "-2"),
        ("max_tokens", "-3"),
        ("seed", "1e400"),
        ("seed", str(2**70)),
        ("seed", str(2**53)),
        ("prompt", '""'),
        ("prompt", '"\\ud800 lone surrogate"'),
        ("prompt", '"nul \\u0000 byte"'),
        ("prompt", "123"),
        ("stream", '"yes please"'),
    ],
)
def test_hostile_values_are_4xx(srv, field, value):
    c = srv.client()
    body = {"tenant_id": "acme", "prompt": "hi", "max_tokens": 2}
    text = json.dumps(body)[:-1] + f', "{field}": {value}}}'
    err = assert_error(raw(c, text.encode()), 422)
    assert err["param"] == field


def test_top_k_minus_one_is_off_as_in_vllm(srv):
    """vLLM's "-1 disables" (its default before 0.10, still what many scripts send): the same output as 0."""
    c = srv.client()
    body = {
        "tenant_id": "acme",
        "prefix": "base",
        "prompt": "hi",
        "max_tokens": 6,
        "temperature": 1,
        "seed": 3,
    }
    outs = [c.post("/generate", json={**body, "top_k": k}).json()["text"] for k in (0, -1)]
    assert outs[0] == outs[1]
    r = c.post("/v1/completions", json={"model": "acme/base", "prompt": "hi", "max_tokens": 6, "temperature": 1,
                                        "seed": 3, "top_k": -1})  # fmt: skip
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == outs[0], r.text


def test_control_characters_other_than_nul_are_fine(srv):
    """Tabs and newlines, and the rest of C0 as OpenAI and vLLM take them (a PDF's form feeds, ANSI escapes)."""
    c = srv.client()
    for prompt in ("a\tb\nc\r\n", "page\fbreak", "escape \x1b[31m", "\x01\x02\x7f"):
        r = c.post("/generate", json={"tenant_id": "acme", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, (prompt, r.text)


def test_tiny_temperature_is_greedy_not_an_error(srv):
    c = srv.client()
    body = {"tenant_id": "acme", "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
    greedy = c.post("/generate", json=body).json()["text"]
    r = c.post("/generate", json={**body, "temperature": 1e-300})
    assert r.status_code == 200 and r.json()["text"] == greedy


def test_stop_list_limits(srv):
    c = srv.client()
    base = {"tenant_id": "acme", "prompt": "hi", "max_tokens": 2}
    assert_error(c.post("/generate", json={**base, "stop": [f"s{i}" for i in range(5)]}), 422)
    assert_error(c.post("/generate", json={**base, "stop": ["x" * 17]}), 422)
    assert_error(c.post("/generate", json={**base, "stop": [""]}), 422)
    assert c.post("/generate", json={**base, "stop": ["a", "b", "c", "d"]}).status_code == 200
    assert c.post("/generate", json={**base, "stop": "zz"}).status_code == 200


@pytest.mark.parametrize("name", ["../etc", "..", ".", "a/b", "x" * 129, "sp ace", "", "ü"])
def test_bad_prefix_and_tenant_names(srv, name):
    c = srv.client()
    err = assert_error(c.post("/generate", json={"tenant_id": "acme", "prefix": name, "prompt": "x"}), 422)
    assert err["param"] == "prefix"
    err = assert_error(c.post("/generate", json={"tenant_id": name, "prompt": "x"}), 422)
    assert err["param"] == "tenant_id"


@pytest.mark.parametrize(
    "path", ["/prefixes/acme/%2e%2e", "/prefixes/acme/..%2F..%2Fetc", "/prefixes/%2e%2e/default"]
)
def test_traversal_in_paths_never_reaches_the_store(srv, path):
    c = srv.client()
    r = c.get(path)
    assert r.status_code in (404, 422), r.text
    assert_error(r, r.status_code)
    assert_error(c.delete(path), r.status_code if r.status_code != 404 else 404)
    assert c.get("/prefixes/acme/default").status_code == 200  # untouched


def test_body_size_limit_413_before_parsing(srv):
    c = srv.client()
    big = json.dumps({"tenant_id": "acme", "prompt": "x" * 5000}).encode()
    assert "(max_body_bytes)" in assert_error(raw(c, big), 413, "body_too_large")["message"]

    # chunked upload without Content-Length is cut off at the limit as well
    def chunks():
        yield b'{"tenant_id": "acme", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = c.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    # a lying Content-Length header is refused without reading
    with socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999\r\n\r\n{"
        )
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    assert '"error"' in head or "content-length" in head.lower()


def test_openai_unsupported_parameters_are_rejected(srv, monkeypatch):
    c = srv.client()
    base = {"model": "acme/default", "prompt": "hi", "max_tokens": 2}
    for extra, param in (
        ({"max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": [1, -2]}, "prompt"),
        ({"logprobs": 21}, "logprobs"),  # over the server's max_logprobs (20)
        ({"logprobs": -1}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        (
            {"repetition_penalty": 1e-219},
            "repetition_penalty",
        ),  # found by schemathesis: overflowed the logits
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 2}, "best_of"),
    ):
        assert assert_error(c.post("/v1/completions", json={**base, **extra}), 400)["param"] == param
    ok = {
        "echo": False,
        "logprobs": None,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "n": 1,
        "user": "u",
    }
    assert c.post("/v1/completions", json={**base, **ok}).status_code == 200
    chat = {"model": "acme", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    err = assert_error(c.post("/v1/chat/completions", json={**chat, "top_logprobs": 2}), 400)
    assert err["param"] == "top_logprobs"  # OpenAI: top_logprobs needs logprobs=true
    err = assert_error(
        c.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21}), 400
    )
    assert err["param"] == "top_logprobs" and err["code"] == "logprobs_too_large"
    assert_error(c.post("/generate", json={"tenant_id": "acme", "prompt": "x", "logprobs": 21}), 422)
    # a limit above the model's vocabulary is the vocabulary's: no more alternatives exist (the step raised)
    vocab = srv.svc.bundle.spec.vocab_size
    monkeypatch.setattr(srv.svc.settings, "max_logprobs", 1000)
    for field in ("logprobs", "prompt_logprobs"):
        r = c.post("/generate", json={"tenant_id": "acme", "prompt": "x", "max_tokens": 1, field: vocab + 1})
        err = assert_error(r, 422, "logprobs_too_large")
        assert err["param"] == field and err["message"].endswith(f"at most {vocab}")
    assert_error(
        c.post("/generate", json={"tenant_id": "acme", "prompt": "x", "repetition_penalty": 2.5}), 422
    )
    assert_error(c.post("/v1/completions", json={**base, "n": 65}), 400)
    assert_error(c.post("/v1/completions", json={**base, "prompt": ["a"] * 65}), 400)
    assert_error(c.post("/v1/completions", json={**base, "prompt": []}), 400)
    assert_error(c.post("/v1/completions", json={**base, "prompt": [[1, 2], []]}), 400)
    out_of_vocab = assert_error(c.post("/v1/completions", json={**base, "prompt": [1, 10**9]}), 400)
    assert "vocabulary" in out_of_vocab["message"]
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(c.post("/v1/chat/completions", json={"model": "acme", "messages": msgs}), 400)
    too_many = {
        "model": "acme",
        "messages": [{"role": "user", "content": "x"}],
        "max_completion_tokens": 10**6,
    }
    err = assert_error(c.post("/v1/chat/completions", json=too_many), 400, "max_tokens_too_large")
    assert err["param"] == "max_completion_tokens" and err["message"].startswith("max_completion_tokens")
    assert_error(c.post("/v1/chat/completions", json={"model": "acme", "messages": []}), 400)
    # OpenAI's deprecated function fields: refused naming what to send instead, not silently ignored
    ask = {"model": "acme", "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 2}
    fn = {"name": "get_weather", "parameters": {"type": "object"}}
    err = assert_error(
        c.post("/v1/chat/completions", json={**ask, "functions": [fn]}), 400, "unsupported_parameter"
    )
    assert err["param"] == "functions" and "send tools" in err["message"]
    err = assert_error(c.post("/v1/chat/completions", json={**ask, "function_call": "auto"}), 400)
    assert err["param"] == "function_call"
    # OpenAI routes this server does not have say so (clients read a bare 404 as "model not found")
    for route in ("/v1/embeddings", "/v1/audio/speech"):
        err = assert_error(c.post(route, json={"model": "acme", "input": "x"}), 404)
        assert route in err["message"] and "/v1/responses" in err["message"]
    assert_error(
        c.post(
            "/v1/chat/completions", json={"model": "acme", "messages": [{"role": "wizard", "content": "x"}]}
        ),
        400,
    )


def test_unknown_prefix_404_and_wrong_model_prefix_422(srv, api_bundle):
    c = srv.client()
    assert_error(c.post("/generate", json={"tenant_id": "acme", "prefix": "nope", "prompt": "x"}), 404)
    assert_error(c.post("/generate", json={"tenant_id": "ghost", "prompt": "x"}), 404, "prefix_not_found")
    assert_error(c.post("/v1/completions", json={"model": "acme/nope", "prompt": "x"}), 404)
    assert_error(c.post("/v1/completions", json={"model": "a/b/c", "prompt": "x"}), 404, "model_not_found")
    put_random_prefix(srv.store, api_bundle, "acme", "alien", fingerprint="another-model")
    err = assert_error(c.post("/generate", json={"tenant_id": "acme", "prefix": "alien", "prompt": "x"}), 422)
    assert err["code"] == "prefix_incompatible"
    assert api_bundle.fingerprint[:12] in err["message"] and "another-mod" in err["message"]
    # the server keeps serving others
    assert c.post("/generate", json={"tenant_id": "acme", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_version_for_another_base_model_does_not_hide_this_models_versions(srv, api_bundle):
    """Servers of two base models on one store (a blue/green model upgrade): a version trained on the other model
    (v2) is not this server's latest; it serves, lists and continues from its own (v1); pinned, v2 is refused."""
    c = srv.client()
    put_random_prefix(srv.store, api_bundle, "acme", "pt", seed=1)
    put_random_prefix(srv.store, api_bundle, "acme", "pt", seed=2, fingerprint="the-new-model")
    body = {"tenant_id": "acme", "prefix": "pt", "prompt": "x", "max_tokens": 2}
    r = c.post("/generate", json=body)
    assert r.status_code == 200 and r.json()["prefix_version"] == 1, r.text
    assert (
        c.post("/v1/completions", json={"model": "acme/pt", "prompt": "x", "max_tokens": 2}).status_code
        == 200
    )
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert cards["acme/pt"]["prefix_version"] == 1
    assert c.get("/v1/models/acme/pt").json()["prefix_version"] == 1
    err = assert_error(c.post("/generate", json={**body, "prefix_version": 2}), 422, "prefix_incompatible")
    assert err["message"] == (
        f"prefix 'pt' version 2 was not trained for this server's base model (fingerprint "
        f"{api_bundle.fingerprint[:12]}); it was trained for one with fingerprint the-new-mode"
    )
    assert srv.svc.servable_meta("acme", "pt").version == 1


def test_a_name_with_no_version_for_this_model_is_refused_from_the_cache(srv, api_bundle, monkeypatch):
    """Finding that no version of a name was trained for this server's base model reads every version's
    metadata: the refusal is cached like a resolution (each request naming it cost that walk), named after the
    asking field, and dropped when the name changes (a version for this model put: served at once)."""
    c = srv.client()
    for seed in range(3):
        put_random_prefix(srv.store, api_bundle, "acme", "pt", seed=seed, fingerprint="the-new-model")
    walks = []
    real = srv.store.servable_meta
    monkeypatch.setattr(srv.store, "servable_meta", lambda *a: walks.append(a) or real(*a))
    body = {"tenant_id": "acme", "prefix": "pt", "prompt": "x", "max_tokens": 2}
    first = assert_error(c.post("/generate", json=body), 422, "prefix_incompatible")
    assert first["param"] == "prefix" and "no version of prefix 'pt' was" in first["message"]
    assert len(walks) == 1
    assert assert_error(c.post("/generate", json=body), 422, "prefix_incompatible") == first
    err = assert_error(
        c.post("/v1/completions", json={"model": "acme/pt", "prompt": "x", "max_tokens": 2}),
        400,  # OpenAI's routes say 400 for what /generate says 422
        "prefix_incompatible",
    )
    assert (err["param"], err["message"]) == ("model", first["message"])
    assert len(walks) == 1
    put_random_prefix(srv.store, api_bundle, "acme", "pt", seed=4)
    r = c.post("/generate", json=body)
    assert r.status_code == 200 and r.json()["prefix_version"] == 4, r.text
    assert len(walks) == 2


def test_a_cached_refusal_is_refreshed_after_its_ttl_when_a_change_event_was_missed(
    server_factory, api_bundle
):
    """The TTL is the backstop of a cached 'no version for this model': a version for it stored while the change
    event went missing is served once the refusal is stale (the request that finds it stale still hears the
    refusal and refreshes it in the background), and the name deleted so is a 404 after the next refresh."""
    srv = server_factory(prefix_meta_ttl_s=0.2)
    c = srv.client()
    put_random_prefix(srv.store, api_bundle, "acme", "pt", seed=1, fingerprint="the-new-model")
    body = {"tenant_id": "acme", "prefix": "pt", "prompt": "x", "max_tokens": 2}
    assert_error(c.post("/generate", json=body), 422, "prefix_incompatible")
    cache = srv.svc.meta_cache
    real = cache.invalidate
    cache.invalidate = lambda key: None  # the change events of what follows go missing
    try:
        put_random_prefix(srv.store, api_bundle, "acme", "pt", seed=2)  # v2: for this model
        assert_error(c.post("/generate", json=body), 422, "prefix_incompatible")  # (fresh: from the cache)

        def until(status: int) -> int:
            deadline = time.monotonic() + 5
            while True:
                got = c.post("/generate", json=body).status_code
                if got == status or time.monotonic() > deadline:
                    return got
                time.sleep(0.05)

        assert until(200) == 200
        srv.store.delete("acme", "pt")
        assert until(404) == 404
    finally:
        cache.invalidate = real


def test_openapi_documents_every_route_and_error_body(srv):
    c = srv.client()
    srv.app.openapi_schema = None  # built again here, where a warning (a repeated operation id, say) fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = c.get("/openapi.json").json()
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    paths = spec["paths"]
    for p in (
        "/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/prefixes",
        "/prefixes/jobs/{job_id}",
        "/prefixes/jobs/{job_id}/cancel",
        "/prefixes/{tenant_id}/{name}",
        "/health",
        "/ready",
        "/metrics",
    ):
        assert p in paths, p
    gen = paths["/generate"]["post"]["responses"]
    for status in ("404", "413", "422", "429", "503"):
        ref = gen[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert c.get("/docs").status_code == 200


def test_corrupt_or_truncated_record_is_refused_and_others_keep_serving(srv, api_bundle, tmp_path):
    from pathlib import Path
    from urllib.parse import urlsplit

    c = srv.client()
    root = Path(urlsplit(srv.store.url).path)
    put_random_prefix(srv.store, api_bundle, "acme", "flipped", seed=5)
    put_random_prefix(srv.store, api_bundle, "acme", "truncated", seed=6)
    blob = root / "acme" / "flipped" / "v1.safetensors"
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    short = root / "acme" / "truncated" / "v1.safetensors"
    short.write_bytes(short.read_bytes()[:100])
    prompt_tokens = metric_value(c.get("/metrics").text, "prefixserve:prompt_tokens_total") or 0.0
    for name in ("flipped", "truncated"):
        err = assert_error(
            c.post("/generate", json={"tenant_id": "acme", "prefix": name, "prompt": "x"}), 422
        )
        assert err["code"] == "prefix_corrupt" and err["param"] == "prefix"
    # refused before it was scheduled: it processed no prompt token
    assert (metric_value(c.get("/metrics").text, "prefixserve:prompt_tokens_total") or 0.0) == prompt_tokens
    ok = c.post("/generate", json={"tenant_id": "acme", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_failure_inside_a_stream_ends_it_with_an_error_frame_and_done(srv, monkeypatch, caplog):
    """A bug that surfaces after the 200 went out: the client still gets an error event (with the status the error
    would have had) and the end of the stream, not a cut connection; the server keeps serving."""
    from server.api import routes_generate
    from tests.fixtures.server import parse_sse

    def broken(*a, **kw):
        raise RuntimeError("bug in a chunk")

    monkeypatch.setattr(routes_generate, "generate_prompt_logprobs", broken)
    c = srv.client()
    r = c.post("/generate", json={"tenant_id": "acme", "prompt": "hello", "max_tokens": 4, "stream": True})
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"] == {
        "message": "internal server error", "type": "server_error", "param": None, "code": "internal_error",
        "status": 500,
    }  # fmt: skip
    assert "stream failed" in caplog.text
    monkeypatch.undo()
    r = c.post("/generate", json={"tenant_id": "acme", "prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200


def _answer_to_headers_alone(port: int, head: bytes) -> tuple[str, str]:
    """Send a request's head (its Content-Length promising a body that never comes) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head_s, body = data.decode().split("\r\n\r\n", 1)
        length = int(
            next(h for h in head_s.lower().split("\r\n") if h.startswith("content-length")).split(":")[1]
        )
        while len(body) < length:
            body += sock.recv(4096).decode()
    return head_s, body


@pytest.mark.parametrize("path", ["/prefixes/acme/x/upload", "/generate", "/v1/chat/completions"])
def test_bodies_are_read_only_for_callers_with_a_key(server_factory, path):
    """An upload may be up to max_upload_bytes, any other body max_body_bytes: a client without a valid key is
    refused on its headers alone, before the server takes in any of the body (here it never sends one: the answer
    still comes). Open connections sending 1 MB bodies without a key grew the server by 1 MB each."""
    s = server_factory(keys={"acme": "k-acme"})
    port = int(s.url.rsplit(":", 1)[1])
    ctype = b"multipart/form-data; boundary=b" if path.endswith("upload") else b"application/json"
    length = b"10000000" if path.endswith("upload") else b"1000000"
    for auth in (
        b"",
        b"Authorization: Bearer wrong\r\n",
        b"Authorization: Basic k-acme\r\n",
        # a repeated header is read as the routes read it, the first one (the check used to take the last)
        b"Authorization: Bearer wrong\r\nAuthorization: Bearer k-acme\r\n",
    ):
        request = f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth
        request += b"Content-Type: " + ctype + b"\r\nContent-Length: " + length + b"\r\n\r\n"
        head, body = _answer_to_headers_alone(port, request)
        assert head.startswith("HTTP/1.1 401") and "www-authenticate: bearer" in head.lower(), head
        assert "key" in json.loads(body)["error"]["message"], body
    if not path.endswith("upload"):
        return
    # with the key the body is read (and, being empty here, refused by the route)
    r = s.client("k-acme").post(
        "/prefixes/acme/x/upload", content=b"", headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 422


def test_bodies_held_at_once_are_bounded(server_factory, monkeypatch):
    """Request bodies received at once are held in memory up to MAX_BUFFERED_BODIES of max_body_bytes; past it a
    new one is a 503 with Retry-After (an open server has no key to refuse them by), and the room comes back."""
    from server.api import app as app_mod

    monkeypatch.setattr(app_mod, "MAX_BUFFERED_BODIES", 1)
    s = server_factory(max_body_bytes=4096)
    port = int(s.url.rsplit(":", 1)[1])
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b" " * 3000)
        deadline = time.monotonic() + 5
        while s.app.state.ps.body_bytes < 3000 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = s.client().post("/generate", content=b" " * 2000, headers={"content-type": "application/json"})
        assert_error(busy, 503, "server_busy")
        assert int(busy.headers["retry-after"]) >= 1
    finally:
        slow.close()
    deadline = time.monotonic() + 5
    while s.app.state.ps.body_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.app.state.ps.body_bytes == 0
    ok = s.client().post(
        "/generate", json={"tenant_id": "acme", "prefix": "base", "prompt": "x", "max_tokens": 1}
    )
    assert ok.status_code == 200


def test_one_tenant_or_keyless_probes_cannot_fill_the_body_room(server_factory, monkeypatch):
    """A tenant's bodies being received may hold MAX_BUFFERED_BODIES_PER_TENANT of the room (past it, a 429 for that
    tenant alone); keyless probe bodies (POST /ping) are not counted at all and are at most PROBE_BODY_BYTES. Both
    used to fill the room every tenant shares: 503 server_busy for everyone."""
    from server.api import app as app_mod

    monkeypatch.setattr(app_mod, "MAX_BUFFERED_BODIES", 2)
    monkeypatch.setattr(app_mod, "MAX_BUFFERED_BODIES_PER_TENANT", 1)
    s = server_factory(max_body_bytes=4096, keys={"acme": "k-acme", "initech": "k-ini"})
    port = int(s.url.rsplit(":", 1)[1])
    st = s.app.state.ps
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        # a keyless probe body, trickled: not counted
        socks[0].sendall(b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b" " * 3000)
        # acme's slow body: within its share
        socks[1].sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-acme\r\n"
            b"Content-Length: 4000\r\n\r\n" + b" " * 3000
        )
        deadline = time.monotonic() + 5
        while st.body_bytes < 3000 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert st.body_bytes == 3000 and st.tenant_body_bytes == {"acme": 3000}
        # acme's next body is over its share; initech's still fits
        busy = s.client("k-acme").post(
            "/generate", content=b" " * 2000, headers={"content-type": "application/json"}
        )
        assert_error(busy, 429, "too_many_bodies")
        ok = s.client("k-ini").post(
            "/generate", json={"tenant_id": "initech", "prefix": "base", "prompt": "x", "max_tokens": 1}
        )
        assert ok.status_code == 200, ok.text
        big = s.client().post("/ping", content=b" " * (app_mod.PROBE_BODY_BYTES + 1))
        assert_error(big, 413, "body_too_large")
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 5
    while (st.body_bytes or st.tenant_body_bytes) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert st.body_bytes == 0 and st.tenant_body_bytes == {}


def test_buffered_bodies_are_replayed_in_chunks():
    import asyncio
    import io

    from server.api.app import _replay

    body = bytes(range(256)) * (10 * 1024 + 3)  # 2.5 MiB and a bit

    async def collect() -> list[dict]:
        async def client_next():
            return {"type": "http.disconnect"}

        receive = _replay(io.BytesIO(body), len(body), client_next)
        msgs = [await receive()]
        while msgs[-1].get("more_body"):
            msgs.append(await receive())
        msgs.append(await receive())  # then whatever the client sends
        return msgs

    msgs = asyncio.run(collect())
    assert [len(m["body"]) for m in msgs[:-1]] == [1 << 20, 1 << 20, len(body) - (2 << 20)]
    assert b"".join(m["body"] for m in msgs[:-1]) == body
    assert [m["more_body"] for m in msgs[:-1]] == [True, True, False] and msgs[-1][
        "type"
    ] == "http.disconnect"


def test_a_long_prefixs_own_kv_blocks_bound_the_request_beside_it(server_factory, monkeypatch):
    """Within the context limit, yet the tenant's prefix and the request's own tokens can never be in the KV cache
    at once (a small cache): the room a request has counts the prefix's blocks, as the scheduler's admission does.
    Past it is a context error at once naming the prefix's share (it was let through, then refused by the engine
    as a 413 `request_too_large` the /v1 clients do not know), exactly at it runs, outputs that default to the
    room left stop within it, and a prefix that leaves no room is refused on upload and in training."""
    from tests.fixtures.models import tiny_llama

    deep = tiny_llama(layers=8)  # 4x the KV bytes a token: 1 MiB holds 32 blocks
    prefixes = {("acme", "long"): {"prefix_length": 300}, ("acme", "huge"): {"prefix_length": 500}}
    s = server_factory(
        bundle=deep,
        kv_cache_mb=1,
        max_model_len=1024,
        prefixes=prefixes,
        training_workers=0,
        training_max_prefix_length=1000,
    )
    llm = s.svc.llm
    assert (llm.pool.num_blocks, llm.max_request_tokens) == (32, 240)  # the prefix's 19 blocks leave 13
    c = s.client()
    body = {
        "tenant_id": "acme",
        "prefix": "long",
        "prompt": "hello",
        "prompt_format": "raw",
        "ignore_eos": True,
    }
    tok = c.post("/tokenize", json={"model": "acme/long", "prompt": "hello", "prompt_format": "raw"}).json()
    assert tok["max_request_tokens"] == 13 * 16  # this prefix's, not /info's 240
    room = 13 * 16 - tok["count"]
    err = assert_error(
        c.post("/generate", json={**body, "max_tokens": room + 1}), 413, "context_length_exceeded"
    )
    assert err["param"] == "max_tokens" and "beside this prefix may hold 208" in err["message"], err
    assert "take 19 of the KV cache's 32 blocks" in err["message"]
    ok = c.post("/generate", json={**body, "max_tokens": room})  # what the room says is what the engine takes
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == room, ok.text
    comp = {"model": "acme/long", "prompt": "hello", "max_tokens": 230}
    err = assert_error(c.post("/v1/completions", json=comp), 400, "context_length_exceeded")
    assert err["param"] == "max_tokens" and "maximum context length" in err["message"]
    msgs = [{"role": "user", "content": "hello"}]
    chat = c.post("/v1/chat/completions", json={"model": "acme/long", "messages": msgs, "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    n = chat.json()["usage"]["prompt_tokens"]
    chat = c.post("/v1/chat/completions", json={"model": "acme/long", "messages": msgs, "ignore_eos": True})
    assert chat.status_code == 200, chat.text  # the default output fills the room left, no more
    assert chat.json()["usage"]["completion_tokens"] == 208 - n
    # a prefix of 32 blocks leaves none: the prompt's fault, as any prompt that fills the context
    huge = {"model": "acme/huge", "prompt": "hello", "max_tokens": 1}
    err = assert_error(c.post("/v1/completions", json=huge), 400, "context_length_exceeded")
    assert err["param"] == "prompt" and "take 32 of the KV cache's 32 blocks" in err["message"], err
    got = c.get("/prefixes/acme/huge/download").content
    files = {"file": ("prefix.safetensors", got, "application/octet-stream")}
    err = assert_error(c.post("/prefixes/acme/huge2/upload", files=files), 413, "prefix_too_long")
    assert "at most 496 fit" in err["message"], err
    train = {"tenant_id": "acme", "name": "t", "examples": [{"prompt": "q", "completion": "zebra"}]}
    err = assert_error(
        c.post("/prefixes", json={**train, "prefix_length": 497}), 422, "invalid_training_spec"
    )
    assert err["param"] == "prefix_length" and "at most 496 positions" in err["message"], err
    assert c.post("/prefixes", json={**train, "prefix_length": 496}).status_code == 202
    # the engine's own refusal (a prefix found longer than its metadata said, say) is a context error too
    monkeypatch.setattr(llm, "request_tokens", lambda prefix_len: llm.max_request_tokens)
    err = assert_error(c.post("/v1/completions", json=comp), 400, "context_length_exceeded")
    assert err["param"] == "max_tokens" and "the cache holds 32" in err["message"], err


def test_the_kv_caches_share_of_one_request_is_a_limit_the_api_states_and_defaults_fit(server_factory):
    """A KV cache smaller than the context: one request's prompt + output may hold half the pool less a block.
    /info and /tgi/info say so, a request past it is a context error naming the numbers, and the outputs that
    default to the room left (chat without max_tokens, /tgi without max_new_tokens) stop there instead of being
    refused (they were sized by max_model_len alone)."""
    from tests.fixtures.models import tiny_llama

    s = server_factory(bundle=tiny_llama(layers=8), kv_cache_mb=1, max_model_len=1024)
    c = s.client()
    info = c.get("/info").json()
    assert (info["max_model_len"], info["max_request_tokens"]) == (1024, 240)  # 32 blocks of 16: 15 blocks
    tgi = c.get("/tgi/info").json()
    assert tgi["max_total_tokens"] <= 240 and tgi["max_input_tokens"] < 240
    body = {
        "tenant_id": "acme",
        "prefix": "base",
        "prompt": "hello",
        "prompt_format": "raw",
        "ignore_eos": True,
    }
    err = assert_error(c.post("/generate", json={**body, "max_tokens": 300}), 413, "context_length_exceeded")
    assert err["param"] == "max_tokens" and "may hold 240" in err["message"], err
    ok = c.post("/generate", json={**body, "max_tokens": 200}).json()
    assert ok["usage"]["completion_tokens"] == 200
    msg = {"role": "user", "content": "hello " * 25}
    chat = c.post("/v1/chat/completions", json={"model": "acme/base", "messages": [msg], "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert (
        chat.json()["usage"]["total_tokens"] == 240 and chat.json()["choices"][0]["finish_reason"] == "length"
    )
    got = c.post("/tgi/generate", json={"inputs": "hello " * 25, "parameters": {"adapter_id": "acme/base"}})
    assert got.status_code == 200, got.text


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(server_factory, monkeypatch):
    """More characters than max_prompt_tokens tokens can hold: a 413 without taking the shared tokenizer thread
    (ten such prompts at once held every tenant's requests for seconds, only to be refused)."""
    from server.api import routes_generate

    srv = server_factory(max_prompt_tokens=8)
    c = srv.client()
    svc = srv.svc
    most = 2 * svc.settings.max_prompt_tokens * svc.max_token_chars
    monkeypatch.setattr(routes_generate, "render_prompt", lambda *a: pytest.fail("tokenized"))
    big = "a" * (most + 1)
    body = {"tenant_id": "acme", "prefix": "base", "prompt": big}
    err = assert_error(c.post("/generate", json=body), 413, "prompt_too_long")
    assert err["param"] == "prompt" and "characters" in err["message"]
    body = {"model": "acme/base", "messages": [{"role": "user", "content": big}]}
    assert assert_error(c.post("/v1/chat/completions", json=body), 400)["param"] == "messages"


def test_tenant_gate_holds_each_tenant_to_its_share():
    """One tenant's third tokenization waits for one of its own two; another tenant's goes at once."""
    import asyncio

    from server.api.service import TenantGate

    async def run() -> list[str]:
        gate, order, release = TenantGate(2), [], asyncio.Event()

        async def job(tenant: str, name: str) -> None:
            async with gate.hold(tenant):
                order.append(name)
                if tenant == "a":
                    await release.wait()

        tasks = [asyncio.create_task(job("a", f"a{i}")) for i in range(3)]
        await asyncio.sleep(0.01)
        await job("b", "b0")  # not behind tenant a's third
        order.append("|")
        release.set()
        await asyncio.gather(*tasks)
        assert gate._slots == {}  # nothing kept for tenants that are done
        return order

    assert asyncio.run(run()) == ["a0", "a1", "b0", "|", "a2"]


def test_a_body_sent_without_a_json_content_type_says_so(srv):
    """`curl -d '{...}'` sends a form content type, a bare client none: the answer says to send JSON (it said
    "Input should be a valid dictionary"), on /generate, /v1 and /prefixes alike; the same body as JSON works."""
    c = srv.client()
    body = json.dumps({"tenant_id": "acme", "prefix": "base", "prompt": "hi", "max_tokens": 2})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    err = assert_error(c.post("/generate", content=body, headers=form), 415, "unsupported_media_type")
    assert "application/json" in err["message"] and err["param"] == "content-type"
    v1 = json.dumps({"model": "acme/base", "prompt": "hi", "max_tokens": 2})
    assert_error(c.post("/v1/completions", content=v1, headers=form), 415, "unsupported_media_type")
    for path, sent in (
        ("/generate", body),
        ("/v1/completions", v1),
        ("/prefixes", "{}"),
        ("/invocations", v1),
    ):
        err = assert_error(
            c.post(path, content=sent), 415, "unsupported_media_type"
        )  # no Content-Type at all
        assert "(none was sent)" in err["message"], path
    assert c.post("/generate", content=body, headers={"Content-Type": "application/json"}).status_code == 200


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_finished_requests_are_no_longer_counted_in_flight(server_factory):
    """Each request counts in flight while it runs and not after: a drain (SIGTERM) that counted every request
    ever answered would wait out its whole grace on an idle server."""
    import asyncio

    s = server_factory()
    c = s.client()
    body = {"tenant_id": "acme", "prefix": "base", "prompt": "hi", "max_tokens": 2}
    assert c.post("/generate", json=body).status_code == 200
    assert c.post("/generate", json={**body, "prefix": "missing"}).status_code == 404
    assert c.post("/generate", content=b"{", headers={"content-type": "application/json"}).status_code in (
        400,
        422,
    )
    assert c.get("/health").status_code == 200
    assert _wait(lambda: s.state.inflight == 0), s.state.inflight
    t0 = time.monotonic()
    assert asyncio.run(s.state.wait_idle(3.0)) is True
    assert time.monotonic() - t0 < 1.0


def test_a_prompt_that_fills_the_context_exactly_is_the_prompts_fault(server_factory):
    """No room for even one token (prompt == context): the error names the prompt, not max_tokens."""
    s = server_factory(max_model_len=64, max_prompt_tokens=200)
    c = s.client()
    body = {"model": "acme/base", "prompt": [5] * 64, "max_tokens": 1}
    err = assert_error(c.post("/v1/completions", json=body), 400, "context_length_exceeded")
    assert err["param"] == "prompt", err
    body["prompt"] = [5] * 63  # room for one: the output's length is at fault past it
    assert c.post("/v1/completions", json=body).status_code == 200
    err = assert_error(
        c.post("/v1/completions", json={**body, "max_tokens": 2}), 400, "context_length_exceeded"
    )
    assert err["param"] == "max_tokens", err


def test_chat_without_max_tokens_is_capped_at_max_new_tokens(server_factory):
    """No max_tokens: up to the context, capped by the server's max_new_tokens (not a 400 for a field the client
    never sent)."""
    s = server_factory(max_new_tokens=8, max_model_len=512)
    c = s.client()
    chat = {"model": "acme/base", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    r = c.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_chat_without_max_tokens_whose_prompt_overflows_the_context_names_the_messages(server_factory):
    s = server_factory(max_model_len=64, max_prompt_tokens=400)
    c = s.client()
    chat = {"model": "acme/base", "messages": [{"role": "user", "content": "y " * 100}]}
    err = assert_error(c.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded")
    assert err["param"] == "messages", err


def test_max_completion_tokens_wins_over_max_tokens(server_factory):
    """OpenAI (and vLLM): max_completion_tokens supersedes the deprecated max_tokens when both are sent."""
    s = server_factory()
    c = s.client()
    chat = {
        "model": "acme/base",
        "messages": [{"role": "user", "content": "hi"}],
        "ignore_eos": True,
        "max_tokens": 9,
        "max_completion_tokens": 3,
    }
    r = c.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_unsupported_vllm_fields_sent_empty_are_accepted(server_factory):
    """An empty value of a refused vLLM field is its default (clients serialise `bad_words: []`): accepted."""
    s = server_factory()
    c = s.client()
    body = {"model": "acme/base", "prompt": "x", "max_tokens": 2}
    for field, value in [("bad_words", []), ("logits_processors", []), ("return_tokens_as_token_ids", False)]:
        r = c.post("/v1/completions", json={**body, field: value})
        assert r.status_code == 200, (field, r.text)
    chat = {"model": "acme/base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert c.post("/v1/chat/completions", json={**chat, "chat_template": ""}).status_code == 200


def test_prompt_embeds_is_refused_not_ignored(server_factory):
    body = {"model": "acme/base", "prompt": "x", "max_tokens": 2, "prompt_embeds": "AAAA"}
    r = server_factory().client().post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_embeds", r.text


def test_a_request_whose_headers_never_finish_is_closed(monkeypatch):
    """A connection that sends part of a request's headers and stops was kept open for good (no key needed: enough
    of them exhaust the descriptors): the server's protocol closes it once the headers are late, while complete
    requests, and a later request on a kept-alive connection, are served."""
    import threading

    import uvicorn

    from server.cli import make_server
    from server.http_protocol import HeaderDeadlineProtocol
    from server.settings import Settings

    assert make_server(object(), Settings()).config.http is HeaderDeadlineProtocol
    monkeypatch.setattr(HeaderDeadlineProtocol, "header_timeout_s", 0.5)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http=HeaderDeadlineProtocol, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert slow.recv(100) == b"" and time.monotonic() - t0 < 3  # closed, not answered
        slow.close()
        kept = socket.create_connection(("127.0.0.1", port), timeout=5)
        for _ in range(2):
            kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert kept.recv(1000).startswith(b"HTTP/1.1 200")
            time.sleep(0.7)  # idle longer than the header deadline: measured from a request's first byte
        kept.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_head_is_served_wherever_get_is(server_factory):
    """HEAD of a GET route answers as its GET would, without the body (it was a 405 everywhere but /health and
    /ready: `HEAD /tgi/health`, TGI's probe, too), behind the same key check; Allow lists it; the OpenAPI document
    lists no HEAD operation."""
    s = server_factory(keys={"acme": "k-acme-1234567890abcdefghij"}, prefixes={("acme", "faq"): {"seed": 1}})
    c, anon = s.client("k-acme-1234567890abcdefghij"), s.client()
    for path in ("/info", "/version", "/metrics", "/v1/models", "/prefixes", "/usage", "/tgi/health", "/tgi/info",
                 "/prefixes/acme/faq", "/health"):  # fmt: skip
        got, head = c.get(path), c.head(path)
        assert got.status_code == head.status_code == 200, (path, got.status_code, head.status_code)
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
    assert anon.head("/info").status_code == 401 and anon.head("/version").status_code == 200
    assert c.head("/prefixes/acme/nope").status_code == 404
    assert "HEAD" in [m.strip() for m in c.put("/info").headers["allow"].split(",")]
    ops = c.get("/openapi.json").json()["paths"]
    assert not any("head" in methods for methods in ops.values())
