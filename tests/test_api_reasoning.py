"""Reasoning models (vLLM's --reasoning-parser): <think>...</think> as the message's reasoning_content, streamed or
not, before tool calls are parsed from the answer; the Responses API's reasoning items."""

from __future__ import annotations

import json
import random

import openai
import pytest

from server.api.reasoning import END, PARSERS, START, ReasoningParser
from tests.fixtures.server import template_calls

KEY = "sk-acme-thinks"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_each_parser_follows_its_models_convention():
    """vLLM's parsers of models whose template opens the thinking (olmo3, step3, minimax_m2: the output may hold only
    the closing tag; seed_oss with its own tags) read as deepseek_r1 does; glm45's model opens it, as qwen3's."""
    for name in ("olmo3", "step3", "minimax_m2"):
        p = ReasoningParser(name)
        assert p.split("x</think>y") == ("x", "y") and p.split("<think>x</think>y") == ("x", "y")
        assert p.split("cut short") == ("cut short", None) and p.think_mode() == "opened"
    seed = ReasoningParser("seed_oss")
    assert seed.split("<seed:think>a</seed:think>b") == ("a", "b") and seed.split("a</seed:think>b") == (
        "a",
        "b",
    )
    assert seed.split("<think>a</think>b") == ("<think>a</think>b", None)  # not its tags
    assert seed.prompt_opened("...<seed:think>") is True and seed.prompt_opened("<think>") is None
    glm = ReasoningParser("glm45")
    assert glm.split("<think>a</think>b") == ("a", "b") and glm.split("a</think>b") == (None, "a</think>b")
    assert glm.think_mode() == "optional" and glm.think_mode(opened=True) == "opened"
    with pytest.raises(ValueError, match="seed_oss"):
        ReasoningParser("nope")


TEXTS = [
    "<think>Let me see.</think>The answer.",
    "<think>a<b</thin</think>\n\nok</think>",
    "Let me see.</think>The answer.",
    "no thinking here",
    "<think>cut short while thinking",
    "<thi",
    "",
    "</think>",
    "\n\n<think>a</think>b",
    "  no thinking",
    " \n",
]


@pytest.mark.parametrize("name", PARSERS)
def test_a_streamed_output_splits_as_the_whole_does_however_it_is_cut(name):
    parser = ReasoningParser(name)
    rng = random.Random(0)
    for text in [t.replace(START, parser.start).replace(END, parser.end) for t in TEXTS]:
        want = parser.split(text)
        for _ in range(30):
            cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 4))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            stream = parser.stream()
            got = [stream.feed(p) for p in pieces] + [stream.feed("", final=True)]
            thinking, answer = "".join(t for t, _ in got), "".join(a for _, a in got)
            assert (thinking or None, answer) == (want[0] or None, want[1] or ""), (name, text, pieces)
    assert parser.split(f"{parser.start}x{parser.end}y") == ("x", "y")
    if name not in ("deepseek_r1", "qwen3"):
        return
    # the template opened the thinking (R1): all thinking until </think>; the model opens it (Qwen3): all answer
    assert ReasoningParser("deepseek_r1").split("x</think>y") == ("x", "y")
    assert ReasoningParser("qwen3").split("x</think>y") == (None, "x</think>y")
    assert ReasoningParser("deepseek_r1").split("x") == ("x", None)
    # whitespace before the opening tag (vLLM's parsers take it too); kept where no tag follows
    assert ReasoningParser("qwen3").split("\n<think>x</think>y") == ("x", "y")
    assert ReasoningParser("qwen3").split("\n<thinks") == (None, "\n<thinks")
    # not after an endless blank run (waiting for a tag there re-read it at every token): the run is the answer
    stream = ReasoningParser("qwen3").stream()
    assert [stream.feed(" ") for _ in range(100)][-1] == ("", " ") and stream.state == "answer"
    assert ReasoningParser("qwen3").split(" " * 100 + "<think>x</think>y") == (
        None,
        " " * 100 + "<think>x</think>y",
    )


@pytest.fixture
def srv(server_factory, monkeypatch):
    """A qwen3-parser server whose outputs a regex forces (the tiny model does not think by itself): the regex
    covers the whole output, thinking included (`think_mode` None), where it would otherwise apply after it."""
    pytest.importorskip("llguidance")

    monkeypatch.setattr(ReasoningParser, "think_mode", lambda self, opened: None)
    return server_factory(
        prefixes={("acme", "default"): {"seed": 5}}, keys={"acme": KEY}, reasoning_parser="qwen3"
    )


def _forced(text: str) -> dict:
    return {"structured_outputs": {"regex": "".join("\\" + c if c in "{}.[]()?*+|^$" else c for c in text)}}


def _sse(srv, route: str, body: dict) -> list[dict]:
    with srv.client(KEY).stream("POST", route, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_the_thinking_is_reasoning_content_streamed_or_not(srv):
    text = "<think>Let me see.</think>The answer."
    body = {"model": "acme", "messages": [{"role": "user", "content": "Q?"}], "temperature": 0,
            "max_tokens": 80, **_forced(text)}  # fmt: skip
    msg = srv.client(KEY).post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("Let me see.", "The answer.")
    deltas = [c["choices"][0]["delta"] for c in _sse(srv, "/v1/chat/completions", body) if c["choices"]]
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # the thinking first, then the answer
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Let me see."
    assert "".join(d.get("content") or "" for d in deltas) == "The answer."
    # the official client reads it (an extra field of the message)
    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    got = oai.chat.completions.create(**{k: v for k, v in body.items() if k not in ("structured_outputs",)},
                                      extra_body=_forced(text))  # fmt: skip
    assert got.choices[0].message.reasoning_content == "Let me see."


def test_calls_are_parsed_from_the_answer_not_the_thinking(srv):
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    text = f"<think>Maybe {call}?</think>Sure.{call}"
    body = {"model": "acme", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER],
            "temperature": 0, "max_tokens": 200, **_forced(text)}  # fmt: skip
    choice = srv.client(KEY).post("/v1/chat/completions", json=body).json()["choices"][0]
    msg = choice["message"]
    assert msg["reasoning_content"] == f"Maybe {call}?" and msg["content"] == "Sure."
    (only,) = msg["tool_calls"]
    assert (
        json.loads(only["function"]["arguments"]) == {"city": "Oslo"}
        and choice["finish_reason"] == "tool_calls"
    )
    deltas = [c["choices"][0]["delta"] for c in _sse(srv, "/v1/chat/completions", body) if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls") or []] == ["get_weather"]


def test_responses_have_a_reasoning_item_before_the_message(srv):
    from server.api import routes_responses

    text = "<think>Hmm.</think>Hi!"
    body = {"model": "acme", "input": "Hello", "temperature": 0, "max_output_tokens": 40}
    real = routes_responses.chat_request

    def forced(b):
        chat = real(b)
        out = type(chat).model_validate({**chat.model_dump(exclude_unset=True), **_forced(text)})
        out._drop_turns = chat._drop_turns
        return out

    routes_responses.chat_request = forced
    try:
        plain = srv.client(KEY).post("/v1/responses", json=body).json()
        events = _sse(srv, "/v1/responses", body)
    finally:
        routes_responses.chat_request = real
    streamed = events[-1]["response"]
    for resp in (plain, streamed):
        openai.types.responses.Response.model_validate(resp)
        reasoning, message = resp["output"]
        assert reasoning["type"] == "reasoning" and reasoning["content"] == [
            {"type": "reasoning_text", "text": "Hmm."}
        ]
        assert message["content"][0]["text"] == "Hi!"
        # the thinking's tokens, its tags included (this tokenizer has one per byte)
        details = resp["usage"]["output_tokens_details"]
        assert details["reasoning_tokens"] == len("<think>Hmm.</think>") < resp["usage"]["output_tokens"]
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "Hmm."
    # the reasoning item sent back in the next turn (as OpenAI asks) is taken and left out of the prompt
    again = {**body, "input": [{"role": "user", "content": "Hello"}, reasoning, message,
                               {"role": "user", "content": "And?"}]}  # fmt: skip
    assert srv.client(KEY).post("/v1/responses", json=again).status_code == 200


def test_without_a_parser_the_output_is_all_content(server_factory):
    pytest.importorskip("llguidance")
    text = "<think>x</think>y"
    base = {
        "model": "acme",
        "messages": [{"role": "user", "content": "Q?"}],
        "temperature": 0,
        "max_tokens": 40,
    }
    plain = server_factory(prefixes={("acme", "default"): {"seed": 5}})  # no reasoning parser: as it was
    msg = plain.client().post("/v1/chat/completions", json={**base, "model": "acme/default", **_forced(text)})
    assert msg.json()["choices"][0]["message"]["content"] == text
    assert msg.json()["choices"][0]["message"]["reasoning_content"] is None
    # what reasoning-model clients send (Codex, the Agents SDK) is taken
    r1 = server_factory(prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="deepseek_r1")
    r = r1.client().post("/v1/responses", json={"model": "acme/default", "input": "x", "max_output_tokens": 4,
                                                "reasoning": {"effort": "low", "summary": "auto"},
                                                "include": ["reasoning.encrypted_content"]})  # fmt: skip
    assert r.status_code == 200, r.text


def test_the_prompt_says_where_the_output_starts(server_factory, monkeypatch):
    """A prompt that closed the thinking (a continued assistant message past it; `enable_thinking: false` writes an
    empty one) starts the output in the answer, even for deepseek_r1 (whose outputs otherwise start thinking); one
    that opened it starts in the thinking, even for qwen3."""
    pytest.importorskip("llguidance")
    from server.api.reasoning import prompt_opened

    assert prompt_opened("<|im_start|>assistant\n<think>\n") is True
    assert prompt_opened("<think>\n\n</think>\n\n") is False and prompt_opened("assistant\n") is None
    assert ReasoningParser("deepseek_r1").split("x</think>y", opened=False) == (None, "x</think>y")
    assert ReasoningParser("qwen3").split("x</think>y", opened=True) == ("x", "y")
    monkeypatch.setattr(ReasoningParser, "think_mode", lambda self, opened: None)
    r1 = server_factory(prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="deepseek_r1")
    body = {
        "model": "acme/default", "temperature": 0, "max_tokens": 20, "add_generation_prompt": False,
        "continue_final_message": True, **_forced(" 4."),
        "messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "<think>simple</think>The answer is"}],
    }  # fmt: skip
    msg = r1.client().post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == (" 4.", None)
    # continued inside the thinking: the rest of it, then the answer
    body["messages"][-1]["content"] = "<think>Let me"
    body.update(_forced(" see.</think>4"))
    msg = r1.client().post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (" see.", "4")
    # continued with no tags at all (a prefill of the answer): the answer goes on, even for deepseek_r1
    body["messages"][-1]["content"] = "The answer is"
    body.update(_forced(" 4."))
    msg = r1.client().post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == (" 4.", None)


def test_include_reasoning_false_and_both_field_names(srv):
    text = "<think>a</b>c</think>d"
    body = {"model": "acme", "messages": [{"role": "user", "content": "Q?"}], "temperature": 0,
            "max_tokens": 40, "logprobs": True, **_forced(text)}  # fmt: skip
    c = srv.client(KEY)
    choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["reasoning"] == choice["message"]["reasoning_content"] == "a</b>c"
    every = [lp["token"] for lp in choice["logprobs"]["content"]]
    chunks = [ch["choices"][0] for ch in _sse(srv, "/v1/chat/completions", body) if ch["choices"]]
    assert all(ch["delta"].get("reasoning") == ch["delta"].get("reasoning_content") for ch in chunks)
    # every token's logprobs, also those of text held back while it might have been the closing tag
    assert [lp["token"] for ch in chunks if ch["logprobs"] for lp in ch["logprobs"]["content"]] == every
    hidden = c.post("/v1/chat/completions", json={**body, "include_reasoning": False}).json()["choices"][0]
    assert hidden["message"]["content"] == "d" and hidden["message"]["reasoning_content"] is None
    deltas = [
        ch["choices"][0]["delta"]
        for ch in _sse(srv, "/v1/chat/completions", {**body, "include_reasoning": False})
        if ch["choices"]
    ]
    assert (
        not any(d.get("reasoning_content") for d in deltas)
        and "".join(d.get("content") or "" for d in deltas) == "d"
    )


def test_earlier_thinking_and_reasoning_effort_reach_the_chat_template(srv):
    """An assistant turn's reasoning_content (or reasoning; a Responses reasoning item before it) is given to the
    chat template, which decides whether the prompt shows it (Qwen3's does inside a tool-call chain); effort
    reaches it as reasoning_effort (gpt-oss-style templates read it)."""
    tok = srv.svc.bundle.tokenizer
    with template_calls(tok) as seen:
        msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "reasoning": "hm"},
                {"role": "user", "content": "And?"}]  # fmt: skip
        c = srv.client(KEY)
        r = c.post("/v1/chat/completions", json={"model": "acme", "messages": msgs, "max_tokens": 2,
                                                 "reasoning_effort": "low"})  # fmt: skip
        assert r.status_code == 200, r.text
        items = [{"role": "user", "content": "Q?"},
                 {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
                 {"role": "assistant", "content": "A."}, {"role": "user", "content": "And?"}]  # fmt: skip
        r = c.post("/v1/responses", json={"model": "acme", "input": items, "max_output_tokens": 2,
                                          "reasoning": {"effort": "low"}})  # fmt: skip
        assert r.status_code == 200, r.text
    for messages, kw in seen:
        assert messages[1]["reasoning_content"] == "hm" and kw["reasoning_effort"] == "low"
    assert len(seen) == 2


@pytest.fixture(scope="module")
def thinking_bundle():
    """The tiny model with the thinking tags as added tokens (not special: decoded, as Qwen3's and DeepSeek-R1's)."""
    from tokenizers import AddedToken

    from server.model import bundle_from_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return bundle_from_model(make_tiny_llama(tok, seed=0), tok, name="tiny-thinker")


def test_a_structured_answer_comes_after_the_thinking(server_factory, thinking_bundle):
    """vLLM applies a structured output's grammar once the reasoning ends: the model thinks freely first, and the
    grammar holds the answer (content), streamed or not; where the prompt closed the thinking, from the start."""
    pytest.importorskip("llguidance")
    tok = thinking_bundle.tokenizer
    start, end = (str(tok.convert_tokens_to_ids(t)) for t in ("<think>", "</think>"))
    r1 = server_factory(
        bundle=thinking_bundle, prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="deepseek_r1"
    )
    c = r1.client()
    base = {"model": "acme/default", "messages": [{"role": "user", "content": "Q?"}], "temperature": 0,
            "max_tokens": 12, "structured_outputs": {"choice": ["yes", "no"]}}  # fmt: skip
    # the template opened the thinking (R1's convention): the model closes it (pushed to here), then answers
    closing = {**base, "logit_bias": {end: 100}}
    choice = c.post("/v1/chat/completions", json=closing).json()["choices"][0]
    msg = choice["message"]
    assert msg["reasoning_content"] == "" and msg["content"] in ("yes", "no"), msg
    assert choice["finish_reason"] == "stop"
    deltas = [ch["choices"][0]["delta"] for ch in _sse_raw(c, closing) if ch["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
    # any text is thinking until </think> (the answer's grammar allows none of it): here, all of max_tokens
    choice = c.post("/v1/chat/completions", json={**base, "logit_bias": {end: -100}}).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] is None
    thought = choice["message"]["reasoning_content"]
    assert thought and thought.strip("yesno"), thought
    # the prompt closed the thinking (a continued assistant message past it): the grammar holds from the start
    closed = {**closing, "add_generation_prompt": False, "continue_final_message": True,
              "messages": [*base["messages"], {"role": "assistant", "content": "<think>ok</think>"}]}  # fmt: skip
    msg = c.post("/v1/chat/completions", json=closed).json()["choices"][0]["message"]
    assert msg["content"] in ("yes", "no") and msg["reasoning_content"] is None, msg
    # the Responses API (no logit_bias there): thinking until max_output_tokens is a reasoning item, incomplete
    out = c.post(
        "/v1/responses",
        json={
            "model": "acme/default",
            "input": "Q?",
            "temperature": 0,
            "max_output_tokens": 8,
            "text": {"format": {"type": "json_object"}},
        },
    )
    out = out.json()  # fmt: skip
    assert [item["type"] for item in out["output"]] == ["reasoning"] and out["status"] == "incomplete", out
    # qwen3: the model opens the thinking itself (pushed to here) or answers at once
    q = server_factory(
        bundle=thinking_bundle, prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="qwen3"
    )
    msg = q.client().post("/v1/chat/completions", json={**base, "logit_bias": {start: 100, end: 50}}).json()
    assert (msg["choices"][0]["message"]["reasoning_content"], msg["choices"][0]["message"]["content"]) in (
        ("", "yes"),
        ("", "no"),
    ), msg
    msg = q.client().post("/v1/chat/completions", json={**base, "logit_bias": {start: -100}}).json()
    assert msg["choices"][0]["message"]["content"] in ("yes", "no")
    assert msg["choices"][0]["message"]["reasoning_content"] is None


def test_a_forced_call_comes_after_the_thinking(server_factory, thinking_bundle):
    """tool_choice named or required with a reasoning parser: the thinking first (free), then the call the grammar
    holds; streamed, the named call is announced once the thinking is over."""
    pytest.importorskip("llguidance")
    tok = thinking_bundle.tokenizer
    end = str(tok.convert_tokens_to_ids("</think>"))
    r1 = server_factory(
        bundle=thinking_bundle, prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="deepseek_r1"
    )
    c = r1.client()
    # (arguments the tiny model finishes: a boolean, where a free string would run to max_tokens)
    check = {
        "type": "function",
        "function": {
            "name": "check",
            "parameters": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            },
        },
    }
    named = {"model": "acme/default", "messages": [{"role": "user", "content": "Weather?"}], "tools": [check],
             "tool_choice": {"type": "function", "function": {"name": "check"}}, "temperature": 0,
             "max_tokens": 60, "logit_bias": {end: 100}}  # fmt: skip
    for body in (named, {**named, "tool_choice": "required"}):
        choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        msg = choice["message"]
        assert msg["reasoning_content"] == "" and msg["content"] is None, choice
        assert choice["finish_reason"] in ("stop", "tool_calls"), choice
        assert [t["function"]["name"] for t in msg["tool_calls"]] == ["check"]
        assert json.loads(msg["tool_calls"][0]["function"]["arguments"])["ok"] in (True, False)
    chunks = [ch["choices"][0] for ch in _sse_raw(c, named) if ch["choices"]]
    assert "tool_calls" not in chunks[0]["delta"]  # not announced while it might still think
    heads = [t for ch in chunks for t in ch["delta"].get("tool_calls") or [] if "id" in t]
    assert [t["function"]["name"] for t in heads] == ["check"]
    # the blank line a reasoning model writes after its thinking (pushed to here) is allowed, and is not arguments
    nl = str(tok.convert_tokens_to_ids("\u010a"))  # (byte-level "\n")
    spaced = {**named, "logit_bias": {end: 100, nl: 50}}
    choice = c.post("/v1/chat/completions", json={**spaced, "logprobs": True}).json()["choices"][0]
    assert "\n" in [e["token"] for e in choice["logprobs"]["content"]]  # (it was written)
    call = choice["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) in ({"ok": True}, {"ok": False}), call
    assert call["function"]["arguments"][0] == "{"
    chunks = [ch["choices"][0] for ch in _sse_raw(c, spaced) if ch["choices"]]
    streamed = [t for ch in chunks for t in ch["delta"].get("tool_calls") or []]
    assert "".join(t["function"]["arguments"] for t in streamed) == call["function"]["arguments"]
    assert streamed[0]["function"]["arguments"].startswith("{") and "id" in streamed[0]
    # the thinking over but only blank text after it (cut short by max_tokens): no call begun, streamed or not
    blank = {**spaced, "max_tokens": 4}
    choice = c.post("/v1/chat/completions", json=blank).json()["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"]["tool_calls"], choice
    assert not any(
        ch["delta"].get("tool_calls") for ch in (f["choices"][0] for f in _sse_raw(c, blank) if f["choices"])
    )
    # all thinking (cut short by max_tokens): no call
    choice = c.post("/v1/chat/completions", json={**named, "max_tokens": 6, "logit_bias": {end: -100}})
    choice = choice.json()["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"]["tool_calls"], choice
    assert choice["message"]["reasoning_content"]
    deltas = [ch["choices"][0]["delta"] for ch in _sse_raw(c, {**named, "max_tokens": 6, "logit_bias": {end: -100}})
              if ch["choices"]]  # fmt: skip
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == choice["message"]["reasoning_content"]
    assert not any(d.get("tool_calls") for d in deltas)


def _sse_raw(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_tags_that_are_special_tokens_are_warned_about(thinking_bundle, caplog):
    """Tags the tokenizer marks special are left out of decoded outputs (skip_special_tokens), so the parser, which
    reads the text, cannot see them: the server says so when it starts."""
    from tokenizers import AddedToken

    from tests.fixtures.models import make_tiny_tokenizer

    assert ReasoningParser("qwen3").hidden_tags(thinking_bundle.tokenizer) == []
    tok = make_tiny_tokenizer()
    tok.add_tokens([AddedToken("<think>", special=True), AddedToken("</think>", special=True)])
    assert ReasoningParser("qwen3").hidden_tags(tok) == ["<think>", "</think>"]
    assert ReasoningParser("seed_oss").hidden_tags(tok) == []


def test_seed_oss_tags_bound_the_thinking_under_a_grammar(server_factory):
    """A parser with its own tags (seed_oss): the thinking splits at `</seed:think>` and a structured answer's
    grammar starts there, not at `</think>`."""
    pytest.importorskip("llguidance")
    from tokenizers import AddedToken

    from server.model import bundle_from_model
    from tests.fixtures.models import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.add_tokens([AddedToken(t, special=False) for t in ("<seed:think>", "</seed:think>", "</think>")])
    bundle = bundle_from_model(make_tiny_llama(tok, seed=0), tok, name="tiny-seed")
    s = server_factory(
        bundle=bundle, prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="seed_oss"
    )
    end, other = (str(tok.convert_tokens_to_ids(t)) for t in ("</seed:think>", "</think>"))
    base = {"model": "acme/default", "messages": [{"role": "user", "content": "Q?"}], "temperature": 0,
            "max_tokens": 10, "structured_outputs": {"choice": ["yes", "no"]}}  # fmt: skip
    msg = s.client().post("/v1/chat/completions", json={**base, "logit_bias": {end: 100}}).json()
    msg = msg["choices"][0]["message"]
    assert msg["reasoning_content"] == "" and msg["content"] in ("yes", "no"), msg
    # `</think>` is thinking text here: pushed to it, the output never leaves the thinking
    free = {k: v for k, v in base.items() if k != "structured_outputs"}
    r = s.client().post("/v1/chat/completions", json={**free, "logit_bias": {other: 100}})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] is None and "</think>" in choice["message"]["reasoning_content"]


def test_thinking_token_budget_cuts_the_thinking_at_its_tokens(server_factory, thinking_bundle):
    """vLLM's thinking_token_budget: the thinking ends after that many tokens (its closing tag forced, whatever the
    logits say), then the model answers; on /v1/chat/completions (streamed or not, under a structured output too),
    /v1/completions (where the prompt opens the thinking) and Anthropic's thinking.budget_tokens. Without a
    reasoning parser, or with beam search, it is refused."""
    pytest.importorskip("llguidance")
    tok = thinking_bundle.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    r1 = server_factory(
        bundle=thinking_bundle, prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="deepseek_r1"
    )
    c = r1.client()
    # the model never closes its thinking by itself here: all 12 tokens are thinking
    base = {"model": "acme/default", "messages": [{"role": "user", "content": "Q?"}], "temperature": 0,
            "max_tokens": 12, "return_token_ids": True, "logit_bias": {str(end): -100}}  # fmt: skip
    free = c.post("/v1/chat/completions", json=base).json()["choices"][0]
    assert free["message"]["content"] is None and end not in free["token_ids"]
    cut = c.post("/v1/chat/completions", json={**base, "thinking_token_budget": 4}).json()["choices"][0]
    ids = cut["token_ids"]
    assert ids[:4] == free["token_ids"][:4] and ids[4] == end and len(ids) == 12, ids
    msg = cut["message"]
    assert msg["reasoning_content"] == _text(tok, ids[:4]) and msg["content"] == _text(tok, ids[5:]), msg
    deltas = [
        ch["choices"][0]["delta"] for ch in _sse_raw(c, {**base, "thinking_token_budget": 4}) if ch["choices"]
    ]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
    # budget 0: no thinking at all; a structured answer after a cut thinking
    zero = c.post("/v1/chat/completions", json={**base, "thinking_token_budget": 0}).json()["choices"][0]
    assert zero["token_ids"][0] == end and zero["message"]["reasoning_content"] == ""
    so = {**base, "thinking_token_budget": 3, "structured_outputs": {"choice": ["yes", "no"]}}
    done = c.post("/v1/chat/completions", json=so).json()["choices"][0]
    assert done["token_ids"][3] == end and done["message"]["content"] in ("yes", "no"), done
    assert done["finish_reason"] == "stop"
    # /v1/completions (qwen3: the model opens its thinking): a prompt that ends inside one is cut, one that does
    # not is left alone (this model never writes the opening tag)
    q = server_factory(
        bundle=thinking_bundle, prefixes={("acme", "default"): {"seed": 5}}, reasoning_parser="qwen3"
    ).client()
    comp = {"model": "acme/default", "prompt": ["Q?<think>", "Q?"], "temperature": 0, "max_tokens": 8,
            "return_token_ids": True, "logit_bias": {str(end): -100}, "thinking_token_budget": 2}  # fmt: skip
    opened, closed = q.post("/v1/completions", json=comp).json()["choices"]
    assert opened["token_ids"][2] == end and end not in closed["token_ids"], (opened, closed)
    # thinking the prompt wrote itself counts (as vLLM's): "ab" is two tokens of this byte-level tokenizer
    wrote = q.post(
        "/v1/completions", json={**comp, "prompt": "Q?<think>ab", "thinking_token_budget": 3}
    ).json()
    assert wrote["choices"][0]["token_ids"][1] == end, wrote
    # ... and a continued assistant message's (not a generation prompt's, above: the template's own tokens)
    cont = {**base, "thinking_token_budget": 3, "add_generation_prompt": False, "continue_final_message": True,
            "messages": [*base["messages"], {"role": "assistant", "content": "<think>ab"}]}  # fmt: skip
    got = c.post("/v1/chat/completions", json=cont).json()["choices"][0]
    assert got["token_ids"][1] == end, got
    # Anthropic: thinking.budget_tokens is the budget (its thinking block, then the answer's text)
    body = {"model": "acme/default", "max_tokens": 12, "messages": [{"role": "user", "content": "Q?"}], "temperature": 0,
            "thinking": {"type": "enabled", "budget_tokens": 3}}  # fmt: skip
    blocks = c.post("/v1/messages", json=body).json()["content"]
    ref = c.post(
        "/v1/chat/completions",
        json={**{k: v for k, v in base.items() if k != "logit_bias"}, "thinking_token_budget": 3},
    ).json()["choices"][0]
    assert blocks[0] == {"type": "thinking", "thinking": ref["message"]["reasoning_content"], "signature": ""}
    assert end in ref["token_ids"][:4]
    bad = c.post("/v1/messages", json={**body, "thinking": {"type": "enabled", "budget_tokens": -1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "thinking.budget_tokens"
    # refused: beam search, a negative budget, a server without a reasoning parser
    r = c.post("/v1/completions", json={**comp, "use_beam_search": True, "n": 2, "logit_bias": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget"
    r = c.post("/v1/chat/completions", json={**base, "thinking_token_budget": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget"
    plain = server_factory(bundle=thinking_bundle, prefixes={("acme", "default"): {"seed": 5}})
    r = plain.client().post("/v1/chat/completions", json={**base, "thinking_token_budget": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget", r.json()
    assert "reasoning" in r.json()["error"]["message"]
    # (Anthropic clients always send a budget with thinking enabled: a model without a parser just answers)
    assert plain.client().post("/v1/messages", json=body).status_code == 200


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)
