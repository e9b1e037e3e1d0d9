"""The queue's table stays bounded over a long run: jobs that succeed are deleted as
they end, and those that end otherwise (failed, aborted, cancelled) by the
``prune_jobs`` task once IMGSVC_JOB_RETENTION_HOURS have passed, not before."""

from __future__ import annotations

from imgsvc import models, queue, resources
from tests.conftest import store_request, with_settings
from tests.servers import ImageServer

ROUNDS = 6
FAILING = 10  # jobs a round of a task no worker knows (one a newer release queued, say)
ENDED = "SELECT count(*) FROM procrastinate_jobs WHERE status NOT IN ('todo', 'doing')"


async def run_worker(app: queue.App, res: resources.Resources) -> None:
    """A worker with the options `imgsvc worker` runs with, until the queue is empty."""
    options = queue.worker_options(res.settings)
    options |= {"additional_context": queue.context(res), "wait": False, "install_signal_handlers": False}
    await app.run_worker_async(**options)


async def prune(app: queue.App, res: resources.Resources) -> None:
    """Queue the prune as its schedule does, and let a worker run it."""
    await app.configure_task(models.PRUNE_JOBS).defer_async(timestamp=0)
    await run_worker(app, res)


async def test_a_long_run_keeps_the_jobs_table_bounded(
    res: resources.Resources, database_url: str, image_server: ImageServer
) -> None:
    res = with_settings(res, job_retention_hours=1)
    app = queue.create_app(res.settings, database_url)
    url = image_server.url("/img/png_palette_trns.png")
    ceiling = 0
    async with app.open_async():
        for round_ in range(ROUNDS):
            urls = tuple(f"{url}?round={round_}&n={n}" for n in range(3))
            products = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=urls)]
            rid = await store_request(res.pool, products)
            for n in range(FAILING):
                await app.configure_task("retired_task", queue=models.IMAGE_QUEUE).defer_async(n=n)
            await run_worker(app, res)
            status = await res.pool.fetchval("SELECT status FROM requests WHERE id = $1", rid)
            assert status == "completed"
            # Younger than the retention: the prune leaves them for people to look at.
            await prune(app, res)
            assert await res.pool.fetchval(ENDED) == FAILING
            assert (
                await res.pool.fetchval("SELECT count(*) FROM procrastinate_jobs WHERE status = 'failed'")
                == FAILING
            )
            ceiling = max(ceiling, await res.pool.fetchval("SELECT count(*) FROM procrastinate_jobs"))
            # An hour and more later (their events moved back two hours), they go.
            await res.pool.execute(
                "UPDATE procrastinate_events SET at = at - interval '2 hours'"
                " WHERE job_id IN (SELECT id FROM procrastinate_jobs WHERE status = 'failed')"
            )
            await prune(app, res)
            assert await res.pool.fetchval(ENDED) == 0
    # Over 6 rounds, 18 images and 60 failed jobs, the table never held more than a round's.
    assert ceiling <= FAILING + 2
    assert await res.pool.fetchval("SELECT count(*) FROM procrastinate_events") <= 2
    done = await res.pool.fetchval("SELECT count(*) FROM images WHERE status = 'done'")
    assert done == 3 * ROUNDS
