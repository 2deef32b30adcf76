"""GET /usage: per-tenant usage since the server started, with the tenant's rate limits and what is left of them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator
from redis.exceptions import RedisError

from server.api.auth import Principal, get_principal
from server.api.deps import get_service
from server.api.errors import COMMON_ERRORS, unavailable
from server.api.schemas import NAME_PATTERN, UsageReport, check_name
from server.api.service import Service
from server.api.streaming import json_off_loop

router = APIRouter(tags=["usage"])
DEFAULT_PAGE, MAX_PAGE = 1000, 10_000  # tenants in one GET /usage page


async def tenant_usage(svc: Service, tenant: str) -> dict[str, Any]:
    limits = await svc.limiter.state(tenant)
    limits["in_flight"] = svc.in_flight(tenant)
    return {**await svc.usage.report(tenant), "limits": limits}


@router.get(
    "/usage",
    response_model=UsageReport,
    responses=COMMON_ERRORS,
    summary="Tokens and requests per tenant since the server started, with rate limits and what is left of them",
)
async def usage(
    request: Request,
    tenant_id: Annotated[str, AfterValidator(check_name)] | None = Query(
        None, pattern=NAME_PATTERN, description="Default: the key's tenant (admin: all)"
    ),
    limit: int = Query(
        DEFAULT_PAGE,
        ge=1,
        le=MAX_PAGE,
        description="Admin, all tenants: at most this many (a page, by tenant id)",
    ),
    after: Annotated[str, AfterValidator(check_name)] | None = Query(
        None, pattern=NAME_PATTERN, description="Admin, all tenants: the tenants after this one (`last_id`)"
    ),
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    has_more = False
    try:
        if tenant_id is None and principal.admin:
            # (a page: every tenant ever seen, unpaged, was megabytes built on the event loop)
            every = sorted(t for t in await svc.usage.tenants() if after is None or t > after)
            tenants, has_more = every[:limit], len(every) > limit
        else:
            tenants = [principal.resolve_tenant(tenant_id)]
        data = [await tenant_usage(svc, t) for t in tenants]
        since = await svc.usage.since()
    except (RedisError, OSError):  # counts in Redis (limits_url) that does not answer
        raise unavailable(
            "usage store unavailable", svc.settings.retry_after_s, code="store_unavailable"
        ) from None
    body = {"object": "usage", "since": since, "data": data, "has_more": has_more}
    body["last_id"] = tenants[-1] if tenants else None
    return await json_off_loop(UsageReport, lambda: body)
