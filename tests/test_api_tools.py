"""OpenAI function calling on /v1/chat/completions with the official `openai` package: forced calls (a named function,
"required") follow the tools' schemas, "auto" parses Hermes-style <tool_call> blocks, tools reach the chat template,
and bad tool requests are 422s that name the field."""

from __future__ import annotations

import json

import openai
import pytest

from server.api.schemas import ChatCompletionRequest
from server.api.tools import tool_plan

KEY = "sk-acme-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
def srv(server_factory):
    pytest.importorskip("llguidance")
    return server_factory(prefixes={("acme", "default"): {"seed": 5}}, keys={"acme": KEY})


@pytest.fixture
def oai(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


def _check_weather(args: str) -> None:
    obj = json.loads(args)
    assert set(obj) == {"city", "unit"} and obj["unit"] in ("c", "f") and isinstance(obj["city"], str)


def test_named_function_is_forced_whole_and_streamed(oai):
    kw = dict(model="acme/default", messages=ASK, tools=[WEATHER, TIME], temperature=0)
    r = oai.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, **kw
    )
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _check_weather(call.function.arguments)
    # the same call streamed as tool_calls deltas: the arguments arrive in pieces
    stream = oai.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True, **kw
    )
    chunks = list(stream)
    first = chunks[0].choices[0].delta.tool_calls[0]
    assert first.function.name == "get_weather" and first.id.startswith("call_")
    args = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices
        for tc in (c.choices[0].delta.tool_calls or [])
    )
    assert args == call.function.arguments  # greedy: the same text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) > 2
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_required_gives_one_or_more_calls_of_the_tools(oai):
    kw = dict(model="acme/default", messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    for seed in range(3):
        r = oai.chat.completions.create(temperature=1.0, seed=seed, max_tokens=200, **kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
        assert len(ch.message.tool_calls) >= 1
        for call in ch.message.tool_calls:
            obj = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                _check_weather(call.function.arguments)
            else:
                assert call.function.name == "get_time" and set(obj) == {"zone"}
    one = oai.chat.completions.create(parallel_tool_calls=False, temperature=0, max_tokens=200, **kw)
    assert len(one.choices[0].message.tool_calls) == 1
    streamed = list(oai.chat.completions.create(parallel_tool_calls=False, temperature=0, max_tokens=200, stream=True, **kw))  # fmt: skip
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in one.choices[0].message.tool_calls
    ]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_auto_parses_hermes_tool_call_blocks(oai):
    """The tiny model never writes a call by itself: a regex makes it write one (and some text), and "auto" turns
    the <tool_call> block into tool_calls, keeping the rest as content. Without a block the text is content."""
    text = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    kw = dict(model="acme/default", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=120)
    regex = {
        "structured_outputs": {"regex": text.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")}
    }
    r = oai.chat.completions.create(extra_body=regex, **kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check."
    (call,) = ch.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "Paris",
        "unit": "c",
    }
    # streamed: the text before the tag arrives as it is generated, the call in one delta at the end
    streamed = [
        c.choices[0] for c in oai.chat.completions.create(extra_body=regex, stream=True, **kw) if c.choices
    ]
    contents = [c.delta.content for c in streamed if c.delta.content]
    assert "".join(contents) == "Let me check." and len(contents) > 1
    (calls,) = [c.delta.tool_calls for c in streamed if c.delta.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == call.function.arguments
    assert streamed[-1].finish_reason == "tool_calls"
    # no call: plain text, streamed as usual (held back only while it could be the start of a tag)
    plain_kw = dict(extra_body={"structured_outputs": {"regex": "no tools <here"}}, **kw)
    plain = oai.chat.completions.create(**plain_kw)
    assert (
        plain.choices[0].message.content == "no tools <here" and plain.choices[0].message.tool_calls is None
    )
    assert plain.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].delta.content for c in oai.chat.completions.create(stream=True, **plain_kw) if c.choices
    ]
    assert "".join(p for p in pieces if p) == "no tools <here" and len([p for p in pieces if p]) > 2


def test_tools_and_tool_turns_reach_the_chat_template(srv):
    """A template that knows tools gets them, and earlier calls and results are rendered as turns."""
    seen: list[dict] = []
    tok = srv.svc.bundle.tokenizer
    apply = tok.apply_chat_template

    def spy(messages, **kw):
        seen.append({"messages": messages, "tools": kw.get("tools")})
        return apply(messages, **kw)

    tok.apply_chat_template = spy
    try:
        history = [
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
        ]
        r = srv.client(KEY).post(
            "/v1/chat/completions",
            json={"model": "acme/default", "messages": history, "tools": [WEATHER], "max_tokens": 4},
        )
    finally:
        tok.apply_chat_template = apply
    assert r.status_code == 200, r.text
    got = seen[-1]
    assert got["tools"] == [WEATHER]
    assistant, tool = got["messages"][1], got["messages"][2]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert tool == {"role": "tool", "content": "21 degrees", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "unique"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", None),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "tools", "object"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", "not both"),
        ({"tools": [WEATHER], "tool_choice": "required", "structured_outputs": {"regex": "a"}}, "structured_outputs", "not both"),
        ({"tools": [WEATHER], "tool_choice": "required", "structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "structured_outputs", "not both"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_422_naming_the_field(srv, body, param, needle):
    r = srv.client(KEY).post("/v1/chat/completions", json={"model": "acme/default", "messages": ASK, **body})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    if needle is not None:
        assert err["param"] == param and needle in err["message"], err
    else:
        assert param in (err["param"] or "") or param in err["message"], err


def test_held_back_is_the_longest_tag_prefix_at_the_end():
    from server.api.tools import held_back

    assert [held_back(t) for t in ("abc", "abc<", "abc<tool_", "<tool_call", "a<b", "")] == [
        0,
        1,
        6,
        10,
        0,
        0,
    ]


def test_tool_plan_parse_edge_cases():
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, "tools": [WEATHER, TIME]})
    plan = tool_plan(body)
    assert plan.mode == "auto"
    two = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}</tool_call>'  # fmt: skip
    content, calls = plan.parse(two)
    assert content is None and [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo", "unit": "f"}
    # unknown tools and broken JSON stay text
    for text in (
        '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
        "<tool_call>{not json</tool_call>",
    ):
        assert plan.parse(text) == (text, None)
    req = tool_plan(ChatCompletionRequest.model_validate({**body.model_dump(), "tool_choice": "required"}))
    assert req.parse('[{"name": "get_ti') == ('[{"name": "get_ti', None)  # cut short by max_tokens
    schema = json.loads(req.structured().spec)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
