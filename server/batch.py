"""Offline batch inference (`prefixserve run-batch`, vLLM's `vllm run-batch`): a file of requests in the OpenAI Batch
API's JSONL format in, one result line per request out, run by this server's own app in-process (no port, no
network) so every request gets exactly what it would get over HTTP: routes, prefixes, limits, errors.

Input, one JSON object per line: `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`
(`url`: one of `BATCH_URLS`; a streamed body is refused). Output, in input order:
`{"id": "batch_req_...", "custom_id": "...", "response": {"status_code", "request_id", "body"}, "error": null}`; a
request the server answers with an error has its status and error body in `response`, as OpenAI's batch output
does; a line that is not a request (bad JSON, an unknown url), or one the server failed on (an exception in a route:
`internal_error`), has `response: null` and `error: {"code", "message"}`. Requests run concurrently (`concurrency` at
a time, default: the engine's batch) and a busy answer (429 / 503 with Retry-After) is retried. The output file is
written whole (a temporary file renamed) or not at all. An interrupted run (`stop`: Ctrl-C, SIGTERM) ends the
requests under way and gives the lines finished before it."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.fsutil import write_atomic

log = logging.getLogger("prefixserve.batch")

BATCH_URLS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/generate",
    "/tokenize",
    "/detokenize",
)
RETRIES = 10_000  # busy answers (429 / 503) retried per request, ...
MAX_BUSY_WAIT_S = 900.0  # ... for this long in all at most (a tenant's concurrency or token limit: minutes)
MAX_RETRY_WAIT_S = 30.0
FINAL_CODES = frozenset({"engine_dead", "shutting_down", "engine_unavailable"})  # busy, but no use waiting


def _line_error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def parse_line(line: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(request, None) for a valid input line, (None, error) otherwise; the request's custom_id may be missing only
    in the error case."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        return None, _line_error("invalid_json", f"the line is not JSON: {e}")
    if not isinstance(obj, dict):
        return None, _line_error("invalid_request", "a line is a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, _line_error("invalid_request", "custom_id (a non-empty string) is required")
    if obj.get("method", "POST") != "POST":
        return obj, _line_error("invalid_request", "method must be POST")
    url = obj.get("url")
    if url not in BATCH_URLS:
        return obj, _line_error("invalid_url", f"url must be one of {', '.join(BATCH_URLS)}, not {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return obj, _line_error("invalid_request", "body (a JSON object) is required")
    if body.get("stream"):
        return obj, _line_error("invalid_request", "stream is not supported in a batch")
    return obj, None


def _busy(r: Any) -> bool:
    """A 429 or 503 worth waiting for: a limit or a full queue, not a server going away."""
    if r.status_code not in (429, 503):
        return False
    try:
        code = (r.json().get("error") or {}).get("code")
    except (ValueError, AttributeError):
        code = None
    return code not in FINAL_CODES


def _retry_after(headers: Any) -> float:
    try:
        return min(MAX_RETRY_WAIT_S, max(0.05, float(headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


async def run_lines(
    app: Any,
    lines: list[str],
    *,
    concurrency: int,
    api_key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """Every line's output object, in input order. `app` must be started (its lifespan entered). Once `stop` is
    set, the requests under way are ended (the engine drops them) and only the lines finished by then are
    returned, still in input order. An exception that is no line's own is raised, no request left running."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    transport = httpx.ASGITransport(app=app)
    sem = asyncio.Semaphore(max(1, concurrency))
    done = 0

    async def post(client: httpx.AsyncClient, req: dict[str, Any]) -> httpx.Response:
        async with sem:
            waited = 0.0
            for attempt in range(RETRIES + 1):
                r = await client.post(req["url"], json=req["body"], headers=headers)
                wait = _retry_after(r.headers)
                if not _busy(r) or attempt == RETRIES or waited + wait > MAX_BUSY_WAIT_S:
                    break
                await asyncio.sleep(wait)
                waited += wait
        return r

    async def one(client: httpx.AsyncClient, line: str) -> dict[str, Any]:
        nonlocal done
        req, error = parse_line(line)
        out: dict[str, Any] = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": (req or {}).get("custom_id"),
            "response": None,
            "error": error,
        }
        if error is None:
            assert req is not None
            try:
                r = await post(client, req)
            except Exception as e:
                # a bug in a route: the app answered 500 and the in-process transport re-raised it; this line's
                # error (vLLM's run-batch does the same), the other lines go on
                log.error("line %r: the server failed on it: %r", out["custom_id"], e, exc_info=e)
                out["error"] = _line_error("internal_error", f"the server failed on this request: {e!r}")
            else:
                try:
                    body = r.json()
                except ValueError:
                    body = {"error": {"message": r.text, "type": "server_error", "param": None, "code": None}}
                out["response"] = {
                    "status_code": r.status_code,
                    "request_id": r.headers.get("x-request-id"),
                    "body": body,
                }
        done += 1
        if progress is not None:
            progress(done, len(lines))
        return out

    # (generous timeouts: a long generation waits its turn behind the others, in-process)
    timeout = httpx.Timeout(None)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=timeout) as client:
        tasks = [asyncio.ensure_future(one(client, line)) for line in lines]
        everything = asyncio.gather(*tasks)
        try:
            if stop is None:
                return await everything
            stopped = asyncio.ensure_future(stop.wait())
            try:
                either: list[asyncio.Future[Any]] = [everything, stopped]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if everything.done():
                return everything.result()  # (raises a task's exception: a bug, never a short result)
            everything.cancel()
            await asyncio.gather(everything, return_exceptions=True)
            return [t.result() for t in tasks if t.done() and not t.cancelled()]
        finally:
            # gather ends at a task's exception with the others still running: none is left behind
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def read_lines(path: str) -> list[str]:
    """The file's non-blank lines. Split at \\n (and \\r\\n) only: `splitlines` also splits at U+2028, U+0085,
    ..., which JSON strings may hold as they are."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def duplicate_id(lines: list[str]) -> str | None:
    """A custom_id two request lines share, if any (lines that are not requests are left to their own errors)."""
    seen: set[str] = set()
    for line in lines:
        req, _ = parse_line(line)
        cid = (req or {}).get("custom_id")
        if isinstance(cid, str):
            if cid in seen:
                return cid
            seen.add(cid)
    return None


def write_lines(path: str, outputs: list[dict[str, Any]]) -> None:
    data = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs)
    if path == "-":
        sys.stdout.write(data)
        sys.stdout.flush()
        return
    write_atomic(Path(path), data)


async def run_batch(
    settings: Any,
    lines: list[str],
    *,
    concurrency: int | None = None,
    api_key: str | None = None,
    bundle: Any = None,
    store: Any = None,
    stop: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """Start the app (the model loads unless `bundle` is given), run every line (until `stop` is set: then the
    lines finished by then), stop the app. It runs no training
    worker: a batch has no training lines, and a worker on a shared job queue (a Redis store's) took the
    deployment's queued jobs, only to hand them back half done when the batch ended."""
    from server.api import create_app

    settings = settings.model_copy(update={"training_workers": 0})
    app = create_app(settings, bundle=bundle, store=store)
    logging.getLogger("httpx").setLevel(
        logging.WARNING
    )  # (a line per request: the progress lines say enough)
    if api_key is None and settings.admin_key is not None:
        api_key = settings.admin_key.get_secret_value()  # the operator's own file: the operator's access
    every = max(1, len(lines) // 20)
    t0 = time.monotonic()

    def progress(n: int, total: int) -> None:
        if n % every == 0 or n == total:
            log.info("%d/%d requests done (%.1f s)", n, total, time.monotonic() - t0)

    async with app.router.lifespan_context(app):
        return await run_lines(
            app,
            lines,
            concurrency=concurrency or settings.max_num_seqs,
            api_key=api_key,
            progress=progress,
            stop=stop,
        )
