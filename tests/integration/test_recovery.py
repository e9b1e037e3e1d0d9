"""The safety net: unfinished work whose job is gone gets a job again, and completes."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import jobs

from imgsvc import db, finish, maintenance, models, pipeline, queue, resources
from tests.conftest import request_row_locked, store_request, wait_for_lock_waits
from tests.servers import ImageServer, WebhookReceiver


async def test_images_requests_and_webhooks_without_jobs_are_queued_again(
    res: resources.Resources, database_url: str, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    url = image_server.url("/img/png_palette_trns.png")
    products = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url, url + "?copy"))]
    rid = await store_request(res.pool, products, webhook_url=receiver.url("/ok"), file_name=None)
    # Lose every job, as an abort during a database outage or a manual delete would.
    await res.pool.execute("DELETE FROM procrastinate_jobs")
    assert await maintenance.requeue_orphans(res) == 2
    assert await maintenance.requeue_orphans(res) == 0  # each has a job now
    app = queue.create_app(res.settings, database_url)
    async with app.open_async():
        await app.run_worker_async(
            additional_context=queue.context(res),
            queues=[models.IMAGE_QUEUE],
            wait=False,
            install_signal_handlers=False,
        )
    assert await res.pool.fetchval("SELECT status FROM requests") == "completed"
    # The request is final; lose its finishing job: it is queued again.
    await res.pool.execute("DELETE FROM procrastinate_jobs")
    assert await maintenance.requeue_orphans(res) == 1
    assert await res.pool.fetchval("SELECT task_name FROM procrastinate_jobs") == models.FINISH_REQUEST
    # Finish it here, then lose the webhook's job: it is queued again, and delivered.
    await res.pool.execute("DELETE FROM procrastinate_jobs")
    assert await finish.complete(res, rid) == "webhook queued"
    await res.pool.execute("DELETE FROM procrastinate_jobs")
    assert await res.pool.fetchval("SELECT state FROM webhook_deliveries") == "pending"
    assert await maintenance.requeue_orphans(res) == 1
    async with app.open_async():
        for _ in range(50):
            await app.run_worker_async(
                additional_context=queue.context(res), wait=False, install_signal_handlers=False
            )
            if await res.pool.fetchval("SELECT state FROM webhook_deliveries") == "delivered":
                break
            await asyncio.sleep(0.05)
    assert await res.pool.fetchval("SELECT output_csv_url FROM requests WHERE id = $1", uuid.UUID(rid))
    assert await res.pool.fetchval("SELECT state FROM webhook_deliveries") == "delivered"


async def test_a_sweep_for_orphans_while_another_runs_queues_nothing_twice(res: resources.Resources) -> None:
    url = "http://img.test/a.jpg"
    products = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url, url + "?copy"))]
    await store_request(res.pool, products)
    await res.pool.execute("DELETE FROM procrastinate_jobs")
    async with res.pool.acquire() as other:  # another machine's sweep, still at work
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", maintenance.ORPHANS_LOCK)
        assert await maintenance.requeue_orphans(res) == 0
        assert await res.pool.fetchval("SELECT count(*) FROM procrastinate_jobs") == 0
        await other.execute("SELECT pg_advisory_unlock($1)", maintenance.ORPHANS_LOCK)
    assert await maintenance.requeue_orphans(res) == 2
    assert await res.pool.fetchval("SELECT count(*) FROM procrastinate_jobs") == 2
    assert await maintenance.requeue_orphans(res) == 0  # each has its job now
    # Ended, the sweeps let go of the lock. Two connections at once, so that one is not
    # the sweeps' own (a session may take again a lock it still holds): both can take it.
    first, second = await res.pool.acquire(), await res.pool.acquire()
    try:
        for conn in (first, second):
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", maintenance.ORPHANS_LOCK)
            await conn.execute("SELECT pg_advisory_unlock($1)", maintenance.ORPHANS_LOCK)
    finally:
        await res.pool.release(first)
        await res.pool.release(second)


async def test_a_request_whose_counters_went_wrong_is_finished_by_a_count(res: resources.Resources) -> None:
    url = "http://img.test/a.jpg"
    products = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url, url + "?copy"))]
    rid = await store_request(res.pool, products)
    ids = [row["id"] for row in await res.pool.fetch("SELECT id FROM images ORDER BY id")]
    first, second = await db.claim_images(res.pool, ids)
    await pipeline.record(res, first, error="gone")
    # A hand-made edit leaves the counters short: the last image cannot tell it is last.
    await res.pool.execute("UPDATE requests SET failed_count = 0")
    await pipeline.record(res, second, error="gone too")
    assert await res.pool.fetchval("SELECT status FROM requests") == "processing"
    await res.pool.execute("DELETE FROM procrastinate_jobs")

    assert await maintenance.requeue_orphans(res) == 1
    view = await res.pool.fetchrow("SELECT status, failed, queued FROM request_progress")
    assert view is not None and tuple(view) == ("failed", 2, 0)
    assert await res.pool.fetchval("SELECT args->>'request_id' FROM procrastinate_jobs") == rid
    assert await maintenance.requeue_orphans(res) == 0


async def _one_job(res: resources.Resources, *urls: str) -> tuple[str, list[int]]:
    """A request of one product with ``urls``, its jobs gone: the job is the test's."""
    products = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=urls)]
    rid = await store_request(res.pool, products)
    ids = [row["id"] for row in await res.pool.fetch("SELECT id FROM images ORDER BY position")]
    await res.pool.execute("DELETE FROM procrastinate_jobs")
    return rid, ids


async def _stop(job: asyncio.Future[list[str]]) -> None:
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job


async def _assert_each_queued_again(res: resources.Resources, ids: list[int]) -> None:
    rows = await res.pool.fetch("SELECT status, error FROM images ORDER BY position")
    assert [tuple(row) for row in rows] == [("queued", pipeline.INTERRUPTED)] * len(ids)
    rows = await res.pool.fetch("SELECT status, args->'image_ids' AS ids FROM procrastinate_jobs ORDER BY id")
    assert [(row["status"], json.loads(row["ids"])) for row in rows] == [("todo", [i]) for i in ids]


async def test_images_of_a_job_stopped_while_claiming_them_are_queued_again(res: resources.Resources) -> None:
    # The worker's graceful time runs out while the job waits to claim its images:
    # procrastinate will not run that job again, so each image gets a job of its own.
    rid, ids = await _one_job(res, "http://img.test/a.jpg", "http://img.test/b.jpg")
    async with request_row_locked(res.pool, rid):
        job = asyncio.ensure_future(pipeline.process_images(res, ids))
        await wait_for_lock_waits(res.pool, 1, job)
        await _stop(job)
    await _assert_each_queued_again(res, ids)


async def test_a_stopped_job_queues_again_its_released_images_too(
    res: resources.Resources, image_server: ImageServer
) -> None:
    # One image failed transiently (back to 'queued', to be retried with the job) while
    # another still runs when the worker stops: procrastinate will not retry the job, so
    # both need a job of their own.
    _, ids = await _one_job(
        res, image_server.url("/status/503"), image_server.url("/slow/5000/kodak_kodim23.png")
    )
    job = asyncio.ensure_future(pipeline.process_images(res, ids))
    statuses = "SELECT array_agg(status ORDER BY position) FROM images"
    deadline = asyncio.get_running_loop().time() + 10
    while await res.pool.fetchval(statuses) != ["queued", "processing"]:
        assert not job.done() and asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    await _stop(job)
    await _assert_each_queued_again(res, ids)


async def test_the_end_of_a_job_another_worker_took_over_is_one_warning(
    res: resources.Resources, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker cut off from the database long enough has its jobs given to another, which
    # ends them. When the link returns and its own runs end too, there is no job left to
    # end: a warning that says so, not procrastinate's "Database error".
    products = [
        models.Product(line=2, serial="1", serial_number=1, name="P", urls=("http://img.test/a.jpg",))
    ]
    await store_request(res.pool, products)
    app = queue.create_app(res.settings, database_url)
    async with app.open_async():
        worker_id = await app.job_manager.register_worker()
        job = await app.job_manager.fetch_job(queues=None, worker_id=worker_id)
        assert job is not None and job.id is not None
        await res.pool.execute("DELETE FROM procrastinate_jobs WHERE id = $1", job.id)
        with caplog.at_level(logging.WARNING, logger="imgsvc.queue"):
            await app.job_manager.finish_job(job, jobs.Status.SUCCEEDED, delete_job=True)
            await app.job_manager.retry_job(job)
        said = [record.getMessage() for record in caplog.records if record.name == "imgsvc.queue"]
        taken = f"job {job.id} (process_images) had been taken over, or ended, by another worker"
        assert said == [f"{taken}; its end here is not recorded"] * 2
        # Any other failure to end a job is still an error.
        with pytest.raises(procrastinate_exceptions.ConnectorException):
            await app.job_manager.finish_job(job, jobs.Status.TODO, delete_job=False)
