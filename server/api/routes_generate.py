"""POST /generate (native API) with optional Server-Sent Events streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.auth import Principal, get_principal
from server.api.chat_template import render_chat
from server.api.deps import get_info, get_service
from server.api.errors import COMMON_ERRORS, APIError
from server.api.logprobs import generate_logprobs, generate_prompt_logprobs
from server.api.model_ids import resolve_model
from server.api.prefix_meta import ResolvedPrefix
from server.api.run import ClientDisconnected, GenerationRun, race_disconnect
from server.api.schemas import (
    BASE_PREFIX,
    DEFAULT_PREFIX,
    ChatTemplateFields,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.service import prompt_format, render_prompt, truncate_prompt
from server.api.streaming import (
    DISCONNECTED,
    SSE_DOC,
    EngineEventStream,
    chunked_events,
    decode_ids,
    json_off_loop,
    sse,
    usage,
)
from server.api.tools import template_messages

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**SSE_DOC, **COMMON_ERRORS},
    summary="Generate text with a tenant's prefix",
)
async def generate(
    body: GenerateRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    svc = get_service(request)
    info = get_info(request)
    tenant = principal.resolve_tenant(body.tenant_id)
    priority = svc.check_priority(principal, body.priority)
    name = body.prefix or DEFAULT_PREFIX
    info.tenant, info.prefix = tenant, name
    if svc.settings.log_prompts:
        info.prompt = body.prompt
    # an unknown prefix is a 404 before any grammar is compiled
    prefix = await svc.resolve(tenant, name, body.prefix_version)
    info.version = prefix.version
    sampling = svc.sampling(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        typical_p=body.typical_p,
        watermark=body.watermark,
        seed=body.seed,
        stop=body.stop,
        include_stop_str_in_output=body.include_stop_str_in_output,
        skip_special_tokens=body.skip_special_tokens,
        spaces_between_special_tokens=body.spaces_between_special_tokens,
        ignore_eos=body.ignore_eos,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logprobs=body.logprobs,
        prompt_logprobs=body.prompt_logprobs,
        logit_bias=body.logit_bias,
        allowed_token_ids=body.allowed_token_ids,
        min_tokens=body.min_tokens,
        stop_token_ids=body.stop_token_ids,
        structured=await svc.structured(body.structured_outputs),
        bad_words_token_ids=await svc.bad_words(body.bad_words),
    )
    fmt = prompt_format(body.prompt_format, prefix, svc.bundle.tokenizer)
    svc.check_prompt_chars(len(body.prompt), truncating=body.truncate_prompt_tokens is not None)
    ids = await svc.tokenize(render_prompt, svc.bundle.tokenizer, body.prompt, fmt)
    ids = truncate_prompt(
        ids, body.truncate_prompt_tokens, svc.prompt_fit(prefix.prefix_length, body.max_tokens)
    )
    entries = (0 if body.logprobs is None else body.max_tokens * (body.logprobs + 1)) + (
        0 if body.prompt_logprobs is None else len(ids) * (body.prompt_logprobs + 1)
    )
    svc.check_logprob_entries(entries, "logprobs" if body.logprobs is not None else "prompt_logprobs")
    (run,) = await svc.generate_many(
        info, prefix, [(ids, sampling)], stream=body.stream, receive=request.receive, priority=priority
    )
    prefix = (
        run.prefix
    )  # the version that serves it (a newer latest if the resolved one was pruned meanwhile)
    rid = "gen-" + info.request_id  # (its X-Request-ID, as the /v1 ids)
    if body.stream:
        return EngineEventStream(run, lambda: _frames(run, rid, prefix, svc.token_text))
    try:
        res = await race_disconnect(request.receive, run.collect())
    except ClientDisconnected:
        return Response(status_code=DISCONNECTED)
    finally:
        await run.close()
    # (built and encoded off the event loop: thousands of log-probabilities take a while)
    return await json_off_loop(
        GenerateResponse,
        lambda: {
            "id": rid,
            "tenant_id": tenant,
            "prefix": prefix.name or BASE_PREFIX,
            "prefix_version": prefix.version,
            "text": res.text,
            "finish_reason": res.finish_reason,
            "stop_reason": res.stop_reason,
            "usage": usage(res.prompt_tokens, res.completion_tokens, res.cached_tokens),
            "logprobs": None if res.logprobs is None else generate_logprobs(res.logprobs, svc.token_text),
            "prompt_logprobs": generate_prompt_logprobs(res.prompt_logprobs, svc.token_text),
        },
    )


async def _frames(
    run: GenerationRun, rid: str, prefix: ResolvedPrefix, text: Callable[[int], str]
) -> AsyncIterator[bytes]:
    head = {
        "id": rid,
        "tenant_id": prefix.tenant_id,
        "prefix": prefix.name or BASE_PREFIX,  # the base model alone: "base", as asked
        "prefix_version": prefix.version,
    }
    prompt_lps = (await run.started()).prompt_logprobs  # on the first chunk sent
    async for ev, ids, lps in chunked_events(run):
        done = ev.finished
        # GenerateChunk's fields, in its order, as a plain dict: validating a model per token took half of a
        # frame's event-loop time (tests check every frame against the schema)
        yield sse(
            {
                **head,
                "text": ev.text,
                "token_ids": ids,
                "finish_reason": ev.finish_reason if done else None,
                "stop_reason": ev.stop_reason if done else None,
                "usage": usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens) if done else None,
                "logprobs": None if lps is None else generate_logprobs(lps, text),
                "prompt_logprobs": generate_prompt_logprobs(prompt_lps, text),
            }
        )
        prompt_lps = None


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=COMMON_ERRORS,
    summary="Token ids of a prompt (or chat messages) as a generation with that prefix would feed them",
)
async def tokenize(
    body: TokenizeRequest, request: Request, principal: Principal = Depends(get_principal)
) -> TokenizeResponse:
    svc = get_service(request)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(422, "give exactly one of prompt and messages", code="invalid_value", param="prompt")
    if body.model is not None:  # vLLM's way to name it
        named = sorted(body.model_fields_set & {"tenant_id", "prefix", "prefix_version"})
        if named:
            raise APIError(
                422, f"give model or {', '.join(named)}, not both", code="invalid_value", param="model"
            )
        prefix = await resolve_model(request, svc, principal, body.model)
    else:
        tenant = principal.resolve_tenant(body.tenant_id)
        prefix = await svc.resolve(tenant, body.prefix or DEFAULT_PREFIX, body.prefix_version)
    tok = svc.bundle.tokenizer
    if body.messages is not None:
        if body.prompt_format is not None:  # messages always go through the chat template
            raise APIError(422, "prompt_format applies to prompt, not to messages", param="prompt_format")
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] or None
        messages = template_messages(body.messages, svc.tool_parser.short_ids)
        ids, fmt = await render_chat(svc, body, messages, tools), "chat"
    else:
        chat_only = body.model_fields_set & {"tools", *ChatTemplateFields.model_fields}
        if chat_only:
            raise APIError(
                422, f"{min(chat_only)} needs messages", code="invalid_value", param=min(chat_only)
            )
        assert body.prompt is not None
        fmt = prompt_format(body.prompt_format, prefix, tok)
        svc.check_prompt_chars(len(body.prompt))
        ids = await svc.tokenize(render_prompt, tok, body.prompt, fmt, body.add_special_tokens)
    return TokenizeResponse(
        tokens=ids,
        token_strs=tok.convert_ids_to_tokens(ids) if body.return_token_strs else None,
        count=len(ids),
        prefix_length=prefix.prefix_length,
        max_model_len=svc.llm.max_model_len,
        max_request_tokens=svc.llm.request_tokens(prefix.prefix_length),
        max_new_tokens=svc.settings.max_new_tokens,
        prompt_format=fmt,
    )


@router.post(
    "/detokenize", response_model=DetokenizeResponse, responses=COMMON_ERRORS, summary="Text of token ids"
)
async def detokenize(
    body: DetokenizeRequest, request: Request, principal: Principal = Depends(get_principal)
) -> DetokenizeResponse:
    svc = get_service(request)
    if body.model is not None:  # (vLLM's: the text does not depend on it, but it must name a model to use)
        await resolve_model(request, svc, principal, body.model)
    vocab = svc.bundle.spec.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(422, f"token ids must be below {vocab}", code="invalid_value", param="tokens")
    # (off the event loop, as tokenizing: a long list takes a while)
    text = await svc.tokenize(decode_ids, svc.bundle.tokenizer, body.tokens)
    return DetokenizeResponse(prompt=text)
