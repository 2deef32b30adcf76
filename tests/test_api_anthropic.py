"""Anthropic's Messages API with the official `anthropic` package: the chat path's answer as Anthropic's message
(text, tool_use and thinking blocks, stop reasons, usage), streamed as its events, its key header and error shape,
and count_tokens."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.server import (
    PARTS_TEMPLATE,
    assert_error,
    chat_template,
    size_fields_named,
    template_calls,
)

anthropic = pytest.importorskip("anthropic")

KEY = "sk-acme-claude"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def srv(server_factory):
    return server_factory(
        prefixes={("acme", "bot"): {"seed": 5, "prompt_format": "chat"}}, keys={"acme": KEY}
    )


@pytest.fixture
def claude(srv):
    with anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0) as client:
        yield client


def chat(srv, **kw):
    body = {"model": "acme/bot", "messages": ASK, "max_tokens": 8, "temperature": 0, **kw}
    r = srv.client(KEY).post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def total_input(msg) -> int:
    """The prompt's tokens as Anthropic's usage splits them: those not read from the (prompt) cache + those read."""
    return msg.usage.input_tokens + msg.usage.cache_read_input_tokens + msg.usage.cache_creation_input_tokens


def _play_deltas(monkeypatch, deltas) -> None:
    """The chat stream's chunks replaced by `deltas` ((delta, finish) pairs), the run still running to its end."""
    import server.api.routes_anthropic as ra

    real = ra.chat_stream

    async def playback(run, chunk, text, tools):
        async for _ in real(run, chunk, text, tools):
            pass
        for delta, finish in deltas:
            yield chunk(delta, finish)

    monkeypatch.setattr(ra, "chat_stream", playback)


def test_a_message_is_the_chat_answer(srv, claude):
    want = chat(srv)
    msg = claude.messages.create(model="acme/bot", max_tokens=8, messages=ASK, extra_body={"temperature": 0})
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "acme/bot"
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == want["choices"][0]["message"]["content"]
    finish = want["choices"][0]["finish_reason"]
    assert (
        msg.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[finish] and msg.stop_sequence is None
    )
    assert total_input(msg) == want["usage"]["prompt_tokens"]
    assert msg.usage.output_tokens == want["usage"]["completion_tokens"]
    # the chat just computed this prompt: most of it comes from the prompt cache, and input_tokens is the rest
    assert msg.usage.cache_read_input_tokens > 0
    assert msg.usage.input_tokens == want["usage"]["prompt_tokens"] - msg.usage.cache_read_input_tokens
    # the system prompt and a list of text blocks reach the template as the chat's do
    sys_msg = claude.messages.create(
        model="acme/bot",
        max_tokens=8,
        extra_body={"temperature": 0},
        system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": ASK[0]["content"]}]}],
    )
    want = chat(srv, messages=[{"role": "system", "content": "Be brief."}, *ASK])
    assert sys_msg.content[0].text == want["choices"][0]["message"]["content"]
    assert total_input(sys_msg) == want["usage"]["prompt_tokens"]


def _blocks(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def test_text_blocks_reach_a_template_that_loops_over_them_as_the_chats_text_parts(srv):
    """A list of text blocks (system, user, assistant, a tool_result's) is the chat message's text parts: a template
    that loops over a message's content (Gemma 3's) gets them as parts, as from /v1/chat/completions ("Hello",
    "world" render "Helloworld", not "Hello\\nworld"), so the prompt is the same tokens (the chat path runs it)."""
    tok = srv.svc.bundle.tokenizer
    call = {
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    chat_messages = [
        {"role": "system", "content": _blocks("Be", "brief.")},
        {"role": "user", "content": _blocks("Hello", "world")},
        {"role": "assistant", "content": _blocks("Let me", "look."), "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": _blocks("Error: no", "network")},
        {"role": "user", "content": _blocks("Try", "again")},
    ]
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "is_error": True,
        "content": _blocks("no", "network"),
    }
    body = {
        "model": "acme/bot",
        "max_tokens": 1,
        "system": _blocks("Be", "brief."),
        "messages": [
            {"role": "user", "content": _blocks("Hello", "world")},
            {"role": "assistant", "content": [*_blocks("Let me", "look."), use]},
            {"role": "user", "content": [result, *_blocks("Try", "again")]},
        ],
    }
    c = srv.client(KEY)
    with chat_template(tok, PARTS_TEMPLATE), template_calls(tok) as seen:
        chat = c.post(
            "/v1/chat/completions", json={"model": "acme/bot", "messages": chat_messages, "max_tokens": 1}
        )
        assert chat.status_code == 200, chat.text
        msg = c.post("/v1/messages", json=body)
        assert msg.status_code == 200, msg.text
        count = c.post("/v1/messages/count_tokens", json=body)
        assert count.status_code == 200, count.text
        tokens = c.post("/tokenize", json={"model": "acme/bot", "messages": chat_messages}).json()["tokens"]
    assert "<user>Helloworld</s><assistant>Let melook.</s><tool>Error: nonetwork</s>" in tok.decode(tokens)
    usage = msg.json()["usage"]
    total = usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"]
    assert total == count.json()["input_tokens"] == chat.json()["usage"]["prompt_tokens"] == len(tokens)
    # the template got the same messages (chat, messages, count_tokens, tokenize): the same parts
    assert len(seen) == 4 and all(s[0] == seen[0][0] for s in seen)
    # a text block's text is checked as the chat's is, and the error names the block
    bad = {**body, "messages": [{"role": "user", "content": _blocks("a", "b\u0000")}]}
    r = c.post("/v1/messages", json=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[1].text", r.text


def test_streamed_events_make_the_same_message(claude):
    kw = {"model": "acme/bot", "max_tokens": 10, "messages": ASK, "extra_body": {"temperature": 0}}
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    # the raw events: Anthropic's order
    raw = claude.messages.create(**kw, stream=True)
    kinds = [ev.type for ev in raw]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds


def test_stop_sequences(claude):
    kw = {"model": "acme/bot", "max_tokens": 16, "messages": ASK, "extra_body": {"temperature": 0}}
    text = claude.messages.create(**kw).content[0].text
    stop = next(
        text[i : i + 2]
        for i in range(1, len(text) - 2)
        if text[i : i + 2].strip() and text.find(text[i : i + 2]) == i
    )
    msg = claude.messages.create(**kw, stop_sequences=[stop])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == text[: text.index(stop)]


def test_a_forced_tool_call_is_a_tool_use_block(srv, claude):
    pytest.importorskip("llguidance")
    kw = {"model": "acme/bot", "max_tokens": 40, "messages": ASK, "extra_body": {"temperature": 0}, "tools": [WEATHER],
          "tool_choice": {"type": "tool", "name": "get_weather"}}  # fmt: skip
    msg = claude.messages.create(**kw)
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input["city"], str) and use.id.startswith("toolu_")
    with claude.messages.stream(**kw) as s:
        final = s.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert (
        streamed.input == use.input and final.stop_reason == "tool_use" and streamed.id.startswith("toolu_")
    )
    # the call and its result sent back: the next turn is the chat's with the same turns
    turns = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
    ]
    nxt = claude.messages.create(
        model="acme/bot", max_tokens=6, messages=turns, extra_body={"temperature": 0}
    )
    want = chat(
        srv,
        max_tokens=6,
        messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
            {"role": "tool", "tool_call_id": use.id, "content": "sunny"},
        ],
    )  # fmt: skip
    assert total_input(nxt) == want["usage"]["prompt_tokens"]
    assert nxt.content[0].text == want["choices"][0]["message"]["content"]
    count = claude.messages.count_tokens(model="acme/bot", messages=turns)
    assert count.input_tokens == want["usage"]["prompt_tokens"]


def test_errors_in_anthropics_shape(srv, claude):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="acme/nope", max_tokens=4, messages=ASK)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(
            model="acme/bot",
            max_tokens=4,
            messages=[
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}
            ],
        )
    assert e.value.body["error"]["param"] == "messages[0].content[0].type"
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0).messages.create(
            model="acme/bot", max_tokens=4, messages=ASK
        )
    assert e.value.body["error"]["type"] == "authentication_error"
    c = srv.client(KEY)
    r = c.post("/v1/messages", json={"model": "acme/bot", "messages": ASK})  # max_tokens is required
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and r.json()["type"] == "error"
    r = c.post("/v1/messages", json={"model": "acme/bot", "max_tokens": 4, "messages": ASK,
                                      "tool_choice": {"type": "tool"}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    # the key as x-api-key works on the other routes too
    r = srv.client().post("/v1/chat/completions", headers={"x-api-key": KEY},
                          json={"model": "acme/bot", "messages": ASK, "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    # beside an Authorization header without a key (empty, or `Bearer ` alone): the x-api-key counts either way
    for empty in ("", "Bearer"):  # (on the wire `Bearer ` is `Bearer`: trailing blanks are not kept)
        r = srv.client().post("/v1/messages", headers={"x-api-key": KEY, "authorization": empty},
                              json={"model": "acme/bot", "messages": ASK, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200, (empty, r.text)
    # a wrong Bearer key is not rescued by a right x-api-key
    r = srv.client().post("/v1/messages", headers={"x-api-key": KEY, "authorization": "Bearer wrong"},
                          json={"model": "acme/bot", "messages": ASK, "max_tokens": 2})  # fmt: skip
    assert r.status_code == 401


def test_size_errors_name_only_the_messages_fields(server_factory):
    """A prompt too long for the context (or max_prompt_tokens) is told of in the Messages request's own field
    names wherever the message names one: `messages` and `max_tokens`, never another route's (its sum of the sizes
    said "prompt (259) + max_tokens (30)")."""
    c = server_factory(max_model_len=64, max_prompt_tokens=200).client()
    for text, max_tokens, param in (("hello " * 40, 30, "messages"), ("hello " * 4, 60, "max_tokens")):
        body = {
            "model": "acme/base",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        }
        r = c.post("/v1/messages", json=body)
        assert r.status_code == 400 and r.json()["type"] == "error", r.text
        err = r.json()["error"]
        assert err["param"] == param and size_fields_named(err["message"]) == {"messages", "max_tokens"}, err
    c = server_factory(max_model_len=64, max_prompt_tokens=20).client()
    body = {"model": "acme/base", "max_tokens": 1, "messages": [{"role": "user", "content": "hello " * 8}]}
    r = c.post("/v1/messages", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and size_fields_named(err["message"]) == {"messages"}, err


def test_output_config_format_and_thinking_blocks(server_factory, srv, claude):
    """output_config.format (Anthropic's structured outputs) holds the answer to its schema; with a reasoning parser
    the thinking is a `thinking` block before the text, streamed as thinking deltas."""
    pytest.importorskip("llguidance")
    from tokenizers import AddedToken

    from server.model import bundle_from_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    msg = claude.messages.create(
        model="acme/bot",
        max_tokens=30,
        messages=ASK,
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body={"temperature": 0},  # (sampled, it once wrote 20 whitespace tokens: below)
    )
    if msg.stop_reason == "end_turn":
        assert isinstance(json.loads(msg.content[0].text)["n"], int)
    else:  # cut by max_tokens: still a prefix of such an object, whose whitespace JSON allows between tokens
        compact = "".join(msg.content[0].text.split())  # ('{\t"n"\t\t \n\r:\r\n12\t': '{"n":12')
        assert compact.startswith('{"n"') or '{"n":'.startswith(compact), msg.content[0].text
    tok = make_tiny_tokenizer()
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    bundle = bundle_from_model(make_tiny_llama(tok, seed=0), tok, name="tiny-thinker")
    s = server_factory(bundle=bundle, prefixes={("acme", "bot"): {"seed": 5}}, reasoning_parser="deepseek_r1")
    with anthropic.Anthropic(base_url=s.url, api_key="none", max_retries=0) as c:
        kw = {"model": "acme/bot", "max_tokens": 8, "messages": ASK, "extra_body": {"temperature": 0}}
        whole = c.messages.create(**kw)
        with c.messages.stream(**kw) as st:
            final = st.get_final_message()
    # (R1's convention: the output starts inside the thinking, which these 8 tokens do not close)
    assert whole.content[0].type == "thinking" and whole.content[0].thinking
    assert [(b.type, getattr(b, "thinking", None)) for b in final.content] == [
        (b.type, getattr(b, "thinking", None)) for b in whole.content
    ]


def test_the_structured_outputs_betas_output_format(srv):
    """`output_format` (the structured-outputs beta's field, before output_config.format) holds the answer to its
    schema as output_config.format does (it was ignored: unconstrained text); given both, or malformed, it is a
    400 naming it; a schema that does not compile names the field it came in."""
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "schema": schema}
    c = srv.client(KEY)
    base = {"model": "acme/bot", "max_tokens": 40, "messages": ASK, "temperature": 0}
    beta = c.post("/v1/messages", json={**base, "output_format": fmt})
    ga = c.post("/v1/messages", json={**base, "output_config": {"format": fmt}})
    assert beta.status_code == ga.status_code == 200, (beta.text, ga.text)
    assert beta.json()["content"] == ga.json()["content"]
    text = ga.json()["content"][0]["text"]
    assert "".join(text.split()).startswith('{"n"'), text
    both = {**base, "output_format": fmt, "output_config": {"format": fmt}}
    for body, param in (
        (both, "output_format"),
        ({**base, "output_format": {"type": "json_schema"}}, "output_format"),
        ({**base, "output_config": {"format": {"type": "json"}}}, "output_config.format"),
    ):
        err = assert_error(c.post("/v1/messages", json=body), 400)
        assert err["param"] == param, err
    bad = {"type": "json_schema", "schema": {"type": "nope"}}
    for body, param in (
        ({**base, "output_format": bad}, "output_format.schema"),
        ({**base, "output_config": {"format": bad}}, "output_config.format.schema"),
    ):  # (it named response_format.json_schema.schema, a field Anthropic's API does not have)
        err = assert_error(c.post("/v1/messages", json=body), 400)
        assert err["param"] == param and err["message"].startswith(f"invalid {param}: "), err
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    body = {**base, "output_format": fmt, "tools": tools, "tool_choice": {"type": "any"}}
    err = assert_error(c.post("/v1/messages", json=body), 400)
    assert err["param"] == "output_format" and "response_format" not in err["message"], err


def test_stream_blocks_in_order_with_repeats_and_odd_tool_arguments(srv, claude, monkeypatch):
    """Played-back chat deltas (thinking, text, a call, the same text again, a call whose arguments are not an
    object): every block starts and stops at its own index, once; a call's input is an object streamed or not."""
    deltas = [
        ({"reasoning_content": "hm"}, None),
        ({"content": "X"}, None),
        (
            {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            None,
        ),
        ({"content": "X"}, None),
        ({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": "hello"}}]}, None),
        ({}, "tool_calls"),
    ]

    _play_deltas(monkeypatch, deltas)
    kw = {"model": "acme/bot", "max_tokens": 4, "messages": ASK}
    events = list(claude.messages.create(**kw, stream=True))
    starts = [(e.index, e.content_block.type) for e in events if e.type == "content_block_start"]
    stops = [e.index for e in events if e.type == "content_block_stop"]
    assert starts == [(0, "thinking"), (1, "text"), (2, "tool_use"), (3, "text"), (4, "tool_use")]
    assert stops == [0, 1, 2, 3, 4]
    partial = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == 4]
    assert partial == ["{}"]
    whole = claude.messages.create(**kw)
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use", "text", "tool_use"]
    assert (
        whole.content[2].input == {"a": 1}
        and whole.content[4].input == {}
        and whole.stop_reason == "tool_use"
    )
    with claude.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in final.content] == [
        b.model_dump(exclude_none=True) for b in whole.content
    ]


def test_prefill_empty_turns_and_errors_before_the_route(srv, claude):
    c = srv.client(KEY)
    # a last assistant turn is a prefill: the answer continues it (chat's continue_final_message), without it
    turns = [*ASK, {"role": "assistant", "content": "The weather is"}]
    msg = claude.messages.create(
        model="acme/bot", max_tokens=6, messages=turns, extra_body={"temperature": 0}
    )
    want = chat(srv, messages=turns, max_tokens=6, continue_final_message=True, add_generation_prompt=False)
    assert msg.content[0].text == want["choices"][0]["message"]["content"]
    assert total_input(msg) == want["usage"]["prompt_tokens"]
    # an empty last assistant turn says nothing; any other empty turn is refused, as Anthropic does
    empty = claude.messages.create(
        model="acme/bot", max_tokens=2, messages=[*ASK, {"role": "assistant", "content": ""}]
    )
    assert total_input(empty) == claude.messages.count_tokens(model="acme/bot", messages=ASK).input_tokens
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(
            model="acme/bot", max_tokens=2, messages=[{"role": "user", "content": []}, *ASK]
        )
    assert e.value.body["error"]["param"] == "messages[0].content"
    # answered before the route runs (the key, the method): still Anthropic's shape
    r = srv.client().post("/v1/messages", json={"model": "acme/bot", "max_tokens": 2, "messages": ASK})
    assert r.status_code == 401 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "authentication_error"
    r = c.get("/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_a_call_announced_with_its_first_argument_piece_streams_whole(srv, claude, monkeypatch):
    """A forced call under a reasoning parser is announced with the first piece of its arguments (`{"ci`): that
    piece goes as it is, so the pieces join into the input, streamed or not (it was replaced by `{}`)."""
    deltas = [
        (
            {
                "tool_calls": [
                    {"index": 0, "id": "c1", "function": {"name": "get_weather", "arguments": '{"ci'}}
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}, None),
        ({}, "stop"),
    ]

    _play_deltas(monkeypatch, deltas)
    kw = {"model": "acme/bot", "max_tokens": 4, "messages": ASK}
    events = list(claude.messages.create(**kw, stream=True))
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert "".join(pieces) == '{"city": "Paris"}'
    whole = claude.messages.create(**kw)
    assert whole.content[0].input == {"city": "Paris"} and whole.stop_reason == "tool_use"


def test_a_prompt_too_long_is_the_same_400_for_messages_and_count_tokens(server_factory):
    """Anthropic answers a prompt past the context as a 400 `invalid_request_error`; /v1/messages did, its
    count_tokens answered the same body a 413 (a prompt of more characters than the token limit could hold, refused
    before tokenizing; one of fewer characters is counted, whatever its tokens)."""
    s = server_factory(prefixes={("acme", "bot"): {"seed": 5, "prompt_format": "chat"}}, max_prompt_tokens=16)
    c = s.client()
    most = 2 * 16 * s.svc.max_token_chars
    body = {"model": "acme/bot", "max_tokens": 4, "messages": [{"role": "user", "content": "x" * (most + 1)}]}
    msg, count = c.post("/v1/messages", json=body), c.post("/v1/messages/count_tokens", json=body)
    assert msg.status_code == count.status_code == 400, (msg.text, count.text)
    assert msg.json()["error"]["type"] == count.json()["error"]["type"] == "invalid_request_error"
    assert "maximum context length" in count.json()["error"]["message"], count.text
