"""INFO is for people: a maintenance run that found nothing to do says so only at
DEBUG; one that requeued work says so at WARNING. Real runs, through procrastinate's
periodic deferrer and worker, on the real PostgreSQL."""

from __future__ import annotations

import logging
import time

import pytest
from procrastinate import periodic

from imgsvc import logs, models, queue, resources
from tests.conftest import store_request

IMAGE = "http://127.0.0.1:9/a.jpg"


async def run_maintenance_once(res: resources.Resources, database_url: str) -> None:
    """Defer the periodic maintenance job as the worker's deferrer does, then run the
    maintenance queue until it is empty."""
    app = queue.create_app(res.settings, database_url)
    async with app.open_async():
        deferrer = periodic.PeriodicDeferrer(registry=app.periodic_registry)
        await deferrer.defer_jobs(deferrer.get_previous_tasks(at=time.time()))
        defers = "SELECT count(*) FROM procrastinate_periodic_defers WHERE task_name = 'maintenance'"
        assert await res.pool.fetchval(defers) == 1
        options = queue.worker_options(res.settings)  # as serve and worker run it
        options["additional_context"] = queue.context(res)
        options["queues"] = [models.MAINTENANCE_QUEUE]
        options["wait"] = False
        options["install_signal_handlers"] = False
        await app.run_worker_async(**options)
    # The run succeeded, and successful jobs are deleted.
    left = "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'maintenance'"
    assert await res.pool.fetchval(left) == 0


def about_maintenance(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "imgsvc.maintenance"
        or (isinstance(job := getattr(r, "job", None), dict) and job.get("task_name") == "maintenance")
    ]


async def test_a_maintenance_run_that_did_nothing_logs_nothing_at_info(
    res: resources.Resources, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    logs.quiet_libraries()
    caplog.set_level(logging.INFO)
    await run_maintenance_once(res, database_url)
    assert about_maintenance(caplog) == []
    assert any(r.name.startswith("procrastinate.worker") for r in caplog.records)  # the worker logged


async def test_at_debug_every_run_is_there(
    res: resources.Resources, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    logs.quiet_libraries()
    caplog.set_level(logging.DEBUG)
    await run_maintenance_once(res, database_url)
    seen = about_maintenance(caplog)
    messages = [r.getMessage() for r in seen]
    assert {r.levelno for r in seen} == {logging.DEBUG}, messages
    assert any("deferred" in m for m in messages), messages
    assert any(m.startswith("Starting job") for m in messages), messages
    assert any("ended with status: Success" in m for m in messages), messages


async def test_a_maintenance_run_that_requeued_work_says_so_at_warning(
    res: resources.Resources, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await store_request(res.pool, [models.Product(2, "1", 1, "one", (IMAGE,))])
    await res.pool.execute("DELETE FROM procrastinate_jobs")  # the image's job is lost
    logs.quiet_libraries()
    caplog.set_level(logging.INFO)
    await run_maintenance_once(res, database_url)
    seen = [(r.levelno, r.getMessage()) for r in about_maintenance(caplog)]
    assert seen == [(logging.WARNING, "queued 1 unfinished items again that had no job")]
    assert await res.pool.fetchval("SELECT task_name FROM procrastinate_jobs") == models.PROCESS_IMAGES
