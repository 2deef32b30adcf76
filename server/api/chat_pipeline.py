"""The chat pipeline: what a chat completion asks of the engine and how its choices stream, shared by the routes
that run chat (/v1/chat/completions, the Responses API's /v1/responses, Anthropic's /v1/messages) and, for the
engine requests' start, /v1/completions.

`chat_plan` renders a chat body's prompt (template, tools, truncation) into a `Plan`; `start_choices` turns a plan
into started engine requests (`Choices`: sampling, structured outputs, the reasoning parser, beams, limits), its
errors as OpenAI gives them (`as_openai_error`); `chat_stream` yields a chat choice's deltas (content, tool calls,
thinking) as they come, which each route frames its own way (chat chunks, Responses events, Anthropic events).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

from server.api.auth import Principal
from server.api.beam import MAX_BEAM_WIDTH, BeamParams
from server.api.chat_template import render_chat
from server.api.deps import get_info, get_service
from server.api.errors import APIError, field_name
from server.api.logprobs import TokenTexts, chat_logprobs
from server.api.model_ids import hinted, model_not_found, parse_model, served_names
from server.api.reasoning import ReasoningStream
from server.api.run import ClientDisconnected, GenerationResult, GenerationRun, race_disconnect
from server.api.schemas import ChatCompletionRequest, OpenAIBase
from server.api.service import Service, truncate_prompt
from server.api.streaming import DISCONNECTED, chunked_events, decode_ids, usage
from server.api.tools import CallListStream, ToolPlan, template_messages, tool_plan
from server.engine.token_bytes import TokenIdTexts
from server.engine.types import StructuredOutputs, ThinkingBudget


@dataclass
class Plan:
    """What a chat or completion body asks of the engine, before sampling parameters."""

    prompts: list[list[int]]
    max_tokens: int
    logprobs: int | None
    logprobs_param: str
    echo: list[tuple[str, list[int]]] | None = None  # completions with echo: each prompt's text and token ids
    hide_output: bool = False  # echo with max_tokens 0
    tools: ToolPlan = field(default_factory=ToolPlan)  # chat: function calling
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs (not echo's)
    chat_echo: str = ""  # chat with echo: the last (assistant) message's text, which the content starts with
    max_tokens_param: str = "max_tokens"  # the field max_tokens came from (`RequestInfo.max_tokens_param`)
    # vLLM's return_tokens_as_token_ids: logprobs' tokens spelled `token_id:N`
    token_ids_as_text: bool = False
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and token_ids beside the text


@dataclass
class Choices:
    """The engine requests behind one OpenAI call: choice i is `runs[i]` (prompt i // n, sample i % n)."""

    svc: Service
    runs: list[GenerationRun]
    plan: Plan
    model: str
    created: int
    n: int = 1
    completion_tokens: int = 0  # set once every choice has finished (`collect`, `finish_stream`)
    cached_tokens: int = 0  # of the prompt tokens, taken from the prompt cache (likewise)

    @property
    def text(self) -> TokenTexts:
        """How the choices' log-probabilities spell their tokens."""
        return TokenIdTexts(self.svc.token_text) if self.plan.token_ids_as_text else self.svc.token_text

    def token_ids(self, index: int, prompt: bool = True, output: bool = True) -> dict[str, Any]:
        """Choice `index`'s prompt and output token ids (vLLM's return_token_ids), if asked for."""
        if not self.plan.return_token_ids:
            return {}
        run = self.runs[index]
        out: dict[str, Any] = {}
        if prompt:
            out["prompt_token_ids"] = list(run.req.prompt_token_ids)
        if output:
            out["token_ids"] = [] if self.plan.hide_output else list(run.token_ids)
        return out

    @property
    def prompt_tokens(self) -> int:
        """Over the distinct prompts, as OpenAI counts them."""
        return sum(len(ids) for ids in self.plan.prompts)

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def _account(self) -> None:
        """Completion tokens of all choices (none shown with echo and max_tokens 0), also for the request's log line
        (one RequestInfo shared by the runs); cached prompt tokens per distinct prompt (its samples share one
        prefill: the sample that computed it took the fewest from the cache)."""
        finals = [r.final for r in self.runs]
        self.completion_tokens = 0 if self.plan.hide_output else sum(f.completion_tokens for f in finals if f)
        self.cached_tokens = sum(
            min(f.cached_tokens if f else 0 for f in finals[p * self.n : (p + 1) * self.n])
            for p in range(len(self.plan.prompts))
        )
        info = self.runs[0].info
        info.prompt_tokens, info.completion_tokens = self.prompt_tokens, self.completion_tokens

    def finish_stream(self) -> None:
        self._account()

    def echoed(self, index: int) -> tuple[str, list[int]] | None:
        return None if self.plan.echo is None else self.plan.echo[index // self.n]

    async def collect(self, request: Request) -> list[GenerationResult] | Response:
        """Every choice's result, or 499 if the client left first; the runs are closed either way."""
        try:
            results = await race_disconnect(
                request.receive, asyncio.gather(*(r.collect() for r in self.runs))
            )
        except ClientDisconnected:
            return Response(status_code=DISCONNECTED)
        finally:
            for r in self.runs:
                await r.close()
        self._account()
        return results

    async def drain(self, request: Request, events: Callable[[], Awaitable[None]]) -> Response | None:
        """An unstreamed answer built from a stream's events (`events()`, its frames not sent: the Responses and
        Anthropic routes), racing the client's disconnect: 499 if it left first, else None; the runs are closed
        either way."""
        try:
            await race_disconnect(request.receive, events())
        except ClientDisconnected:
            return Response(status_code=DISCONNECTED)
        finally:
            for r in self.runs:
                await r.close()
        return None


def _chat_fit(svc: Service, prefix_len: int, max_tokens: int | None, n: int) -> int:
    """The most prompt tokens a chat keeps when it truncates (`truncate_prompt_tokens: -1`, the Responses API's
    truncation "auto"): room for the output asked for; without max_tokens, all of a prompt that fits, else half the
    room (at most max_new_tokens) for the output."""
    if max_tokens is None:
        whole = svc.prompt_fit(prefix_len, 1)
        if n <= whole:
            return whole
        max_tokens = min(svc.settings.max_new_tokens, svc.llm.room(prefix_len, 0) // 2)
    return svc.prompt_fit(prefix_len, max_tokens)


async def _drop_turns(
    svc: Service,
    body: ChatCompletionRequest,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    fit: int,
    ids: list[int],
    param: str,
) -> list[int]:
    """The prompt of the fewest oldest turns dropped (the leading system messages and the last turn kept) that fits
    in `fit` tokens, found by bisection; the last turn alone if none does (then too long: refused as such). `param`:
    the request's field the messages came from."""
    head = next(
        (i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")), len(messages)
    )
    if head >= len(messages) - 1:  # no turn to drop
        return ids
    # keep messages[:head] + messages[k:], k from head (all) to the last alone
    lo, hi = head, len(messages) - 1
    best = None
    while lo <= hi:
        k = (lo + hi) // 2
        got = await render_chat(svc, body, messages[:head] + messages[k:], tools, param) if k > head else ids
        if len(got) <= fit:
            best, hi = got, k - 1
        else:
            lo = k + 1
    if best is None:
        best = await render_chat(svc, body, messages[:head] + messages[-1:], tools, param)
    return best


async def chat_plan(svc: Service, info: Any, body: ChatCompletionRequest, prefix: Any) -> Plan:
    """What a chat body asks of the engine. Errors name the fields the route set on `info` (`prompt_param`,
    `max_tokens_param`: the chat route's `chat_params`, the Responses and Messages routes' own)."""
    tools = tool_plan(body, svc.tool_parser)
    messages = template_messages(body.messages, svc.tool_parser.short_ids)
    if svc.settings.log_prompts:
        info.prompt = "\n".join(m["content"] for m in messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    ids = await render_chat(svc, body, messages, tools.tools, info.prompt_param)
    fit = _chat_fit(svc, prefix.prefix_length, max_tokens, len(ids))
    if body._drop_turns and len(ids) > fit:
        ids = await _drop_turns(svc, body, messages, tools.tools, fit, ids, info.prompt_param)
    ids = truncate_prompt(ids, body.truncate_prompt_tokens, fit)
    if max_tokens is None:  # OpenAI: up to the context; here also capped by max_new_tokens
        room = svc.llm.room(prefix.prefix_length, len(ids))
        max_tokens = max(1, min(svc.settings.max_new_tokens, room))
        info.max_tokens_given = False
    if body.top_logprobs and not body.logprobs:
        raise APIError(
            422, "top_logprobs needs logprobs to be true", code="invalid_value", param="top_logprobs"
        )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    echo = messages[-1]["content"] if body.echo and messages[-1]["role"] == "assistant" else ""
    return Plan(
        [ids],
        max_tokens,
        logprobs,
        "top_logprobs",
        tools=tools,
        max_tokens_param=info.max_tokens_param,
        chat_echo=echo,
    )


# prompt tokens a reasoning parser reads for the thinking's state: a generation prompt's (`<|im_start|>assistant\n
# <think>\n`), not earlier turns' (whose thinking a template may show); a continued assistant message's whole text
PROMPT_TAIL, PROMPT_TAIL_CONTINUED = 16, 1024


# what makes a route's plan: (service, its RequestInfo, its body, the resolved prefix) -> Plan
PlanBuilder = Callable[[Service, Any, Any, Any], Awaitable[Plan]]


async def start_choices(
    request: Request, principal: Principal, body: OpenAIBase, build_plan: PlanBuilder
) -> Choices:
    """The engine requests of a completion or chat body, started: `build_plan` makes its plan (`chat_plan` for a chat
    body, the Responses and Messages routes' included; the completions route's own), then sampling, structured
    outputs, the reasoning parser, beams and limits as every such route has them. Errors as OpenAI gives them
    (`as_openai_error`)."""
    chat = isinstance(body, ChatCompletionRequest)
    svc = get_service(request)
    info = get_info(request)
    if body.stream_options is not None and not body.stream:
        # as OpenAI and vLLM: usage chunks of a response that is not streamed is a mistake, not a no-op
        raise APIError(
            422,
            "stream_options is only allowed when stream is true",
            code="invalid_value",
            param="stream_options",
        )
    if body.prompt_logprobs is not None and body.stream:  # as vLLM
        raise APIError(
            422,
            "prompt_logprobs are not available when stream is true",
            code="invalid_value",
            param="prompt_logprobs",
        )
    for legacy, instead in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(body, legacy, None) is not None:
            raise APIError(
                422,
                f"{legacy} (deprecated by OpenAI) is not supported: send {instead}",
                code="unsupported_parameter",
                param=legacy,
            )
    tenant, name, version = parse_model(body.model, principal, served_names(request, svc))
    info.tenant, info.prefix = tenant, name
    hint = hinted(principal, body.model, svc.served_names)  # (a 404's base-model hint)
    priority = svc.check_priority(principal, body.priority)
    try:
        prefix = await svc.resolve(tenant, name, version, param="model")
    except APIError as e:
        raise as_openai_error(e, body.model, hint) from None
    info.version = prefix.version
    try:  # (a prompt refused as too long before it is tokenized: OpenAI's 400 too)
        plan = await build_plan(svc, info, body, prefix)
    except APIError as e:
        raise as_openai_error(e, body.model, hint) from None
    plan.prompt_logprobs = body.prompt_logprobs
    plan.token_ids_as_text = bool(body.return_tokens_as_token_ids)
    plan.return_token_ids = bool(body.return_token_ids)
    try:
        so = body.structured_param()
    except ValueError as e:
        param = str(e).partition(":")[0] if str(e).startswith("guided_") else "structured_outputs"
        raise APIError(422, str(e), param=param) from None
    forced = plan.tools.structured()
    if forced is not None:  # tool_choice named or required: the only constraint on the output
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(422, "give tool_choice or response_format, not both", param="response_format")
        if so is not None:
            raise APIError(
                422, "give tool_choice or structured_outputs, not both", param="structured_outputs"
            )
    beam = _beam_params(body, plan, so is not None or forced is not None)
    think = None
    if chat and svc.reasoning is not None:
        assert isinstance(body, ChatCompletionRequest)
        tools = plan.tools
        tools.reasoning, tools.show_reasoning = svc.reasoning, body.include_reasoning
        # where the output starts: the generation prompt's last tokens (a template that opens the thinking, or
        # closes it empty), or a continued assistant message's text
        tail = plan.prompts[0][-(PROMPT_TAIL_CONTINUED if body.continue_final_message else PROMPT_TAIL) :]
        tools.opened = svc.reasoning.prompt_opened(await svc.tokenize(decode_ids, svc.bundle.tokenizer, tail))
        if tools.opened is None and body.continue_final_message:
            tools.opened = False  # a continued assistant turn without thinking tags: its answer goes on
        # a structured output's grammar lets the model think first (vLLM applies it once the reasoning ends)
        think = svc.reasoning.think_mode(tools.opened)
    structured: StructuredOutputs | None
    if forced is not None:
        # (the grammar is made of the tools' parameters: a schema that does not compile is an error of `tools`)
        structured = await svc.compile_spec(replace(forced, think=think), "tools")
    else:
        structured = await svc.structured(
            so,
            body.response_format,
            body.guided_whitespace_pattern == "",
            think=think,
            guided=so is not None and body.structured_outputs is None,  # (made from the guided_* fields)
        )
    sampling = svc.sampling(
        max_tokens=plan.max_tokens,
        max_tokens_param=plan.max_tokens_param,
        temperature=svc.openai_default("temperature", body.temperature, 1.0),
        top_p=svc.openai_default("top_p", body.top_p, 1.0),
        top_k=svc.openai_default("top_k", body.top_k, 0),
        min_p=svc.openai_default("min_p", body.min_p, 0.0),
        typical_p=body.typical_p or 1.0,
        seed=body.seed,
        stop=body.stop,
        include_stop_str_in_output=body.include_stop_str_in_output,
        # (a parser whose marker is a special token reads it in the text: vLLM's mistral parser does the same)
        skip_special_tokens=body.skip_special_tokens
        and not (plan.tools.mode == "auto" and plan.tools.parser.marker_is_special),
        spaces_between_special_tokens=body.spaces_between_special_tokens,
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=svc.openai_default("repetition_penalty", body.repetition_penalty, 1.0),
        logprobs=plan.logprobs,
        logprobs_param=plan.logprobs_param,
        prompt_logprobs=_engine_prompt_logprobs(plan),
        logit_bias=body.logit_bias,
        allowed_token_ids=body.allowed_token_ids,
        min_tokens=body.min_tokens or 0,
        stop_token_ids=body.stop_token_ids,
        structured=structured,
        bad_words_token_ids=await svc.bad_words(body.bad_words),
    )
    budgets = await _thinking_budgets(svc, body, plan, chat)
    n = body.n or 1
    # more than the tenant may run, or than the engine takes (a full batch and queue), can never be accepted: not
    # a 503 to retry
    tenant_most, server_most = svc.max_concurrent(prefix.tenant_id), svc.llm.capacity
    most, who = (
        min(tenant_most, server_most),
        "the tenant may run" if tenant_most <= server_most else "the server takes",
    )
    if n * len(plan.prompts) > most:
        raise APIError(
            422,
            f"n x prompts = {n * len(plan.prompts)} exceeds the {most} requests {who} at once",
            code="too_many_choices",
            param="n",
        )
    svc.check_logprob_entries(
        _logprob_entries(plan, n), plan.logprobs_param if plan.logprobs is not None else "prompt_logprobs"
    )
    # sample j of a prompt draws from seed + j: the choices differ, and each is reproducible
    per_prompt = [sampling if b is None else replace(sampling, thinking_budget=b) for b in budgets]
    jobs = [
        (ids, sp if sp.seed is None else replace(sp, seed=sp.seed + j))
        for ids, sp in zip(plan.prompts, per_prompt, strict=True)
        for j in range(n)
    ]
    try:
        # echo with max_tokens 0: the one token run to score the prompt is not the caller's
        runs = await svc.generate_many(
            info,
            prefix,
            jobs,
            stream=body.stream,
            receive=request.receive,
            priority=priority,
            bill_output=not plan.hide_output,
            beam=beam,
        )
    except APIError as e:
        raise as_openai_error(e, body.model, hint) from None
    return Choices(svc, runs, plan, body.model, int(time.time()), n)


async def _thinking_budgets(
    svc: Service, body: OpenAIBase, plan: Plan, chat: bool
) -> list[ThinkingBudget | None]:
    """vLLM's thinking_token_budget, one per prompt: where its output starts (inside a thinking or not) is what the
    reasoning parser reads at the prompt's end (a chat's was read already)."""
    tokens = body.thinking_token_budget
    if tokens is None:
        return [None] * len(plan.prompts)
    if svc.reasoning is None:
        raise APIError(
            422,
            "thinking_token_budget needs a reasoning model's parser (the server's --reasoning-parser): without one "
            "the thinking's tags are not known",
            code="unsupported_parameter",
            param="thinking_token_budget",
        )
    if chat:
        opened = [plan.tools.opened]
    else:
        tok = svc.bundle.tokenizer
        opened = [
            svc.reasoning.prompt_opened(await svc.tokenize(decode_ids, tok, ids[-PROMPT_TAIL:]))
            for ids in plan.prompts
        ]
    # the thinking a prompt wrote itself (a completion's text, a continued assistant message) counts, as vLLM's;
    # not a generation prompt's (its template's `<think>\n`)
    counted = not chat or bool(getattr(body, "continue_final_message", False))
    return [
        await svc.thinking_budget(tokens, o, ids if counted and o else None)
        for ids, o in zip(plan.prompts, opened, strict=True)
    ]


# what beam search does not do (vLLM ignores most of them; here they are refused rather than dropped without a word)
_NOT_WITH_BEAMS = (
    "stop",
    "stop_token_ids",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "prompt_logprobs",
)


def _beam_params(body: OpenAIBase, plan: Plan, structured: bool) -> BeamParams | None:
    """vLLM's use_beam_search (n beams) and length_penalty, checked against what beam search cannot honour."""
    if not body.use_beam_search:
        if body.length_penalty not in (None, 1.0):
            raise APIError(
                422, "length_penalty applies to beam search only (use_beam_search)", param="length_penalty"
            )
        return None
    for name in _NOT_WITH_BEAMS:
        value = getattr(body, name, None)
        if value not in (None, [], {}, "", 0, 0.0) and not (name == "repetition_penalty" and value == 1.0):
            raise APIError(422, f"{name} is not supported with use_beam_search", param=name)
    if structured or (body.response_format is not None and body.response_format.type != "text"):
        raise APIError(
            422,
            "structured outputs and forced tool calls are not supported with use_beam_search",
            param="use_beam_search",
        )
    if plan.echo is not None:
        raise APIError(422, "echo is not supported with use_beam_search", param="echo")
    if body.thinking_token_budget is not None:
        raise APIError(
            422, "thinking_token_budget is not supported with use_beam_search", param="thinking_token_budget"
        )
    n = body.n or 1
    if n > MAX_BEAM_WIDTH:
        raise APIError(
            422, f"with use_beam_search, n (the beam width) is at most {MAX_BEAM_WIDTH}", param="n"
        )
    return BeamParams(n, 1.0 if body.length_penalty is None else body.length_penalty)


# the server's "too long" answers (413 on its own routes) that OpenAI gives as a 400 `context_length_exceeded`
_CONTEXT_CODES = frozenset({"prompt_too_long", "context_length_exceeded"})


def _logprob_entries(plan: Plan, n: int) -> int:
    """Log-probability entries the answer would hold at most: each choice's tokens (and, with echo, its prompt's)
    with their alternatives, and each prompt's prompt_logprobs."""
    total = 0
    for ids in plan.prompts:
        if plan.logprobs is not None:
            shown = (0 if plan.hide_output else plan.max_tokens) + (len(ids) if plan.echo is not None else 0)
            total += n * shown * (plan.logprobs + 1)
        if plan.prompt_logprobs is not None:
            total += len(ids) * (plan.prompt_logprobs + 1)
    return total


def _engine_prompt_logprobs(plan: Plan) -> int | None:
    """The alternatives per prompt token the engine reports: for echo with logprobs and for prompt_logprobs, the
    more of the two (each answer takes its own number)."""
    asked = [
        k for k in (plan.logprobs if plan.echo is not None else None, plan.prompt_logprobs) if k is not None
    ]
    return max(asked) if asked else None


def as_openai_error(e: APIError, model: str, served: tuple[str, ...] = ()) -> APIError:
    """A request too long for the context or the prompt limit, as OpenAI and vLLM answer it: 400
    `context_length_exceeded` with "maximum context length" in its message. That is what clients look for to trim a
    conversation or fall back to a longer-context model (LangChain's context-overflow error, LiteLLM's
    ContextWindowExceededError); a 413 reaches them as a generic status error. A prefix gone between the lookup and
    its first step is an unknown model, as any other."""
    if e.status == 404 and e.code == "prefix_not_found":
        return model_not_found(model, served)
    if e.status != 413 or e.code not in _CONTEXT_CODES:
        return e
    message = e.message
    if e.code == "prompt_too_long":
        asked = field_name(e.param or "prompt")  # (the route's own field: its message names no other's)
        message = f"This model's maximum context length for the {asked} is set by this server: {e.message}"
    elif "maximum context length" not in message:  # the engine's KV-cache budget
        message = f"This request exceeds the maximum context length this server can hold: {e.message}"
    return APIError(400, message, code="context_length_exceeded", param=e.param, headers=e.headers)


def rename_format(e: APIError, field: str) -> bool:
    """A chat error about its `response_format` in the words of a route that takes the JSON-schema format as
    `field` (Responses' `text.format`, Messages' `output_config.format`), whose format has no `json_schema` wrapper:
    its param and the field names in its message. A schema that does not compile is "invalid <param>: <the
    compiler's words>": only the part before the colon is ours to rename (the compiler's words may quote the user's
    schema). False (nothing changed) for an error about another field."""
    if e.param is None or not e.param.startswith("response_format"):
        return False
    ours, colon, theirs = e.message, "", ""
    if e.code == "invalid_structured_output":
        ours, colon, theirs = e.message.partition(": ")
    for name in ("name", "schema", "strict", "description"):
        ours = ours.replace(f"json_schema.{name}", name)
    e.message = ours.replace("response_format", field) + colon + theirs
    e.param = field + e.param.removeprefix("response_format").removeprefix(".json_schema")
    return True


# what `chunk` makes of a delta: one SSE frame of a choice (bytes), or a route's own values
FrameT = TypeVar("FrameT")
Chunk = Callable[..., FrameT]  # (delta, finish_reason, logprobs=None) -> FrameT


def chat_stream(
    run: GenerationRun, chunk: Chunk[FrameT], text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[FrameT]:
    """A chat choice as `chunk(delta, finish_reason, logprobs)` values: the role's delta first, then the content or
    tool call deltas as they come, then the finish reason (the same for the Responses API's events)."""
    stream = {"named": _stream_named, "required": _stream_required, "auto": _stream_auto}.get(
        tools.mode, _stream_text
    )
    return stream(run, chunk, text, tools)


async def _stream_text(
    run: GenerationRun, chunk: Chunk[FrameT], text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[FrameT]:
    first = {"role": "assistant", "content": ""}
    pieces = _stream_pieces(
        run, chunk, text, first, lambda piece: {"content": piece}, tools.thinking(), tools.show_reasoning
    )
    async for frame in pieces:
        yield frame


async def _stream_named(
    run: GenerationRun, chunk: Chunk[FrameT], text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[FrameT]:
    """A forced named call: its arguments stream as they come (OpenAI's tool_calls deltas); with a reasoning parser,
    after the thinking, the call announced with its first arguments."""
    assert tools.named is not None
    call = {
        "index": 0,
        "id": tools.new_id(),
        "type": "function",
        "function": {"name": tools.named, "arguments": ""},
    }
    thinking = tools.thinking()
    first: dict[str, Any] = {"role": "assistant", "content": None}
    if thinking is None:
        first["tool_calls"] = [call]
    announced = started = thinking is None

    def piece(args: str) -> dict[str, Any] | None:
        nonlocal announced, started
        if not started:  # (the blank line a reasoning model writes after its thinking is not arguments)
            args = args.lstrip()
            if not args:
                return None
            started = True
        if not announced:
            announced = True
            return {"tool_calls": [{**call, "function": {"name": tools.named, "arguments": args}}]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": args}}]}

    async for frame in _stream_pieces(run, chunk, text, first, piece, thinking, tools.show_reasoning):
        yield frame


def _thinking_delta(thought: str) -> dict[str, Any]:
    """A thinking piece's delta, by both of vLLM's names (its current `reasoning`, its earlier `reasoning_content`)."""
    return {"reasoning": thought, "reasoning_content": thought}


async def _stream_pieces(
    run: GenerationRun,
    chunk: Chunk[FrameT],
    text: TokenTexts,
    first: dict[str, Any],
    delta: Callable[[str], dict[str, Any] | None],
    thinking: ReasoningStream | None = None,
    shown: bool = True,
) -> AsyncIterator[FrameT]:
    """The `first` delta, then `delta(text piece)` as the text comes (the thinking first as `reasoning` deltas, with
    a reasoning parser, unless not `shown`: its tokens' logprobs then go with the next chunk), then the finish
    reason."""
    yield chunk(first, None)
    pending = _PendingLogprobs(run, text)  # (tokens of text held back go with the chunk it comes in)
    async for ev, _ids, lps in chunked_events(run):
        pending.items.extend(lps or [])
        thought, answer = ("", ev.text) if thinking is None else thinking.feed(ev.text, final=ev.finished)
        if thought and shown:
            yield chunk(_thinking_delta(thought), None, pending.take())
        if answer and (d := delta(answer)) is not None:  # (None: nothing to send yet)
            yield chunk(d, None, pending.take())
        if ev.finished:  # (its tokens all sent: OpenAI's null)
            yield chunk({}, ev.finish_reason, pending.take())


class _PendingLogprobs:
    """A chat stream's logprobs of the tokens not sent with a chunk yet (None throughout when not asked for)."""

    def __init__(self, run: GenerationRun, text: TokenTexts) -> None:
        self.want = run.req.sampling.logprobs is not None
        self.text = text
        self.items: list[Any] = []

    def take(self) -> Any:
        """The pending tokens' logprobs for a chunk; None when not asked for or there are none (OpenAI's null)."""
        out, self.items = (chat_logprobs(self.items, self.text) if self.want and self.items else None), []
        return out


async def _stream_required(
    run: GenerationRun, chunk: Chunk[FrameT], text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[FrameT]:
    """'required': each call's id and name as soon as its name is written, then its arguments as they come (the
    output is a JSON list the grammar forces: `CallListStream` follows it). A list cut short by max_tokens ends
    with what was sent and finish_reason "length"."""
    yield chunk({"role": "assistant", "content": None}, None)
    calls = CallListStream(tools.short_ids)
    thinking = tools.thinking()
    pending = _PendingLogprobs(run, text)
    async for ev, _ids, lps in chunked_events(run):
        pending.items.extend(lps or [])
        thought, answer = ("", ev.text) if thinking is None else thinking.feed(ev.text, final=ev.finished)
        if thought and tools.show_reasoning:
            yield chunk(_thinking_delta(thought), None, pending.take())
        deltas = calls.feed(answer)
        if deltas:
            yield chunk({"tool_calls": deltas}, None, pending.take())
        if ev.finished:
            yield chunk({}, tools.finish_reason(ev.finish_reason, calls.result()), pending.take())


async def _stream_auto(
    run: GenerationRun, chunk: Chunk[FrameT], text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[FrameT]:
    """'auto': the text as soon as it cannot be the start of a call, each call as soon as it is complete
    (`AutoStream`), in output order; a chunk's logprobs are those of the tokens since the previous chunk."""
    yield chunk({"role": "assistant", "content": ""}, None)
    follow = tools.auto_stream()
    thinking = tools.thinking()
    sent: list[dict[str, Any]] = []  # the calls sent
    pending = _PendingLogprobs(run, text)
    async for ev, _ids, lps in chunked_events(run):
        pending.items.extend(lps or [])
        thought, answer = ("", ev.text) if thinking is None else thinking.feed(ev.text, final=ev.finished)
        if thought and tools.show_reasoning:
            yield chunk(_thinking_delta(thought), None, pending.take())
        for kind, group in itertools.groupby(follow.feed(answer, final=ev.finished), key=lambda it: it[0]):
            values = [v for _, v in group]
            if kind == "content":
                yield chunk({"content": "".join(values)}, None, pending.take())
            else:
                if not tools.parallel:  # only the first call (`ToolPlan.parse` does the same)
                    values = values[: max(0, 1 - len(sent))]
                    if not values:
                        continue
                calls = [{"index": len(sent) + j, **tools.call(*c)} for j, c in enumerate(values)]
                sent += calls
                yield chunk({"tool_calls": calls}, None, pending.take())
        if ev.finished:
            yield chunk({}, tools.finish_reason(ev.finish_reason, sent), pending.take())
