"""One image through the stages (download, compress, store, record); the single
place where a request is finished; and what follows: the output CSV and the webhook.

Every image ends ``done`` or ``failed`` with a reason in words. A transient failure
puts the image back in the queue and re-raises, so the job layer retries it later;
on the last attempt it fails the image instead. Webhook deliveries follow the same
rule with their own attempt limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import tempfile
import uuid

import yarl

from imgsvc import db, download, errors, logs, metrics, models, notify, report, resources, storage
from imgsvc.compress import compress

logger = logging.getLogger("imgsvc.pipeline")

# Queues and task names, shared by the job definitions and by the SQL that defers jobs.
IMAGE_QUEUE = "images"
PROCESS_IMAGES = "process_images"
REQUEST_QUEUE = "requests"
FINISH_REQUEST = "finish_request"
DELIVER_WEBHOOK = "deliver_webhook"


async def process_images(res: resources.Resources, image_ids: list[int]) -> list[str]:
    """A job's batch of images, claimed together, then side by side (the semaphores bound
    the work). Each image ends on its own; if any failed transiently, TransientError is
    raised once all are done, so the job runs again later, and then skips the images
    already finished."""
    try:
        claimed = {task.image_id: task for task in await db.claim_images(res.pool, image_ids)}
        outcomes = await asyncio.gather(
            *(_process_claimed(res, claimed[image_id]) for image_id in image_ids if image_id in claimed),
            return_exceptions=True,
        )
    except asyncio.CancelledError:
        # The worker is stopping and its graceful time is up (or the job was aborted):
        # procrastinate will not run this job again, so every image of it that is not
        # finished, whether claimed, waiting, running or released after a transient
        # failure, gets a job of its own. The images' own tasks have ended by now.
        await asyncio.shield(_requeue(res, image_ids))
        raise
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, errors.TransientError):
            raise outcome
    transient = [outcome for outcome in outcomes if isinstance(outcome, errors.TransientError)]
    if transient:
        raise errors.TransientError(
            f"{len(transient)} of {len(image_ids)} images will be retried: {transient[0].message}"
        )
    finished = iter(outcomes)
    return [str(next(finished)) if image_id in claimed else ALREADY_FINISHED for image_id in image_ids]


async def process_image(res: resources.Resources, image_id: int) -> str:
    """Claim one image and take it through the stages; return its final status (or that
    it was already finished), or raise TransientError."""
    return (await process_images(res, [image_id]))[0]


async def _requeue(res: resources.Resources, image_ids: list[int]) -> None:
    """A job of its own for each unfinished image of ``image_ids``. One the database does
    not take now stays for the maintenance task, rather than turning the stop into an
    error that procrastinate would retry the whole job for."""
    for image_id in image_ids:
        try:
            queued = await db.requeue_image(res.pool, image_id, INTERRUPTED, IMAGE_QUEUE, PROCESS_IMAGES)
        except errors.TransientError as exc:
            logger.warning(
                "image %s: not queued again (%s); the maintenance task will", image_id, exc.message
            )
            continue
        if queued:
            logger.info("image %s: interrupted, queued again", image_id)


OUTPUT_CSV_IN_MEMORY = 8 * 1024 * 1024

ALREADY_FINISHED = "already finished"
INTERRUPTED = "interrupted: the worker stopped before this image was finished; queued again"


async def _process_claimed(res: resources.Resources, task: models.ImageTask) -> str:
    image_id = task.image_id
    logs.image_id.set(image_id)
    logs.request_id.set(task.request_id)
    final_attempt = task.attempts >= res.settings.max_attempts
    bytes_in: int | None = None
    try:
        # A source slot and the source's bytes are held from the start of the download to
        # the end of compression: they bound the sources in memory, downloaded ones waiting
        # for the codec included, by count and by size.
        async with res.source_slots, res.source_budget.hold() as source:
            with metrics.stage_duration.labels("download").time():
                data = await download.fetch(res.http, task.url, res.download_limits, expect=source.expect)
            bytes_in = len(data)
            source(bytes_in)
            metrics.image_bytes.labels("in").inc(bytes_in)
            with metrics.stage_duration.labels("compress").time():
                async with res.image_slots:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(res.images, compress, data, res.image_limits)
            del data
        key = storage.object_key(
            res.settings.s3_prefix, task.request_id, task.serial_number, task.position, result.extension
        )
        with metrics.stage_duration.labels("upload").time():
            async with res.upload_slots:
                url = await res.store.put(key, result.data, result.content_type)
    except errors.PermanentError as exc:
        return await record_failure(res, task, exc.message, bytes_in)
    except errors.TransientError as exc:
        if final_attempt:
            return await record_failure(
                res, task, f"{exc.message} (gave up after {task.attempts} attempts)", bytes_in
            )
        await db.release_image(res.pool, image_id, f"attempt {task.attempts}: {exc.message}")
        metrics.images.labels("retry").inc()
        logger.info("image %s: attempt %s failed, will retry: %s", image_id, task.attempts, exc.message)
        raise
    except Exception as exc:  # a bug must not leave the image unfinished
        logger.exception("image %s: unexpected error", image_id)
        return await record_failure(res, task, f"internal error ({type(exc).__name__})", bytes_in)
    await record(res, task, result=result, stored=db.Stored(key=key, url=url), bytes_in=bytes_in)
    metrics.images.labels("done").inc()
    metrics.image_bytes.labels("out").inc(len(result.data))
    return models.ImageStatus.DONE


# The advisory lock that one sweep for orphans holds at a time.
ORPHANS_LOCK = 0x696D_6773_7663_0001


async def requeue_orphans(res: resources.Resources, limit: int = 1000) -> int:
    """Queue a job for every unfinished image, request or webhook that has none.

    The safety net behind "nothing lost": a job can end without finishing its row
    (aborted at shutdown while the database was down, deleted by hand, a crash
    between two commits). Images and requests are made so that running them twice
    shows nothing twice. One sweep at a time, on any number of machines: two that
    overlapped (one slower than the 15 s between runs) would find the same orphans
    and queue each twice. A sweep that finds another at work does nothing. The lock is
    a transaction's, held open on a connection of its own for the sweep: it ends with
    that transaction however the sweep ends (the pool rolls back a transaction left
    open), or with the connection if the worker dies.
    """
    async with db.translated(), res.pool.acquire() as holder, holder.transaction():
        if not await holder.fetchval("SELECT pg_try_advisory_xact_lock($1)", ORPHANS_LOCK):
            logger.info("another worker is sweeping for orphans; this one leaves it to it")
            return 0
        return await _requeue_orphans(res, limit)


async def _requeue_orphans(res: resources.Resources, limit: int) -> int:
    count = 0
    for image_id in await db.orphans(res.pool, "orphaned_images", PROCESS_IMAGES, limit):
        count += await db.requeue_image(
            res.pool, image_id, "queued again: its job had ended", IMAGE_QUEUE, PROCESS_IMAGES
        )
    for task, query, key in (
        (FINISH_REQUEST, "orphaned_requests", "request_id"),
        (DELIVER_WEBHOOK, "orphaned_deliveries", "delivery_id"),
    ):
        for row_id in await db.orphans(res.pool, query, task, limit):
            async with res.pool.acquire() as conn:
                if task == DELIVER_WEBHOOK:
                    await queue_delivery(conn, row_id)
                else:
                    await db.defer_job(conn, REQUEST_QUEUE, task, {key: row_id})
            count += 1
    # A request is finished by the statement that records its last image, going by
    # the counters on its row; if those were ever wrong, a count finishes it here.
    for rid in await db.unfinished_requests(res.pool, limit):
        async with res.pool.acquire() as conn, conn.transaction():
            status = await db.finish_unfinished(conn, rid)
            if status is not None:
                await finish_request(conn, str(rid), models.RequestStatus(status))
                count += 1
    if count:
        logger.warning("queued %s unfinished items again that had no job", count)
    return count


async def record_failure(
    res: resources.Resources, task: models.ImageTask, reason: str, bytes_in: int | None
) -> str:
    """Fail an image with a reason a person can read."""
    logger.info("image %s failed: %s", task.image_id, reason)
    metrics.images.labels("failed").inc()
    await record(res, task, error=reason, bytes_in=bytes_in)
    return models.ImageStatus.FAILED


async def record(
    res: resources.Resources,
    task: models.ImageTask,
    *,
    result: models.Compressed | None = None,
    stored: db.Stored | None = None,
    error: str | None = None,
    bytes_in: int | None = None,
) -> None:
    """Store an image's final state and, if it was the request's last, finish the request
    (the statement that records the image queues the request's finishing job)."""
    status = await db.finish_image(
        res.pool,
        task,
        result=result,
        stored=stored,
        error=error,
        bytes_in=bytes_in,
        finish_job=(REQUEST_QUEUE, FINISH_REQUEST),
    )
    if status is not None:
        _finished(task.request_id, models.RequestStatus(status))


def _finished(request_id: str, status: models.RequestStatus) -> None:
    logger.info("request %s finished: %s", request_id, status)
    metrics.requests_finished.labels(str(status)).inc()


async def finish_request(conn: db.Connection, request_id: str, status: models.RequestStatus) -> None:
    """A cancel, or the maintenance task's count, found nothing left to run: the request
    is final in the caller's transaction, which queues what follows as a job, so it
    cannot be lost or queued twice. (When a request's last image finishes, the statement
    that records it does the same.)"""
    _finished(request_id, status)
    await db.defer_job(
        conn, REQUEST_QUEUE, FINISH_REQUEST, {"request_id": request_id}, queueing_lock=f"finish:{request_id}"
    )


async def cancel_request(res: resources.Resources, request_id: str) -> tuple[str | None, int, str]:
    """Cancel the queued images of a request. Returns the status it had (None if it is
    unknown), how many images were cancelled, and its status now: 'cancelled' at once
    when nothing was running, else 'processing' until the running images finish."""
    rid = uuid.UUID(request_id)
    async with db.translated(), res.pool.acquire() as conn, conn.transaction():
        before, cancelled, final = await db.cancel_request(conn, rid)
        if final is not None:
            await finish_request(conn, request_id, models.RequestStatus(final))
    if before is not None and not models.RequestStatus(before).is_final:
        logger.info("request %s cancelled: %s queued images", request_id, cancelled)
    return before, cancelled, final or before or ""


async def complete_request(res: resources.Resources, request_id: str) -> str:
    """Write the output CSV beside the images, then queue the webhook, once.

    Safe to run again after a crash: the CSV is rewritten under the same key, and a
    request gets at most one webhook event.
    """
    rid = uuid.UUID(request_id)
    info = await db.get_request_for_finish(res.pool, rid)
    if info is None or not models.RequestStatus(info["status"]).is_final:
        return "not finished"
    key = storage.csv_key(res.settings.s3_prefix, request_id)
    # Written as its rows are read, into memory up to a few MiB and to a temporary file
    # beyond: the output of a 100,000-product request is about 70 MB of CSV.
    with tempfile.SpooledTemporaryFile(max_size=OUTPUT_CSV_IN_MEMORY) as out:
        async with contextlib.aclosing(db.output_rows(res.pool, rid)) as rows:
            async for data in report.stream_csv(rows):
                out.write(data)
        async with res.upload_slots:
            url = await res.store.put(key, out, "text/csv; charset=utf-8")
    webhook_url = info["webhook_url"] or res.settings.webhook_url
    async with db.translated(), res.pool.acquire() as conn, conn.transaction():
        await db.set_output_csv(conn, rid, key, url)
        if webhook_url is None:
            return "no webhook"
        payload = notify.event_payload(
            request_id=request_id,
            status=info["status"],
            output_csv_url=url,
            counts={name: info[name] for name in models.COUNTS},
            status_url=f"{res.settings.base_url}/status/{request_id}",
            completed_at=info["completed_at"].isoformat(),
        )
        delivery_id = await db.insert_delivery(conn, rid, notify.new_event_id(), webhook_url, payload)
        if delivery_id is not None:
            await queue_delivery(conn, delivery_id)
    return "webhook queued"


async def queue_delivery(conn: db.Connection, delivery_id: int) -> None:
    """Queue a job for a webhook delivery. Its lock runs the jobs of one delivery one at
    a time, should there ever be two (a requeue racing the first): the second then finds
    the delivery settled, where running beside the first it would have posted again."""
    await db.defer_job(
        conn, REQUEST_QUEUE, DELIVER_WEBHOOK, {"delivery_id": delivery_id}, lock=f"delivery:{delivery_id}"
    )


def _ready_to_post(res: resources.Resources, url: str) -> tuple[yarl.URL, bytes] | str:
    """Where to post a webhook and the key to sign it with, or why it cannot be sent.
    Literal IP hosts are checked here, as for sources; names, by the resolver."""
    secret = res.settings.webhook_secret
    if not secret:
        return "no WEBHOOK_SECRET is configured to sign the event"
    try:
        return download.check_address(url, res.download_limits), notify.secret_key(secret)
    except errors.PermanentError as exc:
        return str(exc)


async def deliver_webhook(res: resources.Resources, delivery_id: int) -> str:
    """One attempt at a webhook; raise TransientError when another should follow."""
    claimed = await db.claim_delivery(res.pool, delivery_id)
    if claimed is None:
        return "already settled"
    config = res.settings
    attempt_no: int = claimed["attempts"]
    ready = _ready_to_post(res, claimed["url"])
    if isinstance(ready, str):
        attempt = notify.Attempt(
            started_at=datetime.datetime.now(datetime.UTC).timestamp(),
            duration_ms=0,
            http_status=None,
            verdict="give_up",
            error=ready,
        )
    else:
        target, key = ready
        attempt = await notify.post(
            res.http,
            target,
            key=key,
            event_id=claimed["event_id"],
            body=claimed["payload"].encode(),
            time_limit=config.webhook_timeout,
        )
    if attempt.verdict == "delivered":
        state = "delivered"
    elif attempt.verdict == "retry" and attempt_no < config.webhook_max_attempts:
        state = "retrying"
    else:
        state = "failed"
    error = attempt.error
    if state == "failed" and attempt.verdict == "retry":
        error = f"{attempt.error} (gave up after {attempt_no} attempts)"
    await db.record_attempt(
        res.pool,
        delivery_id,
        attempt_no,
        datetime.datetime.fromtimestamp(attempt.started_at, datetime.UTC),
        attempt.duration_ms,
        attempt.http_status,
        error,
        state,
    )
    logger.info("webhook %s attempt %s: %s", claimed["event_id"], attempt_no, error or state)
    metrics.webhooks.labels(state).inc()
    if state == "retrying":
        raise errors.TransientError(error)
    return state
