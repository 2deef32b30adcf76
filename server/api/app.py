"""The FastAPI application: `create_app(settings, *, bundle=None, store=None, job_manager=None)`.

The lifespan loads the model once (unless a bundle is injected), opens the prefix store, builds the engine with a
store-backed prefix provider, subscribes to store change events and starts the training job manager. A pure-ASGI
middleware in front of every route assigns/echoes `X-Request-ID`, enforces the body size limit before any parsing,
answers 503 + Retry-After while starting or draining, counts requests for metrics and writes one JSON log line per
request (never prompt text or keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import logging
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store import PrefixStore, open_store
from prefix_store.errors import StoreError
from server.api.auth import MIN_KEY_CHARS, KeyRing, with_api_key_header
from server.api.errors import (
    NO_ROOM,
    APIError,
    SafeJSONResponse,
    install_error_handlers,
    is_json_type,
    json_too_deep,
    nested_too_deep,
    note_error_code,
    with_path_shape,
)
from server.api.limits import RateLimiter
from server.api.metrics import Metrics
from server.api.reload import ConfigReloader, loaded_signatures
from server.api.run import ClientDisconnected
from server.api.service import CURRENT_REQUEST, RequestInfo, Service, rate_limiter
from server.api.stats_log import log_stats
from server.settings import Settings

log = logging.getLogger("prefixserve.api")
access_log = logging.getLogger("prefixserve.access")

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
PROBES = frozenset({"/health", "/ping", "/ready", "/metrics", "/version", "/tgi/health"})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
DOCS = frozenset({"/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# how long an upload's body may take to arrive (64 MiB at 1 MiB/s: about a minute)
UPLOAD_BODY_S = 300.0
# ... and any other body (max_body_bytes, 1 MiB by default): a client trickling one in holds a connection and a task
BODY_S = 60.0
# request bodies (not uploads) held in memory at once, in units of max_body_bytes: past it, 503 (a flood of slow
# bodies, from keyed callers or on an open server, cannot grow memory without bound)
MAX_BUFFERED_BODIES = 256
# ... of which one tenant's requests may hold this many (past it, 429 for that tenant): one tenant's slow bodies
# cannot fill what every tenant shares
MAX_BUFFERED_BODIES_PER_TENANT = 32
# a probe (health, readiness, metrics) takes no body: at most this much is read, without a key, and it is not
# counted against the bodies being received (a flood of keyless POST /ping bodies filled that, 503 for everyone)
PROBE_BODY_BYTES = 4096
# takes max_upload_bytes instead of max_body_bytes
UPLOAD_PATH_RE = re.compile(r"/prefixes/(?P<tenant>[^/]+)/(?P<name>[^/]+)/upload")


@dataclass
class AppState:
    settings: Settings
    keyring: KeyRing
    metrics: Metrics
    bundle: Any = None
    store: PrefixStore | None = None
    job_manager: Any = None
    svc: Service | None = None
    draining: bool = False
    inflight: int = 0
    body_bytes: int = (
        0  # request bodies being received, in memory (not uploads): at most MAX_BUFFERED_BODIES full ones
    )
    tenant_body_bytes: dict[str, int] = field(default_factory=dict)  # ... by tenant (keyed callers)
    owns_store: bool = False
    limiter: RateLimiter | None = None
    owns_jobs: bool = False
    route_methods: list[tuple[Any, str, set[str]]] = field(default_factory=list)  # for 405 Allow headers
    config_loaded: dict[str, Any] = field(default_factory=dict)  # signatures of the config files as read
    tls: Any = None  # server.tls.RenewableTLS: uvicorn's context, where the CLI's server terminates TLS
    freeze_gc: bool = False  # after start-up, move what exists to the GC's permanent generation (the CLI's)
    # start-up failed for a reason its one log line says (a setting, a file): uvicorn is not handed the traceback
    startup_explained: bool = False
    _idle: asyncio.Event | None = field(default=None, repr=False)

    def begin_drain(self) -> None:
        """Stop taking new work: /ready → 503, new requests → 503 + Retry-After; in-flight ones continue."""
        if not self.draining:
            jobs = getattr(self.job_manager, "num_running", 0) if self.owns_jobs else 0
            log.info("draining: refusing new requests, %d in flight%s", self.inflight,
                     f"; {jobs} training job(s) running here go back to the queue" if jobs else "")  # fmt: skip
        self.draining = True
        if self.svc is not None:
            self.svc.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no HTTP request (other than probes) is in flight and the engine is idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inflight == 0 and (self.svc is None or self.svc.engine.idle()):
                return True
            await asyncio.sleep(0.02)
        return self.inflight == 0


# ------------------------------------------------------------------------------------------------ middleware
async def _send_error(
    send: Send, status: int, message: str, code: str, request_id: str, retry_after: int, path: str
) -> None:
    await _send_api_error(send, APIError(status, message, code=code), request_id, retry_after, path)


async def _send_api_error(send: Send, e: APIError, request_id: str, retry_after: int, path: str) -> None:
    """An error answered before the route ran (with TGI's `error_type` on /tgi, as the route's own errors)."""
    headers = {"x-request-id": request_id, **e.headers}
    note_error_code(CURRENT_REQUEST.get(), e.code)
    if e.status in (429, 503):
        headers.setdefault("retry-after", str(retry_after))
    resp = SafeJSONResponse(with_path_shape(e.body(), e.status, path), e.status, headers=headers)
    await resp({"type": "http"}, _no_receive, send)


def _route_template(st: AppState, path: str, method: str) -> str | None:
    """The template of the route a request answered before routing (413 body too large, 503 draining, ...) would
    have taken, so that its metrics and log line name it, not "unmatched"; None if no route serves the path."""
    fallback = None
    for regex, template, methods in st.route_methods:
        if regex.match(path):
            if method in methods:
                return template
            fallback = fallback or template
    return fallback


def _header_principal(st: AppState, headers: dict[bytes, bytes]) -> Any:
    """The caller by its Authorization header, as the routes will find it (401 APIError when keys are configured
    and it has none or a wrong one)."""
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = value.partition(" ")
    creds = HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip()) if value else None
    creds = with_api_key_header(creds, headers.get(b"x-api-key", b"").decode("latin-1"))
    return st.keyring.authenticate(creds)


def _admit_upload(st: AppState, headers: dict[bytes, bytes], path: str) -> str:
    """The upload route's own checks, made before its (large) body is read: the API key (401), the tenant (404, as
    the route answers), and the uploads in progress (503: at most `max_concurrent_uploads`, one per tenant, so one
    tenant's slow uploads cannot hold every slot; counted from here, `uploading_tenants`). So no client can make the
    server take in up to max_upload_bytes for nothing, nor many such bodies at once. Returns the tenant."""
    from server.api.routes_prefixes import check_prefix_access

    principal = _header_principal(st, headers)
    m = UPLOAD_PATH_RE.fullmatch(path)
    assert m is not None
    tenant = m["tenant"]
    check_prefix_access(principal, tenant, m["name"])
    svc = st.svc
    assert svc is not None  # (the middleware answers 503 until the service is built)
    # (Retry-After is added as the error is sent)
    if tenant in svc.uploading_tenants:
        raise APIError(503, "an upload of this tenant is in progress; retry shortly", code="too_many_uploads")
    if svc.uploads_active >= st.settings.max_concurrent_uploads:
        raise APIError(
            503,
            f"{svc.uploads_active} prefix uploads are in progress; retry shortly",
            code="too_many_uploads",
        )
    svc.uploading_tenants.add(tenant)
    return tenant


async def _no_receive() -> Message:  # pragma: no cover - responses above never read
    return {"type": "http.disconnect"}


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    def _lifespan_send(self, send: Send) -> Send:
        """Starlette hands uvicorn a failed start-up's traceback, which uvicorn logs whole; where the lifespan's
        own line already said what to change (a setting too small, a file that cannot be read), that line is the
        message and the traceback only noise (kept at debug level)."""

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.state.startup_explained:
                log.debug("start-up failure:\n%s", message.get("message", ""))
                message = {**message, "message": ""}
            await send(message)

        return lifespan_send

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        settings = st.settings
        t0 = time.monotonic()
        # the first of a repeated header, as Starlette's `request.headers.get` (the routes) reads it
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        info = RequestInfo(request_id=rid)
        # replaced (spaces, too long, ...): its line still names what the client sent
        if given and rid != given:
            info.given_request_id = given[:128]
        scope["prefixserve"] = info
        CURRENT_REQUEST.set(info)  # (this task's context: the route runs in it)
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        probe = path in PROBES
        status_box = [0]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                hs = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                hs.append((b"x-request-id", rid.encode("latin-1")))
                hs.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in info.headers.items())
                message = {**message, "headers": hs}
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and not recorded
            ):
                # log and count before the last byte leaves: a client that saw the response can see its log line
                recorded.append(True)
                self._record(scope, info, method, path, status_box[0] or 500, time.monotonic() - t0, probe)
                if uploading is not None and st.svc is not None:
                    # the upload is over once answered: the tenant's next one may come at once (the slot used to
                    # come back only after FastAPI had closed the spooled file, on a thread)
                    st.svc.uploading_tenants.discard(uploading)
            await send(message)

        recorded: list[bool] = []
        counted = False
        uploading: str | None = None  # the tenant whose upload slot this request holds
        buffered = 0  # bytes of its body counted in st.body_bytes
        owner: str | None = None  # the tenant whose share of st.body_bytes its body counts in
        body_buf: IO[bytes] | None = None
        try:
            if st.draining and not probe:
                await _send_error(
                    send_wrapper,
                    503,
                    "server is shutting down",
                    "shutting_down",
                    rid,
                    settings.retry_after_s,
                    path,
                )
                return
            if path.endswith("\n"):
                # Starlette's route patterns end in `$`, which matches before a final newline: "/v1/models\n"
                # answered as "/v1/models" (and "/v1/models/acme\n" as acme's). No path of ours ends in one
                await _send_error(
                    send_wrapper, 404, "not found", "not_found", rid, settings.retry_after_s, path
                )
                return
            if st.svc is None and not probe and path not in DOCS:
                await _send_error(
                    send_wrapper, 503, "server is starting", "starting", rid, settings.retry_after_s, path
                )
                return
            if not probe:
                # in flight from here, while its body is still arriving: a drain (SIGTERM) waits for it like for
                # any other request it let in (an upload's body could take minutes, and was cut at the grace's
                # start), and the routes serve it though the server is draining by then
                st.inflight += 1
                counted = True
                info.admitted = True
            upload = method == "POST" and UPLOAD_PATH_RE.fullmatch(path) is not None
            limit = settings.max_upload_bytes if upload else settings.max_body_bytes
            too_large = (
                f"request body exceeds {limit} bytes ({'max_upload_bytes' if upload else 'max_body_bytes'})"
            )
            if probe:
                limit, too_large = PROBE_BODY_BYTES, f"a probe's body may be at most {PROBE_BODY_BYTES} bytes"
            cl = headers.get(b"content-length")
            if cl is not None:
                try:
                    declared = int(cl)
                    if declared < 0:
                        raise ValueError
                except ValueError:
                    await _send_error(
                        send_wrapper, 400, "invalid Content-Length", "bad_request", rid, 1, path
                    )
                    return
                if declared > limit:
                    await _send_error(send_wrapper, 413, too_large, "body_too_large", rid, 1, path)
                    return
            try:
                if upload:
                    uploading = _admit_upload(st, headers, path)
                elif method in BODY_METHODS and st.keyring.enabled and not probe:  # (POST /ping: open too)
                    # a body is read only for a caller with a key: no one without one can make the server hold
                    # up to max_body_bytes per connection
                    caller = _header_principal(st, headers)
                    owner = None if caller.admin else caller.tenant_id
            except APIError as e:
                await _send_api_error(send_wrapper, e, rid, st.settings.retry_after_s, path)
                return
            if method in BODY_METHODS:
                # read whole before the route runs (the limit holds whatever Content-Length said); an upload's
                # body goes to a file past 1 MiB, so concurrent uploads do not each hold it in memory
                body_buf = tempfile.SpooledTemporaryFile(max_size=1 << 20) if upload else io.BytesIO()  # noqa: SIM115
                size = 0
                allowed = UPLOAD_BODY_S if upload else BODY_S
                deadline = time.monotonic() + allowed
                while True:
                    # a client trickling its body may not keep its connection (an upload: its slot) for good
                    try:
                        msg = await asyncio.wait_for(receive(), max(0.001, deadline - time.monotonic()))
                    except TimeoutError:
                        why = f"the {'upload' if upload else 'request'}'s body did not arrive within {allowed:g} s"
                        await _send_error(send_wrapper, 408, why, "request_timeout", rid, 1, path)
                        return
                    if msg["type"] == "http.disconnect":
                        status_box[0] = 499
                        return
                    body = msg.get("body", b"")
                    size += len(body)
                    if size > limit:
                        await _send_error(send_wrapper, 413, too_large, "body_too_large", rid, 1, path)
                        return
                    if not upload and not probe:  # (an upload spools to a file, one per tenant)
                        st.body_bytes += len(body)
                        buffered += len(body)
                        if owner is not None and body:  # (an empty one leaves no entry: nothing to take back)
                            held = st.tenant_body_bytes.get(owner, 0) + len(body)
                            st.tenant_body_bytes[owner] = held
                            if held > MAX_BUFFERED_BODIES_PER_TENANT * settings.max_body_bytes:
                                await _send_error(
                                    send_wrapper,
                                    429,
                                    "too many of this tenant's request bodies are being received; retry shortly",
                                    "too_many_bodies",
                                    rid,
                                    settings.retry_after_s,
                                    path,
                                )
                                return
                        if st.body_bytes > MAX_BUFFERED_BODIES * settings.max_body_bytes:
                            await _send_error(
                                send_wrapper,
                                503,
                                "too many request bodies are being received; retry shortly",
                                "server_busy",
                                rid,
                                settings.retry_after_s,
                                path,
                            )
                            return
                    try:
                        body_buf.write(body)
                    except OSError as e:  # an upload spooled to a full temporary folder
                        log.error("request %s: cannot buffer its body: %s", rid, e)
                        await _send_error(
                            send_wrapper,
                            503,
                            NO_ROOM,
                            "server_busy",
                            rid,
                            settings.retry_after_s,
                            path,
                        )
                        return
                    if not msg.get("more_body", False):
                        break
                # one depth for every JSON body, whichever of Python's parsers, templates and serialisers would
                # reach it (each fails at a depth of its own, some after the request has run)
                ctype = headers.get(b"content-type", b"").decode("latin-1")
                if (
                    isinstance(body_buf, io.BytesIO)
                    and is_json_type(ctype)
                    and json_too_deep(body_buf.getvalue())
                ):
                    await _send_api_error(send_wrapper, nested_too_deep(), rid, 1, path)
                    return
                body_buf.seek(0)
                receive = _replay(body_buf, size, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            st.body_bytes -= buffered
            if owner is not None and buffered:
                left = st.tenant_body_bytes.get(owner, 0) - buffered
                if left > 0:
                    st.tenant_body_bytes[owner] = left
                else:
                    st.tenant_body_bytes.pop(owner, None)
            if body_buf is not None:
                body_buf.close()
            if uploading is not None and st.svc is not None:
                st.svc.uploading_tenants.discard(uploading)
            if counted:
                st.inflight -= 1
            if not recorded:
                self._record(scope, info, method, path, status_box[0] or 500, time.monotonic() - t0, probe)

    def _record(
        self,
        scope: Scope,
        info: RequestInfo,
        method: str,
        path: str,
        status: int,
        latency: float,
        probe: bool,
    ) -> None:
        route = scope.get("route")
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if template is None:
            template = _route_template(self.state, path, method)
        if template is None:
            template = path if (path in PROBES or path in DOCS) else "unmatched"
        # any token is a valid HTTP method: unknown ones share one label (and are cut in the log), or anyone could
        # grow the metric series (and /metrics) without bound
        known = method in HTTP_METHODS
        with contextlib.suppress(Exception):
            self.state.metrics.requests.labels(template, method if known else "other", str(status)).inc()
        method = method if known else method[:16]
        fields = {
            "event": "request",
            "request_id": info.request_id,
            "given_request_id": info.given_request_id,
            "method": method,
            "route": template,
            "status": status,
            "latency_s": round(latency, 6),
            "principal": info.principal,
            "tenant": info.tenant,
            "prefix": info.prefix,
            "version": info.version,
            "prompt_tokens": info.prompt_tokens,
            "completion_tokens": info.completion_tokens,
            "queue_s": None if info.queue_s is None else round(info.queue_s, 6),
            "ttft_s": None if info.ttft_s is None else round(info.ttft_s, 6),
            "finish_reason": info.finish_reason,
            "error_code": info.error_code,
        }
        if info.prompt is not None:  # settings.log_prompts only
            fields["prompt"] = info.prompt[:2000]
        fields = {k: v for k, v in fields.items() if v is not None}
        # a server-side failure or refusal (5xx) stands out from the traffic: what an operator alerts on (a probe's
        # 503 is the readiness it reports, not a failure)
        level = logging.INFO
        if probe and status < 400:
            level = logging.DEBUG
        elif status >= 500 and not probe:
            level = logging.WARNING
        access_log.log(level, "%s %s %d", method, template, status, extra={"fields": fields})


def _replay(body: IO[bytes], size: int, receive: Receive, chunk: int = 1 << 20) -> Receive:
    """The buffered body (`size` bytes), in chunks of at most `chunk`, then whatever the client sends next."""
    sent, done = 0, False

    async def replay() -> Message:
        nonlocal sent, done
        if done:
            return await receive()
        data = body.read(min(chunk, size - sent))
        sent += len(data)
        if sent >= size or not data:
            done = True
            body.close()
        return {"type": "http.request", "body": data, "more_body": not done}

    return replay


# ------------------------------------------------------------------------------------------------ lifespan
def _load_bundle(settings: Settings) -> Any:
    from server.model import load_model

    return load_model(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache)


def _make_job_manager(settings: Settings, bundle: Any, store: PrefixStore) -> Any:
    try:
        from server.engine.engine import serving_context
        from server.training import JobManager, TrainingLimits
    except ImportError as e:  # pragma: no cover - the training package ships with the server
        log.warning("training unavailable (%s): the /prefixes training routes answer 503", e)
        return None

    return JobManager(
        bundle,
        store,
        jobs_url=settings.jobs_url,
        in_process_workers=settings.training_workers,
        max_jobs_per_tenant=settings.max_jobs_per_tenant,
        jobs_kept_per_tenant=settings.jobs_kept_per_tenant,
        retention_s=settings.jobs_retention_s,
        train_threads=settings.training_threads,
        train_nice=settings.training_nice,
        limits=TrainingLimits(
            max_examples=settings.training_max_examples,
            max_total_tokens=settings.training_max_total_tokens,
            max_prefix_length=settings.training_max_prefix_length,
            max_steps=settings.training_max_steps,
            max_seconds=settings.training_max_seconds,
            max_positions=serving_context(settings.max_model_len, bundle.spec.max_positions),
            # (less the room a record's header and the upload's multipart take)
            max_record_bytes=max(settings.max_upload_bytes - 2**16, 1),
        ),
    )


def _store_hints(store: PrefixStore, fingerprint: str) -> None:
    """Warn when the store's backend is configured to lose prefixes (`durability_warnings`) or its prefixes were
    all made for another base model (`adopt.foreign_store_hint`); start-up checks only, never in the way of
    serving."""
    from server.prefixes.adopt import foreign_store_hint

    try:
        for warning in store.durability_warnings():
            log.warning("prefix store: %s", warning)
    except Exception as e:
        log.debug("start-up store configuration check skipped: %s", e)
    try:
        hint = foreign_store_hint(store, fingerprint)
    except Exception as e:
        log.debug("start-up fingerprint check skipped: %s", e)
        return
    if hint is not None:
        log.warning("%s", hint)


# failures of a setting or a file, which their message explains: logged as one line (--log-level debug adds the
# traceback); anything else is a bug's, and uvicorn logs its traceback
_EXPLAINED_STARTUP_ERRORS = (ValueError, OSError, StoreError)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    st: AppState = app.state.ps
    s = st.settings
    if not st.keyring.enabled:
        log.warning(
            "no API keys configured (PREFIXSERVE_API_KEYS / PREFIXSERVE_API_KEYS_FILE / PREFIXSERVE_ADMIN_KEY): "
            "the server is OPEN, any caller may act as any tenant; use it only for local development"
        )
    if s.metrics_require_admin and not s.admin_key:
        log.warning(
            "metrics_require_admin is set but no admin key is configured: %s",
            "no key can read GET /metrics"
            if st.keyring.enabled
            else "GET /metrics stays open (no keys at all)",
        )
    if st.keyring.enabled:
        log.info(
            "API keys configured for %d tenants%s",
            len(st.keyring.tenants),
            " and an admin key" * bool(s.admin_key),
        )
        if st.keyring.short_keys:
            log.warning(
                "API keys shorter than %d characters (%s): failed keys are not throttled, so a key must be too "
                "long to guess; make them random and long (e.g. `openssl rand -hex 24`)",
                MIN_KEY_CHARS,
                ", ".join(st.keyring.short_keys[:5]) + (", ..." if len(st.keyring.short_keys) > 5 else ""),
            )
    t0 = time.monotonic()
    try:
        if st.bundle is None:
            log.info("loading model %s (device=%s, dtype=%s)", s.model, s.device, s.dtype)
            st.bundle = await asyncio.to_thread(_load_bundle, s)
        if st.store is None:
            st.store = open_store(s.store_url)
            st.owns_store = True
    except Exception as e:
        # one line that says what failed (uvicorn exits the process itself); the traceback follows only where the
        # failure is not one of a setting or a file (a bug's)
        doing = f"loading model {s.model}" if st.bundle is None else f"opening the prefix store {st.store!r}"
        log.error("cannot start: %s failed: %s: %s", doing, type(e).__name__, e)
        st.startup_explained = isinstance(e, _EXPLAINED_STARTUP_ERRORS)
        raise
    store_reachable = True
    try:
        await asyncio.to_thread(st.store.ping)
    except Exception as e:
        store_reachable = False
        log.warning("prefix store %r not reachable at start-up (%s); /ready reports not ready", st.store, e)
    else:
        if st.store.read_only:
            log.warning(
                "prefix store %r is on a read-only filesystem: its prefixes are served; uploads, deletes, copies "
                "and training results are refused (503 store_read_only)",
                st.store,
            )
    if st.job_manager is None:
        try:
            st.job_manager = await asyncio.to_thread(_make_job_manager, s, st.bundle, st.store)
            st.owns_jobs = True
        except Exception as e:  # serving does not depend on training: start without it
            log.error("training jobs unavailable (%s): the /prefixes training routes answer 503", e)
            st.job_manager = None
    try:
        svc = Service.build(
            s, st.bundle, st.store, st.metrics, job_manager=st.job_manager, limiter=st.limiter
        )
        if st.owns_jobs and st.job_manager is not None:
            # known now the engine has its KV pool: a prefix too long to be installed beside a request is refused
            # at submission, not trained into one every request fails on
            limits = dataclasses.replace(st.job_manager.limits, max_prefix_positions=svc.llm.max_prefix_len)
            st.job_manager.limits = limits
        await asyncio.to_thread(svc.start)
    except BaseException as e:
        # start-up failed: the job manager never started (no job claimed); its job backend's connection closes
        if st.owns_jobs and st.job_manager is not None:
            with contextlib.suppress(Exception):
                st.job_manager.shutdown()
        if isinstance(e, _EXPLAINED_STARTUP_ERRORS):  # e.g. a KV cache too small for one request
            log.error("cannot start: %s", e)
            st.startup_explained = True
        raise
    svc.usage.start()
    if st.freeze_gc:
        # hundreds of thousands of long-lived objects (torch, transformers, the app) made every full collection
        # stop the server for 0.2-0.7 s (streams stalled mid-token): collected once here, they are never scanned
        # again (vLLM's server does the same)
        gc.collect()
        gc.freeze()
        log.debug("gc: %d start-up objects frozen", gc.get_freeze_count())
    st.svc = svc
    if st.owns_jobs and st.job_manager is not None:
        # last, once the server is ready: a worker started earlier could claim a job that a signal or a failure
        # during start-up then left "running" (the start-up signal exits at once, with no drain)
        try:
            st.job_manager.start()
        except Exception as e:  # serving does not depend on training: jobs queue for other workers
            log.error("training workers did not start (%s): jobs wait for `prefixserve worker` processes", e)
    reloader = asyncio.create_task(ConfigReloader(st, s.config_reload_s).run(), name="config-reload")
    stats = (
        asyncio.create_task(log_stats(svc, s.log_stats_interval_s), name="engine-stats")
        if s.log_stats_interval_s > 0
        else None
    )
    log.info(
        "%s: model %s (fingerprint %s…) loaded in %.1fs; store %r; tool calls parsed as %s",
        "ready" if store_reachable else "started, not ready until the prefix store answers",
        st.bundle.name,
        str(st.bundle.fingerprint)[:12],
        time.monotonic() - t0,
        st.store,
        svc.tool_parser.name,
    )
    hint = (
        asyncio.create_task(asyncio.to_thread(_store_hints, st.store, st.bundle.fingerprint))
        if store_reachable
        else None
    )
    try:
        yield
    finally:
        reloader.cancel()
        if stats is not None:
            stats.cancel()
        if hint is not None:
            hint.cancel()
        st.begin_drain()
        await svc.stop(s.shutdown_grace_s)
        for closing in (svc.usage.close, svc.limiter.close):  # the last usage counts go out here
            with contextlib.suppress(Exception):
                await closing()
        if st.owns_jobs and st.job_manager is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(st.job_manager.shutdown)
        if st.owns_store:
            with contextlib.suppress(Exception):
                st.store.close()
        log.info("stopped")


# ------------------------------------------------------------------------------------------------ factory
def create_app(
    settings: Settings | None = None,
    *,
    bundle: Any = None,
    store: PrefixStore | None = None,
    job_manager: Any = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """Build the app; inject `bundle` / `store` / `job_manager` to skip loading them (tests, embedding).
    `freeze_gc`: once started, freeze the garbage collector's view of every object alive (a server process; not
    for a process that builds many apps, whose later garbage would never be collected)."""
    from server.api import (
        routes_anthropic,
        routes_generate,
        routes_openai,
        routes_ops,
        routes_prefixes,
        routes_responses,
        routes_tgi,
        routes_usage,
    )

    settings = settings or Settings()
    config_loaded = loaded_signatures(settings)  # before the files are read
    keyring = KeyRing.from_settings(settings)
    limiter = rate_limiter(settings)  # a bad tenant limits file fails here, before the model loads
    holder: dict[str, AppState] = {}

    def snapshot() -> dict[str, Any] | None:
        st = holder.get("st")
        if st is None:
            return None
        snap = st.svc.snapshot() if st.svc is not None else {}
        snap["http_requests_in_flight"] = st.inflight  # (what a drain waits for)
        return snap

    metrics = Metrics(snapshot)
    st = AppState(
        settings=settings,
        keyring=keyring,
        metrics=metrics,
        bundle=bundle,
        store=store,
        job_manager=job_manager,
        limiter=limiter,
        config_loaded=config_loaded,
        freeze_gc=freeze_gc,
    )
    holder["st"] = st

    app = FastAPI(
        title="PrefixServe",
        version=_version(),
        description=(
            "Multi-tenant LLM inference: one frozen base model, per-tenant trained prefixes, mixed-tenant "
            'continuous batching. Errors: `{"error": {"message", "type", "param", "code"}}`.'
        ),
        lifespan=lifespan,
    )
    app.state.ps = st
    install_error_handlers(app, settings.retry_after_s)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        # the client left before its request started (queued, or waiting for its prefix): its engine requests are
        # aborted already; logged as 499 (nginx's "client closed request"), never an error of the server's
        return Response(status_code=routes_generate.DISCONNECTED)

    routers = (
        routes_generate.router,
        routes_openai.router,
        routes_openai.invocations_router,
        routes_responses.router,
        routes_anthropic.router,
        routes_prefixes.router,
        routes_prefixes.admin_router,
        routes_ops.router,
        routes_usage.router,
        routes_tgi.router,
    )
    for router in routers:
        app.include_router(router)
    # HEAD wherever GET is served, as HTTP has it (and TGI's own router: `HEAD /health` is a probe there): the GET's
    # status and headers, no body (the server sends none for a HEAD); out of the OpenAPI document, as the probes'
    served = [r for router in routers for r in router.routes if isinstance(r, Route) and r.methods]
    with_head = {r.path for r in served if "HEAD" in (r.methods or ())}
    for r in list(served):
        if isinstance(r, APIRoute) and "GET" in (r.methods or ()) and r.path not in with_head:
            app.add_api_route(
                r.path, r.endpoint, methods=["HEAD"], response_model=None, include_in_schema=False,
                dependencies=r.dependencies, response_class=r.response_class,
            )  # fmt: skip
            served.append(app.routes[-1])  # type: ignore[arg-type]
    st.route_methods = [(r.path_regex, r.path, set(r.methods or ())) for r in served]
    app.add_middleware(ServiceMiddleware, state=st)
    if settings.cors_allow_origins:
        # outermost: a browser's preflight (OPTIONS, no key) is answered before the key check
        from starlette.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["Retry-After", "X-Request-Id", "Idempotent-Replayed", "Location"]
            + [
                f"x-ratelimit-{k}-{w}"
                for k in ("limit", "remaining", "reset")
                for w in ("requests", "tokens")
            ],
        )
    _customize_openapi(app, settings, open_mode=not keyring.enabled)
    return app


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for key in ("anyOf", "oneOf") for b in schema.get(key, [])] or [schema]


def _customize_openapi(app: FastAPI, settings: Settings, *, open_mode: bool) -> None:
    """Put the configured limits into the schema; with no keys configured, drop the bearer requirement."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        comps = schema.get("components", {}).get("schemas", {})
        for name in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
            props = comps.get(name, {}).get("properties", {})
            for fld, limit in (
                ("max_tokens", settings.max_new_tokens),
                ("max_completion_tokens", settings.max_new_tokens),
                ("logprobs", settings.max_logprobs),
                ("top_logprobs", settings.max_logprobs),
            ):
                for b in _branches(props.get(fld, {})):
                    if b.get("type") == "integer":
                        b["maximum"] = limit
            for b in (*_branches(props.get("stop", {})), *_branches(props.get("bad_words", {}))):
                if b.get("type") == "array":
                    b["maxItems"] = settings.max_stop_strings
                    b.setdefault("items", {})["maxLength"] = settings.max_stop_chars
                elif b.get("type") == "string":
                    b["maxLength"] = settings.max_stop_chars
        if open_mode:
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    if isinstance(op, dict):
                        op.pop("security", None)
                        for code in ("401", "403"):
                            op.get("responses", {}).pop(code, None)
            schema.get("components", {}).pop("securitySchemes", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("prefixserve")
    except Exception:
        return "0.0.0"
