"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as vLLM and SGLang serve it:
the request becomes a chat completion (`model` names the tenant's prefix as on /v1/chat/completions), run by the
chat path (template, tools, reasoning parser, limits), and its answer comes back as Anthropic's message: content
blocks (`thinking`, `text`, `tool_use`), `stop_reason` (`end_turn`, `max_tokens`, `stop_sequence`, `tool_use`),
`usage` (the prompt cache's hits as `cache_read_input_tokens`); streamed as Anthropic's events (`message_start`,
`content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop`). Anthropic's clients send their key as
`x-api-key`, taken as `Authorization: Bearer` is (server.api.auth). Errors carry Anthropic's top-level
`"type": "error"` and error types beside the server's usual fields (server.api.errors)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.api.auth import Principal, get_principal
from server.api.chat_pipeline import (
    Choices,
    as_openai_error,
    chat_plan,
    chat_stream,
    rename_format,
    start_choices,
)
from server.api.deps import get_info, get_service
from server.api.errors import COMMON_ERRORS, APIError, anthropic_error, invalid_field, loc_param
from server.api.model_ids import parse_model, served_names
from server.api.schemas import MAX_MODEL_ID, ChatCompletionRequest, StopText, TopK, TopP, check_text
from server.api.streaming import SSE_DOC, EngineEventStream
from server.api.tool_parsers import loads

router = APIRouter(prefix="/v1", tags=["anthropic"])

# the body's fields that errors about the prompt's and the output's sizes name (`RequestInfo.prompt_param`,
# `max_tokens_param`)
PARAMS = ("messages", "max_tokens")


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description="Text, or content blocks: text, tool_use, tool_result, thinking"
    )


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = Field(
        None, description="Only custom tools (null or 'custom'): Anthropic's server tools are not"
    )


class MessagesRequest(BaseModel):
    # (Anthropic's clients send fields a local model has no use for: metadata, service_tier, ... are ignored)
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=MAX_MODEL_ID, description="'{tenant_id}/{prefix}', as on /v1")
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=1024)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[StopText] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_p: TopP | None = None
    top_k: TopK | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = Field(
        None,
        description="format {'type': 'json_schema', 'schema'}: the answer follows the schema (structured outputs); "
        "effort: the chat template's reasoning_effort",
    )
    output_format: dict[str, Any] | None = Field(
        None, description="the structured-outputs beta's name for output_config.format (the same object)"
    )
    thinking: dict[str, Any] | None = Field(
        None,
        description="type 'disabled': the chat template's enable_thinking false; 'enabled' / 'adaptive': true; "
        "'enabled' with budget_tokens: the thinking is cut at that many tokens (with the server's reasoning parser)",
    )
    metadata: dict[str, Any] | None = None


class CountTokensRequest(MessagesRequest):
    max_tokens: int = Field(1, ge=1)


def _parts(texts: list[str]) -> list[dict[str, str]]:
    """Text blocks' texts as chat's text parts, which the chat route joins or passes as parts to a template that
    loops over them (`chat_content.message_text`), as it does a chat message's."""
    return [{"type": "text", "text": t} for t in texts]


def _error_text(content: str | list[dict[str, str]]) -> str | list[dict[str, str]]:
    """A failed tool_result's content: its text after "Error: " (a list of parts: the first's)."""
    if isinstance(content, str) or not content:
        return f"Error: {_joined(content)}"
    return [{**content[0], "text": f"Error: {content[0]['text']}"}, *content[1:]]


def _joined(content: Any) -> str:
    """A chat message's content (None, text or text parts) as one text, as a template that prints it reads it."""
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content)
    return content or ""


def _checked(text: str, where: str) -> str:
    """A text block's text, checked as chat's text is (a chat message's string content is checked as it is read)."""
    try:
        return check_text(text)
    except ValueError as e:
        raise APIError(422, str(e), param=where) from None


def _text(value: Any, where: str) -> str | list[dict[str, str]]:
    """A text field, or a list of text blocks as chat's text parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise APIError(422, "expected text or a list of text blocks", param=where)
    texts = []
    for j, b in enumerate(value):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise APIError(422, "only text blocks are supported here", param=f"{where}[{j}]")
        texts.append(_checked(b["text"], f"{where}[{j}].text"))
    return _parts(texts)


def _messages(body: MessagesRequest) -> tuple[list[dict[str, Any]], list[int | None]]:
    """The chat messages of a Messages request, and for each the request message it came from (None: `system`)."""
    out: list[dict[str, Any]] = []
    origins: list[int | None] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
        origins.append(None)
    for i, m in enumerate(body.messages):
        # (Anthropic's rule: only a last assistant turn may be empty, and then says nothing)
        if not m.content:
            if m.role == "assistant" and i == len(body.messages) - 1:
                continue
            raise APIError(422, "message content must not be empty", param=f"messages[{i}].content")
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            origins.append(i)
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        thoughts: list[str] = []
        results: list[dict[str, Any]] = []
        for j, b in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(_checked(b["text"], f"{where}.text"))
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise APIError(422, "a tool_use block has a name and an input object", param=where)
                call_id = str(b.get("id") or f"toolu_{i}_{j}")
                args = json.dumps(b.get("input", {}), ensure_ascii=False)
                calls.append(
                    {"id": call_id, "type": "function", "function": {"name": b["name"], "arguments": args}}
                )
            elif kind == "tool_result" and m.role == "user":
                content = b.get("content", "")
                text = _text(content, f"{where}.content") if content is not None else ""
                if b.get("is_error"):  # (a chat template has no field for it: the model reads it in the text)
                    text = _error_text(text)
                results.append(
                    {"role": "tool", "tool_call_id": str(b.get("tool_use_id") or ""), "content": text}
                )
            elif kind == "thinking" and m.role == "assistant":
                thoughts.append(str(b.get("thinking") or ""))
            elif kind == "redacted_thinking" and m.role == "assistant":
                continue
            else:
                raise APIError(
                    422,
                    f"content block {kind!r} is not supported in a {m.role} message (text, tool_use and thinking in "
                    "an assistant's; text and tool_result in a user's)",
                    param=f"{where}.type",
                )
        if m.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": _parts(texts) if texts else None}
            if calls:
                msg["tool_calls"] = calls
            if thoughts:
                msg["reasoning_content"] = "\n".join(thoughts)
            out.append(msg)
            origins.append(i)
            continue
        out.extend(
            results
        )  # (the answers to the previous turn's calls come first, as the chat templates expect)
        origins.extend([i] * len(results))
        if texts or not results:
            out.append({"role": "user", "content": _parts(texts)})
            origins.append(i)
    return out, origins


def _tool_choice(body: MessagesRequest) -> tuple[Any, bool | None]:
    """Chat's tool_choice and parallel_tool_calls from Anthropic's tool_choice."""
    tc = body.tool_choice
    if tc is None:
        return None, None
    kind = tc.get("type")
    parallel = False if tc.get("disable_parallel_tool_use") else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool" and isinstance(tc.get("name"), str):
        return {"type": "function", "function": {"name": tc["name"]}}, parallel
    raise APIError(422, "tool_choice type is one of auto, any, tool (with a name), none", param="tool_choice")


EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _output_config(
    config: dict[str, Any] | None, beta_format: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Chat fields of Anthropic's output_config: its JSON-schema format (or the structured-outputs beta's
    `output_format`), its effort."""
    out: dict[str, Any] = {}
    config = config or {}
    fmt, where = config.get("format"), "output_config.format"
    if beta_format is not None:
        if fmt is not None:
            raise APIError(422, "give output_config.format or output_format, not both", param="output_format")
        fmt, where = beta_format, "output_format"
    if fmt is not None:
        if (
            not isinstance(fmt, dict)
            or fmt.get("type") != "json_schema"
            or not isinstance(fmt.get("schema"), dict)
        ):
            raise APIError(422, f"{where} is {{'type': 'json_schema', 'schema': {{...}}}}", param=where)
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt["schema"]},
        }
    effort = config.get("effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise APIError(
                422, f"output_config.effort is one of {', '.join(EFFORTS)}", param="output_config.effort"
            )
        out["reasoning_effort"] = EFFORTS[effort]
    return out


def chat_request(body: MessagesRequest, stream: bool | None = None) -> ChatCompletionRequest:
    """The chat completion a Messages request asks for."""
    tools = None
    if body.tools:
        for i, t in enumerate(body.tools):
            if t.type not in (None, "custom"):
                raise APIError(
                    422,
                    f"server tool {t.type!r} is not supported: only custom tools",
                    param=f"tools[{i}].type",
                )
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in body.tools
        ]
    choice, parallel = _tool_choice(body)
    messages, origins = _messages(body)
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,  # (Anthropic's API no longer has it: the chat default, or the model's)
        "top_p": body.top_p,
        "top_k": body.top_k,
        "stop": body.stop_sequences,
        "stream": body.stream if stream is None else stream,
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": parallel,
    }
    user = (body.metadata or {}).get("user_id")
    if isinstance(user, str):
        fields["user"] = user[:256]
    thinking = (body.thinking or {}).get("type")
    if thinking in ("disabled", "enabled", "adaptive"):
        fields["chat_template_kwargs"] = {"enable_thinking": thinking != "disabled"}
    if thinking == "enabled" and (body.thinking or {}).get("budget_tokens") is not None:
        # enforced where the server knows the thinking's tags (`messages` drops it otherwise)
        fields["thinking_token_budget"] = (body.thinking or {})["budget_tokens"]
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant" and _joined(last.get("content")) and not last.get("tool_calls"):
        # a prefill: the answer continues the last assistant turn's text (Anthropic's), which it does not repeat
        fields.update(continue_final_message=True, add_generation_prompt=False)
    fields.update(_output_config(body.output_config, body.output_format))
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        raise invalid_field(e, lambda loc: _field(loc, origins)) from None


def _field(loc: tuple[Any, ...], origins: list[int | None]) -> str | None:
    """The Messages request's field that a chat field came from (`loc`: pydantic's location in `chat_request`'s
    fields; `origins`: each chat message's request message, None for `system`)."""
    if loc[:1] == ("messages",) and len(loc) > 1 and isinstance(loc[1], int):
        origin = origins[loc[1]]
        loc = ("system",) if origin is None else ("messages", origin)
    elif loc[:1] == ("tools",):
        loc = loc[:2]
    elif loc[:1] == ("stop",):
        loc = ("stop_sequences", *loc[1:])
    elif loc[:1] == ("thinking_token_budget",):
        loc = ("thinking", "budget_tokens")
    return loc_param(loc)


def _tool_use_id(call_id: str) -> str:
    """A chat tool call's id as Anthropic spells a tool_use block's (`toolu_...`)."""
    return "toolu_" + call_id.removeprefix("call_") if call_id else ""


def _frame(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


def _stop_reason(finish: str | None, matched: Any, called: bool) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence: a message that ends with tool calls (a named tool_choice's too,
    which chat finishes as "stop") stopped for them."""
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls" or called:
        return "tool_use", None
    if isinstance(matched, str):
        return "stop_sequence", matched
    return "end_turn", None


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's `input`: its arguments as an object (`{}` if they are not one a JSON answer can carry)."""
    try:
        value = loads(arguments) if arguments else {}
    except (ValueError, RecursionError):
        value = None
    return value if isinstance(value, dict) else {}


class _Stream:
    """Anthropic's events of one chat choice, as its deltas come: a block per kind of content in output order
    (thinking, text, each tool call), then the message's stop reason and usage; the blocks are kept for the
    unstreamed answer."""

    def __init__(self, ch: Choices, message_id: str, model: str, format_field: str) -> None:
        self.ch, self.id, self.model = ch, message_id, model
        self.format_field = format_field  # the request's structured-output format (errors name it)
        self.blocks: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None
        self.args: dict[int, list[str]] = {}  # block index -> its tool call's argument text so far
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def usage(self) -> dict[str, Any]:
        run = self.ch.runs[0]
        # Anthropic's split: input_tokens are the prompt tokens not read from the cache (clients add the parts up)
        return {
            "input_tokens": self.ch.prompt_tokens - run.cached_tokens,
            "output_tokens": run.generated,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": run.cached_tokens,
        }

    def message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self.usage(),
        }

    def _close(self) -> list[bytes]:
        block, self.open = self.open, None
        if block is None:
            return []
        index = len(self.blocks) - 1  # (the open block is the last one)
        if block["type"] == "tool_use":
            block["input"] = _tool_input("".join(self.args.pop(index, [])))
        return [_frame({"type": "content_block_stop", "index": index})]

    def _start(self, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self.blocks.append(block)
        self.open = block
        shown = {**block, "input": {}} if block["type"] == "tool_use" else dict(block)
        if block["type"] == "text":
            shown["text"] = ""
        elif block["type"] == "thinking":
            shown["thinking"] = ""
        return [
            *out,
            _frame({"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": shown}),
        ]

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _frame({"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta})

    async def events(self) -> AsyncIterator[bytes]:
        run = self.ch.runs[0]
        start = {**self.message([]), "usage": {**self.usage(), "output_tokens": 0}}
        yield _frame({"type": "message_start", "message": start})

        def chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> tuple[Any, ...]:
            return delta, finish

        finish: str | None = None
        async for delta, fin in chat_stream(run, chunk, self.ch.text, self.ch.plan.tools):
            finish = fin or finish
            thought = delta.get("reasoning_content")
            if thought:
                if self.open is None or self.open["type"] != "thinking":
                    for f in self._start({"type": "thinking", "thinking": "", "signature": ""}):
                        yield f
                assert self.open is not None
                self.open["thinking"] += thought
                yield self._delta({"type": "thinking_delta", "thinking": thought})
            piece = delta.get("content")
            if piece:
                if self.open is None or self.open["type"] != "text":
                    for f in self._start({"type": "text", "text": ""}):
                        yield f
                assert self.open is not None
                self.open["text"] += piece
                yield self._delta({"type": "text_delta", "text": piece})
            for c in delta.get("tool_calls") or []:
                fn = c.get("function") or {}
                args = fn.get("arguments")
                if c.get("id") or fn.get("name"):  # a call's first fragment: its own block
                    block: dict[str, Any] = {
                        "type": "tool_use",
                        "id": _tool_use_id(c.get("id") or ""),
                        "name": fn.get("name") or "",
                        "input": {},
                    }
                    for f in self._start(block):
                        yield f
                    self.args[len(self.blocks) - 1] = []
                    if args and not args.lstrip().startswith("{"):
                        # a whole call whose arguments are not an object (tool_choice auto): its input is {} as the
                        # unstreamed answer has it (an object's text, whole or its first piece, goes as it is)
                        args = "{}"
                if args and self.open is not None and self.open["type"] == "tool_use":
                    self.args[len(self.blocks) - 1].append(args)
                    yield self._delta({"type": "input_json_delta", "partial_json": args})
        for f in self._close():
            yield f
        self.ch.finish_stream()
        self.stop_reason, self.stop_sequence = _stop_reason(
            finish,
            run.final.stop_reason if run.final is not None else None,
            any(b["type"] == "tool_use" for b in self.blocks),
        )
        yield _frame(
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
                "usage": {"output_tokens": run.generated},
            }
        )
        yield _frame({"type": "message_stop"})

    async def drain(self) -> None:
        try:
            async for _ in self.events():
                pass
        except APIError as e:
            rename_format(e, self.format_field)
            raise

    def failed(self, e: APIError) -> bytes:
        rename_format(e, self.format_field)
        return _frame(anthropic_error(e.status, e.message))


@router.post(
    "/messages",
    responses={**SSE_DOC, **COMMON_ERRORS},
    summary="Anthropic-compatible Messages API (model: '{tenant_id}/{prefix}'; key as x-api-key or Bearer)",
)
async def messages(
    body: MessagesRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    chat = chat_request(body)
    if get_service(request).reasoning is None:
        chat.thinking_token_budget = None  # (a model without a reasoning parser: no thinking to bound)
    info = get_info(request)
    info.prompt_param, info.max_tokens_param = PARAMS
    fmt = "output_format" if body.output_format is not None else "output_config.format"
    try:
        ch = await start_choices(request, principal, chat, chat_plan)
    except APIError as e:
        rename_format(e, fmt)
        raise
    stream = _Stream(ch, "msg_" + info.request_id, body.model, fmt)
    if body.stream:
        return EngineEventStream(ch.runs, stream.events, end=None, error_frame=stream.failed)
    gone = await ch.drain(request, stream.drain)
    return gone or JSONResponse(stream.message(stream.blocks))


@router.post(
    "/messages/count_tokens",
    responses=COMMON_ERRORS,
    summary="Anthropic's token count: the prompt's tokens as the model would get them (its chat template)",
)
async def count_tokens(
    body: CountTokensRequest, request: Request, principal: Principal = Depends(get_principal)
) -> dict[str, int]:
    svc, info = get_service(request), get_info(request)
    info.prompt_param, info.max_tokens_param = PARAMS
    chat = chat_request(body, stream=False)
    tenant, name, version = parse_model(body.model, principal, served_names(request, svc))
    try:
        prefix = await svc.resolve(tenant, name, version, param="model")
        # (a prompt too long: the 400 /v1/messages answers for it, not a 413)
        plan = await chat_plan(svc, info, chat, prefix)
    except APIError as e:
        raise as_openai_error(e, body.model) from None
    return {"input_tokens": len(plan.prompts[0])}
