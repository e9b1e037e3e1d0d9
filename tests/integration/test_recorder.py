"""A job's image endings are recorded together, each learning what its own record did."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from imgsvc import db, models, recorder
from tests.conftest import store_request, wait_for_lock_waits
from tests.integration.test_database import FINISH_JOB, product


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[db.Pool]:
    opened = await db.create_pool(database_url, max_size=8)
    yield opened
    await opened.close()


async def _tasks(pool: db.Pool, images: int) -> tuple[str, list[models.ImageTask]]:
    rid = await store_request(pool, [product(1, images)])
    ids = [
        r["id"]
        for r in await pool.fetch("SELECT id FROM images WHERE request_id = $1 ORDER BY id", uuid.UUID(rid))
    ]
    return rid, [models.ImageTask(i, rid, serial_number=1, position=1, url="", attempts=1) for i in ids]


async def test_endings_that_come_together_share_statements(pool: db.Pool) -> None:
    rid, tasks = await _tasks(pool, 8)
    records = recorder.Recorder(pool, FINISH_JOB)
    results = await asyncio.gather(
        *(records.record(db.Ending(t, error=f"broken {t.image_id}")) for t in tasks)
    )
    assert [r.duplicates for r in results] == [0] * 8
    # The first ending goes alone; the seven that came while it ran go in one more.
    assert records.statements == 2
    rows = await pool.fetch("SELECT status, error, id FROM images WHERE request_id = $1", uuid.UUID(rid))
    assert all(r["status"] == "failed" and r["error"] == f"broken {r['id']}" for r in rows)
    status = await pool.fetchval("SELECT status FROM requests WHERE id = $1", uuid.UUID(rid))
    assert status == "failed"


async def test_a_lone_ending_is_recorded_at_once(pool: db.Pool) -> None:
    _, tasks = await _tasks(pool, 2)
    records = recorder.Recorder(pool, FINISH_JOB)
    await records.record(db.Ending(tasks[0], error="broken"))
    assert await pool.fetchval("SELECT status FROM images WHERE id = $1", tasks[0].image_id) == "failed"
    assert await pool.fetchval("SELECT status FROM images WHERE id = $1", tasks[1].image_id) == "queued"
    assert records.statements == 1


async def test_a_failed_statement_fails_every_ending_it_carried(database_url: str) -> None:
    pool = await db.create_pool(database_url, max_size=2)
    try:
        _, tasks = await _tasks(pool, 3)
    finally:
        await pool.close()
    records = recorder.Recorder(pool, FINISH_JOB)  # the pool is closed: the database is away
    outcomes = await asyncio.gather(
        *(records.record(db.Ending(t, error="broken")) for t in tasks), return_exceptions=True
    )
    assert outcomes and all(isinstance(o, Exception) for o in outcomes), outcomes


async def _until(check: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.01)


async def test_a_cancelled_ending_leaves_the_others_of_its_statement_to_be_recorded(pool: db.Pool) -> None:
    rid, tasks = await _tasks(pool, 3)
    records = recorder.Recorder(pool, FINISH_JOB)
    # The request row is held, so every statement waits for it while its owner is cancelled.
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT FROM requests WHERE id = $1 FOR UPDATE", uuid.UUID(rid))
        first = asyncio.ensure_future(records.record(db.Ending(tasks[0], error="first")))
        await wait_for_lock_waits(pool, 1, first)
        second, third = (
            asyncio.ensure_future(records.record(db.Ending(t, error="other"))) for t in tasks[1:]
        )
        await asyncio.sleep(0.05)  # both wait behind the first statement
        first.cancel()
        await _until(lambda: records.statements == 2)  # the second carries the second and third
        second.cancel()
        await _until(lambda: records.statements == 3)  # the third goes on alone
    assert (await third).duplicates == 0
    for cancelled in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    rows = await pool.fetch(
        "SELECT status, error FROM images WHERE request_id = $1 ORDER BY id", uuid.UUID(rid)
    )
    assert [(r["status"], r["error"]) for r in rows] == [
        ("queued", None),
        ("queued", None),
        ("failed", "other"),
    ]


async def test_endings_wait_for_the_rest_of_their_job_and_go_in_one_statement(pool: db.Pool) -> None:
    rid, tasks = await _tasks(pool, 8)
    records = recorder.Recorder(pool, FINISH_JOB, expected=8, linger=60.0)

    async def end(task: models.ImageTask, after: float) -> recorder.Recorded:
        await asyncio.sleep(after)
        return await records.record(db.Ending(task, error="broken"))

    # Endings spread over 0.4 s: all wait for the eighth (not for the 60 s linger).
    await asyncio.wait_for(asyncio.gather(*(end(t, n * 0.05) for n, t in enumerate(tasks))), 10)
    assert records.statements == 1
    assert await pool.fetchval("SELECT status FROM requests WHERE id = $1", uuid.UUID(rid)) == "failed"


async def test_an_image_left_out_of_its_job_is_not_waited_for(pool: db.Pool) -> None:
    _, tasks = await _tasks(pool, 3)
    records = recorder.Recorder(pool, FINISH_JOB, expected=3, linger=60.0)
    first = asyncio.ensure_future(records.record(db.Ending(tasks[0], error="broken")))
    second = asyncio.ensure_future(records.record(db.Ending(tasks[1], error="broken")))
    await asyncio.sleep(0.1)
    assert not first.done() and not second.done()  # waiting for the third
    records.left_out()  # the third will be retried by a later job
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert records.statements == 1


async def test_endings_wait_no_longer_than_the_linger(pool: db.Pool) -> None:
    _, tasks = await _tasks(pool, 3)
    records = recorder.Recorder(pool, FINISH_JOB, expected=3, linger=0.2)
    # The third never ends in this job (nobody says so): the two go after the linger.
    await asyncio.wait_for(
        asyncio.gather(*(records.record(db.Ending(t, error="broken")) for t in tasks[:2])), 10
    )
    assert records.statements == 1
    statuses = await pool.fetch("SELECT status FROM images WHERE id = ANY($1)", [t.image_id for t in tasks])
    assert sorted(r["status"] for r in statuses) == ["failed", "failed", "queued"]
