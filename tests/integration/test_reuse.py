"""Catalog reuse on real parts: the catalog origin over HTTP (honest and hostile about
validators), the S3 server, PostgreSQL and procrastinate's worker."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import pyvips

from imgsvc import db, finish, maintenance, models, pipeline, quality, reads, resources, reuse, settings
from tests.conftest import run_until, store_request, with_settings
from tests.origin import CatalogOrigin
from tests.servers import IMAGES, S3Server

JPEG, PNG, WEBP, GIF = (
    "mei_Panasonic_DMC-LC70.jpg",
    "kodak_kodim23.png",
    "webp_lossy_alpha_5_webp_a.webp",
    "gif_animated_loop3.gif",
)


@pytest.fixture(scope="module")
def origin() -> Iterator[CatalogOrigin]:
    server = CatalogOrigin()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def files(origin: CatalogOrigin) -> Iterator[str]:
    """A folder of its own on the origin, holding the test images under their names."""
    folder = uuid.uuid4().hex
    for name in (JPEG, PNG, WEBP, GIF, "bimg_northern_cardinal_bird.jpg"):
        origin.files[f"{folder}/{name}"] = (IMAGES / name).read_bytes()
    yield folder


async def run(res: resources.Resources, database_url: str, *urls: str, reprocess: bool = False) -> str:
    """A request of one product per URL, run by procrastinate's worker to its end."""
    products = [
        models.Product(line=n + 2, serial=str(n + 1), serial_number=n + 1, name=f"P{n}", urls=(url,))
        for n, url in enumerate(urls)
    ]
    return await run_products(res, database_url, products, reprocess=reprocess)


async def run_products(
    res: resources.Resources, database_url: str, products: list[models.Product], *, reprocess: bool = False
) -> str:
    rid = await store_request(res.pool, products, reprocess=reprocess)
    finished = "SELECT completed_at IS NOT NULL FROM requests WHERE id = $1"
    await run_until(res, database_url, finished, uuid.UUID(rid))
    return rid


async def images(res: resources.Resources, rid: str) -> list[dict[str, Any]]:
    rows = await res.pool.fetch("SELECT * FROM images WHERE request_id = $1 ORDER BY id", uuid.UUID(rid))
    return [dict(row) for row in rows]


def objects(s3: S3Server) -> set[str]:
    """The content-addressed objects in the bucket."""
    found: set[str] = set()
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="img/"):
        found |= {item["Key"] for item in page.get("Contents", [])}
    return found


def with_factor(res: resources.Resources, factor: float) -> resources.Resources:
    changed = dataclasses.replace(res.settings, quality_factor=factor)
    return dataclasses.replace(
        res, settings=changed, image_limits=dataclasses.replace(res.image_limits, quality_factor=factor)
    )


async def test_slots_with_the_same_source_share_one_download_compression_and_object(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str, s3: S3Server
) -> None:
    # 12 products, 3 slots each, over 4 sources; a scheme's case does not make another
    # source (tests/unit/test_catalog.py has the rest of the rule).
    sources = [origin.url("honest", f"{files}/{name}") for name in (JPEG, PNG, WEBP, GIF)]
    spelled = [sources[0].replace("http://", "HTTP://"), *sources[1:]]
    products = [
        models.Product(
            line=n + 2,
            serial=str(n + 1),
            serial_number=n + 1,
            name=f"P{n}",
            urls=tuple(spelled[(n + k) % 4] for k in range(3)),
        )
        for n in range(12)
    ]
    rid = await run_products(res, database_url, products)
    rows = await images(res, rid)
    assert len(rows) == 36 and {r["status"] for r in rows} == {"done"}
    assert origin.bodies(files) == 4  # one download a source
    assert len({r["output_key"] for r in rows}) == 4  # one object a source
    for row in rows:  # every slot has its own row, with its source's output
        assert row["input_url"] in spelled
        assert s3.get(row["output_key"])[0]
    assert [r["reused"] for r in rows].count("duplicate") == 32
    summary = await reads.get_status(res.pool, uuid.UUID(rid), limit=100, offset=0)
    assert summary is not None
    s = summary["summary"]
    assert (s["done"], s["compressed"], s["reused"]) == (36, 4, 32)
    saved = sum(r["bytes_in"] + r["bytes_out"] for r in rows if r["reused"] == "duplicate")
    assert s["bytes_saved"] == saved > 0


async def test_an_unchanged_catalog_is_answered_by_304s_and_stores_nothing(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str, s3: S3Server
) -> None:
    urls = [origin.url("honest", f"{files}/{name}") for name in (JPEG, PNG, WEBP)]
    first = await images(res, await run(res, database_url, *urls))
    stored = objects(s3)
    bodies = origin.bodies(files)
    second = await images(res, await run(res, database_url, *urls))
    assert origin.bodies(files) == bodies  # no body sent again
    asked = [hit for hit in origin.hits[-3:]]
    assert all(hit.conditional and hit.status == 304 for hit in asked)
    assert [r["reused"] for r in second] == ["not_modified"] * 3
    assert [r["output_url"] for r in second] == [r["output_url"] for r in first]  # the same URLs
    assert objects(s3) == stored
    for before, after in zip(first, second, strict=True):
        assert after["bytes_saved"] == before["bytes_in"] + before["bytes_out"]
        assert (after["quality_in"], after["quality_out"]) == (before["quality_in"], before["quality_out"])


async def test_an_origin_that_ignores_validators_is_matched_by_content(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str, s3: S3Server
) -> None:
    urls = [origin.url(mode, f"{files}/{JPEG}") for mode in ("ignore", "weak", "lm")]
    (first,) = await images(res, await run(res, database_url, urls[0]))
    assert first["reused"] is None
    # Three URLs of the same bytes: each downloaded once, then matched by the bytes' hash.
    second = await images(res, await run(res, database_url, *urls))
    assert [r["reused"] for r in second] == ["same_content"] * 3
    third = await images(res, await run(res, database_url, *urls))
    # No validators, or only a weak ETag: asked without any, matched by the hash again.
    # Last-Modified alone is a validator: a 304.
    assert [r["reused"] for r in third] == ["same_content", "same_content", "not_modified"]
    weak = [hit for hit in origin.hits if hit.path.startswith("/weak/")]
    assert not any(hit.conditional for hit in weak)
    assert len({r["output_key"] for r in [first, *second, *third]}) == 1


async def test_changed_content_is_compressed_again_even_under_the_same_etag(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str
) -> None:
    honest, sticky = origin.url("honest", f"{files}/{JPEG}"), origin.url("sticky", f"{files}/{PNG}")
    first = await images(res, await run(res, database_url, honest, sticky))
    origin.files[f"{files}/{JPEG}"] = (IMAGES / "bimg_northern_cardinal_bird.jpg").read_bytes()
    origin.files[f"{files}/{PNG}"] = (IMAGES / "png_palette_trns.png").read_bytes()
    second = await images(res, await run(res, database_url, honest, sticky))
    assert [r["reused"] for r in second] == [None, None]
    for before, after in zip(first, second, strict=True):
        assert after["source_sha256"] != before["source_sha256"]
        assert after["output_key"] != before["output_key"]
    source = await res.pool.fetchrow("SELECT * FROM sources WHERE url = $1", honest)
    assert source is not None and source["changed_at"] > source["first_seen_at"]


async def test_hostile_validators_never_give_a_wrong_image(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str
) -> None:
    liar, wrong = origin.url("liar", f"{files}/{JPEG}"), origin.url("wrong", f"{files}/{PNG}")
    first = await images(res, await run(res, database_url, liar, wrong))
    assert first[0]["status"] == "failed"
    assert first[0]["error"] == "the source answered 304 Not Modified to a request without validators"
    # A 304 that names another ETag than the one asked with is not trusted: the image is
    # fetched again without validators, and its bytes decide.
    origin.files[f"{files}/{PNG}"] = (IMAGES / "png_palette_trns.png").read_bytes()
    second = await images(res, await run(res, database_url, wrong))
    hits = [hit for hit in origin.hits if hit.path.startswith("/wrong/")]
    assert [(h.status, h.conditional) for h in hits] == [(200, False), (304, True), (200, False)]
    assert second[0]["reused"] is None and second[0]["source_sha256"] != first[1]["source_sha256"]
    assert (
        second[0]["source_sha256"]
        == hashlib.sha256((IMAGES / "png_palette_trns.png").read_bytes()).hexdigest()
    )


@pytest.mark.parametrize("name", [JPEG, PNG, WEBP, GIF])
async def test_our_own_output_fed_back_is_never_degraded_again(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str, s3: S3Server, name: str
) -> None:
    (made,) = await images(res, await run(res, database_url, origin.url("honest", f"{files}/{name}")))
    assert made["status"] == "done" and made["reused"] is None
    output, _ = s3.get(made["output_key"])
    origin.files[f"{files}/shop-copy"] = output  # a shop that took our URL's bytes as its own
    for reprocess in (False, True):  # reprocess reuses nothing, but never degrades ours
        (fed,) = await images(
            res, await run(res, database_url, origin.url("ignore", f"{files}/shop-copy"), reprocess=reprocess)
        )
        expected = "same_content" if made["kept_original"] else "own_output"
        assert fed["reused"] == expected
        assert fed["output_key"] == made["output_key"] and fed["output_url"] == made["output_url"]
        assert fed["quality_in"] == fed["quality_out"] == made["quality_out"]
        assert s3.get(fed["output_key"])[0] == output
    if name == JPEG:
        assert quality.estimate_jpeg_quality(output) == made["quality_out"]


async def test_reprocess_compresses_everything_again(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str
) -> None:
    urls = [origin.url("honest", f"{files}/{name}") for name in (JPEG, PNG)]
    await run(res, database_url, *urls)
    count = len(origin.hits)
    again = await images(res, await run(res, database_url, *urls, reprocess=True))
    assert [r["reused"] for r in again] == [None, None]
    assert [(h.status, h.conditional) for h in origin.hits[count:]] == [(200, False)] * 2
    summary = await reads.get_status(res.pool, again[0]["request_id"], limit=10, offset=0)
    assert summary is not None and summary["summary"]["reprocess"] is True


async def test_other_settings_make_the_output_again(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str
) -> None:
    url = origin.url("honest", f"{files}/{JPEG}")
    (half,) = await images(res, await run(res, database_url, url))
    lower = with_factor(res, 0.3)
    (third,) = await images(lower, await run(lower, database_url, url))
    assert third["reused"] is None and third["quality_out"] < half["quality_out"]
    (again,) = await images(lower, await run(lower, database_url, url))
    assert again["reused"] == "not_modified" and again["output_key"] == third["output_key"]
    keys = await res.pool.fetch("SELECT settings_key FROM outputs ORDER BY created_at")
    assert len(keys) == 2 and "quality_factor=0.3" in keys[1][0]


async def test_a_deleted_object_is_made_again_once_its_record_is_checked(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str, s3: S3Server
) -> None:
    url, same = origin.url("honest", f"{files}/{PNG}"), origin.url("ignore", f"{files}/{PNG}")
    (made,) = await images(res, await run(res, database_url, url))
    assert res.settings.reuse_check_seconds == 3600  # the default
    # Within the hour after it was stored, the record is trusted without a HEAD: an
    # object deleted behind imgsvc's back (and its record kept) is reused.
    s3.client().delete_object(Bucket=s3.bucket, Key=made["output_key"])
    (trusted,) = await images(res, await run(res, database_url, url))
    assert trusted["reused"] == "not_modified"
    # Checked every time, a HEAD finds it gone, on a 304 and on the same content alike:
    # made again, under the same key (the same bytes).
    checking = with_settings(res, reuse_check_seconds=0)
    for source in (url, same):
        s3.client().delete_object(Bucket=s3.bucket, Key=made["output_key"])
        (again,) = await images(checking, await run(checking, database_url, source))
        assert again["status"] == "done" and again["reused"] is None
        assert again["output_key"] == made["output_key"]
        assert s3.get(again["output_key"])[0]
    # Found by a HEAD, a record is trusted again.
    await res.pool.execute("UPDATE outputs SET verified_at = now() - interval '2 hours'")
    (found,) = await images(checking, await run(checking, database_url, url))
    assert found["reused"] == "not_modified"
    verified = await res.pool.fetchval("SELECT verified_at > now() - interval '1 minute' FROM outputs")
    assert verified is True


async def test_two_workers_racing_on_a_new_source_leave_a_correct_state(
    config: settings.Settings, database_url: str, origin: CatalogOrigin, files: str, s3: S3Server
) -> None:
    url = origin.url("ignore", f"{files}/{JPEG}")
    async with resources.opened(config, database_url) as one, resources.opened(config, database_url) as two:
        product = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url,))]
        first, second = await store_request(one.pool, product), await store_request(one.pool, product)
        ids = [row["id"] for row in await one.pool.fetch("SELECT id FROM images ORDER BY id")]
        outcomes = await asyncio.gather(
            pipeline.process_image(one, ids[0]), pipeline.process_image(two, ids[1])
        )
        assert list(outcomes) == ["done", "done"]
        rows = [*await images(one, first), *await images(one, second)]
        for row in rows:  # each points at an object that is there
            assert s3.get(row["output_key"])[0]
        (record,) = await one.pool.fetch("SELECT * FROM outputs")
        assert record["output_key"] in {r["output_key"] for r in rows}
        assert s3.get(record["output_key"])[0]
        statuses = await one.pool.fetch("SELECT status FROM requests")
        assert {row[0] for row in statuses} == {"completed"}


async def test_a_source_shared_by_slots_is_retried_once_for_all_of_them(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str
) -> None:
    from tests.servers import ImageServer

    flaky = ImageServer()
    flaky.start()
    try:
        url = flaky.url(f"/flaky/{uuid.uuid4().hex}/1/{PNG}")
        products = [models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url, url, url))]
        rows = await images(res, await run_products(res, database_url, products))
    finally:
        flaky.stop()
    assert [r["status"] for r in rows] == ["done"] * 3
    assert [r["attempts"] for r in rows] == [2, 0, 0]  # the shared source ran twice, its copies never
    assert len({r["output_key"] for r in rows}) == 1


async def test_copies_of_a_source_are_cancelled_recovered_and_finished_once(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str
) -> None:
    url = origin.url("honest", f"{files}/{GIF}")
    other = origin.url("honest", f"{files}/{PNG}")
    products = [
        models.Product(line=2, serial="1", serial_number=1, name="P", urls=(url, other)),
        models.Product(line=3, serial="2", serial_number=2, name="Q", urls=(url, other)),
    ]
    rid = await store_request(res.pool, products)
    # Only the first slot of each source has a job; the sweep for work without a job
    # finds nothing to queue, then, with every job lost, queues those two only.
    assert await res.pool.fetchval("SELECT count(*) FROM procrastinate_jobs") == 2
    assert await maintenance.requeue_orphans(res) == 0
    await res.pool.execute("DELETE FROM procrastinate_jobs")
    assert await maintenance.requeue_orphans(res) == 2
    # Cancelled while the first source is being processed: its copy and the second
    # source's slots are cancelled; the first ends done, and the request ends once.
    first_source = await res.pool.fetchval("SELECT min(id) FROM images")
    await db.claim_images(res.pool, [first_source])
    assert await finish.cancel(res, rid) == ("processing", 3, "processing")
    assert await pipeline.process_image(res, first_source) == "done"
    rows = await images(res, rid)
    assert [r["status"] for r in rows] == ["done", "cancelled", "cancelled", "cancelled"]
    assert await res.pool.fetchval("SELECT status FROM requests") == "cancelled"
    finishing = "SELECT count(*) FROM procrastinate_jobs WHERE task_name = $1"
    assert await res.pool.fetchval(finishing, models.FINISH_REQUEST) == 1


async def test_a_request_from_before_the_catalog_reads_as_before(res: resources.Resources) -> None:
    # A row as the schema before 013 wrote it: a per-request key, and no reuse columns.
    rid = uuid.uuid4()
    await res.pool.execute(
        "INSERT INTO requests (id, status, product_count, image_count, done_count, done_bytes_in, "
        "done_bytes_out, completed_at) VALUES ($1, 'completed', 1, 1, 1, 100, 40, now())",
        rid,
    )
    product = await res.pool.fetchval(
        "INSERT INTO products (request_id, position, line, serial, serial_number, name) "
        "VALUES ($1, 1, 2, '1', 1, 'P') RETURNING id",
        rid,
    )
    await res.pool.execute(
        "INSERT INTO images (request_id, product_id, position, input_url, status, output_key, "
        "output_url, bytes_in, bytes_out, attempts) "
        "VALUES ($1, $2, 1, 'http://a.test/a.jpg', 'done', $3, $4, 100, 40, 1)",
        rid,
        product,
        f"{rid}/1-1.jpg",
        f"http://bucket.test/{rid}/1-1.jpg",
    )
    found = await reads.get_status(res.pool, rid, limit=10, offset=0)
    assert found is not None
    s = found["summary"]
    assert (s["done"], s["compressed"], s["reused"], s["bytes_saved"]) == (1, 1, 0, 0)
    (image,) = found["products"][0]["images"]
    assert image["output_url"] == f"http://bucket.test/{rid}/1-1.jpg" and image["reused"] is None


async def test_our_image_re_encoded_elsewhere_stops_at_the_quality_floor(
    res: resources.Resources, database_url: str, origin: CatalogOrigin, files: str, s3: S3Server
) -> None:
    (made,) = await images(res, await run(res, database_url, origin.url("honest", f"{files}/{JPEG}")))
    output, _ = s3.get(made["output_key"])
    # A CDN in front of our bucket re-encodes at its own quality and strips metadata:
    # the bytes are no longer ours, by hash; their quality reads as the CDN's.
    cdn = bytes(
        pyvips.Image.new_from_buffer(output, "").jpegsave_buffer(Q=50, keep=pyvips.enums.ForeignKeep.NONE)
    )
    origin.files[f"{files}/cdn-copy.jpg"] = cdn
    (again,) = await images(res, await run(res, database_url, origin.url("ignore", f"{files}/cdn-copy.jpg")))
    assert again["reused"] is None and again["quality_in"] == 50
    assert again["quality_out"] == res.settings.min_quality == 30  # not 25: the floor holds
    origin.files[f"{files}/cdn-copy-2.jpg"] = s3.get(again["output_key"])[0]
    (third,) = await images(
        res, await run(res, database_url, origin.url("ignore", f"{files}/cdn-copy-2.jpg"))
    )
    assert third["reused"] == "own_output" and third["quality_out"] == 30  # and goes no lower


async def test_output_look_ups_that_come_together_share_statements(res: resources.Resources) -> None:
    await res.pool.execute(
        "INSERT INTO outputs (source_sha256, settings_key, output_sha256, output_key, output_url,"
        " bytes_in, bytes_out, kept_original) VALUES ($1, 'q50', $2, 'img/b.jpg', 'http://s3.test/img/b.jpg',"
        " 10, 5, false)",
        "aa" * 32, "bb" * 32,
    )  # fmt: skip
    outputs = reuse.Outputs(res.pool, "q50", 3600, same=True)
    asked = ["aa" * 32, "bb" * 32, "cc" * 32, "aa" * 32]
    rows = await asyncio.gather(*(outputs.row(sha256) for sha256 in asked))
    assert [None if r is None else (r["own"], r["output_key"], r["trusted"]) for r in rows] == [
        (False, "img/b.jpg", True), (True, "img/b.jpg", True), None, (False, "img/b.jpg", True),
    ]  # fmt: skip
    # The first went alone; the three that asked while it ran went in one more.
    assert outputs.statements == 2
    # Without ``same`` (reprocess) only our own outputs are found; other settings find those.
    for other in (
        reuse.Outputs(res.pool, "q50", 3600, same=False),
        reuse.Outputs(res.pool, "q40", 0, same=True),
    ):
        assert await other.row("aa" * 32) is None
        own = await other.row("bb" * 32)
        assert own is not None and own["own"] and own["output_key"] == "img/b.jpg"
