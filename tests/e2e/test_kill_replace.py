"""Workers killed and replaced at random while a batch runs: every image is done, with
one output each, and the request is finished and announced once.

The kills follow a seeded random sequence; the seed is printed, and
IMGSVC_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import pyvips
from standardwebhooks.webhooks import Webhook

from imgsvc import localdb
from tests.conftest import WEBHOOK_SECRET, eventually
from tests.e2e.processes import (
    Process,
    assert_clean_exit,
    post_csv,
    service_env,
    wait_for_final,
    wait_until_up,
)
from tests.servers import ImageServer, S3Server, WebhookReceiver

pytestmark = pytest.mark.timeout(240)

HEADER = "S. No.,Product Name,Input Image Urls\n"
IMAGES = 240
WORKERS = 3
KILLS = 6


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    """An origin of IMAGES distinct 64x48 JPEGs (a colour each), so that each has an output
    of its own."""
    root = tmp_path_factory.mktemp("distinct")
    for n in range(IMAGES):
        colour = [n % 8 * 32, n // 8 % 8 * 32, n // 64 * 64]
        image = (pyvips.Image.black(64, 48, bands=3) + colour).cast("uchar")
        (root / f"c{n}.jpg").write_bytes(image.jpegsave_buffer(Q=90))
    server = ImageServer(root)
    server.start()
    yield server
    server.stop()


async def fetchval(url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def test_workers_killed_and_replaced_at_random_lose_nothing_and_do_nothing_twice(
    database_url: str, s3: S3Server, origin: ImageServer, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    seed = int(os.environ.get("IMGSVC_TEST_SEED") or random.randrange(2**32))
    print(f"IMGSVC_TEST_SEED={seed}")
    rng = random.Random(seed)
    hook = f"/flaky/{uuid.uuid4().hex}/0"
    prefix = f"kill-{uuid.uuid4().hex}"  # this test's own folder of the shared bucket
    port = localdb.free_port()
    env = {
        **service_env(database_url, s3, tmp_path, port),
        "IMGSVC_MAX_ROWS": str(IMAGES),
        "IMGSVC_STALLED_SECONDS": "2",
        "IMGSVC_IMAGES_PER_JOB": "4",
        "IMGSVC_WORKER_CONCURRENCY": "4",
        "IMGSVC_DOWNLOAD_PER_HOST": "16",
        "IMGSVC_S3_PREFIX": prefix,
        "WEBHOOK_URL": receiver.url(hook),
    }
    base = f"http://127.0.0.1:{port}"
    api = Process([sys.executable, "-m", "imgsvc", "serve", "--no-worker"], env, tmp_path / "api.log")
    started: list[Process] = []

    def start_worker() -> Process:
        worker = Process(
            [sys.executable, "-m", "imgsvc", "worker"], env, tmp_path / f"worker{len(started)}.log"
        )
        started.append(worker)
        return worker

    running = [start_worker() for _ in range(WORKERS)]
    killed: list[Process] = []
    try:
        wait_until_up(base, api)
        rows = "".join(f"{n},P{n},{origin.url(f'/slow/2000/c{n}.jpg')}\n" for n in range(IMAGES))
        async with aiohttp.ClientSession() as session:
            status, accepted = await post_csv(session, base, (HEADER + rows).encode())
            assert status == 202, accepted
            rid = accepted["request_id"]
            await eventually(
                lambda: fetchval(database_url, "SELECT count(*) > 0 FROM images WHERE status = 'processing'"),
                what="the workers started on the batch",
                timeout=30,
            )
            began = time.monotonic()
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                victim = rng.randrange(WORKERS)
                in_flight = await fetchval(
                    database_url, "SELECT count(*) FROM images WHERE status = 'processing'"
                )
                running[victim].popen.send_signal(signal.SIGKILL)
                running[victim].popen.wait(10)
                killed.append(running[victim])
                running[victim] = start_worker()
                at = time.monotonic() - began
                print(f"{at:5.1f} s: killed worker {victim} ({in_flight} images processing)")
            final = await wait_for_final(session, accepted["status_url"], seconds=150)
            print(f"{time.monotonic() - began:5.1f} s: {final['status']}")
            await eventually(lambda: receiver.posts(hook), what="the webhook was delivered", timeout=30)
        assert final["status"] == "completed", (seed, final["counts"])
        assert final["counts"]["done"] == IMAGES
        # The killed workers' images ran again (each claim counts an attempt).
        ran_again = await fetchval(database_url, "SELECT count(*) FROM images WHERE attempts > 1")
        assert isinstance(ran_again, int) and ran_again > 0, "no kill caught an image in flight"
        print(f"{ran_again} images ran again")

        # One row per slot, each with its output; one object per distinct output.
        rows_by_slot = await fetchval(
            database_url,
            "SELECT count(*) = count(DISTINCT (product_id, position)) AND count(*) = $1 FROM images",
            IMAGES,
        )
        assert rows_by_slot
        assert await fetchval(database_url, "SELECT count(*) FROM images WHERE output_key IS NULL") == 0
        keys = set(await fetchval(database_url, "SELECT array_agg(DISTINCT output_key) FROM images") or [])
        stored: set[str] = set()
        for page in (
            s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=f"{prefix}/img/")
        ):
            stored.update(entry["Key"] for entry in page.get("Contents", []))
        assert len(keys) == IMAGES, "two sources gave the same output"
        assert stored == keys, (sorted(keys - stored)[:3], sorted(stored - keys)[:3])

        # One finish and one webhook, whoever was killed.
        logs = "".join(worker.output() for worker in started)
        assert logs.count(f"request {rid} finished") == 1, seed
        assert await fetchval(database_url, "SELECT count(*) FROM webhook_deliveries") == 1
        events = [
            Webhook(WEBHOOK_SECRET).verify(body, headers)["request_id"]
            for headers, body in receiver.posts(hook)
        ]
        assert events == [rid], seed
        written, _ = s3.get(f"{prefix}/{rid}/output.csv")
        assert len(written.decode().splitlines()) == IMAGES + 1  # the header, and every product once
        assert all("Traceback" not in worker.output() for worker in killed)
        assert_clean_exit(*running, api)
        running.clear()
    finally:
        for process in [*running, api]:
            if process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait(10)
