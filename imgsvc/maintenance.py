"""The periodic sweeps behind "nothing lost": jobs of workers that stopped sending
heartbeats go back to the queue, and unfinished work that has no job gets one; and
the one that keeps the queue's table bounded: jobs that ended are deleted.

The first run every 15 s (the ``maintenance`` task), the second every 10 minutes
(``prune_jobs``), each on one worker at a time. A run that did nothing logs at DEBUG
only (``logs.HOUSEKEEPING_TASKS``); one that requeued work says so at WARNING.
"""

from __future__ import annotations

import contextlib
import datetime
import logging

from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import manager

from imgsvc import db, finish, models, notify, resources

logger = logging.getLogger("imgsvc.maintenance")


async def sweep(jobs: manager.JobManager, res: resources.Resources) -> int:
    """One run: retry the stalled jobs, then requeue the orphans; how many were queued.
    Not under a procrastinate lock: a run stalled on a killed worker would hold it, and
    only this puts stalled jobs back; ``requeue_orphans`` keeps overlapping runs apart
    with a lock that dies with its connection."""
    return await retry_stalled(jobs, res.settings.stalled_seconds) + await requeue_orphans(res)


async def retry_stalled(jobs: manager.JobManager, stalled_seconds: float) -> int:
    """Put back in the queue the jobs of workers silent for ``stalled_seconds``."""
    count = 0
    for job in await jobs.get_stalled_jobs(seconds_since_heartbeat=stalled_seconds):
        with contextlib.suppress(procrastinate_exceptions.ProcrastinateException):
            assert job.id is not None
            # By id: JobManager.retry_job is the worker's, which lets a job gone meanwhile be.
            await jobs.retry_job_by_id_async(job.id, retry_at=datetime.datetime.now(datetime.UTC))
            count += 1
            logger.warning("retried job %s (%s) of a stalled worker", job.id, job.task_name)
    return count


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
            logger.debug("another worker is sweeping for orphans; this one leaves it to it")
            return 0
        return await _requeue_orphans(res, limit)


async def _requeue_orphans(res: resources.Resources, limit: int) -> int:
    count = 0
    for image_id in await db.orphans(res.pool, "orphaned_images", models.PROCESS_IMAGES, limit):
        count += await db.requeue_image(
            res.pool, image_id, "queued again: its job had ended", models.IMAGE_QUEUE, models.PROCESS_IMAGES
        )
    for task, query, key in (
        (models.FINISH_REQUEST, "orphaned_requests", "request_id"),
        (models.DELIVER_WEBHOOK, "orphaned_deliveries", "delivery_id"),
    ):
        for row_id in await db.orphans(res.pool, query, task, limit):
            async with res.pool.acquire() as conn:
                if task == models.DELIVER_WEBHOOK:
                    await notify.queue_delivery(conn, row_id)
                else:
                    await db.defer_job(conn, models.REQUEST_QUEUE, task, {key: row_id})
            count += 1
    # A request is finished by the statement that records its last image, going by
    # the counters on its row; if those were ever wrong, a count finishes it here.
    for rid in await db.unfinished_requests(res.pool, limit):
        async with res.pool.acquire() as conn, conn.transaction():
            status = await db.settle_by_count(conn, rid)
            if status is not None:
                await finish.finalize(conn, str(rid), models.RequestStatus(status))
                count += 1
    if count:
        logger.warning("queued %s unfinished items again that had no job", count)
    return count


async def prune_jobs(jobs: manager.JobManager, retention_hours: int) -> None:
    """Delete the jobs that ended, whatever their end, ``retention_hours`` or more ago.

    Workers delete a job that succeeds as it ends; this takes the others: failed (a
    task that raised what is not retried, or unknown to the worker that took it),
    aborted (interrupted at a stop: their images have jobs of their own again) and
    cancelled. Their events go with them. Nothing unfinished depends on such a job:
    the sweeps for orphans look only at jobs still to do or doing."""
    await jobs.delete_old_jobs(
        nb_hours=retention_hours, include_failed=True, include_cancelled=True, include_aborted=True
    )
    logger.debug("deleted the jobs that ended %s hours ago or more", retention_hours)
