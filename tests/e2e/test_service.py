"""The service as a user meets it: `imgsvc serve` in its own process, a CSV over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pyvips

from imgsvc import localdb, quality
from tests.conftest import autogroup_on, eventually
from tests.e2e.processes import (
    Process,
    assert_clean_exit,
    post_csv,
    service_env,
    wait_for_final,
    wait_until_up,
)
from tests.servers import IMAGES, ImageServer, S3Server

PHOTOS = [
    "mei_Panasonic_DMC-LC70.jpg",
    "bimg_northern_cardinal_bird.jpg",
    "jpeg_exif-orientation-6_landscape.jpg",
    "kodak_kodim23.png",
    "webp_lossy_alpha_5_webp_a.webp",
    "gif_animated_loop3.gif",
]


async def test_a_csv_becomes_compressed_images_in_the_bucket(
    service: str, image_server: ImageServer, s3: S3Server
) -> None:
    rows = [
        f'1.,Camera shot,"{image_server.url("/img/" + PHOTOS[0])}, {image_server.url("/img/" + PHOTOS[1])}"',
        f'2,"Rotated, on its side",{image_server.url("/img/" + PHOTOS[2])}',
        f'3,Assorted,"{image_server.url("/img/" + PHOTOS[3])},{image_server.url("/img/" + PHOTOS[4])},'
        f'{image_server.url("/img/" + PHOTOS[5])}"',
    ]
    csv_body = ("S. No.,Product Name,Input Image Urls\r\n" + "\r\n".join(rows) + "\r\n").encode()
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(session, service, csv_body)
        assert status == 202, accepted
        assert (accepted["products"], accepted["images"]) == (3, 6)
        final = await wait_for_final(session, accepted["status_url"])
    assert final["status"] == "completed"
    assert final["counts"] == {
        "total": 6,
        "queued": 0,
        "processing": 0,
        "done": 6,
        "failed": 0,
        "cancelled": 0,
    }
    assert final["progress"] == 1.0 and final["completed_at"] is not None
    assert [(p["serial"], p["name"]) for p in final["products"]] == [
        ("1.", "Camera shot"),
        ("2", "Rotated, on its side"),
        ("3", "Assorted"),
    ]
    images = [image for p in final["products"] for image in p["images"]]
    assert [i["input_url"].rsplit("/", 1)[1] for i in images] == PHOTOS
    for name, image in zip(PHOTOS, images, strict=True):
        key = image["output_url"].split(f"/{s3.bucket}/", 1)[1]
        data, content_type = s3.get(key)
        source = (IMAGES / name).read_bytes()
        out = pyvips.Image.new_from_buffer(data, "")
        assert content_type == f"image/{image['format_out']}"
        assert image["format_out"] == image["format_in"], name
        assert len(data) == image["bytes_out"] < len(source) == image["bytes_in"], name
        assert (out.width, out.height) == (image["width"], image["height"])
        if image["format_out"] == "jpeg":
            assert quality.estimate_jpeg_quality(data) == image["quality_out"]
            assert image["quality_out"] == round(image["quality_in"] / 2)
    rotated = images[2]
    assert (rotated["width"], rotated["height"]) == (600, 450)  # upright: EXIF orientation 6 applied


async def test_bad_uploads_get_clear_errors_and_store_nothing(service: str, database_url: str) -> None:
    header = "S. No.,Product Name,Input Image Urls\n"
    async with aiohttp.ClientSession() as session:
        status, body = await post_csv(session, service, (header + "1,,ftp://x/y.jpg\n1,B,\n").encode())
        assert status == 422 and body["error"] == "invalid_csv" and body["problem_count"] == 4
        assert {(p["line"], p.get("column")) for p in body["problems"]} == {(2, 2), (2, 3), (3, 1), (3, 3)}
        status, body = await post_csv(session, service, header.encode(), field="other")
        assert (status, body["error"]) == (400, "missing_file")
        form = aiohttp.FormData()  # as curl -F file=<x.csv sends it: a part with no file name
        form.add_field("file", header + "1,A,http://a.test/1.jpg\n", content_type="text/plain")
        async with session.post(service + "/upload", data=form) as response:
            refused = await response.json()
            assert response.status == 400 and "curl -F file=@products.csv" in refused["message"]
        async with session.post(
            service + "/upload", data=b"x", headers={"Content-Type": "text/csv"}
        ) as response:
            assert response.status == 415
        rows = "".join(f"{i},P,http://a.test/{i}.jpg\n" for i in range(1, 23))
        status, body = await post_csv(session, service, (header + rows).encode())
        assert status == 422 and "more than 20 product rows" in body["problems"][0]["message"]
        async with session.post(service + "/upload", data=b"x") as response:
            assert response.status == 415
        status, body = await post_csv(
            session, service, (header + "1,Sh\x00irt,http://a.test/1.jpg\n").encode()
        )
        assert status == 422 and [(p["line"], p["column"]) for p in body["problems"]] == [(2, 2)]
        async with session.get(service + "/status/not-a-uuid") as response:
            assert response.status == 422 and "not a request id" in (await response.json())["message"]
        async with session.get(service + "/requests?page=%C2%B2") as response:  # "²" is a digit to str
            assert response.status == 422 and (await response.json())["error"] == "invalid_parameter"
        async with session.get(service + "/status/00000000-0000-4000-8000-000000000000") as response:
            assert response.status == 404
    conn = await asyncpg.connect(database_url)
    try:
        for table in ("requests", "products", "images"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        # Only the worker's own maintenance job may be there, never an image or request job.
        assert (
            await conn.fetchval("SELECT count(*) FROM procrastinate_jobs WHERE queue_name <> 'maintenance'")
            == 0
        )
    finally:
        await conn.close()


async def test_status_pages_through_products(service: str, image_server: ImageServer) -> None:
    url = image_server.url("/img/png_palette_trns.png").replace("http://", "http://buyer:hunter2@")
    rows = "".join(f"{i},P{i},{url}\n" for i in range(1, 6))
    async with aiohttp.ClientSession() as session:
        status, accepted = await post_csv(
            session, service, ("S. No.,Product Name,Input Image Urls\n" + rows).encode()
        )
        assert status == 202
        await wait_for_final(session, accepted["status_url"])
        async with session.get(accepted["status_url"] + "?page=2&per_page=2") as response:
            page = await response.json()
    assert [p["serial"] for p in page["products"]] == ["3", "4"]
    assert uuid.UUID(accepted["request_id"]).version == 4  # random, not guessable
    shown = page["products"][0]["images"][0]["input_url"]
    assert "hunter2" not in json.dumps(page) and shown.startswith("http://***@127.0.0.1:")
    assert page["page"]["total_products"] == 5 and page["page"]["next"].endswith("page=3&per_page=2")


async def test_api_and_separate_workers_share_the_queue(
    database_url: str, s3: S3Server, tmp_path: Path, image_server: ImageServer
) -> None:
    """Production layout: an API without a worker, an imgsvc worker and a procrastinate one,
    each in a session of its own as systemd starts services."""
    port = localdb.free_port()
    # Two jobs at a time each, from a slow source: neither worker can take them all.
    env = service_env(database_url, s3, tmp_path, port) | {
        "IMGSVC_WORKER_CONCURRENCY": "2",
        "IMGSVC_IMAGES_PER_JOB": "1",
        "IMGSVC_WORKER_SESSION_NICE": "7",
    }
    api = Process([sys.executable, "-m", "imgsvc", "serve", "--no-worker"], env, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    wait_until_up(base, api)
    procrastinate = str(Path(sys.executable).parent / "procrastinate")
    commands = [
        [sys.executable, "-m", "imgsvc", "worker"],
        [procrastinate, "--app=imgsvc.queue.app", "worker"],
    ]
    registered = "SELECT count(*) FROM procrastinate_workers"
    conn = await asyncpg.connect(database_url)
    try:
        before = await conn.fetchval(registered)
    finally:
        await conn.close()
    workers = [
        Process(command, env, tmp_path / f"worker{n}.log", own_session=True)
        for n, command in enumerate(commands, start=1)
    ]
    try:
        # Upload only once both workers take jobs, or the first up may take them all.
        await wait_until_registered(database_url, registered, before + len(workers), workers)
        urls = [image_server.url(f"/slow/300/{name}") for name in PHOTOS[:4]] * 3
        rows = "".join(f"{i},P{i},{url}?copy={i}\n" for i, url in enumerate(urls, start=1))
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(
                session, base, ("S. No.,Product Name,Input Image Urls\n" + rows).encode()
            )
            assert status == 202
            final = await wait_for_final(session, accepted["status_url"])
        assert final["status"] == "completed" and final["counts"]["done"] == 12
        conn = await asyncpg.connect(database_url)
        try:
            per_worker = await conn.fetch(
                "SELECT count(*) FROM images WHERE status = 'done' AND attempts = 1"
            )
        finally:
            await conn.close()
        assert per_worker[0][0] == 12  # every image done once
        for worker in workers:
            assert "process_image" in worker.output(), worker.output()[-2000:]
            assert "VIPS:" not in worker.output()  # libvips' INFO lines stay out of the log
            if autogroup_on():  # each worker put its own session 7 levels lower, and said so
                assert Path(f"/proc/{worker.popen.pid}/autogroup").read_text().split()[-1] == "7"
                assert "at least 7 nice levels lower" in worker.output(), worker.output()[-2000:]
    finally:
        assert_clean_exit(*workers, api)


async def wait_until_registered(
    database_url: str, registered: str, count: int, workers: list[Process], seconds: float = 30
) -> None:
    """Return once ``count`` workers are registered in procrastinate_workers; fail if a
    worker exits first, or after ``seconds``."""
    conn = await asyncpg.connect(database_url)
    try:

        async def all_registered() -> bool:
            for worker in workers:
                assert worker.popen.poll() is None, f"a worker exited: {worker.output()[-2000:]}"
            return bool(await conn.fetchval(registered) >= count)

        await eventually(
            all_registered,
            timeout=seconds,
            what=f"{count} workers registered in procrastinate_workers",
        )
    finally:
        await conn.close()


def test_serve_refuses_an_unmigrated_database(
    postgres: localdb.LocalPostgres, s3: S3Server, tmp_path: Path
) -> None:
    postgres.execute("CREATE DATABASE unmigrated")
    try:
        env = service_env(postgres.url_of("unmigrated"), s3, tmp_path, localdb.free_port())
        done = subprocess.run(
            [sys.executable, "-m", "imgsvc", "serve"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0
        assert "run `imgsvc migrate`" in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
    finally:
        postgres.execute("DROP DATABASE unmigrated WITH (FORCE)")


async def test_a_file_name_with_control_characters_is_stored_without_them(service: str) -> None:
    csv_text = "S. No.,Product Name,Input Image Urls\n1,A,http://a.test/1.jpg\n"
    body = (
        b"--b0undary\r\n"
        b'Content-Disposition: form-data; name="file"; filename="pro\x00duc\x07ts.csv"\r\n'
        b"Content-Type: text/csv\r\n\r\n" + csv_text.encode() + b"\r\n--b0undary--\r\n"
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    async with aiohttp.ClientSession() as session:
        async with session.post(service + "/upload", data=body, headers=headers) as response:
            assert response.status == 202, await response.text()
            accepted = await response.json()
        async with session.get(accepted["status_url"]) as response:
            assert (await response.json())["file_name"] == "products.csv"
