"""Text Generation Inference / LoRAX compatible generation under ``/tgi``.

``lorax-client`` and ``text-generation`` post to their base URL: point them at ``http://HOST:PORT/tgi``
(``POST /tgi`` answers ``[response]``, or Server-Sent Events with ``"stream": true``); ``POST /tgi/generate`` and
``POST /tgi/generate_stream`` are TGI's own routes. ``parameters.adapter_id`` names the prefix the way ``/v1`` names
a model (``tenant/prefix``, ``tenant/prefix@3``; ``tenant``: its ``default`` prefix); without one the key's tenant
runs on the base model. Authentication is the server's (``Authorization: Bearer``, e.g. the clients' ``headers``).
Errors keep the server's error body and add TGI's top-level ``error_type`` (``validation``, ``overloaded``,
``generation``) so the clients raise their matching exception.

As TGI does: ``inputs`` reach the base model as they are (no chat template; a prefix gets the prompt format it was
trained with, ``inputs`` as the user message of a chat-trained one), ``truncate`` keeps the last tokens of
``inputs`` themselves, ``generated_text`` ends with the stop sequence that ended it, sampling is on with
``do_sample`` or any of ``temperature`` (other than 1), ``top_k``, ``top_p`` < 1 (greedy otherwise) and reports
its seed (drawn when none is given). ``details`` adds the finish reason (``length``, ``eos_token``,
``stop_sequence``), token counts and every generated token with its log-probability; ``decoder_input_details`` the
prompt tokens (``prefill``; not with streaming); ``return_k_alternatives`` (LoRAX) / ``top_n_tokens`` (TGI) the
most likely alternatives. A stream sends one event per generated token as it comes, each with the token's own text
(decoded incrementally; a special token such as EOS: its spelling, ``special: true``) and log-probability; the last
carries ``generated_text`` (cut at a stop sequence, which a token's text is not) and ``details``; no ``[DONE]``.
A completed grammar ends as TGI's does: ``eos_token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from server import __version__
from server.api import routes_openai
from server.api.auth import Principal, get_principal
from server.api.deps import get_info, get_service
from server.api.errors import COMMON_ERRORS, APIError, with_tgi_error_type
from server.api.logprobs import finite_logprob
from server.api.model_ids import TGI_PLACEHOLDER_MODELS, parse_model
from server.api.prefix_meta import ResolvedPrefix
from server.api.routes_ops import ready
from server.api.run import ClientDisconnected, GenerationRun, race_disconnect
from server.api.schemas import (
    BASE_PREFIX,
    MAX_MODEL_ID,
    ChatCompletionRequest,
    CompletionRequest,
    PromptText,
    RepetitionPenalty,
    Seed,
    StopText,
)
from server.api.service import Service, render_prompt, truncate_prompt
from server.api.streaming import DISCONNECTED, SSE_DOC, EngineEventStream, all_events, sse, stream_error
from server.engine import SamplingParams, StructuredOutputs, TokenEvent, TokenLogprob
from server.engine.detokenizer import IncrementalDetokenizer

router = APIRouter(prefix="/tgi", tags=["tgi"])


# --------------------------------------------------------------------------------------------- request
class TGIResponseFormat(BaseModel):
    """LoRAX's ``response_format``: a JSON object, matching ``schema`` when given."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class TGIGrammar(BaseModel):
    """TGI's ``grammar``: ``{"type": "json", "value": <JSON schema>}``, ``{"type": "regex", "value": "..."}`` or
    (TGI 3) ``{"type": "json_schema", "value": {"name": ..., "schema": <JSON schema>}}``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json", "regex", "json_schema"]
    value: Any


class TGIParameters(BaseModel):
    """TGI's and LoRAX's generation parameters (every field their clients send)."""

    model_config = ConfigDict(extra="forbid")

    adapter_id: str | None = Field(
        None, max_length=300, description="The prefix: `tenant/prefix[@version]` (or `tenant`)"
    )
    adapter_source: str | None = Field(None, description="`local` or `pbase` (prefixes live in this server)")
    merged_adapters: dict[str, Any] | None = Field(None, description="Not supported (422)")
    api_token: str | None = Field(None, description="Ignored: authenticate with the Authorization header")
    do_sample: bool = False
    max_new_tokens: int | None = Field(
        None, ge=1, description="Default: the server's max_new_tokens, or the room"
    )
    ignore_eos_token: bool = False
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    return_full_text: bool | None = False
    stop: list[StopText] = Field(default_factory=list)
    seed: Seed | None = None
    temperature: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    truncate: int | None = Field(None, ge=1, description="Keep only the last `truncate` prompt tokens")
    typical_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="Typical decoding")
    best_of: int | None = Field(
        None,
        ge=1,
        description="TGI: sample this many sequences, answer the one with the highest mean token log-probability "
        "(with sampling, without seed, not streamed; details list the others as best_of_sequences)",
    )
    watermark: bool = Field(
        False, description="TGI's watermark: a green list of tokens favoured, drawn from the previous token"
    )
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(None, ge=0, description="LoRAX: alternatives of every token")
    top_n_tokens: int | None = Field(None, ge=0, description="TGI: the most likely tokens at every step")
    response_format: TGIResponseFormat | None = None
    grammar: TGIGrammar | None = None


class TGIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: PromptText
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class TGIResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    generated_text: str
    details: dict[str, Any] | None = None


# the TGI body's fields for the prompt and the output's length: the errors about their sizes name them
# (`RequestInfo.prompt_param`, `max_tokens_param`; the messages say `max_new_tokens`)
PROMPT_PARAM, MAX_TOKENS_PARAM = "inputs", "parameters.max_new_tokens"

# the fields the shared checks name by the server's own names -> the TGI body's (their messages are the server's)
_PARAMS = {
    "stop": "parameters.stop",
    "prefix": "parameters.adapter_id",
    "prefix_version": "parameters.adapter_id",
}


@contextlib.contextmanager
def _tgi_names() -> Iterator[None]:
    """Errors of the shared request checks name the TGI body's fields in `param`."""
    try:
        yield
    except APIError as e:
        e.param = _PARAMS.get(e.param or "", e.param)
        raise


def _unsupported(param: str, message: str) -> APIError:
    return APIError(422, message, code="unsupported_parameter", param=f"parameters.{param}")


def _target(p: TGIParameters, principal: Principal) -> tuple[str, str, int | None]:
    """(tenant, prefix name, pinned version) of `adapter_id`."""
    if p.merged_adapters is not None:
        raise _unsupported(
            "merged_adapters", "merged adapters are not supported: name one prefix in adapter_id"
        )
    if p.adapter_source not in (None, "local", "pbase"):
        raise _unsupported(
            "adapter_source",
            f"adapter_source {p.adapter_source!r} is not supported: prefixes are trained on or uploaded to this "
            "server (POST /prefixes, POST /prefixes/{tenant_id}/{name}/upload)",
        )
    if p.adapter_id is None:
        tenant = principal.tenant_id
        if tenant is None:
            raise APIError(
                422,
                "adapter_id is required without a tenant API key: `tenant/prefix` (`tenant/base`: the base model)",
                code="missing_tenant_id",
                param="parameters.adapter_id",
            )
        return tenant, BASE_PREFIX, None
    try:
        return parse_model(p.adapter_id, principal)
    except APIError as e:
        raise APIError(
            404, f"adapter {p.adapter_id!r} not found", code="model_not_found", param="parameters.adapter_id"
        ) from e


def _sampling(
    svc: Service, p: TGIParameters, room: int, structured: StructuredOutputs | None
) -> SamplingParams:
    sample = (
        p.do_sample
        or (p.temperature is not None and p.temperature != 1.0)
        or bool(p.top_k)
        or (p.top_p is not None and p.top_p < 1.0)
        or (p.typical_p is not None and p.typical_p < 1.0)
    )
    if (p.best_of or 1) > 1:
        # TGI's router counts any sampling field given as sampling: best_of samples then (temperature 1 included)
        sample = sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
        _check_best_of(p, sample, svc.settings.max_best_of)
    temperature = (1.0 if p.temperature is None else p.temperature) if sample else 0.0
    # TGI samples with a seed it reports: the given one, or one drawn here (the output can be reproduced)
    seed = (p.seed if p.seed is not None else secrets.randbelow(2**31)) if temperature > 0 else p.seed
    k_alt, n_top = p.return_k_alternatives or 0, p.top_n_tokens or 0
    max_tokens = p.max_new_tokens or max(1, min(svc.settings.max_new_tokens, room))
    return svc.sampling(
        max_tokens=max_tokens,
        max_tokens_param=MAX_TOKENS_PARAM,
        temperature=temperature,
        top_p=p.top_p if sample and p.top_p is not None else 1.0,
        top_k=p.top_k if sample and p.top_k else 0,
        typical_p=p.typical_p if sample and p.typical_p is not None else 1.0,
        watermark=p.watermark,
        seed=seed,
        stop=p.stop,
        include_stop_str_in_output=True,  # TGI's generated_text ends with the stop sequence
        ignore_eos=p.ignore_eos_token,
        frequency_penalty=p.frequency_penalty or 0.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        logprobs=max(k_alt, n_top),  # every reported token has its log-probability
        logprobs_param="parameters.top_n_tokens" if n_top > k_alt else "parameters.return_k_alternatives",
        prompt_logprobs=0 if p.decoder_input_details else None,
        structured=structured,
    )


def _check_best_of(p: TGIParameters, sample: bool, most: int) -> None:
    """TGI's rules for best_of > 1 (its router's validation errors); `most`: the max_best_of setting."""
    if (p.best_of or 1) > most:
        raise APIError(422, f"best_of must be at most {most}", param="parameters.best_of")
    if not sample:
        raise APIError(422, "you must use sampling when best_of is > 1", param="parameters.best_of")
    if p.seed is not None:
        raise APIError(422, "seed must not be set when best_of is > 1", param="parameters.seed")


async def _structured(svc: Service, p: TGIParameters) -> StructuredOutputs | None:
    if p.response_format is not None and p.grammar is not None:
        raise APIError(422, "give response_format or grammar, not both", param="parameters.grammar")
    if p.response_format is not None:
        schema = p.response_format.schema_
        spec = (
            StructuredOutputs("json_object")
            if schema is None
            else StructuredOutputs("json", json.dumps(schema))
        )
        return await svc.compile_spec(spec, "parameters.response_format")
    if p.grammar is not None:
        g = p.grammar
        if g.type == "regex":
            if not isinstance(g.value, str) or not g.value:
                raise APIError(
                    422, "a regex grammar's value is a pattern string", param="parameters.grammar.value"
                )
            return await svc.compile_spec(StructuredOutputs("regex", g.value), "parameters.grammar.value")
        try:
            schema = json.loads(g.value) if isinstance(g.value, str) else g.value
        except (ValueError, RecursionError):
            schema = None
        if g.type == "json_schema":
            schema = schema.get("schema") if isinstance(schema, dict) else None
            if not isinstance(schema, dict):
                raise APIError(
                    422,
                    'a json_schema grammar\'s value is {"name": ..., "schema": <JSON schema object>}',
                    param="parameters.grammar.value.schema",
                )
        if not isinstance(schema, dict):
            raise APIError(
                422, "a json grammar's value is a JSON schema object", param="parameters.grammar.value"
            )
        return await svc.compile_spec(
            StructuredOutputs("json", json.dumps(schema)), "parameters.grammar.value"
        )
    return None


# --------------------------------------------------------------------------------------------- response
class _Shape:
    """How a request's tokens are reported: their texts, which are special, why the output ended, the seed."""

    def __init__(self, svc: Service, p: TGIParameters, sampling: SamplingParams) -> None:
        tok = self.tokenizer = svc.bundle.tokenizer
        self.special = set(getattr(tok, "all_special_ids", None) or [])
        self.stop_ids = set(svc.llm.eos_ids) | set(sampling.stop_token_ids)
        self.p = p
        self.seed = sampling.seed if sampling.temperature > 0 else None  # TGI: the seed it sampled with
        self.token_texts = svc.token_text
        self.piece = (
            svc.token_text.piece
        )  # a token decoded alone, as TGI shows alternatives and prompt tokens

    def is_special(self, token_id: int) -> bool:
        """The tokenizer's special tokens, and added tokens marked special that the output text leaves out (e.g.
        SmolLM2's `<repo_name>`: not in `all_special_ids`, yet streamed as "" without being said special)."""
        return token_id in self.special or self.token_texts.dropped(token_id)

    def token(self, token_id: int, lp: TokenLogprob | None, text: str) -> dict[str, Any]:
        tok: dict[str, Any] = {
            "id": token_id,
            "text": text,
            "logprob": finite_logprob(lp.logprob) if lp is not None else None,
            "special": self.is_special(token_id),
        }
        if self.p.return_k_alternatives and lp is not None:
            tok["alternative_tokens"] = [
                {"id": t, "text": self.piece(t), "logprob": finite_logprob(v)}
                for t, v in lp.top[: self.p.return_k_alternatives]
            ]
        return tok

    def top_tokens(self, lp: TokenLogprob | None) -> list[dict[str, Any]]:
        n = self.p.top_n_tokens or 0
        if lp is None:
            return []
        return [
            {"id": t, "text": self.piece(t), "logprob": finite_logprob(v), "special": self.is_special(t)}
            for t, v in lp.top[:n]
        ]

    def detokenizer(self, prompt_ids: list[int]) -> IncrementalDetokenizer:
        # (by the tokens' own bytes: text that merely ends in U+FFFD is not held back, re-decoded at every token)
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, (), texts=self.token_texts)

    def token_text(self, detok: IncrementalDetokenizer, token_id: int, last: bool) -> str:
        """A generated token's own text, decoded incrementally as TGI has it: a token ending inside a character
        gives "" and the next one completes it; a special token (EOS) its own spelling (`special` says what it
        is). Not the output text a stop string may hold back: that is `generated_text`'s."""
        text = self.piece(token_id) if self.is_special(token_id) else detok.add(token_id)[0]
        return text + detok.finish() if last else text

    def texts(self, prompt_ids: list[int], ids: list[int]) -> list[str]:
        detok = self.detokenizer(prompt_ids)
        return [self.token_text(detok, t, i == len(ids) - 1) for i, t in enumerate(ids)]

    def finish_reason(self, reason: str | None, last_token: int | None, text: str) -> str:
        if reason == "length":
            return "length"
        if last_token is not None and last_token in self.stop_ids and not self.p.ignore_eos_token:
            return "eos_token"
        if any(text.endswith(s) for s in self.p.stop or ()):  # TGI keeps the stop sequence in the text
            return "stop_sequence"
        # the grammar is complete: TGI ends it with EOS (no stop sequence matched)
        return "eos_token"

    def details(self, final: TokenEvent, last_token: int | None, text: str) -> dict[str, Any]:
        """`text`: the output text (a stop sequence it ends with is why it stopped)."""
        return {
            "finish_reason": self.finish_reason(final.finish_reason, last_token, text),
            "prompt_tokens": final.prompt_tokens,
            "generated_tokens": final.completion_tokens,
            "seed": self.seed,
        }


def _prefill(shape: _Shape, ids: list[int], lps: list[TokenLogprob | None] | None) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(ids):
        lp = lps[i] if lps is not None and i < len(lps) else None
        out.append(
            {"id": t, "text": shape.piece(t), "logprob": None if lp is None else finite_logprob(lp.logprob)}
        )
    return out


async def _tokens(
    run: GenerationRun,
) -> AsyncIterator[tuple[TokenEvent, str, int, TokenLogprob | None, bool]]:
    """Every generated token as it comes: (its event, the output text the event adds (with its first token, else
    ""), id, log-probability, whether it is the output's last). Only an abort or an error ends a request without a
    token (the client is gone, or the error is raised)."""
    async for ev in all_events(run):
        lps = ev.logprobs or []
        n = len(ev.token_ids)
        for i, t in enumerate(ev.token_ids):
            yield (
                ev,
                (ev.text if i == 0 else ""),
                t,
                (lps[i] if i < len(lps) else None),
                ev.finished and i == n - 1,
            )


async def _start(
    body: TGIRequest, request: Request, principal: Principal
) -> tuple[list[GenerationRun], list[_Shape], list[int]]:
    """The request's runs (best_of of them, each with its own seed; else one) and how each is reported."""
    svc = get_service(request)
    info = get_info(request)
    p = body.parameters
    if body.stream and p.decoder_input_details:
        raise _unsupported("decoder_input_details", "decoder_input_details is not supported when streaming")
    if body.stream and (p.best_of or 1) > 1:
        raise APIError(422, "best_of != 1 is not allowed for this endpoint", param="parameters.best_of")
    tenant, name, version = _target(p, principal)
    info.tenant, info.prefix = tenant, name
    info.prompt_param, info.max_tokens_param = PROMPT_PARAM, MAX_TOKENS_PARAM
    if svc.settings.log_prompts:
        info.prompt = body.inputs
    with _tgi_names():
        try:
            prefix: ResolvedPrefix = await svc.resolve(tenant, name, version)
        except APIError as e:
            if e.status == 404:
                raise APIError(
                    404, f"adapter {p.adapter_id!r} not found", code=e.code, param="parameters.adapter_id"
                ) from None
            raise
        info.version = prefix.version
        structured = await _structured(svc, p)
        svc.check_prompt_chars(len(body.inputs), PROMPT_PARAM, truncating=p.truncate is not None)
        ids = await svc.tokenize(
            _prompt_ids, svc.bundle.tokenizer, body.inputs, prefix, p.truncate, param=PROMPT_PARAM
        )
        sampling = _sampling(svc, p, svc.llm.room(prefix.prefix_length, len(ids)), structured)
        info.max_tokens_given = p.max_new_tokens is not None
        # every token is reported with its log-probability and its alternatives; decoder_input_details: each
        # prompt token's too
        assert sampling.logprobs is not None  # (`_sampling` always asks for them)
        out_entries = sampling.max_tokens * (sampling.logprobs + 1)
        in_entries = len(ids) if p.decoder_input_details else 0
        if in_entries > out_entries:
            which = "parameters.decoder_input_details"
        elif (p.top_n_tokens or 0) > (p.return_k_alternatives or 0):  # (the field `_sampling` took them from)
            which = "parameters.top_n_tokens"
        elif p.return_k_alternatives:
            which = "parameters.return_k_alternatives"
        else:
            which = "parameters.max_new_tokens"
        best_of = p.best_of or 1
        svc.check_logprob_entries((out_entries + in_entries) * best_of, which)
        # best_of: each sequence samples with a seed of its own, reported with it
        samplings = [sampling] if best_of == 1 else [
            dataclasses.replace(sampling, seed=secrets.randbelow(2**31)) for _ in range(best_of)
        ]  # fmt: skip
        runs = await svc.generate_many(
            info, prefix, [(ids, sp) for sp in samplings], stream=body.stream, receive=request.receive
        )
    return runs, [_Shape(svc, p, sp) for sp in samplings], ids


def _prompt_ids(tokenizer: Any, inputs: str, prefix: ResolvedPrefix, truncate: int | None) -> list[int]:
    """TGI feeds `inputs` as they are: the base model gets them raw. A prefix gets the prompt format it was trained
    with (a chat-trained prefix: `inputs` as the user message). `truncate` keeps the last tokens of `inputs`
    themselves, never cutting into a template."""
    fmt = prefix.prompt_format if prefix.name else "raw"
    if fmt == "raw":
        return truncate_prompt(render_prompt(tokenizer, inputs, "raw"), truncate)
    if truncate is not None:
        own = tokenizer(inputs, add_special_tokens=False)["input_ids"]
        if len(own) > truncate:
            inputs = tokenizer.decode(
                own[-truncate:], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
    return render_prompt(tokenizer, inputs, fmt)


async def _respond(body: TGIRequest, request: Request, principal: Principal, as_list: bool) -> Any:
    runs, shapes, ids = await _start(body, request, principal)
    if body.stream:
        (run,), (shape,) = runs, shapes
        return EngineEventStream(
            run, lambda: _frames(run, shape, body, ids), end=None, error_frame=_error_frame
        )
    try:
        outs = await race_disconnect(
            request.receive,
            asyncio.gather(*(_collect(r, s, body, ids) for r, s in zip(runs, shapes, strict=True))),
        )
    except ClientDisconnected:
        return Response(status_code=DISCONNECTED)
    finally:
        for run in runs:
            await run.close()
    out = _best_of(outs, body.parameters) if len(outs) > 1 else outs[0][0]
    return JSONResponse([out] if as_list else out)


def _best_of(outs: list[tuple[dict[str, Any], float]], p: TGIParameters) -> dict[str, Any]:
    """TGI's best_of answer: the sequence with the highest mean token log-probability (the first of equals); with
    details, the others as `best_of_sequences` (each its text and its details)."""
    best = max(range(len(outs)), key=lambda i: outs[i][1])
    out = outs[best][0]
    if p.details:
        out["details"]["best_of_sequences"] = [
            {"generated_text": o["generated_text"], **o["details"]}
            for i, (o, _) in enumerate(outs)
            if i != best
        ]
    return out


async def _collect(
    run: GenerationRun, shape: _Shape, body: TGIRequest, prompt_ids: list[int]
) -> tuple[dict[str, Any], float]:
    """The answer of one run, and its mean token log-probability (what best_of picks by)."""
    p = body.parameters
    ids: list[int] = []
    lps: list[TokenLogprob | None] = []
    parts: list[str] = []
    final: TokenEvent | None = None
    async for ev, text, t, lp, _last in _tokens(run):
        parts.append(text)
        ids.append(t)
        lps.append(lp)
        final = ev
    assert final is not None and run.first is not None
    text = "".join(parts)
    out: dict[str, Any] = {"generated_text": body.inputs + text if p.return_full_text else text}
    if p.details:
        prompt_lps = run.first.prompt_logprobs

        def details() -> dict[str, Any]:
            d = shape.details(final, ids[-1] if ids else None, text)
            d["prefill"] = _prefill(shape, prompt_ids, prompt_lps) if p.decoder_input_details else []
            texts = shape.texts(prompt_ids, ids)
            d["tokens"] = [shape.token(t, lp, x) for t, lp, x in zip(ids, lps, texts, strict=True)]
            if p.top_n_tokens:
                d["top_tokens"] = [shape.top_tokens(lp) for lp in lps]
            return d

        # (on a worker thread, as the /v1 answers: every token's text and log-probabilities take a while)
        out["details"] = await asyncio.to_thread(details)
    known = [lp.logprob for lp in lps if lp is not None]
    return out, (sum(known) / len(known) if known else float("-inf"))


async def _frames(
    run: GenerationRun, shape: _Shape, body: TGIRequest, prompt_ids: list[int]
) -> AsyncIterator[bytes]:
    """One event per generated token, sent as it comes, with the token's own text; the last carries
    `generated_text` (the output text: a stop string cuts it) and `details`."""
    p = body.parameters
    detok = shape.detokenizer(prompt_ids)
    parts: list[str] = []
    index = 0
    async for ev, text, t, lp, last in _tokens(run):
        parts.append(text)
        index += 1
        frame: dict[str, Any] = {"index": index, "token": shape.token(t, lp, shape.token_text(detok, t, last)),
                                 "generated_text": None, "details": None}  # fmt: skip
        if p.top_n_tokens:
            frame["top_tokens"] = shape.top_tokens(lp)
        if last:
            out = "".join(parts)
            frame["generated_text"] = body.inputs + out if p.return_full_text else out
            frame["details"] = shape.details(ev, t, out)
        yield sse(frame)


def _error_frame(e: APIError) -> bytes:
    """An error after the stream began: the server's error body, plus TGI's `error_type` so the TGI and LoRAX
    clients raise their matching exception class."""
    return sse(with_tgi_error_type(stream_error(e), e.status))


TGI_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with `stream: true` Server-Sent Events (`data: {token, generated_text, details}`, "
        "no `[DONE]`: TGI's protocol)",
        "content": SSE_DOC[200]["content"],
    }
}


@router.get(
    "/health",
    responses={503: {"description": "Not ready to serve (Retry-After)"}},
    summary="TGI's /health (what InferenceClient.health_check asks): 200 when this server can serve, as /ready",
)
async def tgi_health(request: Request) -> Any:
    return await ready(request)


@router.get("/info", responses=COMMON_ERRORS, summary="TGI's /info: the model and the limits of this server")
async def tgi_info(request: Request, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
    svc = get_service(request)
    llm, settings = svc.llm, svc.settings
    # what a request may send (413 above) and hold in all (without a prefix)
    max_total = min(llm.max_model_len, llm.max_request_tokens)
    max_input = min(settings.max_prompt_tokens, max_total - 1)
    return {
        "model_id": svc.bundle.name,
        "model_sha": svc.bundle.fingerprint,
        "model_dtype": str(svc.bundle.dtype).removeprefix("torch."),
        "model_device_type": svc.bundle.device.type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": llm.capacity,
        "max_best_of": settings.max_best_of,
        "max_stop_sequences": settings.max_stop_strings,
        "max_input_tokens": max_input,
        "max_input_length": max_input,  # TGI before 2.0
        "max_total_tokens": min(max_total, max_input + settings.max_new_tokens),
        # not TGI's: its two limits cannot say that max_new_tokens is capped on its own as well
        "max_new_tokens": settings.max_new_tokens,
        "max_batch_size": llm.cfg.max_num_seqs,
        "validation_workers": 1,
        "router": "prefixserve",
        "version": __version__,
    }


@router.post(
    "",
    response_model=list[TGIResponse],
    responses={**TGI_DOC, **COMMON_ERRORS},
    summary="TGI / LoRAX compatible generation (their clients' base URL): [response], or events with stream",
)
async def compat_generate(
    body: TGIRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    return await _respond(body, request, principal, as_list=True)


@router.post(
    "/generate",
    response_model=TGIResponse,
    responses=COMMON_ERRORS,
    summary="TGI's /generate: one response",
)
async def tgi_generate(
    body: TGIRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    return await _respond(body.model_copy(update={"stream": False}), request, principal, as_list=False)


@router.post(
    "/generate_stream",
    responses={**TGI_DOC, **COMMON_ERRORS},
    summary="TGI's /generate_stream: one event per token",
)
async def tgi_generate_stream(
    body: TGIRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    return await _respond(body.model_copy(update={"stream": True}), request, principal, as_list=False)


# TGI serves OpenAI's API at its own root too: huggingface_hub's `InferenceClient(base_url=".../tgi")
# .chat_completion(...)` posts to /tgi/v1/chat/completions with model "dummy" (TGI's own clients: "tgi"), which from a
# tenant key is the key's tenant on the base model here (`served_names`); `model: "tenant/prefix"` names a prefix, as
# LoRAX's OpenAI routes take the adapter there. `model` may be left out there (TGI ignores it): "tgi". Out of the
# OpenAPI document, where /v1 has them.
_TGIModel = Annotated[
    str,
    BeforeValidator(lambda v: TGI_PLACEHOLDER_MODELS[0] if v is None else v),  # (TGI's is an optional string)
    Field(min_length=1, max_length=MAX_MODEL_ID),
]


class _TGIChatCompletionRequest(ChatCompletionRequest):
    model: _TGIModel = TGI_PLACEHOLDER_MODELS[0]


class _TGICompletionRequest(CompletionRequest):
    model: _TGIModel = TGI_PLACEHOLDER_MODELS[0]


async def _tgi_chat_completions(
    body: _TGIChatCompletionRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    return await routes_openai.chat_completions(body, request, principal)


async def _tgi_completions(
    body: _TGICompletionRequest, request: Request, principal: Principal = Depends(get_principal)
) -> Any:
    return await routes_openai.completions(body, request, principal)


for _path, _endpoint, _method in (
    ("/v1/chat/completions", _tgi_chat_completions, "POST"),
    ("/v1/completions", _tgi_completions, "POST"),
    ("/v1/models", routes_openai.list_models, "GET"),
):
    router.add_api_route(_path, _endpoint, methods=[_method], response_model=None, include_in_schema=False)
