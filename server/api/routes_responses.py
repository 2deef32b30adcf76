"""OpenAI's Responses API: POST /v1/responses, served by the chat completions path.

A request becomes a chat completion (`instructions` a system message, `input` the conversation, function tools and
`text.format` as chat's `tools` and `response_format`), and its answer becomes a `response` object: a message item
with the text and a `function_call` item per call, `usage` in the Responses API's names. Streamed, it is the
Responses API's typed events (`response.created` ... `response.output_text.delta` ... `response.completed`).

Nothing is stored (vLLM's default too): `previous_response_id`, `conversation` and `background` are refused, so a
client sends the whole conversation in `input` (function call items and their outputs included). Built-in tools
(web search, file search, ...), image and file inputs, `reasoning` and stored `prompt` templates are refused as well,
never ignored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.api.auth import Principal, get_principal
from server.api.chat_pipeline import Choices, chat_plan, chat_stream, rename_format, start_choices
from server.api.deps import get_info
from server.api.errors import COMMON_ERRORS, APIError, invalid_field, loc_param
from server.api.reasoning import END as REASONING_END
from server.api.schemas import (
    MAX_MODEL_ID,
    ChatCompletionRequest,
    MinP,
    Priority,
    PromptText,
    Seed,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
    check_text,
)
from server.api.service import Service
from server.api.streaming import SSE_DOC, EngineEventStream, json_off_loop
from server.api.tool_parsers import HERMES_END

router = APIRouter(prefix="/v1", tags=["openai"])

LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _refused(what: str, instead: str) -> Any:
    return Field(None, description=f"not supported ({what}): {instead}")


class ReasoningOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # (OpenAI's earlier name)


# include values taken with no effect: a reasoning item's encrypted content (none is written here: its text is sent)
NO_EFFECT_INCLUDES = ("reasoning.encrypted_content",)


class ResponsesRequest(BaseModel):
    """OpenAI's Responses API request (the fields that apply to a server that stores nothing)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_ID, description="As in /v1/chat/completions")
    input: PromptText | list[dict[str, Any]] = Field(
        description="A user message's text, or a list of items: messages ({role, content}; content a string or "
        "input_text/output_text parts), function_call and function_call_output items"
    )
    instructions: PromptText | None = Field(None, description="A system message before the input")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: TopLogprobs | None = Field(
        None,
        description="With include ['message.output_text.logprobs']: the N most likely tokens at each step",
    )
    include: list[str] | None = Field(None, description=f"Only {LOGPROBS_INCLUDE!r}")
    tools: list[dict[str, Any]] | None = Field(
        None, max_length=128, description="Function tools ({type: 'function', name, description, parameters})"
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="As chat's; a named function is {type: 'function', name}"
    )
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(
        None, description="{format: {type: 'text' | 'json_object' | 'json_schema', name, schema, strict}}"
    )
    truncation: Literal["auto", "disabled"] | None = Field(
        None,
        description="'auto': an input too long for the context loses its oldest items, whole, until it fits "
        "(instructions and the last item kept)",
    )
    stream: bool = False
    store: bool | None = Field(None, description="Accepted; nothing is stored (the answer says store: false)")
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = (
        Field(
            None,
            max_length=16,
            description="Up to 16 pairs, keys of 64 characters at most, values of 512 (OpenAI's)",
        )
    )
    user: str | None = Field(None, max_length=256)
    # vLLM's extensions, as on the chat route
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    priority: Priority = 0
    ignore_eos: bool = False
    previous_response_id: str | None = _refused("nothing is stored", "send the whole conversation in input")
    conversation: Any = _refused("nothing is stored", "send the whole conversation in input")
    background: bool | None = Field(None, description="Not supported: only false")
    reasoning: ReasoningOptions | None = Field(
        None,
        description="effort reaches the chat template as reasoning_effort (as vLLM's, for templates that read it); "
        "summary is taken and has no effect (no summaries are written)",
    )
    prompt: Any = _refused("no stored prompt templates", "send the text in input")


# chat's field names in errors, as the Responses request names them
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def _param(param: str | None) -> str | None:
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    head, bracket, index = head.partition("[")
    if head == "response_format":
        rest = rest.removeprefix("json_schema.").removeprefix("json_schema")
        dot = "." if rest else ""
    return _PARAMS.get(head, head) + bracket + index + dot + rest


def _unsupported(message: str, param: str) -> APIError:
    return APIError(400, message, code="unsupported_parameter", param=param)


def _text_of(content: Any, where: str) -> str | list[dict[str, str]]:
    """A message's content as the chat request takes it: a string, or a list of text parts (input_text /
    output_text / text) as chat's text parts, which the chat route joins or passes as parts to a template that loops
    over them (`chat_content.message_text`), as it does a chat message's."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(422, "content must be a string or a list of parts", code="invalid_value", param=where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            try:
                parts.append({"type": "text", "text": check_text(part["text"])})
            except ValueError as e:
                raise APIError(422, str(e), code="invalid_value", param=f"{where}[{j}].text") from None
        elif kind in ("input_image", "input_file", "input_audio"):
            raise _unsupported(f"{kind} parts are not supported: this model reads text", f"{where}[{j}]")
        else:
            raise APIError(
                422,
                "a content part is {type: 'input_text', text}",
                code="invalid_value",
                param=f"{where}[{j}]",
            )
    return parts


def _messages(body: ResponsesRequest) -> tuple[list[dict[str, Any]], list[int | None]]:
    """The chat messages of `instructions` and `input`: consecutive function_call items become one assistant turn
    with their tool_calls, a function_call_output a tool turn. Also, for each message, the input item it began with
    (None: the instructions), to name the item in an error."""
    out: list[dict[str, Any]] = []
    origins: list[int | None] = []
    called: set[str] = set()  # the call ids of the function_call items so far
    thinking = ""  # a reasoning item's text, for the assistant turn after it
    if body.instructions is not None:
        out.append({"role": "system", "content": body.instructions})
        origins.append(None)
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}], [*origins, 0]
    if not body.input:
        raise APIError(422, "input must hold at least one item", code="invalid_value", param="input")
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(
                    422,
                    "a message's role is user, system, developer or assistant",
                    code="invalid_value",
                    param=f"{where}.role",
                )
            msg = {"role": role, "content": _text_of(item.get("content"), f"{where}.content")}
            if role == "assistant" and thinking:
                msg["reasoning_content"], thinking = thinking, ""
            out.append(msg)
            origins.append(i)
        elif kind == "function_call":
            for field in ("call_id", "name", "arguments"):
                if not isinstance(item.get(field), str) or (field != "arguments" and not item[field]):
                    raise APIError(
                        422, f"a function_call item's {field} is a string", code="invalid_value",
                        param=f"{where}.{field}",
                    )  # fmt: skip
            called.add(item["call_id"])
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = out[-1] if out else None
            if (
                last is not None
                and last["role"] == "assistant"
                and last.get("tool_calls")
                and not last["content"]
            ):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if thinking:
                    out[-1]["reasoning_content"], thinking = thinking, ""
                origins.append(i)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise APIError(
                    422, "a function_call_output item's call_id is a string", code="invalid_value",
                    param=f"{where}.call_id",
                )  # fmt: skip
            if item["call_id"] not in called:  # (OpenAI's 400: an output answers a call of the input)
                raise APIError(
                    422, f"no function_call item before it has call_id {item['call_id']!r}", code="invalid_value",
                    param=f"{where}.call_id",
                )  # fmt: skip
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
            origins.append(i)
        elif kind == "reasoning":
            # an earlier answer's thinking, sent back as OpenAI asks: the next assistant turn's reasoning_content
            # (its chat template decides whether the prompt shows it: Qwen3's does inside a tool-call chain)
            parts = item.get("content") or []
            thinking = (
                "".join(p.get("text", "") for p in parts if isinstance(p, dict))
                if isinstance(parts, list)
                else ""
            )
            continue
        else:
            raise _unsupported(f"input items of type {kind!r} are not supported", f"{where}.type")
    return out, origins


def _chat_tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    tools = None
    if body.tools is not None:
        tools = []
        for i, t in enumerate(body.tools):
            if t.get("type") != "function":
                raise _unsupported(
                    f"tool type {t.get('type')!r} is not available here: only function tools",
                    f"tools[{i}].type",
                )
            if not isinstance(t.get("name"), str) or not t["name"]:
                raise APIError(
                    422, "a function tool's name is a string", code="invalid_value", param=f"tools[{i}].name"
                )
            fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
            tools.append({"type": "function", "function": fn})
    choice: Any = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _unsupported(
                "tool_choice is 'none', 'auto', 'required' or {type: 'function', name}", "tool_choice"
            )
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    fmt = (body.text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(
            422,
            "text.format.type is 'text', 'json_object' or 'json_schema'",
            code="invalid_value",
            param="text.format",
        )
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion a Responses request asks for."""
    if body.background:
        raise _unsupported("background responses are not supported (nothing is stored)", "background")
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(body, name) is not None:
            field = ResponsesRequest.model_fields[name]
            raise _unsupported(f"{name}: {field.description}", name)
    logprobs = LOGPROBS_INCLUDE in (body.include or [])
    for i, what in enumerate(body.include or []):
        if what != LOGPROBS_INCLUDE and what not in NO_EFFECT_INCLUDES:
            raise _unsupported(
                f"include {what!r} is not available: only {LOGPROBS_INCLUDE!r}", f"include[{i}]"
            )
    tools, choice = _chat_tools(body)
    messages, origins = _messages(body)
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "seed": body.seed,
        "priority": body.priority,
        "ignore_eos": body.ignore_eos,
        "stream": body.stream,
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body),
        "user": body.user,
    }
    if body.reasoning is not None and body.reasoning.effort is not None:
        fields["reasoning_effort"] = body.reasoning.effort
    if logprobs:  # (top_logprobs alone asks for nothing: OpenAI's and vLLM's include decides)
        fields.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    try:
        chat = ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        raise invalid_field(e, lambda loc: _field(loc, origins)) from None
    chat._drop_turns = body.truncation == "auto"
    return chat


def _field(loc: tuple[Any, ...], origins: list[int | None]) -> str | None:
    """The Responses request's field that a chat field came from (`loc`: pydantic's location in `chat_request`'s
    fields; `origins`: each chat message's input item, None for the instructions)."""
    if loc[:1] == ("messages",) and len(loc) > 1 and isinstance(loc[1], int):
        origin = origins[loc[1]]  # the input item (or the instructions) the message came from
        loc = ("instructions",) if origin is None else ("input", origin, *loc[2:])
    elif loc[:1] == ("tools",) and loc[2:3] == ("function",):
        loc = (*loc[:2], *loc[3:])  # a Responses tool has no `function` wrapper
    return _param(loc_param(loc))


# ----------------------------------------------------------------------------------------------- answers
def _usage(ch: Choices, reasoning_tokens: int = 0) -> dict[str, Any]:
    u = ch.usage()
    return {
        "input_tokens": u["prompt_tokens"],
        # (the prompt cache's writes are not counted: 0, which the SDK's type requires)
        "input_tokens_details": {
            "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,
        },
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u["total_tokens"],
    }


def _item_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex[:24]}"


def _message_item(item_id: str, text: str, logprobs: list[Any] | None, status: str) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class _Answer:
    """The response object of one request, as it grows (streamed) or at once."""

    def __init__(self, body: ResponsesRequest, rid: str, created: int, svc: Service) -> None:
        self.body = body
        self.rid = rid
        self.created = created
        self.svc = svc  # (the defaults the request sampled with)
        self.output: list[dict[str, Any]] = []

    def response(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        incomplete = status == "incomplete"
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": b.model,
            "output": self.output,
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": self.svc.openai_default("temperature", b.temperature, 1.0),
            "text": b.text or {"format": {"type": "text"}},
            "tool_choice": b.tool_choice or "auto",  # (OpenAI's echo, with tools or not)
            "tools": b.tools or [],
            "top_logprobs": b.top_logprobs,
            "top_p": self.svc.openai_default("top_p", b.top_p, 1.0),
            "truncation": b.truncation or "disabled",
            "usage": usage,
            "user": b.user,
            "metadata": b.metadata or {},
        }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class ResponseObject(BaseModel):
    """The Responses API's `response` object."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


@router.post(
    "/responses",
    response_model=ResponseObject,
    responses={**SSE_DOC, **COMMON_ERRORS},
    summary="OpenAI-compatible Responses API (stateless: send the whole conversation in input)",
)
async def responses(
    body: ResponsesRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    chat = chat_request(body)
    info = get_info(request)
    info.prompt_param, info.max_tokens_param = "input", "max_output_tokens"
    try:
        ch = await start_choices(request, principal, chat, chat_plan)
    except APIError as e:
        _rename(e)
        raise
    answer = _Answer(body, "resp_" + info.request_id, ch.created, ch.svc)  # (its X-Request-ID)
    stream = _Stream(ch, answer)
    if body.stream:
        return EngineEventStream(ch.runs, stream.events, end=None, error_frame=stream.failed)
    # unstreamed, the same items built the same way (the stream's events, not sent): text, a call, then more text
    # are three items either way, each message with its own tokens' logprobs
    gone = await ch.drain(request, stream.drain)
    if gone is not None:
        return gone
    usage = _usage(ch, stream.reasoning_tokens())
    return await json_off_loop(ResponseObject, lambda: answer.response(stream.status, usage))


def _rename(e: APIError) -> None:
    """An error of the chat path in the Responses request's names: its `param`, and the response_format errors'
    words (text.format has no json_schema wrapper). The errors about the prompt's and the output's sizes need
    neither: they name `input` and `max_output_tokens` already (the route's `RequestInfo` names)."""
    if not rename_format(e, "text.format"):
        e.param = _param(e.param)


def _frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=True, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode("ascii")


class _TokenText:
    """The generated tokens (their logprob entries) in order, by the bytes each adds to the output: a content piece
    takes the tokens its text is made of, passing over those before it (a tool call's markup and arguments, which
    are no message's). By text, not by the chunks they came in: the engine's events group tokens as the consumer
    keeps up, so a chunk may hold the end of a text and the start of a call."""

    def __init__(self) -> None:
        self.raw = bytearray()
        self.entries: list[
            tuple[int, int, Any]
        ] = []  # (start, end) in raw and entry of the tokens not handed out
        self.cursor = 0  # raw bytes handed out or passed over

    def add(self, entries: list[Any]) -> None:
        for e in entries:
            b = e.get("bytes")
            start = len(self.raw)
            self.raw += bytes(b) if b is not None else str(e.get("token", "")).encode()
            self.entries.append((start, len(self.raw), e))

    def pass_over(self, marker: str) -> None:
        """The text up to the next `marker` (a call block's end) is no message's: later text is looked for after
        it (not inside the call's arguments)."""
        at = self.raw.find(marker.encode(), self.cursor)
        if at >= 0:
            self.cursor = at + len(marker)

    def take(self, piece: str) -> list[Any]:
        """The tokens of this content piece (those of passed-over text before it are dropped)."""
        data = piece.encode()
        at = self.raw.find(data, self.cursor)
        if at < 0:  # not the tokens' bytes as they are (an invalid byte shows as U+FFFD): every token so far
            out = [e for _, _, e in self.entries]
            self.entries, self.cursor = [], len(self.raw)
            return out
        end = at + len(data)
        out = [e for start, stop, e in self.entries if stop > at and start < end]
        self.entries = [t for t in self.entries if t[0] >= end]
        self.cursor = end
        return out

    def rest(self) -> list[Any]:
        """The tokens after the last content piece (end-of-sequence)."""
        out = [e for _, stop, e in self.entries if stop > self.cursor]
        self.entries = []
        return out


class _Stream:
    """The Responses API's stream of one choice: created, in_progress, each output item (added, its deltas, done)
    as the chat deltas come, then completed (or incomplete: cut short by max_output_tokens, its last item too); an
    error after the stream began is an `error` event and `response.failed`."""

    def __init__(self, ch: Choices, answer: _Answer) -> None:
        self.ch = ch
        self.answer = answer
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the item deltas go to
        self.text: list[str] = []  # the open message's text and logprobs
        self.lps: list[Any] = []
        self.calls: dict[int, dict[str, Any]] = {}  # chat's tool call index -> its item
        self.want_lps = ch.runs[0].req.sampling.logprobs is not None
        self.tokens = _TokenText()  # the generated tokens' logprobs, handed to the messages their text is in
        self.status = "in_progress"

    async def drain(self) -> None:
        """The whole answer into `self.answer`, its events not sent (an unstreamed request); an error in the
        Responses request's names (a grammar failing mid-generation names text.format, not response_format)."""
        try:
            async for _ in self.events():
                pass
        except APIError as e:
            _rename(e)
            raise

    def frame(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return _frame({"type": kind, "sequence_number": self.seq - 1, **fields})

    def failed(self, e: APIError) -> bytes:
        _rename(e)
        if self.open is not None:  # what was sent of it, cut short
            self._finish(self.open, "incomplete")
            self.open = None
        # the response's error codes are OpenAI's few (the SDK checks them); the `error` event has ours
        code = {
            429: "rate_limit_exceeded",
            400: "invalid_prompt",
            413: "invalid_prompt",
            422: "invalid_prompt",
        }
        error = {"code": code.get(e.status, "server_error"), "message": e.message}
        return self.frame("error", code=e.code, message=e.message, param=e.param) + self.frame(
            "response.failed", response={**self.answer.response("failed"), "error": error}
        )

    def _finish(self, item: dict[str, Any], status: str) -> None:
        """`item` as it ends: its text and logprobs (a message), its status."""
        if item["type"] == "message":
            lps = list(self.lps) if self.want_lps else None
            item.update(_message_item(item["id"], "".join(self.text), lps, status))
        elif item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": "".join(self.text)}]
        item["status"] = status

    def close(self, status: str = "completed") -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.answer.output.index(item)
        self._finish(item, status)
        if item["type"] == "message":
            part = item["content"][0]
            lps = part.get("logprobs")
            return [
                self.frame("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=part["text"], logprobs=lps or []),
                self.frame("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part),
                self.frame("response.output_item.done", output_index=index, item=item),
            ]  # fmt: skip
        if item["type"] == "reasoning":
            part = item["content"][0]
            return [
                self.frame("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=part["text"]),
                self.frame("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                           part=part),
                self.frame("response.output_item.done", output_index=index, item=item),
            ]  # fmt: skip
        return [
            self.frame("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       arguments=item["arguments"]),
            self.frame("response.output_item.done", output_index=index, item=item),
        ]  # fmt: skip

    def start(self, item: dict[str, Any]) -> list[bytes]:
        out = self.close()
        self.answer.output.append(item)
        self.open = item
        index = len(self.answer.output) - 1
        if item["type"] not in ("message", "reasoning"):
            return [*out, self.frame("response.output_item.added", output_index=index, item=dict(item))]
        self.text, self.lps = [], []
        added = {**item, "content": []}  # its part comes with content_part.added
        part: dict[str, Any] = (
            {"type": "output_text", "text": "", "annotations": []}
            if item["type"] == "message"
            else {"type": "reasoning_text", "text": ""}
        )
        return [
            *out,
            self.frame("response.output_item.added", output_index=index, item=added),
            self.frame("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                       part=part),
        ]  # fmt: skip

    async def events(self) -> AsyncIterator[bytes]:
        answer, run = self.answer, self.ch.runs[0]
        yield self.frame("response.created", response=answer.response("in_progress"))
        yield self.frame("response.in_progress", response=answer.response("in_progress"))

        def chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> tuple[Any, ...]:
            return delta, finish, logprobs

        async for delta, _reason, logprobs in chat_stream(run, chunk, self.ch.text, self.ch.plan.tools):
            self.tokens.add((logprobs or {}).get("content") or [])
            thought = delta.get("reasoning_content")
            if thought:  # a reasoning parser's thinking: a reasoning item (no logprobs: OpenAI's has none)
                self.tokens.take(thought)
                if self.open is None or self.open["type"] != "reasoning":
                    item = {"type": "reasoning", "id": _item_id("rs"), "summary": [], "status": "in_progress"}
                    for f in self.start(item):
                        yield f
                assert self.open is not None
                self.text.append(thought)
                yield self.frame("response.reasoning_text.delta", item_id=self.open["id"],
                                 output_index=len(answer.output) - 1, content_index=0, delta=thought)  # fmt: skip
            piece = delta.get("content")
            if piece:
                new_lps = self.tokens.take(piece)
                if self.open is None or self.open["type"] != "message":
                    for f in self.start(_message_item(_item_id("msg"), "", None, "in_progress")):
                        yield f
                assert self.open is not None
                self.text.append(piece)
                self.lps.extend(new_lps)
                yield self.frame("response.output_text.delta", item_id=self.open["id"],
                                 output_index=len(answer.output) - 1, content_index=0, delta=piece,
                                 logprobs=new_lps)  # fmt: skip
            if self.ch.plan.tools.parser.blocks:
                for _ in delta.get("tool_calls") or []:  # (a block call is sent once its block closed)
                    self.tokens.pass_over(HERMES_END)
            for c in delta.get("tool_calls") or []:
                fn = c.get("function") or {}
                call = self.calls.get(c["index"])
                if call is None:
                    call = _call_item(
                        _item_id("fc"), c.get("id") or "", fn.get("name") or "", "", "in_progress"
                    )
                    self.calls[c["index"]] = call
                    for f in self.start(call):
                        yield f
                args = fn.get("arguments") or ""
                if args:
                    call["arguments"] += args
                    yield self.frame("response.function_call_arguments.delta", item_id=call["id"],
                                     output_index=answer.output.index(call), delta=args)  # fmt: skip
        self.ch.finish_stream()
        status = self.status = _status(run.final.finish_reason if run.final is not None else None)
        if not answer.output:  # nothing was written: still one message, as the unstreamed answer has
            for f in self.start(_message_item(_item_id("msg"), "", None, "in_progress")):
                yield f
        if self.open is not None and self.open["type"] == "message":
            # the last tokens, with no text of their own (end-of-sequence)
            self.lps.extend(self.tokens.rest())
        for f in self.close(status):
            yield f
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield self.frame(kind, response=answer.response(status, _usage(self.ch, self.reasoning_tokens())))

    def reasoning_tokens(self) -> int:
        """Output tokens spent thinking (a reasoning item's, its tags included): those that begin before the end of
        the output's first `</think>` (all of them if it never closed)."""
        if not any(item["type"] == "reasoning" for item in self.answer.output):
            return 0
        pieces = [self.ch.text.entry(t)[1] for t in self.ch.runs[0].token_ids]
        raw = b"".join(pieces)
        parser = self.ch.svc.reasoning
        tag = (parser.end if parser is not None else REASONING_END).encode()
        end = raw.find(tag)
        end = len(raw) if end < 0 else end + len(tag)
        count = start = 0
        for piece in pieces:
            if start >= end:
                break
            count, start = count + 1, start + len(piece)
        return count
