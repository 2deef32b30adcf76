"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` is `"{tenant_id}/{prefix}"`; `"{tenant_id}"` alone means that tenant's `default` prefix and
`"{tenant_id}/base"` the base model without a prefix. A model naming another tenant answers 404 like an unknown one.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from server.api.auth import Principal, get_principal
from server.api.beam import MAX_BEAM_WIDTH, BeamParams
from server.api.chat_template import render_chat
from server.api.deps import app_state, get_info, get_service, store_call
from server.api.errors import COMMON_ERRORS, APIError, field_name
from server.api.logprobs import (
    TextOffsets,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    vllm_prompt_logprobs,
)
from server.api.model_ids import hinted, model_not_found, parse_model, served_names
from server.api.reasoning import ReasoningStream
from server.api.routes_generate import DISCONNECTED, SSE_DOC, chunked_events, usage
from server.api.schemas import (
    BASE_PREFIX,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIBase,
)
from server.api.service import (
    ClientDisconnected,
    GenerationResult,
    GenerationRun,
    Service,
    prompt_format,
    race_disconnect,
    render_prompt,
    truncate_prompt,
)
from server.api.streaming import EngineEventStream, json_off_loop, merge, sse
from server.api.tools import CallListStream, ToolPlan, template_messages, tool_plan
from server.engine.token_bytes import TokenIdTexts
from server.engine.types import StructuredOutputs, ThinkingBudget

router = APIRouter(prefix="/v1", tags=["openai"])

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class _Plan:
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
class _Choices:
    """The engine requests behind one OpenAI call: choice i is `runs[i]` (prompt i // n, sample i % n)."""

    svc: Service
    runs: list[GenerationRun]
    plan: _Plan
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


def chat_params(body: ChatCompletionRequest) -> tuple[str, str]:
    """The chat route's fields for the prompt and the output's length (`RequestInfo.prompt_param`,
    `max_tokens_param`): max_completion_tokens where it was sent (it wins), else max_tokens."""
    return "messages", "max_completion_tokens" if body.max_completion_tokens else "max_tokens"


async def _chat_plan(svc: Service, info: Any, body: ChatCompletionRequest, prefix: Any) -> _Plan:
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
    return _Plan(
        [ids],
        max_tokens,
        logprobs,
        "top_logprobs",
        tools=tools,
        max_tokens_param=info.max_tokens_param,
        chat_echo=echo,
    )


async def _completion_plan(svc: Service, info: Any, body: CompletionRequest, prefix: Any) -> _Plan:
    tok = svc.bundle.tokenizer
    raw: Any = body.prompt
    items: list[Any] = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)
    if svc.settings.log_prompts:
        info.prompt = "\n".join(str(x) for x in items)
    # text is rendered in the prefix's prompt format (or the one asked for); token ids are used as given
    fmt = prompt_format(body.prompt_format, prefix, tok)
    vocab = svc.bundle.spec.vocab_size
    for j, x in enumerate(items):
        if isinstance(x, str):
            svc.check_prompt_chars(len(x), truncating=body.truncate_prompt_tokens is not None)
        elif any(t >= vocab for t in x):
            raise APIError(
                422,
                f"prompt token ids must be below {vocab} (the model's vocabulary)",
                code="invalid_value",
                param="prompt" if len(items) == 1 else f"prompt[{j}]",
            )
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    fit = svc.prompt_fit(prefix.prefix_length, max_tokens)
    prompts = [
        truncate_prompt(
            await svc.tokenize(render_prompt, tok, x, fmt, body.add_special_tokens)
            if isinstance(x, str)
            else list(x),
            body.truncate_prompt_tokens,
            fit,
        )
        for x in items
    ]
    plan = _Plan(prompts, max(1, max_tokens), body.logprobs, "logprobs", hide_output=max_tokens == 0)
    if body.echo:
        # the prompt as it was used (truncated, if asked to; rendered in the prefix's chat template, if it has
        # one): the text its prompt logprobs' tokens add up to
        as_given = body.truncate_prompt_tokens is None and fmt == "raw"
        plan.echo = [
            (
                x if isinstance(x, str) and as_given else await svc.tokenize(_decode, tok, ids),
                ids,
            )
            for x, ids in zip(items, prompts, strict=True)
        ]
    elif max_tokens == 0:
        raise APIError(422, "max_tokens may be 0 only with echo", code="invalid_value", param="max_tokens")
    return plan


# prompt tokens a reasoning parser reads for the thinking's state: a generation prompt's (`<|im_start|>assistant\n
# <think>\n`), not earlier turns' (whose thinking a template may show); a continued assistant message's whole text
PROMPT_TAIL, PROMPT_TAIL_CONTINUED = 16, 1024


async def _start(request: Request, principal: Principal, body: OpenAIBase, chat: bool) -> _Choices:
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
        raise _as_openai_error(e, body.model, hint) from None
    info.version = prefix.version
    try:  # (a prompt refused as too long before it is tokenized: OpenAI's 400 too)
        if chat:
            assert isinstance(body, ChatCompletionRequest)
            plan = await _chat_plan(svc, info, body, prefix)
        else:
            assert isinstance(body, CompletionRequest)
            plan = await _completion_plan(svc, info, body, prefix)
    except APIError as e:
        raise _as_openai_error(e, body.model, hint) from None
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
        tools.opened = svc.reasoning.prompt_opened(await svc.tokenize(_decode, svc.bundle.tokenizer, tail))
        if tools.opened is None and body.continue_final_message:
            tools.opened = False  # a continued assistant turn without thinking tags: its answer goes on
        # a structured output's grammar lets the model think first (vLLM applies it once the reasoning ends)
        think = svc.reasoning.think_mode(tools.opened)
    structured: StructuredOutputs | None
    if forced is not None:
        structured = await svc.compile_spec(replace(forced, think=think), "tool_choice")
    else:
        structured = await svc.structured(
            so, body.response_format, body.guided_whitespace_pattern == "", think=think
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
        raise _as_openai_error(e, body.model, hint) from None
    return _Choices(svc, runs, plan, body.model, int(time.time()), n)


async def _thinking_budgets(
    svc: Service, body: OpenAIBase, plan: _Plan, chat: bool
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
            svc.reasoning.prompt_opened(await svc.tokenize(_decode, tok, ids[-PROMPT_TAIL:]))
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


def _beam_params(body: OpenAIBase, plan: _Plan, structured: bool) -> BeamParams | None:
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


def _logprob_entries(plan: _Plan, n: int) -> int:
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


def _engine_prompt_logprobs(plan: _Plan) -> int | None:
    """The alternatives per prompt token the engine reports: for echo with logprobs and for prompt_logprobs, the
    more of the two (each answer takes its own number)."""
    asked = [
        k for k in (plan.logprobs if plan.echo is not None else None, plan.prompt_logprobs) if k is not None
    ]
    return max(asked) if asked else None


def _as_openai_error(e: APIError, model: str, served: tuple[str, ...] = ()) -> APIError:
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


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    response_model_exclude_none=False,
    responses={**SSE_DOC, **COMMON_ERRORS},
    summary="OpenAI-compatible text completion",
)
async def completions(
    body: CompletionRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    ch = await _start(request, principal, body, chat=False)
    cid = "cmpl-" + get_info(request).request_id  # (vLLM: X-Request-Id, when given)
    if body.stream:
        return EngineEventStream(ch.runs, lambda: _completion_frames(ch, cid, _usage_mode(body)))
    results = await ch.collect(request)
    if isinstance(results, Response):
        return results
    return await json_off_loop(
        CompletionResponse,
        lambda: {
            "id": cid,
            "object": "text_completion",
            "created": ch.created,
            "model": ch.model,
            "choices": [_completion_choice_body(ch, i, res) for i, res in enumerate(results)],
            "usage": ch.usage(),
            "system_fingerprint": None,
        },
    )


def _echo_part(
    ch: _Choices, index: int, plps: list[Any] | None, offsets: TextOffsets | None
) -> tuple[str, Any]:
    """The echoed prompt of a choice: its text and, when asked for (`offsets`), its log-probabilities (first token
    null)."""
    echoed = ch.echoed(index)
    assert echoed is not None
    text, ids = echoed
    if offsets is None:
        return text, None
    k = ch.plan.logprobs or 0  # the engine may report more alternatives (for prompt_logprobs)
    rest = [replace(lp, top=lp.top[:k]) for lp in (plps or [])[1:] if lp is not None]
    logprobs = completion_logprobs(rest, ch.text, offsets, first_token=ids[0], prompt=True)
    if offsets.chars > len(text):
        # a raw prompt is echoed as given, its tokens' spellings add up to more: a BOS token's ("<s>"), the space
        # that SentencePiece's "▁" stands for before the first word and after each special token. Offsets are
        # found in the echoed text, and the output's start where it does
        logprobs["text_offset"] = _aligned(text, logprobs["tokens"], logprobs["text_offset"], offsets.chars)
        offsets.chars = len(text)
    return text, logprobs


def _aligned(text: str, tokens: list[str], starts: list[int], end: int) -> list[int]:
    """Where `tokens` (spellings, counted from `starts`, the last ending at `end`) stand in `text`: a spelling
    there as it is, or without its leading space, advances; one that is not there (a BOS token's) stands where the
    next one does. A `bytes:` token advances by what it adds."""
    out, at = [], 0
    for i, t in enumerate(tokens):
        out.append(min(at, len(text)))
        if t.startswith("bytes:"):
            at += (starts[i + 1] if i + 1 < len(starts) else end) - starts[i]
        elif text.startswith(t, at):
            at += len(t)
        elif t.startswith(" ") and text.startswith(t[1:], at):
            at += len(t) - 1
    return out


def _pending_tail(ch: _Choices, index: int) -> bytes:
    """The bytes of an echoed prompt that end inside a character (its text shows U+FFFD there); b"" if none."""
    echoed = ch.echoed(index)
    if echoed is None or ch.plan.hide_output:
        return b""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in echoed[1]:
        decoder.decode(ch.text.entry(t)[1])
    return decoder.getstate()[0]


def _echo_then(echo: str, pending: bytes, output: str) -> str:
    """Echo and output as one text: the output's first character completes a prompt that ends inside it (the
    detokenizer gives the whole character to the output), so the echo's U+FFFD for that part is not shown too."""
    if pending and echo.endswith("\ufffd") and output[:1].encode("utf-8").startswith(pending):
        echo = echo[:-1]
    return echo + output


def _join_logprobs(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def _completion_choice_body(ch: _Choices, index: int, res: GenerationResult) -> dict[str, Any]:
    skip = ch.runs[index].req.sampling.skip_special_tokens
    offsets = TextOffsets(ch.text, skip) if res.logprobs is not None else None
    text, logprobs = "", None
    if ch.plan.echo is not None:
        text, logprobs = _echo_part(ch, index, res.prompt_logprobs, offsets)
    if not ch.plan.hide_output:
        gen = (
            completion_logprobs(res.logprobs, ch.text, offsets)
            if offsets and res.logprobs is not None
            else None
        )
        text, logprobs = _echo_then(text, _pending_tail(ch, index), res.text), _join_logprobs(logprobs, gen)
    body = {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": res.finish_reason,
        "stop_reason": res.stop_reason,
    }
    return {**body, "prompt_logprobs": _prompt_logprobs(ch, res), **ch.token_ids(index)}


def _prompt_logprobs(ch: _Choices, res: GenerationResult) -> Any:
    k = ch.plan.prompt_logprobs
    return None if k is None else vllm_prompt_logprobs(res.prompt_logprobs, k, ch.svc.token_text)


# stream_options: no usage / a last usage chunk / usage on every chunk
UsageMode = Literal["", "final", "continuous"]


def _usage_mode(body: OpenAIBase) -> UsageMode:
    o = body.stream_options
    if o is None or not o.include_usage:
        return ""
    return "continuous" if o.continuous_usage_stats else "final"


def _chunk_usage(mode: UsageMode, run: GenerationRun, hidden: bool = False) -> dict[str, Any]:
    """The `usage` member of a choice's chunk: none, null (the whole request's comes last), or that choice's so
    far (vLLM's continuous_usage_stats)."""
    if not mode:
        return {}
    if mode == "final":
        return {"usage": None}
    return {"usage": usage(len(run.req.prompt_token_ids), 0 if hidden else run.generated, run.cached_tokens)}


async def _completion_choice(
    ch: _Choices, run: GenerationRun, index: int, head: dict[str, Any], usage_mode: UsageMode
) -> AsyncIterator[bytes]:
    ids = _ChunkTokenIds(run) if ch.plan.return_token_ids else None

    def chunk(text: str, logprobs: Any, finish: str | None) -> bytes:
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop_reason(run, finish),
        }
        if ids is not None:  # (echo with max_tokens 0: the one token generated is not part of the answer)
            choice |= ids.take(hidden=ch.plan.hide_output)
        return sse({**head, "choices": [choice], **_chunk_usage(usage_mode, run, ch.plan.hide_output)})

    sampling = run.req.sampling
    offsets = TextOffsets(ch.text, sampling.skip_special_tokens) if sampling.logprobs is not None else None
    held: tuple[str, Any] | None = (
        None  # an echo ending inside a character: sent with the output's first text
    )
    pending = _pending_tail(ch, index)
    if ch.plan.echo is not None:
        text, logprobs = _echo_part(ch, index, (await run.started()).prompt_logprobs, offsets)
        if pending:
            held = (text, logprobs)
        else:
            yield chunk(text, logprobs, None)
    async for ev, _ids, lps in chunked_events(run):
        finish = ev.finish_reason if ev.finished else None
        if ch.plan.hide_output:  # echo with max_tokens 0: the one generated token is not part of the answer
            if ev.finished:
                yield chunk("", None, finish)
            continue
        logprobs = None
        if lps is not None and offsets is not None:
            logprobs = completion_logprobs(lps, ch.text, offsets)
        text = ev.text
        if held is not None:
            text, logprobs = _echo_then(held[0], pending, text), _join_logprobs(held[1], logprobs)
            held = None
        yield chunk(text, logprobs, finish)


class _ChunkTokenIds:
    """A streamed choice's token ids (vLLM's return_token_ids): the prompt's with its first chunk, and with each
    chunk the output tokens since the previous one (a token whose text is held back goes with a later chunk)."""

    def __init__(self, run: GenerationRun) -> None:
        self.run, self.sent, self.first = run, 0, True

    def take(self, hidden: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.first:
            out["prompt_token_ids"], self.first = list(self.run.req.prompt_token_ids), False
        new = self.run.token_ids[self.sent :]
        self.sent = len(self.run.token_ids)
        out["token_ids"] = [] if hidden else list(new)
        return out


async def _completion_frames(ch: _Choices, cid: str, usage_mode: UsageMode) -> AsyncIterator[bytes]:
    head = {"id": cid, "object": "text_completion", "created": ch.created, "model": ch.model}
    choices = [_completion_choice(ch, r, i, head, usage_mode) for i, r in enumerate(ch.runs)]
    async for frame in merge(choices):
        yield frame
    ch.finish_stream()
    if usage_mode:
        yield sse({**head, "choices": [], "usage": ch.usage()})


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**SSE_DOC, **COMMON_ERRORS},
    summary="OpenAI-compatible chat completion (messages rendered with the model's chat template)",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    info = get_info(request)
    info.prompt_param, info.max_tokens_param = chat_params(body)
    ch = await _start(request, principal, body, chat=True)
    cid = "chatcmpl-" + get_info(request).request_id  # (vLLM: X-Request-Id, when given)
    if body.stream:
        return EngineEventStream(ch.runs, lambda: _chat_frames(ch, cid, _usage_mode(body)))
    results = await ch.collect(request)
    if isinstance(results, Response):
        return results
    return await json_off_loop(
        ChatCompletionResponse,
        lambda: {
            "id": cid,
            "object": "chat.completion",
            "created": ch.created,
            "model": ch.model,
            "choices": [
                {**_chat_choice_body(ch.plan, i, res, ch.text), **ch.token_ids(i, prompt=False)}
                for i, res in enumerate(results)
            ],
            **ch.token_ids(0, output=False),  # (one prompt, whatever n)
            "usage": ch.usage(),
            "system_fingerprint": None,
            "prompt_logprobs": _prompt_logprobs(ch, results[0]),  # one prompt, whatever n
        },
    )


def _chat_choice_body(plan: _Plan, index: int, res: GenerationResult, text: TokenTexts) -> dict[str, Any]:
    tools = plan.tools
    reasoning, answer = tools.split(res.text)
    content, calls = tools.parse(answer) if answer is not None else (None, None)
    if plan.chat_echo:
        content = plan.chat_echo + (content or "")
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None and tools.show_reasoning:  # vLLM's fields (a reasoning parser is configured)
        message["reasoning"] = message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    return {
        "index": index,
        "message": message,
        "logprobs": None if res.logprobs is None else chat_logprobs(res.logprobs, text),
        "finish_reason": tools.finish_reason(res.finish_reason, calls, answer),
        "stop_reason": res.stop_reason,
    }


Chunk = Callable[..., bytes]  # (delta, finish_reason, logprobs=None) -> one SSE frame of a choice


def stop_reason(run: GenerationRun, finish: str | None) -> str | int | None:
    """A stream choice's stop_reason: null until its last chunk (vLLM's)."""
    return run.final.stop_reason if finish is not None and run.final is not None else None


async def _chat_choice(
    run: GenerationRun,
    index: int,
    head: dict[str, Any],
    usage_mode: UsageMode,
    text: TokenTexts,
    tools: ToolPlan,
    echo: str = "",
    return_token_ids: bool = False,
) -> AsyncIterator[bytes]:
    ids = _ChunkTokenIds(run) if return_token_ids else None

    def chunk(delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> bytes:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop_reason(run, finish),
        }
        top: dict[str, Any] = {}
        # (the prompt's ids go on the chunk, as vLLM's; each chunk's own tokens on the choice)
        if ids is not None:
            taken = ids.take()
            choice["token_ids"] = taken.pop("token_ids")
            top = taken
        return sse({**head, **top, "choices": [choice], **_chunk_usage(usage_mode, run)})

    frames = chat_stream(run, chunk, text, tools)
    yield await anext(frames)  # the role: every stream starts with it
    if echo:  # vLLM's: the echoed message right after the role
        yield chunk({"content": echo}, None)
    async for frame in frames:
        yield frame


def chat_stream(run: GenerationRun, chunk: Chunk, text: TokenTexts, tools: ToolPlan) -> AsyncIterator[Any]:
    """A chat choice as `chunk(delta, finish_reason, logprobs)` values: the role's delta first, then the content or
    tool call deltas as they come, then the finish reason (the same for the Responses API's events)."""
    stream = {"named": _stream_named, "required": _stream_required, "auto": _stream_auto}.get(
        tools.mode, _stream_text
    )
    return stream(run, chunk, text, tools)


async def _stream_text(
    run: GenerationRun, chunk: Chunk, text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[bytes]:
    first = {"role": "assistant", "content": ""}
    pieces = _stream_pieces(
        run, chunk, text, first, lambda piece: {"content": piece}, tools.thinking(), tools.show_reasoning
    )
    async for frame in pieces:
        yield frame


async def _stream_named(
    run: GenerationRun, chunk: Chunk, text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[bytes]:
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
    chunk: Chunk,
    text: TokenTexts,
    first: dict[str, Any],
    delta: Callable[[str], dict[str, Any] | None],
    thinking: ReasoningStream | None = None,
    shown: bool = True,
) -> AsyncIterator[bytes]:
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
    run: GenerationRun, chunk: Chunk, text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[bytes]:
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
    run: GenerationRun, chunk: Chunk, text: TokenTexts, tools: ToolPlan
) -> AsyncIterator[bytes]:
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


async def _chat_frames(ch: _Choices, cid: str, usage_mode: UsageMode) -> AsyncIterator[bytes]:
    head = {"id": cid, "object": "chat.completion.chunk", "created": ch.created, "model": ch.model}
    choices = [
        _chat_choice(
            r, i, head, usage_mode, ch.text, ch.plan.tools, ch.plan.chat_echo, ch.plan.return_token_ids
        )
        for i, r in enumerate(ch.runs)
    ]
    async for frame in merge(choices):
        yield frame
    ch.finish_stream()
    if usage_mode:
        yield sse({**head, "choices": [], "usage": ch.usage()})


# --------------------------------------------------------------------------------------------- models
def _card(meta: Any, svc: Service) -> ModelCard:
    return ModelCard(
        id=f"{meta.tenant_id}/{meta.name}",
        created=int(meta.created),
        owned_by=meta.tenant_id,
        root=svc.bundle.name,
        prefix_version=meta.version,
        max_model_len=svc.llm.max_model_len,
    )


def _base_card(tenant: str, svc: Service) -> ModelCard:
    return ModelCard(
        id=f"{tenant}/{BASE_PREFIX}",
        created=int(svc.started_at),
        owned_by=tenant,
        root=svc.bundle.name,
        max_model_len=svc.llm.max_model_len,
    )


@router.get(
    "/models", response_model=ModelList, responses=COMMON_ERRORS, summary="Models (prefixes) of the caller"
)
async def list_models(request: Request, principal: Principal = Depends(get_principal)) -> ModelList:
    svc = get_service(request)
    # each name's latest version made for this base model (one made for another is not served here)
    metas = await store_call(svc, svc.servable_list, principal.tenant_id if not principal.admin else None)
    cards = [_card(m, svc) for m in metas]
    if not principal.admin and principal.tenant_id is not None:
        cards.append(_base_card(principal.tenant_id, svc))
    else:
        # the admin key, an open server: every tenant with a prefix or a key can run on the base model too
        tenants = {m.tenant_id for m in metas} | set(app_state(request).keyring.tenants)
        cards.extend(_base_card(t, svc) for t in sorted(tenants))
    return ModelList(data=cards)


@router.get(
    "/models/{model:path}",
    response_model=ModelCard,
    responses=COMMON_ERRORS,
    summary="One model (prefix): any id the generation routes take (`tenant`, `tenant/prefix`, `...@version`)",
)
async def get_model(
    request: Request,
    model: str = Path(max_length=300),
    principal: Principal = Depends(get_principal),
) -> ModelCard:
    # "/v1/models/": to the list, as Starlette redirected before this route took paths
    if not model.strip("/"):
        return RedirectResponse(request.url.path.rstrip("/"), status_code=307)  # type: ignore[return-value]
    svc = get_service(request)
    served = served_names(request, svc)
    tenant, name, version = parse_model(model, principal, served)
    if name == BASE_PREFIX:
        card = _base_card(tenant, svc)
        if model in served:  # a name of the base model: the id asked for, as vLLM's
            card.id = model
        return card
    try:
        meta = await store_call(svc, svc.servable_meta, tenant, name, version, what="model")
    except APIError as e:
        if e.status == 404:  # the code the generation routes give an unknown model
            raise model_not_found(model) from None
        raise
    if meta.base_model_fingerprint != svc.bundle.fingerprint:
        raise APIError(
            404,
            f"model {model!r} is a prefix for another base model, not served here",
            code="model_not_found",
            param="model",
        )
    card = _card(meta, svc)
    if version is not None:  # the id asked for, as the generation routes echo it
        card.id += f"@{version}"
    return card


# SageMaker's inference contract (vLLM serves it too): POST /invocations with a chat or completion body, told apart
# by its fields, and GET /ping (routes_ops)
invocations_router = APIRouter(tags=["openai"])


@invocations_router.post(
    "/invocations",
    response_model=None,
    responses={**SSE_DOC, **COMMON_ERRORS},
    summary="SageMaker's /invocations (as vLLM's): a chat completion body (`messages`) or a completion one (`prompt`)",
)
async def invocations(request: Request, principal: Principal = Depends(get_principal)) -> Any:
    ctype = request.headers.get("content-type", "")
    if ctype and "json" not in ctype.lower():  # (as the /v1 routes answer it)
        raise APIError(
            415,
            f"the request body must be JSON: send Content-Type: application/json (this one was {ctype[:80]!r})",
            code="unsupported_media_type",
            param="content-type",
        )
    raw = await request.body()
    if not raw.strip():
        raise APIError(422, "request body is required", code="missing_body")
    try:
        data = json.loads(raw)
    except ValueError:
        raise APIError(400, "request body is not valid JSON", code="invalid_json") from None
    kind: type[ChatCompletionRequest] | type[CompletionRequest]
    if isinstance(data, dict) and "messages" in data:
        kind = ChatCompletionRequest
    elif isinstance(data, dict) and "prompt" in data:
        kind = CompletionRequest
    else:
        raise APIError(
            400,
            "/invocations takes a chat completion body (with messages) or a completion body (with prompt)",
            code="invalid_value",
        )
    # SageMaker's clients send no model (vLLM's default is its served model): the base model's served name, which a
    # tenant key resolves to its tenant on the base model
    data.setdefault("model", served_names(request, get_service(request))[0])
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    if isinstance(body, ChatCompletionRequest):
        return await chat_completions(body, request, principal)
    return await completions(body, request, principal)
