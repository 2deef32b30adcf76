"""What the sync and async clients share: configuration, request bodies, retry policy, SSE decoding."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import uuid
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar, Union
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from ._exceptions import (
    FINAL_CODES,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    _request_id,
    status_error_from_event,
)
from ._version import __version__
from .types import Generation, JobInfo, PrefixInfo, PrefixPage, StreamDelta

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_PREFIX = "default"  # the prefix of a generation that names none
BASE_URL_ENV = "PREFIXSERVE_BASE_URL"
API_KEY_ENV = "PREFIXSERVE_API_KEY"
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
DEFAULT_MAX_RETRIES = 3
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
# A Retry-After above this is not waited for: the error is raised at once (its .retry_after says how long).
MAX_RETRY_AFTER_S = 60.0
RETRY_STATUSES = frozenset({429, 503})
# retried only for a request that is safe to repeat (reads, generation, writes with an Idempotency-Key): a server or
# proxy may answer 408 for a request it had begun to act on, and a proxy 502/504 for one the server received
RETRY_STATUSES_IF_SAFE = frozenset({408, 502, 504})
# the 503 codes of GET /health that no retry can change: the inference engine died, only a restart brings it back
FINAL_HEALTH_CODES = frozenset({"engine_dead"})

Examples = Union[Sequence[dict[str, Any]], str, os.PathLike[str]]
# {"json": schema} / {"regex": ...} / {"choice": [...]} / {"grammar": ...} / {"json_object": True} /
# {"structural_tag": {"structures": [...], "triggers": [...]}}, or a pydantic model class (its JSON schema)
StructuredOutputsArg = Union[Mapping[str, Any], type]
TimeoutTypes = Union[float, httpx.Timeout, None]


class NotGiven:
    """The default of an argument the caller did not pass (``None`` means something: no timeout)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()


def resolve_base_url(base_url: Optional[str]) -> str:
    url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    if not url.lower().startswith(("http://", "https://")):  # "localhost:8000" would fail every call, retried
        where = "base_url" if base_url else f"${BASE_URL_ENV}"
        raise ValueError(f"{where} must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    key = api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None:
        check_header_value("api_key" if api_key else f"${API_KEY_ENV}", key, secret=True)
    return key


def check_header_value(what: str, value: str, secret: bool = False) -> str:
    """`value` if an HTTP header can carry it (visible ASCII, spaces between), else ValueError naming `what` and
    the first character it cannot carry: httpx would refuse it at every call, each time a transport error (a key
    read from a file keeps its newline). A `secret` value (a key) is never shown, only where it goes wrong."""
    bad = None
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    for i, ch in enumerate(value):
        if not (" " <= ch <= "~" or ch == "\t"):
            bad = f"{ch!r} at position {i}"
            break
    if bad is None and value != value.strip(" \t"):
        bad = "leading or trailing whitespace"
    if bad is not None:
        shown = "" if secret else f" {value!r}"
        raise ValueError(
            f"{what}{shown} cannot be sent in an HTTP header: {bad} (only visible ASCII characters, with spaces "
            "between them; a trailing newline from a file or an environment variable?)"
        )
    return value


# headers whose values are credentials: never shown in an error
_SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key", "api-key")


def _secret_header(name: str) -> bool:
    n = name.lower()
    return n in _SECRET_HEADERS or n.endswith(("-key", "-token", "-secret"))


def resolve_timeout(
    timeout: Any, http_client: Optional[Union[httpx.Client, httpx.AsyncClient]] = None
) -> httpx.Timeout:
    """The timeout of every request: ``timeout`` when given, else the given ``http_client``'s own, else
    ``DEFAULT_TIMEOUT``."""
    if isinstance(timeout, NotGiven):
        return http_client.timeout if http_client is not None else DEFAULT_TIMEOUT
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:
        return httpx.Timeout(None)
    return httpx.Timeout(float(timeout), connect=min(float(timeout), 10.0))


_Client = TypeVar("_Client", bound="WithOptions")


class WithOptions:
    """`with_options`, for the sync and the async client alike (both take these constructor arguments)."""

    base_url: str
    api_key: Optional[str]
    timeout: httpx.Timeout
    max_retries: int
    _extra_headers: dict[str, str]
    _headers: dict[str, str]
    _http: Any

    def _build(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Optional[dict[str, Any]] = None,
        headers: Optional[dict[str, str]] = None,
        files: Optional[dict[str, Any]] = None,
        data: Optional[dict[str, str]] = None,
    ) -> httpx.Request:
        content = None
        headers = {**self._headers, **(headers or {})}
        if json is not None:
            content = encode_json(json)
            headers["Content-Type"] = "application/json"
        request: httpx.Request = self._http.build_request(
            method,
            self.base_url + path,
            content=content,
            params=params,
            files=files,
            data=data,
            headers=headers,
            timeout=self.timeout,
        )
        return request

    def with_options(
        self: _Client,
        *,
        timeout: Union[TimeoutTypes, NotGiven] = NOT_GIVEN,
        max_retries: Optional[int] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> _Client:
        """A client like this one with some options changed, for a call or a few:
        ``client.with_options(timeout=5, max_retries=0).generate(...)``. It shares this client's connection pool
        (closing it leaves the pool open; closing this client closes the pool for both); ``headers`` are added to
        this client's own."""
        return type(self)(  # type: ignore[call-arg]
            self.base_url,
            self.api_key,
            self.timeout if isinstance(timeout, NotGiven) else timeout,
            self.max_retries if max_retries is None else max_retries,
            headers={**self._extra_headers, **(headers or {})},
            http_client=self._http,
        )


def encode_json(obj: Any) -> bytes:
    """A request's JSON body, UTF-8. Text that UTF-8 cannot carry (a lone surrogate, from a broken decode) is sent
    as JSON escapes, for the server to answer with its 422 naming the field, not a UnicodeEncodeError here."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # (json's own message names no field)
        bad = _non_finite(obj)
        if bad is None:
            raise
        raise ValueError(
            f"{bad[0] or 'the request body'} is {bad[1]!r}: JSON has no NaN or infinity to send"
        ) from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def _non_finite(obj: Any, path: str = "") -> Optional[tuple[str, float]]:
    """The first float in `obj` that JSON cannot carry (NaN, an infinity), with its path (``temperature``,
    ``hyperparameters.learning_rate``, ``messages[0]...``), or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _non_finite(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _non_finite(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def default_headers(api_key: Optional[str], extra: Optional[dict[str, str]]) -> dict[str, str]:
    h = {"User-Agent": f"prefixserve-client/{__version__}", "Accept": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    for name, value in (extra or {}).items():
        h[name] = check_header_value(f"header {name!r}", value, secret=_secret_header(name))
    return h


# the X-Request-ID the server keeps (server/api/app.py REQUEST_ID_RE): it replaces any other with a random one, so the
# id of the answer, of its error and of the server's log lines would not be the one sent
REQUEST_ID_PATTERN = "[A-Za-z0-9._:+=/-]{1,128}"
_REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)


def check_request_id(request_id: str) -> str:
    """`request_id` if the server keeps it as the request's id, else ValueError naming the pattern."""
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, not {type(request_id).__name__}")
    if not _REQUEST_ID_RE.fullmatch(request_id):
        shown = (
            repr(request_id) if len(request_id) <= 40 else f"{request_id[:40]!r}... ({len(request_id)} chars)"
        )
        raise ValueError(
            f"request_id {shown} must match {REQUEST_ID_PATTERN} (1 to 128 letters, digits or ._:+=/-): the server "
            "would replace it with an id of its own"
        )
    return request_id


def request_headers(request_id: Optional[str], idempotency_key: Optional[str] = None) -> dict[str, str]:
    headers = {"X-Request-ID": check_request_id(request_id)} if request_id is not None else {}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = check_header_value("idempotency_key", idempotency_key)
    return headers


def new_idempotency_key(given: Optional[str]) -> str:
    """The Idempotency-Key of a submission: ``given``, or a fresh random one (one per call, reused by its retries)."""
    if given is None:
        return f"sdk-{uuid.uuid4()}"
    if not isinstance(given, str) or not 1 <= len(given) <= 255 or not all("!" <= c <= "~" for c in given):
        raise ValueError("idempotency_key must be 1 to 255 visible ASCII characters")
    return given


def generate_body(
    tenant_id: Optional[str],
    prompt: str,
    *,
    prefix: Optional[str],
    max_tokens: int,
    prefix_version: Optional[int] = None,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: Optional[int],
    stop: Optional[Union[str, Sequence[str]]],
    stream: bool,
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
    extra_body: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /generate``; optional fields are sent only when set (older servers refuse unknown
    fields); ``extra_body``'s fields are added last (over any of the same name)."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "prefix": prefix,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "stream": stream,
    }
    if tenant_id is not None:
        body["tenant_id"] = tenant_id
    if prefix_version is not None:
        body["prefix_version"] = prefix_version
    if seed is not None:
        body["seed"] = seed
    if stop is not None:
        body["stop"] = stop if isinstance(stop, str) else list(stop)
    if presence_penalty:
        body["presence_penalty"] = presence_penalty
    if frequency_penalty:
        body["frequency_penalty"] = frequency_penalty
    if repetition_penalty != 1.0:
        body["repetition_penalty"] = repetition_penalty
    if logprobs is not None:
        body["logprobs"] = logprobs
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    if logit_bias:
        body["logit_bias"] = {str(int(t)): float(b) for t, b in logit_bias.items()}
    if allowed_token_ids:
        body["allowed_token_ids"] = [int(t) for t in allowed_token_ids]
    if bad_words:  # (one word as a string: that word, not its letters)
        body["bad_words"] = [bad_words] if isinstance(bad_words, str) else [str(w) for w in bad_words]
    if min_tokens:
        body["min_tokens"] = min_tokens
    if stop_token_ids:
        body["stop_token_ids"] = [int(t) for t in stop_token_ids]
    if structured_outputs is not None:
        body["structured_outputs"] = structured_outputs_body(structured_outputs)
    if min_p:
        body["min_p"] = min_p
    if typical_p != 1.0:
        body["typical_p"] = typical_p
    if watermark:
        body["watermark"] = True
    if include_stop_str_in_output:
        body["include_stop_str_in_output"] = True
    if truncate_prompt_tokens is not None:
        body["truncate_prompt_tokens"] = truncate_prompt_tokens
    if priority:
        body["priority"] = priority
    if ignore_eos:
        body["ignore_eos"] = True
    if prompt_format is not None:
        body["prompt_format"] = prompt_format
    if not skip_special_tokens:
        body["skip_special_tokens"] = False
    if not spaces_between_special_tokens:
        body["spaces_between_special_tokens"] = False
    return merge_extra_body(body, extra_body, reserved=("stream",))


def merge_extra_body(
    body: dict[str, Any], extra_body: Optional[Mapping[str, Any]], reserved: Sequence[str] = ()
) -> dict[str, Any]:
    """``body`` with ``extra_body``'s fields added (as the openai SDK's ``extra_body``: fields of the server this
    SDK has no argument for; they win over the SDK's own). ``reserved`` fields are the method's to set."""
    if extra_body is None:
        return body
    if not isinstance(extra_body, Mapping):
        raise TypeError(f"extra_body must be a mapping, not {type(extra_body).__name__}")
    for key in extra_body:
        if not isinstance(key, str):
            raise TypeError(f"extra_body's keys must be strings, not {type(key).__name__}")
        if key in reserved:
            raise ValueError(f"extra_body cannot set {key!r}: the method sets it")
    body.update(extra_body)
    return body


def structured_outputs_body(value: StructuredOutputsArg) -> dict[str, Any]:
    """The ``structured_outputs`` object: a mapping as given, a pydantic model class as ``{"json": its schema}``
    made strict (:func:`strict_json_schema`)."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"json": strict_json_schema(value.model_json_schema())}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(
        "structured_outputs must be a dict ({'json': schema}, {'regex': ...}, {'choice': [...]}, {'grammar': ...}, "
        "{'json_object': True}, {'structural_tag': {...}}) or a pydantic model class"
    )


# keywords whose value is one schema / a list of schemas / a mapping of names to schemas (JSON Schema 2020-12 and
# draft 7): the places a strict schema's objects can be (data keywords such as `default`, `enum`, `const` and
# `examples` are never walked: their objects are values, not schemas)
_SCHEMA_KEYS = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames")
_SCHEMA_LIST_KEYS = ("prefixItems", "items", "anyOf", "oneOf", "allOf")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a JSON schema in which every object schema without ``additionalProperties`` gets
    ``"additionalProperties": false``, in ``$defs`` too (what ``openai``'s ``.parse()`` does to a pydantic model's
    schema). Without it an object may hold any further key, and a constrained model may go on adding keys until
    ``max_tokens``. An object that says what else it allows (a pydantic model with ``extra="allow"``, a ``dict``
    field) keeps its ``additionalProperties``, and one without ``properties`` (a ``dict`` field, as pydantic before
    2.11 writes it) stays open."""
    out = copy.deepcopy(schema)
    _make_strict(out)
    return out


def _make_strict(node: Any) -> None:
    if not isinstance(node, dict):
        return
    # an object that names its properties (a pydantic model, even one without fields) is closed; one that names none
    # is a dict (any keys): pydantic before 2.11 writes `dict[str, Any]` as a bare {"type": "object"}, which
    # closing would force to be {}
    if "properties" in node and "additionalProperties" not in node:
        node["additionalProperties"] = False
    for key in _SCHEMA_KEYS:
        if isinstance(node.get(key), dict):
            _make_strict(node[key])
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(node.get(key), list):
            for sub in node[key]:
                _make_strict(sub)
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(node.get(key), dict):
            for sub in node[key].values():
                _make_strict(sub)
    if isinstance(node.get("additionalProperties"), dict):
        _make_strict(node["additionalProperties"])


def chat_options(
    tools: Optional[Sequence[dict[str, Any]]],
    add_generation_prompt: Optional[bool],
    continue_final_message: Optional[bool],
    chat_template_kwargs: Optional[dict[str, Any]],
) -> dict[str, Any]:
    """What /tokenize renders chat messages with besides them (as a chat completion does): the ones given."""
    given = {
        "tools": None if tools is None else list(tools),
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "chat_template_kwargs": chat_template_kwargs,
    }
    return {k: v for k, v in given.items() if v is not None}


def tokenize_body(
    tenant_id: Optional[str],
    prompt: Optional[str],
    prefix: Optional[str],
    messages: Optional[Sequence[dict[str, Any]]],
    prefix_version: Optional[int] = None,
    prompt_format: Optional[str] = None,
    chat: Optional[dict[str, Any]] = None,
    *,
    add_special_tokens: Optional[bool] = None,
    return_token_strs: bool = False,
    model: Optional[str] = None,
    extra_body: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /tokenize``. ``model`` (vLLM's ``"tenant/prefix[@version]"``) names the prefix
    instead of ``tenant_id``, ``prefix`` and ``prefix_version``: with it those are not sent (and must be left at
    their defaults)."""
    if (prompt is None) == (messages is None):
        raise TypeError("give exactly one of prompt and messages")
    if prompt_format is not None and messages is not None:
        raise TypeError("prompt_format applies to prompt; messages always go through the chat template")
    if chat and messages is None:
        raise TypeError(f"{', '.join(sorted(chat))} need messages")
    body: dict[str, Any] = {}
    if model is not None:
        named = [
            name
            for name, given in (
                ("tenant_id", tenant_id is not None),
                ("prefix", prefix not in (None, DEFAULT_PREFIX)),
                ("prefix_version", prefix_version is not None),
            )
            if given
        ]
        if named:
            raise TypeError(f"give model or {', '.join(named)}, not both")
        body["model"] = model
    else:
        body["prefix"] = prefix
        if prefix_version is not None:
            body["prefix_version"] = prefix_version
        if tenant_id is not None:
            body["tenant_id"] = tenant_id
    if prompt is not None:
        body["prompt"] = prompt
        if prompt_format is not None:
            body["prompt_format"] = prompt_format
    else:
        body["messages"] = list(messages or [])
        body.update(chat or {})
    if add_special_tokens is not None:
        body["add_special_tokens"] = add_special_tokens
    if return_token_strs:
        body["return_token_strs"] = True
    return merge_extra_body(body, extra_body)


def detokenize_body(
    tokens: Sequence[int], model: Optional[str], extra_body: Optional[Mapping[str, Any]]
) -> dict[str, Any]:
    """The JSON body of ``POST /detokenize``."""
    body: dict[str, Any] = {"tokens": [int(t) for t in tokens]}
    if model is not None:
        body["model"] = model
    return merge_extra_body(body, extra_body)


def model_path(model: str) -> str:
    """The path of ``GET /v1/models/{model}``: a model id ``tenant``, ``tenant/prefix`` or ``tenant/prefix@3``
    (its ``/`` kept: the route takes a path)."""
    if not isinstance(model, str) or any(seg in ("", ".", "..") for seg in model.split("/")):
        raise ValueError(f"{model!r} is not a valid model id (tenant/prefix)")
    return "/v1/models/" + quote(model, safe="/@")


def load_examples(examples: Examples) -> list[dict[str, Any]]:
    """A list of dicts as is, or the objects of a JSONL file (one JSON object per non-blank line)."""
    if isinstance(examples, (str, os.PathLike)):
        path = os.fspath(examples)
        out: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    ex = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
                if not isinstance(ex, dict):
                    raise ValueError(f"{path} line {n}: expected a JSON object")
                out.append(ex)
        return out
    if isinstance(examples, (bytes, dict)):
        raise TypeError("examples must be a list of dicts or the path of a JSONL file")
    out = list(examples)
    for i, ex in enumerate(out):
        if not isinstance(ex, dict):
            raise TypeError(f"examples[{i}] is {type(ex).__name__}, expected a dict")
    return out


def train_body(
    tenant_id: Optional[str],
    name: str,
    method: Optional[str],
    examples: Examples,
    prefix_length: Optional[int],
    hyperparameters: dict[str, Any],
    init_from: Optional[Union[str, tuple[str, int]]] = None,
) -> dict[str, Any]:
    """``POST /prefixes`` body: hyperparameters travel nested under ``"hyperparameters"`` (None values dropped,
    so the server's defaults apply)."""
    body: dict[str, Any] = {"name": name, "examples": load_examples(examples)}
    if tenant_id is not None:
        body["tenant_id"] = tenant_id
    if method is not None:
        body["method"] = method
    if prefix_length is not None:
        body["prefix_length"] = prefix_length
    hp = {k: v for k, v in hyperparameters.items() if v is not None}
    if hp:
        body["hyperparameters"] = hp
    if init_from is not None:
        name, version = (init_from, None) if isinstance(init_from, str) else init_from
        body["init_from"] = {"name": name, **({"version": version} if version is not None else {})}
    return body


def merge_hyperparameters(
    hyperparameters: Optional[dict[str, Any]], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``train(..., hyperparameters={...}, epochs=3)``: both forms, keyword arguments win."""
    if hyperparameters is not None and not isinstance(hyperparameters, dict):
        raise TypeError("hyperparameters must be a dict")
    return {**(hyperparameters or {}), **kwargs}


# --------------------------------------------------------------------------------------------- prefix files
PathLike = Union[str, os.PathLike[str]]
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def upload_form(
    source: Union[PathLike, bytes],
    adapter_config: Optional[Union[PathLike, bytes]],
    prompt_format: Optional[str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """``files`` and ``data`` of ``POST /prefixes/{tenant_id}/{name}/upload``.

    ``source``: a prefix export file (``prefixes.download``), a PEFT adapter folder (``save_pretrained``'s
    adapter_config.json + adapter_model.safetensors), a PEFT ``adapter_model.safetensors`` with its
    adapter_config.json beside it, or the bytes of either kind of file (PEFT: with ``adapter_config``)."""
    if isinstance(source, (bytes, bytearray)):
        weights, weights_name = bytes(source), "prefix.safetensors"
    else:
        path = Path(source)
        if path.is_dir():
            if adapter_config is None:
                adapter_config = path / PEFT_CONFIG
            path = path / PEFT_WEIGHTS
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} not found: upload PEFT adapters saved as safetensors (save_pretrained's default)"
                )
        elif adapter_config is None and path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).exists():
            adapter_config = path.parent / PEFT_CONFIG
        weights, weights_name = path.read_bytes(), path.name
    files: dict[str, Any] = {"file": (weights_name, weights, "application/octet-stream")}
    if adapter_config is not None:
        cfg = (
            adapter_config
            if isinstance(adapter_config, (bytes, bytearray))
            else Path(adapter_config).read_bytes()
        )
        files["adapter_config"] = (PEFT_CONFIG, bytes(cfg), "application/json")
    return files, ({"prompt_format": prompt_format} if prompt_format is not None else {})


def write_file_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------------------------- responses
ModelT = TypeVar("ModelT", bound=BaseModel)
JobT = TypeVar("JobT", bound=JobInfo)


def _where(response: httpx.Response) -> str:
    try:
        request = response.request
    except RuntimeError:  # a response built without its request
        return ""
    return f" from {request.method} {request.url.path}"


def invalid_response(response: httpx.Response, why: str, body: Any) -> APIResponseValidationError:
    return APIResponseValidationError(
        f"unexpected response{_where(response)}: {why}",
        status_code=response.status_code,
        body=body,
        request_id=_request_id(response),
        response=response,
    )


def json_body(response: httpx.Response) -> Any:
    """The JSON of a success response (read already); :class:`APIResponseValidationError` if it is not JSON."""
    try:
        return response.json()
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        text = response.text
        ctype = response.headers.get("content-type") or "no content-type"
        raise invalid_response(response, f"not JSON ({ctype}): {text.strip()[:200]!r}", text) from None


def parse_model(model: type[ModelT], data: Any, response: httpx.Response) -> ModelT:
    """``data`` (JSON from ``response``) as ``model``; :class:`APIResponseValidationError` if it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(body)'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise invalid_response(response, f"not a {model.__name__}: {problems}", data) from e


def parse_response(model: type[ModelT], response: httpx.Response) -> ModelT:
    """A success response's JSON body as ``model``."""
    return parse_model(model, json_body(response), response)


def parse_list(model: type[ModelT], response: httpx.Response) -> list[ModelT]:
    """The ``"data"`` list of a success response's ``{"object": "list", "data": [...]}`` body, each as ``model``."""
    body = json_body(response)
    items = body.get("data", []) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise invalid_response(response, 'expected an object with a "data" list', body)
    return [parse_model(model, item, response) for item in items]


def list_params(
    tenant_id: Optional[str], limit: Optional[int], after: Optional[str]
) -> Optional[dict[str, Any]]:
    """Query of ``GET /prefixes``: only what is given."""
    params = {"tenant_id": tenant_id, "limit": limit, "after": after}
    return {k: v for k, v in params.items() if v is not None and v != ""} or None


def unseen(jobs: list[JobT], seen: set[str]) -> list[JobT]:
    """The jobs not in `seen` (by id), which they join: a listing started again gives none twice."""
    out = [j for j in jobs if j.job_id not in seen]
    seen.update(j.job_id for j in out)
    return out


def next_after(response: httpx.Response, ids: list[str]) -> Optional[str]:
    """The ``after`` of the page following a listing's page (its ``last_id``), or None when none follows (``has_more``
    false or absent: a server without paging answered everything at once)."""
    body = response.json()
    if not (isinstance(body, dict) and body.get("has_more") and ids):
        return None
    last = body.get("last_id")
    return last if isinstance(last, str) and last else ids[-1]


def parse_page(response: httpx.Response) -> PrefixPage:
    """A ``GET /prefixes`` body as a :class:`PrefixPage` (a server without paging: one page, ``has_more`` False)."""
    items = parse_list(PrefixInfo, response)
    body = response.json()
    first, last = body.get("first_id"), body.get("last_id")
    if first is None and items:
        first = f"{items[0].tenant_id}/{items[0].name}"
    if last is None and items:
        last = f"{items[-1].tenant_id}/{items[-1].name}"
    return PrefixPage(items, has_more=body.get("has_more") is True, last_id=last, first_id=first)


def one_piece_delta(response: httpx.Response) -> StreamDelta:
    """The only delta of a streamed generation answered in one piece (not as events): the body must be a whole
    :class:`Generation`."""
    data = json_body(response)
    parse_model(Generation, data, response)
    return parse_model(StreamDelta, data, response)


def parse_field(response: httpx.Response, name: str, kind: type[Any]) -> Any:
    """One field of a success response's JSON object, checked to be a ``kind``."""
    body = json_body(response)
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, kind):
        raise invalid_response(response, f'expected an object with "{name}" ({kind.__name__})', body)
    return value


# --------------------------------------------------------------------------------------------- retries
def retry_delay(
    attempt: int, error: Exception, safe: bool = True, final_codes: Collection[str] = ()
) -> Optional[float]:
    """Seconds to wait before retry number ``attempt`` (0-based) after ``error``; None: do not retry.

    429 and 503 are retried for every request (the server did nothing); 408, 502 and 504 only for one that is ``safe``
    to repeat; an error whose ``code`` is in ``final_codes`` or ``FINAL_CODES`` never (what it says a retry cannot
    change).

    Exponential backoff (0.5 s, 1 s, 2 s, ... capped at 8 s) with jitter. A ``Retry-After`` from the server is
    honoured: the wait is never shorter than it; above ``MAX_RETRY_AFTER_S`` the error is raised instead.
    """
    # (int ** int is typed Any: a negative exponent gives a float)
    backoff: float = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * (2**attempt))
    backoff *= 0.5 + random.random() / 2  # "equal jitter": in [backoff/2, backoff]
    if isinstance(error, APIStatusError):
        if error.code is not None and (error.code in final_codes or error.code in FINAL_CODES):
            return None
        retried = error.status_code in RETRY_STATUSES or (
            safe and error.status_code in RETRY_STATUSES_IF_SAFE
        )
        if not retried:
            return None
        if error.retry_after is not None:
            if error.retry_after > MAX_RETRY_AFTER_S:
                return None
            # honour the hint; a little jitter above it spreads out clients told the same moment
            return error.retry_after + random.random() * min(1.0, 0.1 + error.retry_after * 0.1)
        return backoff
    if isinstance(error, APIConnectionError):
        return backoff
    return None


# transport errors raised before any of the request can have reached the server
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def may_resend(error: httpx.TransportError, safe: bool) -> bool:
    """Whether a request that failed with `error` may be sent again: one that is `safe` to repeat (reads,
    generation, writes with an Idempotency-Key) always, another (a DELETE) only if it cannot have been sent; never a
    URL the client cannot send to at all."""
    if isinstance(error, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return False  # (a request this client cannot send: it would fail again)
    return safe or isinstance(error, _NOT_SENT)


def wrap_transport_error(error: httpx.TransportError) -> APIConnectionError:
    request = None
    with contextlib.suppress(RuntimeError):
        request = error.request
    # which server it tried: a wrong base URL (or a server not started) is the usual cause
    where = ""
    if request is not None:  # (no user info, no query: nothing secret in the message)
        u = request.url
        where = f" ({request.method} {u.scheme}://{u.netloc.decode('ascii')}{u.path})"
    if isinstance(error, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {type(error).__name__}{where}", request=request)
    detail = str(error) or type(error).__name__
    return APIConnectionError(f"connection error: {detail}{where}", request=request)


# --------------------------------------------------------------------------------------------- SSE
DONE = "[DONE]"


class StreamInfo:
    """What a stream's generator learns of its response. The generator holds this, never the stream object: a
    generator referring to its own iterator makes a reference cycle, and a stream dropped after `break` would then
    keep its connection (and its generation on the server) until the garbage collector ran."""

    response: Optional[httpx.Response] = None
    request_id: Optional[str] = None


class StreamBase:
    """What the sync and async streams share: the request to send and what its response told."""

    def __init__(self, client: Any, body: dict[str, Any], headers: dict[str, str]) -> None:
        self._client = client
        self._body = body
        self._headers = headers
        self._gen: Any = None
        self._info = StreamInfo()

    @property
    def response(self) -> Optional[httpx.Response]:
        return self._info.response

    @property
    def request_id(self) -> Optional[str]:
        """X-Request-ID of the response, once it started."""
        return self._info.request_id


# SSE's line ends: "\r\n", "\r" or "\n", nothing else (str.splitlines, and httpx's iter_lines, also split on U+2028,
# U+2029, U+0085, \x0b, \x0c and \x1c-\x1e, which may stand in a generated text)
_SSE_EOL = re.compile("\r\n|\r|\n")


class LineSplitter:
    """Text chunks (``iter_text``) to lines, split only where SSE ends a line: ``\r\n``, ``\r`` or ``\n``. A line may
    span chunks; a ``\r`` that ends a chunk and a ``\n`` that starts the next are one line end."""

    def __init__(self) -> None:
        self._pending: list[str] = []  # the start of a line whose end has not come yet
        self._after_cr = False

    def feed(self, text: str) -> list[str]:
        if not text:
            return []
        if self._after_cr and text[0] == "\n":  # the rest of a "\r\n" split between chunks
            text = text[1:]
        self._after_cr = text.endswith("\r")
        lines: list[str] = []
        pos = 0
        for m in _SSE_EOL.finditer(text):
            piece = text[pos : m.start()]
            if self._pending:
                piece = "".join(self._pending) + piece
                self._pending = []
            lines.append(piece)
            pos = m.end()
        if pos < len(text):
            self._pending.append(text[pos:])
        return lines

    def flush(self) -> list[str]:
        """The last line, if the text did not end with a line end."""
        rest = "".join(self._pending)
        self._pending = []
        self._after_cr = False
        return [rest] if rest else []


class SSEDecoder:
    """Server-Sent Events from lines (without their line ends): yields each event's data, joined across ``data:``
    lines."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: Optional[str] = None

    def feed(self, line: str) -> Optional[tuple[Optional[str], str]]:
        if not line:
            if not self._data:
                self._event = None
                return None
            out = (self._event, "\n".join(self._data))
            self._data, self._event = [], None
            return out
        if line.startswith(":"):
            return None  # comment / keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None

    def flush(self) -> Optional[tuple[Optional[str], str]]:
        return self.feed("")


class SSEParser:
    """Text chunks of an event stream to its events ``(event, data)``."""

    def __init__(self) -> None:
        self._lines = LineSplitter()
        self._events = SSEDecoder()
        self._started = False

    def feed(self, text: str) -> list[tuple[Optional[str], str]]:
        if not self._started and text:  # one byte order mark at the start of the stream is not part of it
            self._started = True
            text = text.removeprefix("\ufeff")
        events = (self._events.feed(line) for line in self._lines.feed(text))
        return [ev for ev in events if ev is not None]

    def flush(self) -> list[tuple[Optional[str], str]]:
        events = [self._events.feed(line) for line in self._lines.flush()]
        events.append(self._events.flush())
        return [ev for ev in events if ev is not None]


def iter_sse_events(chunks: Iterable[str]) -> Iterator[tuple[Optional[str], str]]:
    """The events of an event stream's text chunks (``response.iter_text()``)."""
    parser = SSEParser()
    for text in chunks:
        yield from parser.feed(text)
    yield from parser.flush()


# what a stream may still send after [DONE] that is read to keep its connection (more: the connection is dropped)
DRAIN_CHARS = 65536


def drain(chunks: Iterator[str]) -> None:
    """Read a stream's body to its end after [DONE] (nothing or a blank line is left), so that its connection
    goes back to the pool: closed unread, it is dropped and the next request opens a new one."""
    left = DRAIN_CHARS
    with contextlib.suppress(httpx.HTTPError):
        for text in chunks:
            left -= len(text)
            if left < 0:
                return


async def adrain(chunks: AsyncIterator[str]) -> None:
    """`drain` for an async stream."""
    left = DRAIN_CHARS
    with contextlib.suppress(httpx.HTTPError):
        async for text in chunks:
            left -= len(text)
            if left < 0:
                return


class StreamState:
    """Turns SSE events into StreamDelta payloads; raises typed errors for error events."""

    def __init__(self, request_id: Optional[str]) -> None:
        self.request_id = request_id
        self.done = False
        self.finished = False

    def handle(self, event: Optional[str], data: str) -> Optional[dict[str, Any]]:
        """The delta payload of one event, or None for [DONE] / events to skip."""
        if data.strip() == DONE:
            self.done = True
            return None
        if event not in (None, "", "message", "error") or (event != "error" and not data.strip()):
            return None  # an event type this client does not know, or a keep-alive without data: skipped
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            raise APIConnectionError(f"malformed stream event: {data[:200]!r}") from None
        if not isinstance(payload, dict):
            raise APIConnectionError(f"malformed stream event: {data[:200]!r}")
        if event == "error" or "error" in payload:
            raise status_error_from_event(payload, self.request_id)
        if payload.get("finish_reason") is not None:
            self.finished = True
        return payload

    def check_end(self) -> None:
        if not self.done and not self.finished:
            raise APIConnectionError("stream ended before its last event ([DONE])")


def usage_params(
    tenant_id: Optional[str], limit: Optional[int], after: Optional[str]
) -> Optional[dict[str, Any]]:
    """``GET /usage``'s query: the fields given (none: None)."""
    params: dict[str, Any] = {}
    if tenant_id:
        params["tenant_id"] = tenant_id
    if limit is not None:
        params["limit"] = limit
    if after is not None:
        params["after"] = after
    return params or None
