"""GET /health (alive), GET /version, GET /ready (model loaded, engine running, store reachable, not draining), GET /info (the
model, its limits and how the server runs it), GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api.auth import Principal, bearer_scheme, get_principal, with_api_key_header
from server.api.deps import app_state, get_service
from server.api.errors import COMMON_ERRORS, ErrorInfo, SafeJSONResponse, error_body
from server.api.schemas import Health, Readiness, ServerInfo

router = APIRouter(tags=["operations"])

STORE_PING_TIMEOUT_S = 2.0


class NotReady(Readiness):
    error: ErrorInfo


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"description": "The inference engine died: restart the process (as vLLM's /health)"}},
    summary="Liveness: the process answers and its inference engine runs",
)
async def health(request: Request) -> Any:
    st = app_state(request)
    if st.svc is not None and not st.svc.engine_alive():
        # only a restart brings a dead engine back: a liveness probe must fail (readiness alone keeps the pod)
        body = error_body(503, "the inference engine stopped", code="engine_dead")
        return SafeJSONResponse(body, 503, headers={"Retry-After": str(st.settings.retry_after_s)})
    return Health()


# what each of /ready's checks says when it passes
READY_CHECKS = frozenset({"ok", "ok (read-only)", "serving"})


def _ping(store: Any) -> bool:
    """Ping the store; whether it is read-only (served, but it takes no change)."""
    store.ping()
    return bool(store.read_only)


async def check_store(svc: Any) -> str | None:
    """Ping the prefix store (bounded by STORE_PING_TIMEOUT_S) and record the answer in `svc.store_ok`, which
    `/metrics`' `prefixserve:ready` reads; returns what went wrong (None: reachable; "read-only": reachable, and
    it takes no change)."""
    try:
        # on its own thread: the default pool may be busy with every request's store lookups
        loop = asyncio.get_running_loop()
        read_only = await asyncio.wait_for(
            loop.run_in_executor(svc._probe_pool, _ping, svc.store), STORE_PING_TIMEOUT_S
        )
    except Exception as e:
        svc.store_ok = False
        return type(e).__name__
    svc.store_ok = True
    return "read-only" if read_only else None


@router.get("/version", summary="The server's version (vLLM's /version)")
async def version() -> dict[str, str]:
    return {"version": __version__}


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
        problem = await check_store(svc)
        # (a read-only store is served: ready)
        checks["store"] = {None: "ok", "read-only": "ok (read-only)"}.get(problem, f"unavailable ({problem})")
    checks["lifecycle"] = "shutting_down" if st.draining else "serving"
    failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v not in READY_CHECKS)
    model = svc.bundle.name if svc is not None else None
    if not failing:
        return Readiness(status="ready", model=model, checks=checks)
    body = {
        "status": "not_ready",
        "model": model,
        "checks": checks,
        **error_body(503, f"not ready: {failing}", code="not_ready"),
    }
    return SafeJSONResponse(body, 503, headers={"Retry-After": str(st.settings.retry_after_s)})


# HEAD too, as load balancers and uptime checkers probe; out of the OpenAPI document, where a second operation of one
# function would repeat its operation id
for _probe in (health, ready):
    router.add_api_route(
        f"/{_probe.__name__}", _probe, methods=["HEAD"], response_model=None, include_in_schema=False
    )
# vLLM's (and SageMaker's) liveness probe: /health under another name, GET or POST
router.add_api_route("/ping", health, methods=["GET", "POST"], response_model=None, include_in_schema=False)


@router.get(
    "/info",
    response_model=ServerInfo,
    responses=COMMON_ERRORS,
    summary="The model, its limits and how this server runs it (TGI's /info)",
)
async def info(request: Request, principal: Principal = Depends(get_principal)) -> ServerInfo:
    svc = get_service(request)
    llm, bundle = svc.llm, svc.bundle
    pool = llm.pool
    return ServerInfo(
        version=__version__,
        model=bundle.name,
        model_fingerprint=bundle.fingerprint,
        architecture=type(bundle.hf_model).__name__,
        model_path=llm.runner.family,
        dtype=str(bundle.dtype).removeprefix("torch."),
        device=str(bundle.device),
        num_layers=bundle.spec.num_layers,
        vocab_size=bundle.spec.vocab_size,
        max_model_len=llm.max_model_len,
        max_request_tokens=llm.max_request_tokens,
        max_prompt_tokens=svc.settings.max_prompt_tokens,
        max_new_tokens=svc.settings.max_new_tokens,
        max_num_seqs=llm.cfg.max_num_seqs,
        max_batched_tokens=llm.cfg.max_num_batched_tokens,
        max_queued=llm.cfg.max_waiting,
        kv_cache={
            "blocks": pool.num_blocks,
            "block_size": pool.block_size,
            "bytes": pool.num_blocks * pool.block_bytes,
        },
        prefix_cache_bytes=llm.prefix_cache.budget_bytes,
        prompt_cache=llm.cfg.prompt_cache,
        speculative_tokens=llm.cfg.speculative_tokens,
        cuda_graphs=llm.runner.graph_mode if llm.runner.graph_mode == "cuda" else "off",
        kernels=llm.runner.kernels,
        async_decode=llm.async_decode,
        store=svc.store.backend,
        training=svc.job_manager is not None,
        training_workers=getattr(svc.job_manager, "in_process_workers", 0)
        if svc.job_manager is not None
        else 0,
        default_prompt_format=svc.default_format,
        served_model_names=list(svc.served_names),
        reasoning_parser=svc.reasoning.name if svc.reasoning is not None else "none",
        sampling_defaults=svc.sampling_defaults,
        tool_call_parser=svc.tool_parser.name,
    )


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
        creds = with_api_key_header(await bearer_scheme(request), request.headers.get("x-api-key"))
        st.keyring.authenticate(creds).require_admin()
    if st.svc is not None:  # `prefixserve:ready` as /ready would answer now, not as it last did
        await check_store(st.svc)
    data = await asyncio.to_thread(generate_latest, st.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
