"""A job's images through the stages: fetch, compress, store, record.

Every image ends ``done`` or ``failed`` with a reason in words. A transient failure
puts the image back in the queue and re-raises, so the job layer retries it later;
on the last attempt it fails the image instead. The statement that records a
request's last image makes the request final and queues what follows (``finish``).
"""

from __future__ import annotations

import asyncio
import logging

from imgsvc import compress, db, errors, fetch, finish, logs, metrics, models, resources, store

logger = logging.getLogger("imgsvc.pipeline")


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
            queued = await db.requeue_image(
                res.pool, image_id, INTERRUPTED, models.IMAGE_QUEUE, models.PROCESS_IMAGES
            )
        except errors.TransientError as exc:
            logger.warning(
                "image %s: not queued again (%s); the maintenance task will", image_id, exc.message
            )
            continue
        if queued:
            logger.info("image %s: interrupted, queued again", image_id)


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
                data = await fetch.download(res.http, task.url, res.download_limits, expect=source.expect)
            bytes_in = len(data)
            source(bytes_in)
            metrics.image_bytes.labels("in").inc(bytes_in)
            with metrics.stage_duration.labels("compress").time():
                async with res.image_slots:
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(
                        res.images, compress.compress, data, res.image_limits, res.codec_budget
                    )
            del data
        key = store.object_key(
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
    status = await db.record_image(
        res.pool,
        task,
        result=result,
        stored=stored,
        error=error,
        bytes_in=bytes_in,
        finish_job=(models.REQUEST_QUEUE, models.FINISH_REQUEST),
    )
    if status is not None:
        finish.announce(task.request_id, models.RequestStatus(status))
