"""OpenAI function calling on /v1/chat/completions (vLLM's semantics).

`tools` go to the chat template (`apply_chat_template(tools=...)`: a template that knows tools describes them to the
model; one that does not, SmolLM2's included, ignores them). `tool_choice` decides what comes back:

- a named function: the output is forced, by structured outputs, to be that function's arguments (its `parameters`
  JSON schema); the message is that one call, `finish_reason` "stop" (OpenAI's, for a forced call);
- "required": the output is forced to be a JSON list of one or more `{"name", "parameters"}` of the given tools (at
  most one with `parallel_tool_calls: false`); the message is those calls, `finish_reason` "tool_calls";
- "auto" (the default with tools): free text; calls the model writes in its format (`server.api.tool_parsers`:
  Hermes `<tool_call>` blocks, Llama 3 JSON, Mistral `[TOOL_CALLS]`, pythonic lists, Qwen3-Coder's XML-like
  blocks, Granite's `<|tool_call|>` and Phi-4-mini's `functools` lists; the setting `tool_call_parser`,
  detected from the chat template by default) become `tool_calls`, the rest stays `content`;
- "none": free text.

Streaming: a named call's arguments stream as `tool_calls` deltas; so do "required" calls (`CallListStream`: each
call's id and name once its name is written, then its arguments as they come); "auto" (`AutoStream`) streams the
text until where a call could start (the parser's `hold_from`: a `<tool_call>` tag or its first characters; for the
formats that are the whole output, an output that begins like one), sends each hermes call as soon as its block
closes (text after it streams again), and the calls of the whole-output formats at the end.

A forced call is valid JSON for its schema, not necessarily a good call: the model should also be told about the
tools (a template with tool support, or the caller's own system message).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.api.errors import APIError
from server.api.reasoning import ReasoningParser, ReasoningStream
from server.api.schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice
from server.api.service import chat_messages
from server.api.tool_parsers import AutoStream, ToolParser, get_parser, loads
from server.engine import StructuredOutputs

_ALNUM = string.ascii_letters + string.digits
_SHORT_ID = re.compile(r"[A-Za-z0-9]{9}")


def call_id(short: bool = False) -> str:
    """A new tool call id: OpenAI's `call_...`, or (`short`) 9 letters and digits, all a Mistral chat template
    takes (its check refuses the next turn's prompt otherwise; vLLM's Mistral ids are such)."""
    if short:
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + uuid.uuid4().hex[:24]


def template_call_id(given: str, short: bool) -> str:
    """A call id as the chat template is given it: as sent, or (`short`) 9 letters and digits made from it (the
    same for the assistant's call and the tool result that answers it), as vLLM shortens ids for Mistral."""
    if not short or _SHORT_ID.fullmatch(given):
        return given
    n = int.from_bytes(hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "".join(_ALNUM[(n // len(_ALNUM) ** i) % len(_ALNUM)] for i in range(9))


def _arguments_text(arguments: Any) -> str:
    """A call's `arguments` as OpenAI sends them, JSON text: a string that is JSON already (arguments the model
    wrote as a JSON string) as it is, any other string as a JSON string (a client's `json.loads` must work)."""
    if isinstance(arguments, str):
        try:
            loads(arguments)
            return arguments
        except (ValueError, RecursionError):
            pass
    return json.dumps(arguments, ensure_ascii=False)


def _call(name: str, arguments: Any, short: bool = False, raw: bool = False) -> dict[str, Any]:
    """A `tool_calls` entry: `arguments` a JSON value a parser read, or (`raw`) the text a forced call wrote."""
    text = arguments if raw else _arguments_text(arguments)
    return {"id": call_id(short), "type": "function", "function": {"name": name, "arguments": text}}


NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


# keywords whose values are data, not schemas: a {"$ref": ...} there is a value the output holds, never rewritten
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "example"})


def _rebased(schema: Any, base: str, top: bool = True) -> Any:
    """`schema` with every local reference (`#...`, a JSON pointer from its root) made relative to `base`, where it
    is placed inside another schema; other references (a URL) stay, as do data (`const`, `enum`, ...) and a
    subschema with its own `$id` (its references are relative to it)."""
    if isinstance(schema, dict):
        if not top and "$id" in schema:
            return schema
        out = {k: v if k in _DATA_KEYWORDS else _rebased(v, base, False) for k, v in schema.items()}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out["$ref"] = base + ref[1:]
        return out
    if isinstance(schema, list):
        return [_rebased(v, base, False) for v in schema]
    return schema


@dataclass
class ToolPlan:
    """What a chat body's tools ask for: the mode, the tools for the template, the schema a forced call follows."""

    mode: str = "none"  # none | auto | named | required
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool objects, for the chat template
    named: str | None = None
    parallel: bool = True
    parser: ToolParser = field(default_factory=lambda: get_parser("hermes"))  # how "auto" finds calls
    # how a reasoning model's thinking is told from its answer (None: no parser); the answer is what calls are
    # parsed from, and what a forced call's grammar holds
    reasoning: ReasoningParser | None = None
    opened: bool | None = None  # what the prompt says of the thinking (`reasoning.prompt_opened`)
    show_reasoning: bool = (
        True  # vLLM's include_reasoning: the thinking is split off either way, shown or not
    )

    @property
    def forced(self) -> bool:
        return self.mode in ("named", "required")

    def structured(self) -> StructuredOutputs | None:
        """The constraint of a forced call (vLLM's: the parameters schema, or a list of name + parameters), as
        compact JSON (no whitespace between tokens: a small model sampling at temperature 1 would spend its
        max_tokens on blank space)."""
        if not self.forced:
            return None
        # a function without `parameters` takes none (OpenAI: "omitting parameters defines a function with an
        # empty parameter list"): its arguments are {}, not any object the model makes up
        params = {t["function"]["name"]: t["function"].get("parameters") or NO_PARAMETERS for t in self.tools}
        if self.mode == "named":
            assert self.named is not None
            return StructuredOutputs("json", json.dumps(params[self.named]), any_whitespace=False)
        # each tool's schema under the list's $defs, its own references ("#", "#/$defs/...", "#/definitions/...",
        # written against its root) rewritten to point there: in place, they pointed into the list's schema
        defs = {f"tool{i}": _rebased(schema, f"#/$defs/tool{i}") for i, schema in enumerate(params.values())}
        one_of = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": {"$ref": f"#/$defs/tool{i}"},
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for i, name in enumerate(params)
        ]
        calls: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}, "$defs": defs}
        if not self.parallel:
            calls["maxItems"] = 1
        return StructuredOutputs("json", json.dumps(calls), any_whitespace=False)

    def thinking(self) -> ReasoningStream | None:
        """Follows a streamed output's thinking (None: no reasoning parser for this output)."""
        return None if self.reasoning is None else self.reasoning.stream(self.opened)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, the answer to parse calls from) of a finished output: the answer is all of it without
        a reasoning parser, None when it is all thinking."""
        if self.reasoning is None:
            return None, text
        return self.reasoning.split(text, self.opened)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of a finished output's answer."""
        if self.mode == "named":
            assert self.named is not None
            # (the blank line a reasoning model writes after its thinking is not arguments; with nothing after it,
            # no call was begun: a stream announces the call with its first arguments)
            if self.reasoning is not None and not text.strip():
                return None, None
            return None, [_call(self.named, text.lstrip(), self.short_ids, raw=True)]
        if self.mode == "required":  # read as a stream reads it: the same calls, the arguments as written
            stream = CallListStream(self.short_ids)
            stream.feed(text)
            # cut short by max_tokens: the calls begun (as the stream sent them), never the list's raw text
            return None, (stream.result() or stream.begun() or None)
        if self.mode == "auto":  # read as a stream reads it: the same text, the same calls
            items = self.auto_stream().feed(text, final=True)
            calls = [v for k, v in items if k == "call"]
            if calls:
                if not self.parallel:  # only the first (as vLLM and OpenAI)
                    calls = calls[:1]
                content = "".join(v for k, v in items if k == "content")
                return content or None, [_call(name, args, self.short_ids) for name, args in calls]
        return text, None

    def auto_stream(self) -> AutoStream:
        """("auto") Follows a streamed output: the text and calls that can be sent so far."""
        # (each tool's parameters schema: a parser that reads values by their types, qwen3_coder, needs it)
        return AutoStream(
            self.parser, {t["function"]["name"]: t["function"].get("parameters") for t in self.tools}
        )

    @property
    def short_ids(self) -> bool:
        """Call ids of 9 letters and digits (the model's template takes no others)."""
        return self.parser.short_ids

    def new_id(self) -> str:
        return call_id(self.short_ids)

    def call(self, name: str, arguments: Any) -> dict[str, Any]:
        """A `tool_calls` entry (new id) of a call a parser found."""
        return _call(name, arguments, self.short_ids)

    def finish_reason(
        self, engine_reason: str | None, calls: list[dict[str, Any]] | None, answer: str | None = None
    ) -> str:
        """ "tool_calls" when calls were made, unless the output was cut short by max_tokens ("length": the
        client must know its last call may be incomplete, as OpenAI says) or, "required", by a stop string before
        its list closed (`answer`, a finished output's, says so; a stream knows it from its `CallListStream`)."""
        if calls and self.mode == "required" and answer is not None:
            closed = CallListStream()
            closed.feed(answer)
            calls = calls if closed.result() is not None else None
        if calls and self.mode != "named" and engine_reason != "length":
            return "tool_calls"
        return engine_reason or "stop"


@dataclass
class _StreamedCall:
    index: int
    id: str
    name: str | None = None
    args: list[str] = field(default_factory=list)  # the arguments' text as written, a character at a time
    sent: int = 0  # characters of `args` sent
    announced: bool = False  # its id and name were sent


class CallListStream:
    """Follows a "required" output, ``[{"name": ..., "parameters": {...}}, ...]`` (JSON the grammar forces), as it
    grows, and says what can be sent: a call's id and name once its name is complete, then the text of its
    arguments as it comes (vLLM streams required calls this way). Arguments written before the name wait for it.

    `feed(text)` returns the `tool_calls` delta entries of the new text (at most one per call); `calls()` the calls
    complete so far, with the same ids and the arguments as written.
    """

    def __init__(self, short_ids: bool = False) -> None:
        self._short_ids = short_ids  # (`call_id`'s)
        self._depth = 0
        self._in_str = self._esc = False
        self._after_colon = False  # in a call object, between a key's ':' and the end of its value
        self._key: str | None = None
        self._str: list[str] = []  # a string at the call object's level (a key, or a value) as written
        self._calls: list[_StreamedCall] = []
        self._complete = 0  # how many call objects are closed
        self.closed = False  # the list itself is closed: the output is whole (not cut short by max_tokens)

    def feed(self, text: str) -> list[dict[str, Any]]:
        first = max(len(self._calls) - 1, 0)  # the earlier calls were sent whole
        for ch in text:
            self._step(ch)
        return [d for c in self._calls[first:] if (d := self._delta(c)) is not None]

    def result(self) -> list[dict[str, Any]] | None:
        """The calls of a whole list (None while it is not closed, or if it holds none)."""
        calls = self.calls()
        return calls if self.closed and calls else None

    def calls(self) -> list[dict[str, Any]]:
        return self._entries(self._calls[: self._complete])

    def begun(self) -> list[dict[str, Any]]:
        """The calls whose name is written (the last may be incomplete): what a stream of the output sent."""
        return self._entries([c for c in self._calls if c.name is not None])

    @staticmethod
    def _entries(calls: list[_StreamedCall]) -> list[dict[str, Any]]:
        return [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": "".join(c.args)}}
            for c in calls
        ]

    @staticmethod
    def _delta(call: _StreamedCall) -> dict[str, Any] | None:
        if call.name is None:
            return None
        new = "".join(call.args[call.sent :])
        call.sent = len(call.args)
        if not call.announced:
            call.announced = True
            fn = {"name": call.name, "arguments": new}
            return {"index": call.index, "id": call.id, "type": "function", "function": fn}
        return {"index": call.index, "function": {"arguments": new}} if new else None

    def _step(self, ch: str) -> None:
        d = self._depth
        in_args = d >= 2 and self._after_colon and self._key == "parameters"
        if in_args and not (d == 2 and not self._in_str and ch in ",}"):  # not the end of the value
            self._calls[-1].args.append(ch)
        if self._in_str:
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
                if d == 2:
                    self._end_string()
                return
            if d == 2:
                self._str.append(ch)
        elif ch == '"':
            self._in_str, self._str = True, []
        elif ch in "{[":
            self._depth += 1
            if d == 1 and ch == "{":
                self._calls.append(_StreamedCall(len(self._calls), call_id(self._short_ids)))
        elif ch in "}]":
            self._depth -= 1
            if d == 2:
                self._complete += 1
                self._after_colon, self._key = False, None
            elif d == 1:
                self.closed = True
        elif d == 2 and ch == ":":
            self._after_colon = True
        elif d == 2 and ch == ",":
            self._after_colon, self._key = False, None

    def _end_string(self) -> None:
        raw = "".join(self._str)
        try:
            value = json.loads(f'"{raw}"')
        except ValueError:
            value = raw
        if not self._after_colon:
            self._key = value
        elif self._key == "name":
            self._calls[-1].name = value


def tool_plan(body: ChatCompletionRequest, parser: ToolParser | None = None) -> ToolPlan:
    """The body's tools and tool_choice, checked (422 naming the field). A forced call excludes other output
    constraints: the route checks that beside response_format and structured_outputs."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(422, "tool_choice needs tools", code="invalid_value", param="tool_choice")
        return ToolPlan()
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(422, "tool names must be unique", code="invalid_value", param="tools")
    for t in tools:
        params = t["function"].get("parameters")
        if params is not None and params.get("type", "object") != "object":
            raise APIError(
                422, "a function's parameters must be a JSON schema of an object", code="invalid_value",
                param="tools",
            )  # fmt: skip
    plan = ToolPlan(tools=tools, parallel=body.parallel_tool_calls is not False)
    if parser is not None:
        plan.parser = parser
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise APIError(
                422, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                code="invalid_value", param="tool_choice",
            )  # fmt: skip
        plan.mode, plan.named = "named", choice.function.name
    else:
        plan.mode = choice or "auto"
    return plan


def template_messages(messages: list[ChatMessage], short_ids: bool = False) -> list[dict[str, Any]]:
    """Chat messages for the template: role and text content with earlier turns' tool calls (arguments as objects,
    as transformers' templates take them) and tool results' ids (`short_ids`: as `template_call_id` makes them)."""
    out = []
    for m, t in zip(messages, chat_messages(messages), strict=True):
        msg: dict[str, Any] = dict(t)
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": template_call_id(c.id, short_ids), "type": "function", "function": {"name": c.function.name, "arguments": _args(c.function.arguments)}}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.tool_call_id is not None:
            msg["tool_call_id"] = template_call_id(m.tool_call_id, short_ids)
        if m.name is not None:  # (a participant's name on any turn, as vLLM passes it)
            msg["name"] = m.name
        thinking = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if thinking is not None and m.role == "assistant":
            # a reasoning model's earlier thinking: its template decides whether the prompt shows it (Qwen3 keeps
            # it inside a tool-call chain), under either name templates read
            msg["reasoning_content"] = msg["reasoning"] = thinking
        out.append(msg)
    return out


def _args(text: str) -> Any:
    """A call's arguments as the template takes them: an object (none given, "" or null: `{}`, as vLLM renders it;
    a template would otherwise write `"arguments": }` or `""`), else the text as it was sent."""
    if not text.strip():
        return {}
    try:
        args = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return {} if args is None else args
