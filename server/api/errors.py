"""One error body everywhere: `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape).

Status mapping (docs/ARCHITECTURE.md, shared README §4): 400/422 invalid input, 401 missing or wrong key, 403 a route the
key may not use, 404 unknown or another tenant's, 405 wrong method, 413 too large, 429 tenant over its limit,
503 (always with Retry-After) saturated, draining or store down.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("prefixserve.api")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
DEFAULT_CODES = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class SafeJSONResponse(JSONResponse):
    """JSON with ASCII escapes: a lone surrogate echoed from hostile input can never break encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or DEFAULT_CODES.get(status)
        self.param = param
        self.type = type or ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param, type=self.type)


def error_body(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    type: str | None = None,
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type or ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code or DEFAULT_CODES.get(status),
        }
    }


def unavailable(message: str, retry_after: int, code: str = "unavailable") -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


# a 503 `server_busy`: a full disk
NO_ROOM = "the server has no room to receive this body now; retry shortly"


def is_json_type(ctype: str) -> bool:
    """Whether a Content-Type says JSON as FastAPI reads one (strictly): application/json or application/*+json,
    parameters aside; none at all is not."""
    main = ctype.partition(";")[0].strip().lower()
    kind, _, sub = main.partition("/")
    return kind == "application" and (sub == "json" or sub.endswith("+json"))


def not_json(ctype: str) -> APIError:
    """The 415 of a body sent without a JSON Content-Type (`curl -d` sends a form, a bare client none)."""
    sent = f"this one was {ctype[:80]!r}" if ctype else "none was sent"
    return APIError(
        415,
        f"the request body must be JSON: send Content-Type: application/json ({sent})",
        code="unsupported_media_type",
        param="content-type",
    )


def tgi_error_type(status: int) -> str | None:
    """TGI's `error_type` of an error status: its clients (text-generation, lorax) raise ValidationError,
    OverloadedError or GenerationError by it; None where they should go by the status (404: NotFoundError)."""
    if status in (429, 503):
        return "overloaded"
    if status in (400, 413, 422):
        return "validation"
    return "generation" if status >= 500 else None


def is_openai_path(path: str) -> bool:
    """An OpenAI route: /v1/..., the same routes under /tgi/v1/ (TGI serves them at its root too), and SageMaker's
    /invocations (which serves them)."""
    return path.startswith(("/v1/", "/tgi/v1/")) or path == "/invocations"


def is_tgi_path(path: str) -> bool:
    """A TGI-protocol route (its errors carry TGI's `error_type`); not the OpenAI routes under /tgi."""
    return (path == "/tgi" or path.startswith("/tgi/")) and not is_openai_path(path)


def with_tgi_error_type(body: dict[str, Any], status: int) -> dict[str, Any]:
    """`body` (an error body) with TGI's top-level `error_type` where the status has one."""
    kind = tgi_error_type(status)
    if kind is not None:
        body["error_type"] = kind
    return body


# Anthropic's error types by status (its clients and tools read `error.type`)
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_type(status: int) -> str:
    return ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """An error as Anthropic's API sends it (a stream's `error` event)."""
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    retry_after: int = 1,
    request: Request | None = None,
) -> SafeJSONResponse:
    """The error body; on the TGI-compatible routes (`/tgi...`) also TGI's top-level `error_type`. On the OpenAI
    routes (`/v1/...`) an invalid value is a 400, as OpenAI and vLLM answer it (the `openai` package raises its
    `BadRequestError` for a 400, a bare `APIStatusError` subclass for a 422); elsewhere it stays a 422."""
    if status == 422 and request is not None and is_openai_path(request.url.path):
        status = 400
    headers = dict(headers or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", str(retry_after))
    body = error_body(status, message, code=code, param=param)
    if request is not None:
        with_path_shape(body, status, request.url.path)
        note_error_code(request.scope.get("prefixserve"), body["error"]["code"])
    return SafeJSONResponse(body, status, headers=headers)


def note_error_code(info: Any, code: str | None) -> None:
    """Name an error's code on the request's access-log line (`RequestInfo.error_code`), unless a more precise
    one (the engine's) is already there: an operator can tell a 503 `queue_full` from a 503 `store_unavailable`."""
    if info is not None and getattr(info, "error_code", "") is None:
        info.error_code = code


def with_path_shape(body: dict[str, Any], status: int, path: str) -> dict[str, Any]:
    """An error body with what the path's protocol adds: TGI's `error_type` on /tgi, Anthropic's top-level
    `"type": "error"` and error type on /v1/messages (ours kept beside them)."""
    if is_tgi_path(path):
        with_tgi_error_type(body, status)
    if is_anthropic_path(path):
        body["type"] = "error"
        body["error"]["type"] = anthropic_error_type(status)
    return body


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def field_name(param: str) -> str:
    """A body field as a message names it: a dotted one by its last part (`parameters.max_new_tokens` →
    `max_new_tokens`), as clients know it; the error's `param` keeps the whole path."""
    return param.rpartition(".")[2]


def loc_param(loc: tuple[Any, ...]) -> str | None:
    """`("body", "messages", 0, "content")` → `"messages[0].content"` (the spelling the training checks use too):
    field names and indexes only, pydantic's type tags (`"list[function-after[...]]"`) left out."""
    out = ""
    for p in loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and _IDENT.fullmatch(p):
            out += f".{p}" if out else p
    return out or None


def _error_text(err: Mapping[str, Any]) -> str:
    """A pydantic error's message: a validator's own words without pydantic's "Value error, " before them."""
    return str(err.get("msg", "invalid value")).removeprefix("Value error, ")


def _validation_message(err: Mapping[str, Any]) -> str:
    loc = loc_param(tuple(err.get("loc", ())))
    msg = _error_text(err)
    return f"{loc}: {msg}" if loc else msg


def invalid_field(e: ValidationError, param: Callable[[tuple[Any, ...]], str | None]) -> APIError:
    """The 422 `invalid_value` of a model the server built from a request's body (the Responses and Messages routes'
    chat completion) that failed to validate: its first error's message, and for `param` the request's own field,
    which `param(loc)` names from where pydantic found the error in the built model's fields."""
    first = e.errors()[0]
    return APIError(422, _error_text(first), code="invalid_value", param=param(tuple(first.get("loc", ()))))


# JSON request bodies nest at most this deep (a tool's parameters or a response_format schema: tens of levels at
# most in practice). Past it Python's parsers and serialisers fail at depths that differ between Pythons and between
# paths: tool parameters 400 deep were a RecursionError in the chat template on 3.11 and rendered on 3.12; a
# Responses request echoing a field ~255 deep failed to serialise after it had run and been billed (a 500).
MAX_JSON_DEPTH = 128
# a string, or one never closed to the end of the body (else each of its escaped quotes started another scan to the
# end: quadratic, an hour of the event loop for a 1 MB body)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `body` opens more than `limit` arrays and objects inside one another (what is inside
    strings aside). Every step is a pass in C, O(size): a body with at most `limit` opening brackets is answered by
    counting them; else its strings go, then all but its brackets, and the deepest point is a running sum's
    maximum."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    import numpy as np

    brackets = np.frombuffer(_JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if brackets.size <= limit:
        return False
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return bool(np.cumsum(steps, dtype=np.int64).max() > limit)


def nested_too_deep() -> APIError:
    return APIError(
        400,
        f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels of JSON arrays and objects)",
        code="invalid_json",
    )


def unparsed_body(cause: BaseException | None) -> str:
    """Why a body that is JSON by its content type could not be parsed: Python's json refuses some valid JSON too,
    and "not valid JSON" would send its writer looking for a syntax error that is not there."""
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to be parsed (over about a thousand levels of JSON)"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # (Python's int limit)
        return f"request body holds a number of more than {sys.get_int_max_str_digits()} digits, which cannot be parsed"
    return "request body is not valid JSON (UTF-8)"


def _allowed_methods(request: Request) -> list[str]:
    """Methods served at this path by the route template that matches it first (Starlette's own Allow header
    lists only the methods of the first route object, not of every route sharing the template)."""
    index = getattr(getattr(request.app.state, "ps", None), "route_methods", None) or []
    template = next((t for regex, t, _ in index if regex.match(request.url.path)), None)
    return sorted({m for _, t, methods in index if t == template for m in methods}) if template else []


def install_error_handlers(app: FastAPI, retry_after: int = 1) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> SafeJSONResponse:
        return error_response(
            exc.status,
            exc.message,
            code=exc.code,
            param=exc.param,
            headers=exc.headers,
            retry_after=retry_after,
            request=request,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", code="invalid_json", request=request)
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return error_response(422, "request body is required", code="missing_body", request=request)
        ctype = request.headers.get("content-type", "")
        if tuple(first.get("loc", ())) == ("body",) and not is_json_type(ctype):
            # (FastAPI read no JSON and said "a valid dictionary" was expected)
            e = not_json(ctype)
            return error_response(e.status, e.message, code=e.code, param=e.param, request=request)
        messages = list(dict.fromkeys(_validation_message(e) for e in errors))  # unions repeat themselves
        message = "; ".join(messages[:5])
        if len(messages) > 5:
            message += f"; and {len(messages) - 5} more"
        if request.url.path == "/generate" and any(
            tuple(e.get("loc", ())) == ("body", "inputs") for e in errors
        ):  # TGI's body at this server's root, where its clients' default base URL points
            message = f"a TGI request? TGI's protocol is served under /tgi (/tgi/generate, /tgi/generate_stream): {message}"
        return error_response(
            422,
            message,
            code="invalid_value",
            param=loc_param(tuple(first.get("loc", ()))),
            request=request,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        status = exc.status_code
        if status == 404:
            message = "not found"
            if request.url.path in ("/", "/generate_stream") and request.method == "POST":
                # TGI's clients aimed at this server's root
                message = (
                    "not found: TGI's protocol is served under /tgi (/tgi/generate, /tgi/generate_stream)"
                )
            if is_openai_path(request.url.path):  # an OpenAI route we do not serve (embeddings, ...)
                message = (
                    f"{request.url.path} is not served here; the /v1 routes served are /v1/completions, "
                    "/v1/chat/completions, /v1/responses, /v1/models and (Anthropic's) /v1/messages"
                )
        elif status == 405:
            message = f"method {request.method} not allowed for {request.url.path}"
            allowed = _allowed_methods(request)
            if allowed:
                return error_response(405, message, headers={"Allow": ", ".join(allowed)}, request=request)
        elif status == 400 and "parsing the body" in str(exc.detail):
            cause = exc.__cause__
            # the server's own trouble (a multipart file spooled to a full disk), not the client's
            if isinstance(cause, OSError):
                rid = getattr(request.scope.get("prefixserve"), "request_id", None) or "-"
                log.error("request %s: its body could not be received: %s", rid, cause)
                return error_response(
                    503,
                    NO_ROOM,
                    code="server_busy",
                    retry_after=retry_after,
                    request=request,
                )
            return error_response(400, unparsed_body(cause), code="invalid_json", request=request)
        else:
            message = str(exc.detail) if exc.detail else "error"
        return error_response(
            status, message, headers=getattr(exc, "headers", None), retry_after=retry_after, request=request
        )

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> SafeJSONResponse:
        info = request.scope.get("prefixserve")
        rid = getattr(info, "request_id", None) or "-"
        log.error("request %s: unhandled error on %s %s", rid, request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error", code="internal_error", request=request)


# Documented in the OpenAPI schema of every route, so clients (and schemathesis) know the error body.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d}
    for s, d in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        403: "The key may not use this route",
        404: "Unknown resource (or another tenant's)",
        413: "Request too large",
        415: "The body is not JSON (Content-Type)",
        422: "Invalid value",
        429: "Tenant over its limit (Retry-After)",
        500: "Internal error",
        503: "Unavailable: saturated, draining or store down (Retry-After)",
    }.items()
}
