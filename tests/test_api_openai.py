"""The official `openai` package against /v1/completions, /v1/chat/completions and /v1/models."""

from __future__ import annotations

import json
import time

import openai
import pytest

from server.api.logprobs import TextOffsets, TokenTexts, chat_logprobs, completion_logprobs
from server.engine import TokenLogprob
from tests.fixtures.models import make_tiny_tokenizer
from tests.fixtures.server import PARTS_TEMPLATE, assert_error, chat_template, metric_value, parse_sse

KEY = "sk-acme-1b2c3d4e"


@pytest.fixture
def srv(server_factory):
    prefixes = {
        ("acme", "default"): {"seed": 11},
        ("acme", "chat-bot"): {"seed": 12, "prompt_format": "chat"},
    }
    return server_factory(prefixes=prefixes, keys={"acme": KEY, "globex": "sk-globex-0000"})


@pytest.fixture
def oai(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


def test_completion_equals_generate(srv, oai):
    native = (
        srv.client(KEY)
        .post("/generate", json={"prompt": "Tell me", "max_tokens": 12, "ignore_eos": True})
        .json()
    )
    c = oai.completions.create(
        model="acme/default", prompt="Tell me", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert c.object == "text_completion" and c.model == "acme/default"
    assert c.choices[0].text == native["text"]
    assert c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert c.usage.completion_tokens == 12 and c.usage.total_tokens == c.usage.prompt_tokens + 12
    # "acme" alone is the tenant's default prefix
    c2 = oai.completions.create(
        model="acme", prompt="Tell me", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert c2.choices[0].text == native["text"]


def test_completion_streaming(oai):
    full = oai.completions.create(
        model="acme/default", prompt="Stream", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        oai.completions.create(
            model="acme/default",
            prompt="Stream",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_chat_completion_and_streaming(srv, oai):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    r = oai.chat.completions.create(
        model="acme/chat-bot", messages=msgs, max_tokens=9, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 9
    tok = srv.svc.bundle.tokenizer
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(rendered)
    stream = oai.chat.completions.create(
        model="acme/chat-bot",
        messages=msgs,
        max_tokens=9,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # default max_tokens for chat: generation runs until EOS or the server's max_new_tokens
    r2 = oai.chat.completions.create(model="acme/chat-bot", messages=msgs, temperature=0)
    assert r2.usage.completion_tokens <= srv.svc.settings.max_new_tokens


def test_a_prefix_for_another_base_model_is_not_a_model_here(srv, oai):
    """Listed and retrievable it looked servable, and every generation with it was a 400 prefix_incompatible."""
    from tests.fixtures.server import put_random_prefix

    put_random_prefix(srv.store, srv.svc.bundle, "acme", "foreign", fingerprint="another-base-model")
    assert "acme/foreign" not in {m.id for m in oai.models.list().data}
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("acme/foreign")
    assert e.value.body["code"] == "model_not_found" and "another base model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="acme/foreign", prompt="x", max_tokens=2)


def test_the_served_model_name_is_the_key_tenants_base_model(srv, oai, server_factory, api_bundle):
    """What vLLM's clients send as `model`, the base model's name (`served_model_name`, default the model's name),
    reaches a tenant key's tenant on the base model; a tenant named like the model keeps its own default prefix;
    without a tenant key it is an id like any other, and a 404 for it says what to send."""
    served = api_bundle.name
    want = oai.completions.create(model="acme/base", prompt="Tell me", max_tokens=6, temperature=0)
    got = oai.completions.create(model=served, prompt="Tell me", max_tokens=6, temperature=0)
    assert got.choices[0].text == want.choices[0].text and got.model == served
    chat = oai.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert oai.models.retrieve(served).id == served  # the id asked for, as vLLM's
    body = {"model": served, "prompt": "x", "max_tokens": 2}
    open_client = server_factory().client()
    err = assert_error(open_client.post("/v1/completions", json=body), 404, "model_not_found")
    assert "it names the base model only from a tenant API key" in err["message"]
    # GET /v1/models/{name} answers the same 404 as the generation routes (it said only "not found")
    assert assert_error(open_client.get(f"/v1/models/{served}"), 404, "model_not_found") == err
    # a tenant named like the model: its own default prefix, as before (from its key, or the admin's)
    named = server_factory(
        prefixes={(served, "default"): {"seed": 3}},
        keys={served: "sk-named", "acme": KEY},
        admin_key="sk-admin",
    )
    prefixed = {"model": f"{served}/default", "prompt": "x", "max_tokens": 4, "temperature": 0}
    ref = named.client("sk-named").post("/v1/completions", json=prefixed).json()["choices"][0]["text"]
    for key in ("sk-named", "sk-admin"):
        r = named.client(key).post("/v1/completions", json={**prefixed, "model": served})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref, r.text
    # served_model_name: the names an operator gives it (vLLM's --served-model-name)
    hub = server_factory(keys={"acme": KEY}, served_model_name="HuggingFaceTB/SmolLM2-135M-Instruct, smol")
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "smol"):
        r = hub.client(KEY).post("/v1/completions", json={**body, "model": name})
        assert r.status_code == 200, r.text
    assert_error(hub.client(KEY).post("/v1/completions", json=body), 404, "model_not_found")
    info = hub.client(KEY).get("/info").json()
    assert info["served_model_names"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "smol"]
    assert info["reasoning_parser"] == "none"
    # the tenant named "smol", from its own key, names its own default prefix (none here): no base-model hint
    own = server_factory(keys={"smol": "sk-smol"}, served_model_name="smol").client("sk-smol")
    err = assert_error(own.post("/v1/completions", json={**body, "model": "smol"}), 404, "model_not_found")
    assert err["message"] == "model 'smol' not found"
    assert assert_error(own.get("/v1/models/smol"), 404, "model_not_found") == err


def test_base_prompt_format_raw_sends_the_base_models_prompts_as_vllm_does(server_factory, api_bundle):
    """By default a text prompt reaches a base model with a chat template through it (as a chat-trained prefix's
    do); base_prompt_format "raw" sends it as written, as vLLM's /v1/completions; prefixes keep their own."""
    from server.model import render_prompt

    tok = api_bundle.tokenizer
    prompt = "Count: 1, 2, 3,"
    body = {"model": "acme/base", "prompt": prompt, "max_tokens": 2}
    for setting, fmt in (("auto", "chat"), ("raw", "raw")):
        srv = server_factory(
            base_prompt_format=setting, prefixes={("acme", "faq"): {"prompt_format": "chat"}}
        )
        c = srv.client()
        assert c.get("/info").json()["default_prompt_format"] == fmt
        usage = c.post("/v1/completions", json=body).json()["usage"]
        assert usage["prompt_tokens"] == len(render_prompt(tok, prompt, fmt)), setting
        faq = c.post("/v1/completions", json={**body, "model": "acme/faq"}).json()["usage"]
        assert faq["prompt_tokens"] == len(render_prompt(tok, prompt, "chat"))  # the prefix's own format


def test_sampling_defaults_come_from_the_models_generation_config(server_factory):
    """As vLLM's --generation-config auto: a /v1 request that leaves a sampling field out gets the model's
    generation_config.json value (here top_k 1: greedy whatever the temperature), shown in /info; a field given
    wins; generation_config=ignore keeps OpenAI's defaults."""
    from server.model import bundle_from_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, seed=0)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 7.5  # out of the API's range: not taken
    bundle = bundle_from_model(model, tok, name="gc-llama")
    assert bundle.extra["generation_defaults"] == {"top_k": 1}
    body = {"model": "acme/base", "prompt": "Tell me", "max_tokens": 8, "seed": 1, "ignore_eos": True}

    def run(srv, **kw):
        r = srv.client().post("/v1/completions", json={**body, **kw})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    auto, ignore = server_factory(bundle=bundle), server_factory(bundle=bundle, generation_config="ignore")
    assert auto.client().get("/info").json()["sampling_defaults"] == {"top_k": 1}
    assert ignore.client().get("/info").json()["sampling_defaults"] == {}
    greedy = run(auto, temperature=0)
    assert run(auto) == greedy  # temperature 1, top_k 1
    seen = []
    for srv in (auto, ignore):
        real = srv.svc.sampling
        srv.svc.sampling = lambda real=real, **kw: seen.append(kw["top_k"]) or real(**kw)
    run(auto), run(auto, top_k=5), run(ignore)
    assert seen == [1, 5, 0]


def test_models_and_errors(oai):
    models = oai.models.list().data
    assert sorted(m.id for m in models) == ["acme/base", "acme/chat-bot", "acme/default"]
    assert {m.max_model_len for m in models} == {512}  # vLLM's field: what the server was started with
    # retrieve takes every id the generation routes take, and names an unknown one as they do
    assert oai.models.retrieve("acme").id == "acme/default"
    assert oai.models.retrieve("acme/chat-bot").id == "acme/chat-bot"
    pinned = oai.models.retrieve("acme/default@1")
    assert pinned.id == "acme/default@1" and pinned.prefix_version == 1
    assert oai.models.retrieve("acme/base").id == "acme/base"
    # a trailing slash still reaches the list
    assert sorted(
        m.id for m in oai.get("/models/", cast_to=openai.pagination.SyncPage[openai.types.Model]).data
    ) == [
        "acme/base",
        "acme/chat-bot",
        "acme/default",
    ]
    for unknown in ("acme/nothing", "acme/default@9", "globex/default", "acme/x/y", "acme@0"):
        with pytest.raises(openai.NotFoundError) as e:
            oai.models.retrieve(unknown)
        assert e.value.body["code"] == "model_not_found", unknown
    # a path ending in a newline (Starlette's `$` matches before it) is no route: not the list, nor `acme`'s card
    for path in ("/models/%0A", "/models/acme%0A", "/models%0A"):
        with pytest.raises(openai.NotFoundError) as e:
            oai.get(path, cast_to=openai.types.Model)
        assert e.value.body["code"] == "not_found", path
    # generation answers an unknown model like OpenAI, whether the tenant is another's or the prefix is missing
    # (the longest id: 128-character names and a version, 276 characters, is an id, not an invalid field)
    longest = "t" * 128 + "/" + "n" * 128 + "@" + "9" * 18
    for unknown in ("globex/default", "acme/nothing", "acme/default@9", longest):
        with pytest.raises(openai.NotFoundError) as e:
            oai.completions.create(model=unknown, prompt="x", max_tokens=2)
        assert (e.value.body["code"], e.value.body["param"]) == ("model_not_found", "model"), unknown
        with pytest.raises(openai.NotFoundError) as e:
            oai.chat.completions.create(
                model=unknown, messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        assert e.value.body["code"] == "model_not_found", unknown
    bad = openai.OpenAI(base_url=oai.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError):  # a 400, as OpenAI and vLLM answer it (not a 422)
        oai.completions.create(model="acme", prompt="x", temperature=-1)
    base = oai.completions.create(model="acme/base", prompt="x", max_tokens=3, temperature=0)
    assert base.choices[0].finish_reason in ("stop", "length")


def test_raw_sse_frames_follow_openai_format(srv):
    c = srv.client(KEY)
    r = c.post(
        "/v1/chat/completions",
        json={
            "model": "acme",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 4,
            "stream": True,
        },
    )
    assert r.text.endswith("data: [DONE]\n\n")
    frames = parse_sse(r.text)
    assert frames[-1] == "[DONE]"
    assert all(f["object"] == "chat.completion.chunk" and "usage" not in f for f in frames[:-1])
    assert len({f["id"] for f in frames[:-1]}) == 1
    # the id is the request's X-Request-ID (vLLM's: the header when given), so logs and answers correlate
    assert frames[0]["id"] == "chatcmpl-" + r.headers["x-request-id"]
    body = {"model": "acme", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = c.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "trace-7:a"})
    assert r.json()["id"] == "chatcmpl-trace-7:a" and r.headers["x-request-id"] == "trace-7:a"
    r = c.post("/v1/completions", json={"model": "acme", "prompt": "x", "max_tokens": 2, "stream": True},
               headers={"X-Request-ID": "trace-8"})  # fmt: skip
    assert {f["id"] for f in parse_sse(r.text)[:-1]} == {"cmpl-trace-8"}


def expected_offsets(tokens: list[str]) -> list[int]:
    """text_offset as characters of the text: the complete characters of the tokens' bytes before each one (a
    `bytes:\\xNN` token adds what its bytes complete, not the length of its spelling)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, n = [], 0
    for t in tokens:
        out.append(n)
        raw = (
            bytes(int(h, 16) for h in t[len("bytes:") :].split("\\x")[1:])
            if t.startswith("bytes:")
            else t.encode()
        )
        n += len(decoder.decode(raw))
    return out


def test_logprobs_in_openai_formats(oai):
    """The `openai` package parses our logprobs: completions (legacy tokens / token_logprobs / top_logprobs /
    text_offset, streamed the same) and chat (content entries with bytes and top_logprobs)."""
    kw = dict(model="acme/default", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    c = oai.completions.create(prompt="Tell me", logprobs=2, **kw)
    lp = c.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == c.usage.completion_tokens == 8
    assert lp.text_offset == expected_offsets(lp.tokens)
    assert lp.text_offset[-1] <= len(c.choices[0].text)
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and tok in top and top[tok] == pytest.approx(value)
        assert len(top) == 2  # greedy: the sampled token is one of the top 2
    stream = oai.completions.create(prompt="Tell me", logprobs=2, stream=True, **kw)
    chunks = [ch.choices[0].logprobs for ch in stream if ch.choices[0].logprobs]
    streamed = [x for c in chunks for x in c.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert [x for c in chunks for x in c.text_offset] == lp.text_offset  # continued across chunks

    chat = oai.chat.completions.create(
        model="acme/chat-bot",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    for entry in content:
        raw = bytes(entry.bytes)
        try:
            assert raw.decode("utf-8") == entry.token
        except UnicodeDecodeError:  # part of a character: OpenAI's "bytes:\xNN" spelling, never a bare U+FFFD
            assert entry.token == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
    plain = oai.chat.completions.create(
        model="acme/chat-bot", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None


def test_return_tokens_as_token_ids(srv, oai):
    """vLLM's return_tokens_as_token_ids: logprobs' tokens (and top_logprobs' keys) spelled `token_id:N`, the same
    tokens as without it; text offsets, chat `bytes` and prompt_logprobs stay the tokens' own."""
    texts = srv.svc.token_text
    kw = dict(model="acme/default", prompt="Tell me", max_tokens=6, temperature=0, logprobs=2)
    want = oai.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].logprobs
    got = oai.completions.create(**kw, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = got.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert all(t.startswith("token_id:") for t in lp.tokens) and [texts(i) for i in ids] == want.tokens
    assert lp.text_offset == want.text_offset and lp.token_logprobs == pytest.approx(want.token_logprobs)
    assert all(tok in top and all(k.startswith("token_id:") for k in top)
               for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True))  # fmt: skip
    stream = oai.completions.create(
        **kw, stream=True, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}
    )
    assert [t for ch in stream if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens] == lp.tokens
    chat = dict(model="acme/chat-bot", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
                logprobs=True, top_logprobs=2)  # fmt: skip
    plain = oai.chat.completions.create(**chat).choices[0].logprobs.content
    by_id = oai.chat.completions.create(**chat, extra_body={"return_tokens_as_token_ids": True,
                                                            "prompt_logprobs": 1})  # fmt: skip
    content = by_id.choices[0].logprobs.content
    assert [e.token for e in content] == [f"token_id:{i}" for i in
                                          (int(e.token.split(":")[1]) for e in content)]  # fmt: skip
    assert [e.bytes for e in content] == [e.bytes for e in plain]  # the token's own bytes
    assert [texts(int(e.token.split(":")[1])) for e in content] == [e.token for e in plain]
    prompt = by_id.model_extra["prompt_logprobs"]
    assert all(not v["decoded_token"].startswith("token_id:") for entry in prompt[1:] for v in entry.values())
    err = srv.client(KEY).post("/v1/completions", json={**{k: v for k, v in kw.items()},
                                                        "return_tokens_as_token_ids": "yes please"})  # fmt: skip
    assert err.status_code == 400


def test_openai_penalties_are_applied(oai):
    kw = dict(model="acme/default", prompt="la la la", max_tokens=32, temperature=0)
    plain = oai.completions.create(logprobs=0, extra_body={"ignore_eos": True}, **kw).choices[0]
    assert len(set(plain.logprobs.tokens)) < 32, "precondition: the plain output repeats a token"
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1.8}):
        assert (
            oai.completions.create(extra_body={"ignore_eos": True, **extra}, **kw).choices[0].text
            != plain.text
        )


def test_token_texts_keep_exact_bytes(api_bundle):
    """Byte-level tokens of a multi-byte character read back as their bytes ("bytes:\\xNN" text, never U+FFFD), and
    every token's bytes concatenate to the encoded text."""
    from server.api.logprobs import TokenTexts

    tok = api_bundle.tokenizer
    texts = TokenTexts(tok)
    s = "Café naïve 日本 ok"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    entries = [texts.entry(i) for i in ids]
    assert b"".join(raw for _, raw in entries) == s.encode("utf-8")
    partial = [t for t, raw in entries if t.startswith("bytes:")]
    assert partial, "the tiny tokenizer should split some character into several tokens"
    assert all("\ufffd" not in t for t, _ in entries)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert texts(eos) == "<|im_end|>"


def _byte_id(tok, byte):
    """The id of the byte-level token that stands for the single byte `byte`."""
    from server.engine.token_bytes import _byte_level_table

    ch = next(c for c, b in _byte_level_table().items() if b == byte)
    return tok.convert_tokens_to_ids(ch)


def test_chat_logprobs_carry_the_raw_bytes_of_a_partial_character():
    """A chat logprobs entry for a token that is part of a character: OpenAI's "bytes:\\xNN" spelling, with its raw
    bytes in `bytes`, in the entry and in its top_logprobs."""
    tok = make_tiny_tokenizer()
    texts = TokenTexts(tok)
    i = _byte_id(tok, 0xE2)
    out = chat_logprobs([TokenLogprob(i, -1.0, ((i, -1.0),), 1)], texts)["content"][0]
    assert (
        out["token"] == "bytes:\\xe2" and out["bytes"] == [0xE2] and out["top_logprobs"][0]["bytes"] == [0xE2]
    )


def test_completion_top_logprobs_always_hold_the_sampled_token():
    """OpenAI / vLLM legacy completions: up to logprobs+1 entries, the sampled token's always among them."""
    tok = make_tiny_tokenizer()
    texts = TokenTexts(tok)
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    out = completion_logprobs([TokenLogprob(a, -3.0, ((b, -0.1),), 7)], texts, TextOffsets(texts))
    assert out["top_logprobs"][0] == {"b": -0.1, "a": -3.0}


def test_sentencepiece_byte_fallback_tokens_are_their_byte():
    """SentencePiece byte-fallback tokens (`<0xE2>`) read back as their byte, and text_offset counts the character
    they complete once."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<0xE2>", "<0x82>", "<0xAC>", "▁a"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    texts = TokenTexts(tok)
    assert texts.entry(3) == ("bytes:\\xe2", b"\xe2")
    offs = TextOffsets(texts)
    assert [offs.take(i) for i in (3, 4, 5, 6)] == [0, 0, 0, 1]  # the euro sign is one character


# ------------------------------------------------------------------------------------- n and prompt lists
def test_n_choices_and_prompt_lists(oai):
    """`n` samples per prompt and lists of prompts: choice i is prompt i // n, sample i % n; with a seed, sample j
    equals a single request seeded seed + j; prompt tokens count once per prompt."""
    kw = dict(model="acme/default", max_tokens=8, extra_body={"ignore_eos": True})
    c = oai.completions.create(prompt="Tell me", n=3, temperature=1.0, seed=40, **kw)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    singles = [oai.completions.create(prompt="Tell me", temperature=1.0, seed=40 + j, **kw) for j in range(3)]
    assert [ch.text for ch in c.choices] == [s.choices[0].text for s in singles]
    assert len({ch.text for ch in c.choices}) > 1, "differently seeded samples should differ"
    assert c.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert c.usage.completion_tokens == 24

    prompts = ["Tell me", "Once upon a time there was"]
    many = oai.completions.create(prompt=prompts, n=2, temperature=0, logprobs=1, **kw)
    alone = [oai.completions.create(prompt=p, temperature=0, **kw) for p in prompts]
    assert [ch.text for ch in many.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert all(len(ch.logprobs.tokens) == 8 for ch in many.choices)
    assert many.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert many.usage.completion_tokens == 32

    # streamed: chunks of the four choices interleave; each index's text equals the whole answer's
    texts = ["", "", "", ""]
    usage = None
    for chunk in oai.completions.create(
        prompt=prompts, n=2, temperature=0, stream=True, stream_options={"include_usage": True}, **kw
    ):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
        usage = chunk.usage or usage
    assert texts == [ch.text for ch in many.choices]
    assert (
        usage is not None
        and usage.completion_tokens == 32
        and usage.prompt_tokens == many.usage.prompt_tokens
    )


def test_chat_n_choices_streamed(oai):
    kw = dict(
        model="acme/chat-bot",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=1.0,
        seed=7,
        n=2,
        extra_body={"ignore_eos": True},
    )
    whole = oai.chat.completions.create(**kw)
    assert [ch.index for ch in whole.choices] == [0, 1] and whole.usage.completion_tokens == 12
    parts = ["", ""]
    finish = [None, None]
    for chunk in oai.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert parts == [ch.message.content for ch in whole.choices]
    assert finish == ["length", "length"]


def test_each_streamed_choice_starts_with_its_own_first_token(server_factory, api_bundle):
    """With one batch row, choice 1 of an n=2 stream waits for choice 0 to finish: choice 0 streams meanwhile (as
    vLLM's), instead of the stream opening once every choice has its first token."""

    from tests.fixtures.server import slow_engine

    s = server_factory(prefixes={("acme", "default"): {}}, max_num_seqs=1)
    slow_engine(s.svc, 0.02)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
    kw = dict(
        model="acme/default",
        prompt="Tell me",
        n=2,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**kw)
    texts = ["", ""]
    waiting_at_first = None
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            if waiting_at_first is None and ch.text:
                waiting_at_first = (ch.index, s.svc.llm.num_waiting)
            texts[ch.index] += ch.text
    assert waiting_at_first == (0, 1), "choice 0 should stream while choice 1 still waits for the batch row"
    assert texts == [ch.text for ch in whole.choices] and texts[0] == texts[1]
    # a client that leaves while choice 1 still waits: both engine requests end, the waiting one too
    stream = client.completions.create(stream=True, **{**kw, "max_tokens": 200})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while s.svc.llm.num_running + s.svc.llm.num_waiting and time.monotonic() < deadline:
        time.sleep(0.02)
    assert s.svc.llm.num_running + s.svc.llm.num_waiting == 0


def test_n_over_the_tenant_limit_is_refused(server_factory, api_bundle, tmp_path):
    from tests.fixtures.server import assert_error

    s = server_factory(max_concurrent_per_tenant=4)
    c = s.client()
    body = {"model": "acme/base", "prompt": ["a", "b"], "max_tokens": 2}
    err = assert_error(c.post("/v1/completions", json={**body, "n": 3}), 400, "too_many_choices")
    assert err["param"] == "n"
    ok = c.post("/v1/completions", json={**body, "n": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


def test_abandoned_multi_choice_stream_frees_every_request(srv):
    """A client that leaves an n=4 stream early: all four engine requests end (none keeps running)."""
    import time

    import httpx

    body = {
        "model": "acme/default",
        "prompt": "x",
        "n": 4,
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(base_url=srv.url, headers=headers, timeout=30) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.monotonic() + 10
    while srv.svc.llm.num_running + srv.svc.llm.num_waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.svc.llm.num_running == 0 and srv.svc.llm.num_waiting == 0
    m = httpx.get(srv.url + "/metrics").text
    assert metric_value(m, "prefixserve:request_success_total", {"finished_reason": "abort"}) == 4
    assert metric_value(m, "prefixserve:request_success_total", {"finished_reason": "length"}) == 0


# ------------------------------------------------------------------------------------- echo, token-id prompts
def test_echo_prompt_logprobs_for_loglikelihood(srv, oai):
    """lm-eval's loglikelihood request: token-id prompt, echo, max_tokens 0, logprobs. The prompt comes back with a
    null first entry; a continuation token scored this way has the log-probability it had when generated."""
    from server.api.service import render_prompt

    tok = srv.svc.bundle.tokenizer
    ctx = render_prompt(tok, "Once upon a time", "raw")  # what /generate feeds for this prefix (raw format)
    kw = dict(model="acme/default", temperature=0, extra_body={"ignore_eos": True})
    gen = oai.completions.create(prompt=ctx, max_tokens=3, logprobs=1, **kw).choices[0]
    # the legacy format has no token ids: take the continuation's from /generate
    native = srv.client(KEY).post(
        "/generate",
        json={
            "tenant_id": "acme",
            "prompt": "Once upon a time",
            "max_tokens": 3,
            "ignore_eos": True,
            "logprobs": 0,
        },
    )
    assert native.status_code == 200
    cont = [lp["id"] for lp in native.json()["logprobs"]]
    scored = oai.completions.create(prompt=ctx + cont, max_tokens=0, echo=True, logprobs=1, **kw)
    ch = scored.choices[0]
    lp = ch.logprobs
    assert len(lp.tokens) == len(ctx) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(ctx) :] == pytest.approx(gen.logprobs.token_logprobs, abs=1e-4)
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert ch.text == tok.decode(ctx + cont) and ch.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ctx) + 3
    # a batch of token-id prompts, as lm-eval sends them
    two = oai.completions.create(prompt=[ctx, ctx + cont], max_tokens=0, echo=True, logprobs=0, **kw)
    assert [len(c.logprobs.tokens) for c in two.choices] == [len(ctx), len(ctx) + 3]
    assert two.choices[1].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_prompt_logprobs_on_the_v1_routes(srv, oai):
    """vLLM's `prompt_logprobs` extension: per prompt token (null first) the prompt token and the N most likely,
    keyed by id with logprob, rank and decoded_token; the same numbers echo + logprobs gives; on completions per
    choice, on chat once; refused with stream (as vLLM). It used to be ignored without a word."""
    tok = srv.svc.bundle.tokenizer
    ids = tok("Once upon a time there was", add_special_tokens=False)["input_ids"]
    kw = dict(model="acme/default", temperature=0, max_tokens=1)
    r = oai.completions.create(
        prompt=ids, echo=True, logprobs=1, extra_body={"prompt_logprobs": 3}, **kw
    ).model_dump()
    ch = r["choices"][0]
    plps, echoed = ch["prompt_logprobs"], ch["logprobs"]
    assert len(plps) == len(ids) and plps[0] is None
    for t in range(1, len(ids)):
        entry = plps[t]
        own = entry[str(ids[t])]
        assert own["logprob"] == pytest.approx(echoed["token_logprobs"][t], abs=1e-5)
        assert own["decoded_token"] == echoed["tokens"][t]
        # the 3 most likely (ranks 1, 2, 3, in logprob order) and the prompt token (one of them, or below them)
        others = sorted((e for e in entry.values() if e is not own), key=lambda e: e["rank"])
        top = sorted([*others, own], key=lambda e: e["rank"]) if own["rank"] <= 3 else others
        assert [e["rank"] for e in top] == [1, 2, 3] and len(entry) == (3 if own["rank"] <= 3 else 4)
        assert sorted((e["logprob"] for e in top), reverse=True) == [e["logprob"] for e in top]
        assert own["rank"] <= 3 or own["logprob"] <= top[-1]["logprob"]
        assert len(echoed["top_logprobs"][t]) <= 2  # echo's own number (1) + the token, not prompt_logprobs'
    assert oai.completions.create(prompt=ids, **kw).model_dump()["choices"][0]["prompt_logprobs"] is None
    msgs = [{"role": "user", "content": "Hello there"}]
    chat = oai.chat.completions.create(
        messages=msgs, n=2, extra_body={"prompt_logprobs": 0}, **kw
    ).model_dump()
    cp = chat["prompt_logprobs"]
    assert len(cp) == chat["usage"]["prompt_tokens"] and cp[0] is None and all(len(e) == 1 for e in cp[1:])
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(prompt=ids, stream=True, extra_body={"prompt_logprobs": 1}, **kw)
    assert e.value.body["param"] == "prompt_logprobs"


def test_chat_echo_starts_the_answer_with_the_final_assistant_message(oai):
    """vLLM's chat `echo`: with a final assistant message (continue_final_message) the content starts with it,
    streamed (a chunk right after the role) or not; with a final user message it changes nothing. It used to be
    ignored without a word."""
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My answer is"}]
    kw = dict(model="acme/default", messages=msgs, max_tokens=4, temperature=0)
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    plain = oai.chat.completions.create(**kw, extra_body=cont).choices[0].message.content
    echoed = oai.chat.completions.create(**kw, extra_body={**cont, "echo": True}).choices[0].message.content
    assert echoed == "My answer is" + plain
    chunks = list(oai.chat.completions.create(**kw, stream=True, extra_body={**cont, "echo": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and deltas[1].content == "My answer is"
    assert "".join(d.content or "" for d in deltas) == echoed
    user_last = dict(kw, messages=msgs[:1])
    assert (
        oai.chat.completions.create(**user_last, extra_body={"echo": True}).choices[0].message.content
        == oai.chat.completions.create(**user_last).choices[0].message.content
    )


def test_echo_with_completion_whole_and_streamed(oai):
    kw = dict(
        model="acme/default", prompt="Tell me", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    plain = oai.completions.create(**kw).choices[0]
    echoed = oai.completions.create(echo=True, logprobs=2, **kw)
    ch = echoed.choices[0]
    assert ch.text == "Tell me" + plain.text
    n_prompt = echoed.usage.prompt_tokens
    assert len(ch.logprobs.tokens) == n_prompt + 5 and echoed.usage.completion_tokens == 5
    assert ch.logprobs.text_offset == expected_offsets(ch.logprobs.tokens)
    assert ch.logprobs.text_offset[n_prompt] == len(
        "Tell me"
    )  # the completion starts after the echoed prompt
    chunks = list(oai.completions.create(echo=True, logprobs=2, stream=True, **kw))
    assert chunks[0].choices[0].text == "Tell me"
    assert "".join(c.choices[0].text for c in chunks) == ch.text
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(ch.logprobs.token_logprobs[1:], abs=1e-4)
    # echo without logprobs: text only
    assert oai.completions.create(echo=True, **kw).choices[0].logprobs is None
    # a prefix with a chat template: the echo is the rendered prompt, the text its logprobs' tokens add up to
    got = oai.completions.create(**{**kw, "model": "acme/chat-bot"}, echo=True, logprobs=0)
    chat, n_prompt = got.choices[0], got.usage.prompt_tokens
    echoed_prompt = "".join(chat.logprobs.tokens[:n_prompt])
    assert chat.text.startswith(echoed_prompt) and chat.logprobs.text_offset[n_prompt] == len(echoed_prompt)
    assert echoed_prompt.index("Tell me") > 0  # inside the template, after its opening


def test_text_with_control_characters_is_taken_but_not_nul(oai):
    """A PDF's form feeds, a terminal's ANSI escapes, a vertical tab: text as OpenAI and vLLM take it (they were a
    400); a NUL (binary data sent by mistake) is still refused, naming the field."""
    for text in ("page1\fpage2", "\x1b[31mred\x1b[0m", "a\x0bb"):
        chat = oai.chat.completions.create(
            model="acme/default", messages=[{"role": "user", "content": text}], max_tokens=2
        )
        assert chat.choices[0].finish_reason in ("stop", "length"), text
        parts = [{"type": "text", "text": text}]
        oai.chat.completions.create(
            model="acme/default", messages=[{"role": "user", "content": parts}], max_tokens=1
        )
        assert oai.completions.create(model="acme/default", prompt=text, max_tokens=1).usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="acme/default", messages=[{"role": "user", "content": "a\x00b"}])
    assert "NUL" in e.value.body["message"] and e.value.body["param"].startswith("messages[0].content")


def test_openai_routes_answer_too_long_and_gone_as_openai_does():
    """The mapping of the /v1 routes: every "too long" is a 400 context_length_exceeded whose message has the words
    clients match on; a prefix gone before its first step is an unknown model; anything else passes through."""
    from server.api.chat_pipeline import as_openai_error
    from server.api.errors import APIError

    kv = APIError(
        413,
        "request needs more KV cache than the budget allows",
        code="context_length_exceeded",
        param="max_tokens",
    )
    got = as_openai_error(kv, "acme/faq")
    assert (got.status, got.code, got.param) == (400, "context_length_exceeded", "max_tokens")
    assert "maximum context length" in got.message and kv.message in got.message
    prompt = as_openai_error(
        APIError(413, "prompt has 9 tokens; the limit is 4", code="prompt_too_long", param="messages"), "m"
    )
    assert (prompt.status, prompt.code, prompt.param) == (400, "context_length_exceeded", "messages")
    gone = as_openai_error(
        APIError(404, "prefix 'faq' not found", code="prefix_not_found", param="prefix"), "acme/faq"
    )
    assert (gone.status, gone.code, gone.param) == (
        404,
        "model_not_found",
        "model",
    ) and "acme/faq" in gone.message
    busy = APIError(503, "server busy", code="queue_full")
    assert as_openai_error(busy, "m") is busy
    tpm = APIError(413, "over the tokens per minute", code="tokens_per_minute_exceeded")
    assert as_openai_error(tpm, "m") is tpm


def test_openai_logit_bias(oai):
    kw = dict(
        model="acme/default", prompt="Tell me", max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    forced = oai.completions.create(logit_bias={"65": 100}, **kw).choices[0]
    ids = oai.completions.create(logit_bias={"65": 100}, logprobs=0, **kw).choices[0]
    assert forced.text == ids.text and len(set(ids.logprobs.tokens)) == 1


def test_n_samples_of_one_prompt_share_its_prefill(srv, oai):
    """With the prompt cache on, the n samples of a prompt start together and samples 2..n take the prompt blocks the
    first computes (n - 1 prefills saved); greedy choices are all the same answer, equal to a single request."""
    sched = srv.svc.llm.scheduler
    prompt = " ".join(f"w{i}" for i in range(40))  # never sent before: nothing of it is cached yet
    kw = dict(
        model="acme/default", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    h0 = sched.cache_hit_tokens
    many = oai.completions.create(n=4, **kw)
    blocks = (many.usage.prompt_tokens - 1) // 16
    assert blocks >= 2
    assert sched.cache_hit_tokens - h0 == 3 * blocks * 16  # the first sample computed it, three reused it
    single = oai.completions.create(**kw)
    assert [c.text for c in many.choices] == [single.choices[0].text] * 4


def test_continue_final_message_and_chat_template_kwargs(srv, oai):
    """vLLM's chat-template extensions: continue_final_message renders the last assistant message open (the model
    continues it), chat_template_kwargs reach the template, and their misuse is a 400 naming the field."""
    tok = srv.svc.bundle.tokenizer
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My answer is"}]
    want = tok.apply_chat_template(
        msgs, add_generation_prompt=False, continue_final_message=True, tokenize=False
    )
    assert want.endswith("My answer is")  # no end-of-turn after it
    ids = tok(want, add_special_tokens=False)["input_ids"]
    seen: list[dict] = []
    apply = tok.apply_chat_template

    def spy(messages, **kw):
        seen.append(kw)
        return apply(messages, **kw)

    tok.apply_chat_template = spy
    try:
        r = oai.chat.completions.create(
            model="acme/default",
            messages=msgs,
            max_tokens=3,
            extra_body={
                "add_generation_prompt": False,
                "continue_final_message": True,
                "chat_template_kwargs": {"enable_thinking": False},
            },
        )
    finally:
        tok.apply_chat_template = apply
    assert r.usage.prompt_tokens == len(ids)
    assert seen[-1]["continue_final_message"] is True and seen[-1]["enable_thinking"] is False
    c = srv.client(KEY)
    for extra, param in (
        ({"continue_final_message": True}, "continue_final_message"),  # add_generation_prompt still true
        ({"continue_final_message": True, "add_generation_prompt": False, "messages": msgs[:1]}, "continue_final_message"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ):  # fmt: skip
        body = {"model": "acme/default", "messages": msgs, "max_tokens": 2, **extra}
        resp = c.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_continuous_usage_stats_on_every_chunk(oai, route):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage so far (completion
    tokens growing to the total), the final usage chunk the request's; without it chunks carry usage null."""
    common = {"max_tokens": 8, "temperature": 0, "stream": True, "extra_body": {"ignore_eos": True}}

    def chunks(**opts):
        if route == "chat":
            msgs = [{"role": "user", "content": "Count"}]
            return list(oai.chat.completions.create(model="acme/chat-bot", messages=msgs, **common, **opts))
        return list(oai.completions.create(model="acme/default", prompt="Count", **common, **opts))

    got = chunks(stream_options={"include_usage": True, "continuous_usage_stats": True})
    *per_choice, last = got
    assert not last.choices and last.usage.completion_tokens == 8
    counts = [c.usage.completion_tokens for c in per_choice]
    assert counts == sorted(counts) and counts[-1] == 8 and counts[0] < 8
    assert all(c.usage.prompt_tokens == last.usage.prompt_tokens for c in per_choice)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in per_choice)
    plain = chunks(stream_options={"include_usage": True})
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 8


def test_echo_of_a_prompt_ending_inside_a_character_the_output_completes(srv):
    """A token-id prompt ending with 3 of the 4 bytes of an emoji, its output the 4th: the output brings the whole
    character, so the echo does not show U+FFFD for the part it had (it did: "...\ufffd🌟"), whole or streamed,
    and text_offset stays on the text."""
    import json

    import httpx

    from server.engine.token_bytes import _byte_level_table

    tok = srv.app.state.ps.bundle.tokenizer
    char_of = {b: ch for ch, b in _byte_level_table().items()}
    ids = [tok.convert_tokens_to_ids(char_of[b]) for b in "Star \N{GLOWING STAR}".encode()]
    body = {"model": "acme/base", "prompt": ids[:-1], "max_tokens": 1, "echo": True, "logprobs": 0}
    body["logit_bias"] = {str(ids[-1]): 100}
    c = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    got = c.post("/v1/completions", json=body).json()["choices"][0]
    assert got["text"] == "Star \N{GLOWING STAR}"
    lp = got["logprobs"]
    assert lp["text_offset"][-1] == len("Star ")  # the completing byte starts where its character does
    r = c.post("/v1/completions", json={**body, "stream": True})
    chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == "Star \N{GLOWING STAR}"
    # an output that does not complete it: the echo keeps its U+FFFD
    body["logit_bias"] = {str(ids[0]): 100}
    assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == "Star \ufffdS"


@pytest.mark.parametrize(
    "field, value",
    [
        ("logits_processors", ["m.Proc"]),
        ("prompt_embeds", "AAAA"),
        ("best_of", 3),
    ],
)
def test_vllm_fields_that_would_change_the_output_are_refused_not_ignored(srv, field, value):
    """vLLM sampling fields this server does not implement: a 400 naming the field on both routes (they were
    ignored, so a client got text they did not constrain with a 200); their defaults are accepted, and other
    unknown fields are still ignored, as vLLM does."""
    c = srv.client(KEY)
    bodies = {
        "/v1/completions": {"model": "acme/default", "prompt": "x", "max_tokens": 2},
        "/v1/chat/completions": {
            "model": "acme/default",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
        },
    }
    default = {"best_of": 1}.get(field)
    for path, body in bodies.items():
        r = c.post(path, json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (path, r.text)
        ok = c.post(path, json={**body, field: default, "some_future_field": 1})
        assert ok.status_code == 200, (path, ok.text)
    r = c.post("/v1/chat/completions", json={**bodies["/v1/chat/completions"], "chat_template": "{{ x }}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text


def test_token_id_prompts_out_of_the_vocabulary_name_the_prompt(srv, api_bundle):
    c = srv.client(KEY)
    vocab = api_bundle.spec.vocab_size
    body = {"model": "acme/default", "max_tokens": 1}
    r = c.post("/v1/completions", json={**body, "prompt": [5, vocab]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and str(vocab) in r.text, r.text
    r = c.post("/v1/completions", json={**body, "prompt": [[5], [vocab - 1], [vocab + 7]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[2]", r.text
    assert c.post("/v1/completions", json={**body, "prompt": [5, vocab - 1]}).status_code == 200


def test_allowed_token_ids_constrain_every_route(srv, api_bundle):
    """vLLM's allowed_token_ids (it was ignored on /v1): only those ids come out, on /v1 and /generate."""
    c = srv.client(KEY)
    vocab = api_bundle.spec.vocab_size
    allowed = [40, 41, 42, 43]  # whole characters of the tiny tokenizer: the text round-trips to them
    comp = {"model": "acme/default", "prompt": "x", "max_tokens": 6, "ignore_eos": True, "logprobs": 0,
            "allowed_token_ids": allowed, "temperature": 1.0, "seed": 1}  # fmt: skip
    out = c.post("/v1/completions", json=comp).json()["choices"][0]
    ids = api_bundle.tokenizer.convert_tokens_to_ids(out["logprobs"]["tokens"])
    assert len(ids) == 6 and set(ids) <= set(allowed), out
    chat = {"model": "acme/default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4,
            "allowed_token_ids": allowed, "ignore_eos": True, "temperature": 0}  # fmt: skip
    text = c.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert set(api_bundle.tokenizer.encode(text, add_special_tokens=False)) <= set(allowed), text
    gen = {
        "tenant_id": "acme",
        "prompt": "x",
        "max_tokens": 4,
        "ignore_eos": True,
        "allowed_token_ids": allowed,
    }
    r = c.post("/generate", json={**gen, "stream": False})
    assert r.status_code == 200 and set(
        api_bundle.tokenizer.encode(r.json()["text"], add_special_tokens=False)
    ) <= set(allowed), r.text
    for bad in ([vocab], [], [-1]):
        r = c.post("/generate", json={**gen, "allowed_token_ids": bad})
        assert r.status_code == 422 and r.json()["error"]["param"].startswith("allowed_token_ids"), r.text
        r = c.post("/v1/completions", json={**comp, "allowed_token_ids": bad})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("allowed_token_ids"), r.text


def test_bad_words_keep_words_out_of_every_route(srv, api_bundle):
    """vLLM's bad_words (it was refused): a one-letter word never comes out, a two-letter word's second letter never
    follows its first; the output up to where a word would have come is unchanged (the tiny tokenizer spells
    text letter by letter)."""
    c = srv.client(KEY)
    letters = api_bundle.tokenizer.convert_tokens_to_ids(list("abcdef"))
    gen = {
        "tenant_id": "acme",
        "prompt": "x",
        "max_tokens": 12,
        "ignore_eos": True,
        "allowed_token_ids": letters,
    }

    def text(**kw) -> str:
        r = c.post("/generate", json={**gen, **kw})
        assert r.status_code == 200, r.text
        return r.json()["text"]

    plain = text()
    assert len(plain) == 12 and set(plain) <= set("abcdef")
    k = next(i for i in range(2, 12) if plain[i] not in plain[:i])  # a letter's first time
    out = text(bad_words=[plain[k]])
    assert out[:k] == plain[:k] and plain[k] not in out
    j = next(i for i in range(1, 11) if plain[i : i + 2] not in plain[:i] + plain[i])  # a pair's first time
    pair = plain[j : j + 2]
    out = text(bad_words=[pair])
    assert out[: j + 1] == plain[: j + 1] and out[j + 1] != plain[j + 1] and pair not in out
    comp = {"model": "acme/default", "prompt": "x", "max_tokens": 12, "ignore_eos": True, "temperature": 0,
            "allowed_token_ids": letters, "bad_words": [plain[k]]}  # fmt: skip
    assert c.post("/v1/completions", json=comp).json()["choices"][0]["text"] == text(bad_words=[plain[k]])
    chat = {"model": "acme/default", "messages": [{"role": "user", "content": "x"}], **comp}
    del chat["prompt"]
    answer = c.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    assert len(answer) == 12 and plain[k] not in answer
    # every token excluded is the request's doing: a 422 saying why, not a server error
    err = assert_error(
        c.post("/generate", json={**gen, "bad_words": list("abcdef")}), 422, "no_token_allowed"
    )
    assert "bad_words" in err["message"]
    r = c.post("/v1/completions", json={**comp, "bad_words": list("abcdef")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_token_allowed", r.text
    limit = srv.svc.settings.max_stop_strings
    for bad, param in (
        ([" "], "bad_words[0]"),
        (["a"] * (limit + 1), "bad_words"),
        (["a", "b" * 300], "bad_words[1]"),
    ):
        r = c.post("/generate", json={**gen, "bad_words": bad})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (bad, r.text)
    choice = {"tenant_id": "acme", "prompt": "x", "max_tokens": 4, "structured_outputs": {"choice": ["a"]}}
    pytest.importorskip("llguidance")
    assert_error(c.post("/generate", json={**choice, "bad_words": ["a"]}), 422, "structured_output_failed")


def test_sagemaker_invocations_serve_chat_and_completion_bodies(srv):
    """SageMaker's POST /invocations (vLLM serves it): a body with `messages` is a chat completion, one with `prompt`
    a completion, the same answers as their /v1 routes; errors as /v1's."""
    c = srv.client(KEY)
    chat = {
        "model": "acme",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    want = c.post("/v1/chat/completions", json=chat).json()
    got = c.post("/invocations", json=chat).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    done = {"model": "acme", "prompt": "Tell me", "max_tokens": 6, "temperature": 0}
    want = c.post("/v1/completions", json=done).json()
    got = c.post("/invocations", json=done).json()
    assert got["object"] == "text_completion" and got["choices"][0]["text"] == want["choices"][0]["text"]
    frames = parse_sse(c.post("/invocations", json={**chat, "stream": True}).text)
    assert (
        frames[-1] == "[DONE]"
        and "".join(f["choices"][0]["delta"].get("content") or "" for f in frames[:-1] if f["choices"])
        == c.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    )
    err = assert_error(c.post("/invocations", json={"model": "acme", "input": "x"}), 400)
    assert "messages" in err["message"]
    err = assert_error(c.post("/invocations", json={**done, "max_tokens": -1}), 400)
    assert err["param"] == "max_tokens"
    assert_error(
        c.post("/invocations", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert_error(srv.client().post("/invocations", json=chat), 401)
    assert_error(c.post("/invocations", json={**chat, "model": "acme/nope"}), 404)
    # SageMaker's clients send no model: the key's tenant on the base model (as the served model name)
    base = c.post("/v1/chat/completions", json={**chat, "model": "acme/base"}).json()["choices"][0]["message"]
    got = c.post("/invocations", json={k: v for k, v in chat.items() if k != "model"})
    assert got.status_code == 200 and got.json()["choices"][0]["message"] == base, got.text
    # what /v1 says of a body that is not JSON, or none
    assert assert_error(c.post("/invocations", content=b"x", headers={"content-type": "text/plain"}), 415)
    assert assert_error(c.post("/invocations", content=b"", headers={"content-type": "application/json"}), 400,
                        "missing_body")  # fmt: skip
    # no body and no Content-Type: what /v1 answers
    assert_error(c.post("/invocations"), 400, "missing_body")
    assert_error(c.post("/v1/chat/completions"), 400, "missing_body")


def test_return_token_ids(srv):
    """vLLM's return_token_ids: the prompt's and the output's token ids beside the text (the prompt's once per
    choice on completions, once per response on chat; streamed: with the first chunk, and each chunk's own
    tokens), the same ids streamed or not; without it, null."""
    c = srv.client(KEY)
    tok = srv.svc.bundle.tokenizer
    done = {"model": "acme", "prompt": "Tell me", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "n": 2}  # fmt: skip
    r = c.post("/v1/completions", json=done).json()
    for choice in r["choices"]:
        assert len(choice["token_ids"]) == 6 and tok.decode(choice["token_ids"]) == choice["text"]
        assert tok.decode(choice["prompt_token_ids"]).endswith("Tell me")
    frames = [
        f
        for f in parse_sse(c.post("/v1/completions", json={**done, "stream": True}).text)[:-1]
        if f["choices"]
    ]
    for i in (0, 1):
        mine = [f["choices"][0] for f in frames if f["choices"][0]["index"] == i]
        assert mine[0]["prompt_token_ids"] == r["choices"][i]["prompt_token_ids"]
        assert all("prompt_token_ids" not in m for m in mine[1:])
        assert [t for m in mine for t in m["token_ids"]] == r["choices"][i]["token_ids"]
    plain = c.post("/v1/completions", json={**done, "return_token_ids": None}).json()["choices"][0]
    assert plain["token_ids"] is None and plain["prompt_token_ids"] is None
    # echo with max_tokens 0: no output tokens
    echo = c.post("/v1/completions", json={**done, "n": 1, "echo": True, "max_tokens": 0}).json()["choices"][
        0
    ]
    assert echo["token_ids"] == [] and echo["prompt_token_ids"] == r["choices"][0]["prompt_token_ids"]
    chat = {"model": "acme/chat-bot", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    r = c.post("/v1/chat/completions", json=chat).json()
    ids = r["choices"][0]["token_ids"]
    assert len(ids) == 5 and tok.decode(ids) == r["choices"][0]["message"]["content"]
    assert "Hi" in tok.decode(r["prompt_token_ids"]) and "prompt_token_ids" not in r["choices"][0]
    frames = [f for f in parse_sse(c.post("/v1/chat/completions", json={**chat, "stream": True}).text)[:-1]]
    assert frames[0]["prompt_token_ids"] == r["prompt_token_ids"]
    assert all("prompt_token_ids" not in f for f in frames[1:])
    assert [t for f in frames for t in f["choices"][0]["token_ids"]] == ids


def test_echoed_raw_prompts_offsets_point_into_the_text_with_a_sentencepiece_vocabulary(server_factory):
    """A raw prompt is echoed as given; with a BOS token and SentencePiece's "▁" its tokens' spellings ("<s>",
    " The", ...) add up to more than it, and every offset after them pointed past the text it names."""
    from tokenizers import processors

    from server.model import bundle_from_model
    from tests.fixtures.models import make_sentencepiece_tokenizer, make_tiny_llama

    tok = make_sentencepiece_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(  # Llama 2's: <s> first
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    s = server_factory(bundle=bundle_from_model(make_tiny_llama(tok, seed=0), tok, name="sp"))
    prompt = "The capital is"
    body = {
        "model": "acme/base",
        "prompt": prompt,
        "max_tokens": 4,
        "echo": True,
        "logprobs": 0,
        "temperature": 0,
    }
    # a special token inside the prompt: SentencePiece puts a "▁" after it too
    mid = "The capital</s>The capital is"
    r = s.client().post("/v1/completions", json={**body, "prompt": mid}).json()["choices"][0]
    tokens, offsets = r["logprobs"]["tokens"], r["logprobs"]["text_offset"]
    n = tokens.index("</s>")
    assert tokens[n + 1] == " The" and offsets[n : n + 3] == [11, 15, 18] and offsets[n + 4] == len(mid)
    assert offsets[:3] == [0, 0, 3]
    for stream in (False, True):
        r = s.client().post("/v1/completions", json={**body, "stream": stream})
        if stream:
            chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
            tokens = [t for lp in lps for t in lp["tokens"]]
            offsets = [o for lp in lps for o in lp["text_offset"]]
        else:
            choice = r.json()["choices"][0]
            text, tokens, offsets = (
                choice["text"],
                choice["logprobs"]["tokens"],
                choice["logprobs"]["text_offset"],
            )
        assert text.startswith(prompt) and tokens[:4] == ["<s>", " The", " capital", " is"], (stream, tokens)
        assert offsets[:4] == [0, 0, 3, 11] and offsets[4] == len(prompt), (stream, offsets)
        for t, at in zip(
            tokens[4:], offsets[4:], strict=True
        ):  # the output's tokens, where the text has them
            assert t.startswith("bytes:") or text[at : at + len(t)] == t, (stream, t, at, text)


def test_a_template_that_loops_over_content_gets_the_parts(srv):
    """As vLLM reads a template (its syntax tree): one that loops over `message['content']` gets text parts (two
    parts "Hello", "world" render as Gemma 3 renders them, "Helloworld"), one that prints the content gets the
    parts joined by newlines."""
    from server.model.chat_content import loops_over_content

    assert loops_over_content(PARTS_TEMPLATE)
    assert not loops_over_content("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not loops_over_content("{% for m in messages %}{% for c in m['role'] %}{% endfor %}{% endfor %}")
    assert not loops_over_content("{% for x in other %}{% for c in x.content %}{% endfor %}{% endfor %}")
    assert not loops_over_content("{% for m in messages %")  # does not parse: strings (rendering says why)
    tok = srv.svc.bundle.tokenizer
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    c = srv.client(KEY)
    for template, text in ((PARTS_TEMPLATE, "Helloworld"), (tok.chat_template, "Hello\nworld")):
        with chat_template(tok, template):
            want = tok.apply_chat_template(
                [msgs[0], {"role": "user", "content": parts if template == PARTS_TEMPLATE else "Hello\nworld"}],
                add_generation_prompt=True, tokenize=False,
            )  # fmt: skip
            assert text in want
            r = c.post("/tokenize", json={"model": "acme/default", "messages": msgs})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == tok(want, add_special_tokens=False)["input_ids"]
    # an empty final assistant message to continue is one empty text part (no part: transformers finds nothing
    # to continue and raises), as vLLM gives it
    with chat_template(tok, PARTS_TEMPLATE):
        for empty in ("", None):
            opts = {"add_generation_prompt": False, "continue_final_message": True}
            body = {
                "model": "acme/default",
                "messages": [*msgs, {"role": "assistant", "content": empty}],
                **opts,
            }
            r = c.post("/tokenize", json=body)
            assert r.status_code == 200, r.text
            assert tok.decode(r.json()["tokens"]).endswith("<assistant>")
    # a message's text copied or pickled keeps its parts (made again from them, not from the joined text)
    import copy
    import pickle

    from server.model.chat_content import message_text

    text = message_text(parts)
    for again in (copy.copy(text), copy.deepcopy(text), pickle.loads(pickle.dumps(text))):
        assert again == "Hello\nworld" and again.parts == ("Hello", "world")


def test_a_content_part_that_cannot_be_served_is_named_where_it_is(srv):
    """A part other than text is a 400 naming the part (`messages[1].content[1]`), a text part that is not valid
    text names the message's content; both said `messages`, on chat, /tokenize and /invocations alike."""
    c = srv.client(KEY)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"type": "text", "text": "look"}, image]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    for path in ("/v1/chat/completions", "/tokenize", "/invocations"):
        err = assert_error(c.post(path, json={"model": "acme/default", "messages": msgs}), 400)
        assert (err["code"], err["param"]) == ("unsupported_content", "messages[1].content[1]"), (path, err)
    bad = [{"role": "user", "content": [{"type": "text", "text": "a\ud800b"}]}]
    r = c.post("/v1/chat/completions", content=json.dumps({"model": "acme/default", "messages": bad}),
               headers={"content-type": "application/json"})  # fmt: skip
    err = assert_error(r, 400)  # (the /v1 routes answer invalid fields 400, as OpenAI)
    assert err["param"] == "messages[0].content", err
