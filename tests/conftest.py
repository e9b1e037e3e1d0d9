"""Fixtures: a throw-away PostgreSQL with a migrated template database (one database
per test, made from it), a real S3-compatible server, and a real image server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import inspect
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imgsvc import db, intake, localdb, migrate, models, queue, resources, settings
from tests import servers


@pytest.fixture(scope="session")
def postgres() -> Iterator[localdb.LocalPostgres]:
    root = Path(tempfile.mkdtemp(prefix="imgsvc-test-pg-"))
    os.chmod(root, 0o755)  # noqa: S103 - the cluster may run as another user
    cluster = localdb.LocalPostgres(root / "pg", fast=True)
    cluster.start()
    asyncio.run(migrate.apply(cluster.url))
    yield cluster
    cluster.remove()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database_url(postgres: localdb.LocalPostgres) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    postgres.execute(f"CREATE DATABASE {name} TEMPLATE {localdb.DATABASE}")
    yield postgres.url_of(name)
    postgres.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.S3Server]:
    server = servers.S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_server() -> Iterator[servers.ImageServer]:
    server = servers.ImageServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def receiver() -> Iterator[servers.WebhookReceiver]:
    server = servers.WebhookReceiver()
    server.start()
    yield server
    server.stop()


WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"imgsvc-test-webhook-secret-32byte").decode()


def test_env(s3: servers.S3Server, data_dir: Path) -> dict[str, str]:
    """The environment the tests run imgsvc with: fast retries, short timeouts, test servers."""
    return {
        **s3.env(),
        "IMGSVC_ALLOW_PRIVATE_NETWORKS": "true",
        "IMGSVC_DATA_DIR": str(data_dir),
        "IMGSVC_RETRY_BASE_SECONDS": "0.05",
        "IMGSVC_RETRY_MAX_SECONDS": "0.2",
        "IMGSVC_MAX_ATTEMPTS": "3",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "IMGSVC_WEBHOOK_TIMEOUT": "0.5",
        "IMGSVC_WEBHOOK_MAX_ATTEMPTS": "3",
        "IMGSVC_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
        "IMGSVC_WEBHOOK_RETRY_MAX_SECONDS": "0.2",
    }


@pytest.fixture
def config(s3: servers.S3Server, tmp_path: Path) -> settings.Settings:
    return settings.from_env(test_env(s3, tmp_path))


@pytest.fixture
async def res(config: settings.Settings, database_url: str) -> AsyncIterator[resources.Resources]:
    async with resources.opened(config, database_url) as opened:
        yield opened


async def store_request(
    pool: db.Pool,
    products: Iterable[models.Product],
    *,
    webhook_url: str | None = None,
    file_name: str | None = "p.csv",
    reprocess: bool = False,
) -> str:
    """Store and queue a request as an upload does; its id."""
    stored = await intake.insert_request(
        pool,
        file_name=file_name,
        webhook_url=webhook_url,
        products=products,
        queue=models.IMAGE_QUEUE,
        task=models.PROCESS_IMAGES,
        reprocess=reprocess,
    )
    return stored.request_id


def with_settings(res: resources.Resources, **changes: Any) -> resources.Resources:
    """The same resources with some settings changed."""
    return dataclasses.replace(res, settings=dataclasses.replace(res.settings, **changes))


@pytest.fixture(scope="session")
def hostile() -> Iterator[servers.HostileServer]:
    server = servers.HostileServer()
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def request_row_locked(pool: db.Pool, request_id: str) -> AsyncIterator[db.Connection]:
    """Hold a request's row lock in an open transaction on a connection of its own."""
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM requests WHERE id = $1 FOR UPDATE", uuid.UUID(request_id))
        yield holder


async def wait_for_lock_waits(pool: db.Pool, count: int, pending: asyncio.Future[Any]) -> None:
    """Return once ``count`` sessions of this database wait for a lock; fail if ``pending``
    ends first, or after 10 s."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = asyncio.get_running_loop().time() + 10
    while await pool.fetchval(query) < count:
        if pending.done():
            pending.result()  # its exception, if it has one
            raise AssertionError("finished without waiting for the lock")
        assert asyncio.get_running_loop().time() < deadline, "nothing waited for the lock"
        await asyncio.sleep(0.01)


def autogroup_on() -> bool:
    """Whether the kernel schedules by session here (sched_autogroup)."""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


async def eventually(
    check: Callable[[], object | Awaitable[object]],
    *,
    what: str,
    timeout: float = 10,
    interval: float = 0.02,
) -> Any:
    """Poll ``check`` (plain or async) until it returns something true, and return that;
    fail after ``timeout`` seconds saying ``what`` never happened and what was last seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        seen = check()
        if inspect.isawaitable(seen):
            seen = await seen
        if seen:
            return seen
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last seen: {seen!r})")
        await asyncio.sleep(interval)


async def run_until(res: resources.Resources, database_url: str, sql: str, *args: Any) -> None:
    """Run the worker until a query answers true (retries are scheduled a little later)."""
    app = queue.create_app(res.settings, database_url)
    async with app.open_async():
        for _ in range(100):
            await app.run_worker_async(
                additional_context=queue.context(res),
                wait=False,
                install_signal_handlers=False,
                concurrency=4,
            )
            if await res.pool.fetchval(sql, *args):
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"never true: {sql}")
