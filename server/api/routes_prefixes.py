"""Prefix training jobs and stored prefixes: /prefixes, /prefixes/jobs/..., /prefixes/{tenant_id}/{name}.

Another tenant's prefix or job answers 404, exactly like a missing one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from prefix_store import errors
from prefix_store.export import export_prefix
from prefix_store.format import IDEMPOTENCY, PrefixMeta
from prefix_store.names import MAX_NAME_LENGTH, is_valid_name, reserved
from server.api.auth import Principal, get_principal
from server.api.deps import app_state, get_info, get_service, read_only_error, store_call
from server.api.errors import COMMON_ERRORS, APIError, unavailable
from server.api.schemas import (
    NAME_PATTERN,
    JobInfo,
    JobList,
    PrefixInfo,
    PrefixList,
    TenantInfo,
    TenantList,
    TrainRequest,
)
from server.api.service import Service
from server.prefixes.peft_import import PrefixTooLong
from server.prefixes.transfer import IncomingPrefix, InvalidAdapterConfig, from_upload

log = logging.getLogger("prefixserve.api")

router = APIRouter(tags=["prefixes"])
admin_router = APIRouter(prefix="/admin", tags=["admin"])

JOB_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
# Retry-After of a submission over the tenant's job limit when no running job of it gives an estimate
TRAINING_RETRY_AFTER_S = 30


# --------------------------------------------------------------------------------------------- job helpers
def _jobs(svc: Service) -> Any:
    if svc.job_manager is None:
        raise unavailable(
            "training is not enabled on this server", svc.settings.retry_after_s, code="no_training"
        )
    return svc.job_manager


def _job_dict(rec: Any, principal: Principal) -> dict[str, Any]:
    d = rec.public_dict() if hasattr(rec, "public_dict") else dict(rec)
    # the worker's name is its host and pid: the operator's business, not the tenant's
    if not principal.admin:
        d["worker"] = None
    d.setdefault("job_id", getattr(rec, "job_id", None))
    st = d.get("status")
    d["status"] = str(getattr(st, "value", st))
    return d


def _job_tenant(rec: Any) -> str | None:
    t = getattr(rec, "tenant_id", None)
    if t is None and isinstance(rec, dict):
        t = rec.get("tenant_id")
    if t is None and hasattr(rec, "to_dict"):
        t = rec.to_dict().get("tenant_id")
    return t


async def _call_jobs(svc: Service, fn: Any, *args: Any) -> Any:
    try:
        return await svc.in_store_pool(fn, *args)
    except errors.StoreUnavailable:
        raise unavailable(
            "job store unavailable", svc.settings.retry_after_s, code="store_unavailable"
        ) from None


async def _owned_job(svc: Service, principal: Principal, job_id: str) -> Any:
    jm = _jobs(svc)
    try:
        rec = await _call_jobs(svc, jm.get, job_id)
    except (KeyError, LookupError):
        rec = None
    if rec is None or not principal.can_access(_job_tenant(rec) or ""):
        raise APIError(404, f"job {job_id!r} not found", code="job_not_found", param="job_id")
    return rec


def _training_errors() -> tuple[type[Exception], type[Exception], type[Exception], type[Exception]]:
    """(invalid request, too many jobs, init_from not found, Idempotency-Key reused): the job manager's exception
    classes."""
    try:
        from server.training import (
            IdempotencyKeyReused,
            InitFromNotFound,
            TooManyJobs,
            TrainingValidationError,
        )
    except ImportError:  # pragma: no cover - training always ships with the server
        return (ValueError, RuntimeError, LookupError, KeyError)
    return TrainingValidationError, TooManyJobs, InitFromNotFound, IdempotencyKeyReused


IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_LIST_LIMIT = 10_000  # one page of GET /prefixes or /prefixes/jobs at most


def _idempotency_key(key: str | None) -> str | None:
    """The submission's ``Idempotency-Key`` (1 to 255 visible ASCII characters), or None."""
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not all("!" <= c <= "~" for c in key):
        raise APIError(
            422,
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 visible ASCII characters (a UUID, say)",
            code="invalid_value",
            param=IDEMPOTENCY_HEADER,
        )
    return key


# --------------------------------------------------------------------------------------------- jobs
def _check_new_prefix(tenant_id: str, name: str) -> None:
    """Names no stored prefix may have (`prefix_store.names.reserved`): 422 naming the field."""
    problem = reserved(tenant_id, name)
    if problem is not None:
        raise APIError(422, problem[1], code="invalid_value", param=problem[0])


@router.post(
    "/prefixes",
    status_code=202,
    response_model=JobInfo,
    responses=COMMON_ERRORS,
    summary="Start a training job; the prefix appears in the store when it succeeds",
)
async def train(
    body: TrainRequest,
    request: Request,
    principal: Principal = Depends(get_principal),
    idempotency_key: str | None = Header(
        None,
        alias=IDEMPOTENCY_HEADER,
        description="Makes the submission safe to retry: a repeat with the same key (same tenant, within 24 h) "
        "creates no second job and answers the first one's, with `Idempotent-Replayed: true`; the same key with a "
        "different request is a 422 `idempotency_key_reused`. 1 to 255 visible ASCII characters.",
    ),
) -> Any:
    svc = get_service(request)
    info = get_info(request)
    tenant = principal.resolve_tenant(body.tenant_id)
    info.tenant, info.prefix = tenant, body.name
    _check_new_prefix(tenant, body.name)
    if await svc.in_store_pool(lambda: svc.store.read_only):  # (its prefix could never be stored)
        raise read_only_error(svc)
    key = _idempotency_key(idempotency_key)
    spec = body.model_dump(exclude_none=True)
    spec["tenant_id"] = tenant
    jm = _jobs(svc)
    validation_error, too_many, init_not_found, key_reused = _training_errors()
    try:
        rec, replayed = await _call_jobs(svc, jm.submit_once, spec, key)
    except key_reused as e:
        raise APIError(422, str(e), code="idempotency_key_reused", param=IDEMPOTENCY_HEADER) from None
    except init_not_found as e:
        raise APIError(404, str(e), code="prefix_not_found", param="init_from") from None
    except too_many as e:
        wait = await _call_jobs(svc, jm.seconds_until_slot, tenant)
        # a slot frees when one of the tenant's jobs ends: its estimate, else (none has made a step yet) a
        # training job's usual order of magnitude, not the 1 s of a busy engine
        retry_after = max(
            svc.settings.retry_after_s, math.ceil(wait) if wait is not None else TRAINING_RETRY_AFTER_S
        )
        raise APIError(429, str(e), code="too_many_jobs", headers={"Retry-After": str(retry_after)}) from None
    except validation_error as e:
        param = getattr(e, "param", None)
        raise APIError(422, str(e), code="invalid_training_spec", param=param) from None
    if not replayed:
        svc.usage.training_job(tenant)
    d = _job_dict(rec, principal)
    headers = {"Location": f"/prefixes/jobs/{d['job_id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(d, status_code=202, headers=headers)


@router.get("/prefixes/jobs", response_model=JobList, responses=COMMON_ERRORS, summary="Training jobs")
async def list_jobs(
    request: Request,
    tenant_id: str | None = Query(None, pattern=NAME_PATTERN),
    limit: int | None = Query(
        None, ge=1, le=MAX_LIST_LIMIT, description="At most this many jobs (a page); absent: all of them"
    ),
    after: str | None = Query(
        None,
        pattern=JOB_ID_PATTERN,
        description="Job id cursor: the jobs listed after it, oldest first (the `last_id` of the page before)",
    ),
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    jm = _jobs(svc)
    tenant = principal.resolve_tenant(tenant_id) if (tenant_id or not principal.admin) else None
    recs = await _call_jobs(svc, jm.list, tenant) if tenant else await _call_jobs(svc, jm.list)
    recs = [r for r in recs if tenant is None or _job_tenant(r) == tenant]
    if after is not None:
        at = next((i for i, r in enumerate(recs) if r.job_id == after), None)
        if at is None:
            raise APIError(
                422,
                f"after must be the last_id of a listing: no job {after!r} here (finished jobs are deleted in time)",
                code="invalid_value",
                param="after",
            )
        recs = recs[at + 1 :]
    has_more = limit is not None and len(recs) > limit
    page = recs[:limit] if limit is not None else recs
    return {
        "object": "list",
        "data": [_job_dict(r, principal) for r in page],
        "has_more": has_more,
        "first_id": page[0].job_id if page else None,
        "last_id": page[-1].job_id if page else None,
    }


@router.get(
    "/prefixes/jobs/{job_id}", response_model=JobInfo, responses=COMMON_ERRORS, summary="One training job"
)
async def get_job(
    request: Request,
    job_id: str = Path(pattern=JOB_ID_PATTERN),
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    return _job_dict(await _owned_job(svc, principal, job_id), principal)


@router.post(
    "/prefixes/jobs/{job_id}/cancel",
    response_model=JobInfo,
    responses=COMMON_ERRORS,
    summary="Cancel a queued or running job",
)
async def cancel_job(
    request: Request,
    job_id: str = Path(pattern=JOB_ID_PATTERN),
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    await _owned_job(svc, principal, job_id)
    try:
        rec = await _call_jobs(svc, _jobs(svc).cancel, job_id)
    except (KeyError, LookupError):
        raise APIError(404, f"job {job_id!r} not found", code="job_not_found", param="job_id") from None
    if rec is None or not hasattr(rec, "to_dict"):
        rec = await _owned_job(svc, principal, job_id)
    return _job_dict(rec, principal)


# --------------------------------------------------------------------------------------------- prefixes


def _prefix_info(meta: Any, versions: list[int] | None = None) -> dict[str, Any]:
    d = meta.to_dict()
    d.pop("format", None)
    if versions is not None:
        d["versions"] = versions
    return d


@router.get("/prefixes", response_model=PrefixList, responses=COMMON_ERRORS, summary="Stored prefixes")
async def list_prefixes(
    request: Request,
    tenant_id: str | None = Query(None, pattern=NAME_PATTERN),
    limit: int | None = Query(
        None, ge=1, le=MAX_LIST_LIMIT, description="At most this many prefixes (a page); absent: all of them"
    ),
    after: str | None = Query(
        None,
        max_length=2 * MAX_NAME_LENGTH + 1,
        description="`tenant_id/name` cursor: the prefixes sorted after it (the `last_id` of the page before)",
    ),
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    tenant = principal.resolve_tenant(tenant_id) if (tenant_id or not principal.admin) else None
    cursor = _list_cursor(after)
    metas, has_more = await store_call(svc, svc.store.list_page, tenant, after=cursor, limit=limit)
    ids = [f"{m.tenant_id}/{m.name}" for m in metas]
    return {
        "object": "list",
        "data": [_prefix_info(m) for m in metas],
        "has_more": has_more,
        "first_id": ids[0] if ids else None,
        "last_id": ids[-1] if ids else None,
    }


def _list_cursor(after: str | None) -> tuple[str, str] | None:
    if after is None:
        return None
    tenant_id, sep, name = after.partition("/")
    if not (sep and is_valid_name(tenant_id) and is_valid_name(name)):
        raise APIError(
            422,
            "after must be a `tenant_id/name` cursor (the last_id of a listing)",
            code="invalid_value",
            param="after",
        )
    return tenant_id, name


def check_prefix_access(principal: Principal, tenant_id: str, name: str) -> None:
    if name in (".", "..") or not principal.can_access(tenant_id):
        raise APIError(404, f"prefix {tenant_id}/{name} not found", code="prefix_not_found")


@router.get(
    "/prefixes/{tenant_id}/{name}",
    response_model=PrefixInfo,
    responses=COMMON_ERRORS,
    summary="One stored prefix (its latest version, or the one asked for) and its versions",
)
async def get_prefix(
    request: Request,
    tenant_id: str = Path(pattern=NAME_PATTERN),
    name: str = Path(pattern=NAME_PATTERN),
    version: int | None = Query(None, ge=1, description="This version's metadata (default: the latest)"),
    principal: Principal = Depends(get_principal),
) -> Any:
    svc = get_service(request)
    check_prefix_access(principal, tenant_id, name)
    meta = await store_call(
        svc, svc.store.get_meta, tenant_id, name, version, what=f"prefix {tenant_id}/{name}"
    )
    versions = await store_call(svc, svc.store.versions, tenant_id, name, what=f"prefix {tenant_id}/{name}")
    return _prefix_info(meta, versions)


@router.delete(
    "/prefixes/{tenant_id}/{name}",
    responses=COMMON_ERRORS,
    summary="Delete every version of a prefix, or one",
)
async def delete_prefix(
    request: Request,
    tenant_id: str = Path(pattern=NAME_PATTERN),
    name: str = Path(pattern=NAME_PATTERN),
    version: int | None = Query(
        None,
        ge=1,
        description="Delete only this version (deleting the latest makes the one before it the latest: a rollback)",
    ),
    principal: Principal = Depends(get_principal),
) -> dict[str, Any]:
    svc = get_service(request)
    info = get_info(request)
    info.tenant, info.prefix, info.version = tenant_id, name, version
    check_prefix_access(principal, tenant_id, name)
    await store_call(svc, svc.store.delete, tenant_id, name, version, what=f"prefix {tenant_id}/{name}")
    svc.meta_cache.invalidate((tenant_id, name))
    svc.llm.prefix_cache.invalidate(tenant_id, name)
    out: dict[str, Any] = {"tenant_id": tenant_id, "name": name, "object": "prefix", "deleted": True}
    if version is not None:
        out["version"] = version
    return out


@router.get(
    "/prefixes/{tenant_id}/{name}/download",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The prefix export: a safetensors file with the record's metadata in its header",
        },
        **COMMON_ERRORS,
    },
    summary="Download one version of a prefix as a file (upload it to this or another server)",
)
async def download_prefix(
    request: Request,
    tenant_id: str = Path(pattern=NAME_PATTERN),
    name: str = Path(pattern=NAME_PATTERN),
    version: int | None = Query(None, ge=1, description="Version to export (default: the latest)"),
    principal: Principal = Depends(get_principal),
) -> Response:
    svc = get_service(request)
    info = get_info(request)
    info.tenant, info.prefix = tenant_id, name
    check_prefix_access(principal, tenant_id, name)
    if svc.downloads_active >= svc.settings.max_concurrent_downloads:
        raise unavailable(
            f"{svc.downloads_active} prefix downloads are in progress; retry shortly",
            svc.settings.retry_after_s,
            code="too_many_downloads",
        )
    svc.downloads_active += 1
    try:  # (the record and its encoding, in memory until here; then only the file's bytes)
        rec = await store_call(
            svc, svc.store.get, tenant_id, name, version, what=f"prefix {tenant_id}/{name}"
        )
        data = await asyncio.to_thread(export_prefix, rec)
        stored = rec.meta.version
        del rec
    finally:
        svc.downloads_active -= 1
    filename = f"{tenant_id}--{name}--v{stored}.safetensors"
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Prefix-Version": str(stored),
    }
    return Response(data, media_type="application/octet-stream", headers=headers)


_UPLOAD_ERRORS: dict[type[Exception], str] = {
    errors.FingerprintMismatch: "prefix_incompatible",
    errors.ChecksumMismatch: "prefix_corrupt",
    errors.InvalidPrefix: "invalid_prefix",
}


@router.post(
    "/prefixes/{tenant_id}/{name}/upload",
    status_code=201,
    response_model=PrefixInfo,
    responses=COMMON_ERRORS,
    summary="Store an uploaded prefix (a PrefixServe export, or a PEFT adapter) as a new version",
)
async def upload_prefix(
    request: Request,
    tenant_id: str = Path(pattern=NAME_PATTERN),
    name: str = Path(pattern=NAME_PATTERN),
    file: UploadFile = File(
        description="A prefix export (GET .../download) or, with adapter_config, a PEFT adapter_model.safetensors"
    ),
    adapter_config: UploadFile | None = File(
        None,
        description="PEFT's adapter_config.json (PREFIX_TUNING or PROMPT_TUNING) when `file` is its weights",
    ),
    prompt_format: Literal["chat", "raw"] | None = Form(
        None,
        description="How prompts are rendered for this prefix (default: the export's own; 'raw' for PEFT adapters)",
    ),
    principal: Principal = Depends(get_principal),
    idempotency_key: str | None = Header(
        None,
        alias=IDEMPOTENCY_HEADER,
        description="Makes the upload safe to retry: a repeat with the same key (same tenant and name) stores no "
        "second version and answers the first one's, with `Idempotent-Replayed: true`; the same key with other "
        "content is a 422 `idempotency_key_reused`. 1 to 255 visible ASCII characters.",
    ),
) -> Any:
    svc = get_service(request)
    info = get_info(request)
    info.tenant, info.prefix = tenant_id, name
    check_prefix_access(principal, tenant_id, name)
    _check_new_prefix(tenant_id, name)
    key = _idempotency_key(idempotency_key)
    # (the middleware admitted it before reading its body: key, tenant, and a slot of max_concurrent_uploads)
    data = await file.read()
    config = await adapter_config.read() if adapter_config is not None else None
    try:
        incoming = await asyncio.to_thread(
            from_upload,
            data,
            svc.bundle,
            config,
            prompt_format,
            # (what this server's own training may make comes back in, whatever the upload limit says)
            max(svc.settings.max_upload_prefix_length, svc.settings.training_max_prefix_length),
        )
    except PrefixTooLong as e:
        raise APIError(413, str(e), code="prefix_too_long", param="file") from None
    except tuple(_UPLOAD_ERRORS) as e:
        code = next(c for cls, c in _UPLOAD_ERRORS.items() if isinstance(e, cls))
        param = "adapter_config" if isinstance(e, InvalidAdapterConfig) else "file"
        raise APIError(422, str(e), code=code, param=param) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # malformed in a way not foreseen
        log.warning("upload for %s/%s refused: unreadable file", tenant_id, name, exc_info=True)
        raise APIError(
            422,
            f"the uploaded file could not be read: {type(e).__name__}: {e}",
            code="invalid_prefix",
            param="file",
        ) from None
    # the prompt format given, or the export's own: the same upload either way
    effective = incoming.extra.get("prompt_format")
    digest = _upload_digest(data, config, effective) if key is not None else None
    del data, config
    meta, created = await _store_upload(svc, incoming, tenant_id, name, key, digest)
    headers = {"Location": f"/prefixes/{tenant_id}/{name}"}
    if created:
        log.info("stored uploaded prefix %s (%s, P=%d)", meta.label, incoming.kind, incoming.prefix_length)
    else:
        if (meta.extra.get(IDEMPOTENCY) or {}).get("digest") != digest:
            raise APIError(
                422,
                f"{IDEMPOTENCY_HEADER} {key!r} was already used for {meta.label} with another upload; use a new key "
                "for a new version",
                code="idempotency_key_reused",
                param=IDEMPOTENCY_HEADER,
            )
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(_prefix_info(meta), status_code=201, headers=headers)


def _upload_digest(data: bytes, config: bytes | None, prompt_format: str | None) -> str:
    """What a repeated upload's Idempotency-Key is compared by: the same file, adapter config and prompt format."""
    h = hashlib.sha256()
    for part in (data, config or b"", (prompt_format or "").encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


async def _store_upload(
    svc: Service, incoming: IncomingPrefix, tenant_id: str, name: str, key: str | None, digest: str | None
) -> tuple[PrefixMeta, bool]:
    """Check that the parsed upload fits this server's context limit, then store it as a new version: (its
    metadata, True), or with an Idempotency-Key already used for the name (that version, False)."""
    llm = svc.llm
    if (
        incoming.prefix_length > llm.max_prefix_len
    ):  # a request needs a prompt token and an output token after it
        if incoming.prefix_length + 2 > llm.max_model_len:
            where = f"the context limit of {llm.max_model_len} tokens"
        else:  # its blocks would fill the KV pool: it could never be installed beside a request
            pool = llm.pool
            where = (
                f"this server's KV cache ({incoming.prefix_length} positions take "
                f"{pool.blocks_for(incoming.prefix_length)} of its {pool.num_blocks} blocks of {pool.block_size}; "
                f"at most {llm.max_prefix_len} fit, kv_cache_mb raises it)"
            )
        raise APIError(
            413,
            f"prefix of {incoming.prefix_length} positions leaves no room for a prompt and an output token in "
            f"{where}",
            code="prefix_too_long",
            param="file",
        )
    if key is None:
        meta = await store_call(svc, incoming.put, svc.store, tenant_id, name, written_from="file")
        created = True
    else:
        assert digest is not None
        meta, created = await store_call(
            svc, incoming.put_once, svc.store, tenant_id, name, key, digest, written_from="file"
        )
    # a repeat too: its first attempt may have failed after storing
    svc.meta_cache.invalidate((tenant_id, name))
    return meta, created


# --------------------------------------------------------------------------------------------- admin
@admin_router.get(
    "/tenants", response_model=TenantList, responses=COMMON_ERRORS, summary="Tenants (admin key)"
)
async def list_tenants(request: Request, principal: Principal = Depends(get_principal)) -> Any:
    principal.require_admin()
    svc = get_service(request)
    metas = await store_call(svc, svc.store.list, None)
    counts: dict[str, int] = {}
    for m in metas:
        counts[m.tenant_id] = counts.get(m.tenant_id, 0) + 1
    keyed = set(app_state(request).keyring.tenants)
    data = [
        TenantInfo(tenant_id=t, prefixes=counts.get(t, 0), has_key=t in keyed)
        for t in sorted(set(counts) | keyed)
    ]
    return TenantList(data=data)
