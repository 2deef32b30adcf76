"""Rendering chat messages with the model's chat template, as /v1/chat/completions and /tokenize both do."""

from __future__ import annotations

import functools
from typing import Any

from server.api.errors import APIError
from server.api.schemas import ChatCompletionRequest, TokenizeRequest
from server.api.service import Service, render_messages

# apply_chat_template's own parameters: not for chat_template_kwargs
TEMPLATE_PARAMS = frozenset(
    [
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    ]
)

ChatBody = ChatCompletionRequest | TokenizeRequest


def template_options(body: ChatBody) -> dict[str, Any]:
    """vLLM's chat-template extensions, checked: continue_final_message continues a final assistant message (and
    so excludes add_generation_prompt); chat_template_kwargs may not override the rendering's own parameters."""
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise APIError(
                422, "continue_final_message needs add_generation_prompt false", code="invalid_value",
                param="continue_final_message",
            )  # fmt: skip
        if not body.messages or body.messages[-1].role != "assistant":
            raise APIError(
                422, "continue_final_message needs the last message to be the assistant's", code="invalid_value",
                param="continue_final_message",
            )  # fmt: skip
    extra = dict(body.chat_template_kwargs or {})
    effort = getattr(body, "reasoning_effort", None)
    if effort is not None:
        extra.setdefault("reasoning_effort", effort)
    clash = sorted(TEMPLATE_PARAMS & extra.keys())
    if clash:
        raise APIError(
            422, f"chat_template_kwargs may not set {', '.join(clash)}", code="invalid_value",
            param="chat_template_kwargs",
        )  # fmt: skip
    return {
        "add_generation_prompt": body.add_generation_prompt,
        "continue_final_message": body.continue_final_message,
        "template_kwargs": extra,
        "add_special_tokens": bool(body.add_special_tokens),
        "documents": body.documents,
    }


async def render_chat(
    svc: Service,
    body: ChatBody,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    param: str = "messages",
) -> list[int]:
    """Token ids of `messages` (the body's, as the template takes them) with the body's template options, on the
    tokenizer threads. `param`: the request's field the messages came from, which a prompt too long names."""
    render = functools.partial(render_messages, **template_options(body))
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    chars += sum(len(v) for d in body.documents or () for v in d.values())
    truncating = getattr(body, "truncate_prompt_tokens", None) is not None or getattr(
        body, "_drop_turns", False
    )
    svc.check_prompt_chars(chars, param, truncating=truncating)
    return await svc.tokenize(render, svc.bundle.tokenizer, messages, tools, param=param)
