"""GET /usage: per-tenant usage since the server started, with the tenant's rate limits and what is left of them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from server.api.auth import Principal, get_principal
from server.api.deps import get_service
from server.api.errors import COMMON_ERRORS
from server.api.schemas import NAME_PATTERN, UsageReport
from server.api.service import Service

router = APIRouter(tags=["usage"])


def tenant_usage(svc: Service, tenant: str) -> dict[str, Any]:
    limits = svc.limiter.state(tenant)
    limits["in_flight"] = svc.in_flight(tenant)
    return {**svc.usage.report(tenant), "limits": limits}


@router.get(
    "/usage",
    response_model=UsageReport,
    responses=COMMON_ERRORS,
    summary="Tokens and requests per tenant since the server started, with rate limits and what is left of them",
)
async def usage(
    request: Request,
    tenant_id: str | None = Query(
        None, pattern=NAME_PATTERN, description="Default: the key's tenant (admin: all)"
    ),
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    if tenant_id is None and principal.admin:
        tenants = svc.usage.tenants()
    else:
        tenants = [principal.resolve_tenant(tenant_id)]
    return {"object": "usage", "since": svc.usage.since, "data": [tenant_usage(svc, t) for t in tenants]}
