"""SDK (clients/python) against a scripted HTTP server on a real loopback socket (Starlette + uvicorn, no mocks).

Each test scripts the answers of the routes it calls (status, JSON body, headers, SSE frames) and checks what the
SDK sent and what it returned or raised. Acceptance against the real server is a separate end-to-end test.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
# this checkout's SDK, before any installed copy (`make install` installs it editable from wherever the venv was
# made: another checkout's SDK would be tested instead)
CLIENT = str(ROOT / "clients" / "python")
if CLIENT not in sys.path:
    sys.path.insert(0, CLIENT)

import prefixserve_client as ps  # noqa: E402

# ------------------------------------------------------------------------------------------ scripted server


@dataclass
class Resp:
    status: int = 200
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    sse: list[str] | None = None  # raw event payloads; each becomes "data: <payload>\n\n"
    raw: bytes | None = None  # raw body (with sse: appended as-is after the events)
    raw_chunks: list[bytes] | None = (
        None  # (with sse: written one at a time after the events, frame_delay apart)
    )
    delay: float = 0.0  # before answering
    frame_delay: float = 0.0  # between SSE frames
    content_type: str | None = None
    echo_id: bool = True  # echo X-Request-ID like the server does


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    t: float


def error_json(status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Scripted:
    """Routes answer from a queue of Resp (the last one repeats); unknown routes answer 404 (server shape)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], deque[Resp]] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()

    def on(self, method: str, path: str, *responses: Resp) -> None:
        self.routes[(method, path)] = deque(responses)

    def calls(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path == path]

    def next(self, method: str, path: str) -> Resp:
        with self.lock:
            q = self.routes.get((method, path))
            if not q:
                return Resp(404, error_json(404, "not found", "not_found_error", "not_found"))
            return q.popleft() if len(q) > 1 else q[0]

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        async def handle(request: Request) -> Any:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            self.seen.append(
                Seen(
                    request.method,
                    request.url.path,
                    request.url.query,
                    {k.lower(): v for k, v in request.headers.items()},
                    body,
                    time.monotonic(),
                )
            )
            r = self.next(request.method, request.url.path)
            if r.delay:
                await asyncio.sleep(r.delay)
            headers = dict(r.headers)
            if r.echo_id:
                headers["x-request-id"] = request.headers.get("x-request-id") or "rid-server"
            if r.sse is not None:

                async def frames() -> Any:
                    for payload in r.sse or []:
                        yield f"data: {payload}\n\n".encode()
                        if r.frame_delay:
                            await asyncio.sleep(r.frame_delay)
                    if r.raw:
                        yield r.raw
                    for piece in r.raw_chunks or []:
                        yield piece
                        if r.frame_delay:
                            await asyncio.sleep(r.frame_delay)

                return StreamingResponse(
                    frames(), status_code=r.status, media_type="text/event-stream", headers=headers
                )
            if r.raw is not None:
                return Response(
                    r.raw, status_code=r.status, headers=headers, media_type=r.content_type or "text/plain"
                )
            return JSONResponse(r.json, status_code=r.status, headers=headers)

        methods = ["GET", "POST", "DELETE", "PUT", "PATCH"]
        return Starlette(routes=[Route("/{path:path}", handle, methods=methods)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live() -> Any:
    import uvicorn

    scripted = Scripted()
    port = free_port()
    config = uvicorn.Config(
        scripted.app(), host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sdk-scripted", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "scripted server did not start"
        time.sleep(0.01)
    scripted.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield scripted
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def srv(live: Scripted) -> Scripted:
    live.routes.clear()
    live.seen.clear()
    return live


@pytest.fixture
def client(srv: Any) -> Any:
    with ps.Client(srv.url, api_key="key-a", timeout=10) as c:
        yield c


GEN = {
    "id": "gen-1",
    "tenant_id": "acme",
    "prefix": "default",
    "prefix_version": 3,
    "text": "hello world",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


def chunk(text: str, finish: str | None = None, usage: dict | None = None) -> str:
    head = {"id": "gen-1", "tenant_id": "acme", "prefix": "default", "prefix_version": 3}
    return json.dumps({**head, "text": text, "finish_reason": finish, "usage": usage})


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
STREAM = [chunk("he"), chunk("llo"), chunk("!", "length", USAGE), "[DONE]"]


def no_sleep(client: Any) -> list[float]:
    """Record the retry delays instead of sleeping them (the requests still go over the socket)."""
    delays: list[float] = []
    client._sleep = delays.append
    return delays


def free_closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# ------------------------------------------------------------------------------------------ generate
def test_generate_request_and_typed_response(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(200, {**GEN, "future_field": 1}))
    g = client.generate(
        "acme", "Hi", max_tokens=5, temperature=0.5, top_p=0.9, top_k=4, seed=7, stop=["\n"], request_id="r-1"
    )
    assert isinstance(g, ps.Generation)
    assert (g.text, g.finish_reason, g.prefix_version, g.usage.total_tokens) == ("hello world", "stop", 3, 7)
    assert g.request_id == "r-1"
    assert g.model_extra == {"future_field": 1}  # tolerant of fields added later
    (seen,) = srv.calls("POST", "/generate")
    assert seen.body == {
        "tenant_id": "acme",
        "prompt": "Hi",
        "prefix": "default",
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 4,
        "seed": 7,
        "stop": ["\n"],
        "stream": False,
    }
    assert seen.headers["authorization"] == "Bearer key-a"
    assert seen.headers["x-request-id"] == "r-1"
    assert seen.headers["user-agent"].startswith("prefixserve-client/")


def test_generate_sends_vllms_token_controls(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(200, GEN))
    client.generate(
        "acme",
        "Hi",
        allowed_token_ids=(3, 1),
        logit_bias={5: 1},
        min_tokens=1,
        stop_token_ids=[2],
        bad_words=("darn", "heck"),
    )
    (seen,) = srv.calls("POST", "/generate")
    assert seen.body["allowed_token_ids"] == [3, 1] and seen.body["logit_bias"] == {"5": 1.0}
    assert (seen.body["min_tokens"], seen.body["stop_token_ids"]) == (1, [2])
    assert seen.body["bad_words"] == ["darn", "heck"]
    client.generate("acme", "Hi")
    sent = srv.calls("POST", "/generate")[1].body
    assert "allowed_token_ids" not in sent and "bad_words" not in sent  # only when set
    client.generate("acme", "Hi", bad_words="Paris")  # one word, not its letters
    assert srv.calls("POST", "/generate")[2].body["bad_words"] == ["Paris"]


def test_generate_sends_special_token_controls_and_extra_body(srv: Any, client: Any) -> None:
    """vLLM's skip_special_tokens / spaces_between_special_tokens (sent only when False) and an extra_body merged
    into the JSON (over the SDK's own fields), for generate and stream, sync and async alike; extra_body cannot
    set `stream`."""
    srv.on("POST", "/generate", Resp(200, GEN))
    kw: dict[str, Any] = {
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "extra_body": {"future_field": [1], "temperature": 0.25},
    }
    want = {
        "prompt": "Hi",
        "prefix": "default",
        "max_tokens": 64,
        "temperature": 0.25,
        "top_p": 1.0,
        "top_k": 0,
        "tenant_id": "acme",
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "future_field": [1],
    }
    client.generate("acme", "Hi", **kw)
    client.generate("acme", "Hi")

    async def go() -> None:
        async with ps.AsyncClient(srv.url) as ac:
            await ac.generate("acme", "Hi", **kw)
            srv.on("POST", "/generate", Resp(200, sse=STREAM))
            assert "".join([d.text async for d in ac.stream("acme", "Hi", **kw)]) == "hello!"
            with pytest.raises(ValueError, match="stream"):
                await ac.generate("acme", "Hi", extra_body={"stream": True})

    asyncio.run(go())
    assert "".join(d.text for d in client.stream("acme", "Hi", **kw)) == "hello!"
    with pytest.raises(ValueError, match="extra_body cannot set 'stream'"):
        client.stream("acme", "Hi", extra_body={"stream": False})
    with pytest.raises(TypeError, match="extra_body must be a mapping"):
        client.generate("acme", "Hi", extra_body=[("a", 1)])  # type: ignore[arg-type]
    sync, plain, asyn, asyn_stream, sync_stream = (c.body for c in srv.calls("POST", "/generate"))
    assert sync == asyn == {**want, "stream": False}
    assert asyn_stream == sync_stream == {**want, "stream": True}
    assert not {"skip_special_tokens", "spaces_between_special_tokens", "future_field"} & set(plain)


def test_generate_structured_outputs_body(srv: Any, client: Any) -> None:
    from pydantic import BaseModel

    class Item(BaseModel):
        sku: str
        qty: int

    srv.on("POST", "/generate", Resp(200, {**GEN, "text": '{"sku":"AB12","qty":3}'}))
    g = client.generate("acme", "Hi", structured_outputs=Item)
    assert Item.model_validate_json(g.text) == Item(sku="AB12", qty=3)
    client.generate("acme", "Hi", structured_outputs={"regex": "[0-9]+"})
    list(client.stream("acme", "Hi", structured_outputs={"choice": ["a", "b"]}))
    sent = [c.body["structured_outputs"] for c in srv.calls("POST", "/generate")]
    strict = {**Item.model_json_schema(), "additionalProperties": False}
    assert sent == [{"json": strict}, {"regex": "[0-9]+"}, {"choice": ["a", "b"]}]
    assert sent[0]["json"]["required"] == ["sku", "qty"]
    with pytest.raises(TypeError, match="structured_outputs"):
        client.generate("acme", "Hi", structured_outputs="[0-9]+")  # type: ignore[arg-type]
    assert len(srv.calls("POST", "/generate")) == 3  # nothing sent for the bad argument

    async def main() -> None:
        async with ps.AsyncClient(srv.url, api_key="key-a") as c:
            await c.generate("acme", "Hi", structured_outputs={"json_object": True})
            [d async for d in c.stream("acme", "Hi", structured_outputs=Item)]

    asyncio.run(main())
    sent = [c.body["structured_outputs"] for c in srv.calls("POST", "/generate")][3:]
    assert sent == [{"json_object": True}, {"json": strict}]


def test_a_pydantic_class_is_sent_as_a_strict_schema() -> None:
    """Like openai's .parse(): every object schema, in $defs and nested anywhere, gets additionalProperties false
    (without it the model may add keys until max_tokens), unless it allows extras; data and names are untouched."""
    from prefixserve_client._base import strict_json_schema, structured_outputs_body
    from pydantic import BaseModel, ConfigDict

    class Open(BaseModel):
        model_config = ConfigDict(extra="allow")
        x: int

    class Closed(BaseModel):
        model_config = ConfigDict(extra="forbid")
        y: int

    class Leaf(BaseModel):
        z: str

    class Root(BaseModel):
        leaf: Leaf
        leaves: list[Leaf]
        # (Optional, not `Leaf | None`: pydantic evaluates it, and the SDK's users may be on Python 3.9)
        maybe: Optional[Leaf] = None  # noqa: UP045
        by_name: dict[str, Leaf]
        anything: dict[str, Any]
        open: Open
        closed: Closed
        properties: int = 0  # a field named like the keyword
        config: dict[str, Any] = {"type": "object", "properties": {}}  # a default that looks like a schema
        children: list[Root] = []

    schema = Root.model_json_schema()
    body = structured_outputs_body(Root)
    out = body["json"]
    assert schema == Root.model_json_schema()  # pydantic's schema itself is not changed
    defs = out["$defs"]
    assert set(defs) == {"Root", "Leaf", "Open", "Closed"}
    assert defs["Root"]["additionalProperties"] is False and defs["Leaf"]["additionalProperties"] is False
    assert defs["Open"]["additionalProperties"] is True and defs["Closed"]["additionalProperties"] is False
    props = defs["Root"]["properties"]
    assert props["by_name"]["additionalProperties"] == {"$ref": "#/$defs/Leaf"}
    assert props["anything"]["additionalProperties"] is True
    assert "additionalProperties" not in props  # a property named "properties" is not taken for a schema
    assert props["properties"] == schema["$defs"]["Root"]["properties"]["properties"]
    assert props["config"]["default"] == {"type": "object", "properties": {}}  # data is not walked
    # the only changes: additionalProperties false on the three objects that did not say
    for name in ("Root", "Leaf"):
        assert {k: v for k, v in defs[name].items() if k != "additionalProperties"} == schema["$defs"][name]
    assert defs["Open"] == schema["$defs"]["Open"] and defs["Closed"] == schema["$defs"]["Closed"]
    inline = strict_json_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "integer"}}}},
                "c": {"anyOf": [{"type": ["object", "null"], "properties": {}}, {"type": "string"}]},
                # pydantic < 2.11 writes `dict[str, Any]` so (the SDK allows pydantic 2.7): an open object
                "d": {"title": "D", "type": "object"},
            },
        }
    )
    assert inline["additionalProperties"] is False
    assert inline["properties"]["a"]["items"]["additionalProperties"] is False
    assert inline["properties"]["c"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in inline["properties"]["c"]["anyOf"][1]
    assert inline["properties"]["d"] == {"title": "D", "type": "object"}
    # a schema given as a dict is the caller's: sent as given
    assert structured_outputs_body({"json": {"type": "object"}}) == {"json": {"type": "object"}}


def test_generate_defaults_match_server_contract(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(200, {**GEN, "prefix": None, "prefix_version": None}))
    g = client.generate(None, "Hi", prefix="base")
    assert g.prefix is None and g.prefix_version is None
    body = srv.calls("POST", "/generate")[0].body
    assert body == {
        "prompt": "Hi",
        "prefix": "base",
        "max_tokens": 64,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "stream": False,
    }  # no tenant_id (the key's tenant), no seed/stop when unset
    assert "x-request-id" not in srv.calls("POST", "/generate")[0].headers


# ------------------------------------------------------------------------------------------ errors
ERROR_CASES = [
    (400, ps.BadRequest, "invalid_request_error", "invalid_json", None),
    (401, ps.Unauthorized, "authentication_error", "invalid_api_key", None),
    (403, ps.Forbidden, "permission_error", "forbidden", None),
    (404, ps.NotFound, "not_found_error", "prefix_not_found", "prefix"),
    (405, ps.APIStatusError, "invalid_request_error", "method_not_allowed", None),
    (408, ps.RequestTimeout, "invalid_request_error", "request_timeout", None),
    (409, ps.Conflict, "conflict_error", "conflict", None),
    (413, ps.PayloadTooLarge, "invalid_request_error", "context_length_exceeded", "max_tokens"),
    (422, ps.UnprocessableEntity, "invalid_request_error", "invalid_value", "top_p"),
    (429, ps.RateLimited, "rate_limit_error", "rate_limited", None),
    (500, ps.InternalServerError, "server_error", "internal_error", None),
    (502, ps.InternalServerError, "server_error", None, None),
    (503, ps.ServiceUnavailable, "service_unavailable_error", "queue_full", None),
]


@pytest.mark.parametrize(("status", "cls", "type_", "code", "param"), ERROR_CASES)
def test_error_mapping(srv: Any, status: int, cls: type, type_: str, code: Any, param: Any) -> None:
    headers = {"Retry-After": "2"} if status in (429, 503) else {}
    srv.on(
        "POST", "/generate", Resp(status, error_json(status, f"boom {status}", type_, code, param), headers)
    )
    with ps.Client(srv.url, max_retries=0) as c, pytest.raises(cls) as ei:
        c.generate("acme", "Hi", request_id="rid-err")
    e = ei.value
    assert type(e) is cls
    assert isinstance(e, ps.APIStatusError) and isinstance(e, ps.PrefixServeError)
    assert (e.status_code, e.message, e.type, e.code, e.param) == (
        status,
        f"boom {status}",
        type_,
        code,
        param,
    )
    assert e.request_id == "rid-err"
    assert e.retry_after == (2.0 if status in (429, 503) else None)
    assert f"boom {status}" in str(e) and "rid-err" in str(e)
    assert len(srv.calls("POST", "/generate")) == 1


def test_error_request_id_falls_back_to_the_sent_one(srv: Any) -> None:
    srv.on("POST", "/generate", Resp(409, error_json(409, "busy", "conflict_error"), echo_id=False))
    with ps.Client(srv.url, max_retries=0) as c:
        with pytest.raises(ps.Conflict) as ei:
            c.generate("acme", "Hi", request_id="mine")
        assert ei.value.request_id == "mine"
        with pytest.raises(ps.Conflict) as ei:
            c.generate("acme", "Hi")
        assert ei.value.request_id is None


def test_error_without_json_body(srv: Any) -> None:
    srv.on("GET", "/health", Resp(502, raw=b"<html>bad gateway</html>", content_type="text/html"))
    with ps.Client(srv.url, max_retries=0) as c, pytest.raises(ps.InternalServerError) as ei:
        c.health()
    assert ei.value.status_code == 502 and "bad gateway" in ei.value.message and ei.value.code is None


def test_a_2xx_that_is_not_json_or_not_the_routes_shape_is_an_sdk_error(srv: Any) -> None:
    """A proxy's 200 login page, or JSON of another shape, raises APIResponseValidationError (a PrefixServeError,
    with the status and what came), not json.JSONDecodeError / pydantic.ValidationError, and is not retried; a
    stream answered in one piece must be a whole Generation, /info a ServerInfo (it accepted anything)."""
    import pickle

    html = Resp(200, raw=b"<html>login</html>", content_type="text/html")
    wrong = Resp(200, {"hello": 1})

    def check(e: Any, body: Any, rid: str = "rid-1") -> None:
        assert isinstance(e, ps.PrefixServeError) and not isinstance(e, ps.APIStatusError)
        assert e.status_code == 200 and e.body == body and e.response is not None and e.request_id == rid
        restored = pickle.loads(pickle.dumps(e))
        assert type(restored) is ps.APIResponseValidationError and restored.body == body

    with ps.Client(srv.url, max_retries=3) as c:
        delays = no_sleep(c)
        for resp, body in ((html, "<html>login</html>"), (wrong, {"hello": 1})):
            srv.on("POST", "/generate", resp)
            srv.on("GET", "/info", resp)
            calls = [
                (lambda: c.generate("acme", "Hi", request_id="rid-1"), "rid-1"),
                (lambda: list(c.stream("acme", "Hi", request_id="rid-1")), "rid-1"),
                (c.info, "rid-server"),
            ]
            for call, rid in calls:
                with pytest.raises(ps.APIResponseValidationError) as ei:
                    call()
                check(ei.value, body, rid)
        assert delays == []
    e = ei.value
    assert "GET /info" in str(e) and "model" in str(e)
    assert len(srv.calls("POST", "/generate")) == 4 and len(srv.calls("GET", "/info")) == 2
    # an event of the wrong shape inside a stream; a list route without its list; detokenize without its text
    srv.on("POST", "/generate", Resp(200, sse=[chunk("he"), json.dumps({"text": ["not", "text"]}), "[DONE]"]))
    srv.on("GET", "/prefixes", Resp(200, [PREFIX]))
    srv.on("POST", "/detokenize", Resp(200, {"text": "hi"}))
    with ps.Client(srv.url, max_retries=0) as c:
        with pytest.raises(ps.APIResponseValidationError, match="text"):
            list(c.stream("acme", "Hi"))
        with pytest.raises(ps.APIResponseValidationError, match='"data" list'):
            c.prefixes.list()
        with pytest.raises(ps.APIResponseValidationError, match='"prompt"'):
            c.detokenize([1, 2])

    async def main() -> None:
        srv.on("POST", "/generate", html)
        srv.on("GET", "/info", wrong)
        async with ps.AsyncClient(srv.url, max_retries=0) as c:
            with pytest.raises(ps.APIResponseValidationError) as ei:
                await c.generate("acme", "Hi", request_id="rid-1")
            check(ei.value, "<html>login</html>")
            with pytest.raises(ps.APIResponseValidationError) as ei:
                [d async for d in c.stream("acme", "Hi", request_id="rid-1")]
            check(ei.value, "<html>login</html>")
            srv.on("POST", "/generate", wrong)
            with pytest.raises(ps.APIResponseValidationError) as ei:
                [d async for d in c.stream("acme", "Hi", request_id="rid-1")]
            check(ei.value, {"hello": 1})
            with pytest.raises(ps.APIResponseValidationError):
                await c.info()
            with pytest.raises(ps.APIResponseValidationError):
                await c.prefixes.list_jobs()

    srv.on("GET", "/prefixes/jobs", Resp(200, {"object": "list", "data": [{"status": "queued"}]}))
    asyncio.run(main())


# ------------------------------------------------------------------------------------------ retries
def test_429_retry_after_honoured_then_success(srv: Any, client: Any) -> None:
    srv.on(
        "POST",
        "/generate",
        Resp(429, error_json(429, "slow down", "rate_limit_error", "rate_limited"), {"Retry-After": "1"}),
        Resp(200, GEN),
    )
    t0 = time.monotonic()
    g = client.generate("acme", "Hi")
    elapsed = time.monotonic() - t0
    assert g.text == "hello world"
    first, second = srv.calls("POST", "/generate")
    assert second.t - first.t >= 1.0  # waited at least Retry-After
    assert elapsed >= 1.0
    assert second.body == first.body


def test_503_retry_after_http_date(srv: Any, client: Any) -> None:
    from email.utils import formatdate, parsedate_to_datetime

    t0, m0 = time.time(), time.monotonic()
    when = formatdate(t0 + 3, usegmt=True)  # whole seconds: 2 to 3 s ahead
    ahead = parsedate_to_datetime(when).timestamp() - t0
    assert 2.0 <= ahead <= 3.0
    srv.on(
        "GET",
        "/v1/models",
        Resp(503, error_json(503, "busy", "service_unavailable_error"), {"Retry-After": when}),
        Resp(200, {"object": "list", "data": [{"id": "acme/default", "created": 1, "owned_by": "acme"}]}),
    )
    models = client.models()
    assert [m.id for m in models.data] == ["acme/default"]
    _, second = srv.calls("GET", "/v1/models")
    # the retry comes no earlier than the date the header names (its backoff without one: at most 0.5 s)
    assert second.t - m0 >= ahead - 0.01


def test_a_read_only_store_is_not_retried(srv: Any, client: Any) -> None:
    """503 `store_read_only` (the server's prefix store is mounted read-only): no retry can change it, so the
    error comes at once, though a 503 with Retry-After is otherwise retried."""
    body = error_json(503, "the prefix store is read-only", "service_unavailable_error", "store_read_only")
    srv.on("DELETE", "/prefixes/acme/faq", Resp(503, body, {"Retry-After": "0"}))
    with pytest.raises(ps.APIStatusError) as e:
        client.prefixes.delete("acme", "faq")
    assert e.value.code == "store_read_only" and len(srv.calls("DELETE", "/prefixes/acme/faq")) == 1


def test_a_server_without_training_is_not_retried_nor_waited_out(srv: Any, client: Any) -> None:
    """503 `no_training` (the server runs without training): only a restart changes it, so submitting, listing
    and a job's wait raise at once (each retried 3 times, ~3 s, and `wait` polled for its whole `max_outage`)."""
    body = error_json(
        503, "training is not enabled on this server", "service_unavailable_error", "no_training"
    )
    srv.on("GET", "/prefixes/jobs", Resp(503, body, {"Retry-After": "0"}))
    with pytest.raises(ps.APIStatusError) as e:
        client.prefixes.list_jobs()
    assert e.value.code == "no_training" and len(srv.calls("GET", "/prefixes/jobs")) == 1
    srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1), Resp(503, body, {"Retry-After": "0"}))
    job = client.prefixes.get_job("job0001")
    t0 = time.monotonic()
    with pytest.raises(ps.APIStatusError) as e:
        job.wait(poll_interval=0.01, max_outage=30)
    assert e.value.code == "no_training" and time.monotonic() - t0 < 5


def test_retries_stop_at_max_retries(srv: Any) -> None:
    srv.on(
        "POST",
        "/generate",
        Resp(503, error_json(503, "busy", "service_unavailable_error"), {"Retry-After": "0"}),
    )
    with ps.Client(srv.url, max_retries=2) as c:
        delays = no_sleep(c)
        with pytest.raises(ps.ServiceUnavailable) as ei:
            c.generate("acme", "Hi")
    assert len(srv.calls("POST", "/generate")) == 3  # 1 + 2 retries
    assert len(delays) == 2 and ei.value.retry_after == 0.0


def test_max_retries_zero_disables(srv: Any) -> None:
    srv.on("POST", "/generate", Resp(429, error_json(429, "limit", "rate_limit_error"), {"Retry-After": "1"}))
    with ps.Client(srv.url, max_retries=0) as c:
        t0 = time.monotonic()
        with pytest.raises(ps.RateLimited) as ei:
            c.generate("acme", "Hi")
        assert time.monotonic() - t0 < 0.9
    assert ei.value.retry_after == 1.0
    assert len(srv.calls("POST", "/generate")) == 1


def test_backoff_grows_with_jitter_when_no_retry_after(srv: Any) -> None:
    srv.on("GET", "/health", Resp(503, error_json(503, "x", "service_unavailable_error")))  # no Retry-After
    with ps.Client(srv.url, max_retries=4) as c:
        delays = no_sleep(c)
        with pytest.raises(ps.ServiceUnavailable):
            c.health()
    assert len(delays) == 4
    for i, d in enumerate(delays):
        cap = min(8.0, 0.5 * 2**i)
        assert cap / 2 <= d <= cap
    assert len(srv.calls("GET", "/health")) == 5


def test_huge_retry_after_not_waited(srv: Any, client: Any) -> None:
    srv.on(
        "POST", "/generate", Resp(429, error_json(429, "later", "rate_limit_error"), {"Retry-After": "3600"})
    )
    delays = no_sleep(client)
    with pytest.raises(ps.RateLimited) as ei:
        client.generate("acme", "Hi")
    assert delays == [] and ei.value.retry_after == 3600.0


def test_other_errors_not_retried(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(500, error_json(500, "internal", "server_error")))
    delays = no_sleep(client)
    with pytest.raises(ps.InternalServerError):
        client.generate("acme", "Hi")
    assert delays == [] and len(srv.calls("POST", "/generate")) == 1


def test_connection_error_retried_then_raised() -> None:
    with ps.Client(free_closed_port(), max_retries=2) as c:
        delays = no_sleep(c)
        with pytest.raises(ps.APIConnectionError) as ei:
            c.health()
    assert len(delays) == 2 and not isinstance(ei.value, ps.APIStatusError)


def test_timeout_maps_to_api_timeout_error(srv: Any) -> None:
    srv.on("GET", "/health", Resp(200, {"status": "ok"}, delay=1.5))
    with ps.Client(srv.url, timeout=0.3, max_retries=0) as c, pytest.raises(ps.APITimeoutError):
        c.health()


def test_a_given_http_clients_timeout_applies_unless_timeout_is_given(srv: Any) -> None:
    """`http_client=httpx.Client(timeout=...)` keeps its timeout (it was overridden by the default 600 s on every
    request); an explicit `timeout=` to our client still wins."""
    import httpx

    srv.on("GET", "/health", Resp(200, {"status": "ok"}, delay=1.0))
    with httpx.Client(timeout=0.3) as hc:
        c = ps.Client(srv.url, http_client=hc, max_retries=0)
        assert c.timeout == httpx.Timeout(0.3)
        t0 = time.monotonic()
        with pytest.raises(ps.APITimeoutError):
            c.health()
        assert time.monotonic() - t0 < 0.9
        assert ps.Client(srv.url, http_client=hc, timeout=5, max_retries=0).health().status == "ok"
    assert ps.Client(srv.url).timeout == httpx.Timeout(600.0, connect=10.0)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=0.3) as hc:
            c = ps.AsyncClient(srv.url, http_client=hc, max_retries=0)
            with pytest.raises(ps.APITimeoutError):
                await c.health()
            c = ps.AsyncClient(srv.url, http_client=hc, timeout=5, max_retries=0)
            assert (await c.health()).status == "ok"

    asyncio.run(main())


def test_training_submit_retried_after_read_timeout_with_the_same_idempotency_key(srv: Any) -> None:
    """The server answers a repeated key with the first attempt's job, so a lost response is retried safely."""
    srv.on(
        "POST",
        "/prefixes",
        Resp(202, {"job_id": "j1", "status": "queued"}, delay=1.0),
        Resp(
            202, {"job_id": "j1", "status": "queued", "idempotency_key": "x"}, {"Idempotent-Replayed": "true"}
        ),
    )
    examples = [{"prompt": "a", "completion": "b"}]
    with ps.Client(srv.url, timeout=0.3, max_retries=3) as c:
        delays = no_sleep(c)
        job = c.prefixes.train("acme", "p", "prefix_tuning", examples)
        assert job.job_id == "j1" and len(delays) == 1
        first, second = srv.calls("POST", "/prefixes")
        key = first.headers["idempotency-key"]
        assert (
            key.startswith("sdk-") and second.headers["idempotency-key"] == key and first.body == second.body
        )
        c.prefixes.train("acme", "p", "prefix_tuning", examples)  # a new call is a new submission: a new key
        assert srv.calls("POST", "/prefixes")[-1].headers["idempotency-key"] not in (key, None)
        c.prefixes.train("acme", "p", "prefix_tuning", examples, idempotency_key="nightly-2026-12-04")
        assert srv.calls("POST", "/prefixes")[-1].headers["idempotency-key"] == "nightly-2026-12-04"
        with pytest.raises(ValueError, match="idempotency_key"):
            c.prefixes.train("acme", "p", "prefix_tuning", examples, idempotency_key="two words")
    assert len(srv.calls("POST", "/prefixes")) == 4


def test_async_training_submit_sends_an_idempotency_key_and_retries(srv: Any) -> None:
    srv.on(
        "POST",
        "/prefixes",
        Resp(503, error_json(503, "busy", "service_unavailable"), {"Retry-After": "0"}),
        Resp(202, {"job_id": "j2", "status": "queued"}),
    )

    async def main() -> Any:
        async with ps.AsyncClient(srv.url, max_retries=2) as c:

            async def no_wait(_: float) -> None:
                return None

            c._sleep = no_wait  # type: ignore[method-assign]
            return await c.prefixes.train("acme", "p", "prefix_tuning", [{"prompt": "a", "completion": "b"}])

    assert asyncio.run(main()).job_id == "j2"
    first, second = srv.calls("POST", "/prefixes")
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]


def test_prefix_upload_is_multipart_retried_on_503_and_after_a_timeout_with_its_key(
    srv: Any, tmp_path: Path
) -> None:
    path = "/prefixes/acme/faq/upload"
    srv.on(
        "POST",
        path,
        Resp(503, error_json(503, "busy", "service_unavailable"), {"Retry-After": "1"}),
        Resp(201, PREFIX),
    )
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    with ps.Client(srv.url, max_retries=2) as c:
        delays = no_sleep(c)
        info = c.prefixes.upload("acme", "faq", tmp_path, prompt_format="raw")
        assert info.name == "faq" and len(delays) == 1 and delays[0] >= 1.0  # honours Retry-After
        (seen, _) = srv.calls("POST", path)
        assert seen.headers["content-type"].startswith("multipart/form-data; boundary=")
        for part in (b'name="file"; filename="adapter_model.safetensors"', b"weights", b'name="adapter_config"',
                     b'{"peft_type": "PROMPT_TUNING"}', b'name="prompt_format"', b"raw"):  # fmt: skip
            assert part in seen.body
    srv.seen.clear()
    # a lost response is retried with the same Idempotency-Key (the server answers the first attempt's version)
    srv.on("POST", path, Resp(201, PREFIX, delay=1.0), Resp(201, PREFIX, {"Idempotent-Replayed": "true"}))
    with ps.Client(srv.url, timeout=0.3, max_retries=3) as c:
        delays = no_sleep(c)
        assert c.prefixes.upload("acme", "faq", b"bytes").name == "faq" and len(delays) == 1
    first, second = srv.calls("POST", path)
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert b"bytes" in first.body and b"bytes" in second.body


def test_408_is_typed_and_retried_when_the_request_is_safe_to_repeat(srv: Any) -> None:
    """The server answers 408 request_timeout when an upload's body arrives too slowly: RequestTimeout, retried for
    uploads (their Idempotency-Key), generation and reads, never for a DELETE."""
    t408 = Resp(
        408,
        error_json(408, "the body did not arrive within 60 s", "invalid_request_error", "request_timeout"),
    )
    path = "/prefixes/acme/faq/upload"
    srv.on("POST", path, t408, Resp(201, PREFIX))
    srv.on("POST", "/generate", t408, Resp(200, GEN))
    deleted = {"tenant_id": "acme", "name": "faq", "object": "prefix", "deleted": True}
    srv.on("DELETE", "/prefixes/acme/faq", t408, Resp(200, deleted))
    with ps.Client(srv.url, max_retries=2) as c:
        delays = no_sleep(c)
        assert c.prefixes.upload("acme", "faq", b"bytes").name == "faq" and len(delays) == 1
        first, second = srv.calls("POST", path)
        assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
        assert c.generate("acme", "Hi").text == "hello world" and len(delays) == 2
        with pytest.raises(ps.RequestTimeout) as ei:
            c.prefixes.delete("acme", "faq")
        assert len(delays) == 2 and len(srv.calls("DELETE", "/prefixes/acme/faq")) == 1
    e = ei.value
    assert isinstance(e, ps.APIStatusError) and (e.status_code, e.code) == (408, "request_timeout")
    srv.on("POST", path, t408)
    with ps.Client(srv.url, max_retries=0) as c, pytest.raises(ps.RequestTimeout):
        c.prefixes.upload("acme", "faq", b"bytes")

    async def main() -> None:
        srv.on("POST", path, t408, Resp(201, PREFIX))
        async with ps.AsyncClient(srv.url, max_retries=2) as c:

            async def no_wait(_: float) -> None:
                return None

            c._sleep = no_wait  # type: ignore[method-assign]
            assert (await c.prefixes.upload("acme", "faq", b"bytes")).name == "faq"

    srv.seen.clear()
    asyncio.run(main())
    assert len(srv.calls("POST", path)) == 2
    # as an error event inside a stream (status 200): mapped by its code
    srv.on("POST", "/generate", Resp(200, sse=[json.dumps(t408.json)]))
    with ps.Client(srv.url) as c, pytest.raises(ps.RequestTimeout) as ei:
        list(c.stream("acme", "Hi"))
    assert ei.value.in_stream and ei.value.status_code == 408


def test_gateway_errors_502_504_are_retried_when_the_request_is_safe_to_repeat(srv: Any) -> None:
    """A proxy in front of the server answers 502/504 (bad gateway, gateway timeout) with an HTML page: retried for
    generation and reads like a 408, never for a DELETE (the server may have acted on it)."""
    bad_gateway = Resp(502, raw=b"<html>502 Bad Gateway</html>", content_type="text/html", echo_id=False)
    gateway_timeout = Resp(
        504, raw=b"<html>504 Gateway Time-out</html>", content_type="text/html", echo_id=False
    )
    srv.on("POST", "/generate", bad_gateway, gateway_timeout, Resp(200, GEN))
    deleted = {"tenant_id": "acme", "name": "faq", "object": "prefix", "deleted": True}
    srv.on("DELETE", "/prefixes/acme/faq", gateway_timeout, Resp(200, deleted))
    with ps.Client(srv.url, max_retries=3) as c:
        delays = no_sleep(c)
        assert c.generate("acme", "Hi").text == "hello world" and len(delays) == 2
        with pytest.raises(ps.InternalServerError) as ei:
            c.prefixes.delete("acme", "faq")
        assert ei.value.status_code == 504 and len(delays) == 2
    assert len(srv.calls("POST", "/generate")) == 3 and len(srv.calls("DELETE", "/prefixes/acme/faq")) == 1
    # a plain 500 (the server's own error) is not retried: repeating a failing request rarely helps
    srv.on("POST", "/generate", Resp(500, error_json(500, "boom", "server_error")), Resp(200, GEN))
    with ps.Client(srv.url, max_retries=3) as c, pytest.raises(ps.InternalServerError):
        c.generate("acme", "Hi")


def test_with_options_changes_a_few_calls_and_shares_the_pool(srv: Any) -> None:
    """``with_options`` (as in ``openai``): a client with another timeout / retry count / headers for some calls,
    on the same connection pool; the original keeps its own options."""
    busy = Resp(503, error_json(503, "busy", "service_unavailable_error"), {"Retry-After": "0"})
    with ps.Client(srv.url, api_key="k1", max_retries=2, headers={"X-Team": "a"}) as c:
        quick = c.with_options(timeout=1.5, max_retries=0, headers={"X-Call": "b"})
        assert quick._http is c._http and not quick._owns_http
        assert (quick.timeout.read, quick.max_retries, quick.api_key) == (1.5, 0, "k1")
        assert (c.timeout.read, c.max_retries) == (600.0, 2)
        srv.on("POST", "/generate", busy, Resp(200, GEN))
        with pytest.raises(ps.ServiceUnavailable):
            quick.generate("acme", "Hi")
        sent = srv.calls("POST", "/generate")[-1].headers
        assert (sent["x-team"], sent["x-call"], sent["authorization"]) == ("a", "b", "Bearer k1")
        srv.on("POST", "/generate", busy, Resp(200, GEN))
        no_sleep(c)
        assert c.generate("acme", "Hi").text == "hello world"
        assert "x-call" not in srv.calls("POST", "/generate")[-1].headers
        # the per-call timeout is the one httpx applies: a slow answer times out on the derived client only
        srv.on("POST", "/generate", Resp(200, GEN, delay=1.0))
        with pytest.raises(ps.APITimeoutError):
            c.with_options(timeout=0.2, max_retries=0).generate("acme", "Hi")
        # closing a derived client leaves the shared pool (and the original) open
        quick.close()
        assert c.generate("acme", "Hi").text == "hello world"

    async def main() -> None:
        srv.on("POST", "/generate", busy, Resp(200, GEN))
        async with ps.AsyncClient(srv.url, max_retries=2) as c:
            quick = c.with_options(max_retries=0)
            assert isinstance(quick, ps.AsyncClient) and quick._http is c._http
            with pytest.raises(ps.ServiceUnavailable):
                await quick.generate("acme", "Hi")
            assert (await c.generate("acme", "Hi")).text == "hello world"

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ streaming
def test_stream_parses_deltas_until_done(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(200, sse=[*STREAM, chunk("never")]))
    with client.stream("acme", "Hi", max_tokens=3, request_id="s-1") as s:
        deltas = list(s)
        assert s.request_id == "s-1"
    assert all(isinstance(d, ps.StreamDelta) for d in deltas)
    assert "".join(d.text for d in deltas) == "hello!"  # nothing after [DONE]
    assert [d.finish_reason for d in deltas] == [None, None, "length"]
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 3
    (seen,) = srv.calls("POST", "/generate")
    assert seen.body["stream"] is True and seen.headers["accept"] == "text/event-stream"


def test_stream_token_ids(srv: Any, client: Any) -> None:
    frames = [
        json.dumps({"id": "g", "text": "he", "token_ids": [101, 102], "finish_reason": None}),
        json.dumps({"id": "g", "text": "y", "token_ids": [7], "finish_reason": "stop", "usage": USAGE}),
        "[DONE]",
    ]
    srv.on("POST", "/generate", Resp(200, sse=frames))
    deltas = list(client.stream("acme", "Hi"))
    assert [d.token_ids for d in deltas] == [[101, 102], [7]]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage.total_tokens == 8


def test_stream_sse_details(srv: Any, client: Any) -> None:
    """Comments, CRLF line ends, multi-line data and events split across TCP writes."""
    raw = (
        b": keep-alive\r\n\r\n"
        + b"data: "
        + chunk("a").encode()
        + b"\r\n\r\n"
        + b'data: {"id":"gen-1","tenant_id":"acme","prefix":"default",\ndata: "prefix_version":3,"text":"b"}\n\n'
        + b"data: "
        + chunk("c", "stop", USAGE).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    srv.on("POST", "/generate", Resp(200, sse=[], raw=raw))
    assert [d.text for d in client.stream("acme", "Hi")] == ["a", "b", "c"]


def test_stream_skips_what_is_no_delta_as_the_sse_spec_says(srv: Any, client: Any) -> None:
    """A byte order mark before the first field (the spec ignores one; it made the first event's field
    "\ufeffdata" and the event was lost), a keep-alive `data:` with nothing in it (raised "malformed stream
    event") and an event type this client does not know (`event: ping`, made an empty delta) are skipped, sync and
    async."""
    raw = (
        "\ufeffdata: ".encode()
        + chunk("a").encode()
        + b"\n\ndata:\n\n"
        + b"event: ping\ndata: {}\n\n"
        + b"event: message\ndata: "
        + chunk("b", "stop", USAGE).encode()
        + b"\n\ndata: [DONE]\n\n"
    )
    srv.on("POST", "/generate", Resp(200, sse=[], raw=raw))
    assert [d.text for d in client.stream("acme", "Hi")] == ["a", "b"]

    async def go() -> list[str]:
        async with ps.AsyncClient(srv.url) as ac:
            return [d.text async for d in ac.stream("acme", "Hi")]

    assert asyncio.run(go()) == ["a", "b"]
    # a BOM anywhere but at the start is text, and an `event: error` is an error whatever its data
    from prefixserve_client import _base

    parser = _base.SSEParser()
    assert parser.feed("") == [] and parser.feed("\ufeffdata: x\n\n") == [(None, "x")]
    assert parser.feed("\ufeffdata: y\n\n") == []  # field "\ufeffdata": not data
    with pytest.raises(ps.APIConnectionError):
        _base.StreamState(None).handle("error", "")


def test_stream_text_keeps_unicode_line_separators(srv: Any, client: Any) -> None:
    """A generated text with U+2028, U+2029 or U+0085 in it, sent as raw UTF-8 in the JSON, stays one event (an SSE
    line ends only at \\r\\n, \\r or \\n; httpx's iter_lines split there and broke the JSON), sync and async; a
    \\r\\n split between two writes is one line end."""
    text = "line\u2028sep\u2029par\x85nel"
    frames = [json.dumps(json.loads(chunk(text)), ensure_ascii=False)]
    last = chunk("!", "stop", USAGE).encode()
    pieces = [b"data: " + last + b"\r", b"\n\r", b"\ndata: [DONE]\r", b"\n\r\n"]
    srv.on("POST", "/generate", Resp(200, sse=frames, raw_chunks=pieces, frame_delay=0.02))
    assert [d.text for d in client.stream("acme", "Hi")] == [text, "!"]

    async def go() -> list[str]:
        async with ps.AsyncClient(srv.url) as ac:
            return [d.text async for d in ac.stream("acme", "Hi")]

    assert asyncio.run(go()) == [text, "!"]


def test_stream_error_event_raises_typed_error(srv: Any, client: Any) -> None:
    err = error_json(503, "prefix unavailable: store down", "service_unavailable_error", "store_unavailable")
    srv.on("POST", "/generate", Resp(200, sse=[chunk("par"), json.dumps(err), "[DONE]"]))
    got: list[str] = []
    with pytest.raises(ps.ServiceUnavailable) as ei:
        for d in client.stream("acme", "Hi", request_id="s-err"):
            got.append(d.text)
    assert got == ["par"]
    e = ei.value
    assert (e.status_code, e.code, e.in_stream, e.request_id) == (503, "store_unavailable", True, "s-err")


def test_stream_error_event_explicit_status(srv: Any, client: Any) -> None:
    err = {"error": {"message": "too long", "type": "invalid_request_error", "code": "x", "status": 413}}
    srv.on("POST", "/generate", Resp(200, sse=[json.dumps(err), "[DONE]"]))
    with pytest.raises(ps.PayloadTooLarge) as ei:
        list(client.stream("acme", "Hi"))
    assert ei.value.status_code == 413 and ei.value.message == "too long"


def test_stream_error_event_status_from_type(srv: Any, client: Any) -> None:
    srv.on(
        "POST", "/generate", Resp(200, sse=[json.dumps(error_json(500, "generation failed", "server_error"))])
    )
    with pytest.raises(ps.InternalServerError) as ei:
        list(client.stream("acme", "Hi"))
    assert ei.value.status_code == 500 and ei.value.in_stream


@pytest.mark.parametrize(
    "code", ["structured_output_failed", "invalid_structured_output", "no_token_allowed"]
)
def test_stream_error_event_422_codes(srv: Any, client: Any, code: str) -> None:
    """The server answers these codes with 422: an error event naming one (without its status) is an
    UnprocessableEntity, not the 400 its type alone would say."""
    err = error_json(422, "grammar too slow", "invalid_request_error", code, "structured_outputs")
    srv.on("POST", "/generate", Resp(200, sse=[chunk("{"), json.dumps(err)]))
    with pytest.raises(ps.UnprocessableEntity) as ei:
        list(client.stream("acme", "Hi"))
    assert (ei.value.status_code, ei.value.code, ei.value.in_stream) == (422, code, True)


def test_stream_http_error_before_start_and_retry(srv: Any, client: Any) -> None:
    srv.on(
        "POST",
        "/generate",
        Resp(429, error_json(429, "limit", "rate_limit_error"), {"Retry-After": "0"}),
        Resp(200, sse=STREAM),
    )
    delays = no_sleep(client)
    assert "".join(d.text for d in client.stream("acme", "Hi")) == "hello!"
    assert len(delays) == 1 and len(srv.calls("POST", "/generate")) == 2
    srv.on("POST", "/generate", Resp(404, error_json(404, "prefix 'x' not found", "not_found_error")))
    with pytest.raises(ps.NotFound):
        next(iter(client.stream("acme", "Hi", prefix="x")))


def test_stream_truncated_raises_connection_error(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(200, sse=[chunk("he"), chunk("llo")]))  # no final event, no [DONE]
    with pytest.raises(ps.APIConnectionError):
        list(client.stream("acme", "Hi"))


def test_stream_close_early(srv: Any, client: Any) -> None:
    srv.on(
        "POST", "/generate", Resp(200, sse=[chunk(str(i)) for i in range(50)] + ["[DONE]"], frame_delay=0.02)
    )
    s = client.stream("acme", "Hi")
    first = next(s)
    s.close()
    assert first.text == "0" and s.response is not None and s.response.is_closed


# ------------------------------------------------------------------------------------------ ops
def test_health_ready_models(srv: Any, client: Any) -> None:
    srv.on("GET", "/health", Resp(200, {"status": "ok"}))
    srv.on("GET", "/ready", Resp(200, {"status": "ready", "model": "smollm2", "checks": {"model": "ok"}}))
    srv.on(
        "GET",
        "/v1/models",
        Resp(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": "acme/default",
                        "object": "model",
                        "created": 1,
                        "owned_by": "acme",
                        "root": "smollm2",
                        "prefix_version": 2,
                    }
                ],
            },
        ),
    )
    assert client.health().status == "ok"
    r = client.ready()
    assert r.ready and r.model == "smollm2"
    (m,) = client.models().data
    assert (m.id, m.prefix_version, m.root) == ("acme/default", 2, "smollm2")


def test_health_engine_dead_is_not_retried(srv: Any, client: Any) -> None:
    """/health's 503 engine_dead (only a restart helps) is raised at once, sync and async; another 503 of /health
    is still retried."""
    dead = error_json(503, "the inference engine stopped", "service_unavailable_error", "engine_dead")
    srv.on("GET", "/health", Resp(503, dead, {"Retry-After": "1"}))
    delays = no_sleep(client)
    with pytest.raises(ps.ServiceUnavailable) as ei:
        client.health()
    assert ei.value.code == "engine_dead" and delays == []
    assert len(srv.calls("GET", "/health")) == 1

    async def go() -> list[float]:
        async with ps.AsyncClient(srv.url) as ac:
            slept: list[float] = []

            async def sleep(s: float) -> None:
                slept.append(s)

            ac._sleep = sleep  # type: ignore[method-assign]
            with pytest.raises(ps.ServiceUnavailable, match="engine_dead"):
                await ac.health()
            return slept

    assert asyncio.run(go()) == []
    assert len(srv.calls("GET", "/health")) == 2
    busy = error_json(503, "server busy", "service_unavailable_error", "queue_full")
    srv.on("GET", "/health", Resp(503, busy, {"Retry-After": "0"}), Resp(200, {"status": "ok"}))
    assert client.health().status == "ok" and len(delays) == 1


def test_ready_not_ready_is_a_value_not_retried(srv: Any, client: Any) -> None:
    body = {
        "status": "not_ready",
        "model": None,
        "checks": {"model": "loading", "lifecycle": "serving"},
        **error_json(503, "not ready: model: loading", "service_unavailable_error", "not_ready"),
    }
    srv.on("GET", "/ready", Resp(503, body, {"Retry-After": "5"}))
    delays = no_sleep(client)
    r = client.ready()
    assert not r.ready and r.checks["model"] == "loading" and delays == []
    # the middleware's 503 while draining has only an error body: that one raises
    srv.on(
        "GET",
        "/ready",
        Resp(
            503,
            error_json(503, "server is shutting down", "service_unavailable_error", "shutting_down"),
            {"Retry-After": "1"},
        ),
    )
    with pytest.raises(ps.ServiceUnavailable):
        client.ready()


# ------------------------------------------------------------------------------------------ prefixes
JOB = {"job_id": "job0001", "status": "queued", "tenant_id": "acme", "name": "faq", "method": "prefix_tuning"}
PREFIX = {
    "tenant_id": "acme",
    "name": "faq",
    "kind": "prefix_tuning",
    "prefix_length": 8,
    "version": 2,
    "versions": [1, 2],
    "created": 1.5,
    "base_model_fingerprint": "fp",
    "dtype": "float32",
    "shapes": {"k": [30, 8, 3, 64]},
    "sha256": "ab",
    "training": {"steps": 10},
    "extra": {},
}


def test_train_body_and_job(srv: Any, client: Any, tmp_path: Path) -> None:
    srv.on("POST", "/prefixes", Resp(202, {**JOB, "progress": {"step": 0, "total_steps": 10, "loss": None}}))
    examples = [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"}]
    job = client.prefixes.train(
        "acme",
        "faq",
        "prefix_tuning",
        examples,
        prefix_length=8,
        hyperparameters={"epochs": 5, "batch_size": 4},
        epochs=2,  # keyword arguments win over the dict
        learning_rate=0.01,
        seed=None,  # None: left to the server
    )
    assert isinstance(job, ps.Job) and isinstance(job, ps.JobInfo)
    assert job.job_id == "job0001" and job.status == "queued" and not job.done
    assert job.progress is not None and job.progress.total_steps == 10 and job.progress.total == 10
    assert job.progress.fraction == 0.0
    body = srv.calls("POST", "/prefixes")[0].body
    assert body == {
        "tenant_id": "acme",
        "name": "faq",
        "method": "prefix_tuning",
        "examples": examples,
        "prefix_length": 8,
        "hyperparameters": {"epochs": 2, "batch_size": 4, "learning_rate": 0.01},
    }
    assert job.model_dump()["job_id"] == "job0001"  # what the CLI adapter reads
    with pytest.raises(TypeError):
        client.prefixes.train("acme", "faq", examples=examples, hyperparameters=[("epochs", 1)])

    path = tmp_path / "ex.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in examples) + "\n\n", encoding="utf-8")
    client.prefixes.train("acme", "faq", examples=str(path))
    client.prefixes.train("acme", "faq", examples=path)
    for seen in srv.calls("POST", "/prefixes")[1:]:
        assert seen.body == {"tenant_id": "acme", "name": "faq", "examples": examples}

    path.write_text('{"prompt": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        client.prefixes.train("acme", "faq", examples=path)
    with pytest.raises(TypeError):
        client.prefixes.train("acme", "faq", examples=["not a dict"])  # type: ignore[list-item]


def test_train_validation_error(srv: Any, client: Any) -> None:
    srv.on(
        "POST",
        "/prefixes",
        Resp(
            422,
            error_json(
                422, "epochs: must be >= 1", "invalid_request_error", "invalid_training_spec", "epochs"
            ),
        ),
    )
    with pytest.raises(ps.UnprocessableEntity) as ei:
        client.prefixes.train("acme", "faq", "prefix_tuning", [{"prompt": "a"}], epochs=0)
    assert ei.value.param == "epochs"


def _job(status: str, step: int, **kw: Any) -> Resp:
    progress = {"step": step, "total_steps": 3, "loss": 1.0 / (step + 1), "epoch": step // 2}
    return Resp(200, {**JOB, "status": status, "progress": progress, **kw})


def test_job_wait_progress_success(srv: Any, client: Any) -> None:
    srv.on("POST", "/prefixes", Resp(202, JOB))
    srv.on(
        "GET",
        "/prefixes/jobs/job0001",
        _job("queued", 0),
        _job("running", 1),
        _job("running", 2),
        _job(
            "succeeded",
            3,
            extra_field="x",
            created=100.0,
            started=101.5,
            finished=130.25,
            prefix_version=2,
            summary={"final_loss": 0.25, "total_steps": 3},
        ),
    )
    seen: list[tuple[str, int]] = []
    job = client.prefixes.train("acme", "faq", "prefix_tuning", [{"prompt": "a", "completion": "b"}])
    final = job.wait(progress=lambda j: seen.append((j.status, j.progress.step)), poll_interval=0.01)
    assert final is job and job.status == "succeeded" and job.done
    assert seen == [("queued", 0), ("running", 1), ("running", 2), ("succeeded", 3)]
    assert job.model_extra == {"extra_field": "x"}
    assert (job.created, job.started, job.finished, job.prefix_version) == (100.0, 101.5, 130.25, 2)
    assert job.summary == {"final_loss": 0.25, "total_steps": 3}
    assert job.progress is not None and (job.progress.total_steps, job.progress.epoch) == (3, 1)
    assert job.progress.fraction == 1.0 and job.error is None


def test_job_wait_failed_and_cancelled(srv: Any, client: Any) -> None:
    srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1), _job("failed", 1, error="loss is NaN"))
    job = client.prefixes.get_job("job0001")
    with pytest.raises(ps.TrainingFailed) as ei:
        job.wait(poll_interval=0.01)
    assert ei.value.job.status == "failed" and "loss is NaN" in str(ei.value)
    assert isinstance(ei.value, ps.TrainingError)

    srv.on("POST", "/prefixes/jobs/job0001/cancel", Resp(200, {**JOB, "status": "cancelled"}))
    srv.on("GET", "/prefixes/jobs/job0001", Resp(200, {**JOB, "status": "cancelled"}))
    job = ps.Job.model_validate(JOB)
    job._client = client
    assert job.cancel().status == "cancelled"
    assert len(srv.calls("POST", "/prefixes/jobs/job0001/cancel")) == 1
    with pytest.raises(ps.TrainingCancelled):
        job.wait(poll_interval=0.01)


def test_job_wait_timeout(srv: Any, client: Any) -> None:
    srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1))
    job = client.prefixes.get_job("job0001")
    t0 = time.monotonic()
    with pytest.raises(ps.WaitTimeout) as ei:
        job.wait(poll_interval=0.05, timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert isinstance(ei.value, TimeoutError) and ei.value.job.status == "running"


def test_job_wait_rides_out_a_server_restart(srv: Any) -> None:
    """The server away for a while (a restart: its job is requeued and goes on) is polled through, sync and async;
    an error that is not the server being away, or an outage past `max_outage`, is raised. `wait` used to give up
    after the request retries (~3 s), with the job still training."""
    away = Resp(
        503, {"error": {"message": "restarting", "type": "x", "param": None, "code": "shutting_down"}}
    )
    gone = Resp(502, {"error": {"message": "bad gateway", "type": "x", "param": None, "code": None}})
    script = [_job("running", 1), away, gone, away, _job("running", 2), _job("succeeded", 3)]
    with ps.Client(srv.url, max_retries=0) as c:
        srv.on("GET", "/prefixes/jobs/job0001", *script)
        job = c.prefixes.get_job("job0001")
        assert job.wait(poll_interval=0.01).status == "succeeded"

        async def go() -> str:
            async with ps.AsyncClient(srv.url, max_retries=0) as ac:
                srv.on("GET", "/prefixes/jobs/job0001", *script)
                ajob = await ac.prefixes.get_job("job0001")
                return (await ajob.wait(poll_interval=0.01)).status

        assert asyncio.run(go()) == "succeeded"
        # not the server being away: raised at once
        srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1), Resp(404, {"error": {"message": "no"}}))
        job = c.prefixes.get_job("job0001")
        with pytest.raises(ps.NotFound):
            job.wait(poll_interval=0.01)
        # away for longer than max_outage: the last error
        srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1), away)
        job = c.prefixes.get_job("job0001")
        t0 = time.monotonic()
        with pytest.raises(ps.ServiceUnavailable):
            job.wait(poll_interval=0.02, max_outage=0.2)
        assert 0.2 <= time.monotonic() - t0 < 3
    with ps.Client("http://127.0.0.1:9", max_retries=0) as dead:  # nothing listens: connection refused
        job._client = dead
        with pytest.raises(ps.APIConnectionError):
            job.wait(poll_interval=0.02, max_outage=0.1)


def test_prefix_list_get_delete(srv: Any, client: Any) -> None:
    srv.on("GET", "/prefixes", Resp(200, {"object": "list", "data": [{**PREFIX, "versions": None}]}))
    srv.on("GET", "/prefixes/acme/faq", Resp(200, PREFIX))
    srv.on(
        "DELETE",
        "/prefixes/acme/faq",
        Resp(200, {"tenant_id": "acme", "name": "faq", "object": "prefix", "deleted": True}),
    )
    srv.on("GET", "/prefixes/jobs", Resp(200, {"object": "list", "data": [JOB]}))
    (p,) = client.prefixes.list("acme")
    assert isinstance(p, ps.PrefixInfo) and (p.name, p.version, p.kind) == ("faq", 2, "prefix_tuning")
    assert srv.calls("GET", "/prefixes")[0].query == "tenant_id=acme"
    info = client.prefixes.get("acme", "faq")
    assert info.versions == [1, 2] and info.shapes["k"] == [30, 8, 3, 64]
    d = client.prefixes.delete("acme", "faq")
    assert d.deleted and d.name == "faq"
    (j,) = client.prefixes.list_jobs("acme")
    assert j.job_id == "job0001"
    with pytest.raises(ps.NotFound):
        client.prefixes.get("acme", "missing")


def test_prefix_pages(srv: Any, client: Any) -> None:
    def page(names: list[str], more: bool) -> Resp:
        data = [{**PREFIX, "name": n, "versions": None} for n in names]
        ids = {"first_id": f"acme/{names[0]}", "last_id": f"acme/{names[-1]}"}
        return Resp(200, {"object": "list", "data": data, "has_more": more, **ids})

    srv.on("GET", "/prefixes", page(["a", "b"], True))
    page1 = client.prefixes.list("acme", limit=2)
    assert (page1.first_id, page1.last_id, page1.has_more) == ("acme/a", "acme/b", True)
    assert "first_id='acme/a'" in repr(page1)
    srv.seen.clear()
    srv.on("GET", "/prefixes", page(["a", "b"], True), page(["c"], False))
    assert [p.name for p in client.prefixes.iter("acme", page_size=2)] == ["a", "b", "c"]
    queries = [c.query for c in srv.calls("GET", "/prefixes")]
    assert queries == ["tenant_id=acme&limit=2", "tenant_id=acme&limit=2&after=acme%2Fb"]
    # a server without paging: one page with everything
    srv.on("GET", "/prefixes", Resp(200, {"object": "list", "data": [{**PREFIX, "versions": None}]}))
    one = client.prefixes.list(limit=5)
    assert isinstance(one, ps.PrefixPage) and one.has_more is False and one.last_id == "acme/faq"
    assert one.first_id == "acme/faq"  # (from the items when the server does not say)
    assert client.prefixes.list(limit=5).first_id == "acme/faq"
    assert [p.name for p in client.prefixes.iter()] == ["faq"]


def test_job_pages(srv: Any, client: Any) -> None:
    def page(ids: list[str], more: bool) -> Resp:
        data = [{**JOB, "job_id": i} for i in ids]
        return Resp(
            200, {"object": "list", "data": data, "has_more": more, "first_id": ids[0], "last_id": ids[-1]}
        )

    srv.on("GET", "/prefixes/jobs", page(["job-a", "job-b"], True), page(["job-c"], False))
    assert [j.job_id for j in client.prefixes.iter_jobs("acme", page_size=2)] == ["job-a", "job-b", "job-c"]
    queries = [c.query for c in srv.calls("GET", "/prefixes/jobs")]
    assert queries == ["tenant_id=acme&limit=2", "tenant_id=acme&limit=2&after=job-b"]
    srv.on("GET", "/prefixes/jobs", Resp(200, {"object": "list", "data": [JOB]}))  # a server without paging
    assert [j.job_id for j in client.prefixes.iter_jobs()] == [JOB["job_id"]]

    async def walk() -> list[str]:
        srv.on("GET", "/prefixes/jobs", page(["job-a"], True), page(["job-b"], False))
        async with ps.AsyncClient(base_url=srv.url, max_retries=0) as c:
            return [j.job_id async for j in c.prefixes.iter_jobs(page_size=1)]

    assert asyncio.run(walk()) == ["job-a", "job-b"]
    # the cursor job was deleted meanwhile (the server trims a tenant's oldest finished jobs): the listing starts
    # again and gives no job twice
    gone = Resp(
        422,
        error_json(
            422, "after must be the last_id of a listing", "invalid_request_error", "invalid_value", "after"
        ),
    )
    srv.on("GET", "/prefixes/jobs", page(["job-a", "job-b"], True), gone, page(["job-b", "job-c"], False))
    assert [j.job_id for j in client.prefixes.iter_jobs(page_size=2)] == ["job-a", "job-b", "job-c"]
    with pytest.raises(ps.UnprocessableEntity):  # (a 422 of the first page is the caller's to see)
        srv.on("GET", "/prefixes/jobs", gone)
        list(client.prefixes.iter_jobs(page_size=2))


def test_async_job_pages_start_again_after_a_deleted_cursor(srv: Any) -> None:
    """`AsyncClient.prefixes.iter_jobs`, as the sync one: the job a page ended with deleted meanwhile (the server
    trims a tenant's oldest finished jobs) makes the walk start again from the first page, yielding no job twice;
    a 422 of the first page is the caller's to see."""

    def page(ids: list[str], more: bool) -> Resp:
        data = [{**JOB, "job_id": i} for i in ids]
        return Resp(
            200, {"object": "list", "data": data, "has_more": more, "first_id": ids[0], "last_id": ids[-1]}
        )

    gone = Resp(
        422,
        error_json(
            422, "after must be the last_id of a listing", "invalid_request_error", "invalid_value", "after"
        ),
    )

    async def walk() -> list[str]:
        async with ps.AsyncClient(base_url=srv.url, max_retries=0) as c:
            return [j.job_id async for j in c.prefixes.iter_jobs(page_size=2)]

    srv.on("GET", "/prefixes/jobs", page(["job-a", "job-b"], True), gone, page(["job-b", "job-c"], False))
    assert asyncio.run(walk()) == ["job-a", "job-b", "job-c"]
    queries = [c.query for c in srv.calls("GET", "/prefixes/jobs")]
    assert queries == ["limit=2", "limit=2&after=job-b", "limit=2"]
    srv.on("GET", "/prefixes/jobs", gone)
    with pytest.raises(ps.UnprocessableEntity):
        asyncio.run(walk())


# ------------------------------------------------------------------------------------------ configuration
def test_env_vars(srv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    srv.on("GET", "/health", Resp(200, {"status": "ok"}))
    monkeypatch.setenv("PREFIXSERVE_BASE_URL", srv.url + "/")
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "env-key")
    with ps.Client() as c:
        assert c.base_url == srv.url and c.health().status == "ok"
        assert "env-key" not in repr(c)
    assert srv.calls("GET", "/health")[0].headers["authorization"] == "Bearer env-key"
    with ps.Client(api_key="explicit") as c:  # arguments beat the environment
        c.health()
    assert srv.calls("GET", "/health")[1].headers["authorization"] == "Bearer explicit"

    monkeypatch.delenv("PREFIXSERVE_BASE_URL")
    monkeypatch.delenv("PREFIXSERVE_API_KEY")
    with ps.Client() as c:
        assert c.base_url == "http://127.0.0.1:8000" and c.api_key is None
    with ps.Client(srv.url) as c:
        c.health()
    assert "authorization" not in srv.calls("GET", "/health")[2].headers
    with pytest.raises(ValueError):
        ps.Client(max_retries=-1)


def test_async_env_vars(srv: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    srv.on("GET", "/health", Resp(200, {"status": "ok"}))
    monkeypatch.setenv("PREFIXSERVE_BASE_URL", srv.url)
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "env-key")

    async def main() -> None:
        async with ps.AsyncClient() as c:
            assert (await c.health()).status == "ok"

    asyncio.run(main())
    assert srv.calls("GET", "/health")[0].headers["authorization"] == "Bearer env-key"


# ------------------------------------------------------------------------------------------ async parity
def test_async_generate_stream_and_errors(srv: Any) -> None:
    srv.on("POST", "/generate", Resp(200, GEN))

    async def main() -> None:
        async with ps.AsyncClient(srv.url, api_key="key-a") as c:
            g = await c.generate("acme", "Hi", seed=1, request_id="ra")
            assert isinstance(g, ps.Generation) and g.text == "hello world" and g.request_id == "ra"

            srv.on("POST", "/generate", Resp(200, sse=STREAM))
            deltas = [d async for d in c.stream("acme", "Hi")]
            assert "".join(d.text for d in deltas) == "hello!" and deltas[-1].finish_reason == "length"

            err = error_json(404, "prefix 'x' not found", "not_found_error", "prefix_not_found")
            srv.on("POST", "/generate", Resp(200, sse=[chunk("a"), json.dumps(err), "[DONE]"]))
            with pytest.raises(ps.NotFound) as ei:
                async for _ in c.stream("acme", "Hi"):
                    pass
            assert ei.value.in_stream

            srv.on("POST", "/generate", Resp(200, sse=[chunk("a")]))
            with pytest.raises(ps.APIConnectionError):
                async for _ in c.stream("acme", "Hi"):
                    pass

            for status, cls, type_, code, param in ERROR_CASES:
                srv.on("GET", "/v1/models", Resp(status, error_json(status, "e", type_, code, param)))
                with pytest.raises(cls) as ei2:
                    await ps.AsyncClient(srv.url, max_retries=0).models()
                assert type(ei2.value) is cls and ei2.value.code == code

    asyncio.run(main())
    assert srv.calls("POST", "/generate")[0].body["seed"] == 1


def test_async_retry_after_honoured(srv: Any) -> None:
    srv.on(
        "POST",
        "/generate",
        Resp(503, error_json(503, "busy", "service_unavailable_error", "queue_full"), {"Retry-After": "1"}),
        Resp(200, GEN),
    )

    async def main() -> float:
        async with ps.AsyncClient(srv.url) as c:
            t0 = time.monotonic()
            await c.generate("acme", "Hi")
            return time.monotonic() - t0

    assert asyncio.run(main()) >= 1.0
    first, second = srv.calls("POST", "/generate")
    assert second.t - first.t >= 1.0


def test_async_retries_stop_and_connection_errors(srv: Any) -> None:
    srv.on("GET", "/health", Resp(429, error_json(429, "limit", "rate_limit_error"), {"Retry-After": "0"}))

    async def main() -> None:
        async with ps.AsyncClient(srv.url, max_retries=2) as c:
            delays: list[float] = []

            async def rec(d: float) -> None:
                delays.append(d)

            c._sleep = rec
            with pytest.raises(ps.RateLimited):
                await c.health()
            assert len(delays) == 2
        async with ps.AsyncClient(free_closed_port(), max_retries=1) as c:
            c._sleep = rec
            with pytest.raises(ps.APIConnectionError):
                await c.health()
            assert len(delays) == 3
        async with ps.AsyncClient(srv.url, max_retries=0) as c:
            srv.on("GET", "/ready", Resp(200, {"status": "ok"}, delay=1.0))
            c.timeout = __import__("httpx").Timeout(0.2)
            with pytest.raises(ps.APITimeoutError):
                await c.ready()

    asyncio.run(main())
    assert len(srv.calls("GET", "/health")) == 3


def test_async_prefixes_and_job_wait(srv: Any) -> None:
    srv.on("POST", "/prefixes", Resp(202, JOB))
    srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1), _job("succeeded", 3))
    srv.on("GET", "/prefixes", Resp(200, {"object": "list", "data": [PREFIX]}))
    srv.on("GET", "/prefixes/acme/faq", Resp(200, PREFIX))
    srv.on(
        "DELETE",
        "/prefixes/acme/faq",
        Resp(200, {"tenant_id": "acme", "name": "faq", "deleted": True, "version": 2}),
        Resp(200, {"tenant_id": "acme", "name": "faq", "deleted": True}),
    )

    async def main() -> None:
        async with ps.AsyncClient(srv.url) as c:
            job = await c.prefixes.train(
                "acme", "faq", "prompt_tuning", [{"prompt": "a", "completion": "b"}], prefix_length=4
            )
            assert isinstance(job, ps.AsyncJob)
            steps: list[int] = []

            async def progress(j: ps.AsyncJob) -> None:
                steps.append(j.progress.step)

            done = await job.wait(progress, poll_interval=0.01)
            assert done.status == "succeeded" and steps == [1, 3]
            assert [p.name for p in await c.prefixes.list("acme")] == ["faq"]
            assert (await c.prefixes.get("acme", "faq")).versions == [1, 2]
            assert (await c.prefixes.get("acme", "faq", version=1)).versions == [1, 2]
            assert (await c.prefixes.delete("acme", "faq", version=2)).version == 2
            gone = await c.prefixes.delete("acme", "faq")
            assert gone.deleted and gone.version is None

            srv.on("GET", "/prefixes/jobs/job0001", _job("failed", 1, error="boom"))
            with pytest.raises(ps.TrainingFailed) as ei:
                await job.wait(poll_interval=0.01)
            # the error carries the AsyncJob (typed so: TrainingError is generic in its job)
            failed: ps.TrainingFailed[ps.AsyncJob] = ei.value
            assert isinstance(failed.job, ps.AsyncJob) and (await failed.job.refresh()).status == "failed"
            srv.on("POST", "/prefixes/jobs/job0001/cancel", Resp(200, {**JOB, "status": "cancelled"}))
            assert (await job.cancel()).status == "cancelled"
            srv.on("GET", "/prefixes/jobs/job0001", Resp(200, {**JOB, "status": "cancelled"}))
            with pytest.raises(ps.TrainingCancelled):
                await job.wait(poll_interval=0.01)

    asyncio.run(main())
    assert srv.calls("POST", "/prefixes")[0].body["prefix_length"] == 4
    assert [s.query for s in srv.calls("DELETE", "/prefixes/acme/faq")] == ["version=2", ""]
    assert [s.query for s in srv.calls("GET", "/prefixes/acme/faq")] == ["", "version=1"]


def test_async_stream_retry_after_then_close_early(srv: Any) -> None:
    srv.on(
        "POST",
        "/generate",
        Resp(503, error_json(503, "busy", "service_unavailable_error", "queue_full"), {"Retry-After": "1"}),
        Resp(200, sse=[chunk(str(i)) for i in range(50)] + ["[DONE]"], frame_delay=0.02),
    )

    async def main() -> None:
        async with ps.AsyncClient(srv.url) as c:
            async with c.stream("acme", "Hi", request_id="as-1") as s:
                first = await s.__anext__()
                assert first.text == "0" and s.request_id == "as-1"
            assert s.response is not None and s.response.is_closed

    asyncio.run(main())
    first, second = srv.calls("POST", "/generate")
    assert second.t - first.t >= 1.0


def test_an_error_body_that_breaks_off_is_a_connection_error_retried_streamed_or_not() -> None:
    """A 503 whose body stops half-way (the server's connection dropped): every call raises the SDK's
    APIConnectionError after its retries — stream() too, sync and async (it leaked httpx's own error, unretried)."""
    hits = [0]

    def serve(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            hits[0] += 1
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
            )
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 0\r\n"
                b'Content-Length: 200\r\n\r\n{"error": {"message": "bu'
            )
            conn.close()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with ps.Client(url, max_retries=1) as c:
            c._sleep = lambda s: None
            for call in (lambda: c.generate("acme", "hi"), lambda: list(c.stream("acme", "hi"))):
                hits[0] = 0
                with pytest.raises(ps.APIConnectionError):
                    call()
                assert hits[0] == 2  # retried once

        async def main() -> None:
            async with ps.AsyncClient(url, max_retries=1) as c:

                async def no_sleep(s: float) -> None:
                    return None

                c._sleep = no_sleep
                hits[0] = 0
                with pytest.raises(ps.APIConnectionError):
                    [d async for d in c.stream("acme", "hi")]
                assert hits[0] == 2

        asyncio.run(main())
    finally:
        sock.close()


# ------------------------------------------------------------------------------------------ review fixes
def test_a_delete_whose_answer_was_lost_is_not_sent_again(srv: Any) -> None:
    """A DELETE that reached the server and timed out is raised, not repeated (the repeat would answer 404 for
    what the first one did); one that could not connect is retried, as are 503s."""
    deleted = {"tenant_id": "acme", "name": "faq", "object": "prefix", "deleted": True, "version": 3}
    srv.on("DELETE", "/prefixes/acme/faq", Resp(200, deleted, delay=1.0), Resp(200, deleted))
    with ps.Client(srv.url, timeout=0.3, max_retries=3) as c:
        delays = no_sleep(c)
        with pytest.raises(ps.APITimeoutError):
            c.prefixes.delete("acme", "faq", version=3)
        assert len(srv.calls("DELETE", "/prefixes/acme/faq")) == 1 and delays == []
    busy = Resp(503, error_json(503, "store down", "service_unavailable_error", "store_unavailable"))
    srv.on("DELETE", "/prefixes/acme/faq", busy, Resp(200, deleted))
    with ps.Client(srv.url, max_retries=3) as c:
        no_sleep(c)
        assert c.prefixes.delete("acme", "faq", version=3).deleted
    with ps.Client(free_closed_port(), max_retries=2) as c:  # refused before sending: safe to retry
        delays = no_sleep(c)
        with pytest.raises(ps.APIConnectionError):
            c.prefixes.delete("acme", "faq")
        assert len(delays) == 2

    async def main() -> None:
        srv.on("DELETE", "/prefixes/acme/faq", Resp(200, deleted, delay=1.0))
        async with ps.AsyncClient(srv.url, timeout=0.3, max_retries=3) as c:
            with pytest.raises(ps.APITimeoutError):
                await c.prefixes.delete("acme", "faq", version=3)

    before = len(srv.calls("DELETE", "/prefixes/acme/faq"))
    asyncio.run(main())
    assert len(srv.calls("DELETE", "/prefixes/acme/faq")) == before + 1


def test_breaking_out_of_a_stream_closes_it_without_the_garbage_collector(srv: Any, client: Any) -> None:
    """`for d in client.stream(...): break` and dropping the stream closes its response at once (which cancels the
    generation on the server); it used to wait for a garbage-collector pass (the generator held its stream)."""
    import gc

    frames = [chunk(str(i)) for i in range(200)] + ["[DONE]"]
    srv.on("POST", "/generate", Resp(200, sse=frames, frame_delay=0.01))
    gc.disable()
    try:
        s = client.stream("acme", "Hi")
        for _ in s:
            break
        response = s.response
        assert response is not None and not response.is_closed
        del s
        assert response.is_closed

        async def main() -> None:
            async with ps.AsyncClient(srv.url) as c:
                s = c.stream("acme", "Hi")
                async for _ in s:
                    break
                response = s.response
                assert response is not None and not response.is_closed
                del s
                for _ in range(20):  # the loop runs the async generator's aclose() it was handed
                    await asyncio.sleep(0.01)
                    if response.is_closed:
                        break
                assert response.is_closed

        asyncio.run(main())
    finally:
        gc.enable()


def test_errors_pickle_whole(srv: Any, client: Any) -> None:
    import pickle

    srv.on(
        "GET",
        "/prefixes/acme/missing",
        Resp(404, error_json(404, "no", "not_found_error", "prefix_not_found", "prefix")),
    )
    with pytest.raises(ps.NotFound) as ei:
        client.prefixes.get("acme", "missing")
    back = pickle.loads(pickle.dumps(ei.value))
    assert type(back) is ps.NotFound and str(back) == str(ei.value) and back.response is None
    assert (back.status_code, back.code, back.param, back.message) == (
        404,
        "prefix_not_found",
        "prefix",
        "no",
    )
    job = ps.Job.model_validate({**JOB, "status": "failed", "error": "diverged"})
    job._client = client
    for err in (ps.TrainingFailed("failed", job), ps.WaitTimeout("late", job), ps.APITimeoutError("slow")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        if hasattr(err, "job"):
            assert back.job.job_id == job.job_id and back.job.error == "diverged"
            with pytest.raises(RuntimeError, match="no client"):
                back.job.refresh()
    assert job._client is client  # pickling a job leaves the original attached


def test_ignore_eos_is_sent_only_when_set(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(200, GEN))
    client.generate("acme", "Hi", ignore_eos=True)
    client.generate("acme", "Hi")
    first, second = srv.calls("POST", "/generate")
    assert first.body["ignore_eos"] is True and "ignore_eos" not in second.body


def test_prompt_format_is_sent_only_when_set(srv: Any, client: Any) -> None:
    srv.on("POST", "/generate", Resp(200, GEN))
    srv.on("POST", "/tokenize", Resp(200, {"tokens": [1, 2], "count": 2, "prompt_format": "raw"}))
    client.generate("acme", "Count: 1, 2,", prefix="base", prompt_format="raw")
    client.generate("acme", "Hi")
    list(client.stream("acme", "Hi", prompt_format="chat"))
    assert client.tokenize("acme", "Hi", prompt_format="raw").prompt_format == "raw"
    client.tokenize("acme", messages=[{"role": "user", "content": "Hi"}])
    first, second, third = srv.calls("POST", "/generate")
    assert (first.body["prompt_format"], third.body["prompt_format"]) == ("raw", "chat")
    assert "prompt_format" not in second.body
    tok, msgs = srv.calls("POST", "/tokenize")
    assert tok.body["prompt_format"] == "raw" and "prompt_format" not in msgs.body


def test_a_base_url_without_a_scheme_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="http://"):
        ps.Client("localhost:8000")
    monkeypatch.setenv("PREFIXSERVE_BASE_URL", "127.0.0.1:8000")
    with pytest.raises(ValueError, match="PREFIXSERVE_BASE_URL"):
        ps.AsyncClient()
    assert ps.Client("HTTPS://example.com/").base_url == "HTTPS://example.com"


def test_connection_error_names_the_url_it_tried() -> None:
    """A refused connection says which server and route it tried (a wrong base URL is the usual cause), without
    the URL's user info or query."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ps.Client(f"http://user:hunter2@127.0.0.1:{port}", max_retries=0)
    with c, pytest.raises(ps.APIConnectionError) as ei:
        c.generate("acme", "Hi")
    msg = str(ei.value)
    assert f"(POST http://127.0.0.1:{port}/generate)" in msg and "hunter2" not in msg


def test_tokenize_sends_what_chat_renders_messages_with(srv: Any, client: Any) -> None:
    """tools and the chat-template options go to /tokenize with messages (sync and async alike), only when set;
    with a prompt they are refused before any request."""
    srv.on("POST", "/tokenize", Resp(200, {"tokens": [1, 2], "count": 2, "prompt_format": "chat"}))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "It is"}]
    tool = {"type": "function", "function": {"name": "get_time"}}
    opts = {"add_generation_prompt": False, "continue_final_message": True, "chat_template_kwargs": {"x": 1}}
    client.tokenize("acme", messages=msgs, tools=(tool,), **opts)

    async def go() -> None:
        async with ps.AsyncClient(srv.url, api_key="key-a") as c:
            await c.tokenize("acme", messages=msgs, tools=[tool], **opts)

    asyncio.run(go())
    client.tokenize("acme", messages=msgs)
    sync, asyn, plain = srv.calls("POST", "/tokenize")
    assert (
        sync.body
        == asyn.body
        == {"prefix": "default", "tenant_id": "acme", "messages": msgs, "tools": [tool], **opts}
    )
    assert set(plain.body) == {"prefix", "tenant_id", "messages"}
    with pytest.raises(TypeError, match="tools need messages"):
        client.tokenize("acme", "Hi", tools=[tool])
    with pytest.raises(TypeError, match="prompt_format applies to prompt"):
        client.tokenize("acme", messages=msgs, prompt_format="raw")
    assert len(srv.calls("POST", "/tokenize")) == 3


def test_tokenize_and_detokenize_send_vllms_fields(srv: Any, client: Any) -> None:
    """tokenize's return_token_strs, add_special_tokens, model (instead of tenant_id/prefix/prefix_version, which
    are then not sent) and extra_body; detokenize's model and extra_body; sync and async alike."""
    answer = {"tokens": [1, 9], "token_strs": ["<s>", "Hi"], "count": 2, "prompt_format": "raw"}
    srv.on("POST", "/tokenize", Resp(200, answer))
    srv.on("POST", "/detokenize", Resp(200, {"prompt": "<s>Hi"}))
    kw: dict[str, Any] = {"return_token_strs": True, "add_special_tokens": True, "extra_body": {"x_new": 1}}
    t = client.tokenize(None, "Hi", model="acme/faq@2", **kw)
    assert t.token_strs == ["<s>", "Hi"] and t.tokens == [1, 9]
    client.tokenize("acme", "Hi", prefix="faq", add_special_tokens=False)
    assert client.detokenize([1, 9], model="acme/faq", extra_body={"x_new": 2}) == "<s>Hi"
    client.detokenize([1, 9])

    async def go() -> None:
        async with ps.AsyncClient(srv.url) as ac:
            assert (await ac.tokenize(None, "Hi", model="acme/faq@2", **kw)).token_strs == ["<s>", "Hi"]
            assert await ac.detokenize([1, 9], model="acme/faq", extra_body={"x_new": 2}) == "<s>Hi"
            with pytest.raises(TypeError, match="give model or tenant_id, prefix, prefix_version, not both"):
                await ac.tokenize("acme", "Hi", prefix="faq", prefix_version=1, model="acme/faq")

    asyncio.run(go())
    for bad in ({"tenant_id": "acme"}, {"prefix": "faq"}, {"prefix_version": 2}):
        args = {"tenant_id": None, **bad}
        with pytest.raises(TypeError, match=f"give model or {next(iter(bad))}, not both"):
            client.tokenize(prompt="Hi", model="acme/faq", **args)
    sync, plain, asyn = (c.body for c in srv.calls("POST", "/tokenize"))
    want = {
        "model": "acme/faq@2",
        "prompt": "Hi",
        "add_special_tokens": True,
        "return_token_strs": True,
        "x_new": 1,
    }
    assert sync == asyn == want
    assert plain == {"prefix": "faq", "tenant_id": "acme", "prompt": "Hi", "add_special_tokens": False}
    d_sync, d_plain, d_asyn = (c.body for c in srv.calls("POST", "/detokenize"))
    assert d_sync == d_asyn == {"tokens": [1, 9], "model": "acme/faq", "x_new": 2}
    assert d_plain == {"tokens": [1, 9]}


def test_version_and_retrieve_model(srv: Any, client: Any) -> None:
    """GET /version and GET /v1/models/{model} (the id's slash and @version kept in the path), sync and async."""
    card = {"id": "acme/faq@3", "object": "model", "owned_by": "acme", "root": "m", "prefix_version": 3}
    srv.on("GET", "/version", Resp(200, {"version": "0.1.0"}))
    srv.on("GET", "/v1/models/acme/faq@3", Resp(200, card))
    assert client.version() == "0.1.0"
    m = client.retrieve_model("acme/faq@3")
    assert isinstance(m, ps.ModelCard) and (m.id, m.prefix_version) == ("acme/faq@3", 3)
    with pytest.raises(ps.NotFound):
        client.retrieve_model("acme/nope")
    for bad in ("", "acme/..", "acme//faq", "./x"):
        with pytest.raises(ValueError, match="not a valid model id"):
            client.retrieve_model(bad)

    async def go() -> tuple[str, str]:
        async with ps.AsyncClient(srv.url) as ac:
            return await ac.version(), (await ac.retrieve_model("acme/faq@3")).id

    assert asyncio.run(go()) == ("0.1.0", "acme/faq@3")
    assert [c.path for c in srv.seen] == [
        "/version",
        "/v1/models/acme/faq@3",
        "/v1/models/acme/nope",
        "/version",
        "/v1/models/acme/faq@3",
    ]


# ------------------------------------------------------------------------------- what a user trips on (SDK hunt)
def test_a_finished_stream_gives_its_connection_back_to_the_pool(srv: Any) -> None:
    """A stream read to [DONE] leaves its connection for the next request, sync and async (it was closed unread,
    so every stream opened a new connection)."""
    srv.on("POST", "/generate", Resp(200, sse=STREAM))
    with ps.Client(srv.url) as c:
        for _ in range(3):
            assert "".join(d.text for d in c.stream("acme", "Hi")) == "hello!"
        pool = c._http._transport._pool
        assert len(pool.connections) == 1 and pool.connections[0].is_idle()

    async def go() -> int:
        async with ps.AsyncClient(srv.url) as ac:
            for _ in range(3):
                assert "".join([d.text async for d in ac.stream("acme", "Hi")]) == "hello!"
            return len(ac._http._transport._pool.connections)

    assert asyncio.run(go()) == 1


def test_a_value_no_header_can_carry_is_a_value_error_at_once(
    srv: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API key with a trailing newline (read from a file), a non-ASCII one, a request id of spaces: a ValueError
    naming it, before anything is sent (each was a transport error, retried with backoff, then a misleading
    connection error)."""
    for key in ("sk-live-a\n", "sk-livé", " sk-live"):
        with pytest.raises(ValueError, match="api_key") as e:
            ps.Client(srv.url, api_key=key)
        assert key.strip() not in str(e.value)  # a key is never shown, only what is wrong with it
        with pytest.raises(ValueError, match="api_key"):
            ps.AsyncClient(srv.url, api_key=key)
    with pytest.raises(ValueError, match="position 5") as e:
        ps.Client(srv.url, headers={"Authorization": "Basic\x00dXNlcjpwYXNz"})
    assert "dXNlcjpwYXNz" not in str(e.value)
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "key-from-env\n")
    with pytest.raises(ValueError, match="PREFIXSERVE_API_KEY"):
        ps.Client(srv.url)
    monkeypatch.delenv("PREFIXSERVE_API_KEY")
    with pytest.raises(ValueError, match="header 'X-Team'"):
        ps.Client(srv.url, headers={"X-Team": "a\r\nb"})
    srv.on("POST", "/generate", Resp(200, GEN))
    with ps.Client(srv.url) as c:
        with pytest.raises(ValueError, match="request_id"):
            c.generate("acme", "Hi", request_id=" ")
        assert c.generate("acme", "Hi", request_id="ok-id").text == "hello world"
    assert len(srv.calls("POST", "/generate")) == 1


BAD_REQUEST_IDS = ["order 42", "req#1", "user@example.com", "x" * 129, "", "caf\u00e9", "a\tb"]


def test_a_request_id_the_server_would_replace_is_refused(srv: Any, client: Any, tmp_path: Path) -> None:
    """The server keeps an X-Request-ID only if it matches [A-Za-z0-9._:+=/-]{1,128} (else it silently uses a
    uuid of its own): any other is a ValueError naming the pattern, before anything is sent, sync and async; the
    longest and every allowed character go through."""
    srv.on("POST", "/generate", Resp(200, GEN))
    srv.on("POST", "/prefixes", Resp(200, JOB))
    for rid in BAD_REQUEST_IDS:
        with pytest.raises(ValueError, match=r"request_id .*\[A-Za-z0-9\._:\+=/-\]\{1,128\}"):
            client.generate("acme", "Hi", request_id=rid)
        with pytest.raises(ValueError, match="request_id"):
            client.stream("acme", "Hi", request_id=rid)
        with pytest.raises(ValueError, match="request_id"):
            client.prefixes.train(
                "acme", "faq", examples=[{"prompt": "a", "completion": "b"}], request_id=rid
            )

    async def go() -> None:
        async with ps.AsyncClient(srv.url) as ac:
            for rid in BAD_REQUEST_IDS:
                with pytest.raises(ValueError, match="must match"):
                    await ac.generate("acme", "Hi", request_id=rid)
                with pytest.raises(ValueError, match="must match"):
                    ac.stream("acme", "Hi", request_id=rid)

    asyncio.run(go())
    assert srv.seen == []
    for rid in ("x" * 128, "Az09._:+=/-", "trace/1:span=2"):
        assert client.generate("acme", "Hi", request_id=rid).request_id == rid
    assert [c.headers["x-request-id"] for c in srv.calls("POST", "/generate")] == [
        "x" * 128,
        "Az09._:+=/-",
        "trace/1:span=2",
    ]


def test_dot_segments_are_refused_not_resolved_to_another_route(client: Any) -> None:
    for name in (".", "..", ""):
        with pytest.raises(ValueError, match="not a valid"):
            client.prefixes.get("acme", name)
        with pytest.raises(ValueError, match="not a valid"):
            client.prefixes.get_job(name)
    with pytest.raises(ValueError, match="not a valid"):
        client.prefixes.delete("..", "faq")


def test_a_stream_closed_before_it_is_sent_never_is(srv: Any) -> None:
    srv.on("POST", "/generate", Resp(200, sse=STREAM))
    with ps.Client(srv.url) as c:
        s = c.stream("acme", "Hi")
        s.close()
        assert list(s) == []

    async def go() -> list[Any]:
        async with ps.AsyncClient(srv.url) as ac:
            s = ac.stream("acme", "Hi")
            await s.aclose()
            return [d async for d in s]

    assert asyncio.run(go()) == []
    assert srv.calls("POST", "/generate") == []


def test_a_lone_surrogate_reaches_the_server_as_an_escape(srv: Any, client: Any) -> None:
    """Text UTF-8 cannot carry (a broken decode's lone surrogate) is sent JSON-escaped for the server to judge (it
    answers a 422 naming the field), not a UnicodeEncodeError from the HTTP library; other text stays UTF-8."""
    srv.on("POST", "/generate", Resp(200, GEN))
    client.generate("acme", "bad \ud800 héllo")
    client.generate("acme", "héllo")
    bad, good = srv.calls("POST", "/generate")
    assert bad.body["prompt"] == "bad \ud800 héllo" and good.body["prompt"] == "héllo"
    assert bad.headers["content-type"] == "application/json"


def test_a_number_json_cannot_carry_is_refused_naming_its_field(srv: Any, client: Any) -> None:
    """NaN or an infinity anywhere in a body: a ValueError naming the field (json's own said only "Out of range
    float values are not JSON compliant"), and nothing is sent."""
    srv.on("POST", "/prefixes", Resp(202, _job("queued", 0)))
    with pytest.raises(ValueError, match=r"^hyperparameters\.learning_rate is nan: JSON has no NaN"):
        client.prefixes.train(
            "acme", "bot", examples=[{"prompt": "a", "completion": "b"}], learning_rate=float("nan")
        )
    with pytest.raises(ValueError, match=r"^temperature is inf: "):
        client.generate("acme", "hi", temperature=float("inf"))
    assert srv.calls("POST", "/prefixes") == [] and srv.calls("POST", "/generate") == []


def test_a_deep_copy_of_a_job_shares_its_client(srv: Any, client: Any) -> None:
    srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1))
    job = client.prefixes.get_job("job0001")
    for twin in (copy.deepcopy(job), job.model_copy(deep=True)):
        assert twin == job and twin._client is client
        assert twin.refresh().status == "running"


def test_job_wait_timeout_bounds_a_slow_poll_and_an_outage(srv: Any) -> None:
    """`wait(timeout=...)` ends near its timeout even when a poll hangs (each poll used the client's own read
    timeout, 600 s by default), and a server away past the timeout is a WaitTimeout (the job goes on), not the
    connection error."""
    srv.on("GET", "/prefixes/jobs/job0001", _job("running", 1), Resp(200, _job("running", 2).json, delay=3))
    with ps.Client(srv.url) as c:  # the default retries too: each retry took the time left again
        no_sleep(c)
        job = c.prefixes.get_job("job0001")
        t0 = time.monotonic()
        with pytest.raises(ps.WaitTimeout):
            job.wait(poll_interval=0.05, timeout=0.5)
        assert time.monotonic() - t0 < 2.0
    with ps.Client("http://127.0.0.1:9", max_retries=0) as dead:  # nothing listens: connection refused
        job._client = dead
        with pytest.raises(ps.WaitTimeout) as ei:
            job.wait(poll_interval=0.02, timeout=0.2)
        assert isinstance(ei.value.__cause__, ps.APIConnectionError)


def test_tokenized_room_is_within_the_context_and_the_kv_caches_share() -> None:
    t = ps.Tokenized(tokens=[1] * 10, count=10, prefix_length=8, max_model_len=1000, max_request_tokens=100)
    assert t.room == 90  # the KV cache's share of one request binds first
    assert ps.Tokenized(count=10, prefix_length=8, max_model_len=50, max_request_tokens=100).room == 32
    assert ps.Tokenized(count=10, prefix_length=8, max_model_len=50).room == 32  # an older server
    assert ps.Tokenized(count=10).room is None
    # and no more than the server lets a request ask for (a 422 max_tokens_too_large otherwise)
    assert ps.Tokenized(count=10, prefix_length=8, max_model_len=1000, max_new_tokens=32).room == 32
