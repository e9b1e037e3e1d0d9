"""The reads behind the status API, the output CSV and /metrics: a request's summary
and pages of its products, the list of requests, the output rows, the job counts.
Writes, and the pool they share, are in ``db``.
"""

from __future__ import annotations

import dataclasses
import datetime
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from imgsvc import db, models, report


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSummary:
    """A request's status, its image counts, when it finished and its webhook URL."""

    status: models.RequestStatus
    webhook_url: str | None
    completed_at: datetime.datetime | None
    total: int
    queued: int
    processing: int
    done: int
    failed: int
    cancelled: int
    owner: str | None

    @property
    def counts(self) -> dict[str, int]:
        """The image counts by status, named as in ``models.COUNTS``."""
        return {name: getattr(self, name) for name in models.COUNTS}


async def get_request_summary(
    pool: db.Pool, request_id: uuid.UUID, *, owner: str | None = None
) -> RequestSummary | None:
    """A request's status, counts, finish time and webhook URL; None if it is unknown,
    or when an ``owner`` is given and the request is not that owner's."""
    async with db.translated():
        row = await pool.fetchrow(db.queries()["get_request_summary"], request_id, owner)
    if row is None:
        return None
    # The query selects exactly the summary's fields.
    return RequestSummary(**dict(row) | {"status": models.RequestStatus(row["status"])})


# Makes the URL of an output object from its key (``store.Storage.link``).
Link = Callable[[str], Awaitable[str]]


async def output_url(link: Link, key: str | None, stored: str | None) -> str | None:
    """An output's URL, made from its key now; a row stored without a key keeps the URL
    stored with it."""
    return await link(key) if key is not None else stored


async def output_rows(
    pool: db.Pool, request_id: uuid.UUID, link: Link, chunk: int = 2000
) -> AsyncGenerator[list[report.Row], None]:
    """The products of a request in order, with input and output URLs in order (made
    from the keys by ``link``), a chunk at a time: a request of 100,000 products is
    never in memory whole. Each chunk is its own query (after the last product's
    position), and no connection is held between them, so a client reading the CSV
    slowly holds none of the pool."""
    after = 0
    while True:
        async with db.translated():
            page = await pool.fetch(db.queries()["get_output_rows"], request_id, after, chunk)
        if not page:
            return
        yield [
            report.Row(
                serial=r["serial"],
                name=r["name"],
                input_urls=tuple(r["input_urls"]),
                output_urls=tuple(
                    [
                        await output_url(link, k, u)
                        for k, u in zip(r["output_keys"], r["output_urls"], strict=True)
                    ]
                ),
            )
            for r in page
        ]
        if len(page) < chunk:
            return
        after = page[-1]["position"]


async def list_requests(
    pool: db.Pool, *, status: str | None, limit: int, offset: int, owner: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    """A page of requests, newest first, and how many match in all; only one owner's
    when an ``owner`` is given."""
    async with db.translated():
        rows = await pool.fetch(db.queries()["list_requests"], status, limit, offset, owner)
    total = rows[0]["matching"] if rows else 0
    return [dict(row) for row in rows], total


async def job_counts(pool: db.Pool) -> list[tuple[str, str, int]]:
    """Jobs by queue and state."""
    async with db.translated():
        rows = await pool.fetch(db.queries()["job_counts"])
    return [(row[0], row[1], row[2]) for row in rows]


async def get_status(
    pool: db.Pool, request_id: uuid.UUID, *, limit: int, offset: int, owner: str | None = None
) -> dict[str, Any] | None:
    """A request's progress and one page of its products with their images; None if it
    is unknown, or when an ``owner`` is given and the request is not that owner's."""
    q = db.queries()
    async with db.translated(), pool.acquire() as conn:
        summary = await conn.fetchrow(q["get_request"], request_id, owner)
        if summary is None:
            return None
        products = await conn.fetch(q["get_products_page"], request_id, limit, offset)
        images = await conn.fetch(q["get_images_of_products"], [p["id"] for p in products])
        delivery = await conn.fetchrow(q["get_delivery_of_request"], request_id)
    by_product: dict[int, list[dict[str, Any]]] = {}
    for image in images:
        fields = dict(image)
        by_product.setdefault(fields.pop("product_id"), []).append(fields)
    return {
        "summary": dict(summary),
        "products": [
            {
                "serial": p["serial"],
                "name": p["name"],
                "position": p["position"],
                "images": by_product.get(p["id"], []),
            }
            for p in products
        ],
        "webhook": dict(delivery) if delivery is not None else None,
    }
