"""TGI / LoRAX compatible routes under /tgi: the same tokens as /generate, TGI's response and stream shapes, the
clients' parameters mapped (or refused with a 422 naming them), and the LoRAX client itself when it is installed."""

from __future__ import annotations

import asyncio
import json

import pytest

from server.api.prefix_meta import ResolvedPrefix
from server.api.routes_tgi import TGIParameters, TGIRequest, _frames, _prompt_ids, _Shape
from server.engine import TokenEvent
from server.model import render_prompt
from tests.fixtures.server import assert_error, put_random_prefix, size_fields_named

KEY = "sk-acme-tgi"
PROMPT = "Tell me about the sea"


@pytest.fixture
def srv(server_factory, api_bundle):
    s = server_factory(keys={"acme": KEY, "globex": "sk-globex"})
    put_random_prefix(s.store, api_bundle, "acme", "faq", prefix_length=6, seed=3)
    put_random_prefix(s.store, api_bundle, "globex", "faq", prefix_length=4, seed=4)
    return s


def events(r) -> list[dict]:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    frames = [f for f in r.text.split("\n\n") if f.strip()]
    # TGI's protocol has no [DONE]
    assert all(f.startswith("data: ") for f in frames) and "[DONE]" not in r.text
    return [json.loads(f[len("data: ") :]) for f in frames]


def native(c, **kw) -> dict:
    r = c.post("/generate", json={"prompt": PROMPT, "prefix": "faq", "max_tokens": 12, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_output_is_the_native_routes_and_details_describe_it(srv):
    c = srv.client(KEY)
    ref = native(c, logprobs=0)
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "acme/faq", "max_new_tokens": 12, "details": True}}
    (out,) = c.post("/tgi", json=body).json()  # the clients' base URL answers a list
    assert out["generated_text"] == ref["text"]
    d = out["details"]
    assert [t["id"] for t in d["tokens"]] == [t["id"] for t in ref["logprobs"]]
    assert [t["logprob"] for t in d["tokens"]] == pytest.approx([t["logprob"] for t in ref["logprobs"]])
    assert d["generated_tokens"] == ref["usage"]["completion_tokens"] == len(d["tokens"])
    assert d["prompt_tokens"] == ref["usage"]["prompt_tokens"] and d["prefill"] == [] and d["seed"] is None
    expected = "length" if ref["finish_reason"] == "length" else "eos_token"
    assert d["finish_reason"] == expected and all(t["special"] in (True, False) for t in d["tokens"])
    one = c.post("/tgi/generate", json=body).json()  # TGI's own route: one object
    assert one["generated_text"] == ref["text"] and one["details"]["tokens"] == d["tokens"]
    # each token's text is its own (decoded incrementally; a special token's is its spelling), as streamed
    assert "".join(t["text"] for t in d["tokens"] if not t["special"]) == ref["text"]
    evs = events(c.post("/tgi/generate_stream", json=body))
    assert [t["text"] for t in d["tokens"]] == [e["token"]["text"] for e in evs]
    plain = c.post(
        "/tgi/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "acme/faq@1"}}
    ).json()
    # no details asked
    assert set(plain) == {"generated_text"} and plain["generated_text"].startswith(ref["text"])
    # without adapter_id: the base model, fed `inputs` as they are (TGI applies no chat template)
    other = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}).json()
    raw_ids = srv.svc.bundle.tokenizer(PROMPT)["input_ids"]
    body = {"model": "acme/base", "prompt": raw_ids, "max_tokens": 12, "temperature": 0}
    base = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert other["generated_text"] == base != ref["text"]


def test_stream_is_one_event_per_token_adding_up_to_the_text(srv):
    c = srv.client(KEY)
    free = native(c, max_tokens=16)["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # a stop string the output will reach
    assert stop.strip() and stop in free
    ref = native(c, logprobs=0, stop=[stop], max_tokens=16, include_stop_str_in_output=True)
    # TGI keeps it
    assert ref["finish_reason"] == "stop" and ref["text"] == free[: free.index(stop) + len(stop)]
    params = {"adapter_id": "acme/faq", "max_new_tokens": 16, "stop": [stop], "details": True}
    for path, body in (("/tgi", {"inputs": PROMPT, "parameters": params, "stream": True}),
                       ("/tgi/generate_stream", {"inputs": PROMPT, "parameters": params})):  # fmt: skip
        evs = events(c.post(path, json=body))
        assert [e["index"] for e in evs] == list(range(1, len(evs) + 1))
        assert [e["token"]["id"] for e in evs] == [t["id"] for t in ref["logprobs"]]
        # each token carries its own text, as without the stop string (a possible stop string held back made
        # them lag, and lumped texts together); the output text is cut at the stop string
        plain = {"inputs": PROMPT, "parameters": {**params, "stop": []}}
        free_evs = events(c.post("/tgi/generate_stream", json=plain))
        assert [e["token"]["text"] for e in evs] == [e["token"]["text"] for e in free_evs[: len(evs)]]
        assert "".join(e["token"]["text"] for e in evs).startswith(ref["text"])
        assert all(e["generated_text"] is None and e["details"] is None for e in evs[:-1])
        last = evs[-1]
        assert last["generated_text"] == ref["text"]
        assert last["details"]["finish_reason"] == "stop_sequence"
        assert last["details"]["generated_tokens"] == len(evs)
    unstreamed = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": params}).json()
    assert (
        unstreamed["details"]["finish_reason"] == "stop_sequence"
        and unstreamed["generated_text"] == ref["text"]
    )
    # an output ended by EOS has it as its last token (forced here by logit_bias, which TGI has not): "eos_token"
    eos = next(iter(srv.svc.llm.eos_ids))
    forced = native(c, logit_bias={str(eos): 100.0}, logprobs=0)
    assert forced["finish_reason"] == "stop" and forced["logprobs"][-1]["id"] == eos
    sampling = srv.svc.sampling(max_tokens=4, temperature=0, top_p=1, top_k=0, seed=None, stop=None)
    shape = _Shape(srv.svc, TGIParameters(stop=["END"]), sampling)
    assert shape.finish_reason("stop", eos, "x") == "eos_token"
    assert shape.finish_reason("length", eos, "x") == "length"
    other = next(t for t in range(10) if t not in srv.svc.llm.eos_ids)
    assert shape.finish_reason("stop", other, "the END") == "stop_sequence"
    assert shape.finish_reason("stop", other, "the") == "eos_token"  # a grammar completed: no stop matched


def test_sampling_parameters_follow_tgi(srv):
    c = srv.client(KEY)
    p = {"adapter_id": "acme/faq", "max_new_tokens": 10, "seed": 7}
    # TGI samples when do_sample or a warper is set; seeded sampling is reproducible and matches /generate's
    sampled = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "do_sample": True}}).json()
    again = c.post(
        "/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "temperature": 1.0, "do_sample": True}}
    )
    assert again.json()["generated_text"] == sampled["generated_text"]
    ref = native(c, max_tokens=10, seed=7, temperature=1.0)
    assert sampled["generated_text"] == ref["text"]
    # the watermark (TGI's): the same seed's text as /generate's with it, and not the plain one's
    marked = c.post(
        "/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "do_sample": True, "watermark": True}}
    )
    want = native(c, max_tokens=10, seed=7, temperature=1.0, watermark=True)["text"]
    assert marked.json()["generated_text"] == want != sampled["generated_text"]
    # typical_p is a warper too: TGI samples at temperature 1 with it, as /generate does
    typical = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "typical_p": 0.3}}).json()
    assert (
        typical["generated_text"] == native(c, max_tokens=10, seed=7, temperature=1.0, typical_p=0.3)["text"]
    )
    warm = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "temperature": 0.7}}).json()
    assert warm["generated_text"] == native(c, max_tokens=10, seed=7, temperature=0.7)["text"]
    greedy = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": p}).json()  # seed alone: greedy
    assert greedy["generated_text"] == native(c, max_tokens=10)["text"]
    full = c.post(
        "/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "return_full_text": True}}
    ).json()
    assert full["generated_text"] == PROMPT + greedy["generated_text"]
    # alternatives (LoRAX) and top tokens (TGI); the prompt's tokens with decoder_input_details
    alt = {**p, "details": True, "return_k_alternatives": 3, "top_n_tokens": 2, "decoder_input_details": True}
    d = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": alt}).json()["details"]
    for tok, top in zip(d["tokens"], d["top_tokens"], strict=True):
        assert len(tok["alternative_tokens"]) == 3 and len(top) == 2
        assert tok["alternative_tokens"][0]["logprob"] >= tok["alternative_tokens"][1]["logprob"]
        assert tok["id"] == tok["alternative_tokens"][0]["id"]  # greedy: the most likely token
    tok = c.post("/tokenize", json={"prompt": PROMPT, "prefix": "faq"}).json()
    assert [t["id"] for t in d["prefill"]] == tok["tokens"] and d["prefill"][0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in d["prefill"][1:])
    # structured output: LoRAX's response_format and TGI's grammar
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    rf = {**p, "max_new_tokens": 40, "response_format": {"type": "json_object", "schema": schema}}
    text = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": rf}).json()["generated_text"]
    assert isinstance(json.loads(text)["n"], int)
    rx = {**p, "grammar": {"type": "regex", "value": "(yes|no)"}, "details": True}
    out = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": rx}).json()
    assert out["generated_text"] in ("yes", "no")
    # the grammar complete: TGI's eos_token (it was "stop_sequence", with no stop sequence given)
    assert out["details"]["finish_reason"] == "eos_token"
    streamed = events(c.post("/tgi/generate_stream", json={"inputs": PROMPT, "parameters": rx}))
    assert streamed[-1]["details"]["finish_reason"] == "eos_token"
    # TGI 3's json_schema grammar (huggingface_hub sends it): {name, schema}
    js = {
        **p,
        "max_new_tokens": 40,
        "grammar": {"type": "json_schema", "value": {"name": "n", "schema": schema}},
    }
    out = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": js}).json()
    assert isinstance(json.loads(out["generated_text"])["n"], int)


@pytest.mark.parametrize(
    ("params", "status", "param"),
    [
        ({"adapter_id": "globex/faq"}, 404, "parameters.adapter_id"),  # another tenant's: not found, no leak
        ({"adapter_id": "acme/missing"}, 404, None),
        ({"adapter_id": "acme/faq", "adapter_source": "hub"}, 422, "parameters.adapter_source"),
        ({"merged_adapters": {"ids": ["a", "b"]}}, 422, "parameters.merged_adapters"),
        ({"typical_p": 0}, 422, None),
        ({"best_of": 2}, 422, "parameters.best_of"),  # (without sampling)
        ({"best_of": 2, "do_sample": True, "seed": 3}, 422, "parameters.seed"),
        ({"best_of": 3, "do_sample": True}, 422, "parameters.best_of"),  # (over max_best_of: TGI's 2)
        ({"temperature": -1}, 422, None),
        ({"max_new_tokens": 10**6}, 422, "parameters.max_new_tokens"),
        ({"stop": ["x" * 10_000]}, 422, "parameters.stop"),
        ({"stop": ["\u0000"]}, 422, None),  # the text rules of the other routes (NUL refused; ESC is text)
        ({"surprise": 1}, 422, None),
        ({"grammar": {"type": "regex", "value": "("}}, 422, "parameters.grammar.value"),
        ({"grammar": {"type": "json", "value": 3}}, 422, "parameters.grammar.value"),
        ({"grammar": {"type": "json", "value": "{not json"}}, 422, "parameters.grammar.value"),
        (
            {"grammar": {"type": "json_schema", "value": {"name": "x"}}},
            422,
            "parameters.grammar.value.schema",
        ),
    ],
)
def test_bad_parameters_are_refused_with_the_error_body(srv, params, status, param):
    c = srv.client(KEY)
    err = assert_error(c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": params}), status)
    if param is not None:
        assert err["param"] == param, err
        if param == "parameters.max_new_tokens":
            assert err["message"].startswith("max_new_tokens must be at most"), err


@pytest.mark.parametrize("inputs", ["a\u0000\u001b", "a\ud800", ""])
def test_inputs_follow_the_prompt_rules_of_the_other_routes(srv, inputs):
    """Control characters and lone surrogates are a 422 on /tgi as on /generate and /v1 (they were generated on)."""
    c = srv.client(KEY)

    def post(path: str, body: dict):  # json.dumps escapes a lone surrogate (httpx would not encode it)
        return c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})

    for path in ("/tgi/generate", "/tgi/generate_stream"):
        err = assert_error(post(path, {"inputs": inputs}), 422)
        assert err["param"] == "inputs", err
    assert_error(post("/generate", {"tenant_id": "acme", "prompt": inputs}), 422)


def test_a_prompt_past_the_context_names_inputs(srv):
    long = "sea " * 2000
    r = srv.client(KEY).post("/tgi/generate", json={"inputs": long})
    err = assert_error(r, 413)
    # lorax: ValidationError
    assert err["param"] == "inputs" and r.json()["error_type"] == "validation", r.text


def test_size_errors_name_only_tgis_fields(server_factory):
    """A prompt too long for the context (or max_prompt_tokens) is told of in TGI's own field names wherever the
    message names one: `inputs` and `max_new_tokens`, never another route's (it asked to "reduce the length of the
    prompt" right after "tokens in the inputs")."""
    c = server_factory(max_model_len=64, max_prompt_tokens=200).client()
    base = {"adapter_id": "acme/base"}
    for inputs, params, param, named in (
        ("hello " * 80, base, "inputs", {"inputs"}),  # no max_new_tokens: the prompt alone is to blame
        ("hello " * 40, {**base, "max_new_tokens": 30}, "inputs", {"inputs", "max_new_tokens"}),
        ("hello " * 8, {**base, "max_new_tokens": 60}, "parameters.max_new_tokens", {"inputs", "max_new_tokens"}),
    ):  # fmt: skip
        err = assert_error(
            c.post("/tgi/generate", json={"inputs": inputs, "parameters": params}),
            413,
            "context_length_exceeded",
        )
        assert err["param"] == param and size_fields_named(err["message"]) == named, err
    assert (
        "Please reduce the length of the inputs."
        in assert_error(c.post("/tgi/generate", json={"inputs": "hello " * 80, "parameters": base}), 413)[
            "message"
        ]
    )
    c = server_factory(max_model_len=64, max_prompt_tokens=20).client()
    err = assert_error(c.post("/tgi/generate", json={"inputs": "hello " * 8, "parameters": base}), 413)
    assert err["code"] == "prompt_too_long" and err["param"] == "inputs", err
    assert size_fields_named(err["message"]) == {"inputs"}, err


def test_engine_refusals_and_template_errors_name_tgis_fields(server_factory, api_bundle, monkeypatch):
    """What the engine refuses itself (its admission: a prefix that grew between the API's check and the engine's)
    is told in TGI's field names too, not the engine's `prompt` / `max_tokens`; a prompt the chat template cannot
    render names `inputs`."""
    from server.api.service import Service
    from tests.fixtures.server import chat_template

    s = server_factory(max_model_len=64)
    put_random_prefix(s.store, api_bundle, "acme", "bot", prefix_length=4, seed=5, prompt_format="chat")
    c = s.client()
    monkeypatch.setattr(Service, "_check", lambda *a, **kw: None)  # (the engine's validate answers)
    body = {"inputs": "hello " * 40, "parameters": {"adapter_id": "acme/bot", "max_new_tokens": 30}}
    err = assert_error(c.post("/tgi/generate", json=body), 413, "context_length_exceeded")
    assert size_fields_named(err["message"]) == {"inputs", "max_new_tokens"}, err
    monkeypatch.undo()
    with chat_template(
        api_bundle.tokenizer, "{{ raise_exception('Only user/assistant roles are supported') }}"
    ):
        body = {"inputs": "hi", "parameters": {"adapter_id": "acme/bot", "max_new_tokens": 2}}
        err = assert_error(c.post("/tgi/generate", json=body), 422, "invalid_prompt")
    assert err["param"] == "inputs" and "inputs" in err["message"] and "prompt" not in err["message"], err


def test_tgi_clients_get_their_error_type_and_every_token_a_logprob(srv):
    c = srv.client(KEY)
    for body, status, kind in (
        ({"inputs": PROMPT, "parameters": {"max_new_tokens": 10**6}}, 422, "validation"),
        ({"inputs": PROMPT, "parameters": {"adapter_id": "acme/nope"}}, 404, None),  # clients: by status
        (
            {"inputs": PROMPT, "parameters": {"decoder_input_details": True}, "stream": True},
            422,
            "validation",
        ),
        ({"inputs": ""}, 422, "validation"),
    ):
        r = c.post("/tgi", json=body)
        assert r.status_code == status and r.json().get("error_type") == kind, r.text
        assert set(r.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }  # the server's error body as well
    nope = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "acme/nope"}}).json()
    assert "'acme/nope'" in nope["error"]["message"]
    # /tgi only
    assert "error_type" not in c.post("/generate", json={"prompt": PROMPT, "prefix": "nope"}).json()
    # errors answered before the route runs (the body's size, a draining server) have it too
    big = json.dumps({"inputs": "a" * 1_100_000}).encode()
    for path in ("/tgi", "/tgi/generate"):
        r = c.post(path, content=big, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json().get("error_type")) == (413, "validation"), r.text
    r = c.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "error_type" not in r.json()
    # a stream without details: every token still has a float logprob (the lorax client requires one)
    evs = events(c.post("/tgi/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}))
    assert len(evs) == 5 and all(isinstance(e["token"]["logprob"], float) for e in evs)
    # sampling without a seed reports the one drawn, which reproduces the output; greedy reports none
    p = {"adapter_id": "acme/faq", "max_new_tokens": 8, "do_sample": True, "details": True}
    first = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": p}).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "seed": seed}}).json()
    assert again["generated_text"] == first["generated_text"] and again["details"]["seed"] == seed
    greedy = {**p, "do_sample": False, "seed": 5}
    assert (
        c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": greedy}).json()["details"]["seed"]
        is None
    )


def test_a_special_token_has_its_spelling_and_the_text_it_releases_is_the_outputs(srv):
    """TGI shows a special token (EOS) with its spelling and `special: true`; text a final EOS releases (held
    back as a possible stop string) is in `generated_text`, not pinned on some other token."""
    eos = next(iter(srv.svc.llm.eos_ids))
    sampling = srv.svc.sampling(max_tokens=4, temperature=0, top_p=1, top_k=0, seed=None, stop=None)
    shape = _Shape(srv.svc, TGIParameters(), sampling)
    tok = srv.svc.bundle.tokenizer
    a, b = (
        tok("a", add_special_tokens=False)["input_ids"][0],
        tok("b", add_special_tokens=False)["input_ids"][0],
    )
    evs = [TokenEvent("r", [a], "a"), TokenEvent("r", [b], ""), TokenEvent("r", [eos], "b", finished=True)]

    class Run:
        first = evs[0]

        async def started(self):
            return self.first

        async def events(self):
            for ev in evs[1:]:
                yield ev

    body = TGIRequest(inputs="x", parameters=TGIParameters(details=True))
    frames = asyncio.run(_collect_frames(_frames(Run(), shape, body, [a])))
    assert [(f["token"]["id"], f["token"]["text"], f["token"]["special"]) for f in frames] == [
        (a, "a", False), (b, "b", False), (eos, tok.decode([eos]), True)
    ]  # fmt: skip
    assert frames[-1]["generated_text"] == "ab" and frames[-1]["details"]["finish_reason"] == "eos_token"
    assert all(f["generated_text"] is None for f in frames[:-1])
    # an added token marked special that `all_special_ids` leaves out (SmolLM2's <repo_name>): special all the same,
    # with its spelling (the output text leaves it out)
    shape.special = set()
    assert shape.token(eos, None, "")["special"] and not shape.token(a, None, "a")["special"]
    assert shape.token_text(shape.detokenizer([a]), eos, last=False) == tok.decode([eos])


async def _collect_frames(gen) -> list[dict]:
    return [json.loads(f.decode().removeprefix("data: ")) async for f in gen]


def test_tgi_info_at_the_clients_base_url(srv):
    info = srv.client(KEY).get("/tgi/info").json()
    settings, llm = srv.svc.settings, srv.svc.llm
    assert info["max_input_tokens"] == min(settings.max_prompt_tokens, llm.max_model_len - 1)
    assert info["max_total_tokens"] == min(
        llm.max_model_len, info["max_input_tokens"] + settings.max_new_tokens
    )
    assert info["model_sha"] == srv.svc.bundle.fingerprint and info["max_best_of"] == 2
    assert info["max_new_tokens"] == settings.max_new_tokens
    assert info["max_stop_sequences"] == srv.svc.settings.max_stop_strings and info["router"] == "prefixserve"
    assert_error(srv.client().get("/tgi/info"), 401)
    # TGI's /health (InferenceClient.health_check): readiness, no key needed, as /ready
    assert srv.client().get("/tgi/health").status_code == 200
    srv.app.state.ps.draining = True
    try:
        r = srv.client().get("/tgi/health")
        assert r.status_code == 503 and r.headers["retry-after"]
    finally:
        srv.app.state.ps.draining = False


def test_a_tgi_body_at_the_servers_own_generate_says_where_tgi_is(srv):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    err = assert_error(srv.client(KEY).post("/generate", json=body), 422)
    assert err["message"].startswith("a TGI request? TGI's protocol is served under /tgi"), err
    for path in ("/", "/generate_stream"):  # where TGI's and LoRAX's clients post
        err = assert_error(srv.client(KEY).post(path, json=body), 404)
        assert "TGI's protocol is served under /tgi" in err["message"], (path, err)


def test_openai_routes_at_the_tgi_base_url_as_tgi_serves_them(srv):
    """TGI serves OpenAI's API at its own root: huggingface_hub's InferenceClient pointed at /tgi calls
    /tgi/v1/chat/completions with model "tgi" (TGI ignores it), here the key's tenant on the base model: the same
    answer as /v1 with `acme/base`."""
    from huggingface_hub import InferenceClient

    messages = [{"role": "user", "content": PROMPT}]
    want = srv.client(KEY).post(
        "/v1/chat/completions",
        json={"model": "acme/base", "messages": messages, "max_tokens": 8, "temperature": 0},
    )
    assert want.status_code == 200, want.text
    client = InferenceClient(base_url=srv.url + "/tgi", api_key=KEY)
    got = client.chat_completion(messages, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.json()["choices"][0]["message"]["content"]
    streamed = client.chat_completion(messages, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == got.choices[0].message.content
    c = srv.client(KEY)
    r = c.post("/tgi/v1/completions", json={"model": "acme/faq", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "acme/faq", r.text
    # `model` left out (TGI ignores it; /v1 requires it): the base model, as "tgi"
    body = {"messages": messages, "max_tokens": 8, "temperature": 0}
    r = c.post("/tgi/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["model"] == "tgi", r.text
    assert r.json()["choices"][0]["message"]["content"] == got.choices[0].message.content
    assert c.post("/tgi/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert c.post("/tgi/v1/chat/completions", json={**body, "model": None}).json()["model"] == "tgi"
    assert_error(c.post("/v1/chat/completions", json=body), 400)
    assert {m["id"] for m in c.get("/tgi/v1/models").json()["data"]} == {"acme/faq", "acme/base"}
    assert_error(c.post("/v1/completions", json={"model": "tgi", "prompt": "x", "max_tokens": 2}), 404)
    # errors there are the OpenAI routes' (a 400 for an invalid value, no TGI error_type), as on /v1
    bad = {"model": "tgi", "messages": [], "max_tokens": 2}
    r = c.post("/tgi/v1/chat/completions", json=bad)
    assert r.status_code == 400 and "error_type" not in r.json(), r.text
    assert r.json() == c.post("/v1/chat/completions", json={**bad, "model": "acme/base"}).json()
    assert "/tgi/v1/chat/completions" not in c.get("/openapi.json").json()["paths"]


def test_auth_and_tenant_rules_are_the_servers(srv, server_factory):
    assert_error(srv.client().post("/tgi", json={"inputs": PROMPT}), 401)
    open_srv = server_factory()
    err = assert_error(open_srv.client().post("/tgi/generate", json={"inputs": PROMPT}), 422)
    assert err["param"] == "parameters.adapter_id"  # no tenant key: the adapter must name the tenant
    ok = open_srv.client().post(
        "/tgi/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "acme/base"}}
    )
    assert ok.status_code == 200 and isinstance(ok.json()["generated_text"], str)


def test_the_lorax_client_works_against_it(srv):
    lorax = pytest.importorskip("lorax", reason="lorax-client is not installed (make install adds it)")
    client = lorax.Client(f"{srv.url}/tgi", headers={"Authorization": f"Bearer {KEY}"})
    ref = native(srv.client(KEY), max_tokens=12, logprobs=0)
    resp = client.generate(PROMPT, adapter_id="acme/faq", max_new_tokens=12, details=True)
    assert resp.generated_text == ref["text"] and [t.id for t in resp.details.tokens] == [
        t["id"] for t in ref["logprobs"]
    ]
    for details in (True, False):
        streamed = list(
            client.generate_stream(PROMPT, adapter_id="acme/faq", max_new_tokens=12, details=details)
        )
        assert "".join(r.token.text for r in streamed) == ref["text"] == streamed[-1].generated_text
        assert streamed[-1].details.generated_tokens == len(streamed)
    with pytest.raises(lorax.errors.NotFoundError):
        client.generate(PROMPT, adapter_id="acme/nope")
    with pytest.raises(lorax.errors.ValidationError):
        client.generate(PROMPT, adapter_id="acme/faq", max_new_tokens=10**6)


def test_truncate_keeps_the_last_tokens_of_inputs_never_the_template(srv, api_bundle):
    tok = api_bundle.tokenizer
    raw = tok(PROMPT)["input_ids"]
    base = ResolvedPrefix(tenant_id="acme", name=None, version=None, prefix_length=0, prompt_format="chat")
    assert _prompt_ids(tok, PROMPT, base, None) == raw  # the base model: inputs as they are
    assert _prompt_ids(tok, PROMPT, base, 3) == raw[-3:]
    chat = ResolvedPrefix(tenant_id="acme", name="faq", version=1, prefix_length=4, prompt_format="chat")
    own = tok(PROMPT, add_special_tokens=False)["input_ids"]
    tail = tok.decode(own[-3:])
    assert (
        _prompt_ids(tok, PROMPT, chat, 3)
        == render_prompt(tok, tail, "chat")
        != render_prompt(tok, PROMPT, "chat")
    )
    assert _prompt_ids(tok, PROMPT, chat, None) == render_prompt(tok, PROMPT, "chat")


def test_repetition_penalty_range_is_the_engines_and_named(srv):
    """TGI's schema said (0, 10] while the engine takes [0.01, 2]: 2.01 was a 422 naming no field."""
    c = srv.client(KEY)
    for bad in (2.01, 10, 0.009):
        r = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {"repetition_penalty": bad}})
        err = assert_error(r, 422)
        assert err["param"] == "parameters.repetition_penalty" and r.json()["error_type"] == "validation", (
            r.text
        )
    ok = c.post(
        "/tgi/generate", json={"inputs": PROMPT, "parameters": {"repetition_penalty": 2, "max_new_tokens": 2}}
    )
    assert ok.status_code == 200, ok.text
    spec = c.get("/openapi.json").json()["components"]["schemas"]["TGIParameters"]["properties"]
    assert "10" not in json.dumps(spec["repetition_penalty"])


def test_best_of_answers_the_likeliest_of_its_samples(server_factory):
    """TGI's best_of: n seeded samples, the one with the highest mean token log-probability answers; details list
    the others as best_of_sequences, each reproducible from its seed; not streamed; at most max_best_of."""
    srv = server_factory(prefixes={("acme", "faq"): {"seed": 3}}, keys={"acme": KEY}, max_best_of=3)
    assert srv.client(KEY).get("/tgi/info").json()["max_best_of"] == 3
    c = srv.client(KEY)
    p = {"adapter_id": "acme/faq", "max_new_tokens": 6, "do_sample": True, "best_of": 3, "details": True}
    out = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": p}).json()
    d = out["details"]
    others = d["best_of_sequences"]
    assert len(others) == 2 and all(
        {"generated_text", "seed", "tokens", "finish_reason"} <= set(o) for o in others
    )
    seqs = [{"generated_text": out["generated_text"], **d}, *others]
    assert len({s["seed"] for s in seqs}) == 3

    def mean(seq):
        return sum(t["logprob"] for t in seq["tokens"]) / len(seq["tokens"])

    assert all(mean(seqs[0]) >= mean(o) for o in others)
    for s in seqs:  # each sample is what /generate gives with its seed
        assert s["generated_text"] == native(c, max_tokens=6, seed=s["seed"], temperature=1.0)["text"]
    # without details: the answer alone
    plain = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": {**p, "details": False}}).json()
    assert set(plain) == {"generated_text"}
    # (TGI's router: a sampling field given, even temperature 1, makes best_of sample)
    warm = {**p, "do_sample": False, "temperature": 1.0, "best_of": 2}
    d = c.post("/tgi/generate", json={"inputs": PROMPT, "parameters": warm}).json()["details"]
    assert d["seed"] is not None and d["seed"] != d["best_of_sequences"][0]["seed"]
    err = assert_error(c.post("/tgi/generate_stream", json={"inputs": PROMPT, "parameters": p}), 422)
    assert err["param"] == "parameters.best_of"
