"""The database: its pool, the named queries in ``sql/queries.sql`` (loaded once), and
the writes. The reads behind the status API are in ``reads``.

asyncpg's connection errors become ``DatabaseUnavailable`` here, and deadlocks and
serialization failures ``DatabaseConflict``, so callers see a transient error they may
retry, and the API answers 503.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg

from imgsvc import catalog, errors, models

Pool: TypeAlias = asyncpg.Pool
# What ``pool.acquire()`` gives: every connection of ours comes from the pool.
Connection: TypeAlias = asyncpg.pool.PoolConnectionProxy

UNAVAILABLE = (  # what asyncpg raises when the database is away
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
    # A pooled connection whose last operation was cut off by the database going away
    # refuses the next one ("cannot switch to state …"): the same outage, seen later.
    asyncpg.exceptions.InternalClientError,
)

CONFLICTS = (  # rolled back so that another transaction can go on; worth a retry
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


def sql_dir() -> Path:
    """The folder of the SQL files: inside the installed package, or the source tree's."""
    here = Path(__file__).parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "queries.sql").is_file():
            return candidate
    raise errors.ImgsvcError("the SQL files are missing from the installation")


def parse_named_blocks(text: str) -> dict[str, str]:
    """Split a file of ``-- name --`` blocks into {name: sql}."""
    blocks: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        match = re.fullmatch(r"-- ([a-z_]+) --", line.strip())
        if match:
            if name:
                blocks[name] = "\n".join(lines).strip()
            name, lines = match.group(1), []
        elif name is not None and not line.lstrip().startswith("--"):
            lines.append(line)
    if name:
        blocks[name] = "\n".join(lines).strip()
    return blocks


@functools.cache
def queries() -> dict[str, str]:
    """The named queries, read once."""
    return parse_named_blocks((sql_dir() / "queries.sql").read_text())


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn asyncpg's connection failures into DatabaseUnavailable, and the conflicts
    PostgreSQL resolves by rolling one side back into DatabaseConflict."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise errors.DatabaseUnavailable(f"the database is not answering ({type(exc).__name__})") from exc
    except CONFLICTS as exc:
        raise errors.DatabaseConflict(f"the database stopped a conflicting change ({exc.sqlstate})") from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is. asyncpg's default sends
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every release, a
    round trip for state our queries never leave: no SET, LISTEN or cursor outside a
    transaction, and the advisory locks are the migrations' (released before their own
    pool closes) and the orphan sweep's (a transaction's, gone with it). An open
    transaction is still rolled back by asyncpg first."""


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> Pool:
    """Open a connection pool."""
    async with translated():
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, command_timeout=60, reset=_keep_session
        )
    assert pool is not None
    return pool


async def claim_images(pool: Pool, image_ids: list[int]) -> list[models.ImageTask]:
    """Mark images as processing, in one round trip; those already finished are left out."""
    async with translated():
        rows = await pool.fetch(queries()["claim_images"], image_ids)
    return [
        models.ImageTask(
            image_id=row["id"],
            request_id=row["request_id"],
            serial_number=row["serial_number"],
            position=row["position"],
            url=row["input_url"],
            attempts=row["attempts"],
            source_url=row["source_url"],
            reprocess=row["reprocess"],
        )
        for row in rows
    ]


async def requeue_image(pool: Pool, image_id: int, reason: str, queue: str, task: str) -> bool:
    """Put an interrupted image back in the queue with a new job; False if it was finished."""
    q = queries()
    async with translated(), pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(q["requeue_image"], image_id, reason) is None:
            return False
        await defer_job(conn, queue, task, {"image_ids": [image_id]})
    return True


async def orphans(pool: Pool, query: str, task: str, limit: int) -> list[Any]:
    """Unfinished rows with no live job (query: orphaned_images, _requests or _deliveries)."""
    async with translated():
        rows = await pool.fetch(queries()[query], task, limit)
    return [row[0] for row in rows]


async def release_image(pool: Pool, image_id: int, reason: str) -> None:
    """Put an image back in the queue after a transient failure."""
    async with translated():
        await pool.execute(queries()["release_image"], image_id, reason)


@dataclasses.dataclass(frozen=True, slots=True)
class Output:
    """A stored output image, as a done image records it: made now, or reused."""

    key: str
    url: str
    bytes_out: int
    width: int | None
    height: int | None
    format_in: str | None
    format_out: str | None
    quality_in: int | None
    quality_out: int | None
    kept_original: bool
    sha256: str
    reused: models.ReuseReason | None = None
    bytes_saved: int | None = None

    @classmethod
    def made(cls, result: models.Compressed, key: str, url: str, sha256: str) -> Output:
        """The output just compressed and stored."""
        return cls(
            key=key, url=url, bytes_out=len(result.data), width=result.width, height=result.height,
            format_in=result.format_in, format_out=result.format_out, quality_in=result.quality_in,
            quality_out=result.quality_out, kept_original=result.kept_original, sha256=sha256,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """A source URL that sent bytes (their SHA-256 and size are the image's), with the
    validators to ask it with next time: its ``sources`` record."""

    url: str
    validators: catalog.Validators


@dataclasses.dataclass(frozen=True, slots=True)
class Ending:
    """An image's final state: its output, or the reason it failed. With ``source``, the
    source's record is written with it; with ``made_under`` (a settings key), the output
    was made now and its ``outputs`` record is written with it too."""

    task: models.ImageTask
    output: Output | None = None
    error: str | None = None
    bytes_in: int | None = None
    source_sha256: str | None = None
    source: Source | None = None
    made_under: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The image's object in ``record_images``' JSON."""
        out = self.output
        ending: dict[str, Any] = {
            "id": self.task.image_id,
            "bytes_in": self.bytes_in,
            "source_sha256": self.source_sha256,
        }
        if self.source is not None and self.source_sha256 is not None and self.bytes_in is not None:
            v = self.source.validators
            ending |= {"source_url": self.source.url, "etag": v.etag, "last_modified": v.last_modified}
        if out is not None and self.made_under is not None and self.source_sha256 is not None:
            ending["settings_key"] = self.made_under
        if out is None:
            return ending | {"status": str(models.ImageStatus.FAILED), "error": self.error}
        return ending | {
            "status": str(models.ImageStatus.DONE), "output_key": out.key, "output_url": out.url,
            "bytes_out": out.bytes_out, "width": out.width, "height": out.height,
            "format_in": out.format_in, "format_out": out.format_out, "quality_in": out.quality_in,
            "quality_out": out.quality_out, "kept_original": out.kept_original,
            "reused": None if out.reused is None else str(out.reused), "bytes_saved": out.bytes_saved,
            "output_sha256": out.sha256,
        }  # fmt: skip


async def record_images(pool: Pool, endings: Sequence[Ending], *, finish_job: tuple[str, str]) -> Recorded:
    """Record the final states of some images of one request, and their duplicates', in
    one statement; say the request's final status if they were its last, having queued
    ``finish_job`` (queue, task) for it in the same transaction. Exactly one statement
    finishes a request, even when its last images finish at the same moment on several
    workers; an image already finished is left as it is."""
    request_ids = {ending.task.request_id for ending in endings}
    if len(request_ids) != 1:
        raise ValueError(f"the images of one record must share one request, not {len(request_ids)}")
    batch = json.dumps([ending.as_json() for ending in endings])
    async with translated():
        row = await pool.fetchrow(
            queries()["record_images"], uuid.UUID(request_ids.pop()), batch, *finish_job
        )
    assert row is not None  # the statement always returns one row
    return Recorded(status=row["status"], duplicates=collections.Counter(row["duplicates_of"]))


@dataclasses.dataclass(frozen=True, slots=True)
class Recorded:
    """What recording images did: the request's final status if they finished it, and
    how many duplicates ended with each image (by image id)."""

    status: str | None
    duplicates: collections.Counter[int]


async def defer_job(
    conn: Connection,
    queue: str,
    task: str,
    args: dict[str, Any],
    queueing_lock: str | None = None,
    lock: str | None = None,
) -> int:
    """Queue one procrastinate job inside the caller's transaction. ``queueing_lock``:
    no second job with it may wait; ``lock``: no two jobs with it run at once."""
    job_id: int = await conn.fetchval(
        queries()["defer_job"], queue, task, json.dumps(args), queueing_lock, lock
    )
    return job_id


async def set_output_csv(conn: Connection, request_id: uuid.UUID, key: str, url: str) -> None:
    """Record where the output CSV was stored."""
    await conn.execute(queries()["set_output_csv"], request_id, key, url)


async def insert_delivery(
    conn: Connection, request_id: uuid.UUID, event_id: str, url: str, payload: str
) -> int | None:
    """Create the request's webhook delivery; None when it already has one."""
    delivery_id: int | None = await conn.fetchval(
        queries()["insert_delivery"], request_id, event_id, url, payload
    )
    return delivery_id


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A webhook delivery about to be attempted: its event, where it goes, what it says,
    and the number of this attempt."""

    event_id: str
    url: str
    payload: str
    attempts: int


async def claim_delivery(pool: Pool, delivery_id: int) -> ClaimedDelivery | None:
    """Count one more attempt; None when the delivery is already settled."""
    async with translated():
        row = await pool.fetchrow(queries()["claim_delivery"], delivery_id)
    if row is None:
        return None
    return ClaimedDelivery(
        event_id=row["event_id"], url=row["url"], payload=row["payload"], attempts=row["attempts"]
    )


async def record_attempt(
    pool: Pool,
    delivery_id: int,
    attempt: int,
    started_at: datetime.datetime,
    duration_ms: int,
    http_status: int | None,
    error: str | None,
    state: models.DeliveryState,
) -> None:
    """Store one attempt and the delivery's new state together."""
    q = queries()
    async with translated(), pool.acquire() as conn, conn.transaction():
        await conn.execute(
            q["record_attempt"], delivery_id, attempt, started_at, duration_ms, http_status, error
        )
        await conn.execute(q["update_delivery"], delivery_id, state, http_status, error)


async def cancel_request(conn: Connection, request_id: uuid.UUID) -> tuple[str | None, int, str | None]:
    """Cancel a request's queued images, in the caller's transaction. Returns its status
    before (None if unknown), how many images were cancelled, and its final status if
    nothing is left running."""
    q = queries()
    before: str | None = await conn.fetchval(q["lock_request"], request_id)
    if before is None or models.RequestStatus(before).is_final:
        return before, 0, None
    cancelled = int((await conn.execute(q["cancel_images"], request_id)).split()[-1])
    await conn.execute(q["mark_cancel_requested"], request_id, cancelled)
    final: str | None = await conn.fetchval(q["final_status_by_count"], request_id)
    return before, cancelled, final


async def unfinished_requests(pool: Pool, limit: int) -> list[uuid.UUID]:
    """Open requests with no image left to run (see ``settle_by_count``)."""
    async with translated():
        rows = await pool.fetch(queries()["unfinished_requests"], limit)
    return [row[0] for row in rows]


async def settle_by_count(conn: Connection, request_id: uuid.UUID) -> str | None:
    """In the caller's transaction, give an open request with no image left to run its
    final status, from a count of its images; None if it is not such a request."""
    q = queries()
    await conn.execute(q["lock_request"], request_id)
    status: str | None = await conn.fetchval(q["final_status_by_count"], request_id)
    return status
