"""The web app: routes, the two middlewares (metrics, API keys), the one mapping from
errors to HTTP answers, and the lifespan that opens the resources (and, unless told
not to, runs a worker beside the API).

No stack trace or library message reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import (
    access,
    api,
    config_parsers,
    errors,
    logs,
    metrics,
    pages,
    queue,
    reads,
    resources,
    responses,
    settings,
    store,
    upload,
)

logger = logging.getLogger("imgsvc.web")


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
    configured keys, when there are any. Keys are compared in constant time, all of them
    every time. The key's caller (its name and role) goes on to the handlers; without
    keys, everyone is ``access.OPEN``."""

    OPEN_PATHS = frozenset({"/healthz", "/readyz"})

    def __init__(self, app: ASGIApp, keys: tuple[config_parsers.ApiKey, ...]) -> None:
        self.app = app
        self.keys = [(hashlib.sha256(key.key.encode()).digest(), access.Caller.of_key(key)) for key in keys]

    def _caller(self, header: str) -> access.Caller | None:
        scheme, _, token = header.partition(" ")
        offered = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for digest, caller in self.keys:  # no early exit: the time says nothing of which key
            if hmac.compare_digest(offered, digest):
                found = caller
        return found if scheme.lower() == "bearer" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.keys:
            access.put(scope, access.OPEN)
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        caller = self._caller(header)
        if caller is not None:
            access.put(scope, caller)
            await self.app(scope, receive, send)
            return
        message = "this endpoint needs an API key: Authorization: Bearer <key>"
        if header:
            message = "the API key is not valid"
        response = responses.json(
            responses.Error(error="unauthorized", message=message),
            401,
            headers={"WWW-Authenticate": 'Bearer realm="imgsvc"'},
        )
        await response(scope, receive, send)


class OwnedFiles(StaticFiles):
    """The local output files (without a bucket), under ``/files/``: a user key gets
    only the output CSVs of its own requests, as it does their status. Output images
    (``img/<sha256>``) are shared by every request with the same bytes and belong to
    none: any key may read them, as anyone may read a public bucket's. Their names are
    the SHA-256 of their bytes, so only who was given the URL, or has the same image,
    can name one."""

    def __init__(self, *, directory: Path, prefix: str) -> None:
        super().__init__(directory=directory)
        self.prefix = f"{prefix}/" if prefix else ""

    async def get_response(self, path: str, scope: Scope) -> Response:
        """The file, when the caller may see its request; 404 as for a missing one."""
        owner = access.caller_of(scope).only_owner
        if owner is not None:
            first = path.removeprefix(self.prefix).partition("/")[0]
            if first == store.CONTENT_FOLDER and ".." not in path:
                return await super().get_response(path, scope)
            try:
                request_id = uuid.UUID(first)
            except ValueError:
                raise HTTPException(404) from None
            pool = scope["app"].state.resources.pool
            if await reads.get_request_summary(pool, request_id, owner=owner) is None:
                raise HTTPException(404)
        return await super().get_response(path, scope)


async def _upload_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.UploadError)
    if responses.wants_html(request):
        base = request.app.state.resources.settings.base_url
        return HTMLResponse(pages.upload_error(exc.to_json(), base), exc.status_code)
    return responses.json(exc.body(), exc.status_code)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return responses.json(
        responses.Error(error="http_error", message=exc.detail), exc.status_code, headers=exc.headers
    )


# A database error worth trying again: its code, message and Retry-After seconds.
_TRY_AGAIN: dict[type[Exception], tuple[str, str, int]] = {
    errors.DatabaseUnavailable: ("unavailable", "the database is not answering; try again", 5),
    errors.DatabaseConflict: ("conflict", "a concurrent change got in the way; try again", 1),
}


async def _try_again(request: Request, exc: Exception) -> Response:
    code, message, seconds = next(v for kind, v in _TRY_AGAIN.items() if isinstance(exc, kind))
    logger.warning("database %s: %s", code, exc)
    return responses.json(
        responses.Error(error=code, message=message), 503, headers={"Retry-After": str(seconds)}
    )


async def _internal(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return responses.json(
        responses.Error(error="internal", message="internal error; it has been logged"), 500
    )


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
            app.state.resources = res
            if not run_worker:
                yield
                return
            jobs = queue.create_app(config, database_url)
            async with jobs.open_async():
                stop = asyncio.Event()
                worker = asyncio.create_task(queue.run_worker(jobs, res, stop))
                try:
                    yield
                finally:
                    stop.set()
                    await worker

    routes: list[BaseRoute] = [
        Route("/", api.index),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics_endpoint),
        Route("/requests", api.list_requests),
        Route("/requests/{request_id}/cancel", api.cancel, methods=["POST"]),
        Route("/requests/{request_id}", api.request_page),
        Route("/openapi.json", api.openapi_json),
        Route("/docs", api.docs),
        Route("/upload", upload.upload, methods=["POST"]),
        Route("/status/{request_id}", api.status),
        Route("/requests/{request_id}/output.csv", api.output_csv),
    ]
    if not config.aws_bucket_name:
        config.local_storage_dir.mkdir(parents=True, exist_ok=True)
        files = OwnedFiles(directory=config.local_storage_dir, prefix=config.s3_prefix)
        routes.append(Mount("/files", files, name="files"))
    middleware = [Middleware(HttpMetrics), Middleware(ApiKeyAuth, keys=config.api_keys)]
    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers=_ERROR_HANDLERS, middleware=middleware
    )


def from_env() -> Starlette:
    """The API alone, its settings read from the environment: for an ASGI server that
    runs it in several processes (``uvicorn --factory imgsvc.web:from_env --workers 4``).
    Needs DATABASE_URL, and a schema that ``imgsvc migrate`` has made current."""
    config = settings.from_env()
    if not config.database_url:
        raise errors.SettingsError("DATABASE_URL", "is required to serve the API from several processes")
    logs.configure(config.log_level, config.log_format)
    return create_app(config, config.database_url, run_worker=False)
