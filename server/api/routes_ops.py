"""GET /health (alive), GET /ready (model loaded, engine running, store reachable, not draining), GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.auth import bearer_scheme
from server.api.deps import app_state
from server.api.errors import COMMON_ERRORS, ErrorInfo, SafeJSONResponse, error_body
from server.api.schemas import Health, Readiness

router = APIRouter(tags=["operations"])

STORE_PING_TIMEOUT_S = 2.0


class NotReady(Readiness):
    error: ErrorInfo


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": NotReady, "description": "Not ready (Retry-After)"}},
    summary="Readiness: model loaded, engine running, store reachable, not shutting down",
)
async def ready(request: Request) -> Any:
    st = app_state(request)
    svc = st.svc
    checks: dict[str, str] = {}
    checks["model"] = "ok" if svc is not None else "loading"
    if svc is not None:
        checks["engine"] = "ok" if svc.engine_alive() else "dead"
        try:
            await asyncio.wait_for(asyncio.to_thread(svc.store.ping), STORE_PING_TIMEOUT_S)
            checks["store"] = "ok"
            svc.store_ok = True
        except Exception as e:
            checks["store"] = f"unavailable ({type(e).__name__})"
            svc.store_ok = False
    checks["lifecycle"] = "shutting_down" if st.draining else "serving"
    ok = all(v in ("ok", "serving") for v in checks.values())
    model = svc.bundle.name if svc is not None else None
    if ok:
        return Readiness(status="ready", model=model, checks=checks)
    failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v not in ("ok", "serving"))
    body = {
        "status": "not_ready",
        "model": model,
        "checks": checks,
        **error_body(503, f"not ready: {failing}", code="not_ready"),
    }
    return SafeJSONResponse(body, 503, headers={"Retry-After": str(st.settings.retry_after_s)})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        401: COMMON_ERRORS[401],
        403: COMMON_ERRORS[403],
    },
)
async def metrics(request: Request) -> Response:
    st = app_state(request)
    if st.settings.metrics_require_admin:
        st.keyring.authenticate(await bearer_scheme(request)).require_admin()
    data = await asyncio.to_thread(generate_latest, st.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
