"""OpenAI's Responses API (POST /v1/responses) with the official `openai` package: the same answers as the chat
route it is served by (text, logprobs, function calls, structured output), the Responses API's stream of typed
events, multi-turn input with function call items, and what a stateless server refuses (400s naming the field, as OpenAI answers an invalid value)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fixtures.server import (
    PARTS_TEMPLATE,
    assert_error,
    chat_template,
    size_fields_named,
    template_calls,
)

KEY = "sk-acme-responses"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
GREEDY = {"model": "acme", "temperature": 0, "max_output_tokens": 8}


@pytest.fixture
def srv(server_factory):
    return server_factory(
        prefixes={("acme", "default"): {"seed": 5}}, keys={"acme": KEY}, max_prompt_tokens=128
    )


@pytest.fixture
def oai(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


def _chat(oai, messages, **kw):
    return oai.chat.completions.create(model="acme", messages=messages, temperature=0, max_tokens=8, **kw)


def test_an_answer_is_the_chat_routes_answer(oai):
    r = oai.responses.create(input="Hello there", instructions="Be brief.", **GREEDY)
    chat = _chat(
        oai, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "acme"
    # the id is the request's X-Request-ID (as the chat and completion ids)
    assert oai.responses.create(input="Hi", extra_headers={"X-Request-ID": "t-9"}, **GREEDY).id == "resp_t-9"
    assert [item.type for item in r.output] == ["message"]
    msg = r.output[0]
    assert msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.output_text == chat.choices[0].message.content
    # a random model runs to the limit: incomplete (the message too), as OpenAI says of a max_output_tokens cut
    assert chat.choices[0].finish_reason == "length"
    assert r.status == msg.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert r.instructions == "Be brief." and r.max_output_tokens == 8 and r.store is False


def test_the_stream_is_typed_events_that_add_up_to_the_answer(oai):
    r = oai.responses.create(
        input="Hello there", **GREEDY, include=["message.output_text.logprobs"], top_logprobs=2
    )
    events = list(
        oai.responses.create(
            input="Hello there",
            **GREEDY,
            include=["message.output_text.logprobs"],
            top_logprobs=2,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == r.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == r.output_text and final.usage.output_tokens == r.usage.output_tokens
    # logprobs: each delta's tokens, and all of them on the part; the same numbers as the unstreamed answer
    want = r.output[0].content[0].logprobs
    assert len(want) == 8 and all(len(lp.top_logprobs) == 2 for lp in want)
    streamed = [lp for e in deltas for lp in e.logprobs]
    assert [(lp.token, round(lp.logprob, 4)) for lp in streamed] == [
        (lp.token, round(lp.logprob, 4)) for lp in want
    ]
    assert final.output[0].content[0].logprobs == want
    # the item added first has no part yet (content_part.added brings it): the SDK's snapshot holds one part
    assert events[2].item.content == [] and len(final.output[0].content) == 1
    assert final.output[0].status == "incomplete"
    # top_logprobs alone asks for nothing: include decides (OpenAI's and vLLM's)
    alone = oai.responses.create(input="Hello there", **GREEDY, top_logprobs=2)
    assert alone.output[0].content[0].logprobs in (None, [])


def test_a_forced_call_is_a_function_call_item_streamed_or_not(oai):
    pytest.importorskip("llguidance")
    named = {"type": "function", "name": "get_weather"}
    r = oai.responses.create(
        model="acme", input="Weather in Paris?", tools=[WEATHER], tool_choice=named, temperature=0
    )
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}
    events = list(
        oai.responses.create(
            model="acme", input="Weather in Paris?", tools=[WEATHER], tool_choice="required", temperature=0,
            parallel_tool_calls=False, stream=True,
        )
    )  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == args and set(json.loads(args)) == {"city"}
    assert kinds[-1] == "response.completed"
    (item,) = events[-1].response.output
    assert item.type == "function_call" and item.arguments == args and item.status == "completed"


def test_a_call_cut_short_is_an_incomplete_item(oai):
    """A forced call whose arguments max_output_tokens cut: the item says incomplete (its arguments are not JSON),
    streamed or not."""
    pytest.importorskip("llguidance")
    ask = {"model": "acme", "input": "Weather?", "tools": [WEATHER], "tool_choice": "required",
           "temperature": 0, "max_output_tokens": 40}  # fmt: skip
    r = oai.responses.create(**ask)
    assert r.status == "incomplete" and [(i.type, i.status) for i in r.output] == [
        ("function_call", "incomplete")
    ]
    events = list(oai.responses.create(**ask, stream=True))
    assert events[-1].type == "response.incomplete"
    assert [(i.type, i.status) for i in events[-1].response.output] == [("function_call", "incomplete")]


def test_an_error_mid_stream_is_an_error_event_and_response_failed(srv):
    """The engine ends the request after the stream began (here: every request failed, as a shutdown does): an
    `error` event, then `response.failed`, numbered on from the events before."""
    import httpx

    body = {"model": "acme", "input": "Hello", "max_output_tokens": 400, "ignore_eos": True, "stream": True}
    kinds, events = [], []
    with (
        httpx.Client(timeout=30) as c,
        c.stream(
            "POST", srv.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                kinds.append(events[-1]["type"])
                if kinds.count("response.output_text.delta") == 3:
                    srv.svc.engine.fail_all("the test stops it", "ShuttingDown")
    assert kinds[-2:] == ["error", "response.failed"], kinds
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-2]["code"] == "shutting_down" and events[-1]["response"]["status"] == "failed"
    # the response's error code is one of OpenAI's few (the SDK's type checks it): the event has ours
    assert events[-1]["response"]["error"]["code"] == "server_error"
    openai.types.responses.Response.model_validate(events[-1]["response"])
    # the failed response holds what was sent, cut short
    sent = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    (item,) = events[-1]["response"]["output"]
    assert item["content"][0]["text"] == sent != "" and item["status"] == "incomplete"


def test_truncation_auto_drops_whole_oldest_items_and_keeps_the_instructions(srv, oai):
    """OpenAI's truncation "auto": an input too long loses its oldest items, whole (never the instructions), until
    it fits; one that fits is left as it is."""
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "w " * 8} for i in range(9)
    ]
    fits = oai.responses.create(input=turns[-2:], instructions="Be a pirate.", truncation="auto", **GREEDY)
    chat = _chat(oai, [{"role": "system", "content": "Be a pirate."}, *turns[-2:]])
    assert fits.usage.input_tokens == chat.usage.prompt_tokens  # untouched
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(input=turns, instructions="Be a pirate.", **GREEDY)
    cut = oai.responses.create(input=turns, instructions="Be a pirate.", truncation="auto", **GREEDY)
    # what it kept: the instructions and the newest turns that fit, each whole
    c = srv.client(KEY)
    for k in range(1, 9):
        msgs = [{"role": "system", "content": "Be a pirate."}, *turns[k:]]
        n = c.post("/tokenize", json={"prefix": "default", "messages": msgs}).json()["count"]
        if n <= 128:
            break
    assert cut.usage.input_tokens == n and k > 1


def test_function_call_items_and_their_outputs_are_the_chat_turns(oai):
    turns = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]
    r = oai.responses.create(input=turns, tools=[WEATHER], **GREEDY)
    chat = _chat(
        oai,
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
    )
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.output_text == (chat.choices[0].message.content or "")


def test_text_format_json_schema_is_followed(oai):
    pytest.importorskip("llguidance")
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    r = oai.responses.create(
        model="acme",
        input="Answer in JSON",
        temperature=0,
        max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"ok"}


REFUSED = [
    ({"previous_response_id": "resp_123"}, 400, "previous_response_id"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"background": True}, 400, "background"),
    ({"reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"include": ["file_search_call.results"]}, 400, "include[0]"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        "input[0].content[0]",
    ),
    ({"input": [{"role": "robot", "content": "hi"}]}, 400, "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0].type"),
    ({"input": []}, 400, "input"),
    ({"max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ({"text": {"format": {"type": "yaml"}}}, 400, "text.format"),
    ({"model": "other-tenant"}, 404, "model"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id"),
    ({"tools": [{"type": "function", "parameters": {}}]}, 400, "tools[0].name"),
    ({"prompt": {"id": "pmpt_1"}}, 400, "prompt"),
    # the item the error is in, in the Responses request's own names (not the chat request's it becomes)
    (
        {
            "instructions": "Be brief.",
            "input": [{"role": "user", "content": "hi"}, {"role": "user", "content": "a\u0000b"}],
        },
        400,
        "input[1].content",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a\u0000b"}]}]},
        400,
        "input[0].content[0].text",
    ),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, 400, "tools[0].name"),
]


def test_size_errors_name_only_the_responses_fields(server_factory):
    """A prompt too long for the context (or max_prompt_tokens) is told of in the Responses request's own field
    names wherever the message names one: `input` and `max_output_tokens`, never chat's (its sum of the sizes said
    "prompt (259) + max_output_tokens (30)")."""
    c = server_factory(max_model_len=64, max_prompt_tokens=200).client()
    for text, more, param, named in (
        ("hello " * 80, {}, "input", {"input"}),  # no max_output_tokens: the prompt alone is to blame
        ("hello " * 40, {"max_output_tokens": 30}, "input", {"input", "max_output_tokens"}),
        ("hello " * 4, {"max_output_tokens": 60}, "max_output_tokens", {"input", "max_output_tokens"}),
    ):
        body = {"model": "acme/base", "input": text, **more}
        err = assert_error(c.post("/v1/responses", json=body), 400, "context_length_exceeded")
        assert err["param"] == param and size_fields_named(err["message"]) == named, err
    c = server_factory(max_model_len=64, max_prompt_tokens=20).client()
    err = assert_error(c.post("/v1/responses", json={"model": "acme/base", "input": "hello " * 8}), 400)
    assert err["param"] == "input" and size_fields_named(err["message"]) == {"input"}, err


def test_what_a_stateless_text_server_refuses(srv):
    c = srv.client(KEY)
    for extra, status, param in REFUSED:
        body = {"model": "acme", "input": "hi", "max_output_tokens": 4, **extra}
        err = assert_error(c.post("/v1/responses", json=body), status)
        assert err["param"] == param, (extra, err)


def _parts(kind: str, *texts: str) -> list[dict]:
    return [{"type": kind, "text": t} for t in texts]


def test_text_parts_reach_a_template_that_loops_over_them_as_the_chat_routes_do(srv):
    """A message's text parts (input_text, output_text) are the chat message's text parts: a template that loops
    over a message's content (Gemma 3's) gets them as parts, as from /v1/chat/completions ("Hello", "world" render
    "Helloworld", not "Hello\\nworld"), so the prompt is the same tokens (the route is served by the chat route)."""
    tok = srv.svc.bundle.tokenizer
    chat_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": _parts("text", "Hello", "world")},
        {"role": "assistant", "content": _parts("text", "Hi", "there")},
        {"role": "user", "content": _parts("text", "How", "are you?")},
    ]
    items = [
        {"type": "message", "role": "user", "content": _parts("input_text", "Hello", "world")},
        {"type": "message", "role": "assistant", "content": _parts("output_text", "Hi", "there")},
        {"type": "message", "role": "user", "content": _parts("input_text", "How", "are you?")},
    ]
    c = srv.client(KEY)
    with chat_template(tok, PARTS_TEMPLATE), template_calls(tok) as seen:
        chat = c.post(
            "/v1/chat/completions", json={"model": "acme", "messages": chat_messages, "max_tokens": 1}
        )
        assert chat.status_code == 200, chat.text
        r = c.post(
            "/v1/responses",
            json={"model": "acme", "instructions": "Be brief.", "input": items, "max_output_tokens": 1},
        )
        assert r.status_code == 200, r.text
        tokens = c.post("/tokenize", json={"model": "acme", "messages": chat_messages}).json()["tokens"]
    assert "<user>Helloworld</s><assistant>Hithere</s>" in tok.decode(tokens)
    assert r.json()["usage"]["input_tokens"] == chat.json()["usage"]["prompt_tokens"] == len(tokens)
    # the template got the same messages (chat, responses, tokenize): the same parts
    assert len(seen) == 3 and seen[1][0] == seen[0][0] == seen[2][0]


def _stream_final(srv, body: dict) -> dict:
    with srv.client(KEY).stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    return events[-1]["response"]


def _items(response: dict) -> list[tuple]:
    """The output items without their ids (and call ids): what must be the same streamed or not."""
    out = []
    for item in response["output"]:
        if item["type"] == "message":
            part = item["content"][0]
            out.append(("message", item["status"], part["text"], part.get("logprobs")))
        else:
            out.append((item["type"], item["status"], item["name"], item["arguments"]))
    return out


def test_streamed_or_not_the_same_items_text_call_text_each_with_its_own_logprobs(srv, monkeypatch):
    """tool_choice auto with text, a call, then more text: three items in that order either way (unstreamed it
    used to be one message of both texts before the call, with every token's logprobs); each message's logprobs
    are its own text's; the objects pass the openai package's own types (usage's cache_write_tokens included)."""
    pytest.importorskip("llguidance")
    from server.api import routes_responses

    text = 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>Done.'
    regex = text.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")
    real = routes_responses.chat_request

    def forced(body):  # the tiny model writes this (the Responses API has no structured_outputs field)
        chat = real(body)
        forced = type(chat).model_validate(
            {**chat.model_dump(exclude_unset=True), "structured_outputs": {"regex": regex}}
        )
        forced._drop_turns = chat._drop_turns
        return forced

    monkeypatch.setattr(routes_responses, "chat_request", forced)
    body = {
        "model": "acme", "input": "Weather?", "tools": [WEATHER], "temperature": 0, "max_output_tokens": 120,
        "include": ["message.output_text.logprobs"],
    }  # fmt: skip
    r = srv.client(KEY).post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    plain = r.json()
    streamed = _stream_final(srv, body)
    assert _items(plain) == _items(streamed)
    kinds = [(k, s, t) for k, s, t, _ in _items(plain)]
    assert kinds == [
        ("message", "completed", "Sure."),
        ("function_call", "completed", "get_weather"),
        ("message", "completed", "Done."),
    ]
    first, last = plain["output"][0]["content"][0]["logprobs"], plain["output"][2]["content"][0]["logprobs"]
    assert "".join(lp["token"] for lp in first) == "Sure."
    assert "".join(lp["token"] for lp in last) == "Done."  # (the grammar ends it: no end-of-sequence token)
    for resp in (plain, streamed):
        openai.types.responses.Response.model_validate(resp)
        assert resp["usage"]["input_tokens_details"]["cache_write_tokens"] == 0


def test_message_logprobs_are_the_tokens_of_its_text_however_the_chunks_group_them():
    from server.api.routes_responses import _TokenText

    def lp(text):
        return {"token": text, "bytes": list(text.encode()), "logprob": -1.0}

    t = _TokenText()
    # one chunk: the end of a text, a call's markup and arguments, and the start of the next text
    t.add([lp("Su"), lp("re."), lp("<tool_call>"), lp('{"a": 1}'), lp("</tool_call>"), lp("Do")])
    assert [e["token"] for e in t.take("Sure.")] == ["Su", "re."]
    t.add([lp("ne."), lp("<|im_end|>")])
    assert [e["token"] for e in t.take("Done.")] == ["Do", "ne."]
    assert [e["token"] for e in t.rest()] == ["<|im_end|>"]  # the end-of-sequence token: the last message's
    # text after a call that its arguments hold too: looked for after the call's block (a hermes block is passed
    # over once its call is sent)
    t = _TokenText()
    t.add(
        [
            lp("Sure."),
            lp("<tool_call>"),
            lp('{"a": "Done."}'),
            lp("</tool_call>"),
            lp("Done."),
            lp("<|im_end|>"),
        ]
    )
    assert [e["token"] for e in t.take("Sure.")] == ["Sure."]
    t.pass_over("</tool_call>")
    assert [e["token"] for e in t.take("Done.")] == ["Done."] and [e["token"] for e in t.rest()] == [
        "<|im_end|>"
    ]
    # a token across the text's end goes with the text; one of several bytes is one entry
    t = _TokenText()
    t.add([lp("ok<"), lp("tool"), lp("é")])
    assert [e["token"] for e in t.take("ok")] == ["ok<"]
    assert [e["token"] for e in t.take("é")] == ["é"] and t.rest() == []


def test_developer_parts_call_outputs_metadata_and_text_format_as_openai_names_them(srv):
    """OpenAI's `developer` role is the system message (SmolLM2-style templates do not know it: it rendered a
    second turn after the default system prompt); text parts join with a newline as in the chat route; a call
    output answers a call of the input; metadata within OpenAI's sizes; text.format errors name its fields."""
    c = srv.client(KEY)

    def tokens(messages):
        r = c.post("/tokenize", json={"prefix": "base", "messages": messages})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    assert tokens(
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ) == tokens([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    parts = [{"type": "input_text", "text": "Translate:"}, {"type": "input_text", "text": "good morning"}]
    one = c.post("/v1/responses", json={**GREEDY, "input": [{"role": "user", "content": parts}]}).json()
    chat = c.post(
        "/v1/chat/completions",
        json={"model": "acme", "temperature": 0, "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "text", "text": p["text"]} for p in parts]}]},
    ).json()  # fmt: skip
    assert one["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert one["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    assert one["tool_choice"] == "auto"
    orphan = {"type": "function_call_output", "call_id": "call_9", "output": "12"}
    err = assert_error(c.post("/v1/responses", json={**GREEDY, "input": [orphan]}), 400)
    assert err["param"] == "input[0].call_id" and "call_9" in err["message"]
    for meta in ({"k" * 65: "v"}, {"k": "v" * 513}):
        assert_error(c.post("/v1/responses", json={**GREEDY, "input": "x", "metadata": meta}), 400)
    fmt = {"type": "json_schema", "schema": {"type": "object"}}
    err = assert_error(c.post("/v1/responses", json={**GREEDY, "input": "x", "text": {"format": fmt}}), 400)
    assert err["param"] == "text.format.name", err
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}
    err = assert_error(c.post("/v1/responses", json={**GREEDY, "input": "x", "text": {"format": fmt}}), 400)
    assert err["param"] == "text.format.schema" and "json_schema" not in err["message"], err
    # the compiler's words quoting the user's schema stay as they were (only the field's name is renamed)
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "response_format.json_schema.name"}}
    err = assert_error(c.post("/v1/responses", json={**GREEDY, "input": "x", "text": {"format": fmt}}), 400)
    assert (
        err["message"].startswith("invalid text.format.schema: ")
        and "response_format.json_schema.name" in err["message"]
    ), err
