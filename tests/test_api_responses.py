"""OpenAI's Responses API (POST /v1/responses) with the official `openai` package: the same answers as the chat
route it is served by (text, logprobs, function calls, structured output), the Responses API's stream of typed
events, multi-turn input with function call items, and what a stateless server refuses (400s naming the field, as OpenAI answers an invalid value)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fixtures.server import assert_error

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
    assert [item.type for item in r.output] == ["message"]
    msg = r.output[0]
    assert msg.role == "assistant" and msg.status == "completed" and msg.content[0].type == "output_text"
    assert r.output_text == chat.choices[0].message.content
    # a random model runs to the limit: incomplete, as OpenAI says of a max_output_tokens cut
    assert chat.choices[0].finish_reason == "length"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert r.instructions == "Be brief." and r.max_output_tokens == 8 and r.store is False


def test_an_answer_that_ends_is_completed(oai):
    # eos as the only token allowed ends it at once (with ignore_eos off)
    r = oai.responses.create(input="Hi", **GREEDY, extra_body={"top_k": 1, "ignore_eos": False})
    chat = _chat(oai, [{"role": "user", "content": "Hi"}], extra_body={"top_k": 1})
    want = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert r.status == want and (r.incomplete_details is None) == (want == "completed")


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


def test_truncation_auto_keeps_the_end_of_a_long_input(oai):
    long = " ".join(f"w{i}" for i in range(200))
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(input=long, **GREEDY)
    assert e.value.code == "context_length_exceeded"
    r = oai.responses.create(input=long, truncation="auto", **GREEDY)
    assert r.usage.input_tokens == 128 and r.truncation == "auto"  # max_prompt_tokens


REFUSED = [
    ({"previous_response_id": "resp_123"}, 400, "previous_response_id"),
    ({"conversation": "conv_1"}, 400, "conversation"),
    ({"background": True}, 400, "background"),
    ({"reasoning": {"effort": "low"}}, 400, "reasoning"),
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
]


def test_what_a_stateless_text_server_refuses(srv):
    c = srv.client(KEY)
    for extra, status, param in REFUSED:
        body = {"model": "acme", "input": "hi", "max_output_tokens": 4, **extra}
        err = assert_error(c.post("/v1/responses", json=body), status)
        assert err["param"] == param, (extra, err)
