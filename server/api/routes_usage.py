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

router = APIRouter(tags=["usage"])


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
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    try:
        if tenant_id is None and principal.admin:
            tenants = await svc.usage.tenants()
        else:
            tenants = [principal.resolve_tenant(tenant_id)]
        data = [await tenant_usage(svc, t) for t in tenants]
        since = await svc.usage.since()
    except (RedisError, OSError):  # counts in Redis (limits_url) that does not answer
        raise unavailable(
            "usage store unavailable", svc.settings.retry_after_s, code="store_unavailable"
        ) from None
    return {"object": "usage", "since": since, "data": data}
