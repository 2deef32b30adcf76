"""Typed errors: every HTTP error status of the server maps to one class; the error body gives the details.

The server answers errors as ``{"error": {"message", "type", "param", "code"}}`` with the status code; 429 and
503 carry ``Retry-After``. Streamed responses report a failure after the stream began as an error event
(``data: {"error": {...}}``), mapped to the same classes.
"""

from __future__ import annotations

import email.utils
import time
from typing import TYPE_CHECKING, Any, Generic, Optional, TypeVar

import httpx

if TYPE_CHECKING:  # pragma: no cover
    from .types import JobInfo

# the job an error carries: a Job from a Client, an AsyncJob from an AsyncClient
_J = TypeVar("_J", bound="JobInfo")

# 503 codes of every route that no retry can change: the prefix store is mounted read-only, the server runs without
# training (only a restart with other settings changes either)
FINAL_CODES = frozenset({"store_read_only", "no_training"})

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequest",
    "BadRequestError",
    "Conflict",
    "ConflictError",
    "Forbidden",
    "InternalServerError",
    "NotFound",
    "NotFoundError",
    "PayloadTooLarge",
    "PermissionDeniedError",
    "PrefixServeError",
    "RateLimitError",
    "RateLimited",
    "RequestTimeout",
    "ServiceUnavailable",
    "TrainingCancelled",
    "TrainingError",
    "TrainingFailed",
    "Unauthorized",
    "UnprocessableEntity",
    "UnprocessableEntityError",
    "WaitTimeout",
]


class PrefixServeError(Exception):
    """Base class of every error raised by this SDK."""

    def __reduce__(self) -> tuple[Any, ...]:
        # picklable (a ProcessPoolExecutor worker's error reaches its parent whole), without the HTTP objects
        state = {k: (None if k in ("request", "response") else v) for k, v in self.__dict__.items()}
        return _restore, (type(self), self.args, state)


def _restore(cls: type[PrefixServeError], args: tuple[Any, ...], state: dict[str, Any]) -> PrefixServeError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class APIConnectionError(PrefixServeError):
    """The server could not be reached, or the connection broke before a complete answer."""

    def __init__(self, message: str = "connection error", *, request: Optional[httpx.Request] = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, read, write or pool timeout)."""

    def __init__(
        self, message: str = "request timed out", *, request: Optional[httpx.Request] = None
    ) -> None:
        super().__init__(message, request=request)


class APIResponseValidationError(PrefixServeError):
    """The server answered a success status with a body that is not what the route sends: not JSON (a proxy's
    login page, another service at ``base_url``) or JSON of the wrong shape. ``status_code`` and ``body`` (the JSON,
    or the text when it is not JSON) say what came; ``response`` is the response itself. Not retried."""

    def __init__(
        self,
        message: str,
        *,
        status_code: Optional[int] = None,
        body: Any = None,
        request_id: Optional[str] = None,
        response: Optional[httpx.Response] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body
        self.request_id = request_id
        self.response = response

    def __str__(self) -> str:
        s = f"{self.status_code}: {self.message}" if self.status_code is not None else self.message
        if self.request_id:
            s += f" [request_id={self.request_id}]"
        return s


class APIStatusError(PrefixServeError):
    """The server answered with an error status (or sent an error event in a stream)."""

    status_code: int

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: Optional[str] = None,
        param: Optional[str] = None,
        code: Optional[str] = None,
        request_id: Optional[str] = None,
        retry_after: Optional[float] = None,
        body: Any = None,
        response: Optional[httpx.Response] = None,
        in_stream: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body
        self.response = response
        #: True when the error arrived as an error event inside a stream (the HTTP status itself was 200).
        self.in_stream = in_stream

    def __str__(self) -> str:
        s = f"{self.status_code}"
        if self.code:
            s += f" {self.code}"
        s += f": {self.message}"
        if self.param:
            s += f" (param: {self.param})"
        if self.request_id:
            s += f" [request_id={self.request_id}]"
        return s

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code!r}, message={self.message!r}, "
            f"code={self.code!r}, param={self.param!r}, request_id={self.request_id!r})"
        )


class BadRequest(APIStatusError):
    """400: malformed request (e.g. invalid JSON)."""


class Unauthorized(APIStatusError):
    """401: missing or wrong API key."""


class Forbidden(APIStatusError):
    """403: the key may not use this route (e.g. admin routes)."""


class NotFound(APIStatusError):
    """404: unknown resource, or another tenant's (the server never reveals which)."""


class RequestTimeout(APIStatusError):
    """408: the request's body (an upload's) did not arrive in time and nothing was done; retried when the request
    is safe to repeat."""


class Conflict(APIStatusError):
    """409: conflicting state."""


class PayloadTooLarge(APIStatusError):
    """413: request body or prompt too long."""


class UnprocessableEntity(APIStatusError):
    """422: a value failed validation; ``param`` names the field."""


class RateLimited(APIStatusError):
    """429: the tenant is over its limit; ``retry_after`` is the server's hint in seconds."""


class ServiceUnavailable(APIStatusError):
    """503: saturated, starting, draining or store down; ``retry_after`` is the server's hint in seconds."""


class InternalServerError(APIStatusError):
    """5xx other than 503."""


# the openai SDK's names of the same errors (``except RateLimitError`` works with either SDK's habits)
BadRequestError = BadRequest
AuthenticationError = Unauthorized
PermissionDeniedError = Forbidden
NotFoundError = NotFound
ConflictError = Conflict
UnprocessableEntityError = UnprocessableEntity
RateLimitError = RateLimited

STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    408: RequestTimeout,
    409: Conflict,
    413: PayloadTooLarge,
    422: UnprocessableEntity,
    429: RateLimited,
    503: ServiceUnavailable,
}

# Error `type` (and a few codes) → status, for error events inside a stream where the HTTP status is 200.
_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "rate_limit_error": 429,
    "server_error": 500,
    "service_unavailable_error": 503,
}
_CODE_STATUS = {
    "request_timeout": 408,
    "request_too_large": 413,
    "context_length_exceeded": 413,
    "invalid_value": 422,
    # a request's grammar the parser cannot compile, one it gave up on while generating, sampling controls that left
    # no token to sample: all 422 on the server
    "invalid_structured_output": 422,
    "structured_output_failed": 422,
    "no_token_allowed": 422,
}


def error_class(status_code: int) -> type[APIStatusError]:
    cls = STATUS_CLASSES.get(status_code)
    if cls is not None:
        return cls
    if status_code >= 500:
        return InternalServerError
    return APIStatusError


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent or unparsable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:  # pragma: no cover - older Pythons
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


def _error_fields(body: Any) -> dict[str, Any]:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return {
            "message": str(err.get("message") or "error"),
            "type": err.get("type"),
            "param": err.get("param"),
            "code": err.get("code"),
        }
    if isinstance(err, str):
        return {"message": err, "type": None, "param": None, "code": None}
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return {"message": body["detail"], "type": None, "param": None, "code": None}
    return {}


def _request_id(response: httpx.Response) -> Optional[str]:
    """The echoed ``X-Request-ID``, else the one this client sent."""
    rid: Optional[str] = response.headers.get("x-request-id")
    if rid:
        return rid
    try:
        sent: Optional[str] = response.request.headers.get("x-request-id")
    except RuntimeError:  # a response built without its request
        return None
    return sent


def status_error_from_response(response: httpx.Response, body: Any = None) -> APIStatusError:
    """The typed error for an HTTP error response (its body must already be read)."""
    if body is None:
        try:
            body = response.json()
        except Exception:
            body = response.text
    fields = _error_fields(body)
    if not fields:
        text = body if isinstance(body, str) else ""
        reason = response.reason_phrase or "error"
        fields = {
            "message": (text.strip()[:500] or reason) if text else reason,
            "type": None,
            "param": None,
            "code": None,
        }
    cls = error_class(response.status_code)
    return cls(
        fields.pop("message"),
        status_code=response.status_code,
        request_id=_request_id(response),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        body=body,
        response=response,
        **fields,
    )


def status_error_from_event(body: dict[str, Any], request_id: Optional[str] = None) -> APIStatusError:
    """The typed error for a ``data: {"error": {...}}`` event inside a stream."""
    fields = _error_fields(body) or {"message": "error event", "type": None, "param": None, "code": None}
    err = body.get("error")
    explicit = err.get("status") if isinstance(err, dict) else None
    if isinstance(explicit, int) and not isinstance(explicit, bool) and 400 <= explicit <= 599:
        status = explicit  # a server that says which status the error would have had
    else:
        status = _CODE_STATUS.get(fields.get("code") or "") or _TYPE_STATUS.get(fields.get("type") or "", 500)
    return error_class(status)(
        fields.pop("message"), status_code=status, request_id=request_id, body=body, in_stream=True, **fields
    )


class TrainingError(PrefixServeError, Generic[_J]):
    """A training job ended without succeeding; ``job`` is its final state: the job ``wait()`` was called on, a
    :class:`~prefixserve_client.Job` (``Client``) or an :class:`~prefixserve_client.AsyncJob` (``AsyncClient``).

    Generic in the job's type: in ``except TrainingFailed as e`` the type checker takes ``e.job`` as ``Any`` (so
    both ``e.job.refresh()`` and ``await e.job.refresh()`` check); annotate ``TrainingFailed[AsyncJob]`` to be
    precise."""

    def __init__(self, message: str, job: _J) -> None:
        super().__init__(message)
        self.message = message
        self.job: _J = job


class TrainingFailed(TrainingError[_J]):
    """The job's status is ``failed``; ``job.error`` says why."""


class TrainingCancelled(TrainingError[_J]):
    """The job's status is ``cancelled``."""


class WaitTimeout(PrefixServeError, TimeoutError, Generic[_J]):
    """``Job.wait(timeout=...)`` ran out of time; the job goes on on the server. ``job`` is its last state (a
    ``Job`` or an ``AsyncJob``, like :class:`TrainingError`'s)."""

    def __init__(self, message: str, job: _J) -> None:
        super().__init__(message)
        self.message = message
        self.job: _J = job
