"""Store URLs: the query parameters the store itself takes (``prefix``, ``keep_versions``), removed before the URL
reaches its backend (redis-py refuses unknown parameters)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


def pop_query_param(url: str, key: str) -> tuple[str, str | None]:
    """(``url`` without any ``key=`` query parameter, the last value given for it or None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [v for k, v in query if k == key]
    if not values:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != key])
    return urlunsplit(parts._replace(query=rest)), values[-1]
