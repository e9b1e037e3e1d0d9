"""A job's images through the stages: fetch, compress, store, record.

Every image ends ``done`` or ``failed`` with a reason in words. A transient failure
puts the image back in the queue and re-raises, so the job layer retries it later;
on the last attempt it fails the image instead. The statement that records a
request's last image makes the request final and queues what follows (``finish``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from imgsvc import (
    catalog,
    compress,
    db,
    errors,
    fetch,
    logs,
    memory,
    metrics,
    models,
    recorder,
    resources,
    reuse,
    store,
)

logger = logging.getLogger("imgsvc.pipeline")


async def process_images(res: resources.Resources, image_ids: list[int]) -> list[str]:
    """A job's batch of images, claimed together, then side by side (the semaphores bound
    the work). Each image ends on its own; if any failed transiently, TransientError is
    raised once all are done, so the job runs again later, and then skips the images
    already finished."""
    try:
        claimed = {task.image_id: task for task in await db.claim_images(res.pool, image_ids)}
        known = await _known(res, list(claimed.values()))
        job = _Job(_recorder(res, len(claimed)), known, _outputs(res, list(claimed.values())))
        outcomes = await asyncio.gather(
            *(_process_claimed(res, claimed[i], job) for i in image_ids if i in claimed),
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


@dataclasses.dataclass(slots=True)
class _Seen:
    """What an image's stages learnt of its source, for its record: the source's bytes,
    and, written with the image's record, the source's record if it sent them and the
    settings an output was made under now."""

    bytes_in: int | None = None
    sha256: str | None = None
    source: db.Source | None = None
    made_under: str | None = None


async def _known(res: resources.Resources, tasks: list[models.ImageTask]) -> dict[str, reuse.Known] | None:
    """The records of the job's sources, in one round trip; None if the database did not
    answer (each image then asks on its own, and fails or retries on its own)."""
    urls = [_source_url(task) for task in tasks if not task.reprocess]
    if not urls:
        return {}
    try:
        key = compress.settings_key(res.image_limits)
        return await reuse.known_sources(res.pool, urls, key, res.settings.reuse_check_seconds)
    except errors.TransientError:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    """What a job's images share: their records, what their sources were (None if the
    database did not say), and the look-up of stored outputs."""

    records: recorder.Recorder
    known: dict[str, reuse.Known] | None
    outputs: reuse.Outputs


def _outputs(res: resources.Resources, tasks: list[models.ImageTask]) -> reuse.Outputs:
    """The look-up of stored outputs for a job's images (one request's: one ``reprocess``)."""
    return reuse.Outputs(
        res.pool, compress.settings_key(res.image_limits), res.settings.reuse_check_seconds,
        same=not any(task.reprocess for task in tasks),
    )  # fmt: skip


def _source_url(task: models.ImageTask) -> str:
    return task.source_url or catalog.normalize_url(task.url)


def _recorder(res: resources.Resources, expected: int = 1) -> recorder.Recorder:
    return recorder.Recorder(
        res.pool,
        (models.REQUEST_QUEUE, models.FINISH_REQUEST),
        expected=expected,
        linger=res.settings.record_linger_seconds,
    )


async def _process_claimed(res: resources.Resources, task: models.ImageTask, job: _Job) -> str:
    image_id = task.image_id
    records = job.records
    logs.image_id.set(image_id)
    logs.request_id.set(task.request_id)
    final_attempt = task.attempts >= res.settings.max_attempts
    seen = _Seen()
    try:
        output = await _output(res, task, seen, job)
    except errors.PermanentError as exc:
        return await record_failure(res, task, exc.message, seen, records)
    except errors.TransientError as exc:
        if final_attempt:
            return await record_failure(
                res, task, f"{exc.message} (gave up after {task.attempts} attempts)", seen, records
            )
        records.left_out()
        await db.release_image(res.pool, image_id, f"attempt {task.attempts}: {exc.message}")
        metrics.images.labels("retry").inc()
        logger.info("image %s: attempt %s failed, will retry: %s", image_id, task.attempts, exc.message)
        raise
    except Exception as exc:  # a bug must not leave the image unfinished
        logger.exception("image %s: unexpected error", image_id)
        return await record_failure(res, task, f"internal error ({type(exc).__name__})", seen, records)
    duplicates = await record(res, task, seen, output=output, records=records)
    metrics.images.labels("done").inc(1 + duplicates)
    if output.reused is not None:
        metrics.images_reused.labels(str(output.reused)).inc()
    else:
        metrics.image_bytes.labels("out").inc(output.bytes_out)
    if duplicates:
        metrics.images_reused.labels(str(models.ReuseReason.DUPLICATE)).inc(duplicates)
    return models.ImageStatus.DONE


async def _output(res: resources.Resources, task: models.ImageTask, seen: _Seen, job: _Job) -> db.Output:
    """The image's output: reused where a stored result answers (``reuse``), else
    downloaded, compressed and stored under the SHA-256 of its bytes."""
    source_url = _source_url(task)
    settings_key = compress.settings_key(res.image_limits)
    # A source slot and the source's bytes are held from the start of the download to
    # the end of compression: they bound the sources in memory, downloaded ones waiting
    # for the codec included, by count and by size.
    async with res.source_slots, res.source_budget.hold() as source:
        if task.reprocess:
            known = None
        elif job.known is not None:
            known = job.known.get(source_url)
        else:
            known = await reuse.known_source(
                res.pool, source_url, settings_key, res.settings.reuse_check_seconds
            )
        # The origin is asked with validators only when an output would answer its 304;
        # the store is asked whether that output's object is there at the same time,
        # unless it was known to be there a short while ago.
        asked = known.output if known is not None else None
        there = None
        if known is not None and asked is not None and not known.trusted:
            there = asyncio.ensure_future(reuse.present(res.pool, res.store, asked.key))
        try:
            with metrics.stage_duration.labels("download").time():
                fetched = await fetch.fetch(
                    res.http, task.url, res.download_limits, expect=source.expect,
                    validators=known.validators if known is not None and asked is not None else None,
                )  # fmt: skip
            stored = fetched.data is None and (there is None or await there)
        finally:
            _drop(there)
        if fetched.data is None and known is not None and asked is not None:  # 304 Not Modified
            seen.bytes_in, seen.sha256 = known.bytes, known.sha256
            if stored:
                saved = known.bytes + asked.bytes_out
                return dataclasses.replace(asked, reused=models.ReuseReason.NOT_MODIFIED, bytes_saved=saved)
            await reuse.forget_output(res.pool, asked.key)
            with metrics.stage_duration.labels("download").time():
                fetched = await fetch.fetch(res.http, task.url, res.download_limits, expect=source.expect)
        data, seen.sha256 = fetched.data, fetched.sha256
        assert data is not None and seen.sha256 is not None
        seen.bytes_in = len(data)
        source(seen.bytes_in)
        metrics.image_bytes.labels("in").inc(seen.bytes_in)
        seen.source = db.Source(source_url, fetched.validators)
        # Bytes that are one of our outputs are taken as they are, reprocess or not: no
        # image is degraded twice.
        found = await reuse.stored_output(job.outputs, res.pool, res.store, seen.sha256)
        if found is not None:
            if found.missing:
                await _put(res, found.output.key, data, models.CONTENT_TYPES[found.output.format_out or ""])
            reason = models.ReuseReason.OWN_OUTPUT if found.own else models.ReuseReason.SAME_CONTENT
            return reuse.reused(found, reason, found.output.bytes_out)
        with metrics.stage_duration.labels("compress").time():
            async with res.image_slots:
                loop = asyncio.get_running_loop()
                result, output_sha256 = await loop.run_in_executor(
                    res.images, _compressed, data, res.image_limits, res.codec_budget
                )
        del data
    key = store.content_key(res.settings.s3_prefix, output_sha256, result.extension)
    url = await _put(res, key, result.data, result.content_type)
    seen.made_under = settings_key
    return db.Output.made(result, key, url, output_sha256)


def _drop(task: asyncio.Future[bool] | None) -> None:
    """A look-up no longer needed: cancelled if it runs, its outcome taken if it ended."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()  # taken, so that a failure nobody needed is not reported


def _compressed(
    data: bytes, limits: compress.Limits, budget: memory.MemoryBudget
) -> tuple[models.Compressed, str]:
    """The compressed image and its SHA-256, on a codec thread."""
    result = compress.compress(data, limits, budget)
    return result, catalog.sha256(result.data)


async def _put(res: resources.Resources, key: str, data: bytes, content_type: str) -> str:
    """Store an output under its content-addressed key, cacheable forever."""
    with metrics.stage_duration.labels("upload").time():
        async with res.upload_slots:
            return await res.store.put(key, data, content_type, store.IMMUTABLE)


async def record_failure(
    res: resources.Resources,
    task: models.ImageTask,
    reason: str,
    seen: _Seen,
    records: recorder.Recorder | None = None,
) -> str:
    """Fail an image (and its duplicates) with a reason a person can read."""
    logger.info("image %s failed: %s", task.image_id, reason)
    duplicates = await record(res, task, seen, error=reason, records=records)
    metrics.images.labels("failed").inc(1 + duplicates)
    return models.ImageStatus.FAILED


async def record(
    res: resources.Resources,
    task: models.ImageTask,
    seen: _Seen | None = None,
    *,
    output: db.Output | None = None,
    error: str | None = None,
    records: recorder.Recorder | None = None,
) -> int:
    """Store an image's final state, and its duplicates', with the job's other images
    that end at the same time (``records``; alone without it); if they were the
    request's last, the statement that records them finishes the request (it queues the
    request's finishing job). The records of its source and of an output made now go in
    the same statement. Returns how many duplicates ended with it."""
    seen = seen or _Seen()
    ending = db.Ending(
        task, output=output, error=error, bytes_in=seen.bytes_in, source_sha256=seen.sha256,
        source=seen.source, made_under=seen.made_under if output is not None else None,
    )  # fmt: skip
    recorded = await (records or _recorder(res)).record(ending)
    return recorded.duplicates
