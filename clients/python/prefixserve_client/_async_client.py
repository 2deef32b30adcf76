"""Asynchronous client: the same API as :class:`Client`, with coroutines and async iterators."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Mapping, Sequence
from typing import Any, Optional, Union

import httpx

from . import _base
from ._base import Examples, StructuredOutputsArg, TimeoutTypes
from ._client import _json_or_none, _seg
from ._exceptions import UnprocessableEntity, status_error_from_response
from .types import (
    AsyncJob,
    DeletedPrefix,
    Generation,
    Health,
    ModelCard,
    ModelList,
    PrefixInfo,
    PrefixPage,
    Readiness,
    ServerInfo,
    StreamDelta,
    Tokenized,
    UsageReport,
)

__all__ = ["AsyncClient", "AsyncPrefixes", "AsyncStream"]


async def _nothing() -> AsyncGenerator[StreamDelta, None]:
    """The stream of a stream closed before it was sent."""
    return
    yield


class AsyncStream(_base.StreamBase):
    """Async iterator of :class:`StreamDelta`; the request is sent on the first ``__anext__``.

    ``async with client.stream(...) as s: async for d in s: ...`` closes it early; so does ``aclose()``.
    """

    _gen: Optional[AsyncGenerator[StreamDelta, None]]

    @staticmethod
    async def _iterate(
        client: AsyncClient, body: dict[str, Any], headers: dict[str, str], info: _base.StreamInfo
    ) -> AsyncGenerator[StreamDelta, None]:
        response = await client._open_stream("POST", "/generate", body, headers)
        try:
            info.response = response
            info.request_id = response.headers.get("x-request-id")
            if "text/event-stream" not in response.headers.get("content-type", ""):
                try:
                    await response.aread()
                except httpx.TransportError as e:
                    raise _base.wrap_transport_error(e) from e
                yield _base.one_piece_delta(response)
                return
            state = _base.StreamState(info.request_id)
            parser = _base.SSEParser()
            # (not aiter_lines: it splits lines where SSE does not, at U+2028 and the like in a generated text)
            chunks = response.aiter_text()
            try:
                async for text in chunks:
                    for ev in parser.feed(text):
                        payload = state.handle(*ev)
                        if payload is not None:
                            yield _base.parse_model(StreamDelta, payload, response)
                        if state.done:
                            await _base.adrain(chunks)
                            return
                for ev in parser.flush():
                    payload = state.handle(*ev)
                    if payload is not None:
                        yield _base.parse_model(StreamDelta, payload, response)
            except httpx.TransportError as e:
                raise _base.wrap_transport_error(e) from e
            state.check_end()
        finally:
            await response.aclose()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if self._gen is None:
            self._gen = self._iterate(self._client, self._body, self._headers, self._info)
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """End the stream: its connection is closed, which cancels the generation on the server (not sent yet:
        it never is)."""
        if self._gen is None:
            self._gen = _nothing()
        await self._gen.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class AsyncPrefixes:
    """Training jobs and stored prefixes: ``client.prefixes`` (coroutines)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def _job(self, job: AsyncJob) -> AsyncJob:
        job._client = self._client
        return job

    async def train(
        self,
        tenant_id: Optional[str],
        name: str,
        method: Optional[str] = None,
        examples: Optional[Examples] = None,
        *,
        prefix_length: Optional[int] = None,
        hyperparameters: Optional[dict[str, Any]] = None,
        request_id: Optional[str] = None,
        init_from: Optional[Union[str, tuple[str, int]]] = None,
        idempotency_key: Optional[str] = None,
        **kwargs: Any,
    ) -> AsyncJob:
        """See :meth:`Prefixes.train`."""
        if examples is None:
            raise TypeError("train() needs examples (a list of dicts or a JSONL path)")
        hp = _base.merge_hyperparameters(hyperparameters, kwargs)
        body = _base.train_body(tenant_id, name, method, examples, prefix_length, hp, init_from)
        key = _base.new_idempotency_key(idempotency_key)
        r = await self._client._request(
            "POST", "/prefixes", json=body, request_id=request_id, idempotency_key=key
        )
        return self._job(_base.parse_response(AsyncJob, r))

    async def get_job(self, job_id: str) -> AsyncJob:
        """A training job's current state (``GET /prefixes/jobs/{job_id}``); see :meth:`Prefixes.get_job`."""
        r = await self._client._request("GET", f"/prefixes/jobs/{_seg(job_id)}")
        return self._job(_base.parse_response(AsyncJob, r))

    async def cancel_job(self, job_id: str) -> AsyncJob:
        """Ask the server to cancel a training job; see :meth:`Prefixes.cancel_job`."""
        r = await self._client._request("POST", f"/prefixes/jobs/{_seg(job_id)}/cancel")
        return self._job(_base.parse_response(AsyncJob, r))

    async def list_jobs(self, tenant_id: Optional[str] = None) -> builtins.list[AsyncJob]:
        """Training jobs of a tenant (``GET /prefixes/jobs``); see :meth:`Prefixes.list_jobs`."""
        params = {"tenant_id": tenant_id} if tenant_id else None
        r = await self._client._request("GET", "/prefixes/jobs", params=params)
        return [self._job(job) for job in _base.parse_list(AsyncJob, r)]

    async def iter_jobs(
        self, tenant_id: Optional[str] = None, *, page_size: int = 100
    ) -> AsyncIterator[AsyncJob]:
        """Every training job (as :meth:`list_jobs`, oldest first), fetched a page of ``page_size`` at a time; see
        :meth:`Prefixes.iter_jobs`."""
        after: Optional[str] = None
        seen: set[str] = set()
        while True:
            try:
                params = _base.list_params(tenant_id, page_size, after)
                r = await self._client._request("GET", "/prefixes/jobs", params=params)
            except UnprocessableEntity as e:
                if after is None or e.param != "after":
                    raise
                after = None
                continue
            jobs = [self._job(job) for job in _base.parse_list(AsyncJob, r)]
            for job in _base.unseen(jobs, seen):
                yield job
            after = _base.next_after(r, [j.job_id for j in jobs])
            if after is None:
                return

    async def list(
        self, tenant_id: Optional[str] = None, *, limit: Optional[int] = None, after: Optional[str] = None
    ) -> PrefixPage:
        """Stored prefixes of a tenant (None: the key's own tenant; every tenant for the admin key), sorted by
        tenant and name: all of them, or one page of at most ``limit`` after the ``after`` cursor (the ``last_id`` of
        the page before). See :meth:`iter` to walk every page."""
        params = _base.list_params(tenant_id, limit, after)
        return _base.parse_page(await self._client._request("GET", "/prefixes", params=params))

    async def iter(
        self, tenant_id: Optional[str] = None, *, page_size: int = 1000
    ) -> AsyncIterator[PrefixInfo]:
        """Every stored prefix (as :meth:`list`), fetched a page of ``page_size`` at a time."""
        after = None
        while True:
            page = await self.list(tenant_id, limit=page_size, after=after)
            for item in page:
                yield item
            if not page.has_more or page.last_id is None:
                return
            after = page.last_id

    async def get(self, tenant_id: str, name: str, version: Optional[int] = None) -> PrefixInfo:
        """The latest version's metadata (or ``version``'s), with ``.versions``: every stored version."""
        params = {"version": version} if version is not None else None
        r = await self._client._request("GET", f"/prefixes/{_seg(tenant_id)}/{_seg(name)}", params=params)
        return _base.parse_response(PrefixInfo, r)

    async def delete(self, tenant_id: str, name: str, version: Optional[int] = None) -> DeletedPrefix:
        """Every version of the prefix, or only ``version`` (deleting the latest rolls back to the one before)."""
        params = {"version": version} if version is not None else None
        r = await self._client._request(
            "DELETE", f"/prefixes/{_seg(tenant_id)}/{_seg(name)}", params=params, safe=False
        )
        return _base.parse_response(DeletedPrefix, r)

    async def upload(
        self,
        tenant_id: str,
        name: str,
        source: Union[_base.PathLike, bytes],
        *,
        adapter_config: Optional[Union[_base.PathLike, bytes]] = None,
        prompt_format: Optional[str] = None,
        request_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> PrefixInfo:
        """Store a prefix made elsewhere as a new version of ``tenant_id``/``name`` (``POST .../upload``).

        ``source``: a file from :meth:`download` (this or another server with the same base model), or a PEFT
        prefix-tuning / prompt-tuning adapter: its ``save_pretrained`` folder, its ``adapter_model.safetensors``
        (with ``adapter_config.json`` beside it or given as ``adapter_config``), or bytes. ``prompt_format``
        (``"chat"`` / ``"raw"``): how prompts are rendered for it (default: the export's own; ``"raw"`` for PEFT).
        The server refuses a prefix for another base model (422 ``prefix_incompatible``), a damaged file
        (``prefix_corrupt``) or an unsupported adapter (``invalid_prefix``) and then stores nothing. Safe to retry:
        the upload carries an ``Idempotency-Key`` (``idempotency_key``, or a fresh random one per call), so a retry
        after a lost response (408/429/503, connection failures, timeouts: all retried) gets the version the first
        attempt stored (while the server keeps it), never a second one.
        """
        files, form = await asyncio.to_thread(_base.upload_form, source, adapter_config, prompt_format)
        path = f"/prefixes/{_seg(tenant_id)}/{_seg(name)}/upload"
        r = await self._client._request(
            "POST",
            path,
            files=files,
            data=form,
            request_id=request_id,
            idempotency_key=_base.new_idempotency_key(idempotency_key),
        )
        return _base.parse_response(PrefixInfo, r)

    async def download(
        self,
        tenant_id: str,
        name: str,
        *,
        version: Optional[int] = None,
        path: Optional[_base.PathLike] = None,
    ) -> bytes:
        """One version (default: the latest) as a prefix export file (safetensors with the record's metadata);
        written to ``path`` too when given (atomically). :meth:`upload` takes it back, here or on another
        server with the same base model."""
        params = {"version": version} if version is not None else None
        r = await self._client._request(
            "GET", f"/prefixes/{_seg(tenant_id)}/{_seg(name)}/download", params=params
        )
        if path is not None:
            await asyncio.to_thread(_base.write_file_atomic, path, r.content)
        return r.content


class AsyncClient(_base.WithOptions):
    """Asynchronous PrefixServe client; same configuration and retry policy as :class:`Client`."""

    _http: httpx.AsyncClient

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: Union[TimeoutTypes, _base.NotGiven] = _base.NOT_GIVEN,
        max_retries: int = _base.DEFAULT_MAX_RETRIES,
        *,
        headers: Optional[dict[str, str]] = None,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = _base.resolve_base_url(base_url)
        self.api_key = _base.resolve_api_key(api_key)
        self.timeout = _base.resolve_timeout(timeout, http_client)
        self.max_retries = max_retries
        self._headers = _base.default_headers(self.api_key, headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)
        self.prefixes = AsyncPrefixes(self)
        self._extra_headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, max_retries={self.max_retries})"

    async def aclose(self) -> None:
        """Close the connection pool (not a ``http_client`` you passed in: that one stays yours); ``close`` is the
        same coroutine."""
        if self._owns_http:
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ transport

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Optional[dict[str, Any]] = None,
        request_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        retries: Optional[int] = None,
        ok_statuses: Sequence[int] = (),
        files: Optional[dict[str, Any]] = None,
        data: Optional[dict[str, str]] = None,
        safe: bool = True,
        final_codes: Collection[str] = (),
    ) -> httpx.Response:
        """`safe`: the request may be repeated after a failure that may have reached the server (a lost answer);
        False for a DELETE (its repeat would answer 404 for what the first one did). An error whose code is in
        `final_codes` is never retried."""
        max_retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            headers = _base.request_headers(request_id, idempotency_key)
            request = self._build(method, path, json, params, headers, files, data)
            try:
                response = await self._http.send(request)
            except httpx.TransportError as e:
                error: Exception = _base.wrap_transport_error(e)
                cause: Optional[BaseException] = e
                if not _base.may_resend(e, safe):
                    raise error from e
            else:
                if response.status_code < 400 or response.status_code in ok_statuses:
                    return response
                error, cause = status_error_from_response(response), None
            delay = _base.retry_delay(attempt, error, safe, final_codes) if attempt < max_retries else None
            if delay is None:
                raise error from cause
            attempt += 1
            await self._sleep(delay)

    async def _open_stream(
        self, method: str, path: str, body: Any, headers: dict[str, str]
    ) -> httpx.Response:
        attempt = 0
        while True:
            request = self._build(method, path, body, None, headers)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as e:
                error: Exception = _base.wrap_transport_error(e)
                cause: Optional[BaseException] = e
                if not _base.may_resend(e, True):
                    raise error from e
            else:
                if response.status_code < 400:
                    return response
                try:
                    await response.aread()
                    error, cause = status_error_from_response(response), None
                except (
                    httpx.TransportError
                ) as e:  # the error body broke off: a connection error, retried as one
                    error, cause = _base.wrap_transport_error(e), e
                finally:
                    await response.aclose()
            delay = _base.retry_delay(attempt, error, True) if attempt < self.max_retries else None
            if delay is None:
                raise error from cause
            attempt += 1
            await self._sleep(delay)

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        tenant_id: Optional[str],
        prompt: str,
        *,
        prefix: Optional[str] = "default",
        prefix_version: Optional[int] = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logprobs: Optional[int] = None,
        prompt_logprobs: Optional[int] = None,
        logit_bias: Optional[dict[int, float]] = None,
        allowed_token_ids: Optional[Sequence[int]] = None,
        bad_words: Optional[Union[str, Sequence[str]]] = None,
        min_tokens: int = 0,
        stop_token_ids: Optional[Sequence[int]] = None,
        structured_outputs: Optional[StructuredOutputsArg] = None,
        min_p: float = 0.0,
        typical_p: float = 1.0,
        watermark: bool = False,
        include_stop_str_in_output: bool = False,
        truncate_prompt_tokens: Optional[int] = None,
        priority: int = 0,
        ignore_eos: bool = False,
        prompt_format: Optional[str] = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        request_id: Optional[str] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> Generation:
        """``POST /generate``; the arguments are those of :meth:`Client.generate`."""
        body = _base.generate_body(
            tenant_id,
            prompt,
            prefix=prefix,
            prefix_version=prefix_version,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stream=False,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias,
            allowed_token_ids=allowed_token_ids,
            bad_words=bad_words,
            min_tokens=min_tokens,
            stop_token_ids=stop_token_ids,
            structured_outputs=structured_outputs,
            min_p=min_p,
            typical_p=typical_p,
            watermark=watermark,
            include_stop_str_in_output=include_stop_str_in_output,
            truncate_prompt_tokens=truncate_prompt_tokens,
            priority=priority,
            ignore_eos=ignore_eos,
            prompt_format=prompt_format,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            extra_body=extra_body,
        )
        r = await self._request("POST", "/generate", json=body, request_id=request_id)
        gen = _base.parse_response(Generation, r)
        gen.request_id = r.headers.get("x-request-id")
        return gen

    def stream(
        self,
        tenant_id: Optional[str],
        prompt: str,
        *,
        prefix: Optional[str] = "default",
        prefix_version: Optional[int] = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: Optional[int] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logprobs: Optional[int] = None,
        prompt_logprobs: Optional[int] = None,
        logit_bias: Optional[dict[int, float]] = None,
        allowed_token_ids: Optional[Sequence[int]] = None,
        bad_words: Optional[Union[str, Sequence[str]]] = None,
        min_tokens: int = 0,
        stop_token_ids: Optional[Sequence[int]] = None,
        structured_outputs: Optional[StructuredOutputsArg] = None,
        min_p: float = 0.0,
        typical_p: float = 1.0,
        watermark: bool = False,
        include_stop_str_in_output: bool = False,
        truncate_prompt_tokens: Optional[int] = None,
        priority: int = 0,
        ignore_eos: bool = False,
        prompt_format: Optional[str] = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        request_id: Optional[str] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> AsyncStream:
        """An async iterator (not a coroutine): ``async for delta in client.stream(...)``."""
        body = _base.generate_body(
            tenant_id,
            prompt,
            prefix=prefix,
            prefix_version=prefix_version,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            stream=True,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias,
            allowed_token_ids=allowed_token_ids,
            bad_words=bad_words,
            min_tokens=min_tokens,
            stop_token_ids=stop_token_ids,
            structured_outputs=structured_outputs,
            min_p=min_p,
            typical_p=typical_p,
            watermark=watermark,
            include_stop_str_in_output=include_stop_str_in_output,
            truncate_prompt_tokens=truncate_prompt_tokens,
            priority=priority,
            ignore_eos=ignore_eos,
            prompt_format=prompt_format,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            extra_body=extra_body,
        )
        headers = {**_base.request_headers(request_id), "Accept": "text/event-stream"}
        return AsyncStream(self, body, headers)

    # ------------------------------------------------------------------ operations
    async def health(self) -> Health:
        """``GET /health``: the process answers and its inference engine runs. A 503 ``engine_dead`` (only a
        restart brings the engine back) is raised at once, not retried."""
        return _base.parse_response(
            Health, await self._request("GET", "/health", final_codes=_base.FINAL_HEALTH_CODES)
        )

    async def ready(self) -> Readiness:
        """``GET /ready``, not retried: ``status`` is ``"ready"`` or ``"not_ready"`` (``checks`` says why)."""
        r = await self._request("GET", "/ready", retries=0, ok_statuses=(503,))
        if r.status_code == 503:
            body = _json_or_none(r)
            if not (isinstance(body, dict) and "status" in body):
                raise status_error_from_response(r)
            return _base.parse_model(Readiness, body, r)
        return _base.parse_response(Readiness, r)

    async def tokenize(
        self,
        tenant_id: Optional[str],
        prompt: Optional[str] = None,
        *,
        prefix: Optional[str] = "default",
        prefix_version: Optional[int] = None,
        messages: Optional[Sequence[dict[str, Any]]] = None,
        prompt_format: Optional[str] = None,
        tools: Optional[Sequence[dict[str, Any]]] = None,
        add_generation_prompt: Optional[bool] = None,
        continue_final_message: Optional[bool] = None,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        add_special_tokens: Optional[bool] = None,
        return_token_strs: bool = False,
        model: Optional[str] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> Tokenized:
        """``POST /tokenize``: the ids a generation with ``prefix`` would feed for ``prompt`` (in the prefix's
        prompt format) or for chat ``messages``; ``.room`` is what is left of the context for the output.
        ``messages`` are rendered with what a chat completion renders them with: ``tools``,
        ``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``; the other arguments are
        those of :meth:`Client.tokenize`."""
        chat = _base.chat_options(tools, add_generation_prompt, continue_final_message, chat_template_kwargs)
        body = _base.tokenize_body(
            tenant_id,
            prompt,
            prefix,
            messages,
            prefix_version,
            prompt_format,
            chat,
            add_special_tokens=add_special_tokens,
            return_token_strs=return_token_strs,
            model=model,
            extra_body=extra_body,
        )
        return _base.parse_response(Tokenized, await self._request("POST", "/tokenize", json=body))

    async def detokenize(
        self,
        tokens: Sequence[int],
        *,
        model: Optional[str] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
    ) -> str:
        """``POST /detokenize``: the text of token ids; the arguments are those of :meth:`Client.detokenize`."""
        body = _base.detokenize_body(tokens, model, extra_body)
        r = await self._request("POST", "/detokenize", json=body)
        return str(_base.parse_field(r, "prompt", str))

    async def info(self) -> ServerInfo:
        """``GET /info``: the base model, its fingerprint and limits (``max_model_len``, ...) and how it is run."""
        return _base.parse_response(ServerInfo, await self._request("GET", "/info"))

    async def models(self) -> ModelList:
        """``GET /v1/models``: the key's tenant prefixes as OpenAI model ids ``tenant/prefix``."""
        return _base.parse_response(ModelList, await self._request("GET", "/v1/models"))

    async def retrieve_model(self, model: str) -> ModelCard:
        """``GET /v1/models/{model}``: one model id (as :meth:`Client.retrieve_model`)."""
        return _base.parse_response(ModelCard, await self._request("GET", _base.model_path(model)))

    async def version(self) -> str:
        """``GET /version``: the server's version."""
        return str(_base.parse_field(await self._request("GET", "/version"), "version", str))

    async def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return (await self._request("GET", "/metrics")).text

    async def usage(
        self, tenant_id: Optional[str] = None, *, limit: Optional[int] = None, after: Optional[str] = None
    ) -> UsageReport:
        """``GET /usage``: tokens and requests since the server started, with the rate limits and what is left of
        them; the key's own tenant (the admin key: every tenant, in pages by tenant id of ``limit`` (the server's
        default: 1000) after ``after`` (the previous page's ``last_id``; ``has_more`` says whether to ask again),
        or ``tenant_id``)."""
        params = _base.usage_params(tenant_id, limit, after)
        return _base.parse_response(UsageReport, await self._request("GET", "/usage", params=params))
