"""OpenAI function calling on /v1/chat/completions (vLLM's semantics).

`tools` go to the chat template (`apply_chat_template(tools=...)`: a template that knows tools describes them to the
model; one that does not, SmolLM2's included, ignores them). `tool_choice` decides what comes back:

- a named function: the output is forced, by structured outputs, to be that function's arguments (its `parameters`
  JSON schema); the message is that one call, `finish_reason` "stop" (OpenAI's, for a forced call);
- "required": the output is forced to be a JSON list of one or more `{"name", "parameters"}` of the given tools (at
  most one with `parallel_tool_calls: false`); the message is those calls, `finish_reason` "tool_calls";
- "auto" (the default with tools): free text; calls the model writes in its format (`server.api.tool_parsers`:
  Hermes `<tool_call>` blocks, Llama 3 JSON, Mistral `[TOOL_CALLS]`, pythonic lists; the setting `tool_call_parser`,
  detected from the chat template by default) become `tool_calls`, the rest stays `content`;
- "none": free text.

Streaming: a named call's arguments stream as `tool_calls` deltas; "auto" streams the text until where a call could
start (the parser's `hold_from`: a `<tool_call>` tag or its first characters; for the formats that are the whole
output, an output that begins like one) and sends the calls in one delta at the end; "required" sends its calls at
the end.

A forced call is valid JSON for its schema, not necessarily a good call: the model should also be told about the
tools (a template with tool support, or the caller's own system message).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.api.errors import APIError
from server.api.schemas import ChatCompletionRequest, NamedToolChoice
from server.api.tool_parsers import ToolParser, get_parser
from server.engine import StructuredOutputs


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}


@dataclass
class ToolPlan:
    """What a chat body's tools ask for: the mode, the tools for the template, the schema a forced call follows."""

    mode: str = "none"  # none | auto | named | required
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool objects, for the chat template
    named: str | None = None
    parallel: bool = True
    parser: ToolParser = field(default_factory=lambda: get_parser("hermes"))  # how "auto" finds calls

    @property
    def forced(self) -> bool:
        return self.mode in ("named", "required")

    def structured(self) -> StructuredOutputs | None:
        """The constraint of a forced call (vLLM's: the parameters schema, or a list of name + parameters), as
        compact JSON (no whitespace between tokens: a small model sampling at temperature 1 would spend its
        max_tokens on blank space)."""
        if not self.forced:
            return None
        params = {
            t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools
        }
        if self.mode == "named":
            assert self.named is not None
            return StructuredOutputs("json", json.dumps(params[self.named]), any_whitespace=False)
        one_of = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in params.items()
        ]
        calls: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
        if not self.parallel:
            calls["maxItems"] = 1
        return StructuredOutputs("json", json.dumps(calls), any_whitespace=False)

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of a finished output."""
        if self.mode == "named":
            assert self.named is not None
            return None, [_call(self.named, text)]
        if self.mode == "required":
            try:
                calls = json.loads(text)
            except ValueError:  # cut short by max_tokens: not a complete list
                return text, None
            return None, [_call(c["name"], c["parameters"]) for c in calls]
        if self.mode == "auto":
            outside, calls = self.split_calls(text)
            if calls:
                return outside.strip() or None, calls
        return text, None

    def split_calls(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """("auto") The text outside the calls the parser finds (of known tools), and the calls."""
        outside, calls = self.parser.split(text, {t["function"]["name"] for t in self.tools})
        return outside, [_call(name, args) for name, args in calls]

    def finish_reason(self, engine_reason: str | None, calls: list[dict[str, Any]] | None) -> str:
        if calls and self.mode != "named":
            return "tool_calls"
        return engine_reason or "stop"


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


def template_messages(body: ChatCompletionRequest, texts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for the template: `texts` (role + content) with earlier turns' tool calls (arguments as objects,
    as transformers' templates take them) and tool results' ids."""
    out = []
    for m, t in zip(body.messages, texts, strict=True):
        msg = dict(t)
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _args(c.function.arguments)}}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            msg["name"] = m.name
        out.append(msg)
    return out


def _args(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
