"""One image through the stages (download, compress, store, record), and the single
place where a request is finished.

Every image ends ``done`` or ``failed`` with a reason in words. A transient failure
puts the image back in the queue and re-raises, so the job layer retries it later;
on the last attempt it fails the image instead.
"""

from __future__ import annotations

import asyncio
import logging

from imgsvc import db, download, errors, models, resources, storage
from imgsvc.compress import compress

logger = logging.getLogger("imgsvc.pipeline")


async def process_image(res: resources.Resources, image_id: int) -> str:
    """Take one image through the stages; return its final status, or raise TransientError."""
    task = await db.claim_image(res.pool, image_id)
    if task is None:
        return "already finished"
    final_attempt = task.attempts >= res.settings.max_attempts
    bytes_in: int | None = None
    try:
        async with res.download_slots:
            data = await download.fetch(res.http, task.url, res.download_limits)
        bytes_in = len(data)
        async with res.image_slots:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(res.images, compress, data, res.image_limits)
        del data
        key = storage.object_key(
            res.settings.s3_prefix, task.request_id, task.serial_number, task.position, result.extension
        )
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
        logger.info("image %s: attempt %s failed, will retry: %s", image_id, task.attempts, exc.message)
        raise
    except Exception as exc:  # a bug must not leave the image unfinished
        logger.exception("image %s: unexpected error", image_id)
        return await record_failure(res, task, f"internal error ({type(exc).__name__})", bytes_in)
    await record(res, task, result=result, stored=db.Stored(key=key, url=url), bytes_in=bytes_in)
    return models.ImageStatus.DONE


async def record_failure(
    res: resources.Resources, task: models.ImageTask, reason: str, bytes_in: int | None
) -> str:
    """Fail an image with a reason a person can read."""
    logger.info("image %s failed: %s", task.image_id, reason)
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
    """Store an image's final state and, if it was the request's last, finish the request."""
    async with db.translated(), res.pool.acquire() as conn, conn.transaction():
        status = await db.finish_image(conn, task.image_id, task.request_id, result, stored, error, bytes_in)
        if status is not None:
            await finish_request(conn, task.request_id, models.RequestStatus(status))


async def finish_request(conn: db.Connection, request_id: str, status: models.RequestStatus) -> None:
    """The moment a request reaches its final state: called exactly once per request,
    inside the transaction that records its last image."""
    logger.info("request %s finished: %s", request_id, status)
