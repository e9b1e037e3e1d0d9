"""The procrastinate app and its tasks: thin wrappers over the pipeline.

Workers are `imgsvc worker`, `imgsvc serve` (in-process), or procrastinate's own
`procrastinate --app=imgsvc.jobs.app worker`; all share one PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from typing import Any

import procrastinate
import psycopg_pool
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import retry
from procrastinate.jobs import Job

from imgsvc import compress, errors, logs, pipeline, resources, settings

logger = logging.getLogger("imgsvc.jobs")

MAINTENANCE_QUEUE = "maintenance"

_state: dict[str, Any] = {}


def use(database_url: str, config: settings.Settings, res: resources.Resources | None = None) -> None:
    """Tell the tasks which database and resources this process uses."""
    _state["database_url"] = database_url
    _state["settings"] = config
    if res is not None:
        _state["resources"] = res


def _config() -> settings.Settings:
    if "settings" not in _state:
        _state["settings"] = settings.from_env()
    config: settings.Settings = _state["settings"]
    return config


def _database_url() -> str:
    url = _state.get("database_url") or _config().database_url
    if not url:
        raise errors.SettingsError("DATABASE_URL", "is required to run workers")
    return str(url)


def _make_pool(**kwargs: Any) -> psycopg_pool.AsyncConnectionPool:
    return psycopg_pool.AsyncConnectionPool(conninfo=_database_url(), min_size=1, max_size=10, **kwargs)


async def _resources() -> resources.Resources:
    """This process's resources; opened on first use when procrastinate's CLI hosts us.

    The first jobs start together: the first opens, the others wait for it, or each
    would open pools, sessions, threads and semaphores of its own (the limits
    multiplied) and all but the last would never be closed."""
    res: resources.Resources | None = _state.get("resources")
    if res is not None:
        return res
    loop = asyncio.get_running_loop()
    if _state.get("opening_loop") is not loop:  # a lock serves one event loop
        _state["opening_loop"], _state["opening"] = loop, asyncio.Lock()
    async with _state["opening"]:
        res = _state.get("resources")
        if res is None:
            logs.quiet_libraries()  # procrastinate's CLI set up logging, not imgsvc's
            config = _config()
            compress.lower_session_priority(config.worker_session_nice)  # a worker only: see its docstring
            stack = contextlib.AsyncExitStack()
            res = await stack.enter_async_context(resources.opened(config, _database_url()))
            _state["resources"] = res
            _state["stack"] = stack
    return res


class BackoffRetry(retry.BaseRetryStrategy):
    """Retry transient errors with exponential backoff and jitter.

    The pipeline decides when to give up (it fails the image, or the webhook, on its
    last attempt instead of raising), so this strategy retries every TransientError.
    """

    webhook = False

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> retry.RetryDecision | None:
        if not isinstance(exception, errors.TransientError):
            return None
        config = _config()
        base, most = config.retry_base_seconds, config.retry_max_seconds
        if self.webhook:
            base, most = config.webhook_retry_base_seconds, config.webhook_retry_max_seconds
        ceiling = min(most, base * 2 ** min(job.attempts, 30))
        delay = random.uniform(ceiling / 2, ceiling)
        return retry.RetryDecision(retry_at=utcnow() + datetime.timedelta(seconds=delay))


class WebhookBackoffRetry(BackoffRetry):
    """The same, with the webhook delays (IMGSVC_WEBHOOK_RETRY_*)."""

    webhook = True


class _Connector(procrastinate.PsycopgConnector):
    """procrastinate's connector, which also closes the resources opened on first use
    when procrastinate's CLI hosts the worker (the CLI closes the app's connector as it
    stops; ``imgsvc worker`` and ``imgsvc serve`` close their own)."""

    async def close_async(self) -> None:
        stack: contextlib.AsyncExitStack | None = _state.pop("stack", None)
        if stack is not None:
            _state.pop("resources", None)
            await stack.aclose()
        await super().close_async()


app = procrastinate.App(
    connector=_Connector(pool_factory=_make_pool),
    import_paths=["imgsvc.jobs"],
)


@app.task(name=pipeline.PROCESS_IMAGES, queue=pipeline.IMAGE_QUEUE, retry=BackoffRetry(), pass_context=True)
async def process_images(context: procrastinate.JobContext, image_ids: list[int]) -> list[str]:
    """Download, compress and store a batch of images."""
    return await pipeline.process_images(await _resources(), image_ids)


@app.task(name=pipeline.FINISH_REQUEST, queue=pipeline.REQUEST_QUEUE, retry=BackoffRetry(), pass_context=True)
async def finish_request(context: procrastinate.JobContext, request_id: str) -> str:
    """Write a finished request's output CSV and queue its webhook."""
    return await pipeline.complete_request(await _resources(), request_id)


@app.task(
    name=pipeline.DELIVER_WEBHOOK,
    queue=pipeline.REQUEST_QUEUE,
    retry=WebhookBackoffRetry(),
    pass_context=True,
)
async def deliver_webhook(context: procrastinate.JobContext, delivery_id: int) -> str:
    """Send a request's webhook; retried with backoff while the receiver is failing."""
    return await pipeline.deliver_webhook(await _resources(), delivery_id)


@app.periodic(cron="* * * * * */15", periodic_id="maintenance")
@app.task(name="maintenance", queue=MAINTENANCE_QUEUE, queueing_lock="maintenance", pass_context=True)
async def maintenance(context: procrastinate.JobContext, timestamp: int) -> int:
    """Every 15 s, on one worker: requeue the jobs of workers that stopped sending
    heartbeats (killed, machine lost), then give a job to unfinished work that has none.
    Not a procrastinate lock: a run stalled on a killed worker would hold it, and only
    this task puts stalled jobs back; requeue_orphans keeps overlapping runs apart with
    a lock that dies with its connection."""
    stalled = await context.app.job_manager.get_stalled_jobs(
        seconds_since_heartbeat=_config().stalled_seconds
    )
    count = 0
    for job in stalled:
        with contextlib.suppress(procrastinate_exceptions.ProcrastinateException):
            await context.app.job_manager.retry_job(job)
            count += 1
            logger.warning("retried job %s (%s) of a stalled worker", job.id, job.task_name)
    return count + await pipeline.requeue_orphans(await _resources())


async def run_worker(config: settings.Settings, stop: asyncio.Event) -> None:
    """Run a worker until ``stop`` is set, starting it again whenever it ends by itself.

    procrastinate stops a worker whose side task fails, as its heartbeat does while
    the database is down; this brings it back once the database answers again.
    """
    delay = 1.0
    while not stop.is_set():
        started = asyncio.get_running_loop().time()
        worker = asyncio.create_task(
            app.run_worker_async(install_signal_handlers=False, **worker_options(config))
        )
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


def worker_options(config: settings.Settings) -> dict[str, Any]:
    """How workers run: concurrency, heartbeats, and what happens to finished jobs."""
    return {
        "concurrency": config.worker_concurrency,
        "update_heartbeat_interval": max(1.0, config.stalled_seconds / 6),
        "stalled_worker_timeout": config.stalled_seconds,
        "shutdown_graceful_timeout": config.shutdown_seconds,
        "delete_jobs": "successful",
    }


def utcnow() -> datetime.datetime:
    """Now, in UTC."""
    return datetime.datetime.now(datetime.UTC)
