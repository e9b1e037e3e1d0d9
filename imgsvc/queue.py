"""The queue: the procrastinate app, its tasks, and how a worker runs.

The tasks are thin: each takes this process's resources from its job context and
hands them to a stage (``pipeline``, ``finish``, ``notify``, ``maintenance``). The
resources reach the context in one way, whoever hosts the worker: ``App`` opens them
around a worker run from its settings, unless the caller passes its own in
``additional_context`` (``imgsvc serve`` and ``imgsvc worker`` open them first, as
their start-up shares them with the API or the metrics).

Workers are ``imgsvc worker``, ``imgsvc serve`` (in-process), or procrastinate's own
``procrastinate --app=imgsvc.queue.app worker``; all share one PostgreSQL. For that
last one, ``app`` is built from the environment when it is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections.abc import Iterator
from typing import Any, Unpack

import procrastinate
import psycopg
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import jobs, manager, retry
from procrastinate.app import WorkerOptions
from procrastinate.jobs import Job

from imgsvc import errors, finish, logs, maintenance, models, notify, pipeline, priority, resources, settings

logger = logging.getLogger("imgsvc.queue")

RESOURCES = "imgsvc.resources"  # the key of the resources in a job's additional context


class BackoffRetry(retry.BaseRetryStrategy):
    """Retry transient errors with exponential backoff and full jitter over the upper half.

    The stages decide when to give up (they fail the image, or the webhook, on its last
    attempt instead of raising), so this strategy retries every TransientError.
    """

    def __init__(self, base_seconds: float, max_seconds: float) -> None:
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> retry.RetryDecision | None:
        if not isinstance(exception, errors.TransientError):
            return None
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** min(job.attempts, 30))
        delay = random.uniform(ceiling / 2, ceiling)
        return retry.RetryDecision(retry_at=utcnow() + datetime.timedelta(seconds=delay))


class JobManager(manager.JobManager):
    """procrastinate's job manager, for a worker that may lose its database for a while.

    A worker cut off from the database long enough is taken for dead: its jobs are put
    back in the queue and another worker runs them (``maintenance.retry_stalled``). When
    the link returns, the first worker's runs of those jobs end too, and procrastinate
    finds no job of theirs to end (``Job was not found``), which it would report as an
    unretrieved "Database error". The images are recorded once either way (a finished
    image is left as it is); this says what happened instead, in one line. A run that
    ends while the other worker still runs the job ends it for both (procrastinate does
    not check whose it is): the other's end is then the one that finds nothing.
    """

    async def finish_job(self, job: Job, status: jobs.Status, delete_job: bool) -> None:
        with _taken_over(job):
            await super().finish_job(job, status, delete_job)

    async def retry_job(
        self,
        job: Job,
        retry_at: datetime.datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        lock: str | None = None,
    ) -> None:
        with _taken_over(job):
            await super().retry_job(job, retry_at, priority, queue, lock)


@contextlib.contextmanager
def _taken_over(job: Job) -> Iterator[None]:
    try:
        yield
    except procrastinate_exceptions.ConnectorException as exc:
        cause = exc.__cause__
        if not isinstance(cause, psycopg.errors.RaiseException) or "Job was not found" not in str(cause):
            raise
        logger.warning(
            "job %s (%s) had been taken over, or ended, by another worker; its end here is not recorded",
            job.id,
            job.task_name,
        )


class App(procrastinate.App):
    """procrastinate's app, with the settings and database it was built for, which
    opens this process's resources around a worker run that was not given them."""

    def __init__(self, config: settings.Settings, database_url: str) -> None:
        super().__init__(
            connector=procrastinate.PsycopgConnector(conninfo=database_url, min_size=1, max_size=10),
        )
        self.job_manager = JobManager(connector=self.connector)
        self.config = config
        self.database_url = database_url

    async def run_worker_async(self, **kwargs: Unpack[WorkerOptions]) -> None:
        context = dict(kwargs.get("additional_context") or {})
        if RESOURCES in context:
            await super().run_worker_async(**kwargs)
            return
        # procrastinate's CLI hosts the worker: start-up is ours to do.
        logs.quiet_libraries()
        priority.lower_session_priority(self.config.worker_session_nice)
        async with resources.opened(self.config, self.database_url) as res:
            kwargs["additional_context"] = {**context, RESOURCES: res}
            await super().run_worker_async(**kwargs)


def _resources(context: procrastinate.JobContext) -> resources.Resources:
    res: resources.Resources = context.additional_context[RESOURCES]
    return res


async def process_images(context: procrastinate.JobContext, image_ids: list[int]) -> list[str]:
    """Download, compress and store a batch of images."""
    return await pipeline.process_images(_resources(context), image_ids)


async def finish_request(context: procrastinate.JobContext, request_id: str) -> str:
    """Write a finished request's output CSV and queue its webhook."""
    return await finish.complete(_resources(context), request_id)


async def deliver_webhook(context: procrastinate.JobContext, delivery_id: int) -> str:
    """Send a request's webhook; retried with backoff while the receiver is failing."""
    return await notify.deliver(_resources(context), delivery_id)


async def run_maintenance(context: procrastinate.JobContext, timestamp: int) -> int:
    """Every 15 s, on one worker: requeue the jobs of workers that stopped sending
    heartbeats (killed, machine lost), then give a job to unfinished work that has none."""
    return await maintenance.sweep(context.app.job_manager, _resources(context))


async def prune_jobs(context: procrastinate.JobContext, timestamp: int) -> None:
    """Every 10 minutes, on one worker: delete the jobs that ended (failed, aborted,
    cancelled) IMGSVC_JOB_RETENTION_HOURS ago, so that the queue's table stays bounded."""
    await maintenance.prune_jobs(context.app.job_manager, _resources(context).settings.job_retention_hours)


def create_app(config: settings.Settings, database_url: str | None = None) -> App:
    """The app and its tasks, with retry delays from ``config``; the database is
    ``database_url``, else DATABASE_URL."""
    url = database_url or config.database_url
    if not url:
        raise errors.SettingsError("DATABASE_URL", "is required to run workers")
    app = App(config, url)
    images = BackoffRetry(config.retry_base_seconds, config.retry_max_seconds)
    webhooks = BackoffRetry(config.webhook_retry_base_seconds, config.webhook_retry_max_seconds)
    for function, name, queue, strategy in (
        (process_images, models.PROCESS_IMAGES, models.IMAGE_QUEUE, images),
        (finish_request, models.FINISH_REQUEST, models.REQUEST_QUEUE, images),
        (deliver_webhook, models.DELIVER_WEBHOOK, models.REQUEST_QUEUE, webhooks),
    ):
        app.task(name=name, queue=queue, retry=strategy, pass_context=True)(function)
    sweeps = app.task(
        name="maintenance", queue=models.MAINTENANCE_QUEUE, queueing_lock="maintenance", pass_context=True
    )(run_maintenance)
    app.periodic(cron="* * * * * */15", periodic_id="maintenance")(sweeps)
    prunes = app.task(
        name=models.PRUNE_JOBS,
        queue=models.MAINTENANCE_QUEUE,
        queueing_lock=models.PRUNE_JOBS,
        pass_context=True,
    )(prune_jobs)
    app.periodic(cron="*/10 * * * *", periodic_id=models.PRUNE_JOBS)(prunes)
    return app


def context(res: resources.Resources) -> dict[str, Any]:
    """The ``additional_context`` that hands ``res`` to the tasks of a worker run."""
    return {RESOURCES: res}


def worker_options(config: settings.Settings) -> WorkerOptions:
    """How workers run: concurrency, heartbeats, and what happens to finished jobs."""
    return {
        "concurrency": config.worker_concurrency,
        "update_heartbeat_interval": max(1.0, config.stalled_seconds / 6),
        "stalled_worker_timeout": config.stalled_seconds,
        "shutdown_graceful_timeout": config.shutdown_seconds,
        "delete_jobs": "successful",
    }


async def run_worker(app: App, res: resources.Resources, stop: asyncio.Event) -> None:
    """Run a worker with ``res`` until ``stop`` is set, starting it again whenever it ends
    by itself.

    procrastinate stops a worker whose side task fails, as its heartbeat does while
    the database is down; this brings it back once the database answers again.
    """
    delay = 1.0
    while not stop.is_set():
        started = asyncio.get_running_loop().time()
        options = worker_options(res.settings)
        options["install_signal_handlers"] = False
        options["additional_context"] = context(res)
        worker = asyncio.create_task(app.run_worker_async(**options))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop.is_set():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
            return
        failure = worker.exception() if not worker.cancelled() else None
        if asyncio.get_running_loop().time() - started > 60:
            delay = 1.0
        logger.warning(
            "the worker stopped (%s); starting it again in %.0f s",
            type(failure).__name__ if failure else "its database connection failed",
            delay,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 30.0)


def utcnow() -> datetime.datetime:
    """Now, in UTC."""
    return datetime.datetime.now(datetime.UTC)


def __getattr__(name: str) -> Any:
    """``app``, for procrastinate's CLI (``--app=imgsvc.queue.app``): built from the
    environment each time it is looked up, so importing this module reads nothing."""
    if name == "app":
        return create_app(settings.from_env())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
