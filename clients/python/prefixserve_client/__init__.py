"""PrefixServe Python SDK: sync and async clients, typed responses, streaming, typed errors, retries.

>>> from prefixserve_client import Client
>>> with Client() as client:  # PREFIXSERVE_BASE_URL / PREFIXSERVE_API_KEY
...     print(client.generate("acme", "Hello").text)

Only httpx and pydantic are needed: this package never imports torch or the server.
"""

from ._async_client import AsyncClient, AsyncPrefixes, AsyncStream
from ._base import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL
from ._client import Client, Prefixes, Stream
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BadRequest,
    Conflict,
    Forbidden,
    InternalServerError,
    NotFound,
    PayloadTooLarge,
    PrefixServeError,
    RateLimited,
    ServiceUnavailable,
    TrainingCancelled,
    TrainingError,
    TrainingFailed,
    Unauthorized,
    UnprocessableEntity,
    WaitTimeout,
)
from ._version import __version__
from .types import (
    AsyncJob,
    DeletedPrefix,
    Generation,
    Health,
    Job,
    JobInfo,
    JobProgress,
    ModelCard,
    ModelList,
    PrefixInfo,
    Readiness,
    StreamDelta,
    Tokenized,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncJob",
    "AsyncPrefixes",
    "AsyncStream",
    "BadRequest",
    "Client",
    "Conflict",
    "DeletedPrefix",
    "Forbidden",
    "Generation",
    "Health",
    "InternalServerError",
    "Job",
    "JobInfo",
    "JobProgress",
    "ModelCard",
    "ModelList",
    "NotFound",
    "PayloadTooLarge",
    "PrefixInfo",
    "PrefixServeError",
    "Prefixes",
    "RateLimited",
    "Readiness",
    "ServiceUnavailable",
    "Stream",
    "StreamDelta",
    "TokenLogprob",
    "Tokenized",
    "TopLogprob",
    "TrainingCancelled",
    "TrainingError",
    "TrainingFailed",
    "Unauthorized",
    "UnprocessableEntity",
    "Usage",
    "WaitTimeout",
    "__version__",
]
