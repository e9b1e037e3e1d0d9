"""One image through download, compress and store, on real servers; retries and failures."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import uuid
from typing import Any

import pytest
import pyvips

from imgsvc import errors, memory, models, pipeline, quality, queue, resources
from tests.conftest import store_request, with_settings
from tests.servers import IMAGES, ImageServer, S3Server


async def enqueue(res: resources.Resources, *urls: str) -> tuple[str, list[int]]:
    products = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=urls)]
    rid = await store_request(res.pool, products, file_name=None)
    ids = [
        r["id"]
        for r in await res.pool.fetch(
            "SELECT id FROM images WHERE request_id = $1 ORDER BY position", uuid.UUID(rid)
        )
    ]
    return rid, ids


async def image_row(res: resources.Resources, image_id: int) -> dict[str, Any]:
    row = await res.pool.fetchrow("SELECT * FROM images WHERE id = $1", image_id)
    assert row is not None
    return dict(row)


async def test_an_image_is_stored_compressed_in_the_bucket(
    res: resources.Resources, image_server: ImageServer, s3: S3Server
) -> None:
    name = "mei_Panasonic_DMC-LC70.jpg"
    _, (image_id,) = await enqueue(res, image_server.url(f"/img/{name}"))
    assert await pipeline.process_image(res, image_id) == "done"
    row = await image_row(res, image_id)
    assert row["status"] == "done" and row["attempts"] == 1
    data, content_type = s3.get(str(row["output_key"]))
    # The key is the SHA-256 of the stored bytes, and the object says it never changes.
    assert (
        row["output_key"]
        == f"img/{hashlib.sha256(data).hexdigest()}.jpg"
        == f"img/{row['output_sha256']}.jpg"
    )
    assert row["output_url"] == f"{s3.endpoint}/{s3.bucket}/{row['output_key']}"
    assert content_type == "image/jpeg"
    head = s3.client().head_object(Bucket=s3.bucket, Key=row["output_key"])
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert row["source_sha256"] == hashlib.sha256((IMAGES / name).read_bytes()).hexdigest()
    assert row["reused"] is None and row["bytes_saved"] is None
    assert len(data) == row["bytes_out"] < (IMAGES / name).stat().st_size == row["bytes_in"]
    assert quality.estimate_jpeg_quality(data) == row["quality_out"] == 50
    assert pyvips.Image.new_from_buffer(data, "").width == 1280
    assert await res.pool.fetchval("SELECT status FROM requests") == "completed"


async def test_a_transient_failure_is_retried_then_succeeds(
    res: resources.Resources, image_server: ImageServer
) -> None:
    key = uuid.uuid4().hex
    _, (image_id,) = await enqueue(res, image_server.url(f"/flaky/{key}/1/kodak_kodim23.png"))
    with pytest.raises(errors.TransientError, match="HTTP 503"):
        await pipeline.process_image(res, image_id)
    row = await image_row(res, image_id)
    assert row["status"] == "queued" and "attempt 1: the source answered HTTP 503" in str(row["error"])
    assert await pipeline.process_image(res, image_id) == "done"
    row = await image_row(res, image_id)
    assert (row["status"], row["attempts"], row["error"]) == ("done", 2, None)


async def test_transient_failures_give_up_after_the_last_attempt(
    res: resources.Resources, image_server: ImageServer
) -> None:
    _, (image_id,) = await enqueue(res, image_server.url("/status/503"))
    for _ in range(res.settings.max_attempts - 1):
        with pytest.raises(errors.TransientError):
            await pipeline.process_image(res, image_id)
    assert await pipeline.process_image(res, image_id) == "failed"
    row = await image_row(res, image_id)
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["error"] == "the source answered HTTP 503 Service Unavailable (gave up after 3 attempts)"
    assert await res.pool.fetchval("SELECT status FROM requests") == "failed"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/status/404", "the source answered HTTP 404 Not Found"),
        ("/html", "the source is not an image in a supported format"),
        ("/img/truncated_jpeg_BlueSquare.jpg", "the image could not be decoded"),
        ("/img/bomb_lottapixel_64250x64250.jpg", "the limit is 50,000,000 (IMGSVC_MAX_PIXELS)"),
        ("/redirect/9/kodak_kodim23.png", "more than 5 redirects"),
    ],
)
async def test_permanent_failures_fail_at_once_with_a_reason(
    res: resources.Resources, image_server: ImageServer, path: str, reason: str
) -> None:
    _, (image_id,) = await enqueue(res, image_server.url(path))
    assert await pipeline.process_image(res, image_id) == "failed"
    row = await image_row(res, image_id)
    assert row["attempts"] == 1 and reason in str(row["error"])


async def test_redirects_within_the_cap_are_followed(
    res: resources.Resources, image_server: ImageServer
) -> None:
    _, (image_id,) = await enqueue(res, image_server.url("/redirect/3/png_palette_trns.png"))
    assert await pipeline.process_image(res, image_id) == "done"


async def test_private_addresses_are_refused_by_default(
    res: resources.Resources, image_server: ImageServer, database_url: str
) -> None:
    guarded = with_settings(res, allow_private_networks=False)
    before = len(image_server.requests)
    _, ids = await enqueue(
        guarded,
        image_server.url("/img/kodak_kodim23.png"),
        f"http://localhost:{image_server.port}/img/kodak_kodim23.png",
    )
    async with resources.opened(guarded.settings, database_url) as strict:
        for image_id in ids:
            assert await pipeline.process_image(strict, image_id) == "failed"
    errors_ = [str((await image_row(res, i))["error"]) for i in ids]
    assert "refused to fetch 127.0.0.1" in errors_[0]
    assert "refused to fetch: localhost resolves to 127.0.0.1" in errors_[1] or "::1" in errors_[1]
    assert len(image_server.requests) == before  # nothing reached the server


async def test_a_worker_runs_the_queue_with_retries(
    res: resources.Resources, image_server: ImageServer, database_url: str
) -> None:
    key = uuid.uuid4().hex
    rid, ids = await enqueue(
        res,
        image_server.url("/img/bimg_northern_cardinal_bird.jpg"),
        image_server.url(f"/flaky/{key}/2/gif_animated_loop3.gif"),
        image_server.url("/status/404"),
    )
    app = queue.create_app(res.settings, database_url)
    async with app.open_async():
        for _ in range(40):  # retries are scheduled a little later: run until settled
            await app.run_worker_async(
                additional_context=queue.context(res),
                queues=[models.IMAGE_QUEUE],
                wait=False,
                install_signal_handlers=False,
                concurrency=4,
            )
            if await res.pool.fetchval("SELECT status FROM requests") != "processing":
                break
            await asyncio.sleep(0.1)
    rows = [await image_row(res, i) for i in ids]
    assert [(r["status"], r["attempts"]) for r in rows] == [("done", 1), ("done", 3), ("failed", 1)]
    assert (
        await res.pool.fetchval("SELECT status FROM requests WHERE id = $1", uuid.UUID(rid))
        == "completed_with_errors"
    )


async def test_start_up_objects_are_frozen_out_of_the_collector(res: resources.Resources) -> None:
    """What resources.opened made is in the permanent generation, so a full collection
    does not walk it while the event loop waits."""
    assert gc.is_tracked(res.store) and gc.get_freeze_count() > 0
    assert not any(obj is res.store for obj in gc.get_objects())


async def test_a_worker_run_without_resources_opens_them_and_closes_them_after(
    res: resources.Resources, database_url: str, image_server: ImageServer
) -> None:
    """procrastinate's CLI runs the worker without imgsvc's start-up: the app opens the
    resources for the run, every job uses them, and they are closed when it ends."""
    names = ["bimg_northern_cardinal_bird.jpg", "kodak_kodim23.png"] * 10  # several jobs
    await enqueue(res, *(image_server.url(f"/img/{name}") for name in names))
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    before = await res.pool.fetchval(sessions)
    app = queue.create_app(res.settings, database_url)
    async with app.open_async():
        await app.run_worker_async(
            queues=[models.IMAGE_QUEUE], wait=False, install_signal_handlers=False, concurrency=4
        )
    statuses = await res.pool.fetch("SELECT status, count(*) FROM images GROUP BY status")
    assert [tuple(row) for row in statuses] == [("done", len(names))]
    # The run's pool is closed: its sessions end (a backend exits just after its client).
    deadline = asyncio.get_running_loop().time() + 10
    while await res.pool.fetchval(sessions) > before:
        assert asyncio.get_running_loop().time() < deadline, "the run's database sessions stayed open"
        await asyncio.sleep(0.02)


async def test_sources_that_declare_a_large_size_wait_for_memory_at_their_headers(
    res: resources.Resources, image_server: ImageServer
) -> None:
    # Sources seen so far were tiny (1 KiB expected each), so all six downloads start;
    # their answers come together after 300 ms, each declaring about 0.8 MB: with 1 MiB
    # for sources, one body is read and compressed at a time.
    budget = memory.SourceBudget(1024 * 1024, min_sources=1, first_guess=1024)
    budgeted = dataclasses.replace(res, source_budget=budget)
    names = ["bimg_northern_cardinal_bird.jpg", "mei_Panasonic_DMC-LC70.jpg"] * 3
    urls = (image_server.url(f"/slow/300/{name}?copy={n}") for n, name in enumerate(names))
    _, ids = await enqueue(budgeted, *urls)
    outcomes = await asyncio.gather(*(pipeline.process_image(budgeted, i) for i in ids))
    assert outcomes == ["done"] * 6
    sizes = sorted((IMAGES / name).stat().st_size for name in names)
    assert budget.peak < sizes[0] + sizes[1]  # never two bodies at once
    assert budget.held == 0 and budget.known == 0
