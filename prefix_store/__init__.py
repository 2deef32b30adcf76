"""Trained-prefix store: versioned records of tensors (safetensors bytes) + metadata, on disk or in Redis.

    from prefix_store import open_store
    store = open_store("file:///var/lib/prefixserve")   # or "redis://127.0.0.1:6379/0?prefix=ns"
    meta = store.put("acme", "support-bot", "prefix_tuning", {"kv": kv}, base_model_fingerprint=fp,
                     prefix_length=16)
    rec = store.get("acme", "support-bot", expected_fingerprint=fp)

See docs/ARCHITECTURE.md (section prefix_store). This package knows bytes and tensors only; it imports nothing
from ``server``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from prefix_store import errors
from prefix_store.base import PrefixStore
from prefix_store.format import KINDS, ChangeEvent, PrefixMeta, PrefixRecord
from prefix_store.names import validate_name
from prefix_store.urls import file_url, pop_query_param

DEFAULT_HOME = "~/.local/share/prefixserve"


def default_store_url(home: str | None = None) -> str:
    """``file://`` + `home`, else ``$PREFIXSERVE_HOME`` (default ``~/.local/share/prefixserve``). (The server's
    settings pass `home` as they read it, in any case: this package imports nothing from the server.)"""
    home = home or os.environ.get("PREFIXSERVE_HOME") or DEFAULT_HOME
    return file_url(Path(home).expanduser().absolute())


def expand_home(url: str) -> str:
    """`file://~/store` (the user's home) as `file:///home/user/store`; any other URL as it is."""
    if not url.startswith("file://~"):
        return url
    path, sep, query = url.removeprefix("file://").partition("?")
    return "file://" + str(Path(path).expanduser().absolute()) + sep + query


def _file_url_path(url: str) -> Path:
    url = expand_home(url)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ValueError(f"file store URL must be file:///absolute/path, got {url!r}")
    return Path(unquote(parts.path))


def file_store_root(url: str) -> Path | None:
    """The folder of a file store URL (or plain path), `~` expanded; None for another backend. ValueError if it is
    a file URL with no absolute path."""
    url, _ = _take_keep_versions(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _file_url_path(url).expanduser()
    return Path(url).expanduser() if not scheme and url else None


def check_store_url(url: str) -> None:
    """ValueError unless `url` is a store URL `open_store` takes (scheme, an absolute file path, keep_versions, a
    numeric Redis db, options the backend knows), decided without opening or connecting to anything: a mistyped
    URL is an error at start-up, not after the model has loaded."""
    url, _ = _take_keep_versions(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        _file_url_path(url)
        if urlsplit(url).query:  # (a mistyped keep_versions kept every version, quietly)
            raise ValueError(
                f"a file store URL takes one option, keep_versions=N; got {urlsplit(url).query!r}"
            )
    elif scheme in ("redis", "rediss"):
        try:
            urlsplit(url).port  # noqa: B018  (a port that is not a number raises here, as redis-py would later)
        except ValueError:
            where = urlsplit(url).netloc.rpartition("@")[2]  # (not the password)
            raise ValueError(
                f"the port in a Redis URL is a number up to 65535 (redis://host:6379/0), got {where!r}"
            ) from None
        db = urlsplit(url).path.strip("/")
        if db and not (db.isascii() and db.isdigit()):
            raise ValueError(
                f"the Redis database in a store URL is a number (redis://host:port/0), got {db!r}"
            )
        _check_redis_options(url)
    elif scheme == "" and url:
        if not Path(url).expanduser().is_absolute():
            # a folder under the working directory: where a mistyped URL ("rediss//host:6379/0", "host:6379/0")
            # would quietly become a private store of one process
            raise ValueError(
                f"a prefix store path must be absolute, got {url!r} (or a URL: file:///abs/path, "
                "redis://host:port/db)"
            )
    elif scheme == "unix":
        _check_redis_options(url)
    else:
        raise ValueError(
            f"unsupported prefix store URL {url!r}: use file:///abs/path or redis://host:port/db"
        )


def _check_redis_options(url: str) -> None:
    """ValueError for a Redis URL option that is not ours (`prefix`, `keep_versions`) nor redis-py's: redis-py makes
    any option a keyword argument of each connection, and a mistyped one (`keep_version=2`) was a TypeError at the
    first command, after the model had loaded (a server never ready, the CLI a traceback). Builds a connection
    object, which connects to nothing."""
    import redis

    from prefix_store.redis_store import split_url

    client_url, _ = split_url(url)  # (and the namespace's name)
    try:
        redis.ConnectionPool.from_url(client_url).make_connection()
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(e))
        what = repr(unknown.group(1)) if unknown else str(e)
        raise ValueError(
            f"unknown option {what} in a Redis URL (ours: prefix, keep_versions; and redis-py's connection "
            "options: socket_timeout, health_check_interval, ...)"
        ) from None
    except redis.RedisError as e:
        raise ValueError(f"invalid Redis URL: {e}") from None


def _take_keep_versions(url: str) -> tuple[str, int | None]:
    """(the URL without its ``keep_versions`` query parameter, its value or None)."""
    if not urlsplit(url).scheme:  # a plain path: no query
        return url, None
    url, value = pop_query_param(url, "keep_versions")
    if value is None:
        return url, None
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise ValueError(f"keep_versions must be a positive integer, got {value!r}")
    return url, int(value)


def open_store(url: str | os.PathLike[str] | None = None, **kwargs: object) -> PrefixStore:
    """Open a store from a URL: ``file:///abs/path``, ``redis://host:port/db[?prefix=ns]`` (also ``rediss://``,
    ``unix://``), a plain filesystem path, or None for :func:`default_store_url`. ``kwargs`` go to the backend
    (Redis: ``socket_timeout``, ``socket_connect_timeout``). Opening never connects; use ``ping()``.

    ``?keep_versions=N`` on any URL keeps only the newest N versions of each name: every put through this store
    deletes the older ones (it is part of the URL so that every process writing the store, servers and training
    workers alike, applies the same policy)."""
    if url is None:
        url = default_store_url()
    url, keep = _take_keep_versions(os.fspath(url))
    store = _open(url, **kwargs)
    store.keep_versions = keep
    return store


def _open(url: str, **kwargs: object) -> PrefixStore:
    check_store_url(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        from prefix_store.disk import DiskStore

        return DiskStore(_file_url_path(url), **kwargs)  # type: ignore[arg-type]
    if scheme in ("redis", "rediss", "unix"):
        from prefix_store.redis_store import RedisStore

        return RedisStore(url, **kwargs)  # type: ignore[arg-type]
    if scheme == "" and url:
        from prefix_store.disk import DiskStore

        return DiskStore(Path(url), **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unsupported prefix store URL {url!r}: use file:///abs/path or redis://host:port/db")


__all__ = [
    "KINDS",
    "ChangeEvent",
    "PrefixMeta",
    "PrefixRecord",
    "PrefixStore",
    "check_store_url",
    "default_store_url",
    "errors",
    "file_store_root",
    "open_store",
    "validate_name",
]
