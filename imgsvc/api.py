"""The HTTP answers about requests and the service: status, the output CSV, the list,
cancel, the browser pages, the OpenAPI document, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import prometheus_client
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from imgsvc import (
    __version__,
    access,
    db,
    errors,
    finish,
    ingest,
    metrics,
    migrate,
    models,
    openapi,
    pages,
    reads,
    report,
    resources,
    responses,
)

MAX_PER_PAGE = 500


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


def _next(page: int, per_page: int, total: int, url: str, query: str = "") -> str | None:
    """The next page's URL of a list, or None on its last page."""
    more = page * per_page < total
    return f"{url}?page={page + 1}&per_page={per_page}{query}" if more else None


def _parse_request_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise errors.UploadError(
            f"{raw[:64]!r} is not a request id (a UUID)", status_code=422, code="invalid_request_id"
        ) from None


async def _visible_summary(request: Request, request_id: uuid.UUID) -> reads.RequestSummary:
    """The request's summary, or 404 when it is unknown or the caller's key may not see
    it: the two answers are the same, so an id tells another key nothing."""
    res: resources.Resources = request.app.state.resources
    owner = access.caller_of(request).only_owner
    info = await reads.get_request_summary(res.pool, request_id, owner=owner)
    if info is None:
        raise HTTPException(404, f"no request with id {request_id}")
    return info


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


async def status(request: Request) -> Response:
    """GET /status/{request_id}: progress, counts and a page of products with their images."""
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    page, per_page = _page_params(request)
    found = await reads.get_status(
        res.pool,
        request_id,
        limit=per_page,
        offset=(page - 1) * per_page,
        owner=access.caller_of(request).only_owner,
    )
    if found is None:
        raise HTTPException(404, f"no request with id {request_id}")
    s = found["summary"]
    base = f"{res.settings.base_url}/status/{request_id}"
    products = [
        responses.Product(
            serial=p["serial"],
            name=p["name"],
            position=p["position"],
            images=[await _image(res, i) for i in p["images"]],
        )
        for p in found["products"]
    ]
    csv_url = s["output_csv_url"]
    if s["output_csv_key"] is not None:
        csv_url = finish.output_csv_link(res, str(request_id), s["output_csv_key"])
    finished = s["done"] + s["failed"] + s["cancelled"]
    return responses.json(
        responses.RequestStatus(
            request_id=str(request_id),
            status=models.RequestStatus(s["status"]),
            file_name=s["file_name"],
            owner=s["owner"],
            created_at=_iso(s["created_at"]),
            updated_at=_iso(s["updated_at"]),
            started_at=_iso(s["started_at"]),
            completed_at=_iso(s["completed_at"]),
            counts=responses.Counts.of(s),
            reuse=responses.Reuse(
                compressed=s["compressed"],
                reused=s["reused"],
                bytes_saved=s["bytes_saved"],
                reprocess=s["reprocess"],
            ),
            progress=round(finished / s["total"], 4) if s["total"] else 1.0,
            bytes_in=s["bytes_in"],
            bytes_out=s["bytes_out"],
            status_url=base,
            output_csv_url=csv_url,
            output_csv_download_url=f"{res.settings.base_url}/requests/{request_id}/output.csv",
            webhook=_webhook(found["webhook"]),
            products=products,
            page=responses.ProductPage(
                page=page,
                per_page=per_page,
                total_products=s["product_count"],
                next=_next(page, per_page, s["product_count"], base),
            ),
        )
    )


def _webhook(row: dict[str, Any] | None) -> responses.Webhook | None:
    """The request's webhook delivery, if it has one."""
    if row is None:
        return None
    return responses.Webhook(
        **row | {"state": models.DeliveryState(row["state"]), "delivered_at": _iso(row["delivered_at"])}
    )


async def _image(res: resources.Resources, row: dict[str, Any]) -> responses.Image:
    """An image row as the API shows it: its source URL without credentials, its output
    URL made from its key now."""
    key = row.pop("output_key")
    return responses.Image(
        **row
        | {
            "input_url": ingest.redact_url(row["input_url"]),
            "status": models.ImageStatus(row["status"]),
            "reused": None if row["reused"] is None else models.ReuseReason(row["reused"]),
            "output_url": await reads.output_url(res.store.link, key, row["output_url"]),
        }
    )


async def output_csv(request: Request) -> Response:
    """GET /requests/{request_id}/output.csv: the output CSV, once the request is finished."""
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    info = await _visible_summary(request, request_id)
    if info.status in ("queued", "processing"):
        finished = info.done + info.failed
        raise HTTPException(
            409,
            f"the request is still {info.status} ({finished} of {info.total} "
            "images finished); the output CSV exists once all are",
        )
    rows = reads.output_rows(res.pool, request_id, res.store.link)  # presigned links signed now
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


async def index(request: Request) -> Response:
    """GET /: the upload page for a browser; what this service is, as JSON, for others."""
    base = request.app.state.resources.settings.base_url
    if responses.wants_html(request):
        return HTMLResponse(pages.index(base))
    return responses.json(
        responses.Service(
            service="imgsvc",
            version=__version__,
            upload=f"{base}/upload",
            status=f"{base}/status/{{request_id}}",
            docs=f"{base}/docs",
            openapi=f"{base}/openapi.json",
        )
    )


async def request_page(request: Request) -> Response:
    """GET /requests/{request_id}: the live page for a browser, the status JSON for others."""
    if not responses.wants_html(request):
        return await status(request)
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    await _visible_summary(request, request_id)
    return HTMLResponse(pages.request_page(str(request_id), f"{res.settings.base_url}/status/{request_id}"))


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 document."""
    return responses.json(openapi.document())


async def docs(request: Request) -> Response:
    """GET /docs: the API documentation page."""
    return HTMLResponse(pages.docs(openapi.document()))


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is alive (no key needed), its version and the schema's."""
    res: resources.Resources = request.app.state.resources
    schema = None
    with contextlib.suppress(errors.ImgsvcError, TimeoutError, *db.UNAVAILABLE):
        async with asyncio.timeout(2):
            found = await migrate.schema_version(res.pool)
        schema = responses.SchemaVersion(
            imgsvc=found.imgsvc, procrastinate=found.procrastinate, pending=found.pending
        )
    return responses.json(responses.Health(status="ok", version=__version__, schema=schema))


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
    return responses.json(
        responses.Ready(status="ready" if ready else "not ready", checks=responses.Checks(**checks)),
        200 if ready else 503,
    )


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus text format; queue depth is read from the database."""
    res: resources.Resources = request.app.state.resources
    with contextlib.suppress(errors.DatabaseUnavailable):
        counts = {(queue, state): count for queue, state, count in await reads.job_counts(res.pool)}
        metrics.jobs.clear()
        for queue in (models.IMAGE_QUEUE, models.REQUEST_QUEUE):
            for state in ("todo", "doing", "failed", "aborted"):
                counts.setdefault((queue, state), 0)
        for (queue, state), count in counts.items():
            metrics.jobs.labels(queue, state).set(count)
    return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


async def list_requests(request: Request) -> Response:
    """GET /requests: requests, newest first, optionally of one status, paged; a user
    key's own only."""
    res: resources.Resources = request.app.state.resources
    page, per_page = _page_params(request)
    wanted = request.query_params.get("status")
    if wanted is not None and wanted not in {s.value for s in models.RequestStatus}:
        choices = ", ".join(s.value for s in models.RequestStatus)
        raise errors.UploadError(
            f"status must be one of {choices}", status_code=422, code="invalid_parameter"
        )
    rows, total = await reads.list_requests(
        res.pool,
        status=wanted,
        limit=per_page,
        offset=(page - 1) * per_page,
        owner=access.caller_of(request).only_owner,
    )
    base = res.settings.base_url
    query = f"&status={wanted}" if wanted else ""
    return responses.json(
        responses.RequestList(
            requests=[
                responses.RequestSummary(
                    request_id=row["request_id"],
                    status=models.RequestStatus(row["status"]),
                    file_name=row["file_name"],
                    owner=row["owner"],
                    counts=responses.Counts.of(row),
                    percent=row["percent"],
                    created_at=_iso(row["created_at"]),
                    completed_at=_iso(row["completed_at"]),
                    status_url=f"{base}/status/{row['request_id']}",
                )
                for row in rows
            ],
            page=responses.RequestPage(
                page=page,
                per_page=per_page,
                total=total,
                next=_next(page, per_page, total, f"{base}/requests", query),
            ),
        )
    )


async def cancel(request: Request) -> Response:
    """POST /requests/{request_id}/cancel: cancel the queued images; the request ends cancelled."""
    res: resources.Resources = request.app.state.resources
    request_id = _parse_request_id(request.path_params["request_id"])
    await _visible_summary(request, request_id)  # a request's owner never changes
    before, cancelled, now = await finish.cancel(res, str(request_id))
    if before is None:
        raise HTTPException(404, f"no request with id {request_id}")
    if models.RequestStatus(before).is_final:
        raise HTTPException(409, f"the request already finished: {before}")
    return responses.json(
        responses.Cancelled(
            request_id=str(request_id),
            status=models.RequestStatus(now),
            cancelled_images=cancelled,
            status_url=f"{res.settings.base_url}/status/{request_id}",
        ),
        202,
    )
