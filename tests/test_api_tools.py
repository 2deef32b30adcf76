"""OpenAI function calling on /v1/chat/completions with the official `openai` package: forced calls (a named function,
"required") follow the tools' schemas, "auto" parses the calls a model writes (Hermes <tool_call> blocks, Llama 3 JSON,
Mistral [TOOL_CALLS], pythonic lists: the parser detected from the chat template or set), tools reach the chat
template, and bad tool requests are 400s that name the field."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest

from server.api.schemas import ChatCompletionRequest
from server.api.tool_parsers import AutoStream, detect, get_parser
from server.api.tools import CallListStream, tool_plan
from tests.fixtures.server import chat_template

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


def test_a_function_without_parameters_is_called_with_none(oai):
    """OpenAI: omitting `parameters` defines a function with an empty parameter list. A forced call of one gets
    `{}`, not an object the model makes up (it wrote '{"name":"name","description":"Hi' until max_tokens)."""
    now = {"type": "function", "function": {"name": "now", "description": "The current time"}}
    named = {"type": "function", "function": {"name": "now"}}
    r = oai.chat.completions.create(
        model="acme/default", messages=ASK, tools=[now], tool_choice=named, max_tokens=16, temperature=1
    )
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("now", {})
    assert r.choices[0].finish_reason == "stop"
    # "required": a list of one or more calls (this random model may go on adding some): each one's arguments {}
    r = oai.chat.completions.create(
        model="acme/default", messages=ASK, tools=[now], tool_choice="required", max_tokens=96, temperature=0
    )
    calls = r.choices[0].message.tool_calls
    done = calls if r.choices[0].finish_reason != "length" else calls[:-1]  # the last may be cut short
    assert done and all((c.function.name, json.loads(c.function.arguments)) == ("now", {}) for c in done)


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
    deltas = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert (
        deltas[0].id.startswith("call_")
        and deltas[0].function.name == one.choices[0].message.tool_calls[0].function.name
    )
    assert len(deltas) > 2 and all(
        d.index == 0 and d.function.name is None for d in deltas[1:]
    )  # arguments in pieces
    assert (
        "".join(d.function.arguments for d in deltas)
        == one.choices[0].message.tool_calls[0].function.arguments
    )
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_required_calls_stream_as_they_are_written(oai):
    """Several calls (sampled, seeded): the openai package's own stream accumulator rebuilds from the deltas the
    message the same request gives unstreamed."""
    kw = dict(
        model="acme/default", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200
    )
    many = 0
    for seed in range(12):  # until a seed has written more than one call (some do with this fixture's prefix)
        if seed >= 3 and many:
            break
        plain = oai.chat.completions.create(temperature=1.0, seed=seed, **kw).choices[0]
        with oai.chat.completions.stream(temperature=1.0, seed=seed, **kw) as stream:
            streamed = stream.get_final_completion().choices[0]
        assert streamed.finish_reason == plain.finish_reason == "tool_calls"
        want = [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]
        assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == want
        assert len({c.id for c in streamed.message.tool_calls}) == len(want)
        many += len(want) > 1
    assert many  # some seed wrote more than one call


def test_call_list_stream_follows_the_json_as_it_grows():
    text = '[{"name":"get_weather","parameters":{"city":"Pa\\"ri}s","unit":"c"}},{"parameters":{"zone":"U[TC"},"name":"get_time"}]'
    s = CallListStream()
    deltas = [d for i in range(len(text)) for d in s.feed(text[i])]  # a character at a time
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and deltas[0]["index"] == 0
    assert sum(d["index"] == 0 for d in deltas) > 5  # the first call's arguments as they come
    # arguments written before the name wait for it, then come with it
    assert deltas[-1]["index"] == 1 and deltas[-1]["function"] == {
        "name": "get_time",
        "arguments": '{"zone":"U[TC"}',
    }
    by_index: dict[int, str] = {}
    for d in deltas:
        by_index[d["index"]] = by_index.get(d["index"], "") + d["function"]["arguments"]
    calls = s.calls()
    assert [c["function"]["arguments"] for c in calls] == [by_index[0], by_index[1]]
    assert json.loads(by_index[0]) == {"city": 'Pa"ri}s', "unit": "c"}
    assert [c["id"] for c in calls] == [deltas[0]["id"], deltas[-1]["id"]]
    assert CallListStream().feed('[{"name":"get_ti') == []  # no name yet, nothing to send


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


def test_auto_streams_each_hermes_call_when_its_block_closes(oai):
    """Two calls with text around them: each call is sent once its block closes, before what follows is generated,
    and the text in between streams as it comes; the openai package rebuilds the unstreamed message."""
    one = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}</tool_call>'
    two = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    text = f"Checking.{one} and then {two} ok"
    kw = dict(model="acme/default", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=400)
    escaped = "".join("\\" + ch if ch in "{}.[]()" else ch for ch in text)
    kw["extra_body"] = {"structured_outputs": {"regex": escaped}}
    plain = oai.chat.completions.create(**kw).choices[0]
    assert plain.message.content == "Checking. and then  ok" and plain.finish_reason == "tool_calls"
    assert [c.function.name for c in plain.message.tool_calls] == ["get_weather", "get_time"]
    chunks = [c.choices[0] for c in oai.chat.completions.create(stream=True, **kw) if c.choices]
    order = [
        ("call", c.delta.tool_calls[0].index) if c.delta.tool_calls else ("text", c.delta.content)
        for c in chunks
        if c.delta.tool_calls or c.delta.content
    ]
    first_call, second_call = order.index(("call", 0)), order.index(("call", 1))
    between = "".join(t for _, t in order[first_call + 1 : second_call])
    assert between == " and then " and second_call - first_call > 2  # streamed between the two calls
    assert "".join(t for k, t in order[second_call + 1 :]) == " ok"
    with oai.chat.completions.stream(**kw) as stream:
        rebuilt = stream.get_final_completion().choices[0]
    assert rebuilt.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in rebuilt.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in plain.message.tool_calls
    ]
    assert rebuilt.message.content == "Checking. and then  ok"


def test_auto_keeps_one_call_without_parallel_calls_and_says_length_when_cut_short(oai):
    """`parallel_tool_calls: false` keeps only the first call the model wrote, streamed or not (it returned both);
    an output cut short by max_tokens inside a call ends "length", not "tool_calls" (OpenAI's rule)."""
    one = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}</tool_call>'
    two = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    escaped = "".join("\\" + ch if ch in "{}.[]()" else ch for ch in one + two)
    kw = dict(model="acme/default", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=400)
    kw["extra_body"] = {"structured_outputs": {"regex": escaped}}
    full = oai.chat.completions.create(**kw)
    assert [c.function.name for c in full.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    first = oai.chat.completions.create(parallel_tool_calls=False, **kw).choices[0]
    assert [c.function.name for c in first.message.tool_calls] == ["get_weather"]
    assert first.finish_reason == "tool_calls"
    chunks = list(oai.chat.completions.create(parallel_tool_calls=False, stream=True, **kw))
    assert _streamed_calls(chunks) == [
        (c.function.name, c.function.arguments) for c in first.message.tool_calls
    ]
    cut = {**kw, "max_tokens": full.usage.completion_tokens - 3}  # inside the second call
    cut_short = oai.chat.completions.create(**cut).choices[0]
    assert cut_short.finish_reason == "length"
    assert [c.function.name for c in cut_short.message.tool_calls] == ["get_weather"]
    streamed = list(oai.chat.completions.create(stream=True, **cut))
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"


def _streamed_calls(chunks) -> list[tuple[str, str]]:
    """(name, arguments) of the tool_calls deltas of a stream, joined by index."""
    calls: dict[int, list[str]] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(d.index, ["", ""])
            entry[0] += d.function.name or ""
            entry[1] += d.function.arguments or ""
    return [tuple(calls[i]) for i in sorted(calls)]


def test_required_cut_short_gives_the_calls_begun_streamed_or_not(oai):
    """A "required" list cut short by max_tokens: the calls begun (the last incomplete) and "length", the same
    unstreamed as streamed (unstreamed returned the list's raw JSON as content)."""
    kw = dict(
        model="acme/default", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0
    )
    full = oai.chat.completions.create(max_tokens=200, **kw)
    whole = full.choices[0]
    assert len(whole.message.tool_calls) == 1  # with this prefix, greedy: one call
    args = whole.message.tool_calls[0].function.arguments
    cut = dict(max_tokens=full.usage.completion_tokens - 4, **kw)  # inside its arguments
    plain = oai.chat.completions.create(**cut).choices[0]
    chunks = list(oai.chat.completions.create(stream=True, **cut))
    assert plain.finish_reason == "length" and plain.message.content is None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    got = [(c.function.name, c.function.arguments) for c in plain.message.tool_calls or []]
    assert got == _streamed_calls(chunks)
    assert got and got[0][0] == whole.message.tool_calls[0].function.name and args.startswith(got[0][1])
    assert len(got[0][1]) < len(args)


def test_auto_with_a_pythonic_model_detected_from_its_template(server_factory):
    """A model whose chat template asks for pythonic calls (Llama 3.2 / 4 style) gets the pythonic parser without
    any setting; its calls come back as tool_calls, streamed in one delta with no text sent before them."""
    from tests.fixtures.models import tiny_llama

    b = tiny_llama()
    b.tokenizer.chat_template = (
        "{% if tools %}You may call functions: [func_name1(params_name1=params_value1, params_name2=params_value2...), "
        "func_name2(params)]\n{% endif %}" + b.tokenizer.chat_template
    )
    s = server_factory(bundle=b, keys={"acme": KEY})
    assert s.svc.tool_parser.name == "pythonic"
    text = "[get_weather(city='Paris', unit='c'), get_time(zone='UTC')]"
    regex = "".join("\\" + ch if ch in "[]().'" else ch for ch in text)
    body = {
        "model": "acme/base",
        "messages": ASK,
        "tools": [WEATHER, TIME],
        "temperature": 0,
        "max_tokens": 80,
    }
    body["structured_outputs"] = {"regex": regex}
    c = s.client(KEY)
    ch = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] is None
    assert [
        (t["function"]["name"], json.loads(t["function"]["arguments"])) for t in ch["message"]["tool_calls"]
    ] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_time", {"zone": "UTC"}),
    ]
    frames = [json.loads(x[6:]) for x in c.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n") if x.startswith("data: {")]  # fmt: skip
    deltas = [f["choices"][0]["delta"] for f in frames if f["choices"]]
    assert not any(d.get("content") for d in deltas)  # the call was held back whole, never sent as text
    (calls,) = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    # the setting wins over the template
    s2 = server_factory(bundle=b, keys={"acme": KEY}, tool_call_parser="hermes")
    assert s2.svc.tool_parser.name == "hermes"
    plain = s2.client(KEY).post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["message"]["content"] == text and plain["message"]["tool_calls"] is None


MISTRAL_ID_CHECK = (  # what Mistral v0.3 / Small / Nemo templates do with each earlier call
    "{%- for message in messages %}{%- if message.tool_calls is defined and message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}{%- if not tool_call.id is defined or tool_call.id|length != 9 %}"
    '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}{%- endif %}{%- endfor %}'
    '{{- "[TOOL_CALLS]" }}{%- endif %}{%- endfor %}'
)


@pytest.mark.parametrize("stream", [False, True])
def test_a_mistral_models_calls_have_ids_its_template_takes_back(server_factory, stream):
    """Mistral's templates refuse a call id that is not 9 letters and digits: its calls get such ids (as vLLM's),
    so the usual round trip (the assistant's calls, then the tool's result) renders; ids from elsewhere (OpenAI's
    `call_...`, Anthropic's `toolu_...`) are given to the template shortened, the same for a call and its result.
    It was a 400 "cannot render the prompt"."""
    import openai

    from tests.fixtures.models import tiny_llama

    b = tiny_llama()
    b.tokenizer.chat_template = MISTRAL_ID_CHECK + b.tokenizer.chat_template
    s = server_factory(bundle=b, keys={"acme": KEY})
    assert s.svc.tool_parser.name == "mistral"
    oai = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]'
    regex = "".join("\\" + ch if ch in "[]{}" else ch for ch in text)
    kw = dict(model="acme/base", tools=[TIME], temperature=0, max_tokens=120)
    asked = oai.chat.completions.create(messages=ASK, extra_body={"structured_outputs": {"regex": regex}},
                                        stream=stream, **kw)  # fmt: skip
    if stream:
        (call_id,) = [t.id for c in asked if c.choices for t in c.choices[0].delta.tool_calls or [] if t.id]
    else:
        (call,) = asked.choices[0].message.tool_calls
        call_id = call.id
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call_id), call_id
    for given in (call_id, "call_0123456789abcdef01234567", "toolu_01A09q90qw90lq917835lq9"):
        turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": given, "type": "function",
                 "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
                 {"role": "tool", "tool_call_id": given, "content": "12:00"}]  # fmt: skip
        assert oai.chat.completions.create(messages=turns, **kw).choices[0].message is not None


@pytest.mark.parametrize("stream", [False, True])
def test_a_mistral_call_after_text_survives_its_special_token(server_factory, stream):
    """Mistral's [TOOL_CALLS] is a special token: decoded away by default, a call after some text was lost (left as
    a bare list in the content). A tools request ("auto") decodes with special tokens for this parser, as vLLM's
    does; without tools, or with "none", nothing changes."""
    from server.model import bundle_from_model
    from tests.fixtures.models import SPECIALS, make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [*SPECIALS, "[TOOL_CALLS]"]})
    b = bundle_from_model(make_tiny_llama(tok), tok, name="tiny-mistral")
    b.tokenizer.chat_template = (
        "{%- if tools %}[AVAILABLE_TOOLS][TOOL_CALLS]{%- endif %}" + b.tokenizer.chat_template
    )
    s = server_factory(bundle=b, keys={"acme": KEY})
    assert s.svc.tool_parser.name == "mistral"
    marker = tok.convert_tokens_to_ids("[TOOL_CALLS]")
    call = '"[{\\"name\\": \\"get_time\\", \\"arguments\\": {}}]"'
    grammar = f'start: "Ok. " <[{marker}]> {call}'
    body = {"model": "acme/base", "messages": ASK, "tools": [TIME], "temperature": 0, "max_tokens": 80,
            "structured_outputs": {"grammar": grammar}, "stream": stream}  # fmt: skip
    c = s.client(KEY)

    def answer(**kw: Any) -> tuple[str, list[str]]:
        r = c.post("/v1/chat/completions", json={**body, **kw})
        assert r.status_code == 200, r.text
        if not stream:
            m = r.json()["choices"][0]["message"]
            return m["content"] or "", [t["function"]["name"] for t in m["tool_calls"] or []]
        frames = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        deltas = [f["choices"][0]["delta"] for f in frames if f["choices"]]
        names = [
            t["function"]["name"]
            for d in deltas
            for t in d.get("tool_calls") or []
            if t.get("function", {}).get("name")
        ]
        return "".join(d.get("content") or "" for d in deltas), names

    assert answer() == ("Ok. ", ["get_time"])
    assert answer(tool_choice="none") == ('Ok. [{"name": "get_time", "arguments": {}}]', [])


def test_template_call_ids():
    from server.api.tools import template_call_id

    assert (
        template_call_id("call_abc", False) == "call_abc"
        and template_call_id("Ab3dE5gH9", True) == "Ab3dE5gH9"
    )
    short = template_call_id("call_0123456789abcdef01234567", True)
    assert re.fullmatch(r"[A-Za-z0-9]{9}", short) and short == template_call_id(
        "call_0123456789abcdef01234567", True
    )
    assert short != template_call_id("call_0123456789abcdef01234568", True)


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
def test_bad_tool_requests_are_400_naming_the_field(srv, body, param, needle):
    r = srv.client(KEY).post("/v1/chat/completions", json={"model": "acme/default", "messages": ASK, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if needle is not None:
        assert err["param"] == param and needle in err["message"], err
    else:
        assert param in (err["param"] or "") or param in err["message"], err


def test_hermes_holds_back_from_a_tag_or_the_longest_tag_prefix_at_the_end():
    hermes = get_parser("hermes")
    texts = ("abc", "abc<", "abc<tool_", "<tool_call", "a<b", "", "hi <tool_call>{...")
    assert [hermes.hold_from(t) for t in texts] == [3, 3, 3, 0, 3, 0, 3]


NAMES = {"get_weather", "get_time"}
# outputs as the models write them (special tokens already dropped by decoding, as the server decodes)
PARSER_CASES = [
    # llama 3.1 / 3.2 JSON: one object, several with ';', the python tag kept or not, "arguments" accepted too
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
     [("get_weather", {"city": "Paris", "unit": "c"})], ""),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", "arguments": {"city": "Oslo"}}',
     [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo"})], ""),
    ("llama3_json", 'The weather is {"name": "get_weather"}', [], None),  # not at the start: text
    ("llama3_json", '{"name": "rm", "parameters": {}}', [], None),  # not one of the tools
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Par', [], None),  # cut short
    # mistral: [TOOL_CALLS] (a special token: usually already gone) and a JSON list
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]',
     [("get_weather", {"city": "Paris", "unit": "c"})], ""),
    ("mistral", ' [{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", "arguments": {}}]',
     [("get_time", {"zone": "UTC"}), ("get_weather", {})], " "),
    ("mistral", "[1, 2, 3] are numbers", [], None),
    ("mistral", '{"name": "get_time", "arguments": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})], ""),  # bare
    ("mistral", '{"name": "rm", "arguments": {}}', [], None),
    ("mistral", " " * 65 + '[{"name": "get_time", "arguments": {}}]', [], None),  # past 64 blanks: text
    # pythonic: a list of calls with keyword literals; nothing is evaluated
    ("pythonic", '[get_weather(city="Paris", unit="c"), get_time(zone=\'UTC\')]',
     [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"zone": "UTC"})], ""),
    ("pythonic", "[get_time(zone=None, days=[1, 2], opts={'a': True})]",
     [("get_time", {"zone": None, "days": [1, 2], "opts": {"a": True}})], ""),
    ("pythonic", "[get_time(zone=__import__('os').system('x'))]", [], None),  # not a literal: text
    ("pythonic", "[get_time('UTC')]", [], None),  # positional arguments: not the format
    ("pythonic", "[rm(path='/')]", [], None),
    ("pythonic", "Sure: [get_time(zone='UTC')]", [], None),
    # hermes blocks anywhere, the text around them kept
    ("hermes", 'Let me look.<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call> Done.',
     [("get_time", {"zone": "UTC"})], "Let me look. Done."),
    # qwen3_coder: hermes' blocks around XML-like functions; values are text (no schema types given here)
    ("qwen3_coder", "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Jose\n</parameter>\n"
     "<parameter=unit>\nc\n</parameter>\n</function>\n</tool_call>",
     [("get_weather", {"city": "San Jose", "unit": "c"})], "Checking.\n"),
    ("qwen3_coder", "<tool_call><function=get_time></function></tool_call><tool_call><function=get_weather>"
     "<parameter=city>Oslo</function></tool_call>", [("get_time", {}), ("get_weather", {"city": "Oslo"})], ""),
    ("qwen3_coder", "<tool_call><function=rm><parameter=path>/</parameter></function></tool_call>", [], None),
    ("qwen3_coder", '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', [], None),  # hermes' JSON
    # two functions in one block; a last block left open (a model that ends after its call)
    ("qwen3_coder", "<tool_call><function=get_time><parameter=zone>UTC</parameter></function>\n"
     "<function=get_time><parameter=zone>CET</parameter></function></tool_call>",
     [("get_time", {"zone": "UTC"}), ("get_time", {"zone": "CET"})], ""),
    ("qwen3_coder", "Ok. <tool_call><function=get_time><parameter=zone>UTC</parameter></function>",
     [("get_time", {"zone": "UTC"})], "Ok. "),
    ("hermes", 'Ok. <tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})],
     "Ok. "),
    ("hermes", 'Ok. <tool_call>{"name": "get_time", "argu', [], None),  # cut short: text
    # granite / phi4_mini_json: a tag (or none, decoded away) and a JSON list
    ("granite", '<|tool_call|>[{"name": "get_time", "arguments": {"zone": "UTC"}}]', [("get_time", {"zone": "UTC"})], ""),
    ("granite", "I cannot [do] that", [], None),
    ("granite", '<tool_call>[{"name": "get_time", "arguments": {}}]', [("get_time", {})], ""),  # Granite 3.1+
    ("phi4_mini_json", 'functools[{"name": "get_weather", "arguments": {"city": "Rome"}}]',
     [("get_weather", {"city": "Rome"})], ""),
    ("phi4_mini_json", "functional programming", [], None),
    ("phi4_mini_json", '{"name": "get_time", "arguments": {}}', [], None),  # no marker: text (vLLM's too)
    # the text markers after some text (vLLM's mistral and phi4 parsers look for them anywhere); a bare list after
    # text stays text
    ("mistral", 'Let me check. [TOOL_CALLS][{"name": "get_time", "arguments": {}}]', [("get_time", {})],
     "Let me check. "),
    ("mistral", 'Let me check. [{"name": "get_time", "arguments": {}}]', [], None),
    ("mistral", "plain [TOOL_CALLS] and not JSON", [], None),
    ("phi4_mini_json", 'Sure. functools[{"name": "get_weather", "arguments": {"city": "Rome"}}] ok',
     [("get_weather", {"city": "Rome"})], "Sure. ok"),
    # a name that is not a string (a list, an object) is no tool's, in every JSON format: text, never a crash
    ("hermes", '<tool_call>{"name": ["get_time"], "arguments": {}}</tool_call>', [], None),
    ("llama3_json", '{"name": {"get_time": 1}, "parameters": {}}', [], None),
    ("mistral", '[TOOL_CALLS][{"name": ["get_time"], "arguments": {}}]', [], None),
    ("granite", '<|tool_call|>[{"name": {"a": 1}, "arguments": {}}]', [], None),
    ("phi4_mini_json", 'functools[{"name": [1], "arguments": {}}]', [], None),
    # the marker named in text before the calls (vLLM's phi4 parser looks for `functools[`)
    ("phi4_mini_json", 'I use functools here. functools[{"name": "get_time", "arguments": {}}]', [("get_time", {})],
     "I use functools here. "),
    ("mistral", 'Note [TOOL_CALLS] is the marker. [TOOL_CALLS][{"name": "get_time", "arguments": {}}]',
     [("get_time", {})], "Note [TOOL_CALLS] is the marker. "),
    # numbers no strict client can read back (NaN, Infinity, past a double's range): not a call, the text stays
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {"zone": 1e999}}</tool_call>', [], None),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {"zone": NaN}}</tool_call>', [], None),
    ("llama3_json", '{"name": "get_time", "parameters": {"zone": -Infinity}}', [], None),
    ("pythonic", "[get_time(zone=1e999)]", [], None),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {"zone": 1e300}}</tool_call>',
     [("get_time", {"zone": 1e300})], ""),
]  # fmt: skip


@pytest.mark.parametrize(("parser", "text", "calls", "outside"), PARSER_CASES)
def test_tool_parsers_find_the_calls_of_each_format(parser, text, calls, outside):
    got_outside, got = get_parser(parser).split(text, NAMES)
    assert got == calls
    assert got_outside == (text if outside is None else outside)


@pytest.mark.parametrize(("parser", "text", "calls", "outside"), PARSER_CASES)
def test_auto_stream_gives_what_split_gives_whatever_the_pieces(parser, text, calls, outside):
    for size in (1, 3, 7, len(text)):
        follow = AutoStream(get_parser(parser), NAMES)
        items = []
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        for j, piece in enumerate(pieces):
            items += follow.feed(piece, final=j == len(pieces) - 1)
        assert [v for k, v in items if k == "call"] == calls
        # blank text beside the calls is not content (the mistral case's leading space)
        want = text if outside is None else outside if outside.strip() else ""
        assert "".join(v for k, v in items if k == "content") == want
        if (
            parser in ("hermes", "qwen3_coder") and calls and "</tool_call>" in text
        ):  # a closed block goes at once
            follow = AutoStream(get_parser(parser), NAMES)
            end = text.index("</tool_call>") + len("</tool_call>")
            assert ("call", calls[0]) in follow.feed(text[:end])


_CALL = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("a < b <tool " + _CALL, "a < b <tool "),  # the space before the call was kept streamed, cut whole
        (_CALL + "\n" + _CALL, None),  # a newline between two calls was content streamed, None whole
        ("\n " + _CALL + "\n", None),
        ("Looking. " + _CALL + "\n\nDone.\n", "Looking. \n\nDone.\n"),
        ("  no call here  ", "  no call here  "),
    ],
)
def test_auto_content_is_the_same_streamed_or_not(text, content):
    """tool_choice "auto": a response that is not streamed has the content a stream sends, whatever the pieces
    the output comes in (the whole answer used to strip what the stream had sent)."""
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "auto"}
    )
    plan = tool_plan(body, get_parser("hermes"))
    whole, calls = plan.parse(text)
    assert whole == content and (calls is None) == (_CALL not in text)
    for size in (1, 2, 5):
        follow = plan.auto_stream()
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        items = [it for j, p in enumerate(pieces) for it in follow.feed(p, final=j == len(pieces) - 1)]
        assert ("".join(v for k, v in items if k == "content") or None) == content


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        ("hermes", "<tool_call>" + "[" * 50_000 + "]" * 50_000 + "</tool_call>"),
        ("llama3_json", '{"name": "get_time", "parameters": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        ("mistral", "[TOOL_CALLS]" + "[" * 50_000 + "]" * 50_000),
        ("pythonic", "[get_time(zone=" + "[" * 50_000 + "]" * 50_000 + ")]"),
        ("pythonic", "[get_time(zone=" + "-" * 50_000 + "1)]"),
    ],
)
def test_outputs_nested_too_deep_for_the_parsers_stay_text(parser, text):
    """JSON or Python nested deeper than the parsers' recursion limit: text, not a 500."""
    assert get_parser(parser).split(text, NAMES) == (text, [])
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required"}
    )
    deep = "[" * 50_000 + "]" * 50_000
    assert tool_plan(body).parse(deep) == (None, None)  # "required": no call, and never its raw text


@pytest.mark.parametrize(
    ("parser", "stream", "sent_before_end"),
    [
        ("llama3_json", ['{"na', 'me": "get_time", ', '"parameters": {"zone": "UTC"}}'], ""),
        ("llama3_json", ["The ", "answer is 4."], "The answer is 4."),
        ("mistral", ["[", '{"name": "get_time", "arguments": {}}]'], ""),
        ("pythonic", ["  [get_", "time(zone='UTC')]"], "  "),
        ("pythonic", ["No", " call here ["], "No call here ["),
        ("hermes", ["Sure. <tool", "_call>{...", "}</tool_call>"], "Sure. "),
    ],
)
def test_hold_from_never_sends_what_could_be_a_call(parser, stream, sent_before_end):
    p = get_parser(parser)
    full, sent = "", 0
    for piece in stream:
        full += piece
        sent = max(sent, p.hold_from(full))
    assert full[:sent] == sent_before_end


def test_detect_the_parser_from_the_chat_template():
    assert detect(None) == detect("{{ messages }}") == "hermes"
    assert detect("{%- for tool in tools %}<tool_call>{{ tool }}</tool_call>{%- endfor %}") == "hermes"
    assert detect("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' + tool_calls|tojson }}") == "mistral"
    llama31 = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    assert detect(llama31) == detect("{{- '<|python_tag|>' + tool_call.arguments.code }}") == "llama3_json"
    assert (
        detect("[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]")
        == "pythonic"
    )


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
    # cut short by max_tokens: the calls begun, as a stream sent them; never the list's raw text
    assert req.parse('[{"name": "get_ti') == (None, None)
    content, calls = req.parse('[{"name":"get_weather","parameters":{"ci')
    assert content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"ci')
    ]
    assert req.finish_reason("length", calls) == "length" and req.finish_reason("stop", calls) == "tool_calls"
    # ... but a list a stop string cut before it closed is "stop", as its stream says (it said "tool_calls")
    assert req.finish_reason("stop", calls, '[{"name":"get_weather","parameters":{"ci') == "stop"
    done = '[{"name":"get_weather","parameters":{"city":"Oslo","unit":"c"}}]'
    assert req.finish_reason("stop", req.parse(done)[1], done) == "tool_calls"
    assert plan.finish_reason("length", calls) == "length"
    # arguments the model wrote as a string: JSON text as OpenAI sends arguments (a client's json.loads works); a
    # string that holds JSON is that JSON
    for written, want in (('"Paris"', "Paris"), ('"{\\"city\\": \\"Oslo\\"}"', {"city": "Oslo"})):
        _, calls = plan.parse(f'<tool_call>{{"name": "get_weather", "arguments": {written}}}</tool_call>')
        assert json.loads(calls[0]["function"]["arguments"]) == want, calls
    one = tool_plan(ChatCompletionRequest.model_validate({**body.model_dump(), "parallel_tool_calls": False}))
    assert [c["function"]["name"] for c in one.parse(two)[1]] == ["get_time"]
    schema = json.loads(req.structured().spec)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2


PERSON = {
    "type": "function",
    "function": {
        "name": "person",
        "parameters": {  # as pydantic (and openai.pydantic_function_tool) write a nested model
            "$defs": {
                "Addr": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "enum": ["Rome", "Oslo"]}},
                    "required": ["city"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 8}, "addr": {"$ref": "#/$defs/Addr"}},
            "required": ["name", "addr"],
            "additionalProperties": False,
        },
    },
}
TREE = {
    "type": "function",
    "function": {
        "name": "tree",
        "parameters": {  # recursive through its root; draft-07 `definitions` too
            "definitions": {"label": {"type": "string", "enum": ["a", "b"]}},
            "type": "object",
            "properties": {
                "label": {"$ref": "#/definitions/label"},
                "sub": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
            },
            "required": ["label", "sub"],
            "additionalProperties": False,
        },
    },
}


def _check_tree(obj) -> None:
    assert set(obj) == {"label", "sub"} and obj["label"] in ("a", "b"), obj
    if obj["sub"] is not None:
        _check_tree(obj["sub"])


def test_required_calls_of_tools_whose_parameters_hold_references(oai):
    """`required` placed each tool's schema inside the list's schema, where its references (pydantic's
    `#/$defs/...`, draft-07 `#/definitions/...`, a recursive `#`) pointed into the list: a 400, or a call of the wrong
    shape for `#`. Every call now has its tool's own shape."""
    kw = dict(
        model="acme/default", messages=ASK, tools=[PERSON, TREE], tool_choice="required", max_tokens=300
    )
    seen = set()
    for seed in range(4):
        ch = oai.chat.completions.create(temperature=1.0, seed=seed, **kw).choices[0]
        if ch.finish_reason != "tool_calls":
            continue
        for call in ch.message.tool_calls:
            args = json.loads(call.function.arguments)
            seen.add(call.function.name)
            if call.function.name == "person":
                assert set(args) == {"name", "addr"} and len(args["name"]) <= 8
                assert args["addr"] == {"city": "Rome"} or args["addr"] == {"city": "Oslo"}
            else:
                _check_tree(args)
    assert seen, "no request finished with its calls"


def test_rebasing_a_tools_schema_leaves_its_data_alone():
    """Only references are rewritten: a `{"$ref": ...}` inside const/enum/default/examples is a value the output
    holds, and a subschema with its own `$id` resolves its references against itself."""
    from server.api.tools import _rebased

    schema = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/A"},
            "b": {"const": {"$ref": "#/x"}},
            "c": {"enum": [{"$ref": "#"}], "default": {"$ref": "#"}},
            "d": {"$id": "https://example.com/d", "properties": {"e": {"$ref": "#/$defs/E"}}},
        },
        "$defs": {"A": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    }
    out = _rebased(schema, "#/$defs/tool0")
    assert out["properties"]["a"] == {"$ref": "#/$defs/tool0/$defs/A"}
    assert out["$defs"]["A"]["anyOf"][0] == {"$ref": "#/$defs/tool0"}
    assert (
        out["properties"]["b"] == schema["properties"]["b"]
        and out["properties"]["c"] == schema["properties"]["c"]
    )
    assert out["properties"]["d"] == schema["properties"]["d"]


def test_qwen3_coder_values_are_read_by_their_schema_types():
    """Qwen3-Coder writes every value as text: each is read by its parameter's type in the tool's schema (as vLLM's
    parser does); text that is not of the type stays text, and a string parameter is never parsed."""
    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "ok": {"type": "boolean"}, "tags": {"type": "array"},
        "opts": {"type": "object"}, "s": {"type": "string"}, "maybe": {"type": ["integer", "null"]},
        "bad": {"type": "integer"}, "none": {"type": "object"}, "text": {"type": "string"}}}  # fmt: skip
    params = {"n": "42", "x": "2.5", "ok": "True", "tags": '["a", "b"]', "opts": "{'deep': 1}", "s": "007",
              "maybe": "null", "bad": "many", "free": "[1]", "none": "null", "text": "null"}  # fmt: skip
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    text = f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>"
    _, calls = get_parser("qwen3_coder").split(text, {"f": schema})
    assert calls == [("f", {"n": 42, "x": 2.5, "ok": True, "tags": ["a", "b"], "opts": {"deep": 1}, "s": "007",
                            "maybe": None, "bad": "many", "free": "[1]", "none": None, "text": "null"})]  # fmt: skip


@pytest.mark.parametrize(
    ("template", "parser"),
    [
        ("<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>", "qwen3_coder"),
        ("Use <|tool_call|> followed by a JSON list", "granite"),
        (
            "In addition to plain text responses, you can chose to call functions: functools[{...}]",
            "phi4_mini_json",
        ),
        ("<tool_call>{...}</tool_call>", "hermes"),
    ],
)
def test_the_parser_is_detected_from_the_chat_template(template, parser):
    from server.api.tool_parsers import detect

    assert detect(template) == parser


def test_auto_with_a_qwen3_coder_model(server_factory):
    """Qwen3-Coder's template (functions in <tool_call> blocks, XML-like parameters) gets the qwen3_coder parser:
    its calls come back as tool_calls with values of their schema's types, streamed as each block closes."""
    from tests.fixtures.models import tiny_llama

    b = tiny_llama()
    b.tokenizer.chat_template = (
        "{% if tools %}<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
        "</parameter>\n</function>\n</tool_call>\n{% endif %}" + b.tokenizer.chat_template
    )
    s = server_factory(bundle=b, keys={"acme": KEY})
    assert s.svc.tool_parser.name == "qwen3_coder"
    days = {"type": "function", "function": {"name": "forecast", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}  # fmt: skip
    text = ("Sure.\n<tool_call>\n<function=forecast>\n<parameter=city>\n10\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>")  # fmt: skip
    body = {"model": "acme/base", "messages": ASK, "tools": [WEATHER, days], "temperature": 0, "max_tokens": 200,
            "structured_outputs": {"regex": re.escape(text)}}  # fmt: skip
    c = s.client(KEY)
    ch = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] == "Sure.\n"
    (call,) = ch["message"]["tool_calls"]
    # "10" stays the string the schema says city is; days is the integer 3
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == (
        "forecast",
        {"city": "10", "days": 3},
    )
    frames = [json.loads(x[6:]) for x in c.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n") if x.startswith("data: {")]  # fmt: skip
    deltas = [f["choices"][0]["delta"] for f in frames if f["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure.\n"
    (calls,) = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "10", "days": 3}


@pytest.mark.parametrize("parser", ["hermes", "qwen3_coder"])
def test_a_long_open_block_streams_in_linear_time(parser):
    """A block left open over a long blank run (a tenant can steer its output there) is followed without
    rescanning it at every token: the regular expression this replaced backtracked cubically over a stream (600
    blank characters took 2.7 s, 100,000 would take days, holding the event loop). A hang guard, not a timing."""
    import time

    text = "<tool_call>" + " \n" * 50_000 + '{"name": "get_time", "arguments": {"zone": "UTC"}}'
    follow = AutoStream(get_parser(parser), NAMES)
    t0 = time.monotonic()
    items = [it for i in range(0, len(text), 4) for it in follow.feed(text[i : i + 4])]
    items += follow.feed("", final=True)
    assert time.monotonic() - t0 < 30  # (about 0.05 s here)
    calls = [v for k, v in items if k == "call"]
    assert calls == (
        [("get_time", {"zone": "UTC"})] if parser == "hermes" else []
    )  # (an open block: at the end)


def test_message_fields_reach_the_template_as_vllm_passes_them(srv):
    """What vLLM gives a chat template, given here too: a call made without arguments ("", null) as `{}` (a template
    would write `"arguments": }`), a `name` on any turn, earlier thinking under both its names, `documents`, and
    chat_template_kwargs of any JSON (Llama 3.1's `builtin_tools` is a list). A template's own refusal is a 400
    naming `messages`."""
    from tests.fixtures.server import template_calls

    def call(i: int, arguments: str) -> dict[str, Any]:
        return {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": arguments},
        }

    history = [
        {"role": "system", "content": "Be brief.", "name": "ops"},
        {"role": "user", "content": "Weather?", "name": "alice"},
        {
            "role": "assistant",
            "content": None,
            "reasoning": "hm",
            "tool_calls": [call(1, ""), call(2, "null")],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21"},
        {"role": "tool", "tool_call_id": "call_2", "content": "22"},
    ]
    docs = [{"title": "A", "text": "alpha"}]
    tok = srv.svc.bundle.tokenizer
    with template_calls(tok) as seen:
        body = {"model": "acme/default", "messages": history, "tools": [WEATHER], "max_tokens": 2,
                "documents": docs, "chat_template_kwargs": {"builtin_tools": ["brave_search"]}}  # fmt: skip
        r = srv.client(KEY).post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    messages, kw = seen[-1]
    assert [c["function"]["arguments"] for c in messages[2]["tool_calls"]] == [{}, {}]
    assert (messages[0]["name"], messages[1]["name"]) == ("ops", "alice")
    assert messages[2]["reasoning"] == messages[2]["reasoning_content"] == "hm"
    assert kw["documents"] == docs and kw["builtin_tools"] == ["brave_search"]
    # the template's own error (here: a raise_exception on a role) is the client's, naming the field
    strict = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}{% endfor %}"
    with chat_template(tok, strict):
        r = srv.client(KEY).post("/v1/chat/completions", json={**body, "documents": None})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "no tool turns" in err["message"], err


def test_arguments_no_strict_client_could_read_are_never_sent_as_numbers():
    """A forced call's arguments are the text the model wrote; where they are turned into an object (Anthropic's
    `input`) or checked for JSON (a bare value), NaN, Infinity and numbers past a double's range are not read as
    numbers: `{"x": 1e999}` made Anthropic's unstreamed answer a 500 (infinity has no JSON)."""
    from server.api.routes_anthropic import _tool_input
    from server.api.tools import _arguments_text

    assert _tool_input('{"x": 89682e82308886}') == {} and _tool_input('{"x": NaN}') == {}
    assert _tool_input('{"x": 1.5e3, "y": 10000000000000000000000}') == {"x": 1500.0, "y": 10**22}
    assert json.loads(_arguments_text("NaN")) == "NaN"  # a JSON string, not a bare NaN
    assert _arguments_text('{"x": 1}') == '{"x": 1}'
