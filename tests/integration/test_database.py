"""The database properties: atomic enqueue, exactly-once finishing, idempotent schema."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from imgsvc import catalog, db, errors, intake, migrate, models, reads
from tests.conftest import request_row_locked, store_request, wait_for_lock_waits


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[db.Pool]:
    opened = await db.create_pool(database_url, max_size=8)
    yield opened
    await opened.close()


def product(serial: int, images: int) -> models.Product:
    return models.Product(
        line=serial + 1,
        serial=f"{serial}.",
        serial_number=serial,
        name=f"Product {serial}",
        urls=tuple(f"http://img.test/{serial}/{i}.jpg" for i in range(images)),
    )


async def test_a_request_is_stored_with_one_job_per_image(pool: db.Pool) -> None:
    rid = await store_request(pool, [product(1, 2), product(2, 3)])
    images = await pool.fetch(
        "SELECT id, position FROM images WHERE request_id = $1 ORDER BY id", uuid.UUID(rid)
    )
    job_rows = await pool.fetch("SELECT task_name, queue_name, args, status FROM procrastinate_jobs")
    assert len(images) == 5
    assert sorted(i for j in job_rows for i in json.loads(j["args"])["image_ids"]) == [
        i["id"] for i in images
    ]
    assert {(j["task_name"], j["queue_name"], j["status"]) for j in job_rows} == {
        (models.PROCESS_IMAGES, models.IMAGE_QUEUE, "todo")
    }
    names = await pool.fetch("SELECT serial, name, position FROM products ORDER BY position")
    assert [tuple(r) for r in names] == [("1.", "Product 1", 1), ("2.", "Product 2", 2)]


async def test_images_are_queued_in_batches_in_input_order(pool: db.Pool) -> None:
    stored = await intake.insert_request(
        pool,
        file_name=None,
        webhook_url=None,
        products=[product(1, 3), product(2, 2)],
        queue=models.IMAGE_QUEUE,
        task=models.PROCESS_IMAGES,
        images_per_job=2,
    )
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    batches = [
        json.loads(r["args"])["image_ids"]
        for r in await pool.fetch("SELECT args FROM procrastinate_jobs ORDER BY id")
    ]
    assert stored.images == 5 and batches == [ids[0:2], ids[2:4], ids[4:5]]


async def test_no_request_without_its_jobs_and_no_job_without_its_request(pool: db.Pool) -> None:
    # Break the enqueue step: the request, products and images inserted before it
    # must vanish with it.
    await pool.execute(
        "ALTER FUNCTION procrastinate_defer_jobs_v1(procrastinate_job_to_defer_v1[]) RENAME TO defer_disabled"
    )
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await store_request(pool, [product(1, 3)])
    for table in ("requests", "products", "images", "procrastinate_jobs"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_a_problem_found_late_in_a_streamed_file_undoes_everything(database_url: str) -> None:
    """Products reach the database while the file is still being read: a problem found
    after thousands of them must take them all back, and leave the connection usable."""
    pool = await db.create_pool(database_url, min_size=1, max_size=1)

    async def late_problem() -> AsyncIterator[models.Product]:
        for serial in range(1, 5001):
            yield product(serial, 2)
        raise errors.CsvInvalid([{"line": 5002, "message": "the product name is empty"}], 1)

    try:
        with pytest.raises(errors.CsvInvalid):
            await intake.insert_request(
                pool,
                file_name="p.csv",
                webhook_url=None,
                products=late_problem(),
                queue=models.IMAGE_QUEUE,
                task=models.PROCESS_IMAGES,
            )
        for table in ("requests", "products", "images", "procrastinate_jobs"):
            assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        # The same (only) connection takes the next upload: the staging table went with
        # the transaction.
        request_id = await store_request(pool, [product(1, 3), product(2, 1)])
        stored = await pool.fetchrow(
            "SELECT product_count, image_count FROM requests WHERE id = $1", uuid.UUID(request_id)
        )
        assert stored is not None and tuple(stored) == (2, 4)
    finally:
        await pool.close()


async def _finish_concurrently(
    pool: db.Pool, request_id: str, image_ids: list[int], fail: set[int]
) -> list[str | None]:
    barrier = asyncio.Barrier(len(image_ids))
    result = models.Compressed(
        data=b"x",
        format_in="jpeg",
        format_out="jpeg",
        width=1,
        height=1,
        quality_in=80,
        quality_out=40,
        kept_original=False,
    )
    output = db.Output.made(result, key="k", url="http://out.test/k", sha256="00" * 32)

    async def finish(image_id: int) -> str | None:
        task = models.ImageTask(image_id, request_id, serial_number=1, position=1, url="", attempts=1)
        await barrier.wait()
        if image_id in fail:
            ending = db.Ending(task, error="broken")
        else:
            ending = db.Ending(task, output=output, bytes_in=10)
        recorded = await db.record_images(pool, [ending], finish_job=FINISH_JOB)
        return recorded.status

    return await asyncio.gather(*(finish(i) for i in image_ids))


FINISH_JOB = (models.REQUEST_QUEUE, models.FINISH_REQUEST)


async def _finish_jobs(pool: db.Pool, request_id: str) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM procrastinate_jobs WHERE task_name = $1 AND args->>'request_id' = $2",
        models.FINISH_REQUEST,
        request_id,
    )
    return count


async def test_the_last_images_finishing_at_once_finish_the_request_exactly_once(pool: db.Pool) -> None:
    for round_ in range(15):
        rid = await store_request(pool, [product(1, 2), product(2, 2)])
        ids = [
            r["id"] for r in await pool.fetch("SELECT id FROM images WHERE request_id = $1", uuid.UUID(rid))
        ]
        fail = set(ids[: round_ % 3])  # none, one or two failures
        outcomes = await _finish_concurrently(pool, rid, ids, fail)
        finished = [o for o in outcomes if o is not None]
        expected = "completed" if not fail else "completed_with_errors"
        assert finished == [expected], outcomes
        row = await pool.fetchrow("SELECT status, completed_at FROM requests WHERE id = $1", uuid.UUID(rid))
        assert row is not None and row["status"] == expected and row["completed_at"] is not None
        assert await _finish_jobs(pool, rid) == 1


async def test_finishes_that_waited_for_the_request_lock_still_finish_it(pool: db.Pool) -> None:
    # Each finishing statement takes its snapshot before it waits for the request row,
    # so neither sees the other's image as finished: only the request's counters, read
    # from the newest row after the wait, can tell the second one that it was the last.
    rid = await store_request(pool, [product(1, 3)])
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    async with request_row_locked(pool, rid):
        pending = asyncio.ensure_future(_finish_concurrently(pool, rid, ids, {ids[0]}))
        await wait_for_lock_waits(pool, len(ids), pending)
    outcomes = await pending
    assert sorted(o for o in outcomes if o is not None) == ["completed_with_errors"], outcomes
    view = await pool.fetchrow("SELECT * FROM request_progress WHERE request_id = $1", uuid.UUID(rid))
    assert view is not None
    counts = (view["status"], view["done"], view["failed"], view["queued"])
    assert counts == ("completed_with_errors", 2, 1, 0)
    assert await _finish_jobs(pool, rid) == 1


async def test_finishing_locks_the_request_before_the_image(pool: db.Pool) -> None:
    # The order cancelling takes them in: the other order deadlocks with a cancel.
    rid = await store_request(pool, [product(1, 2)])
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    await db.claim_images(pool, ids)
    async with request_row_locked(pool, rid) as holder:
        pending = asyncio.ensure_future(_finish_concurrently(pool, rid, ids[:1], set()))
        await wait_for_lock_waits(pool, 1, pending)
        # The waiting finish holds no lock on its image yet.
        await holder.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE NOWAIT", ids[0])
    assert await pending == [None]


async def test_a_claim_and_a_cancel_of_a_queued_request_do_not_deadlock(pool: db.Pool) -> None:
    rid = await store_request(pool, [product(1, 2)])
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    async with request_row_locked(pool, rid) as holder:
        claim = asyncio.ensure_future(db.claim_images(pool, ids))
        await wait_for_lock_waits(pool, 1, claim)
        # The claim waits for the request row without holding its images, so the
        # cancel can take them.
        assert (await db.cancel_request(holder, uuid.UUID(rid)))[1:] == (2, "cancelled")
    assert await claim == []
    assert await pool.fetchval("SELECT status FROM requests") == "cancelled"


async def test_a_claim_and_a_cancel_of_a_processing_request_do_not_deadlock(pool: db.Pool) -> None:
    rid = await store_request(pool, [product(1, 3)])
    a, b, c = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    await db.claim_images(pool, [c])  # the request is processing: a claim no longer takes its row
    # A new version of image a, after b in the table: a scan in table order meets b first.
    await pool.execute("UPDATE images SET attempts = attempts WHERE id = $1", a)
    async with pool.acquire() as blocker, pool.acquire() as canceller:
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE", a)
        claim = asyncio.ensure_future(db.claim_images(pool, [a, b]))
        await wait_for_lock_waits(pool, 1, claim)  # the claim waits for a, first in line
        async with canceller.transaction():
            await canceller.execute("SET LOCAL enable_indexscan = off")
            await canceller.execute("SET LOCAL enable_bitmapscan = off")
            cancel = asyncio.ensure_future(db.cancel_request(canceller, uuid.UUID(rid)))
            await wait_for_lock_waits(pool, 2, cancel)
            await blocker_tx.commit()
            # The claim gets a, then b; a cancel that had locked b on its way to a would
            # now deadlock with it.
            assert sorted(task.image_id for task in await claim) == [a, b]
            assert await cancel == ("processing", 0, None)


async def test_a_deadlock_is_a_conflict_worth_a_retry(pool: db.Pool) -> None:
    await store_request(pool, [product(1, 2)])
    a, b = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    barrier = asyncio.Barrier(2)

    async def lock(first: int, second: int) -> None:
        async with db.translated(), pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE", first)
            await barrier.wait()
            await conn.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE", second)

    outcomes = await asyncio.gather(lock(a, b), lock(b, a), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["DatabaseConflict", "NoneType"], outcomes
    assert all(o is None or isinstance(o, errors.TransientError) for o in outcomes)


async def test_a_finished_image_is_not_finished_again(pool: db.Pool) -> None:
    rid = await store_request(pool, [product(1, 1)])
    (image_id,) = [r["id"] for r in await pool.fetch("SELECT id FROM images")]
    first = await _finish_concurrently(pool, rid, [image_id], {image_id})
    again = await _finish_concurrently(pool, rid, [image_id], set())
    assert first == ["failed"] and again == [None]
    assert await _finish_jobs(pool, rid) == 1
    assert await pool.fetchval("SELECT status FROM images") == "failed"
    assert await db.claim_images(pool, [image_id]) == []


async def test_migrate_is_idempotent_and_checked(database_url: str, postgres: object) -> None:
    assert await migrate.apply(database_url) == migrate.Applied(applied=[], waiting=[])
    pool = await db.create_pool(database_url)
    try:
        await migrate.check(pool)
        await pool.execute("DELETE FROM imgsvc_migrations")
        with pytest.raises(errors.SchemaError, match="imgsvc migrate"):
            await migrate.check(pool)
    finally:
        await pool.close()


async def test_an_unreachable_database_is_a_transient_error() -> None:
    with pytest.raises(errors.DatabaseUnavailable):
        await db.create_pool("postgresql://postgres@127.0.0.1:1/none")


async def test_a_pooled_connection_is_released_without_a_reset_round_trip(database_url: str) -> None:
    """The pool hands a connection back as it was (no RESET ALL on release), and a
    transaction left open is still rolled back."""
    pool = await db.create_pool(database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'kept'")
        assert await pool.fetchval("SHOW application_name") == "kept"
        conn = await pool.acquire()
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("CREATE TABLE left_open (x int)")
        await pool.release(conn)
        assert await pool.fetchval("SELECT to_regclass('left_open')") is None
    finally:
        await pool.close()


async def test_output_rows_come_in_chunks_in_input_order_and_hold_no_connection_between_them(
    database_url: str,
) -> None:
    pool = await db.create_pool(database_url, max_size=1)

    async def link(key: str) -> str:
        return f"http://out.test/{key}"

    try:
        rid = uuid.UUID(await store_request(pool, [product(n, 2) for n in range(1, 6)]))
        chunks = [chunk async for chunk in reads.output_rows(pool, rid, link, chunk=2)]
        assert [len(chunk) for chunk in chunks] == [2, 2, 1]
        rows = [row for chunk in chunks for row in chunk]
        assert [row.serial for row in rows] == ["1.", "2.", "3.", "4.", "5."]
        assert rows[0].input_urls == ("http://img.test/1/0.jpg", "http://img.test/1/1.jpg")
        assert rows[0].output_urls == (None, None)  # nothing processed yet
        assert [len(chunk) async for chunk in reads.output_rows(pool, rid, link, chunk=5)] == [5]
        # A client that reads slowly: between two chunks the pool's one connection is free.
        async with contextlib.aclosing(reads.output_rows(pool, rid, link, chunk=2)) as reading:
            serials = [row.serial for row in await anext(reading)]
            assert await asyncio.wait_for(pool.fetchval("SELECT 1"), 5) == 1
            serials += [row.serial async for chunk in reading for row in chunk]
        assert serials == ["1.", "2.", "3.", "4.", "5."]
    finally:
        await pool.close()


PROGRESS_FROM_IMAGES = """
SELECT count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       count(*) FILTER (WHERE status = 'done') AS done,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       coalesce(sum(bytes_in) FILTER (WHERE status = 'done'), 0)::bigint AS bytes_in,
       coalesce(sum(bytes_out) FILTER (WHERE status = 'done'), 0)::bigint AS bytes_out
FROM images WHERE request_id = $1
"""
PROGRESS_VIEW = """
SELECT queued, processing, done, failed, cancelled, bytes_in, bytes_out, total, percent
FROM request_progress WHERE request_id = $1
"""


async def test_request_progress_counts_agree_with_the_images_through_every_change(
    database_url: str,
) -> None:
    """The view reads counters kept on the request row: after claims, releases, done and
    failed images finishing side by side, a second finish of the same image and a
    cancel, they match a count of the images themselves."""
    pool = await db.create_pool(database_url, max_size=8)
    try:
        rid = await store_request(pool, [product(n, 3) for n in range(1, 5)])  # 12 images
        ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
        rid_uuid = uuid.UUID(rid)

        async def agree() -> None:
            counted_row = await pool.fetchrow(PROGRESS_FROM_IMAGES, rid_uuid)
            view_row = await pool.fetchrow(PROGRESS_VIEW, rid_uuid)
            assert counted_row is not None and view_row is not None
            counted, view = dict(counted_row), dict(view_row)
            assert {k: view[k] for k in counted} == counted
            assert view["total"] == 12
            finished = counted["done"] + counted["failed"] + counted["cancelled"]
            assert view["percent"] == round(100 * finished / 12, 1)

        await agree()
        assert [task.image_id for task in await db.claim_images(pool, ids[:8])] == ids[:8]
        await db.release_image(pool, ids[7], "attempt 1: timed out")
        await agree()
        await _finish_concurrently(pool, rid, ids[:6], fail={ids[1], ids[4]})
        await agree()
        await _finish_concurrently(pool, rid, ids[:1], fail=set())  # already done: no change
        await agree()
        async with pool.acquire() as conn, conn.transaction():
            _, cancelled, final = await db.cancel_request(conn, rid_uuid)
        assert (cancelled, final) == (5, None)  # image 7 is still processing
        await agree()
        await _finish_concurrently(pool, rid, ids[6:7], fail=set())
        await agree()
        assert await pool.fetchval("SELECT status FROM requests") == "cancelled"
    finally:
        await pool.close()


async def test_deleting_or_truncating_requests_or_products_takes_their_images(pool: db.Pool) -> None:
    """images.product_id has no foreign key (an upload's insert would check it once a
    row); triggers on products cascade a delete or a truncate to the images instead."""
    kept = await store_request(pool, [product(1, 2)])
    gone = await store_request(pool, [product(1, 3), product(2, 1)])
    await pool.execute("DELETE FROM requests WHERE id = $1", uuid.UUID(gone))
    left = await pool.fetch("SELECT request_id::text, count(*) FROM images GROUP BY request_id")
    assert {row[0]: row[1] for row in left} == {kept: 2}
    await pool.execute("DELETE FROM products WHERE request_id = $1", uuid.UUID(kept))
    assert await pool.fetchval("SELECT count(*) FROM images") == 0
    await store_request(pool, [product(1, 2)])
    await pool.execute("TRUNCATE requests CASCADE")
    for table in ("requests", "products", "images"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table


def made_output(data: bytes, key: str) -> db.Output:
    """An output of ``data``'s size (one pixel a byte), stored under ``key``."""
    result = models.Compressed(
        data=data, format_in="jpeg", format_out="jpeg", width=len(data), height=1,
        quality_in=80, quality_out=40, kept_original=False,
    )  # fmt: skip
    return db.Output.made(result, key=key, url=f"http://out.test/{key}", sha256="11" * 32)


async def test_one_statement_records_several_images_and_their_duplicates(pool: db.Pool) -> None:
    # Product 2 repeats product 1's two URLs: its slots are duplicates and end with them.
    first = product(1, 2)
    again = dataclasses.replace(product(2, 0), urls=first.urls)
    rid = await store_request(pool, [first, again, product(3, 1)])
    rows = await pool.fetch(
        "SELECT id, duplicate_of FROM images WHERE request_id = $1 ORDER BY id", uuid.UUID(rid)
    )
    leaders = [r["id"] for r in rows if r["duplicate_of"] is None]
    assert len(leaders) == 3 and len(rows) == 5
    tasks = [models.ImageTask(i, rid, serial_number=1, position=1, url="", attempts=1) for i in leaders]
    output = made_output(b"xy", "k")
    endings = [
        db.Ending(tasks[0], output=output, bytes_in=10, source_sha256="aa" * 32),
        db.Ending(tasks[1], error="broken", bytes_in=7),
    ]
    recorded = await db.record_images(pool, endings, finish_job=FINISH_JOB)
    assert recorded.status is None  # the third image is still open
    assert recorded.duplicates == {leaders[0]: 1, leaders[1]: 1}
    last = await db.record_images(
        pool, [db.Ending(tasks[2], output=output, bytes_in=10)], finish_job=FINISH_JOB
    )
    assert last.status == "completed_with_errors" and not last.duplicates
    again_recorded = await db.record_images(pool, endings, finish_job=FINISH_JOB)
    assert again_recorded.status is None and not again_recorded.duplicates  # already finished: left as is
    images = await pool.fetch(
        "SELECT status, error, reused, bytes_in, bytes_out, output_sha256 FROM images"
        " WHERE request_id = $1 ORDER BY id",
        uuid.UUID(rid),
    )
    assert [(r["status"], r["reused"]) for r in images] == [
        ("done", None), ("failed", None), ("done", "duplicate"), ("failed", None), ("done", None),
    ]  # fmt: skip
    assert images[3]["error"] == "broken" and images[2]["output_sha256"] == "11" * 32
    request = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", uuid.UUID(rid))
    assert request is not None
    assert (request["done_count"], request["failed_count"], request["reused_count"]) == (3, 2, 1)
    assert (request["done_bytes_in"], request["done_bytes_out"]) == (30, 6)
    assert request["bytes_saved"] == 12  # the duplicate's download and output
    assert await _finish_jobs(pool, rid) == 1


async def test_the_record_of_images_writes_their_sources_and_outputs_records(pool: db.Pool) -> None:
    # Three images of one job: two whose bytes are the same photo at two URLs (both made
    # now: one outputs row), and one that failed after its download (its source only).
    rid = await store_request(pool, [product(1, 3)])
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    tasks = [models.ImageTask(i, rid, serial_number=1, position=1, url="", attempts=1) for i in ids]
    output = made_output(b"xyz", "img/k.jpg")
    etag = catalog.Validators(etag='"e1"')
    dated = catalog.Validators(last_modified="Mon, 07 Dec 2026 10:00:00 GMT")

    def made(task: models.ImageTask, url: str, validators: catalog.Validators) -> db.Ending:
        return db.Ending(
            task, output=output, bytes_in=10, source_sha256="aa" * 32,
            source=db.Source(url, validators), made_under="q50",
        )  # fmt: skip

    await pool.execute(
        "INSERT INTO sources (url, sha256, bytes, changed_at) VALUES ($1, $2, 9, now() - interval '1 day')",
        "http://img.test/a.jpg", "00" * 32,
    )  # fmt: skip
    endings = [
        made(tasks[0], "http://img.test/a.jpg", etag),
        made(tasks[1], "http://img.test/b.jpg", dated),
        db.Ending(
            tasks[2],
            error="not an image",
            bytes_in=4,
            source_sha256="cc" * 32,
            source=db.Source("http://img.test/c.jpg", catalog.Validators()),
        ),
    ]
    recorded = await db.record_images(pool, endings, finish_job=FINISH_JOB)
    assert recorded.status == "completed_with_errors"
    sources = await pool.fetch(
        "SELECT url, etag, last_modified, sha256, bytes, changed_at > now() - interval '1 minute' AS changed"
        " FROM sources ORDER BY url"
    )
    assert [tuple(r) for r in sources] == [
        ("http://img.test/a.jpg", '"e1"', None, "aa" * 32, 10, True),  # other bytes than before
        ("http://img.test/b.jpg", None, dated.last_modified, "aa" * 32, 10, True),
        ("http://img.test/c.jpg", None, None, "cc" * 32, 4, True),
    ]
    outputs = await pool.fetch(
        "SELECT source_sha256, settings_key, output_key, bytes_in, bytes_out FROM outputs"
    )
    assert [tuple(r) for r in outputs] == [("aa" * 32, "q50", "img/k.jpg", 10, 3)]
    # A reused output (no settings key) and a 304 (no source) write neither record.
    rid = await store_request(pool, [product(2, 2)])
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images WHERE request_id = $1", uuid.UUID(rid))]
    tasks = [models.ImageTask(i, rid, serial_number=2, position=1, url="", attempts=1) for i in ids]
    reused = dataclasses.replace(output, reused=models.ReuseReason.NOT_MODIFIED, bytes_saved=13)
    await db.record_images(
        pool,
        [db.Ending(t, output=reused, bytes_in=10, source_sha256="aa" * 32) for t in tasks],
        finish_job=FINISH_JOB,
    )
    assert await pool.fetchval("SELECT count(*) FROM sources") == 3
    assert await pool.fetchval("SELECT count(*) FROM outputs") == 1


async def test_the_images_of_one_record_share_a_request(pool: db.Pool) -> None:
    one, other = await store_request(pool, [product(1, 1)]), await store_request(pool, [product(2, 1)])
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id")]
    tasks = [
        models.ImageTask(i, rid, serial_number=1, position=1, url="", attempts=1)
        for i, rid in zip(ids, (one, other), strict=True)
    ]
    with pytest.raises(ValueError, match="share one request"):
        await db.record_images(pool, [db.Ending(t, error="x") for t in tasks], finish_job=FINISH_JOB)


async def _images_reltuples(pool: db.Pool) -> float:
    value: float = await pool.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'images'::regclass")
    return value


async def test_a_request_bigger_than_the_images_table_refreshes_its_statistics(pool: db.Pool) -> None:
    await store_request(pool, [product(n, 2) for n in range(100)])
    assert await _images_reltuples(pool) == 200  # this request was more than the table held
    await store_request(pool, [product(n, 1) for n in range(50)])
    assert await _images_reltuples(pool) == 200  # fewer than the table holds: left to autovacuum
    await store_request(pool, [product(n, 3) for n in range(100)])
    assert await _images_reltuples(pool) == 550


async def test_recording_looks_images_up_even_when_the_statistics_are_stale(pool: db.Pool) -> None:
    # A request stored behind the planner's back (no ANALYZE), recorded with the generic
    # plan a prepared statement gets after five runs: a plan that ran the duplicates'
    # look-up once per image of the request read a million rows here.
    rid = str(uuid.uuid4())
    await pool.execute(
        "INSERT INTO requests (id, product_count, image_count, status) VALUES ($1, 1000, 1000, 'processing')",
        uuid.UUID(rid),
    )
    await pool.execute(
        "INSERT INTO products (request_id, position, line, serial, serial_number, name)"
        " SELECT $1, g, g + 1, g::text, g, 'p' FROM generate_series(1, 1000) g",
        uuid.UUID(rid),
    )
    await pool.execute(
        "INSERT INTO images (request_id, product_id, position, input_url, status)"
        " SELECT $1, p.id, 1, 'http://img.test/' || p.position, 'processing' FROM products p",
        uuid.UUID(rid),
    )
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id LIMIT 8")]
    batch = json.dumps([{"id": i, "status": "failed", "error": "gone"} for i in ids])
    async with pool.acquire() as conn:
        recording = conn.transaction()
        await recording.start()
        try:
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE record (uuid, json, text, text) AS {db.queries()['record_images']}")
            execute = f"EXECUTE record ('{rid}', '{batch}', 'requests', 'finish_request')"
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {execute}")
        finally:
            await recording.rollback()  # nothing recorded
            await conn.execute("DEALLOCATE ALL")

    read = _image_rows(json.loads(plan)[0]["Plan"])
    assert read <= 3 * 1000, f"the statement read {read} rows of images for 8 images of 1,000"


def _image_rows(node: dict[str, Any]) -> int:
    """The rows of images a plan read (EXPLAIN ANALYZE, FORMAT JSON)."""
    own = node["Actual Rows"] * node["Actual Loops"] if node.get("Relation Name") == "images" else 0
    return own + sum(_image_rows(child) for child in node.get("Plans", []))


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_reads_its_own_images_whatever_the_table_holds(pool: db.Pool, plan_mode: str) -> None:
    await store_request(pool, [product(n, 2) for n in range(1000)])  # its statistics refreshed
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM images ORDER BY id LIMIT 16")]
    async with pool.acquire() as conn:
        claiming = conn.transaction()
        await claiming.start()
        try:
            await conn.execute(f"SET LOCAL plan_cache_mode = {plan_mode}")
            await conn.execute(f"PREPARE claim (bigint[]) AS {db.queries()['claim_images']}")
            listed = ",".join(map(str, ids))
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim ('{{{listed}}}')")
        finally:
            await claiming.rollback()
            await conn.execute("DEALLOCATE ALL")
    read = _image_rows(json.loads(plan)[0]["Plan"])
    assert read <= 4 * len(ids), f"the claim of 16 images read {read} rows of images of 2,000"
