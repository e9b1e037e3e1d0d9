"""Finishing a request: deciding it is final, and what follows, once.

A request becomes final in one of three transactions, each of which also queues its
``finish_request`` job (under a queueing lock, so never twice):
- the statement that records its last image (``db.record_images``);
- a cancel that leaves nothing running (``cancel``);
- the maintenance sweep's count, should the counters ever be wrong (``finalize``).

The job then runs ``complete``: it writes the output CSV beside the images and queues
the webhook delivery, at most one per request.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import uuid

from imgsvc import db, metrics, models, notify, reads, report, resources, store

logger = logging.getLogger("imgsvc.finish")

# The output CSV is written into memory up to this size, and to a temporary file beyond.
OUTPUT_CSV_IN_MEMORY = 8 * 1024 * 1024


def announce(request_id: str, status: models.RequestStatus) -> None:
    """Log and count a request that has just become final."""
    logger.info("request %s finished: %s", request_id, status)
    metrics.requests_finished.labels(str(status)).inc()


async def finalize(conn: db.Connection, request_id: str, status: models.RequestStatus) -> None:
    """A cancel, or the maintenance task's count, found nothing left to run: the request
    is final in the caller's transaction, which queues what follows as a job, so it
    cannot be lost or queued twice. (When a request's last image finishes, the statement
    that records it does the same.)"""
    announce(request_id, status)
    await db.defer_job(
        conn,
        models.REQUEST_QUEUE,
        models.FINISH_REQUEST,
        {"request_id": request_id},
        queueing_lock=f"finish:{request_id}",
    )


async def cancel(res: resources.Resources, request_id: str) -> tuple[str | None, int, str]:
    """Cancel the queued images of a request. Returns the status it had (None if it is
    unknown), how many images were cancelled, and its status now: 'cancelled' at once
    when nothing was running, else 'processing' until the running images finish."""
    rid = uuid.UUID(request_id)
    async with db.translated(), res.pool.acquire() as conn, conn.transaction():
        before, cancelled, final = await db.cancel_request(conn, rid)
        if final is not None:
            await finalize(conn, request_id, models.RequestStatus(final))
    if before is not None and not models.RequestStatus(before).is_final:
        logger.info("request %s cancelled: %s queued images", request_id, cancelled)
    return before, cancelled, final or before or ""


def lasting_link(res: resources.Resources) -> reads.Link:
    """``res.store.lasting_link`` as ``reads.output_rows`` takes it."""

    async def link(key: str) -> str:
        return res.store.lasting_link(key)

    return link


def output_csv_link(res: resources.Resources, request_id: str, key: str) -> str:
    """The output CSV's URL for people: the stored file's, unless links are presigned;
    then the API's download, which signs the image URLs in it as it is read (a signed
    URL in a stored CSV or a stored webhook would expire)."""
    if res.store.presigns:
        return f"{res.settings.base_url}/requests/{request_id}/output.csv"
    return res.store.lasting_link(key)


async def complete(res: resources.Resources, request_id: str) -> str:
    """What follows a final request: write the output CSV beside the images, then queue
    the webhook, once.

    Safe to run again after a crash: the CSV is rewritten under the same key, and a
    request gets at most one webhook event.
    """
    rid = uuid.UUID(request_id)
    info = await reads.get_request_summary(res.pool, rid)
    if info is None or not info.status.is_final or info.completed_at is None:
        return "not finished"
    key = store.csv_key(res.settings.s3_prefix, request_id)
    # Written as its rows are read: the output of a 100,000-product request is about
    # 70 MB of CSV.
    with tempfile.SpooledTemporaryFile(max_size=OUTPUT_CSV_IN_MEMORY) as out:
        # What is kept in the bucket holds links that never expire (see store).
        async with contextlib.aclosing(reads.output_rows(res.pool, rid, lasting_link(res))) as rows:
            async for data in report.stream_csv(rows):
                out.write(data)
        async with res.upload_slots:
            url = await res.store.put(key, out, "text/csv; charset=utf-8")
    webhook_url = info.webhook_url or res.settings.webhook_url
    async with db.translated(), res.pool.acquire() as conn, conn.transaction():
        await db.set_output_csv(conn, rid, key, url)
        if webhook_url is None:
            return "no webhook"
        payload = notify.event_payload(
            request_id=request_id,
            status=str(info.status),
            output_csv_url=output_csv_link(res, request_id, key),
            counts=info.counts,
            status_url=f"{res.settings.base_url}/status/{request_id}",
            completed_at=info.completed_at.isoformat(),
        )
        delivery_id = await db.insert_delivery(conn, rid, notify.new_event_id(), webhook_url, payload)
        if delivery_id is not None:
            await notify.queue_delivery(conn, delivery_id)
    return "webhook queued"
