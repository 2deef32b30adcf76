"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` is `"{tenant_id}/{prefix}"`; `"{tenant_id}"` alone means that tenant's `default` prefix and
`"{tenant_id}/base"` the base model without a prefix. A model naming another tenant answers 404 like an unknown one.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from server.api.auth import Principal, get_principal
from server.api.chat_pipeline import (
    Choices,
    Plan,
    chat_plan,
    chat_stream,
    decode_ids,
    start_choices,
)
from server.api.deps import app_state, get_info, get_service, store_call
from server.api.errors import COMMON_ERRORS, APIError, is_json_type, not_json, unparsed_body
from server.api.logprobs import (
    TextOffsets,
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    vllm_prompt_logprobs,
)
from server.api.model_ids import hinted, model_not_found, parse_model, served_names
from server.api.run import GenerationResult, GenerationRun
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
from server.api.service import Service, prompt_format, render_prompt, truncate_prompt
from server.api.streaming import SSE_DOC, EngineEventStream, chunked_events, json_off_loop, merge, sse, usage
from server.api.tools import ToolPlan

router = APIRouter(prefix="/v1", tags=["openai"])

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def chat_params(body: ChatCompletionRequest) -> tuple[str, str]:
    """The chat route's fields for the prompt and the output's length (`RequestInfo.prompt_param`,
    `max_tokens_param`): max_completion_tokens where it was sent (it wins), else max_tokens."""
    return "messages", "max_completion_tokens" if body.max_completion_tokens else "max_tokens"


async def _completion_plan(svc: Service, info: Any, body: CompletionRequest, prefix: Any) -> Plan:
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
    plan = Plan(prompts, max(1, max_tokens), body.logprobs, "logprobs", hide_output=max_tokens == 0)
    if body.echo:
        # the prompt as it was used (truncated, if asked to; rendered in the prefix's chat template, if it has
        # one): the text its prompt logprobs' tokens add up to
        as_given = body.truncate_prompt_tokens is None and fmt == "raw"
        plan.echo = [
            (
                x if isinstance(x, str) and as_given else await svc.tokenize(decode_ids, tok, ids),
                ids,
            )
            for x, ids in zip(items, prompts, strict=True)
        ]
    elif max_tokens == 0:
        raise APIError(422, "max_tokens may be 0 only with echo", code="invalid_value", param="max_tokens")
    return plan


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
    ch = await start_choices(request, principal, body, _completion_plan)
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
    ch: Choices, index: int, plps: list[Any] | None, offsets: TextOffsets | None
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


def _pending_tail(ch: Choices, index: int) -> bytes:
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


def _completion_choice_body(ch: Choices, index: int, res: GenerationResult) -> dict[str, Any]:
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


def _prompt_logprobs(ch: Choices, res: GenerationResult) -> Any:
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
    ch: Choices, run: GenerationRun, index: int, head: dict[str, Any], usage_mode: UsageMode
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


async def _completion_frames(ch: Choices, cid: str, usage_mode: UsageMode) -> AsyncIterator[bytes]:
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
    ch = await start_choices(request, principal, body, chat_plan)
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


def _chat_choice_body(plan: Plan, index: int, res: GenerationResult, text: TokenTexts) -> dict[str, Any]:
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


async def _chat_frames(ch: Choices, cid: str, usage_mode: UsageMode) -> AsyncIterator[bytes]:
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
        # what the generation routes answer an unknown model (with a base-model name's hint)
        if e.status == 404:
            raise model_not_found(model, hinted(principal, model, served)) from None
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
    raw = await request.body()
    if not raw.strip():  # (first, as the /v1 routes answer a request without a body)
        raise APIError(422, "request body is required", code="missing_body")
    if not is_json_type(ctype):  # as the /v1 routes answer it (no Content-Type at all too)
        raise not_json(ctype)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise APIError(400, unparsed_body(e), code="invalid_json") from None
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
