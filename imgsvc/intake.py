"""An upload's products stored with their images and their jobs, in one transaction.

The rows are streamed into the database as they are read (COPY into a temporary table)
and turned into products, images and procrastinate jobs by three statements; the
request and its jobs commit or vanish together. Images whose source URL came earlier
in the request are marked as that image's duplicates and get no job.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import asyncpg

from imgsvc import catalog, db, errors, models


@dataclasses.dataclass(frozen=True, slots=True)
class Inserted:
    """A stored request; ``replayed`` when an earlier upload with the same key made it."""

    request_id: str
    products: int
    images: int
    replayed: bool = False
    csv_sha256: str | None = None


async def insert_request(
    pool: db.Pool,
    *,
    file_name: str | None,
    webhook_url: str | None,
    products: Iterable[models.Product] | AsyncIterable[models.Product],
    queue: str,
    task: str,
    images_per_job: int = 1,
    idempotency_key: str | None = None,
    csv_sha256: str | None = None,
    owner: str | None = None,
    reprocess: bool = False,
) -> Inserted:
    """Store a request, its products and images, and queue its jobs, atomically.

    The products are streamed into the database as they come (COPY into a temporary
    table), so a large file is never held in memory; whatever ``products`` raises
    (CsvInvalid, say) rolls everything back. With an ``idempotency_key`` that an
    earlier request of the same ``owner`` has, nothing is stored and that request is
    returned (``replayed``); another owner's request with that key is never returned.
    Images with the same source URL as an earlier one of the request get no job: they
    end with it. ``reprocess`` asks the workers to reuse no stored result.
    """
    q = db.queries()
    async with db.translated(), pool.acquire() as conn:
        if idempotency_key is not None:
            earlier = await conn.fetchrow(q["get_request_by_idempotency_key"], idempotency_key, owner)
            if earlier is not None:
                return _replayed(earlier)
        async with conn.transaction():
            await conn.execute(q["create_upload_rows"])
            counted = _Counted(products)
            await conn.copy_records_to_table("upload_rows", records=counted.rows(), columns=_UPLOAD_COLUMNS)
            request_id = uuid.uuid4()
            created = await conn.fetchval(
                q["insert_request"],
                request_id,
                file_name,
                webhook_url,
                counted.products,
                counted.images,
                idempotency_key,
                csv_sha256,
                owner,
                reprocess,
            )
            if created is None:  # the same key, committed while this file was read
                earlier = await conn.fetchrow(q["get_request_by_idempotency_key"], idempotency_key, owner)
                if earlier is None:
                    raise errors.ImgsvcError("the earlier request with this Idempotency-Key is gone")
                return _replayed(earlier)
            await conn.execute(q["insert_products"], request_id)
            await conn.execute(q["insert_images"], request_id)
            duplicates = 0
            if counted.repeats:
                duplicates = int((await conn.execute(q["mark_duplicates"], request_id)).split()[-1])
            queued = await conn.fetchval(q["defer_image_jobs"], request_id, queue, task, images_per_job)
            expected = -(-(counted.images - duplicates) // images_per_job)
            if queued != expected:
                raise errors.ImgsvcError(
                    f"queued {queued} jobs for {counted.images} images; expected {expected}"
                )
        await _analyze_if_outgrown(conn, counted.images)
    return Inserted(
        request_id=str(request_id), products=counted.products, images=counted.images, csv_sha256=csv_sha256
    )


async def _analyze_if_outgrown(conn: db.Connection, images: int) -> None:
    """Refresh the planner's statistics of the images and products when this request
    alone outnumbers what they say the images table holds (a new database's first
    catalog, say). Until autovacuum comes by, up to a minute later, the planner would
    take the table for the size it was, and the workers' per-image statements would
    scan the request's images instead of looking them up. The table at least doubles
    between two such refreshes, so they stay rare; each costs a sample of the table."""
    q = db.queries()
    if await conn.fetchval(q["images_outgrown"], images):
        await conn.execute(q["analyze_images"])


_UPLOAD_COLUMNS = ("position", "line", "serial", "serial_number", "name", "urls", "sources")


#: Source URLs remembered to tell whether an upload has duplicates. Past this many the
#: database is asked in any case: a set of hashes costs about 70 bytes a URL, and a
#: 500,000-URL upload must not grow the API by 35 MB.
SEEN_URLS = 50_000


class _Counted:
    """Products as rows of ``upload_rows``, counted on the way, with their source URLs
    (``catalog.normalize_url``) and whether any may come twice (``repeats``: by hash,
    and always past ``SEEN_URLS``; the database decides which are the same)."""

    def __init__(self, products: Iterable[models.Product] | AsyncIterable[models.Product]) -> None:
        self._products = products
        self.products = 0
        self.images = 0
        self.repeats = 0
        self._seen: set[int] = set()

    async def rows(self) -> AsyncIterator[tuple[Any, ...]]:
        source = self._products
        if isinstance(source, AsyncIterable):
            async for product in source:
                yield self._row(product)
        else:
            for product in source:
                yield self._row(product)

    def _row(self, p: models.Product) -> tuple[Any, ...]:
        self.products += 1
        self.images += len(p.urls)
        sources = [catalog.normalize_url(url) for url in p.urls]
        seen = self._seen
        if len(seen) < SEEN_URLS:
            for source in sources:
                digest = hash(source)
                if digest in seen:
                    self.repeats += 1
                else:
                    seen.add(digest)
        else:
            self.repeats += 1  # too many to remember: let the database look
        return (self.products, p.line, p.serial, p.serial_number, p.name, p.urls, sources)


def _replayed(earlier: asyncpg.Record) -> Inserted:
    return Inserted(
        request_id=earlier["id"],
        products=earlier["product_count"],
        images=earlier["image_count"],
        replayed=True,
        csv_sha256=earlier["csv_sha256"],
    )
