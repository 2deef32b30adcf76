"""Structured outputs over HTTP: `structured_outputs` on /generate and the /v1 routes, OpenAI's `response_format`
(through the official `openai` package, its `parse` helper included), streaming, n choices, and 422s (400s on the
`/v1` routes) that name the field and change nothing (tiny random Llama: only the constraint makes its output valid)."""

from __future__ import annotations

import json
import re

import openai
import pytest
from pydantic import BaseModel, Field

from tests.fixtures.server import assert_error, metric_value, parse_sse

KEY = "sk-acme-struct-1"
ITEM = {
    "type": "object",
    "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}, "qty": {"type": "integer"}},
    "required": ["sku", "qty"],
    "additionalProperties": False,
}


@pytest.fixture
def srv(server_factory):
    return server_factory(prefixes={("acme", "default"): {"seed": 21}}, keys={"acme": KEY})


@pytest.fixture
def oai(srv):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
    yield client
    client.close()


def gen(srv, **body):
    body.setdefault("prompt", "Order something")
    body.setdefault("max_tokens", 64)
    return srv.client(KEY).post("/generate", json=body)


def check_item(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"sku", "qty"} and isinstance(obj["qty"], int), obj
    assert re.fullmatch(r"[A-Z]{2}[0-9]{2}", obj["sku"]), obj


def test_generate_json_schema_regex_choice_grammar(srv):
    r = gen(srv, structured_outputs={"json": ITEM, "disable_any_whitespace": True}, temperature=1.0, seed=3)
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop"
    check_item(r.json()["text"])
    assert " " not in r.json()["text"]
    # the schema may also come as JSON text
    r = gen(srv, structured_outputs={"json": json.dumps(ITEM), "disable_any_whitespace": True})
    check_item(r.json()["text"])
    r = gen(srv, structured_outputs={"regex": r"\d{4}-\d{2}-\d{2}"}, temperature=1.0, seed=1)
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.json()["text"]), r.json()  # \d is ASCII
    r = gen(srv, structured_outputs={"choice": ["red", "green", "blue"]}, temperature=1.0, seed=2)
    assert r.json()["text"] in ("red", "green", "blue") and r.json()["finish_reason"] == "stop"
    r = gen(
        srv, structured_outputs={"grammar": 'start: "ok" | "error: " /[a-z]{3}/'}, temperature=1.0, seed=4
    )
    assert re.fullmatch(r"ok|error: [a-z]{3}", r.json()["text"]), r.json()
    r = gen(srv, structured_outputs={"json_object": True}, temperature=1.0, seed=5, max_tokens=200)
    if r.json()["finish_reason"] == "stop":
        assert isinstance(json.loads(r.json()["text"]), dict)
    else:
        assert r.json()["text"].startswith("{")


def test_generate_streamed_text_matches(srv):
    r = gen(
        srv, structured_outputs={"regex": r"[a-z]{3}(-[0-9]{1,3}){2}"}, stream=True, temperature=1.0, seed=9
    )
    assert r.status_code == 200
    chunks = parse_sse(r.text)
    assert chunks[-1] == "[DONE]"
    text = "".join(c["text"] for c in chunks[:-1])
    assert re.fullmatch(r"[a-z]{3}(-[0-9]{1,3}){2}", text), text
    assert chunks[-2]["finish_reason"] == "stop"


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{2}[0-9]{2}$")
    qty: int


def test_openai_response_format_and_parse(oai):
    c = oai.chat.completions.create(
        model="acme/default",
        messages=[{"role": "user", "content": "Order"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "item", "schema": ITEM, "strict": True},
        },
        max_tokens=64,
        temperature=0,
    )
    check_item(c.choices[0].message.content)
    assert c.choices[0].finish_reason == "stop"
    # the openai package's parse(): a pydantic model as response_format, the answer parsed back into it
    parsed = oai.chat.completions.parse(
        model="acme/default",
        messages=[{"role": "user", "content": "Order"}],
        response_format=Item,
        max_tokens=256,  # (sampled: the integer may run long)
        temperature=1.0,
        seed=7,
    )
    item = parsed.choices[0].message.parsed
    assert isinstance(item, Item) and re.fullmatch(r"[A-Z]{2}[0-9]{2}", item.sku)
    j = oai.completions.create(
        model="acme/default",
        prompt="x",
        max_tokens=120,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert j.choices[0].text.lstrip().startswith("{")  # (sampled, no seed: JSON may lead with whitespace)
    # "text" is no constraint: the same as leaving it out
    plain = dict(
        model="acme/default", prompt="x", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    a = oai.completions.create(**plain)
    plain["extra_body"] = {"ignore_eos": True, "response_format": {"type": "text"}}
    assert oai.completions.create(**plain).choices[0].text == a.choices[0].text


def test_openai_n_choices_and_streamed_chat(oai):
    c = oai.completions.create(
        model="acme/default",
        prompt=["a", "b"],
        n=3,
        max_tokens=16,
        temperature=1.0,
        seed=11,
        extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma", "delta"]}},
    )
    texts = [ch.text for ch in c.choices]
    assert len(texts) == 6 and set(texts) <= {"alpha", "beta", "gamma", "delta"}
    assert len(set(texts)) > 1
    stream = oai.chat.completions.create(
        model="acme/default",
        messages=[{"role": "user", "content": "Order"}],
        max_tokens=64,
        temperature=1.0,
        seed=12,
        stream=True,
        extra_body={"structured_outputs": {"json": ITEM, "disable_any_whitespace": True}},
    )
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    check_item("".join(parts))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": {"type": "frobnicate"}}}, "structured_outputs.json"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs"),
        (
            {
                "structured_outputs": {
                    "structural_tag": {"structures": [{"begin": "<a>"}], "triggers": ["<b"]}
                }
            },
            "structured_outputs.structural_tag",
        ),
        ({"structured_outputs": {"structural_tag": "[]"}}, "structured_outputs.structural_tag"),
    ],
)
def test_invalid_structured_outputs_are_422_naming_the_field(srv, body, param):
    err = assert_error(gen(srv, **body), 422)
    assert err["param"] == param, err
    assert srv.svc.engine.num_waiting == 0 and srv.svc.engine.num_running == 0


def test_schema_level_errors_and_nothing_changes(srv, oai):
    c = srv.client(KEY)

    def finished() -> float | None:
        return metric_value(
            c.get("/metrics").text, "prefixserve:request_success_total", {"finished_reason": "stop"}
        )

    assert gen(srv, structured_outputs={"choice": ["fine"]}).json()["text"] == "fine"
    before = finished()
    assert before is not None and before >= 1
    for body in (
        {"structured_outputs": {"choice": []}},
        {"structured_outputs": {"choice": ["a", ""]}},
        {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},  # not ours: named, not ignored
    ):
        assert_error(gen(srv, **body), 422)
    # an integer past 64 bits: the compiler's limit is named (it said "Value is not JSON serializable")
    big = {"structured_outputs": {"json": {"type": "integer", "maximum": 2**64}}}
    assert "integer beyond 64 bits" in assert_error(gen(srv, **big), 422)["message"]
    base = {"model": "acme/default", "prompt": "x", "max_tokens": 4}
    err = assert_error(
        c.post(
            "/v1/completions",
            json={**base, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        ),
        400,
    )
    assert err["param"] == "structured_outputs"
    err = assert_error(
        c.post(
            "/v1/completions",
            json={**base, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        ),
        400,
    )
    assert err["param"] == "response_format"
    err = assert_error(
        c.post(
            "/v1/chat/completions",
            json={
                "model": "acme/default",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 3}},
                },
            },
        ),
        400,
        code="invalid_structured_output",
    )
    assert err["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(
            model="acme/default", prompt="x", extra_body={"structured_outputs": {"regex": "("}}
        )
    assert finished() == before  # nothing was queued or run
    assert srv.svc.engine.num_waiting == 0 and srv.svc.engine.num_running == 0
    assert gen(srv, structured_outputs={"choice": ["fine"]}).json()["text"] == "fine"
    assert finished() == before + 1


def test_unknown_prefix_is_a_404_before_its_grammar_is_compiled(srv):
    """Compiling a schema can take tens of milliseconds: a request for a prefix that does not exist is refused
    first, and its grammar never reaches the compiler."""
    compiler = srv.svc.llm.grammars
    compiled = []
    orig = compiler.compile
    compiler.compile = lambda spec: compiled.append(spec) or orig(spec)
    try:
        assert_error(gen(srv, prefix="nope", structured_outputs={"regex": "[a-z]+"}), 404, "prefix_not_found")
        assert compiled == []
        assert gen(srv, structured_outputs={"regex": "[a-z]+"}).status_code == 200 and len(compiled) == 1
    finally:
        compiler.compile = orig


def test_no_tenant_gets_a_grammar_another_tenant_compiled(server_factory):
    """The compiled-grammar cache was the process's: a tenant timing its own requests (a cache hit skips the
    compile thread: 3.2 ms against 5-6.7 ms) could tell which JSON schemas, choices or regexes another tenant had
    sent (23 of 24 guesses right). Each tenant's specs are its own cache entries (as vLLM salts its prefix cache)."""
    s = server_factory(keys={"acme": "k-a", "globex": "k-g"})
    compiler = s.svc.llm.grammars
    body = {"tenant_id": "acme", "prefix": "base", "prompt": "x", "max_tokens": 4}
    body["structured_outputs"] = {"choice": ["red", "blue"]}
    assert s.client("k-a").post("/generate", json=body).status_code == 200
    first = compiler.compilations
    assert s.client("k-a").post("/generate", json=body).status_code == 200
    assert compiler.compilations == first  # its own: a hit
    assert s.client("k-g").post("/generate", json={**body, "tenant_id": "globex"}).status_code == 200
    assert compiler.compilations == first + 1  # another tenant's: compiled for it, not taken from acme's


def test_sdk_structured_outputs_against_the_server(srv):
    from prefixserve_client import Client, UnprocessableEntity

    with Client(srv.url, api_key=KEY, max_retries=0) as c:
        g = c.generate("acme", "Order", structured_outputs=Item, max_tokens=400)  # a random model: whitespace
        assert g.finish_reason == "stop", g.text
        item = Item.model_validate_json(g.text)
        assert re.fullmatch(r"[A-Z]{2}[0-9]{2}", item.sku)
        parts = [d.text for d in c.stream("acme", "Pick", structured_outputs={"choice": ["left", "right"]})]
        assert "".join(parts) in ("left", "right")
        with pytest.raises(UnprocessableEntity) as ei:
            c.generate("acme", "x", structured_outputs={"regex": "("})
        assert ei.value.param == "structured_outputs.regex" and ei.value.code == "invalid_structured_output"


def test_grammar_past_the_parser_limits_is_a_422_and_the_server_carries_on(srv):
    """The lexer's limits are reached only once the output gets to the nested repeats: a stream has started by
    then, so its last event is the error; a whole answer is a 422 (the compiled grammar keeps what it built, so
    from then on it fails at once)."""
    so = {"regex": "b{1,5}((a{60}){60}){60}"}
    r = gen(srv, structured_outputs=so, stream=True)
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "structured_output_failed"
    assert "too many expressions" in events[-2]["error"]["message"]
    assert events[-2]["error"]["status"] == 422  # the status it would have had: the SDK raises the same class
    assert re.fullmatch("b{1,5}a*", "".join(e.get("text", "") for e in events[:-2]))
    from prefixserve_client import Client, UnprocessableEntity

    fresh = {
        "regex": "c{1,5}((a{60}){60}){60}"
    }  # another grammar: it too fails only once the stream has begun
    with Client(srv.url, api_key=KEY, max_retries=0) as c, pytest.raises(UnprocessableEntity) as ei:
        for _ in c.stream("acme", "x", structured_outputs=fresh):
            pass
    assert ei.value.in_stream and ei.value.code == "structured_output_failed"
    err = assert_error(gen(srv, structured_outputs=so), 422, code="structured_output_failed")
    assert err["param"] == "structured_outputs.regex" and "too many expressions" in err["message"]
    assert gen(srv, structured_outputs={"choice": ["fine"]}).json()["text"] == "fine"

    # the error names the field the grammar came in: each route's own (it named structured_outputs, whatever the
    # request sent)
    # (each route its own schema: one compiled by an earlier request fails at its first token, not mid-generation)
    def schema(first: str) -> dict:
        pattern = f"^{first}{{1,5}}((a{{60}}){{60}}){{60}}$"
        return {
            "type": "object",
            "properties": {"a": {"type": "string", "pattern": pattern}},
            "required": ["a"],
        }

    c, ask = srv.client(KEY), [{"role": "user", "content": "x"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema("d")}}
    for route, body, param in (
        ("/v1/chat/completions", {"messages": ask, "response_format": fmt, "max_tokens": 400},
         "response_format.json_schema.schema"),
        ("/v1/messages", {"messages": ask, "output_format": {"type": "json_schema", "schema": schema("e")},
                          "max_tokens": 400}, "output_format.schema"),
        ("/v1/responses", {"input": "x", "max_output_tokens": 400,
                           "text": {"format": {"type": "json_schema", "name": "x", "schema": schema("f")}}},
         "text.format.schema"),
    ):  # fmt: skip
        r = c.post(route, json={"model": "acme", "temperature": 0, **body})
        err = assert_error(r, 400, code="structured_output_failed")
        assert err["param"] == param and "too many expressions" in err["message"], (route, err)


def test_vllm_guided_fields_are_honoured_not_ignored(oai, srv):
    """Older vLLM clients send guided_json / guided_regex / guided_choice / guided_grammar: the /v1 routes take
    extra fields silently, so these must act (or be refused), never be dropped."""
    for seed, extra, pattern in (
        (3, {"guided_choice": ["up", "down"]}, "up|down"),
        (4, {"guided_regex": "[0-9]{5}"}, "[0-9]{5}"),
    ):
        c = oai.completions.create(
            model="acme/default", prompt="x", max_tokens=16, temperature=1.0, seed=seed, extra_body=extra
        )
        assert re.fullmatch(pattern, c.choices[0].text), (extra, c.choices[0].text)
    chat = oai.chat.completions.create(
        model="acme/default",
        messages=[{"role": "user", "content": "Order"}],
        max_tokens=64,
        temperature=0,
        extra_body={"guided_json": ITEM},
    )
    check_item(chat.choices[0].message.content)
    body = {"model": "acme/default", "prompt": "x", "guided_regex": "a", "structured_outputs": {"regex": "b"}}
    assert (
        assert_error(srv.client(KEY).post("/v1/completions", json=body), 400)["param"] == "structured_outputs"
    )
    # guided_whitespace_pattern "" is vLLM's "no whitespace between JSON tokens" (it was dropped: blank lines came);
    # another pattern is refused, naming it
    for so in ({"guided_json": ITEM}, {"structured_outputs": {"json": ITEM}}):
        for seed in range(3):
            c = oai.completions.create(
                model="acme/default", prompt="x", max_tokens=64, temperature=1.0, seed=seed,
                extra_body={**so, "guided_whitespace_pattern": ""},
            )  # fmt: skip
            text = c.choices[0].text
            outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
            assert not re.search(r"\s", outside_strings), text
            if c.choices[0].finish_reason == "stop":
                check_item(text)
    # with response_format too (vLLM applies it there as well)
    for seed in range(2):
        chat = oai.chat.completions.create(
            model="acme/default", messages=[{"role": "user", "content": "Order"}], max_tokens=64,
            temperature=1.0, seed=seed, response_format={"type": "json_object"},
            extra_body={"guided_whitespace_pattern": ""},
        )  # fmt: skip
        text = chat.choices[0].message.content
        if chat.choices[0].finish_reason == "stop":  # (cut short, a string may be open)
            assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)), text
    bad = {"model": "acme/default", "prompt": "x", "guided_json": ITEM, "guided_whitespace_pattern": "[ ]?"}
    err = assert_error(srv.client(KEY).post("/v1/completions", json=bad), 400)
    assert err["param"] == "guided_whitespace_pattern"
    # errors name the guided_* field sent (they named structured_outputs.*, which the request did not have)
    for extra, param in (
        ({"guided_regex": "("}, "guided_regex"),
        ({"guided_json": {"type": "nope"}}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_json"),
    ):
        for route, ask in (
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            err = assert_error(
                srv.client(KEY).post(route, json={"model": "acme/default", **ask, **extra}), 400
            )
            assert err["param"] == param and "structured_outputs" not in err["message"], (route, extra, err)


def test_structural_tags_hold_what_follows_a_trigger(srv):
    """vLLM's structural tags: free text, but a trigger must go on as a structure beginning with it, its content
    following the schema, then its end. Pushed to write the trigger again and again (a +100 bias on "<"), the
    tiny model writes whole structures; without them it would write "<<<<"."""
    lt = str(srv.svc.bundle.tokenizer.convert_tokens_to_ids("<"))
    tags = {"structures": [{"begin": "<t>", "schema": {"type": "boolean"}, "end": "</t>"}], "triggers": ["<"]}
    r = gen(srv, structured_outputs={"structural_tag": tags}, logit_bias={lt: 100}, max_tokens=40)
    assert r.status_code == 200, r.text
    assert re.match(r"<t>(true|false)</t><t>(true|false)</t>", r.json()["text"]), r.json()
    assert gen(srv, logit_bias={lt: 100}, max_tokens=8).json()["text"] == "<" * 8
    # OpenAI's response_format, vLLM's structural_tag type (its JSON text in structured_outputs too)
    c = srv.client(KEY)
    body = {"model": "acme", "prompt": "x", "max_tokens": 40, "logit_bias": {lt: 100}, "temperature": 0}
    r = c.post("/v1/completions", json={**body, "response_format": {"type": "structural_tag", **tags}})
    assert re.match(r"<t>(true|false)</t><t>(true|false)</t>", r.json()["choices"][0]["text"]), r.json()
    r2 = c.post("/v1/completions", json={**body, "structured_outputs": {"structural_tag": json.dumps(tags)}})
    assert r2.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    # vLLM's JSON form (the response_format's, with its type) is taken too
    typed = {"structural_tag": json.dumps({"type": "structural_tag", **tags})}
    r3 = c.post("/v1/completions", json={**body, "structured_outputs": typed})
    assert r3.json()["choices"][0]["text"] == r.json()["choices"][0]["text"], r3.text
    err = assert_error(
        c.post("/v1/completions", json={**body, "response_format": {"type": "structural_tag"}}), 400
    )
    assert err["param"] == "response_format"
    bad = {"type": "structural_tag", "structures": [{"begin": "x", "end": ""}], "triggers": ["<"]}
    err = assert_error(c.post("/v1/completions", json={**body, "response_format": bad}), 400)
    assert err["code"] == "invalid_structured_output" and "starts with none of the triggers" in err["message"]


def test_schemas_nested_or_chained_deep_are_refused_or_served_never_a_crash(srv):
    """One tenant's request must not take the server down: a chain of 3,000 definitions (it overflowed the
    compiling thread's stack: SIGSEGV) is compiled and served; one over the $ref limit is refused naming the field;
    tool parameters nested 400 deep (a RecursionError in the chat template: a 500) are a 400 (the body's depth)."""
    pytest.importorskip("llguidance")
    from server.engine.structured import MAX_SCHEMA_REFS

    def chain(n: int) -> dict:
        defs = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(n)}
        defs[f"d{n}"] = {"type": "string"}
        return {
            "type": "object",
            "properties": {"x": {"$ref": "#/$defs/d0"}},
            "required": ["x"],
            "$defs": defs,
        }

    c = srv.client(KEY)
    chat = {"model": "acme", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": chain(3000)}}
    r = c.post("/v1/chat/completions", json={**chat, "response_format": fmt})
    assert r.status_code == 200, r.text
    fmt["json_schema"]["schema"] = chain(MAX_SCHEMA_REFS)
    r = c.post("/v1/chat/completions", json={**chat, "response_format": fmt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema", r.text
    assert "$ref references" in r.json()["error"]["message"]
    deep: dict = {"type": "string"}
    for _ in range(400):
        deep = {"type": "object", "properties": {"a": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    r = c.post("/v1/chat/completions", json={**chat, "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert c.get("/health").status_code == 200


def test_a_tool_schema_that_does_not_compile_is_an_error_of_tools(srv):
    """tool_choice "required" (or a named tool) constrains the output to the tools' parameters: one that does not
    compile (a bad regex) was "invalid tool_choice", naming a field the client had right."""
    pytest.importorskip("llguidance")
    params = {"type": "object", "properties": {"x": {"type": "string", "pattern": "a(b"}}, "required": ["x"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    body = {
        "model": "acme",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "tools": [tool],
    }
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        r = srv.client(KEY).post("/v1/chat/completions", json={**body, "tool_choice": choice})
        err = assert_error(r, 400)
        assert err["param"] == "tools" and err["message"].startswith("invalid tools"), err
