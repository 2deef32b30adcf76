"""Store URLs: the query parameters the store itself takes (``prefix``, ``keep_versions``), removed before the URL
reaches its backend (redis-py refuses unknown parameters)."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit


def file_url(path: str | os.PathLike[str]) -> str:
    """The ``file://`` URL of an absolute path, percent-encoded so that reading it back gives the same path: a '#',
    '?' or '%' in a folder's name was cut off or decoded (two stores `home#1`, `home#2` were one, `home`)."""
    return "file://" + quote(os.fspath(path))


def pop_query_param(url: str, key: str) -> tuple[str, str | None]:
    """(``url`` without any ``key=`` query parameter, the last value given for it or None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in query if k == key]
    if not values:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != key])
    return urlunsplit(parts._replace(query=rest)), values[-1]
