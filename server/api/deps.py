"""Small accessors shared by the routers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request

from prefix_store import errors
from server.api.errors import APIError, unavailable
from server.api.service import RequestInfo, Service, requester_id, store_refused

T = TypeVar("T")
log = logging.getLogger("prefixserve.api")


def read_only_error(svc: Service) -> APIError:
    """The 503 `store_read_only` of a change to a store mounted read-only (no retry changes it, the SDK's none)."""
    return unavailable(
        "the prefix store is read-only (its filesystem is mounted read-only): it serves its prefixes, and takes no "
        "change",
        svc.settings.retry_after_s,
        code="store_read_only",
    )


def app_state(request: Request) -> Any:
    return request.app.state.ps


def get_service(request: Request) -> Service:
    st = app_state(request)
    svc = st.svc
    if svc is None:
        raise unavailable("server is starting", st.settings.retry_after_s, code="starting")
    # a request let in before the drain began is in flight (the drain waits for it): served, not refused
    info = request.scope.get("prefixserve")
    if st.draining and not (info is not None and info.admitted):
        raise unavailable("server is shutting down", st.settings.retry_after_s, code="shutting_down")
    return svc


def get_info(request: Request) -> RequestInfo:
    info = request.scope.get("prefixserve")
    if info is None:  # not behind the middleware (should not happen)
        info = RequestInfo(request_id="unknown")
        request.scope["prefixserve"] = info
    return info


async def store_call(
    svc: Service,
    fn: Callable[..., T],
    *args: Any,
    what: str = "prefix",
    written_from: str | None = None,
    **kw: Any,
) -> T:
    """Run a blocking store call off the event loop, mapping store errors to API errors. `written_from`: the call
    writes what the request field of that name gave, so a record the store refuses is that field's 422."""
    try:
        out = await svc.in_store_pool(fn, *args, **kw)
    except errors.InvalidPrefix as e:
        if written_from is None:
            raise APIError(422, f"stored prefix cannot be read: {e}", code="prefix_corrupt") from None
        raise APIError(422, str(e), code="invalid_prefix", param=written_from) from None
    except errors.PrefixNotFound:
        raise APIError(404, f"{what} not found", code="prefix_not_found") from None
    except errors.InvalidName as e:
        raise APIError(422, str(e), code="invalid_name") from None
    except errors.StoreReadOnly:
        raise read_only_error(svc) from None
    except errors.StoreUnavailable as e:
        if svc.store_ok:  # (once as it goes down: why, a full disk say)
            log.warning("request %s: prefix store unavailable: %s", requester_id(), e)
        svc.store_ok = False
        raise unavailable(
            "prefix store unavailable", svc.settings.retry_after_s, code="store_unavailable"
        ) from None
    except errors.StoreRefused as e:
        raise store_refused(e, getattr(fn, "__name__", "a store call")) from None
    except errors.StoreError as e:
        log.warning("request %s: stored %s cannot be read: %s", requester_id(), what, e)
        raise APIError(422, f"stored prefix cannot be read: {e}", code="prefix_corrupt") from None
    svc.store_ok = True
    return out
