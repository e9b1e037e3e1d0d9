"""The HTTP API: upload a CSV, read a request's status, fetch local output files.

Errors map to JSON answers in one place (``_ERROR_HANDLERS``); no stack trace or
library message reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, BinaryIO

import prometheus_client
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import (
    __version__,
    db,
    download,
    errors,
    ingest,
    jobs,
    metrics,
    migrate,
    models,
    openapi,
    pages,
    pipeline,
    report,
    resources,
    settings,
)

logger = logging.getLogger("imgsvc.web")

MAX_PER_PAGE = 500


def _json(body: dict[str, Any], status_code: int = 200, **kwargs: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status_code, **kwargs)


async def _limited_body(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise errors.UploadError(
                f"the upload is over the limit of {limit:,} bytes (IMGSVC_MAX_CSV_BYTES)",
                status_code=413,
                code="too_large",
            )
        yield chunk


def _csv_limits(config: settings.Settings) -> ingest.Limits:
    return ingest.Limits(
        max_rows=config.max_rows,
        max_images=config.max_images,
        max_urls_per_row=config.max_urls_per_row,
        max_url_length=config.max_url_length,
        max_problems=config.max_problems,
    )


_AS_A_FILE = "send the CSV as a file part (curl -F file=@products.csv, not file=<products.csv)"


async def upload(request: Request) -> Response:
    """POST /upload: validate a CSV, store it, queue its images; answer 202 with the id."""
    res: resources.Resources = request.app.state.resources
    config = res.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise errors.UploadError(
            "send the CSV as multipart/form-data in the field 'file'",
            status_code=415,
            code="unsupported_media_type",
        )
    # The multipart envelope adds a little to the file; allow for it.
    limit = config.max_csv_bytes + 64 * 1024
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise errors.UploadError(
            f"the upload is {int(declared):,} bytes; the limit is "
            f"{config.max_csv_bytes:,} (IMGSVC_MAX_CSV_BYTES)",
            status_code=413,
            code="too_large",
        )
    key = _idempotency_key(request)  # refused before the body is read, not after
    parser = MultiPartParser(
        request.headers, _limited_body(request, limit), max_files=1, max_fields=8, max_part_size=8 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise errors.UploadError("send one file in the field 'file'", code="too_many_files") from exc
        if "Part exceeded maximum size" in exc.message:
            raise errors.UploadError(
                f"a form field that is not a file is over 8 KiB; {_AS_A_FILE}", code="field_too_large"
            ) from exc
        raise errors.UploadError(f"the multipart body is malformed: {exc.message}") from exc
    try:
        file = form.get("file")
        if isinstance(file, str):
            message = f"the field 'file' holds text, not a file; {_AS_A_FILE}"
            raise errors.UploadError(message, code="missing_file")
        if not isinstance(file, UploadFile):
            raise errors.UploadError("the form has no file in the field 'file'", code="missing_file")
        webhook_url = await _checked_webhook_url(form.get("webhook_url"), res)
        digest = await asyncio.to_thread(_sha256, file.file)
        stored = await db.insert_request(
            res.pool,
            file_name=_printable(file.filename),
            webhook_url=webhook_url,
            products=_products(file.file, _csv_limits(config)),
            queue=pipeline.IMAGE_QUEUE,
            task=pipeline.PROCESS_IMAGES,
            images_per_job=config.images_per_job,
            idempotency_key=key,
            csv_sha256=digest,
        )
    finally:
        await form.close()
    if stored.replayed and stored.csv_sha256 != digest:
        raise errors.UploadError(
            "this Idempotency-Key was already used for a different file; use a new key",
            status_code=422,
            code="idempotency_key_reused",
        )
    if not stored.replayed:
        logger.info(
            "request %s accepted: %s products, %s images", stored.request_id, stored.products, stored.images
        )
    status_url = f"{config.base_url}/status/{stored.request_id}"
    if _wants_html(request):
        return RedirectResponse(f"{config.base_url}/requests/{stored.request_id}", status_code=303)
    headers = {"Location": status_url}
    if stored.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _json(
        {
            "request_id": stored.request_id,
            "status": "queued",
            "products": stored.products,
            "images": stored.images,
            "status_url": status_url,
        },
        202,
        headers=headers,
    )


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    key = key.strip()
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise errors.UploadError(
            "the Idempotency-Key header must be 1 to 255 printable characters", code="invalid_idempotency_key"
        )
    return key


def _sha256(file: BinaryIO) -> str:
    """The uploaded file's SHA-256 (blocking: run it in a thread)."""
    file.seek(0)
    digest = hashlib.sha256()
    while block := file.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()


async def _products(file: BinaryIO, limits: ingest.Limits) -> AsyncIterator[models.Product]:
    """The file's valid products, read in a thread a slice at a time so the event loop
    stays free, and none held longer than it takes to store them. After the first
    problem nothing more is handed out, but the file is read to its end so that every
    problem is reported; then CsvInvalid is raised, which undoes what was stored."""
    file.seek(0)
    reader = ingest.Reader(file, limits)
    products = iter(reader)
    while chunk := await asyncio.to_thread(list, itertools.islice(products, _PARSE_SLICE)):
        if reader.problems.total == 0:
            for product in chunk:
                yield product
    reader.check()


_PARSE_SLICE = 2000  # products read per trip to the thread


async def _checked_webhook_url(value: object, res: resources.Resources) -> str | None:
    """The form's webhook_url, checked as the server will use it, or None."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    config = res.settings
    reason = ingest.check_url(text, config.max_url_length)
    if reason is None and not config.webhook_secret:
        reason = "this server has no WEBHOOK_SECRET to sign webhooks with; ask its operator to set one"
    if reason is None:
        try:
            await download.check_destination(text, res.download_limits)
        except errors.PermanentError as exc:
            reason = exc.message
    if reason is not None:
        raise errors.UploadError(f"webhook_url: {reason}", status_code=422, code="invalid_webhook_url")
    return text


def _printable(file_name: str | None) -> str | None:
    """A file name as it may be stored and shown: no control characters (PostgreSQL's
    text takes no NUL), at most 255 characters."""
    if file_name is None:
        return None
    return "".join(c for c in file_name if c.isprintable())[:255] or None


def _page_params(request: Request) -> tuple[int, int]:
    def number(name: str, default: int, maximum: int) -> int:
        raw = request.query_params.get(name, str(default))
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
            raise errors.UploadError(
                f"{name} must be a whole number from 1 to {maximum}",
                status_code=422,
                code="invalid_parameter",
            )
        return int(raw)

    return number("page", 1, 10_000_000), number("per_page", 100, MAX_PER_PAGE)


def _page_info(
    page: int, per_page: int, total_name: str, total: int, url: str, query: str = ""
) -> dict[str, Any]:
    """The paging block of a list: where we are, how many in all, the next page's URL."""
    more = page * per_page < total
    return {
        "page": page,
        "per_page": per_page,
        total_name: total,
        "next": f"{url}?page={page + 1}&per_page={per_page}{query}" if more else None,
    }


def _parse_request_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise errors.UploadError(
            f"{raw[:64]!r} is not a request id (a UUID)", status_code=422, code="invalid_request_id"
        ) from None


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def status(request: Request) -> Response:
    """GET /status/{request_id}: progress, counts and a page of products with their images."""
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    page, per_page = _page_params(request)
    found = await db.get_status(res.pool, request_id, limit=per_page, offset=(page - 1) * per_page)
    if found is None:
        raise HTTPException(404, f"no request with id {request_id}")
    s = found["summary"]
    base = f"{res.settings.base_url}/status/{request_id}"
    products = [
        p | {"images": [i | {"input_url": ingest.redact_url(i["input_url"])} for i in p["images"]]}
        for p in found["products"]
    ]
    webhook = found["webhook"]
    if webhook is not None:
        webhook |= {"delivered_at": _iso(webhook["delivered_at"])}
    counts = {name: s[name] for name in models.COUNTS}
    finished = s["done"] + s["failed"] + s["cancelled"]
    return _json(
        {
            "request_id": str(request_id),
            "status": s["status"],
            "file_name": s["file_name"],
            "created_at": _iso(s["created_at"]),
            "updated_at": _iso(s["updated_at"]),
            "started_at": _iso(s["started_at"]),
            "completed_at": _iso(s["completed_at"]),
            "counts": counts,
            "progress": round(finished / s["total"], 4) if s["total"] else 1.0,
            "bytes_in": s["bytes_in"],
            "bytes_out": s["bytes_out"],
            "status_url": base,
            "output_csv_url": s["output_csv_url"],
            "output_csv_download_url": f"{res.settings.base_url}/requests/{request_id}/output.csv",
            "webhook": webhook,
            "products": products,
            "page": _page_info(page, per_page, "total_products", s["product_count"], base),
        }
    )


async def output_csv(request: Request) -> Response:
    """GET /requests/{request_id}/output.csv: the output CSV, once the request is finished."""
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    info = await db.get_request_for_finish(res.pool, request_id)
    if info is None:
        raise HTTPException(404, f"no request with id {request_id}")
    if info["status"] in ("queued", "processing"):
        finished = info["done"] + info["failed"]
        raise HTTPException(
            409,
            f"the request is still {info['status']} ({finished} of {info['total']} "
            "images finished); the output CSV exists once all are",
        )
    rows = db.output_rows(res.pool, request_id)
    first = await anext(rows, None)  # a database that is away answers 503 here, not a cut 200

    async def chunks() -> AsyncGenerator[list[report.Row], None]:
        async with contextlib.aclosing(rows):
            if first is not None:
                yield first
            async for chunk in rows:
                yield chunk

    return StreamingResponse(
        report.stream_csv(chunks()),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{request_id}-output.csv"'},
    )


def _wants_html(request: Request) -> bool:
    """True for a browser: it asks for HTML before JSON."""
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "application/json" not in accept.split("text/html")[0]


async def index(request: Request) -> Response:
    """GET /: the upload page for a browser; what this service is, as JSON, for others."""
    base = request.app.state.resources.settings.base_url
    if _wants_html(request):
        return HTMLResponse(pages.index(base))
    return _json(
        {
            "service": "imgsvc",
            "version": __version__,
            "upload": f"{base}/upload",
            "status": f"{base}/status/{{request_id}}",
            "docs": f"{base}/docs",
            "openapi": f"{base}/openapi.json",
        }
    )


async def request_page(request: Request) -> Response:
    """GET /requests/{request_id}: the live page for a browser, the status JSON for others."""
    if not _wants_html(request):
        return await status(request)
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    if await db.get_request_for_finish(res.pool, request_id) is None:
        raise HTTPException(404, f"no request with id {request_id}")
    return HTMLResponse(pages.request_page(str(request_id), f"{res.settings.base_url}/status/{request_id}"))


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 document."""
    return _json(openapi.document())


async def docs(request: Request) -> Response:
    """GET /docs: the API documentation page."""
    return HTMLResponse(pages.docs(openapi.document()))


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is alive (no key needed)."""
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    """GET /readyz: the database answers, its schema is current, the store is reachable."""
    res: resources.Resources = request.app.state.resources
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: res.pool.fetchval("SELECT 1")),
        ("schema", lambda: migrate.check(res.pool)),
        ("store", res.store.check),
    ):
        try:
            async with asyncio.timeout(3):
                await check()
            checks[name] = "ok"
        except (errors.ImgsvcError, TimeoutError, *db.UNAVAILABLE) as exc:
            checks[name] = str(exc)[:200] if isinstance(exc, errors.ImgsvcError) else "not answering"
    ready = all(value == "ok" for value in checks.values())
    return _json({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus text format; queue depth is read from the database."""
    res: resources.Resources = request.app.state.resources
    with contextlib.suppress(errors.DatabaseUnavailable):
        counts = {(queue, state): count for queue, state, count in await db.job_counts(res.pool)}
        metrics.jobs.clear()
        for queue in (pipeline.IMAGE_QUEUE, pipeline.REQUEST_QUEUE):
            for state in ("todo", "doing", "failed", "aborted"):
                counts.setdefault((queue, state), 0)
        for (queue, state), count in counts.items():
            metrics.jobs.labels(queue, state).set(count)
    return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


async def list_requests(request: Request) -> Response:
    """GET /requests: requests, newest first, optionally of one status, paged."""
    res: resources.Resources = request.app.state.resources
    page, per_page = _page_params(request)
    wanted = request.query_params.get("status")
    if wanted is not None and wanted not in {s.value for s in models.RequestStatus}:
        choices = ", ".join(s.value for s in models.RequestStatus)
        raise errors.UploadError(
            f"status must be one of {choices}", status_code=422, code="invalid_parameter"
        )
    rows, total = await db.list_requests(
        res.pool, status=wanted, limit=per_page, offset=(page - 1) * per_page
    )
    base = res.settings.base_url
    query = f"&status={wanted}" if wanted else ""
    return _json(
        {
            "requests": [
                {
                    "request_id": row["request_id"],
                    "status": row["status"],
                    "file_name": row["file_name"],
                    "counts": {name: row[name] for name in models.COUNTS},
                    "percent": row["percent"],
                    "created_at": _iso(row["created_at"]),
                    "completed_at": _iso(row["completed_at"]),
                    "status_url": f"{base}/status/{row['request_id']}",
                }
                for row in rows
            ],
            "page": _page_info(page, per_page, "total", total, f"{base}/requests", query),
        }
    )


async def cancel(request: Request) -> Response:
    """POST /requests/{request_id}/cancel: cancel the queued images; the request ends cancelled."""
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    before, cancelled, now = await pipeline.cancel_request(res, str(request_id))
    if before is None:
        raise HTTPException(404, f"no request with id {request_id}")
    if models.RequestStatus(before).is_final:
        raise HTTPException(409, f"the request already finished: {before}")
    return _json(
        {
            "request_id": str(request_id),
            "status": now,
            "cancelled_images": cancelled,
            "status_url": f"{res.settings.base_url}/status/{request_id}",
        },
        202,
    )


class HttpMetrics:
    """Counts and times every HTTP answer by method, route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.http_requests.labels(scope["method"], route, str(status)).inc()
            metrics.http_duration.labels(scope["method"], route).observe(time.perf_counter() - started)


class ApiKeyAuth:
    """Every endpoint but health needs ``Authorization: Bearer <key>`` with one of the
    configured keys. Keys are compared in constant time, all of them every time."""

    OPEN_PATHS = frozenset({"/healthz", "/readyz"})

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [hashlib.sha256(key.encode()).digest() for key in keys]

    def _allowed(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        offered = hashlib.sha256(token.strip().encode()).digest()
        matches = [hmac.compare_digest(offered, key) for key in self.keys]
        return scheme.lower() == "bearer" and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        if self._allowed(header):
            await self.app(scope, receive, send)
            return
        message = "this endpoint needs an API key: Authorization: Bearer <key>"
        if header:
            message = "the API key is not valid"
        response = _json(
            {"error": "unauthorized", "message": message},
            401,
            headers={"WWW-Authenticate": 'Bearer realm="imgsvc"'},
        )
        await response(scope, receive, send)


async def _upload_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.UploadError)
    if _wants_html(request):
        base = request.app.state.resources.settings.base_url
        return HTMLResponse(pages.upload_error(exc.to_json(), base), exc.status_code)
    return _json(exc.to_json(), exc.status_code)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _json({"error": "http_error", "message": exc.detail}, exc.status_code, headers=exc.headers)


# A database error worth trying again: its code, message and Retry-After seconds.
_TRY_AGAIN: dict[type[Exception], tuple[str, str, int]] = {
    errors.DatabaseUnavailable: ("unavailable", "the database is not answering; try again", 5),
    errors.DatabaseConflict: ("conflict", "a concurrent change got in the way; try again", 1),
}


async def _try_again(request: Request, exc: Exception) -> Response:
    code, message, seconds = next(v for kind, v in _TRY_AGAIN.items() if isinstance(exc, kind))
    logger.warning("database %s: %s", code, exc)
    return _json({"error": code, "message": message}, 503, headers={"Retry-After": str(seconds)})


async def _internal(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json({"error": "internal", "message": "internal error; it has been logged"}, 500)


_ERROR_HANDLERS = {
    errors.UploadError: _upload_error,
    HTTPException: _http_error,
    **dict.fromkeys(_TRY_AGAIN, _try_again),
    Exception: _internal,
}


def create_app(config: settings.Settings, database_url: str, *, run_worker: bool) -> Starlette:
    """The Starlette app; with ``run_worker`` it also runs a procrastinate worker."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with resources.opened(config, database_url) as res:
            jobs.use(database_url, config, res)
            app.state.resources = res
            if not run_worker:
                yield
                return
            async with jobs.app.open_async():
                stop = asyncio.Event()
                worker = asyncio.create_task(jobs.run_worker(config, stop))
                try:
                    yield
                finally:
                    stop.set()
                    await worker

    routes: list[BaseRoute] = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/requests", list_requests),
        Route("/requests/{request_id}/cancel", cancel, methods=["POST"]),
        Route("/requests/{request_id}", request_page),
        Route("/openapi.json", openapi_json),
        Route("/docs", docs),
        Route("/upload", upload, methods=["POST"]),
        Route("/status/{request_id}", status),
        Route("/requests/{request_id}/output.csv", output_csv),
    ]
    if not config.aws_bucket_name:
        config.local_storage_dir.mkdir(parents=True, exist_ok=True)
        routes.append(Mount("/files", StaticFiles(directory=config.local_storage_dir), name="files"))
    middleware = [Middleware(HttpMetrics)]
    if config.api_keys:
        middleware.append(Middleware(ApiKeyAuth, keys=config.api_keys))
    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers=_ERROR_HANDLERS, middleware=middleware
    )
