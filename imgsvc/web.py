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
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import api, errors, metrics, pages, queue, resources, responses, settings, upload

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
        response = responses.json(
            responses.Error(error="unauthorized", message=message),
            401,
            headers={"WWW-Authenticate": 'Bearer realm="imgsvc"'},
        )
        await response(scope, receive, send)


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
        routes.append(Mount("/files", StaticFiles(directory=config.local_storage_dir), name="files"))
    middleware = [Middleware(HttpMetrics)]
    if config.api_keys:
        middleware.append(Middleware(ApiKeyAuth, keys=config.api_keys))
    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers=_ERROR_HANDLERS, middleware=middleware
    )
